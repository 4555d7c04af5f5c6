"""Evaluation stage: an adapter directory + the prepared test split in, a base-vs-adapter comparison out.

Quality and speed are measured in the same process on the same prompts, for the base model (zero-
and optionally few-shot, with the adapter's own prompt) and for the adapter, so every ratio in the
report compares like with like. The adapter is evaluated on the full-precision base, as it is served.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.config import FinetuneConfig
from lorafleet.evaluation.engine_generation import EngineScorer
from lorafleet.evaluation.quality import Generate, QualityReport, evaluate_quality, few_shot_from_examples
from lorafleet.evaluation.report import comparison_markdown
from lorafleet.evaluation.speculative import SpeculativeReport, measure_speculative
from lorafleet.evaluation.speed import SpeedReport, measure_speed
from lorafleet.metric_catalog import metric_spec
from lorafleet.models.adapter_dir import has_lora, read_manifest, write_manifest
from lorafleet.models.base import load_base_model
from lorafleet.models.lora import load_adapter
from lorafleet.models.prompting import encode_prompt
from lorafleet.models.sampling_rules import eos_token_ids
from lorafleet.models.turbo_heads import has_heads, load_heads
from lorafleet.sections.evaluation import EvaluationSettings
from lorafleet.settings import Settings
from lorafleet.tasks.data.prepare import PreparedData

log = logging.getLogger(__name__)

ADAPTER = "adapter"
BASE = "base"
QUALITY_COLUMNS = ["exact_match", "field_f1", "field_precision", "field_recall", "set_match", "rouge_l",
                   "parse_rate"]
SPEED_COLUMNS = ["tokens_per_s", "latency_p50_ms", "latency_p95_ms"]


@dataclass(frozen=True)
class EvaluationOutcome:
    """Metrics per variant (`adapter`, `base`, `base_3shot`…), flattened for MLflow and the gate."""

    variants: dict[str, dict[str, float]]
    labels: dict[str, str]
    n_examples: int
    samples: list[dict[str, str]] = field(default_factory=list)
    speculative: dict[str, Any] | None = None  # SpeculativeReport.to_dict() for adapters with heads

    @property
    def adapter(self) -> dict[str, float]:
        return self.variants[ADAPTER]

    def best_base(self, metric: str) -> dict[str, float]:
        """The strongest base variant on `metric` (in its better direction): the gate must beat the base
        at its best. A variant without the metric never counts as the best."""
        bases = [v for k, v in self.variants.items() if k.startswith(BASE)]
        if metric_spec(metric).higher_is_better:
            return max(bases, key=lambda m: m.get(metric, float("-inf")))
        return min(bases, key=lambda m: m.get(metric, float("inf")))

    def flat_metrics(self) -> dict[str, float]:
        return {f"eval/{variant}/{name}": value
                for variant, metrics in self.variants.items() for name, value in metrics.items()}

    def markdown(self) -> str:
        rows = [(self.labels[k], v) for k, v in self.variants.items()]
        return comparison_markdown(rows, columns=[c for c in QUALITY_COLUMNS + SPEED_COLUMNS
                                                  if any(c in v for v in self.variants.values())])


def evaluate_adapter(config: FinetuneConfig, prepared: PreparedData, adapter_dir: Path,
                     settings: Settings, *, progress: bool = True) -> EvaluationOutcome:
    loaded = load_base_model(config.base_model, settings.model_cache_dir, device=config.device)
    opts = config.evaluation
    scorer = _engine_scorer(loaded, adapter_dir, opts)  # copies the base before PEFT wraps it
    with scorer or contextlib.nullcontext():
        outcome = _evaluate(config, prepared, adapter_dir, loaded, scorer, progress=progress)
    _record_in_manifest(adapter_dir, outcome)
    return outcome


def _evaluate(config: FinetuneConfig, prepared: PreparedData, adapter_dir: Path, loaded: Any,
              scorer: EngineScorer | None, *, progress: bool) -> EvaluationOutcome:
    tokenizer, opts, task = loaded.tokenizer, config.evaluation, prepared.task
    lora = has_lora(adapter_dir)
    # A `turbo` adapter on the bare base has no LoRA: its "adapter" outputs are the base model's.
    model = load_adapter(loaded.model, adapter_dir) if lora else loaded.model
    model.eval()
    test = evaluated_rows(prepared, opts)

    quality: dict[str, QualityReport] = {}
    labels = {ADAPTER: f"{config.name} ({config.method})", BASE: "base (zero-shot)"}
    base_generate = _engine_generate(scorer, opts, adapter=False, progress=progress)
    with _base_only(model):
        quality[BASE] = evaluate_quality(model, tokenizer, test, task, opts, label=labels[BASE], progress=progress,
                                         generate=base_generate)
        if opts.base_few_shot:
            shots = few_shot_from_examples(prepared.records("train"), opts.base_few_shot)
            key = f"{BASE}_{opts.base_few_shot}shot"
            labels[key] = f"base ({opts.base_few_shot}-shot)"
            quality[key] = evaluate_quality(model, tokenizer, test, task, opts, few_shot=shots, label=labels[key],
                                            progress=progress, generate=base_generate)
    quality[ADAPTER] = evaluate_quality(model, tokenizer, test, task, opts, label=labels[ADAPTER], progress=progress,
                                        generate=_engine_generate(scorer, opts, adapter=True, progress=progress))

    with _base_only(model):
        base_speed = _measure_speed(model, tokenizer, test, opts, label="base", progress=progress)
    adapter_speed = _measure_speed(model, tokenizer, test, opts, label="adapter", progress=progress)

    variants = {key: {**report.metrics, **_speed_metrics(adapter_speed if key == ADAPTER else base_speed)}
                for key, report in quality.items()}
    speculative = None
    if has_heads(adapter_dir):
        report = _measure_speculative(model, tokenizer, loaded.device, adapter_dir, test, opts, progress, scorer)
        variants[ADAPTER].update(report.as_metrics())
        speculative = report.to_dict()
    samples = _samples(test, quality, n=5)
    return EvaluationOutcome(variants=variants, labels=labels, n_examples=len(test), samples=samples,
                             speculative=speculative)


def evaluate_on_rows(config: FinetuneConfig, prepared: PreparedData, adapter_dir: Path, settings: Settings,
                     *, progress: bool = True) -> dict[str, float]:
    """Another adapter's metrics (the champion's) on exactly the rows and settings `evaluate_adapter`
    uses for `config`, so the gate compares like with like. The adapter runs on its own base model
    (from its manifest), as it is served; nothing is written into `adapter_dir`."""
    manifest = read_manifest(adapter_dir)
    loaded = load_base_model(manifest.base_model.id, settings.model_cache_dir, device=config.device)
    opts, test = config.evaluation, evaluated_rows(prepared, config.evaluation)
    scorer = _engine_scorer(loaded, adapter_dir, opts)
    with scorer or contextlib.nullcontext():
        return _metrics_on_rows(manifest, adapter_dir, loaded, scorer, prepared, opts, test, progress)


def _metrics_on_rows(manifest: Any, adapter_dir: Path, loaded: Any, scorer: EngineScorer | None,
                     prepared: PreparedData, opts: EvaluationSettings, test: list[dict[str, Any]],
                     progress: bool) -> dict[str, float]:
    model = load_adapter(loaded.model, adapter_dir) if has_lora(adapter_dir) else loaded.model
    model.eval()
    label = f"{manifest.name} ({manifest.method})"
    quality = evaluate_quality(model, loaded.tokenizer, test, prepared.task, opts, label=label, progress=progress,
                               generate=_engine_generate(scorer, opts, adapter=True, progress=progress))
    speed = _measure_speed(model, loaded.tokenizer, test, opts, label=label, progress=progress)
    metrics = {**quality.metrics, **_speed_metrics(speed)}
    if has_heads(adapter_dir):
        metrics.update(_measure_speculative(model, loaded.tokenizer, loaded.device, adapter_dir, test, opts,
                                            progress, scorer).as_metrics())
    return metrics


def evaluated_rows(prepared: PreparedData, opts: EvaluationSettings) -> list[dict[str, Any]]:
    """The test rows every variant is scored on: the first `max_examples` of the prepared test split."""
    test = prepared.records("test")
    return test if opts.max_examples is None else test[: opts.max_examples]


def _engine_scorer(loaded: Any, adapter_dir: Path, opts: EvaluationSettings) -> EngineScorer | None:
    """The engine for scoring (`evaluation.generator: engine`) and speculative timing, holding the adapter
    (LoRA and/or heads), or None: HF `generate` then scores. A base model the engine does not implement
    falls back to `generate`, logged, since scores stay comparable."""
    if opts.generator != "engine":
        return None
    try:
        return EngineScorer(loaded.model, loaded.tokenizer, adapter_dir,
                            eos_token_ids=sorted(eos_token_ids(loaded.model, loaded.tokenizer, required=True)))
    except ValueError as error:
        log.warning("scoring with transformers generate: the engine cannot take %s (%s)",
                    loaded.resolved.model_id, error)
        return None


def _engine_generate(scorer: EngineScorer | None, opts: EvaluationSettings, *, adapter: bool,
                     progress: bool) -> Generate | None:
    if scorer is None:
        return None

    def generate(prompts: list[list[int]], desc: str) -> list[Any]:
        return scorer.generate(prompts, max_new_tokens=opts.max_new_tokens, adapter=adapter, progress=progress,
                               desc=f"{desc} (engine)")

    return generate


def _measure_speed(model: Any, tokenizer: Any, test: list[dict[str, Any]], opts: EvaluationSettings, *,
                   label: str, progress: bool) -> SpeedReport:
    prompts = [encode_prompt(tokenizer, row["messages"]) for row in test[: opts.speed_prompts]]
    return measure_speed(model, tokenizer, prompts, label=label, max_new_tokens=opts.speed_max_new_tokens,
                         warmup=opts.speed_warmup, progress=progress)


def _measure_speculative(model: Any, tokenizer: Any, device: Any, adapter_dir: Path, test: list[dict[str, Any]],
                         opts: EvaluationSettings, progress: bool, scorer: EngineScorer | None) -> SpeculativeReport:
    """tau and speed-up on the engine (what serves) when it takes the model, the HF loop beside it."""
    return measure_speculative(
        model, load_heads(adapter_dir, device=device), tokenizer,
        [encode_prompt(tokenizer, row["messages"]) for row in test[: opts.speculative_prompts]],
        max_new_tokens=opts.speculative_max_new_tokens, prompt_lookup_num_tokens=opts.prompt_lookup_num_tokens,
        warmup=opts.speed_warmup, progress=progress, engine=scorer)


def _base_only(model: Any):
    """The base model's behaviour: PEFT adapters switched off (a plain model already is the base)."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if callable(disable) else contextlib.nullcontext()


def _speed_metrics(speed: SpeedReport) -> dict[str, float]:
    return {"tokens_per_s": speed.tokens_per_s, "latency_p50_ms": speed.latency_p50_ms,
            "latency_p95_ms": speed.latency_p95_ms}


def _samples(test: list[dict[str, Any]], quality: dict[str, QualityReport], n: int) -> list[dict[str, str]]:
    rows = []
    for i, row in enumerate(test[:n]):
        sample = {"input": row["messages"][-1]["content"], "reference": row["completion"]}
        sample.update({key: report.predictions[i] for key, report in quality.items()})
        rows.append(sample)
    return rows


def _record_in_manifest(adapter_dir: Path, outcome: EvaluationOutcome) -> None:
    """Headline metrics travel with the adapter (its manifest), not only in MLflow."""
    manifest = read_manifest(adapter_dir)
    write_manifest(adapter_dir, manifest.with_metrics(
        {name: value for name, value in outcome.adapter.items()}))
