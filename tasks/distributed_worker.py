"""One rank of a data-parallel training run, started by the launcher that `tasks/distributed.py` runs:

    accelerate launch --config_file RUN/accelerate_config.yaml -m lorafleet.tasks.distributed_worker RUN/spec.json
    torchrun --nproc-per-node N --module lorafleet.tasks.distributed_worker RUN/spec.json

Accelerate (`PartialState`) reads the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) and
opens the process group: gloo on CPU, nccl on CUDA. This module turns it into the loop's
`DistributedContext` (with `strategy: fsdp`, one that shards the decoder layers: `models/sharding.py`)
and runs the ordinary training stage. Rank 0 alone logs each step to MLflow
(`RunLogger`, which skips steps a run already has, so a resumed run logs each step once), prints
progress for the parent to forward, and writes the adapter and `result.json`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from lorafleet.config import FinetuneConfig
from lorafleet.models.cache import atomic_write_text
from lorafleet.models.sharding import shard_decoder_layers
from lorafleet.models.training import DistributedContext, TrainingCallback
from lorafleet.settings import Settings
from lorafleet.tasks.data.prepare import PreparedData
from lorafleet.tasks.distributed import RESULT_FILE, trained_to_json, uses_cuda
from lorafleet.tasks.train import train_from_config

log = logging.getLogger(__name__)


class StdoutProgress:
    """Rank 0's progress as plain lines on stdout; the parent forwards them to the Prefect log."""

    def __init__(self, every: int) -> None:
        self.every = every

    def on_train_step(self, step: int, metrics: dict[str, float]) -> None:
        if step % self.every == 0:
            print(f"step {step}: loss {metrics['train/loss']:.4f}, lr {metrics['train/lr']:.2e}, "
                  f"{metrics['train/tokens_per_s']:.0f} tokens/s", flush=True)

    def on_validation(self, step: int, metrics: dict[str, float]) -> None:
        best = metrics.get("val/best_loss")  # none yet while AdaLoRA's ranks are still being allocated
        best_text = "-" if best is None else f"{best:.4f}"
        print(f"step {step}: validation loss {metrics['val/loss']:.4f} (best {best_text})", flush=True)


def open_process_group(config: FinetuneConfig) -> Any:
    """Accelerate's view of this rank, with the process group it opened (backend per the config)."""
    from accelerate import PartialState

    dist = config.training.distributed
    cuda = uses_cuda(config)
    backend = dist.backend if dist.backend != "auto" else ("nccl" if cuda else "gloo")
    return PartialState(cpu=not cuda, backend=backend)


def context_of(state: Any, config: FinetuneConfig) -> DistributedContext:
    """The loop's collectives on top of the process group Accelerate opened."""
    if state.num_processes == 1:
        return DistributedContext()
    shard_model = None
    if config.training.distributed.strategy == "fsdp":
        shard_model = functools.partial(shard_decoder_layers, world_size=state.num_processes,
                                        device_type="cuda" if uses_cuda(config) else "cpu")

    def all_reduce_sum(tensor: torch.Tensor) -> None:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)

    def sum_across_ranks(values: dict[str, float]) -> dict[str, float]:
        gathered: list[dict[str, float] | None] = [None] * state.num_processes
        torch.distributed.all_gather_object(gathered, values)
        total: dict[str, float] = {}
        for part in gathered:
            for key, value in (part or {}).items():
                total[key] = total.get(key, 0.0) + value
        return total

    return DistributedContext(rank=state.process_index, world_size=state.num_processes,
                              all_reduce_sum=all_reduce_sum, sum_across_ranks=sum_across_ranks,
                              barrier=torch.distributed.barrier, shard_model=shard_model)


def settings_from(raw: dict[str, str]) -> Settings:
    return Settings(home=Path(raw["home"]), tracking_uri=raw["tracking_uri"], data_root=Path(raw["data_root"]),
                    model_cache_dir=Path(raw["model_cache_dir"]))


def run(spec_path: Path) -> None:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    config = FinetuneConfig.model_validate(spec["config"])
    settings = settings_from(spec["settings"])
    prepared = PreparedData.from_dir(Path(spec["prepared_dir"]))
    run_dir = Path(spec["run_dir"])
    state = open_process_group(config)
    dist = context_of(state, config)
    logging.basicConfig(level=logging.INFO if dist.is_main else logging.WARNING,
                        format=f"[rank {dist.rank}] %(levelname)s %(name)s: %(message)s")
    atomic_write_text(run_dir / f"rank-{dist.rank}.pid", str(os.getpid()))
    callbacks: list[TrainingCallback] = []
    if dist.is_main:
        callbacks.append(StdoutProgress(max(config.training.eval_every // 2, 1)))
        if spec["run_id"]:
            from lorafleet.tasks import tracking

            callbacks.append(tracking.RunLogger(tracking.mlflow_client(settings), spec["run_id"]))
    device = f"cuda:{state.local_process_index}" if uses_cuda(config) else "cpu"
    trained = train_from_config(config, prepared, settings, key=spec["key"], callbacks=callbacks, progress=False,
                                dist=dist, device=device, quant_storage=spec.get("quant_storage"))
    if dist.is_main:
        atomic_write_text(run_dir / RESULT_FILE, trained_to_json(trained))
        print(f"rank 0 wrote {trained.adapter_dir} after {trained.steps} steps "
              f"on {dist.world_size} processes", flush=True)
    dist.barrier()
    if dist.world_size > 1:
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m lorafleet.tasks.distributed_worker SPEC.json (written by tasks/distributed.py)")
    run(Path(args[0]))


if __name__ == "__main__":
    main()
