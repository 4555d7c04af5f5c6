"""The built-in generated extraction task (tasks/data/generated.py). Runs in ~1 s (the slow test: ~2 s)."""

from __future__ import annotations

import json
import re

import pytest

from lorafleet.sections.data import DataSettings
from lorafleet.tasks.data.examples import carve_splits
from lorafleet.tasks.data.generated import MONTHS, NUMBER_WORDS, RECORD_KEYS, generate_examples

DEFAULT_SIZE = DataSettings(preset="extraction").generated_size


@pytest.fixture(scope="module")
def examples():
    return generate_examples(DEFAULT_SIZE, seed=0)


def test_default_size_is_at_least_3000(examples):
    assert DEFAULT_SIZE >= 3000
    assert len(examples) == DEFAULT_SIZE


def test_same_seed_same_examples_other_seed_differs(examples):
    assert generate_examples(DEFAULT_SIZE, seed=0) == examples
    other = generate_examples(DEFAULT_SIZE, seed=1)
    assert [e.prompt for e in other] != [e.prompt for e in examples]


def test_texts_and_targets_are_unique_so_splits_are_disjoint(examples):
    splits = carve_splits(examples, validation_fraction=0.1, test_fraction=0.1, seed=0)
    assert sum(len(split) for split in splits.values()) == len(examples)
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        assert not {e.prompt for e in splits[a]} & {e.prompt for e in splits[b]}
        assert not {e.completion for e in splits[a]} & {e.completion for e in splits[b]}


def test_targets_are_compact_json_with_fixed_key_order(examples):
    kinds = set()
    for example in examples:
        record = json.loads(example.completion)
        kinds.add(record["type"])
        assert tuple(record) == RECORD_KEYS[record["type"]]
        assert example.completion == json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    assert kinds == set(RECORD_KEYS)


def test_optional_fields_are_sometimes_null_and_required_never(examples):
    records = [json.loads(e.completion) for e in examples]
    for kind, keys in RECORD_KEYS.items():
        of_kind = [r for r in records if r["type"] == kind]
        nulls = {key: sum(r[key] is None for r in of_kind) for key in keys}
        assert nulls["type"] == 0 and nulls[keys[1]] == 0  # type and the record's name/customer
        assert any(count > 0 for count in nulls.values())


def _spoken_date(iso: str) -> list[str]:
    year, month, day = (int(part) for part in iso.split("-"))
    name = MONTHS[month - 1]
    return [iso, f"{name} {day}, {year}", f"{day} {name} {year}", f"{name[:3]} {day}, {year}",
            f"of {name} {year}"]


def test_every_value_is_recoverable_from_the_text(examples):
    """Learnability: strings are copied verbatim, numbers and dates follow fixed normalisations."""
    for example in examples:
        text, record = example.prompt, json.loads(example.completion)
        plain = text.replace(",", "")  # thousands separators
        for key, value in record.items():
            if value is None or key == "type":
                continue
            if key == "date":
                assert any(form in text for form in _spoken_date(value)), (text, value)
            elif key == "total":
                assert re.search(rf"{value:.2f}\b", plain), (text, value)
            elif key == "quantity":
                words = {NUMBER_WORDS[value - 1], str(value)} | ({"a dozen"} if value == 12 else set()) \
                    | ({"a single"} if value == 1 else set())
                assert any(re.search(rf"\b{word}\b", text, re.IGNORECASE) for word in words), (text, value)
            elif isinstance(value, int):
                assert str(value) in plain, (text, key, value)
            else:
                assert value in text, (text, key, value)


def test_texts_are_short(examples):
    assert max(len(e.prompt) for e in examples) < 260
    assert max(e.prompt.count(". ") for e in examples) <= 2


@pytest.mark.slow
def test_targets_fit_the_token_budget_of_smollm2(model_cache, examples):
    from lorafleet.models.base import load_tokenizer, resolve_base_model

    tokenizer = load_tokenizer(resolve_base_model("smollm2-135m-instruct", model_cache))
    lengths = [len(tokenizer(e.completion, add_special_tokens=False)["input_ids"]) for e in examples]
    assert max(lengths) <= 60
