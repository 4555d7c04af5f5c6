"""Every metric lorafleet can gate on, with the direction that counts as better.

One table, in `lorafleet/` beside the config that names a metric (`promotion.metric`, validated at load);
the code that computes the metrics is `evaluation/` (`metrics/`, `quality.py`, `speed.py`,
`speculative.py`), which adds a metric here when it adds one there. The promotion gate never
guesses: a metric missing here is a config error (`promotion.metric`), because "higher is better"
applied to a latency promotes a 900 ms adapter over a 12 ms one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Direction = Literal["higher", "lower"]


@dataclass(frozen=True)
class MetricSpec:
    """A metric's name, which way is better, and what it measures (shown in errors and reports)."""

    name: str
    better: Direction
    about: str

    @property
    def higher_is_better(self) -> bool:
        return self.better == "higher"


_SPECS = (
    # Quality, per test row then averaged (evaluation/metrics, evaluation/quality.py).
    MetricSpec("exact_match", "higher", "answers identical to the reference"),
    MetricSpec("field_f1", "higher", "F1 over (field, value) pairs of structured answers"),
    MetricSpec("field_precision", "higher", "precision over (field, value) pairs"),
    MetricSpec("field_recall", "higher", "recall over (field, value) pairs"),
    MetricSpec("set_match", "higher", "answers with exactly the reference's fields and values"),
    MetricSpec("parse_rate", "higher", "answers that parse in the task's output format"),
    MetricSpec("rouge_l", "higher", "ROUGE-L F-measure against the reference"),
    MetricSpec("truncation_rate", "lower", "answers cut by max_new_tokens before end of sequence"),
    # Speed at batch 1 (evaluation/speed.py).
    MetricSpec("tokens_per_s", "higher", "generated tokens per second"),
    MetricSpec("latency_p50_ms", "lower", "median request latency"),
    MetricSpec("latency_p95_ms", "lower", "95th-percentile request latency"),
    # Speculative decoding of adapters with heads (evaluation/speculative.py).
    MetricSpec("speedup", "higher", "speculative over plain tokens/s of the same model"),
    MetricSpec("tau", "higher", "mean tokens accepted per verification step"),
    MetricSpec("speedup_vs_hf_prompt_lookup", "higher", "speculative over HF prompt-lookup tokens/s"),
    MetricSpec("greedy_identical_fraction", "higher", "prompts whose speculative output equals plain greedy"),
)
METRICS: dict[str, MetricSpec] = {spec.name: spec for spec in _SPECS}


def metric_spec(name: str) -> MetricSpec:
    """The spec of `name`; an unknown name is a ValueError listing the known ones."""
    spec = METRICS.get(name)
    if spec is None:
        known = ", ".join(sorted(METRICS))
        raise ValueError(f"unknown metric {name!r}: the gate needs to know whether higher or lower is "
                         f"better; known metrics: {known}")
    return spec
