"""The finetune stages as Prefect tasks: thin wrappers that log, track and hand off files.

Retries are reserved for I/O (reading data files, MLflow calls), and only for errors that can be
transient (`tasks/transient.py`): a bad config, a data error or a full disk fails at once. Data preparation is cached on a key made of
the source files' bytes, the data settings, the tokenizer and this module's source.
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from lorafleet.config import FinetuneConfig
from lorafleet.evaluation.report import (
    describe_rank_pattern,
    plot_acceptance_histogram,
    plot_loss_curve,
    plot_metric_comparison,
    plot_rank_pattern,
    plot_throughput,
)
from lorafleet.models.adapter_dir import read_manifest
from lorafleet.models.base import load_tokenizer, resolve_base_model
from lorafleet.settings import Settings
from lorafleet.tasks import distributed, registry, tracking
from lorafleet.tasks import gate as gate_logic
from lorafleet.tasks.data.prepare import PreparedData, prepare_dataset, source_key
from lorafleet.tasks.eval_split import SPLIT_TAG, EvalSplit, champion_numbers_on
from lorafleet.tasks.evaluate import EvaluationOutcome, evaluate_adapter
from lorafleet.tasks.merge import merge_from_config
from lorafleet.tasks.promotion import GateOutcome, gate_and_promote
from lorafleet.tasks.train import (
    TrainedAdapter,
    checkpoint_dir,
    record_run_id,
    recorded_run_id,
    train_from_config,
)
from lorafleet.tasks.transient import is_transient


def retry_on_io_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only when the failure is transient I/O, never on bad input or a full or read-only disk."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, BaseException) and is_transient(error)


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "-".join("".join(c if c.isalnum() else "-" for c in part.lower()) for part in parts)


def _prepare_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    config: FinetuneConfig = parameters["config"]
    settings: Settings = parameters["settings"]
    resolved = resolve_base_model(config.base_model, settings.model_cache_dir)
    return hashlib.sha256("|".join([
        # The output folder is part of the key: another LORAFLEET_HOME must get its own prepared copy.
        str(settings.prepared_data_dir), source_key(config.data, settings.data_root), config.name,
        resolved.revision,
        hashlib.sha256(inspect.getsource(prepare_dataset).encode()).hexdigest(),
    ]).encode()).hexdigest()


@task(name="prepare-data", cache_key_fn=_prepare_cache_key, persist_result=True, retries=2,
      retry_delay_seconds=2, retry_condition_fn=retry_on_io_error)
def prepare_data(config: FinetuneConfig, settings: Settings) -> PreparedData:
    logger = get_run_logger()
    tokenizer = load_tokenizer(resolve_base_model(config.base_model, settings.model_cache_dir))
    prepared = prepare_dataset(config.data, tokenizer, name=config.name, out_root=settings.prepared_data_dir,
                               data_root=settings.data_root)
    logger.info("prepared %s: %s rows, dropped %s, fingerprint %s", config.name, prepared.counts,
                prepared.dropped, prepared.fingerprint[:16])
    return prepared


@task(name="start-tracking", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_on_io_error)
def start_tracking(config: FinetuneConfig, settings: Settings, prepared: PreparedData, key: str) -> str:
    """Open the MLflow run, or re-open the one an interrupted training of the same key was using."""
    client = tracking.mlflow_client(settings)
    experiment_id = tracking.ensure_experiment(client, config.name, settings)
    folder = checkpoint_dir(config, key, settings)
    params = {"config": config.model_dump(mode="json"), "data": {
        "fingerprint": prepared.fingerprint, "counts": prepared.counts, "sources": prepared.sources}}
    run_id = tracking.resume_or_start_run(
        client, experiment_id, run_name=f"{config.name}-{config.method}",
        tags={"lorafleet.adapter": config.name, "lorafleet.method": config.method,
              "lorafleet.training_key": key, "lorafleet.data_fingerprint": prepared.fingerprint},
        resume_run_id=recorded_run_id(folder), params=params)
    folder.mkdir(parents=True, exist_ok=True)
    record_run_id(folder, run_id)
    run = tracking.RunLogger(client, run_id)
    run.log_params(params)
    run.log_dict({"system": tracking.system_info(), "dropped": prepared.dropped}, "run_info.json")
    get_run_logger().info("MLflow run %s (experiment %s)", run_id, experiment_id)
    return run_id


class _PrefectProgress:
    """Training progress into the Prefect log every `every` steps (the tqdm bar covers the console)."""

    def __init__(self, every: int) -> None:
        self.logger = get_run_logger()
        self.every = every

    def on_train_step(self, step: int, metrics: dict[str, float]) -> None:
        if step % self.every == 0:
            self.logger.info("step %d: loss %.4f, lr %.2e, %.0f tokens/s", step, metrics["train/loss"],
                             metrics["train/lr"], metrics["train/tokens_per_s"])

    def on_validation(self, step: int, metrics: dict[str, float]) -> None:
        best = metrics.get("val/best_loss")  # none yet while AdaLoRA's ranks are still being allocated
        self.logger.info("step %d: validation loss %.4f (best %s)", step, metrics["val/loss"],
                         "-" if best is None else f"{best:.4f}")


@task(name="train")
def train(config: FinetuneConfig, prepared: PreparedData, settings: Settings, key: str,
          run_id: str, devices: tuple[str, ...] = ()) -> TrainedAdapter:
    """Train in this process, or, with `training.distributed.launcher`, on N processes started by that
    launcher (their rank 0 logs the steps to the run; this task logs the summary either way) on the
    `devices` the flow claimed for them."""
    run = tracking.RunLogger(tracking.mlflow_client(settings), run_id)
    every = max(config.training.eval_every // 2, 1)
    if config.method == "merge":
        trained = merge_from_config(config, prepared, settings, key=key)
        get_run_logger().info("merged %s from %d adapters (%s)", config.name, len(config.merge.adapters),
                              config.merge.method)
        run.set_tags({"lorafleet.merge.parents": ", ".join(p.adapter for p in config.merge.adapters)})
        run.log_dict(read_manifest(trained.adapter_dir).lineage or {}, "merge/lineage.json")
        run.log_metrics(trained.summary_metrics())
        return trained
    if config.training.distributed.enabled:
        trained = distributed.train_in_processes(config, prepared, settings, key=key, run_id=run_id,
                                                 on_line=get_run_logger().info, devices=devices)
    else:
        trained = train_from_config(config, prepared, settings, key=key, callbacks=[run, _PrefectProgress(every)])
    if trained.already_finished:
        get_run_logger().info("training for key %s had already finished: reusing its weights", key)
    run.log_metrics(trained.summary_metrics())
    run.log_figure(plot_loss_curve(trained.train_history, trained.val_history), "plots/loss_curve.png")
    if config.adalora is not None:
        _report_rank_pattern(config, trained, run)
    return trained


def _report_rank_pattern(config: FinetuneConfig, trained: TrainedAdapter, run: tracking.RunLogger) -> None:
    """AdaLoRA: the final rank of every projection as a heatmap in the run, and one line in the log."""
    pattern = read_manifest(trained.adapter_dir).rank_pattern or {}
    if not pattern:
        return
    budget = config.adalora.target_r * len(pattern)
    run.log_dict(pattern, "adalora/rank_pattern.json")
    run.log_metrics({"adalora/final_total_rank": float(sum(pattern.values())), "adalora/budget": float(budget)})
    run.log_figure(plot_rank_pattern(pattern, max_rank=config.adalora.init_r), "plots/rank_pattern.png")
    get_run_logger().info("AdaLoRA rank pattern of %s: %s", config.name,
                          describe_rank_pattern(pattern, budget=budget))


@task(name="evaluate")
def evaluate(config: FinetuneConfig, prepared: PreparedData, trained: TrainedAdapter, settings: Settings,
             run_id: str) -> EvaluationOutcome:
    outcome = evaluate_adapter(config, prepared, trained.adapter_dir, settings)
    run = tracking.RunLogger(tracking.mlflow_client(settings), run_id)
    run.log_metrics(outcome.flat_metrics())
    markdown = outcome.markdown()
    run.log_text(markdown, "evaluation/comparison.md")
    run.log_dict({"variants": outcome.variants, "n_examples": outcome.n_examples, "samples": outcome.samples},
                 "evaluation/results.json")
    run.log_figure(plot_metric_comparison([(outcome.labels[k], v) for k, v in outcome.variants.items()]),
                   "plots/quality_comparison.png")
    if outcome.speculative is not None:
        markdown += "\n\n" + _speculative_markdown(outcome.speculative)
        run.log_dict(outcome.speculative, "evaluation/speculative.json")
        run.log_figure(plot_acceptance_histogram(outcome.speculative["accepted_histogram"]),
                       "plots/acceptance_histogram.png")
        run.log_figure(plot_throughput({name: outcome.speculative[f"tokens_per_s_{name}"] for name in
                                        ("plain", "speculative", "hf_generate", "hf_prompt_lookup")},
                                       baseline="plain"), "plots/throughput.png")
    create_markdown_artifact(
        markdown=f"# {config.name}: base vs adapter ({outcome.n_examples} test rows)\n\n{markdown}",
        key=artifact_key(config.name, "evaluation"), description="quality and speed, same run")
    create_table_artifact(outcome.samples, key=artifact_key(config.name, "samples"),
                          description="first test rows: reference and each variant's output")
    get_run_logger().info("evaluation of %s on %d rows:\n%s", config.name, outcome.n_examples, markdown)
    return outcome


def _speculative_markdown(report: dict[str, Any]) -> str:
    heads = ", ".join(f"{rate:.2f}" for rate in report["per_head_acceptance"])
    return (f"**Speculative decoding** ({report['n_prompts']} prompts, batch 1, greedy, {report['device']}): "
            f"τ = {report['tau']:.2f}, per-head acceptance [{heads}], "
            f"{report['tokens_per_s_speculative']:.1f} tokens/s vs {report['tokens_per_s_plain']:.1f} plain "
            f"(**{report['speedup']:.2f}x**), HF generate {report['tokens_per_s_hf_generate']:.1f}, "
            f"HF prompt lookup {report['tokens_per_s_hf_prompt_lookup']:.1f} tokens/s; greedy identical on "
            f"{report['greedy_identical_fraction']:.0%} of prompts; heads {report['head_params']:,} parameters "
            f"= {report['head_params_fraction_of_medusa1']:.1%} of Medusa-1's {report['medusa1_equivalent_params']:,}.")


@task(name="register", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_on_io_error)
def register(config: FinetuneConfig, prepared: PreparedData, trained: TrainedAdapter, outcome: EvaluationOutcome,
             settings: Settings, run_id: str) -> str:
    """Upload the adapter directory to the run and register it as a version with alias `challenger`.

    A run registers one version: on a rerun after a failure past this step, the run's version is reused
    (and its uploaded adapter, which that version points at, is not overwritten).
    """
    client = tracking.mlflow_client(settings)
    existing = registry.version_for_run(client, config.name, run_id)
    if existing is not None:
        get_run_logger().info("run %s is already registered as %s version %s: reusing it", run_id, config.name,
                              existing.version)
        return str(existing.version)
    run = tracking.RunLogger(client, run_id)
    run.log_artifacts(trained.adapter_dir, registry.ADAPTER_ARTIFACT_PATH)
    # Base model, method, fingerprint and the adapter's metrics come from its manifest (registry.version_tags);
    # the best base variant's metrics and the split they were all measured on are added, so a later gate
    # (this flow's or `promote`'s) knows which rows the numbers belong to.
    split = evaluated_split(config, prepared, outcome)
    tags = {**registry.metric_tags(outcome.best_base(config.promotion.metric), prefix="base_metric."),
            SPLIT_TAG: split.to_tag()}
    version = registry.register_adapter(client, name=config.name, run_id=run_id, tags=tags,
                                        description=f"{config.method} adapter of {config.base_model}")
    get_run_logger().info("registered %s version %s (alias challenger)", config.name, version.version)
    return str(version.version)


@task(name="gate")
def gate(config: FinetuneConfig, prepared: PreparedData, version: str, outcome: EvaluationOutcome,
         settings: Settings, run_id: str) -> GateOutcome:
    """Decide promotion against the champion (or the base model for a first version) and act on it.

    The champion is measured on this run's test rows (re-evaluated if its numbers came from other rows),
    and `champion` moves by compare-and-set (`tasks/promotion.py`).
    """
    client = tracking.mlflow_client(settings)
    split = evaluated_split(config, prepared, outcome)
    result = gate_and_promote(
        client, config.name, version, settings=config.promotion, challenger=outcome.adapter,
        base=outcome.best_base(config.promotion.metric),
        champion_numbers=champion_numbers_on(client, settings, config, prepared, split),
        provenance={f"challenger v{version}": f"this run: {split.describe()}",
                    "base model": f"this run, the same rows: {split.describe()}"},
        auto_promote=config.promotion.auto_promote)
    decision, promoted = result.decision, result.promoted
    run = tracking.RunLogger(client, run_id)
    champion = result.champion
    run.set_tags({"lorafleet.gate": "promoted" if promoted else "held", "lorafleet.registered_version": version,
                  "lorafleet.gate.split": split.describe(),
                  "lorafleet.gate.champion": ("none" if champion is None
                                              else f"v{champion.version}: {champion.source}")})
    report = gate_logic.render_markdown(decision, name=config.name, version=version, promoted=promoted)
    run.log_text(report, "evaluation/gate.md")
    create_markdown_artifact(markdown=report, key=artifact_key(config.name, "gate"),
                             description="promotion decision")
    get_run_logger().info("gate for %s v%s: %s", config.name, version, " ".join(decision.reasons))
    return result


def evaluated_split(config: FinetuneConfig, prepared: PreparedData, outcome: EvaluationOutcome) -> EvalSplit:
    """The rows and settings this run's adapter and base numbers were measured on."""
    return EvalSplit.of(prepared, config.evaluation, outcome.n_examples)
