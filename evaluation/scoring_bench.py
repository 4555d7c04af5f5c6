"""`bench scoring`: score one adapter on its test rows twice, on the engine and with transformers
`generate`, and report the time of each, the speed-up, and whether the predictions are identical.

Both paths score the same prompts with the same greedy settings and the same metric code
(`evaluate_quality`); only the generator differs. The engine path is what the evaluate stage runs by
default (`evaluation.generator: engine`), `generate` in static length-sorted batches the baseline.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lorafleet.evaluation.engine_generation import EngineScorer
from lorafleet.evaluation.quality import evaluate_quality
from lorafleet.models.adapter_dir import TaskInfo
from lorafleet.models.lora import load_adapter
from lorafleet.models.sampling_rules import eos_token_ids
from lorafleet.sections.evaluation import EvaluationSettings


@dataclass
class ScoringBenchReport:
    adapter: str
    rows: int
    max_new_tokens: int
    hf_batch_size: int
    engine_seconds: float
    hf_seconds: float
    identical_predictions: int  # rows whose two predictions are the same text
    engine_metrics: dict[str, float]
    hf_metrics: dict[str, float]
    differing_rows: list[int]  # the first rows whose predictions differ, to inspect
    engine_setup_seconds: float = 0.0  # building the engine (copying the weights), inside engine_seconds

    @property
    def speedup(self) -> float:
        """The whole engine run (setup included) against `generate`."""
        return self.hf_seconds / self.engine_seconds

    @property
    def speedup_after_setup(self) -> float:
        """Generation alone: what a long-running process (a server, a flow worker) pays per scoring run."""
        return self.hf_seconds / (self.engine_seconds - self.engine_setup_seconds)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "speedup": self.speedup, "speedup_after_setup": self.speedup_after_setup}


def measure_scoring(loaded: Any, adapter_dir: Path, label: str, rows: Sequence[Mapping[str, Any]],
                    task: TaskInfo, *, max_new_tokens: int, hf_batch_size: int,
                    progress: bool = True) -> ScoringBenchReport:
    """Engine first (it copies the base before PEFT wraps it for the `generate` path), then `generate`."""
    settings = EvaluationSettings(max_examples=None, max_new_tokens=max_new_tokens, batch_size=hf_batch_size)
    stops = sorted(eos_token_ids(loaded.model, loaded.tokenizer, required=True))
    started = time.perf_counter()
    with EngineScorer(loaded.model, loaded.tokenizer, adapter_dir, eos_token_ids=stops) as scorer:
        setup_seconds = time.perf_counter() - started
        engine = evaluate_quality(None, loaded.tokenizer, rows, task, settings, label=f"{label} (engine)",
                                  progress=progress, generate=lambda prompts, desc: scorer.generate(
                                      prompts, max_new_tokens=max_new_tokens, adapter=True, progress=progress,
                                      desc=desc))
    engine_seconds = time.perf_counter() - started
    model = load_adapter(loaded.model, adapter_dir).eval()
    started = time.perf_counter()
    hf = evaluate_quality(model, loaded.tokenizer, rows, task, settings, label=f"{label} (generate)",
                          progress=progress)
    hf_seconds = time.perf_counter() - started
    differing = [i for i, (a, b) in enumerate(zip(engine.predictions, hf.predictions, strict=True)) if a != b]
    return ScoringBenchReport(
        adapter=label, rows=len(rows), max_new_tokens=max_new_tokens, hf_batch_size=hf_batch_size,
        engine_seconds=engine_seconds, hf_seconds=hf_seconds, identical_predictions=len(rows) - len(differing),
        engine_metrics=engine.metrics, hf_metrics=hf.metrics, differing_rows=differing[:20],
        engine_setup_seconds=setup_seconds)
