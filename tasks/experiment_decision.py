"""The online gate's decision: does the challenger beat the champion on live feedback without being slower?

Pure arithmetic on each arm's sufficient statistics (n, sum, sum of squares), so it is the same whether the
numbers come from one server or are summed over replicas, and it is tested without a server.

The rule, stated once:
* **Quality**: Welch's two-sample t-test on the feedback scores (unequal variances), one-sided, challenger
  mean > champion mean, at level `alpha`. Nothing is decided before each arm has `min_samples` scores.
* **Latency**: the challenger's mean seconds per generated token (per request, then averaged) may exceed the
  champion's by at most `latency_margin` (a fraction). A point comparison, not a test: an adapter of the same
  rank on the same base model costs the same per token, so a real gap is a regression (heads dropped, a bigger
  rank) that a margin catches, while a significance test would wave small but real slow-downs through.
* **Outcome**: `promote` when quality wins and latency holds; `end` when the challenger is significantly
  worse, wins on quality but loses on latency, or both arms reached `max_samples` without a significant
  difference; else `continue` (collect more).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from lorafleet.experiment_arms import ArmSums

Action = Literal["promote", "end", "continue"]


class OnlineGateSettings(BaseModel):
    """The `experiment-gate` flow's thresholds (every default here, once)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_samples: int = Field(100, ge=2, description="feedback scores per arm before any decision")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="one-sided significance level of the t-test")
    latency_margin: float = Field(0.10, ge=0, description="allowed excess of the challenger's mean seconds per "
                                                          "token over the champion's (fraction)")
    max_samples: int | None = Field(5000, ge=2, description="per arm: end without a win after this many scores")


@dataclass(frozen=True)
class OnlineDecision:
    action: Action
    reasons: list[str] = field(default_factory=list)
    p_value: float | None = None  # challenger better (one-sided)
    p_value_worse: float | None = None  # challenger worse (one-sided)
    latency_ratio: float | None = None  # challenger / champion mean seconds per token


def decide(champion: ArmSums, challenger: ArmSums, settings: OnlineGateSettings) -> OnlineDecision:
    """Apply the rule in the module docstring."""
    counts = f"feedback n = {champion.feedback_n} (champion) / {challenger.feedback_n} (challenger)"
    if min(champion.feedback_n, challenger.feedback_n) < settings.min_samples:
        return OnlineDecision("continue", [f"{counts}: each arm needs {settings.min_samples} before a decision"])
    p_better = welch_p_greater(challenger, champion)
    p_worse = welch_p_greater(champion, challenger)
    means = (f"mean score {challenger.feedback_mean:.4f} (challenger) vs {champion.feedback_mean:.4f} "
             f"(champion), Welch one-sided p = {p_better:.3g} (better), {p_worse:.3g} (worse), alpha {settings.alpha}")
    ratio = None
    if champion.seconds_per_token and challenger.seconds_per_token is not None:
        ratio = challenger.seconds_per_token / champion.seconds_per_token
    latency_ok = ratio is None or ratio <= 1.0 + settings.latency_margin
    latency = ("no latency measured" if ratio is None else
               f"seconds per token x{ratio:.3f} of the champion's (allowed x{1 + settings.latency_margin:.2f})")
    decided = {"p_value": p_better, "p_value_worse": p_worse, "latency_ratio": ratio}
    if p_better < settings.alpha:
        if latency_ok:
            return OnlineDecision("promote", [counts, means, latency], **decided)
        return OnlineDecision("end", [counts, means, f"{latency}: better answers, but slower"], **decided)
    if p_worse < settings.alpha:
        return OnlineDecision("end", [counts, means, "the challenger is significantly worse"], **decided)
    if settings.max_samples is not None and min(champion.feedback_n, challenger.feedback_n) >= settings.max_samples:
        return OnlineDecision("end", [counts, means, (f"no significant difference after {settings.max_samples} "
                                                     "scores per arm")], **decided)
    return OnlineDecision("continue", [counts, means, "not significant yet"], **decided)


def welch_p_greater(a: ArmSums, b: ArmSums) -> float:
    """One-sided p-value of Welch's t-test for mean(a) > mean(b) (scipy's, from the sums)."""
    from scipy.stats import ttest_ind_from_stats

    var_a, var_b = a.feedback_var or 0.0, b.feedback_var or 0.0
    if var_a == 0.0 and var_b == 0.0:  # constant scores: the difference of means is exact
        return 0.0 if (a.feedback_mean or 0.0) > (b.feedback_mean or 0.0) else 1.0
    result = ttest_ind_from_stats(a.feedback_mean, math.sqrt(var_a), a.feedback_n, b.feedback_mean,
                                  math.sqrt(var_b), b.feedback_n, equal_var=False, alternative="greater")
    return float(result.pvalue)
