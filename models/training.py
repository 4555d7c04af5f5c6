"""The adapter training loop: PEFT model in, trained weights + history out, resumable at any checkpoint.

Our own loop rather than HF `Trainer` because we need three things it makes awkward: the LM head only
on completion positions (`loss.completion_loss`, ~20% of a CPU step), bf16 autocast on CPU, and
exact resume of a killed run (batch order replayed from (seed, epoch), see `batching`). Logging is a
duck-typed callback so this module stays free of MLflow and Prefect.

Data-parallel training takes a `DistributedContext` (rank, world size, two collectives) built by the
launcher plumbing in `tasks/`: every rank walks the same global batch order, trains on its slice of
each batch (`batching.shard`), and gradients are summed across ranks before the optimizer step, so N
processes compute the updates one process would (up to fp32 summation order). Only rank 0 writes
checkpoints and calls the callbacks. With `strategy: fsdp` the context also shards the model's decoder
layers (`sharding.py`): FSDP then sums the gradients of the sharded parameters itself, and every rank
runs the same number of forward passes, since each one all-gathers the layers together.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from tqdm.auto import tqdm

from .batching import collate, count_targets, length_grouped_batches, shard
from .checkpoints import (
    TrainerState,
    finished_state,
    latest_extra_state,
    mark_done,
    restore_best,
    restore_latest,
    save_best,
    save_checkpoint,
    trainable_state,
)
from .loss import CompletionObjective, TurboObjective, summarize
from .sharding import full_tensor, is_sharded
from .thread_tuning import ThreadTuner
from .training_settings import TrainingSettings
from .turbo_settings import TurboSettings

T = TypeVar("T")


class TrainingCallback(Protocol):
    def on_train_step(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_validation(self, step: int, metrics: dict[str, float]) -> None: ...


class RankAllocation(Protocol):
    """A method that changes the adapter's ranks while it trains (AdaLoRA: `adalora.AdaLoraAllocation`).

    The loop wraps its objective with `objective` (a regulariser), calls `after_step(step)` after every
    optimizer step while the gradients are still there (`step` counts the steps done, from 1), keeps
    weights as the best and stops early only once `settled(step)` (before that the model has more rank
    than the budget allows), and stores `state_tensors` in each checkpoint for an exact resume.
    """

    def objective(self, objective: Any) -> Any: ...

    def after_step(self, step: int) -> dict[str, float]: ...

    def settled(self, step: int) -> bool: ...

    def state_tensors(self) -> dict[str, torch.Tensor]: ...

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...


def _no_collective(*_: Any) -> None:
    return None


def _sum_alone(values: dict[str, float]) -> dict[str, float]:
    return dict(values)


@dataclass(frozen=True)
class DistributedContext:
    """This process's place among data-parallel ranks and the collectives the loop needs.

    The loop never opens a process group: whoever launched the ranks (Accelerate, torchrun) passes
    these functions in. The default is one process, for which every collective is a no-op.
    """

    rank: int = 0
    world_size: int = 1
    all_reduce_sum: Callable[[torch.Tensor], None] = field(default=_no_collective)  # in place, every rank
    sum_across_ranks: Callable[[dict[str, float]], dict[str, float]] = field(default=_sum_alone)
    barrier: Callable[[], None] = field(default=_no_collective)
    # FSDP: shards the model's weights across the ranks, in place, before the optimizer is built
    shard_model: Callable[[torch.nn.Module], Any] | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.shard_model is not None

    @property
    def saves(self) -> bool:
        """Whether this rank takes part in saving: rank 0 writes, and sharded weights need every rank to
        gather them; other data-parallel ranks skip the copies."""
        return self.is_main or self.sharded

    def local_part(self, rows: Sequence[T]) -> tuple[list[T], bool]:
        """This rank's slice of a global batch, and whether it counts.

        With sharded weights a rank must take part in every forward pass even when its slice is
        empty (a last batch smaller than the world): it then runs the batch's first row, not counted.
        """
        part = shard(rows, self.rank, self.world_size)
        if part or not self.sharded:
            return part, True
        return list(rows[:1]), False


SINGLE_PROCESS = DistributedContext()


@dataclass
class TrainResult:
    state: TrainerState
    total_steps: int
    precision: str
    resumed_from_step: int | None = None
    already_finished: bool = False
    # the best trainable weights, whole, when the model's own are shards (FSDP): what to save
    full_state: dict[str, torch.Tensor] | None = None

    @property
    def best_val_loss(self) -> float | None:
        return self.state.best_val_loss


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AVX512-BF16 or AMX): there bf16 is ~3.5x fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(setting: str, device: torch.device) -> str:
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def total_optimizer_steps(n_rows: int, settings: TrainingSettings) -> int:
    if settings.max_steps is not None:
        return settings.max_steps
    per_epoch = math.ceil(math.ceil(n_rows / settings.batch_size) / settings.grad_accum)
    return max(1, math.ceil(settings.epochs * per_epoch))


@torch.no_grad()
def validation_metrics(objective: Any, module: torch.nn.Module, rows: Sequence[dict], *, batch_size: int,
                       pad_token_id: int, precision: str, progress: bool = False,
                       dist: DistributedContext = SINGLE_PROCESS) -> dict[str, float]:
    """The objective's token-weighted means over `rows` (dropout off): `loss`, and for Turbo
    `lm_loss`, `headK_loss`, `headK_acc` (top-1 accuracy of head K). With several ranks each scores
    its share of the batches and the sums are added up, so every rank returns the same numbers."""
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    sums: dict[str, float] = {}
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    # each rank scores every world_size-th chunk; with sharded weights they all run as many passes
    passes = math.ceil(len(chunks) / dist.world_size) if dist.sharded else 0
    mine = [(chunk, True) for chunk in shard(chunks, dist.rank, dist.world_size)]
    mine += [(chunks[0], False)] * (passes - len(mine))
    for chunk, counted in tqdm(mine, desc="validation", leave=False, disable=not progress):
        batch = {k: v.to(device) for k, v in collate([rows[i] for i in chunk], pad_token_id).items()}
        with autocast(precision, device):
            out = objective(batch)
        for key, value in out.sums.items() if counted else ():
            sums[key] = sums.get(key, 0.0) + value
    module.train(was_training)
    return summarize(dist.sum_across_ranks(sums))


def validation_loss(model: Any, rows: Sequence[dict], *, batch_size: int, pad_token_id: int,
                    precision: str, progress: bool = False) -> float:
    """Token-weighted mean completion loss over `rows` (dropout off)."""
    return validation_metrics(CompletionObjective(model), model, rows, batch_size=batch_size,
                              pad_token_id=pad_token_id, precision=precision, progress=progress)["loss"]


def train_adapter(
    model: Any,
    train_rows: Sequence[dict],
    val_rows: Sequence[dict],
    settings: TrainingSettings,
    *,
    checkpoint_dir: Path,
    pad_token_id: int,
    callbacks: Sequence[TrainingCallback] = (),
    progress: bool = True,
    heads: torch.nn.Module | None = None,
    turbo: TurboSettings | None = None,
    train_lm: bool = True,
    dist: DistributedContext = SINGLE_PROCESS,
    allocation: RankAllocation | None = None,
) -> TrainResult:
    """Train the trainable parameters of `model` (a PEFT model) — and Turbo `heads` if given — on rows.

    Rows carry `input_ids` and `labels` (-100 where no loss). With heads, the objective is the LM loss
    (if `train_lm`) plus each head's weighted loss; heads get their own learning rate. Resumes from the
    newest checkpoint in `checkpoint_dir`; if that folder says training already finished, loads the
    best weights and returns at once. On return the weights with the best validation loss are loaded.

    With `dist` (several data-parallel ranks) every rank calls this with the same rows and settings;
    `settings.batch_size` is the global batch, split across ranks. Only rank 0 writes to
    `checkpoint_dir` and calls `callbacks`; checkpoints count global steps, so any world size resumes them.

    `allocation` (AdaLoRA) reallocates ranks after each step; see `RankAllocation`. Its gradients-based
    decisions see the summed gradients, so every data-parallel rank masks the same ranks.
    """
    from transformers import get_scheduler

    if not train_rows:
        raise ValueError("training needs at least one training row")
    checkpoint_dir = Path(checkpoint_dir)
    device = next(model.parameters()).device
    precision = resolve_precision(settings.precision, device)
    total_steps = total_optimizer_steps(len(train_rows), settings)

    done = finished_state(checkpoint_dir)
    if done is not None:
        restore_best(checkpoint_dir, _trainable_module(model, heads))
        return TrainResult(done, total_steps, precision, already_finished=True)

    torch.manual_seed(settings.seed)
    if dist.shard_model is not None:
        dist.shard_model(model)
    objective, trainable, groups = _training_setup(model, heads, turbo, settings, train_lm)
    if allocation is not None:
        objective = allocation.objective(objective)
    optimizer = torch.optim.AdamW(groups, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    schedule = "constant_with_warmup" if settings.lr_schedule == "constant" else settings.lr_schedule
    scheduler = get_scheduler(schedule, optimizer,
                              num_warmup_steps=round(settings.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    state = restore_latest(checkpoint_dir, trainable, optimizer, scheduler)
    if state is not None and allocation is not None:
        allocation.load_state_tensors(latest_extra_state(checkpoint_dir))
    resumed_from = state.step if state else None
    state = state or TrainerState()
    state.world_size = dist.world_size
    callbacks = callbacks if dist.is_main else ()
    val_subset = list(val_rows[: settings.eval_examples] if settings.eval_examples else val_rows)
    lengths = [len(row["input_ids"]) for row in train_rows]
    batches_per_epoch = math.ceil(len(train_rows) / settings.batch_size)

    trainable.train()
    # Ranks of a multi-process run wait for each other at every collective: their thread counts are the
    # launcher's to set (one tuner per rank would measure the others' trials).
    tuner = ThreadTuner(explore_every=16) if settings.thread_tuning and dist.world_size == 1 and device.type == "cpu" \
        else None  # steps of seconds: a trial every 16 adapts within a minute or two
    bar = tqdm(total=total_steps, initial=state.step, desc="training", unit="step",
               disable=not (progress and dist.is_main))
    while state.step < total_steps and not state.stopped_early:
        order = length_grouped_batches(lengths, settings.batch_size, seed=settings.seed, epoch=state.epoch)
        while state.batch_in_epoch < len(order) and state.step < total_steps and not state.stopped_early:
            group = order[state.batch_in_epoch: state.batch_in_epoch + settings.grad_accum]
            micro_batches = [[train_rows[i] for i in b] for b in group]
            if tuner is not None:
                tuner.threads("train")
            metrics = _optimizer_step(objective, trainable, micro_batches, optimizer, scheduler, settings,
                                      pad_token_id, precision, device, dist,
                                      after_step=None if allocation is None
                                      else functools.partial(allocation.after_step, state.step + 1))
            if tuner is not None:  # per token: length-grouped batches differ in size
                tuner.observe("train", metrics["train/step_seconds"] / max(metrics["_tokens"], 1))
            state.step += 1
            state.batch_in_epoch += len(group)
            state.samples_seen += sum(len(b) for b in group)
            state.tokens_seen += int(metrics.pop("_tokens"))
            state.train_seconds += metrics["train/step_seconds"]
            metrics["train/epoch"] = state.epoch + state.batch_in_epoch / batches_per_epoch
            state.train_history.append((state.step, metrics["train/loss"]))
            if state.step % settings.log_every == 0 or state.step == total_steps:
                for callback in callbacks:
                    callback.on_train_step(state.step, metrics)
            if state.step % settings.eval_every == 0 or state.step == total_steps:
                _validate(objective, trainable, val_subset, settings, state, checkpoint_dir, pad_token_id, precision,
                          callbacks, dist, counts=allocation is None or allocation.settled(state.step))
            if state.step % settings.checkpoint_every == 0 and state.step < total_steps and dist.saves:
                save_checkpoint(checkpoint_dir, trainable, optimizer, scheduler, state,
                                keep=settings.keep_checkpoints, write=dist.is_main,
                                extra_state=allocation.state_tensors() if allocation is not None else None)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['train/loss']:.3f}",
                            val=f"{state.best_val_loss:.3f}" if state.best_val_loss is not None else "-")
        if state.batch_in_epoch >= len(order):
            state.epoch += 1
            state.batch_in_epoch = 0
    bar.close()
    dist.barrier()  # rank 0's last `best/` is on disk before anyone reads it
    restore_best(checkpoint_dir, trainable)
    full_state = trainable_state(trainable) if dist.sharded else None  # gathered by every rank together
    if dist.is_main:
        mark_done(checkpoint_dir, state)
    dist.barrier()
    return TrainResult(state, total_steps, precision, resumed_from_step=resumed_from, full_state=full_state)


def _trainable_module(model: Any, heads: torch.nn.Module | None) -> torch.nn.Module:
    """One module over everything trained, so checkpoints name model and head parameters alike."""
    return model if heads is None else torch.nn.ModuleDict({"model": model, "heads": heads})


def _training_setup(model: Any, heads: torch.nn.Module | None, turbo: TurboSettings | None,
                    settings: TrainingSettings, train_lm: bool) -> tuple[Any, torch.nn.Module, list[dict]]:
    model_params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": model_params, "lr": settings.learning_rate}] if model_params else []
    if heads is None:
        return CompletionObjective(model), model, groups
    turbo = turbo or TurboSettings()
    heads.requires_grad_(True)
    groups.append({"params": list(heads.parameters()), "lr": turbo.head_learning_rate})
    weights = turbo.head_weights() if train_lm else [turbo.decay ** k for k in range(turbo.num_heads)]
    objective = TurboObjective(model, heads, weights, lm_weight=1.0 if train_lm else 0.0)
    return objective, _trainable_module(model, heads), groups


def _optimizer_step(objective: Any, trainable: torch.nn.Module, micro_batches: list[list[dict]], optimizer: Any,
                    scheduler: Any, settings: TrainingSettings, pad_token_id: int, precision: str,
                    device: torch.device, dist: DistributedContext = SINGLE_PROCESS,
                    after_step: Callable[[], dict[str, float]] | None = None) -> dict[str, float]:
    """One optimizer step over `grad_accum` global micro-batches, weighting each by its target tokens.

    Each rank backpropagates its slice weighted by the *global* target count, so the sum of the ranks'
    gradients is the one-process gradient; summing them (`all_reduce_sum`, or FSDP's reduce-scatter for
    sharded parameters) before clipping keeps the clip norm and the optimizer step identical on every rank.
    """
    started = time.perf_counter()
    n_targets = sum(count_targets(rows) for rows in micro_batches)
    n_tokens = sum(len(row["input_ids"]) for rows in micro_batches for row in rows)
    sums: dict[str, float] = {}
    for rows, counted in map(dist.local_part, micro_batches):
        if not rows:
            continue
        batch = {k: v.to(device) for k, v in collate(rows, pad_token_id).items()}
        with autocast(precision, device):
            out = objective(batch)
        weight = out.n_targets / max(n_targets, 1) if counted else 0.0
        (out.loss * weight).backward()
        for key, value in out.sums.items() if counted else ():
            sums[key] = sums.get(key, 0.0) + value
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if dist.world_size > 1:
        _sum_gradients([p for p in params if not is_sharded(p)], dist)
        sums = dist.sum_across_ranks(sums)
    grad_norm = (full_tensor(torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm))
                 if settings.max_grad_norm else torch.tensor(0.0))
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    allocated = after_step() if after_step is not None else {}  # reads this step's gradients
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    metrics = {f"train/{k}": v for k, v in summarize(sums).items()}
    metrics.update(allocated)
    metrics.update({"train/lr": lr, "train/grad_norm": float(grad_norm), "train/tokens_per_s": n_tokens / seconds,
                    "train/step_seconds": seconds, "_tokens": n_tokens})
    return metrics


def _sum_gradients(params: list[torch.nn.Parameter], dist: DistributedContext) -> None:
    """Add up every rank's gradients in place: one flat buffer per dtype, so one collective each
    (a rank whose slice was empty contributes zeros)."""
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
        dist.all_reduce_sum(flat)
        offset = 0
        for p in group:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n


def _validate(objective: Any, trainable: torch.nn.Module, rows: list[dict], settings: TrainingSettings,
              state: TrainerState, checkpoint_dir: Path, pad_token_id: int, precision: str,
              callbacks: Sequence[TrainingCallback], dist: DistributedContext = SINGLE_PROCESS, *,
              counts: bool = True) -> None:
    """Validation pass + early-stopping bookkeeping; the best weights are saved as they appear.

    A pass that does not `count` (AdaLoRA before its rank pattern is final) is logged only: those weights
    may not be kept and may not stop the run. Every rank gets the same summed metrics, so every rank takes
    the same early-stopping decision."""
    if not rows:
        return
    metrics = validation_metrics(objective, trainable, rows, batch_size=settings.batch_size,
                                 pad_token_id=pad_token_id, precision=precision, dist=dist)
    loss = metrics["loss"]
    state.val_history.append((state.step, loss))
    improved = state.best_val_loss is None or loss < state.best_val_loss - settings.early_stopping_min_delta
    if counts and improved:
        state.best_val_loss, state.best_step = loss, state.step
        state.evals_without_improvement = 0
        if dist.saves:
            save_best(checkpoint_dir, trainable, state, write=dist.is_main)
    elif counts:
        state.evals_without_improvement += 1
        patience = settings.early_stopping_patience
        state.stopped_early = patience is not None and state.evals_without_improvement >= patience
    reported = {f"val/{k}": v for k, v in metrics.items()}
    if state.best_val_loss is not None:
        reported["val/best_loss"] = state.best_val_loss
    for callback in callbacks:
        callback.on_validation(state.step, reported)
