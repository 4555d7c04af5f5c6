"""Config section `adalora`: the rank budget and schedule of a `method: adalora` adapter.

AdaLoRA (PEFT `AdaLoraConfig`) starts every adapted projection at rank `init_r` and prunes singular
triplets by importance until the average rank is `target_r`: `target_r` × the number of adapted
projections is the parameter budget, shared unevenly across layers. `lora.alpha`, `lora.dropout` and
`lora.target_modules` keep their meaning; `lora.r` is not used (AdaLoRA scales its update by
alpha / init_r).

The schedule's phases are fractions of the run's optimizer steps (`models/training.py`
`total_optimizer_steps`), so one config fits any data size: the first `tinit` only trains, ranks are
then pruned on a cubic schedule until `1 - tfinal`, where the pattern is fixed for the last `tfinal`.
Field names are PEFT's, so its documentation reads straight onto this section.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AdaLoraSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    init_r: int = Field(12, ge=2, le=1024, description="starting rank of every adapted projection")
    target_r: int = Field(8, ge=1, description="average final rank: the budget is target_r × adapted projections")
    tinit: float = Field(0.1, ge=0, lt=1, description="fraction of the steps trained before any pruning")
    tfinal: float = Field(0.2, ge=0, lt=1, description="fraction of the steps trained with the final rank "
                                                       "pattern fixed")
    deltaT: int = Field(1, ge=1, description="optimizer steps between two rank allocations")  # PEFT's name
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA factor of the importance (sensitivity) scores")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA factor of the importance uncertainty")
    orth_reg_weight: float = Field(0.5, ge=0, description="weight of the orthogonality penalty on A and B")

    @model_validator(mode="after")
    def _consistent(self) -> AdaLoraSettings:
        if self.target_r >= self.init_r:
            raise ValueError(f"adalora.target_r ({self.target_r}) must be below adalora.init_r ({self.init_r}): "
                             f"AdaLoRA prunes from init_r down to the target")
        if self.tinit + self.tfinal >= 1:
            raise ValueError(f"adalora.tinit + adalora.tfinal ({self.tinit} + {self.tfinal}) must be below 1: "
                             f"the steps between them are where ranks are allocated")
        return self

    def phase_steps(self, total_steps: int) -> tuple[int, int]:
        """(tinit, tfinal) in optimizer steps for a run of `total_steps` (PEFT's units).

        Rounded down, so the allocation phase is never empty: floor(a·T) + floor(b·T) ≤ floor((a+b)·T) < T."""
        if total_steps < 1:
            raise ValueError(f"AdaLoRA needs at least one optimizer step, got {total_steps}")
        return math.floor(self.tinit * total_steps), math.floor(self.tfinal * total_steps)

    def final_from(self, total_steps: int) -> int:
        """The step at which the rank pattern becomes final (PEFT's `total_step - tfinal`)."""
        return total_steps - self.phase_steps(total_steps)[1]
