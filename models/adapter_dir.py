"""The adapter directory contract (DESIGN.md): what `lorafleet.json` holds and how a folder is checked.

An adapter directory is the unit every later stage consumes (evaluation, registry, serving). Its
manifest carries the lineage needed to rebuild and serve it without the config file that made it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .cache import atomic_write_text

MANIFEST_FILE = "lorafleet.json"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
TURBO_CONFIG_FILE = "turbo_config.json"
TURBO_WEIGHTS_FILE = "turbo_heads.safetensors"

Method = Literal["lora", "qlora", "turbo_lora", "turbo"]
OutputFormat = Literal["json", "viggo_mr", "text"]


class InvalidAdapterDir(ValueError):
    """A folder that does not satisfy the adapter directory contract."""


class TaskInfo(BaseModel):
    """How prompts were built in training, so serving and evaluation build them the same way."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    output_format: OutputFormat = "text"
    system_prompt: str | None = None
    prompt_template: str = "{prompt}"


class BaseModelRef(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    revision: str


class AdapterManifest(BaseModel):
    """Contents of `lorafleet.json`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int = 1
    name: str
    method: Method
    base_model: BaseModelRef
    tokenizer_hash: str
    chat_template: str | None = None
    task: TaskInfo
    data_fingerprint: str | None = None
    base_adapter: str | None = None  # turbo: the LoRA adapter the heads were trained on (its files are copied here)
    training_config: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    lorafleet_version: str = ""

    def with_metrics(self, metrics: dict[str, float]) -> AdapterManifest:
        return self.model_copy(update={"metrics": {**self.metrics, **metrics}})


def write_manifest(adapter_dir: Path, manifest: AdapterManifest) -> None:
    atomic_write_text(Path(adapter_dir) / MANIFEST_FILE, manifest.model_dump_json(indent=2))


def read_manifest(adapter_dir: Path) -> AdapterManifest:
    path = Path(adapter_dir) / MANIFEST_FILE
    if not path.exists():
        raise InvalidAdapterDir(f"{adapter_dir} is not an adapter directory: {MANIFEST_FILE} is missing")
    try:
        return AdapterManifest.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, ValidationError) as error:
        raise InvalidAdapterDir(f"{path} is not a valid manifest: {error}") from error


def has_lora(adapter_dir: Path) -> bool:
    """Whether the folder carries PEFT LoRA weights (every method but a bare-base `turbo`)."""
    return (Path(adapter_dir) / PEFT_WEIGHTS_FILE).exists()


def validate_adapter_dir(adapter_dir: Path) -> AdapterManifest:
    """Check the files the contract requires for the manifest's method; return the manifest."""
    adapter_dir = Path(adapter_dir)
    manifest = read_manifest(adapter_dir)
    required = []
    if manifest.method in ("lora", "qlora", "turbo_lora") or manifest.base_adapter:
        required += [PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE]
    if manifest.method in ("turbo_lora", "turbo"):
        required += [TURBO_CONFIG_FILE, TURBO_WEIGHTS_FILE]
    missing = [name for name in required if not (adapter_dir / name).exists()]
    if manifest.method == "turbo" and not manifest.base_adapter and (adapter_dir / PEFT_WEIGHTS_FILE).exists():
        raise InvalidAdapterDir(f"{adapter_dir}: a turbo adapter with LoRA files must name its base_adapter")
    if missing:
        raise InvalidAdapterDir(f"{adapter_dir} ({manifest.method}) is missing {', '.join(missing)}")
    pickled = [p.name for p in adapter_dir.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".pkl"}]
    if pickled:
        raise InvalidAdapterDir(f"{adapter_dir} contains pickled weights {pickled}: safetensors only")
    return manifest
