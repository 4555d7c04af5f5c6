"""Config section `promotion`: when a challenger may replace the champion.

Owned by `lorafleet/` so that `lorafleet/config.py` imports nothing from tasks/ (whose gate applies it)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lorafleet.metric_catalog import MetricSpec, metric_spec


class PromotionSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    metric: str = Field("field_f1", description="primary metric; its direction (higher or lower is better) "
                                                "comes from lorafleet/metric_catalog.py")
    margin: float = Field(0.0, ge=0.0, description="how far the challenger must improve on the champion (or base), "
                                                   "in the metric's better direction")
    auto_promote: bool = Field(True, description="move `champion` when the gate passes")
    # Speed is compared as `speedup` (speculative tokens/s over the same model's plain decoding, 1.0 for
    # adapters without heads): a ratio measured within one run, so it stays comparable across runs and
    # machines, unlike raw tokens/s.
    min_speedup: float | None = Field(None, gt=0, description="the challenger's speedup must reach this")
    speed_margin: float | None = Field(None, ge=0, lt=1, description="the challenger's speedup may be at most "
                                                                     "this fraction below the champion's")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        metric_spec(value)  # an unknown metric has no direction: refuse it at config load
        return value

    @property
    def spec(self) -> MetricSpec:
        return metric_spec(self.metric)
