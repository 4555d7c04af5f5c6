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
from typing import Any

import torch

from lorafleet import __version__
from lorafleet.config import FinetuneConfig
from lorafleet.evaluation.engine_generation import EngineScorer
from lorafleet.models.adalora import AdaLoraAllocation, apply_adalora, to_plain_lora
from lorafleet.models.adapter_dir import PEFT_WEIGHTS_FILE, AdapterManifest, BaseModelRef
from lorafleet.models.base import load_base_model, resolve_base_model, tokenizer_fingerprint
from lorafleet.models.cache import atomic_write_text, sha256_file, sha256_text
from lorafleet.models.lora import apply_lora, count_trainable, load_adapter, save_adapter
from lorafleet.models.sampling_rules import eos_token_ids
from lorafleet.models.training import (
    SINGLE_PROCESS,
    DistributedContext,
    TrainingCallback,
    total_optimizer_steps,
    train_adapter,
)
from lorafleet.models.turbo_heads import new_heads
from lorafleet.settings import Settings
from lorafleet.tasks.adapter_sources import resolve_adapter_source
from lorafleet.tasks.data.prepare import PreparedData
from lorafleet.tasks.distill import Continue, distilled_rows, hf_continue

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
    head_params: int
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
    if config.method == "merge":  # no training: the parents' exact weights and the recipe make the result
        from lorafleet.tasks.merge import merge_key_parts

        relevant = config.model_dump(mode="json", include={"name", "base_model", "method", "merge"})
        revision = resolve_base_model(config.base_model, settings.model_cache_dir).revision
        return sha256_text(json.dumps(relevant, sort_keys=True), revision, *merge_key_parts(config, settings))[:16]
    relevant = config.model_dump(mode="json", include={"name", "base_model", "method", "lora", "training"})
    # How many processes train changes speed, not weights (the global batch is fixed): a checkpoint
    # written by N processes resumes on M.
    relevant["training"].pop("distributed", None)
    if config.has_heads:
        relevant["turbo"] = config.turbo.model_dump(mode="json")
    if config.adalora is not None:
        relevant["adalora"] = config.adalora.model_dump(mode="json")
    revision = resolve_base_model(config.base_model, settings.model_cache_dir).revision
    parts = [json.dumps(relevant, sort_keys=True), prepared.fingerprint, revision]
    if config.turbo.base_adapter and config.method == "turbo":
        folder, pinned = resolve_adapter_source(config.turbo.base_adapter, settings)
        parts += [pinned, sha256_file(folder / PEFT_WEIGHTS_FILE)]  # heads fit these exact LoRA weights
    return sha256_text(*parts)[:16]


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
    dist: DistributedContext = SINGLE_PROCESS,
    device: str | None = None,
    quant_storage: str | None = None,
) -> TrainedAdapter:
    """Train the adapter the config asks for and save its directory.

    lora / qlora: LoRA on the (4-bit for QLoRA) base. adalora: AdaLoRA (ranks allocated per layer while
    training), saved as a plain LoRA with its final rank pattern in the manifest (`models/adalora.py`).
    turbo_lora: LoRA and heads jointly. turbo: heads only, on the frozen base or a frozen existing LoRA,
    trained on the model's own greedy outputs.

    As one rank of a data-parallel run (`dist`, from `tasks/distributed_worker.py`) it trains on
    `device` (this rank's) instead of `config.device`, and only rank 0 writes the adapter directory.
    """
    quantized = config.method == "qlora"
    loaded = load_base_model(config.base_model, settings.model_cache_dir, device=device or config.device,
                             quantization="nf4" if quantized else "none", quant_storage=quant_storage)
    folder = checkpoint_dir(config, key, settings)
    torch.manual_seed(config.training.seed)  # LoRA A matrices and heads are initialised from the global RNG
    base_adapter = None
    if config.method == "turbo":
        adapter_folder, base_adapter = _base_adapter(config, settings)
        continuer = _DistillContinuer(loaded, adapter_folder)  # built on first use, before PEFT wraps the base
        if not dist.is_main:
            dist.barrier()  # rank 0 generates the distilled rows once; the others read its cache
        try:
            cached = {split: distilled_rows(continuer.get, loaded.tokenizer, prepared, split, folder, config.turbo,
                                            limit)
                      for split, limit in (("train", config.turbo.distill_examples),
                                           ("validation", config.training.eval_examples))}
        finally:
            continuer.close()
        train_rows, val_rows = cached["train"], cached["validation"]
        if dist.is_main:
            dist.barrier()
        model = continuer.frozen_model()
    else:
        columns = ["input_ids", "labels"]
        train_rows = prepared.load_split("train").select_columns(columns).to_list()
        val_rows = prepared.load_split("validation").select_columns(columns).to_list()
    allocation = None
    if config.method == "adalora":
        # PEFT's schedule needs the run's length up front: the loop's own count of optimizer steps
        total_steps = total_optimizer_steps(len(train_rows), config.training)
        model = apply_adalora(loaded.model, config.lora, config.adalora, total_steps=total_steps)
        allocation = AdaLoraAllocation(model, config.adalora, total_steps)
    elif config.method != "turbo":
        model = apply_lora(loaded.model, config.lora, quantized=quantized)
    heads = new_heads(model, config.turbo.num_heads, config.turbo.block_size) if config.has_heads else None
    trainable, total = count_trainable(model)
    head_params = heads.num_parameters() if heads is not None else 0
    log.info("training %s (%s): %d LoRA + %d head parameters trainable, %d in the model", config.name,
             config.method, trainable, head_params, total)

    result = train_adapter(model, train_rows, val_rows, config.training, checkpoint_dir=folder,
                           pad_token_id=loaded.tokenizer.pad_token_id, callbacks=callbacks, progress=progress,
                           heads=heads, turbo=config.turbo, train_lm=config.method != "turbo", dist=dist,
                           allocation=allocation)

    state = result.state
    plain = to_plain_lora(model) if config.method == "adalora" else None  # the best weights, converted
    manifest = AdapterManifest(
        name=config.name,
        method=config.method,
        base_model=BaseModelRef(id=loaded.resolved.model_id, revision=loaded.resolved.revision),
        tokenizer_hash=tokenizer_fingerprint(loaded.tokenizer),
        chat_template=loaded.tokenizer.chat_template,
        task=prepared.task,
        data_fingerprint=prepared.fingerprint,
        base_adapter=base_adapter,
        training_config=config.model_dump(mode="json"),
        metrics={"val_loss": state.best_val_loss} if state.best_val_loss is not None else {},
        rank_pattern=plain.rank_pattern if plain is not None else None,
        lorafleet_version=__version__,
    )
    lora_model = model if (config.method != "turbo" or base_adapter) else None
    adapter_dir = settings.adapters_dir / config.name / key
    if dist.is_main:
        adapter_dir = save_adapter(lora_model, adapter_dir, manifest, heads=heads, state_dict=result.full_state,
                                   lora_files=plain.save if plain is not None else None)
    if plain is not None and dist.is_main:
        log.info("%s: AdaLoRA kept %d of %d ranks (budget %d), saved as LoRA rank %d", config.name,
                 sum(plain.rank_pattern.values()), config.adalora.init_r * len(plain.rank_pattern),
                 config.adalora.target_r * len(plain.rank_pattern), plain.rank)
    return TrainedAdapter(
        adapter_dir=adapter_dir, steps=state.step, total_steps=result.total_steps,
        best_val_loss=state.best_val_loss, best_step=state.best_step, stopped_early=state.stopped_early,
        resumed_from_step=result.resumed_from_step, already_finished=result.already_finished,
        precision=result.precision, trainable_params=trainable + head_params, total_params=total,
        head_params=head_params, train_seconds=state.train_seconds, tokens_seen=state.tokens_seen,
        train_history=list(state.train_history), val_history=list(state.val_history),
    )


def _base_adapter(config: FinetuneConfig, settings: Settings) -> tuple[Path | None, str | None]:
    """The existing LoRA a `turbo` adapter's heads serve on (folder, pinned reference), or none."""
    if not config.turbo.base_adapter:
        return None, None
    return resolve_adapter_source(config.turbo.base_adapter, settings)


def _frozen_model(base: object, adapter_folder: Path | None) -> object:
    """The model a `turbo` adapter's heads serve: the bare base, or base + an existing LoRA, frozen."""
    model = load_adapter(base, adapter_folder) if adapter_folder is not None else base
    model.requires_grad_(False)
    return model


class _DistillContinuer:
    """Greedy continuations for self-distillation: the engine over the base (and the existing LoRA)
    when it takes the model, else transformers `generate` over the same frozen model."""

    def __init__(self, loaded: Any, adapter_folder: Path | None) -> None:
        self.loaded, self.adapter_folder = loaded, adapter_folder
        self.scorer: EngineScorer | None = None
        self.made: Continue | None = None
        self._frozen: object | None = None

    def frozen_model(self) -> object:
        """The frozen base (+ LoRA) the heads train on; wrapped once, after the engine copied the base."""
        if self._frozen is None:
            self._frozen = _frozen_model(self.loaded.model, self.adapter_folder)
        return self._frozen

    def get(self) -> Continue:
        if self.made is not None:
            return self.made
        loaded = self.loaded
        try:
            self.scorer = EngineScorer(loaded.model, loaded.tokenizer, self.adapter_folder,
                                       eos_token_ids=sorted(eos_token_ids(loaded.model, loaded.tokenizer,
                                                                          required=True)))
        except ValueError as error:
            log.warning("self-distillation with transformers generate: the engine cannot take %s (%s)",
                        loaded.resolved.model_id, error)
            self.made = hf_continue(self.frozen_model(), loaded.tokenizer)
            return self.made
        scorer, adapter = self.scorer, self.adapter_folder is not None

        def run(prompts: list[list[int]], max_new_tokens: int, desc: str) -> list[Any]:
            return scorer.generate(prompts, max_new_tokens=max_new_tokens, adapter=adapter, desc=f"{desc} (engine)")

        self.made = run
        return run

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()

