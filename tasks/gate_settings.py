"""Config section `promotion`: when a challenger may replace the champion."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class PromotionSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    metric: str = Field("field_f1", description="primary quality metric, higher is better")
    margin: float = Field(0.0, ge=0.0, description="challenger must reach champion (or base) + margin")
    auto_promote: bool = Field(True, description="move `champion` when the gate passes")
