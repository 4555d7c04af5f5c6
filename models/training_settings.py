"""Config section `training`: the optimisation schedule, evaluation cadence, stopping rules and how many
processes share the work (`training.distributed`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Launcher = Literal["none", "accelerate", "torchrun"]
# Methods whose FSDP setup PEFT documents (LoRA, and QLoRA with `bnb_4bit_quant_storage` = compute dtype);
# Turbo heads are a second module outside the decoder layers that `models/sharding.py` shards.
FSDP_METHODS = ("lora", "qlora")


class DistributedSettings(BaseModel):
    """`training.distributed`: data-parallel training on `num_processes` processes, started by an existing
    launcher (`accelerate launch` or `torchrun`); lorafleet only splits each batch and all-reduces gradients
    (`ddp`), or hands the decoder layers to PyTorch's FSDP (`fsdp`: each rank keeps 1/N of their weights).

    `training.batch_size` stays the *global* batch: every optimizer step sees the same rows whatever the
    world size (each rank trains on a disjoint slice), so this section changes speed, not results, and a
    checkpoint written by N processes resumes on M. (Up to fp32 rounding, and with `lora.dropout` 0: each
    rank draws dropout masks from its own copy of the seeded generator.)
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    launcher: Launcher = Field("none", description="none = train in the flow's own process (the default)")
    num_processes: int = Field(1, ge=1, description="processes on this machine (one per GPU on CUDA)")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto = nccl on CUDA, gloo on CPU")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="fsdp: decoder layers sharded (FSDP2), lora/qlora only")

    @model_validator(mode="after")
    def _consistent(self) -> DistributedSettings:
        if self.launcher == "none" and (self.num_processes != 1 or self.strategy != "ddp"):
            raise ValueError("num_processes > 1 and strategy 'fsdp' need a launcher: set "
                             "training.distributed.launcher to 'accelerate' or 'torchrun'")
        return self

    @property
    def enabled(self) -> bool:
        return self.launcher != "none"

    def check_fits(self, *, method: str, device: str) -> None:
        """Raise ValueError naming the field when the strategy cannot run this method on this device."""
        if self.strategy == "fsdp" and method not in FSDP_METHODS:
            raise ValueError(f"training.distributed.strategy 'fsdp' supports method {' or '.join(FSDP_METHODS)}"
                             f" (PEFT's documented FSDP setups), not {method!r}: use strategy 'ddp'")
        if self.backend == "nccl" and not device.startswith("cuda") and device != "auto":
            raise ValueError(f"training.distributed.backend 'nccl' needs CUDA, but device is {device!r}")


class TrainingSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs when set")
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0)
    eval_every: int = Field(50, ge=1, description="optimizer steps between validation-loss passes")
    eval_examples: int | None = Field(128, ge=1, description="validation rows per pass; null = all")
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    early_stopping_patience: int | None = Field(3, ge=1, description="validation passes without improvement "
                                                                     "before stopping; null = never")
    early_stopping_min_delta: float = Field(0.0, ge=0)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 autocast (CPU with AVX512-BF16/AMX, or CUDA), else fp32")
    seed: int = 0
    thread_tuning: bool = Field(True, description="one process on CPU: choose torch's thread count by measured "
                                "step time, so a CPU-bound neighbour costs its share of the cores and no more "
                                "(models/thread_tuning.py)")
    log_every: int = Field(1, ge=1)
    distributed: DistributedSettings = DistributedSettings()
