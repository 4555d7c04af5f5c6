"""Turn model outputs into sets of (field, value) pairs so structured answers can be scored field by field.

Exact string match punishes harmless differences (key order, spacing, `3` vs `3.0`, slot order in a
ViGGO meaning representation); comparing sets of normalised pairs measures what a downstream consumer
cares about: which facts the model got right. Every value is normalised to a string so the two
formats share one type.

Formats:

* `json` — the first JSON object in the text. Keys of nested objects are joined with dots
  (`address.city`); a list contributes one pair per element (order and duplicates ignored, like a
  ViGGO multi-valued slot) and an empty list the pair `(key, "[]")`. Each value becomes canonical
  JSON text, so types never collide (Python has `True == 1`; here `true`, `1` and `"1"` all differ):
  strings are stripped, casefolded and quoted (`"paris"`); numbers are written canonically so `3`,
  `3.0` and `3e0` all give `3`; `true`, `false` and `null` stay bare literals.
* `viggo_mr` — `act(slot[value], slot[value], ...)`, the first one in the text. Gives `("act", act)`
  plus one `(slot, value)` per value; `genres`, `platforms` and `player_perspective` hold lists split
  on commas, other slots are single values even when they contain a comma
  (`developer[Spectrum HoloByte, Inc.]`, `exp_release_date[June 29, 2018]`). An empty value
  (`request_attribute(esrb[])`) is the pair `(slot, "")`. Values are stripped and casefolded.
* `text` — no fields; only exact match and ROUGE-L apply.

Unparsable text gives None, never an empty set, so callers can tell "answered nothing" from "broke
the format".
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal, get_args

from lorafleet.models.adapter_dir import OutputFormat

Field = tuple[str, str]
FieldSet = frozenset[Field]

OUTPUT_FORMATS: tuple[str, ...] = get_args(OutputFormat)
STRUCTURED_FORMATS: tuple[str, ...] = ("json", "viggo_mr")

# ViGGO slots whose value is a comma-separated list; every other slot's value is atomic.
VIGGO_LIST_SLOTS = frozenset({"genres", "platforms", "player_perspective"})

_WHITESPACE = re.compile(r"\s+")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MR_START = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(")
_JSON = json.JSONDecoder()


def check_output_format(output_format: str) -> Literal["json", "viggo_mr", "text"]:
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {list(OUTPUT_FORMATS)}, got {output_format!r}")
    return output_format  # type: ignore[return-value]


def normalise_whitespace(text: str) -> str:
    """Collapse runs of whitespace and trim the ends: the form exact match compares."""
    return _WHITESPACE.sub(" ", text).strip()


def parse_fields(text: str, output_format: str) -> FieldSet | None:
    """The comparable fields of `text`, or None when it does not parse (always empty for `text`)."""
    output_format = check_output_format(output_format)
    if output_format == "json":
        return parse_json_fields(text)
    if output_format == "viggo_mr":
        return parse_viggo_mr(text)
    return frozenset()


# --- JSON -----------------------------------------------------------------------------------------

def parse_json_fields(text: str) -> FieldSet | None:
    """Fields of the first JSON object in `text` (prose or a code fence around it is ignored)."""
    obj = first_json_object(text)
    if obj is None:
        return None
    fields: set[Field] = set()
    _flatten(obj, "", fields)
    return frozenset(fields)


def first_json_object(text: str) -> dict[str, Any] | None:
    """The first `{...}` in `text` that decodes as a JSON object, or None."""
    start = text.find("{")
    while start != -1:
        try:
            value, _ = _JSON.raw_decode(text, start)
        except ValueError:
            value = None
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    return None


def _flatten(value: Any, key: str, out: set[Field]) -> None:
    if isinstance(value, dict):
        if not value and key:
            out.add((key, "{}"))
        for child_key, child in value.items():
            _flatten(child, f"{key}.{child_key}" if key else str(child_key), out)
    elif isinstance(value, list):
        if not value:
            out.add((key, "[]"))
        for item in value:
            out.add((key, _canonical(item)))
    else:
        out.add((key, _canonical(value)))


def _canonical(value: Any) -> str:
    """One string per JSON value up to normalisation; containers inside lists become canonical JSON."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before numbers: bool is an int subclass
        return "true" if value else "false"
    if isinstance(value, int | float):
        return _canonical_number(value)
    if isinstance(value, str):
        return json.dumps(value.strip().casefold(), ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ",".join(sorted(_canonical(item) for item in value)) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(sorted(f"{json.dumps(str(k), ensure_ascii=False)}:{_canonical(v)}"
                                     for k, v in value.items())) + "}"
    raise TypeError(f"not a JSON value: {value!r}")


def _canonical_number(value: float) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):  # json accepts NaN/Infinity; keep them distinct from numbers
            return repr(value)
        if value.is_integer():
            return str(int(value))
        return repr(value)
    return str(value)


# --- ViGGO meaning representations ----------------------------------------------------------------

def parse_viggo_mr(text: str) -> FieldSet | None:
    """Fields of the first well-formed `act(slot[value], ...)` in `text`, or None."""
    for match in _MR_START.finditer(text):
        fields = _parse_mr_at(text, match)
        if fields is not None:
            return fields
    return None


def _parse_mr_at(text: str, start: re.Match[str]) -> FieldSet | None:
    """Parse slots from just after `act(` up to the closing parenthesis; None on any deviation."""
    fields: set[Field] = {("act", start.group(1).casefold())}
    pos = _skip_spaces(text, start.end())
    if text.startswith(")", pos):
        return frozenset(fields)
    while True:
        slot = _IDENTIFIER.match(text, pos)
        if slot is None:
            return None
        pos = _skip_spaces(text, slot.end())
        if not text.startswith("[", pos):
            return None
        close = text.find("]", pos + 1)
        if close == -1:
            return None
        raw_value = text[pos + 1:close]
        if "[" in raw_value:  # a nested bracket means we lost track of the grammar
            return None
        name = slot.group(0).casefold()
        fields.update((name, value) for value in _slot_values(name, raw_value))
        pos = _skip_spaces(text, close + 1)
        if text.startswith(")", pos):
            return frozenset(fields)
        if not text.startswith(",", pos):
            return None
        pos = _skip_spaces(text, pos + 1)


def _slot_values(slot: str, raw_value: str) -> list[str]:
    value = raw_value.strip().casefold()
    if slot not in VIGGO_LIST_SLOTS or not value:
        return [value]
    return [part.strip() for part in value.split(",") if part.strip()]


def _skip_spaces(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos
