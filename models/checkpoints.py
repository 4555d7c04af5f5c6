"""Training checkpoints: enough state to continue a killed run exactly where it left off.

Layout under a run's checkpoint folder:
  step-00000050/  trainable.safetensors, optimizer.pt, scheduler.pt, rng.pt, state.json
                  [extra_state.safetensors: a method's own loop state, e.g. AdaLoRA's rank allocator]
  best/           trainable.safetensors, state.json   (weights with the best validation loss)
  DONE            written when training finished; a rerun then returns the stored result

Each entry is written atomically, so the newest complete checkpoint is always loadable. Progress is
counted globally (optimizer steps, batch index in the epoch's global order, samples seen), so a
checkpoint written by N data-parallel ranks resumes on M; only rank 0 writes. Tensors are always
stored whole: with sharded parameters (FSDP, `sharding.py`) every rank calls the save functions,
which gather the shards together, and loading slices each rank's shard back out, so the files are
the same whatever the world size or strategy that wrote them. Optimizer and RNG state are our own
files (never an adapter) and are read with `weights_only=True`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .cache import atomic_directory, atomic_write_text
from .sharding import full_tensor, is_sharded, like_parameter

DONE_MARKER = "DONE"
EXTRA_STATE_FILE = "extra_state.safetensors"


@dataclass
class TrainerState:
    """Everything about the loop's progress that is not a tensor."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    train_history: list[tuple[int, float]] = field(default_factory=list)
    val_history: list[tuple[int, float]] = field(default_factory=list)
    tokens_seen: int = 0
    train_seconds: float = 0.0
    samples_seen: int = 0  # global rows trained on: independent of how many ranks shared them
    world_size: int = 1  # data-parallel processes of the run that wrote this (any size resumes it)

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        raw = json.loads(text)
        raw["train_history"] = [tuple(item) for item in raw.get("train_history", [])]
        raw["val_history"] = [tuple(item) for item in raw.get("val_history", [])]
        return cls(**raw)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor, whole and on the CPU (gathered from the shards when sharded)."""
    return {name: full_tensor(p.detach()).cpu().contiguous()
            for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in tensors]
    if missing:
        raise ValueError(f"checkpoint lacks trainable parameters {missing[:3]}… (different model or config)")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(like_parameter(params[name], tensor.to(params[name].dtype)))


def optimizer_state(optimizer: Any) -> dict[str, Any]:
    """`optimizer.state_dict()` with every per-parameter tensor whole (the layout one process writes)."""
    saved = optimizer.state_dict()
    state = {index: {key: full_tensor(value) if isinstance(value, torch.Tensor) else value
                     for key, value in saved["state"][index].items()}
             for index in sorted(saved["state"])}
    return {**saved, "state": state}


def load_optimizer_state(optimizer: Any, saved: dict[str, Any]) -> None:
    """Load what `optimizer_state` wrote, slicing per-parameter tensors into this rank's shards."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, values in saved["state"].items():
        param = params[index]
        if is_sharded(param):
            for key, value in values.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    values[key] = like_parameter(param, value)
    optimizer.load_state_dict(saved)


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                    state: TrainerState, *, keep: int, write: bool = True,
                    extra_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `step-N/` (only where `write`; with sharded parameters every rank must call this).

    `extra_state`: named tensors the loop needs besides weights and optimizer (`latest_extra_state`)."""
    target = Path(folder) / f"step-{state.step:08d}"
    tensors, optimizer_tensors = trainable_state(model), optimizer_state(optimizer)
    if not write:
        return target
    with atomic_directory(target, overwrite=True) as staging:
        save_file(tensors, str(staging / "trainable.safetensors"))
        torch.save(optimizer_tensors, staging / "optimizer.pt")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        torch.save({"torch": torch.get_rng_state()}, staging / "rng.pt")
        if extra_state:
            save_file(extra_state, str(staging / EXTRA_STATE_FILE))
        (staging / "state.json").write_text(state.to_json())
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder without state.json is ignored)."""
    folder = Path(folder)
    if not folder.exists():
        return []
    return sorted(p for p in folder.glob("step-*") if (p / "state.json").exists())


def restore_latest(folder: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> TrainerState | None:
    found = list_checkpoints(folder)
    if not found:
        return None
    latest = found[-1]
    load_trainable_state(model, load_file(str(latest / "trainable.safetensors")))
    load_optimizer_state(optimizer, torch.load(latest / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(latest / "scheduler.pt", weights_only=True))
    torch.set_rng_state(torch.load(latest / "rng.pt", weights_only=True)["torch"])
    return TrainerState.from_json((latest / "state.json").read_text())


def latest_extra_state(folder: Path) -> dict[str, torch.Tensor]:
    """The `extra_state` of the newest complete checkpoint (empty when it has none)."""
    found = list_checkpoints(folder)
    path = found[-1] / EXTRA_STATE_FILE if found else None
    return load_file(str(path)) if path is not None and path.exists() else {}


def save_best(folder: Path, model: torch.nn.Module, state: TrainerState, *, write: bool = True) -> None:
    """Write `best/` (only where `write`; with sharded parameters every rank must call this)."""
    tensors = trainable_state(model)
    if not write:
        return
    with atomic_directory(Path(folder) / "best", overwrite=True) as staging:
        save_file(tensors, str(staging / "trainable.safetensors"))
        (staging / "state.json").write_text(state.to_json())


def restore_best(folder: Path, model: torch.nn.Module) -> bool:
    best = Path(folder) / "best" / "trainable.safetensors"
    if not best.exists():
        return False
    load_trainable_state(model, load_file(str(best)))
    return True


def mark_done(folder: Path, state: TrainerState) -> None:
    atomic_write_text(Path(folder) / DONE_MARKER, state.to_json())


def finished_state(folder: Path) -> TrainerState | None:
    marker = Path(folder) / DONE_MARKER
    return TrainerState.from_json(marker.read_text()) if marker.exists() else None
