"""The adapter directory contract (DESIGN.md): what `lorafleet.json` holds and how a folder is checked.

An adapter directory is the unit every later stage consumes (evaluation, registry, serving). Its
manifest carries the lineage needed to rebuild and serve it without the config file that made it.

A folder may come from someone else (an admin's local path, a registry artifact), so every file read
from it goes through `adapter_file` / `read_adapter_text`: after resolving links the file must be a
regular file inside the folder's own resolved path. A link to a secret elsewhere, a FIFO that would block
the reader forever or a device is refused, and errors name the file and field, never what it holds.
"""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError

from .cache import atomic_write_text

MANIFEST_FILE = "lorafleet.json"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
TURBO_CONFIG_FILE = "turbo_config.json"
TURBO_WEIGHTS_FILE = "turbo_heads.safetensors"
MAX_CONFIG_BYTES = 4 << 20  # the largest JSON file (manifest, PEFT or Turbo config) read from an adapter folder
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl"})

Method = Literal["lora", "qlora", "adalora", "turbo_lora", "turbo", "merge"]
OutputFormat = Literal["json", "viggo_mr", "text"]


class InvalidAdapterDir(ValueError):
    """A folder that does not satisfy the adapter directory contract."""


class UnsafeAdapterFile(InvalidAdapterDir):
    """A folder entry that is not a regular file inside the folder once links are resolved."""


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
    # method 'merge': {"parents": [{"reference": pinned ref, "name": ..., "weight": ...}], "recipe": {...}}
    lineage: dict[str, Any] | None = None
    # method 'adalora': the rank each adapted projection kept (PEFT module name -> rank); the PEFT files
    # are a plain LoRA zero-padded to the largest of them (models/adalora.py)
    rank_pattern: dict[str, NonNegativeInt] | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    lorafleet_version: str = ""

    def with_metrics(self, metrics: dict[str, float]) -> AdapterManifest:
        return self.model_copy(update={"metrics": {**self.metrics, **metrics}})


def write_manifest(adapter_dir: Path, manifest: AdapterManifest) -> None:
    atomic_write_text(Path(adapter_dir) / MANIFEST_FILE, manifest.model_dump_json(indent=2))


def read_manifest(adapter_dir: Path) -> AdapterManifest:
    path = Path(adapter_dir) / MANIFEST_FILE
    try:
        text = read_adapter_text(adapter_dir, MANIFEST_FILE)
    except FileNotFoundError:
        raise InvalidAdapterDir(f"{adapter_dir} is not an adapter directory: {MANIFEST_FILE} is missing") from None
    try:
        return AdapterManifest.model_validate(json.loads(text))
    except json.JSONDecodeError as error:  # its message is a position (line, column), never the text
        raise InvalidAdapterDir(f"{path} is not a valid manifest: not JSON: {error}") from None
    except ValidationError as error:
        raise InvalidAdapterDir(f"{path} is not a valid manifest: {describe_invalid(MANIFEST_FILE, error)}") from None


def describe_invalid(source: str, error: ValidationError) -> str:
    """`<source>: <field.path>: <problem>` per problem, without the offending values.

    `str(ValidationError)` quotes each input (`input_value=...`): for a file that may be a secret the
    file was linked to, or just noise; the field path and the rule broken are what the reader needs."""
    problems = []
    for item in error.errors(include_input=False, include_url=False):
        where = ".".join(str(part) for part in item["loc"]) or "<top level>"
        message = "unknown field" if item["type"] == "extra_forbidden" else item["msg"]
        problems.append(f"{source}: {where}: {message}")
    return "; ".join(problems)


def adapter_file(adapter_dir: Path, filename: str) -> Path:
    """The resolved path of `adapter_dir/filename`, if it is a regular file inside the folder's resolved path.

    Every read of an adapter file goes through here (the manifest, PEFT and Turbo configs and weights):
    a link to a file outside the folder, a FIFO, a device or a sub-folder is UnsafeAdapterFile, a missing
    file FileNotFoundError. `filename` is one name, never a path."""
    if filename in ("", ".", "..") or "/" in filename or "\0" in filename:
        raise UnsafeAdapterFile(f"{adapter_dir}: {filename!r} is not a file name inside the adapter folder")
    real, mode = _confined(Path(adapter_dir), filename)
    if not stat.S_ISREG(mode):
        raise UnsafeAdapterFile(f"{Path(adapter_dir) / filename} is not a regular file ({_kind(mode)}): refused")
    return real


def read_adapter_text(adapter_dir: Path, filename: str, *, max_bytes: int = MAX_CONFIG_BYTES) -> str:
    """A small text file of the adapter folder (a JSON config), confined by `adapter_file` and bounded.

    Opened without following a link and without blocking, and checked again on the open file, so a
    file swapped for a link or a FIFO after the check is refused too."""
    real = adapter_file(adapter_dir, filename)
    entry = Path(adapter_dir) / filename
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise UnsafeAdapterFile(f"{entry} could not be opened safely: {error.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeAdapterFile(f"{entry} is not a regular file ({_kind(info.st_mode)}): refused")
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UnsafeAdapterFile(f"{entry} is larger than {max_bytes} bytes, the most read from a config file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidAdapterDir(f"{entry} is not UTF-8 text (byte {error.start})") from None


def check_adapter_files(adapter_dir: Path) -> None:
    """Every entry of the folder is a regular file or a sub-folder inside it once links are resolved.

    Checked when a folder is accepted, so no reader (PEFT's own included, which this module does not
    control) is pointed at a file elsewhere or blocks on a FIFO. Sub-folders are never read."""
    adapter_dir = Path(adapter_dir)
    try:
        names = sorted(entry.name for entry in adapter_dir.iterdir())
    except OSError as error:
        raise InvalidAdapterDir(f"{adapter_dir} cannot be listed: {error.strerror}") from None
    for name in names:
        try:
            _, mode = _confined(adapter_dir, name)
        except FileNotFoundError:  # a link to nothing (or an entry removed while listing)
            raise UnsafeAdapterFile(f"{adapter_dir / name} is a link to nothing: refused") from None
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise UnsafeAdapterFile(f"{adapter_dir / name} is not a regular file ({_kind(mode)}): refused")


def _confined(adapter_dir: Path, name: str) -> tuple[Path, int]:
    """(resolved path, mode) of a folder entry that stays inside the folder's resolved path once links are
    followed; UnsafeAdapterFile otherwise, FileNotFoundError when it does not exist."""
    entry = adapter_dir / name
    try:
        folder = adapter_dir.resolve(strict=True)
        real = entry.resolve()  # links followed (a dangling one too): where a read would really go
    except FileNotFoundError:
        raise
    except (OSError, RuntimeError) as error:  # a link loop, a name too long, no permission
        raise UnsafeAdapterFile(f"{entry} cannot be resolved: {getattr(error, 'strerror', None) or 'link loop'}"
                                ) from None
    if real == folder or not real.is_relative_to(folder):
        raise UnsafeAdapterFile(f"{entry} links outside its adapter folder: refused")
    try:
        return real, real.stat().st_mode
    except FileNotFoundError:
        raise
    except OSError as error:
        raise UnsafeAdapterFile(f"{entry} cannot be read: {error.strerror}") from None


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a plain file"


def has_lora(adapter_dir: Path) -> bool:
    """Whether the folder carries PEFT LoRA weights (every method but a bare-base `turbo`)."""
    return (Path(adapter_dir) / PEFT_WEIGHTS_FILE).exists()


def validate_adapter_dir(adapter_dir: Path) -> AdapterManifest:
    """Check the files the contract requires for the manifest's method; return the manifest.

    Every entry is checked first (`check_adapter_files`): the files named below are read later by others."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise InvalidAdapterDir(f"{adapter_dir} is not a directory")
    check_adapter_files(adapter_dir)
    manifest = read_manifest(adapter_dir)
    required = []
    if manifest.method in ("lora", "qlora", "adalora", "turbo_lora", "merge") or manifest.base_adapter:
        required += [PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE]
    if manifest.method in ("turbo_lora", "turbo"):
        required += [TURBO_CONFIG_FILE, TURBO_WEIGHTS_FILE]
    missing = [name for name in required if not (adapter_dir / name).exists()]
    if manifest.method == "turbo" and not manifest.base_adapter and (adapter_dir / PEFT_WEIGHTS_FILE).exists():
        raise InvalidAdapterDir(f"{adapter_dir}: a turbo adapter with LoRA files must name its base_adapter")
    if missing:
        raise InvalidAdapterDir(f"{adapter_dir} ({manifest.method}) is missing {', '.join(missing)}")
    pickled = sorted(p.name for p in adapter_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise InvalidAdapterDir(f"{adapter_dir} contains pickled weights {pickled}: safetensors only")
    return manifest
