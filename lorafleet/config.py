"""The finetune and retrain configs: one YAML file per adapter, validated on load.

Errors name the file and the dotted field path (`configs/x.yaml: training.batch_size: ...`) so a
typo is caught before any data is read or any model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorafleet.models.adalora_settings import AdaLoraSettings
from lorafleet.models.embedded import EMBEDDED_MODEL_ID
from lorafleet.models.lora import LoraSettings
from lorafleet.models.training_settings import TrainingSettings
from lorafleet.models.turbo_settings import TurboSettings
from lorafleet.names import NAME_PATTERN, NAME_RULE  # NAME_PATTERN stays importable from here for old callers
from lorafleet.sections.data import DataSettings
from lorafleet.sections.evaluation import EvaluationSettings
from lorafleet.sections.merge import MergeSettings
from lorafleet.sections.promotion import PromotionSettings


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the field."""


class FinetuneConfig(BaseModel):
    """Everything needed to produce one adapter, recorded verbatim in its manifest and MLflow run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="adapter and registered-model name")
    base_model: str = EMBEDDED_MODEL_ID
    method: Literal["lora", "qlora", "adalora", "turbo_lora", "turbo", "merge"] = "lora"
    device: str = "auto"
    data: DataSettings
    lora: LoraSettings = LoraSettings()
    adalora: AdaLoraSettings | None = Field(None, description="method 'adalora': rank budget and schedule "
                                                              "(its defaults when the section is left out)")
    training: TrainingSettings = TrainingSettings()
    turbo: TurboSettings = TurboSettings()
    merge: MergeSettings | None = Field(None, description="method 'merge': the adapters merged and how")
    evaluation: EvaluationSettings = EvaluationSettings()
    promotion: PromotionSettings = PromotionSettings()

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not NAME_PATTERN.match(value):
            raise ValueError(f"must be {NAME_RULE}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _adalora_defaults(cls, raw: Any) -> Any:
        """method 'adalora' without an `adalora` section gets the section's defaults (one place: the section)."""
        if isinstance(raw, dict) and raw.get("method") == "adalora" and raw.get("adalora") is None:
            return {**raw, "adalora": {}}
        return raw

    @model_validator(mode="after")
    def _turbo_fields_fit_the_method(self) -> FinetuneConfig:
        if self.adalora is not None and self.method != "adalora":
            raise ValueError(f"an `adalora` section only applies to method 'adalora', not {self.method!r}")
        if self.turbo.base_adapter is not None and self.method != "turbo":
            raise ValueError("turbo.base_adapter only applies to method 'turbo' (heads on an existing LoRA)")
        if (self.method == "merge") != (self.merge is not None):
            raise ValueError("method 'merge' needs a `merge` section (adapters and weights), and a `merge` "
                             "section needs method 'merge'")
        self.training.distributed.check_fits(method=self.method, device=self.device)
        return self

    @property
    def has_heads(self) -> bool:
        return self.method in ("turbo_lora", "turbo")


class RetrainConfig(BaseModel):
    """A list of adapter specs retrained together; each is a path to a finetune config or inline."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    adapters: list[FinetuneConfig] = Field(min_length=1)

    @field_validator("adapters")
    @classmethod
    def _unique_names(cls, value: list[FinetuneConfig]) -> list[FinetuneConfig]:
        names = [spec.name for spec in value]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"adapter names must be unique, repeated: {duplicates}")
        return value


def load_config(path: str | Path) -> FinetuneConfig:
    path = Path(path)
    return parse_config(_read_yaml(path), source=str(path), base_dir=path.parent)


def parse_config(raw: dict[str, Any], *, source: str = "<config>", base_dir: Path | None = None) -> FinetuneConfig:
    """Validate a finetune config dict; data file paths are made relative to `base_dir`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with at least `name` and `data`")
    raw = _resolve_data_paths(raw, base_dir)
    try:
        return FinetuneConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_describe(source, error)) from None


def load_retrain_config(path: str | Path) -> RetrainConfig:
    path = Path(path)
    raw = _read_yaml(path)
    adapters = raw.get("adapters") if isinstance(raw, dict) else None
    if not isinstance(adapters, list) or not adapters:
        raise ConfigError(f"{path}: adapters: give a non-empty list of config paths or inline configs")
    specs = []
    for index, item in enumerate(adapters):
        if isinstance(item, str):
            specs.append(load_config(path.parent / item))
        else:
            specs.append(parse_config(item, source=f"{path}: adapters.{index}", base_dir=path.parent))
    try:
        return RetrainConfig(adapters=specs)
    except ValidationError as error:
        raise ConfigError(_describe(str(path), error)) from None


def _read_yaml(path: Path) -> Any:
    if not path.exists():
        raise ConfigError(f"{path}: no such config file")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None


def _resolve_data_paths(raw: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
    data = raw.get("data")
    if base_dir is None or not isinstance(data, dict):
        return raw
    data = dict(data)
    for key in ("train_file", "validation_file", "test_file"):
        value = data.get(key)
        if isinstance(value, str) and "${" not in value and not Path(value).expanduser().is_absolute():
            data[key] = str((base_dir / value).resolve())
    return {**raw, "data": data}


def _describe(source: str, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "<top level>"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown field (check the spelling)"
        lines.append(f"{source}: {where}: {message}")
    return "\n".join(lines)
