"""Named data presets: a complete task (source, columns, system prompt, output format) behind one word.

A preset only fills what the config left unset, so `preset: viggo` plus an explicit `system_prompt`
trains ViGGO with the user's prompt. Source files are one unit: if the config names any of
`train_file`/`validation_file`/`test_file`, none of the preset's files are used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.sections.data import ColumnMapping, DataSettings

from .generated import RECORD_KEYS

FILE_FIELDS = ("train_file", "validation_file", "test_file")

EXTRACTION_SYSTEM_PROMPT = (
    "Extract the record as one JSON object with these keys in order:\n"
    + "\n".join(f"{kind}: {', '.join(keys)}" for kind, keys in RECORD_KEYS.items())
    + "\nMissing values are null; dates are YYYY-MM-DD."
)

# Acts and slots as they occur in ViGGO; slots listed in the order every MR in the data uses
# (a topological order of slot pairs over all three splits has no conflict). Kept short: the
# system prompt is repeated in every training row (~109 SmolLM2 tokens).
VIGGO_ACTS = ("inform", "request", "give_opinion", "confirm", "verify_attribute", "suggest",
              "request_explanation", "recommend", "request_attribute")
VIGGO_SLOTS = ("name", "release_year", "exp_release_date", "developer", "esrb", "rating", "genres",
               "player_perspective", "has_multiplayer", "platforms", "available_on_steam",
               "has_linux_release", "has_mac_release", "specifier")
VIGGO_SYSTEM_PROMPT = (
    "Parse the sentence into a video game meaning representation act(slot[value], ...).\n"
    f"Acts: {', '.join(VIGGO_ACTS)}.\n"
    f"Slots in order: {', '.join(VIGGO_SLOTS)}."
)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    fields: Callable[[Path], dict[str, Any]]  # DataSettings fields, given the data root
    generated: bool = False  # examples come from tasks/data/generated.py unless the config names files


@dataclass(frozen=True)
class ResolvedData:
    """DataSettings with the preset applied, and whether the examples are generated rather than read."""

    settings: DataSettings
    generated: bool


def _extraction(_: Path) -> dict[str, Any]:
    return {"output_format": "json", "system_prompt": EXTRACTION_SYSTEM_PROMPT, "prompt_template": "{prompt}"}


def _viggo(data_root: Path) -> dict[str, Any]:
    folder = Path(data_root) / "viggo"
    return {
        "train_file": str(folder / "train.csv"),
        "validation_file": str(folder / "valid.csv"),
        "test_file": str(folder / "test.csv"),
        "format": "csv",
        "columns": ColumnMapping(prompt="ref", completion="mr"),
        "output_format": "viggo_mr",
        "system_prompt": VIGGO_SYSTEM_PROMPT,
        "prompt_template": "{prompt}",
    }


PRESETS: dict[str, Preset] = {
    "extraction": Preset("extraction", "built-in generated text -> JSON extraction (orders, people, companies)",
                         _extraction, generated=True),
    "viggo": Preset("viggo", "ViGGO video-game utterance -> meaning representation, from <data_root>/viggo",
                    _viggo),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown data preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") \
            from None


def resolve_data(data: DataSettings, data_root: Path) -> ResolvedData:
    """Fill the fields the config did not set from its preset (a no-op without one)."""
    if data.preset is None:
        return ResolvedData(settings=data, generated=False)
    preset = get_preset(data.preset)
    # A field written with its default (null, format 'auto') is not a choice: a config saved whole (an
    # adapter's manifest keeps every field) must resolve to the preset's files, columns and format as the
    # config it came from did.
    defaults = type(data).model_fields
    explicit = {name for name in data.model_fields_set
                if getattr(data, name) != defaults[name].get_default(call_default_factory=True)}
    if preset.generated and data.train_file is None and (data.validation_file or data.test_file):
        raise ValueError(f"data: preset {preset.name!r} generates its examples; a validation_file or "
                         f"test_file needs a train_file too")
    user_files = any(name in explicit for name in FILE_FIELDS)
    filled = {key: value for key, value in preset.fields(Path(data_root)).items()
              if key not in explicit and not (key in FILE_FIELDS and user_files)}
    # model_copy skips validation, which is what we want: the preset's values are known-good and
    # `model_fields_set` keeps recording only what the user wrote.
    settings = data.model_copy(update=filled)
    return ResolvedData(settings=settings, generated=preset.generated and settings.train_file is None)
