"""Output parsers: JSON objects and ViGGO meaning representations become comparable field sets."""

from __future__ import annotations

import csv

import pytest

from lorafleet.evaluation.parsing import normalise_whitespace, parse_fields

TOMB_RAIDER = ("inform(name[Tomb Raider: The Last Revelation], release_year[1999], "
               "genres[action-adventure, puzzle, platformer], rating[excellent])")


# --- JSON -----------------------------------------------------------------------------------------

def test_json_values_are_normalised():
    fields = parse_fields('{"name": "  Alice ", "age": 3, "score": 2.50, "ok": true, "note": null}', "json")
    assert fields == {("name", '"alice"'), ("age", "3"), ("score", "2.5"), ("ok", "true"), ("note", "null")}


def test_json_integral_floats_equal_ints():
    assert parse_fields('{"n": 3}', "json") == parse_fields('{"n": 3.0}', "json") \
        == parse_fields('{"n": 3e0}', "json") == {("n", "3")}


def test_json_keeps_types_apart():
    """The string "true" is not the literal true, "3" is not 3, "null" is not null (and True != 1)."""
    literal = parse_fields('{"a": true, "b": 3, "c": null, "d": 1}', "json")
    strings = parse_fields('{"a": "true", "b": "3", "c": "null", "d": true}', "json")
    assert len(literal) == len(strings) == 4
    assert not literal & strings


def test_json_first_object_in_prose_or_fence():
    text = 'Here you go:\n```json\n{"city": "Paris"}\n```\nand {"city": "Rome"}'
    assert parse_fields(text, "json") == {("city", '"paris"')}


def test_json_skips_broken_braces_before_the_object():
    assert parse_fields('set {x} then {"a": 1}', "json") == {("a", "1")}


def test_json_nested_objects_and_lists():
    text = '{"who": {"name": "Bo", "tags": ["x", "Y", "x", 2]}, "empty": [], "blank": {}}'
    fields = parse_fields(text, "json")
    assert fields == {("who.name", '"bo"'), ("who.tags", '"x"'), ("who.tags", '"y"'), ("who.tags", "2"),
                      ("empty", "[]"), ("blank", "{}")}


def test_json_objects_inside_lists_compare_canonically():
    one = parse_fields('{"items": [{"sku": "A1", "qty": 2}, {"sku": "b2", "qty": 1.0}]}', "json")
    two = parse_fields('{"items": [{"qty": 1, "sku": "B2"}, {"qty": 2.0, "sku": " a1 "}]}', "json")
    assert one == two and len(one) == 2


def test_json_key_order_and_spacing_do_not_matter():
    assert parse_fields('{"a":1,"b":"X"}', "json") == parse_fields('{ "b" : "x" ,\n "a" : 1.0 }', "json")


def test_json_empty_object_parses_to_no_fields():
    assert parse_fields("{}", "json") == frozenset()


@pytest.mark.parametrize("text", ["", "no json here", '{"a": 1', "[1, 2, 3]", '{"a": }', "null"])
def test_json_unparsable_is_none(text):
    assert parse_fields(text, "json") is None


# --- ViGGO ----------------------------------------------------------------------------------------

def test_viggo_example_from_the_brief():
    assert parse_fields(TOMB_RAIDER, "viggo_mr") == {
        ("act", "inform"), ("name", "tomb raider: the last revelation"), ("release_year", "1999"),
        ("genres", "action-adventure"), ("genres", "puzzle"), ("genres", "platformer"),
        ("rating", "excellent"),
    }


def test_viggo_slot_order_and_list_order_do_not_matter():
    shuffled = ("inform(rating[excellent], genres[platformer, action-adventure, puzzle], "
                "release_year[1999], name[Tomb Raider: The Last Revelation])")
    assert parse_fields(shuffled, "viggo_mr") == parse_fields(TOMB_RAIDER, "viggo_mr")


def test_viggo_commas_inside_single_valued_slots_stay_whole():
    mr = "give_opinion(developer[Spectrum HoloByte, Inc.], exp_release_date[June 29, 2018], rating[good])"
    assert parse_fields(mr, "viggo_mr") == {("act", "give_opinion"), ("developer", "spectrum holobyte, inc."),
                                             ("exp_release_date", "june 29, 2018"), ("rating", "good")}


def test_viggo_parentheses_inside_values():
    fields = parse_fields("inform(name[Dirt: Showdown], esrb[E 10+ (for Everyone 10 and Older)])", "viggo_mr")
    assert ("esrb", "e 10+ (for everyone 10 and older)") in fields


def test_viggo_empty_slot_value():
    fields = parse_fields("request_attribute(esrb[])", "viggo_mr")
    assert fields == {("act", "request_attribute"), ("esrb", "")}


def test_viggo_surrounding_text_and_whitespace_are_tolerated():
    expected = parse_fields(TOMB_RAIDER, "viggo_mr")
    assert parse_fields(f"  The MR is: {TOMB_RAIDER}\n<junk>", "viggo_mr") == expected
    spaced = "inform( name [Tomb Raider: The Last Revelation] ,release_year[1999] )"
    assert parse_fields(spaced, "viggo_mr") == {
        ("act", "inform"), ("name", "tomb raider: the last revelation"), ("release_year", "1999")}


@pytest.mark.parametrize("text", [
    "", "just a sentence", "inform(name[Tomb Raider]", "inform(name[Tomb Raider)", "inform(name Tomb Raider)",
    "inform(name[a] rating[good])", "inform(name[a[b]])", "inform(,)",
])
def test_viggo_unparsable_is_none(text):
    assert parse_fields(text, "viggo_mr") is None


def test_every_viggo_mr_parses(data_root):
    """The real grammar: every MR of every split must parse, and keep its dialogue act."""
    for split in ("train", "valid", "test"):
        with open(data_root / "viggo" / f"{split}.csv", newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) > 500
        for line, row in enumerate(rows, start=2):
            fields = parse_fields(row["mr"], "viggo_mr")
            assert fields is not None, f"viggo/{split}.csv:{line} did not parse: {row['mr']}"
            act = row["mr"].split("(", 1)[0].strip()
            assert ("act", act) in fields
            assert len(fields) >= 2, f"viggo/{split}.csv:{line} lost its slots: {row['mr']}"


# --- text and errors ------------------------------------------------------------------------------

def test_text_format_has_no_fields():
    assert parse_fields("anything at all", "text") == frozenset()


def test_unknown_format_is_an_error():
    with pytest.raises(ValueError, match="output_format"):
        parse_fields("x", "xml")


def test_normalise_whitespace():
    assert normalise_whitespace("  a \n\t b  ") == "a b"
