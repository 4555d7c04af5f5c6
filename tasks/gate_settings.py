"""Config section `promotion`: when a challenger may replace the champion."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class PromotionSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    metric: str = Field("field_f1", description="primary quality metric, higher is better")
    margin: float = Field(0.0, ge=0.0, description="challenger must reach champion (or base) + margin")
    auto_promote: bool = Field(True, description="move `champion` when the gate passes")
    # Speed is compared as `speedup` (speculative tokens/s over the same model's plain decoding, 1.0 for
    # adapters without heads): a ratio measured within one run, so it stays comparable across runs and
    # machines, unlike raw tokens/s.
    min_speedup: float | None = Field(None, gt=0, description="the challenger's speedup must reach this")
    speed_margin: float | None = Field(None, ge=0, lt=1, description="the challenger's speedup may be at most "
                                                                     "this fraction below the champion's")
