"""Config section `training`: the optimisation schedule, evaluation cadence and stopping rules."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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
    log_every: int = Field(1, ge=1)
