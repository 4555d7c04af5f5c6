"""The `merge` flow: merge registered adapters into a new one, then evaluate, register and gate it.

The merged adapter is a `method: merge` finetune config, run by the same stages as a trained adapter
(`flows/finetune.run_finetune`): the same evaluation against the base model on held-out rows, the same
registration (alias `challenger`, with the parents' pinned versions and the recipe as version tags and
in `lorafleet.json`), the same gate before `champion` moves. Which rows judge it: the `data`,
`evaluation` and `promotion` sections of `config` when given, else those the first parent was trained
and judged with (its manifest records its whole config).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from prefect import flow

from lorafleet.config import ConfigError, FinetuneConfig, parse_config
from lorafleet.flows.finetune import run_finetune
from lorafleet.models.adapter_dir import read_manifest
from lorafleet.sections.merge import MergeParent
from lorafleet.settings import Settings
from lorafleet.tasks.adapter_sources import resolve_model_reference
from lorafleet.tasks.device_slots import SlotSettings

JUDGED_BY = ("base_model", "data", "evaluation", "promotion")  # what a merge takes from a config


def merge_config(name: str, adapters: list[str], settings: Settings, *, method: str = "linear",
                 density: float | None = None, majority_sign_method: str = "total", seed: int = 0,
                 config: str | Path | None = None, promote: bool = True) -> FinetuneConfig:
    """The `method: merge` config of a merge; errors name the argument or config field at fault."""
    if not adapters:
        raise ConfigError("adapters: name at least one adapter, e.g. viggo:0.7,conll:0.3")
    parents = [MergeParent.parse(text).model_dump() for text in adapters]
    if config is not None:
        source, base_dir = str(config), Path(config).parent
        raw = yaml.safe_load(Path(config).read_text(encoding="utf-8")) if Path(config).exists() else None
        if not isinstance(raw, dict):
            raise ConfigError(f"{config}: not a config file (a mapping with at least `data`)")
    else:
        folder, pinned = resolve_model_reference(parents[0]["adapter"], settings)
        source, base_dir, raw = f"{pinned} (its recorded config)", None, read_manifest(folder).training_config
    judged = {key: raw[key] for key in JUDGED_BY if key in raw}
    merge = {"adapters": parents, "method": method, "density": density,
             "majority_sign_method": majority_sign_method, "seed": seed}
    spec = parse_config({**judged, "name": name, "method": "merge", "merge": merge}, source=source,
                        base_dir=base_dir)
    if not promote:
        spec = spec.model_copy(update={"promotion": spec.promotion.model_copy(update={"auto_promote": False})})
    return spec


@flow(name="merge")
def merge(name: str, adapters: list[str], method: str = "linear", density: float | None = None,
          majority_sign_method: str = "total", seed: int = 0, config: str | None = None,
          promote: bool = True) -> dict[str, Any]:
    """Merge `adapters` (`REF:WEIGHT` each) into adapter `name` and run it through evaluate → register → gate."""
    settings = Settings.from_env().ensure()
    spec = merge_config(name, adapters, settings, method=method, density=density,
                        majority_sign_method=majority_sign_method, seed=seed, config=config, promote=promote)
    return run_finetune(spec, settings, SlotSettings.from_env())
