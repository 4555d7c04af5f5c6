"""One A/B arm's sufficient statistics: what the server counts and what the online gate judges.

Sums only (n, sum, sum of squares of feedback scores and of seconds per token, plus counts), so the server's
memory stays constant, Welch's t-test has what it needs, and replicas' arms add up (`+`). A neutral module:
the server (`serving/experiments.py`) fills it, the gate (`tasks/experiment_decision.py`) reads it back
from the admin API's JSON (`from_dict`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

SUMS = ("requests", "errors", "tokens", "seconds", "latency_n", "latency_sum", "latency_sumsq", "feedback_n",
        "feedback_sum", "feedback_sumsq")


@dataclass
class ArmSums:
    version: int | None = None  # the registry version that served this arm most recently
    requests: int = 0
    errors: int = 0  # answered with a status >= 500
    tokens: int = 0
    seconds: float = 0.0  # wall time of successful requests
    # Latency as seconds per generated token of each successful request (n, sum, sum of squares).
    latency_n: int = 0
    latency_sum: float = 0.0
    latency_sumsq: float = 0.0
    # The online metric: scores posted for this arm's responses.
    feedback_n: int = 0
    feedback_sum: float = 0.0
    feedback_sumsq: float = 0.0

    @property
    def seconds_per_token(self) -> float | None:
        """Mean over requests of each request's seconds per token."""
        return self.latency_sum / self.latency_n if self.latency_n else None

    @property
    def feedback_mean(self) -> float | None:
        return self.feedback_sum / self.feedback_n if self.feedback_n else None

    @property
    def feedback_var(self) -> float | None:
        """Sample variance of the scores (None below two)."""
        if self.feedback_n < 2:
            return None
        return max((self.feedback_sumsq - self.feedback_sum ** 2 / self.feedback_n) / (self.feedback_n - 1), 0.0)

    def __add__(self, other: ArmSums) -> ArmSums:
        """Two replicas' counts of the same arm."""
        return ArmSums(version=self.version if self.version is not None else other.version,
                       **{name: getattr(self, name) + getattr(other, name) for name in SUMS})

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seconds_per_token": self.seconds_per_token, "feedback_mean": self.feedback_mean}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArmSums:
        """An arm as `as_dict` (the admin API) wrote it; derived and unknown keys are ignored."""
        known = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})
