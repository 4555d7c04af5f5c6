"""Training stage: a config + prepared data in, an adapter directory out.

Plain functions (no Prefect) so the stage can be re-run alone; `tasks/steps.py` wraps them as tasks.
The checkpoint folder is keyed by everything that determines the weights (training-relevant config,
data fingerprint, base revision), so re-running the same command after a kill resumes the same run,
while any change to those inputs starts afresh.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorafleet import __version__
from lorafleet.config import FinetuneConfig
from lorafleet.models.adapter_dir import AdapterManifest, BaseModelRef
from lorafleet.models.base import load_base_model, resolve_base_model, tokenizer_fingerprint
from lorafleet.models.cache import atomic_write_text, sha256_text
from lorafleet.models.lora import apply_lora, count_trainable, save_adapter
from lorafleet.models.training import TrainingCallback, train_adapter
from lorafleet.settings import Settings
from lorafleet.tasks.data.prepare import PreparedData

log = logging.getLogger(__name__)
RUN_FILE = "mlflow_run.json"


@dataclass(frozen=True)
class TrainedAdapter:
    """What the training stage hands to evaluation: a folder plus a summary of how training went."""

    adapter_dir: Path
    steps: int
    total_steps: int
    best_val_loss: float | None
    best_step: int | None
    stopped_early: bool
    resumed_from_step: int | None
    already_finished: bool
    precision: str
    trainable_params: int
    total_params: int
    train_seconds: float
    tokens_seen: int
    train_history: list[tuple[int, float]] = field(default_factory=list)
    val_history: list[tuple[int, float]] = field(default_factory=list)

    def summary_metrics(self) -> dict[str, float]:
        metrics = {"train/steps": float(self.steps), "train/trainable_params": float(self.trainable_params),
                   "train/seconds": self.train_seconds, "train/tokens_seen": float(self.tokens_seen)}
        if self.best_val_loss is not None:
            metrics["val/best_loss"] = self.best_val_loss
        if self.train_seconds > 0:
            metrics["train/mean_tokens_per_s"] = self.tokens_seen / self.train_seconds
        return metrics


def training_key(config: FinetuneConfig, prepared: PreparedData, settings: Settings) -> str:
    """Identity of a training run: same key ⇒ same weights, so a checkpoint can be resumed."""
    relevant = config.model_dump(mode="json", include={"name", "base_model", "method", "lora", "training"})
    revision = resolve_base_model(config.base_model, settings.model_cache_dir).revision
    return sha256_text(json.dumps(relevant, sort_keys=True), prepared.fingerprint, revision)[:16]


def checkpoint_dir(config: FinetuneConfig, key: str, settings: Settings) -> Path:
    return settings.checkpoints_dir / config.name / key


def recorded_run_id(folder: Path) -> str | None:
    """The MLflow run that an interrupted training in `folder` was logging to, if any."""
    path = Path(folder) / RUN_FILE
    return json.loads(path.read_text())["run_id"] if path.exists() else None


def record_run_id(folder: Path, run_id: str) -> None:
    atomic_write_text(Path(folder) / RUN_FILE, json.dumps({"run_id": run_id}))


def train_from_config(
    config: FinetuneConfig,
    prepared: PreparedData,
    settings: Settings,
    *,
    key: str,
    callbacks: Sequence[TrainingCallback] = (),
    progress: bool = True,
) -> TrainedAdapter:
    """Load the base, wrap it in LoRA (4-bit base for QLoRA), train, and save the adapter directory."""
    quantized = config.method == "qlora"
    loaded = load_base_model(config.base_model, settings.model_cache_dir, device=config.device,
                             quantization="nf4" if quantized else "none")
    torch.manual_seed(config.training.seed)  # LoRA A matrices are initialised from the global RNG
    model = apply_lora(loaded.model, config.lora, quantized=quantized)
    trainable, total = count_trainable(model)
    log.info("training %s (%s): %d trainable of %d parameters", config.name, config.method, trainable, total)

    columns = ["input_ids", "labels"]
    train_rows = prepared.load_split("train").select_columns(columns).to_list()
    val_rows = prepared.load_split("validation").select_columns(columns).to_list()
    result = train_adapter(model, train_rows, val_rows, config.training,
                           checkpoint_dir=checkpoint_dir(config, key, settings),
                           pad_token_id=loaded.tokenizer.pad_token_id, callbacks=callbacks, progress=progress)

    state = result.state
    manifest = AdapterManifest(
        name=config.name,
        method=config.method,
        base_model=BaseModelRef(id=loaded.resolved.model_id, revision=loaded.resolved.revision),
        tokenizer_hash=tokenizer_fingerprint(loaded.tokenizer),
        chat_template=loaded.tokenizer.chat_template,
        task=prepared.task,
        data_fingerprint=prepared.fingerprint,
        training_config=config.model_dump(mode="json"),
        metrics={"val_loss": state.best_val_loss} if state.best_val_loss is not None else {},
        lorafleet_version=__version__,
    )
    adapter_dir = save_adapter(model, settings.adapters_dir / config.name / key, manifest)
    return TrainedAdapter(
        adapter_dir=adapter_dir, steps=state.step, total_steps=result.total_steps,
        best_val_loss=state.best_val_loss, best_step=state.best_step, stopped_early=state.stopped_early,
        resumed_from_step=result.resumed_from_step, already_finished=result.already_finished,
        precision=result.precision, trainable_params=trainable, total_params=total,
        train_seconds=state.train_seconds, tokens_seen=state.tokens_seen,
        train_history=list(state.train_history), val_history=list(state.val_history),
    )
