"""The `lorafleet` command line (Typer).

This is an entry point: it reads the environment once (`Settings.from_env`) and hands explicit
settings to everything below it. The pipeline's commands are here, the `bench` commands in
`flows/bench_cli.py`, what both use in `flows/cli_common.py`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from lorafleet.flows.bench_cli import bench_app
from lorafleet.flows.cli_common import console, err_console, fail, load_settings

app = typer.Typer(help="lorafleet: fine-tune, evaluate, register, promote and serve LoRA adapters.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(bench_app, name="bench")
REPO_ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Everything runs offline; Prefect's temporary server would otherwise try to send analytics.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# A first start on a fresh PREFECT_HOME migrates its SQLite database; on a busy 2-core machine that can take longer
# than Prefect's 20 s default, and the flow would then fail before it began.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


@contextlib.contextmanager
def _store_errors(settings) -> Iterator[None]:
    """Turn a tracking store that cannot be used (a corrupt or locked SQLite file, a server that refuses
    us) into one error line naming the store; the registry's own errors for bad input (ValueError,
    LookupError) pass through to the command, which words them itself."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except (SQLAlchemyError, MlflowException, OSError) as error:
        cause = getattr(error, "orig", None) or error  # SQLAlchemy's own text adds the SQL statement
        first_line = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        from lorafleet.settings import redact

        # Redacted: a database or server URI may carry a password, and this line goes to terminals and logs.
        fail(redact(f"MLflow store {settings.tracking_uri}: {first_line} "
                     "(check MLFLOW_TRACKING_URI, or LORAFLEET_HOME for the default store)"))


@app.command()
def demo(
    config: Annotated[Path, typer.Option(help="finetune config for the demo adapter")] = REPO_ROOT / "configs/demo.yaml",
    port: Annotated[int | None, typer.Option(help="port for the demo server (default: a free one)")] = None,
) -> None:
    """Train, evaluate, register and promote an adapter of the embedded SmolLM2, then serve it and ask it."""
    from lorafleet.flows.demo import run_demo

    run_demo(config, load_settings(), port=port, console=console)


@app.command()
def finetune(
    config: Annotated[Path, typer.Argument(help="finetune config YAML")],
    promote: Annotated[bool, typer.Option(help="move `champion` when the gate passes")] = True,
) -> None:
    """Run the finetune flow: prepare data → train → evaluate → register → gate/promote."""
    from lorafleet.config import ConfigError, load_config
    from lorafleet.tasks.locks import AlreadyRunning, already_running_message, finetune_holder

    try:
        spec = load_config(config)  # fail fast, before Prefect starts, with the field named
    except ConfigError as error:
        fail(str(error))
    holder = finetune_holder(load_settings().home, spec.name)  # the flow takes the lock; this only fails fast
    if holder is not None:
        fail(already_running_message(spec.name, holder))
    from lorafleet.flows.finetune import finetune as finetune_flow

    try:
        summary = finetune_flow(config=str(config.resolve()), promote=promote)
    except AlreadyRunning as error:
        fail(str(error))
    _print_summary(summary)


@app.command()
def merge(
    name: Annotated[str, typer.Argument(help="name of the merged adapter (a registered model name)")],
    adapters: Annotated[str, typer.Option(help="REF:WEIGHT,... (REF: a registered NAME[@ALIAS|@VERSION], "
                                               "a models:/ URI or an adapter folder)")],
    method: Annotated[str, typer.Option(help="linear | cat | svd | ties | dare_linear | dare_ties "
                                             "(PEFT add_weighted_adapter's combination types)")] = "linear",
    density: Annotated[float | None, typer.Option(help="fraction of values kept (ties, dare_*)")] = None,
    seed: Annotated[int, typer.Option(help="seeds DARE's random drops")] = 0,
    config: Annotated[Path | None, typer.Option(help="config whose data/evaluation/promotion judge the merge "
                                                     "(default: the first adapter's own)")] = None,
    promote: Annotated[bool, typer.Option(help="move `champion` when the gate passes")] = True,
) -> None:
    """Merge adapters into a new one, then evaluate, register (with its lineage) and gate it like a trained one."""
    from lorafleet.config import ConfigError
    from lorafleet.flows.merge import merge_config
    from lorafleet.tasks.locks import AlreadyRunning

    settings = load_settings()
    parents = [part.strip() for part in adapters.split(",") if part.strip()]
    try:  # fail fast, before Prefect starts, with the argument or field named
        merge_config(name, parents, settings, method=method, density=density, seed=seed, config=config)
    except (ConfigError, ValueError, LookupError, OSError) as error:
        fail(str(error))
    from lorafleet.flows.merge import merge as merge_flow

    try:
        summary = merge_flow(name=name, adapters=parents, method=method, density=density, seed=seed,
                             config=str(config.resolve()) if config else None, promote=promote)
    except AlreadyRunning as error:
        fail(str(error))
    _print_summary(summary)


@app.command()
def retrain(
    config: Annotated[Path, typer.Argument(help="retrain config YAML (a list of adapter specs)")],
    force: Annotated[bool, typer.Option(help="retrain even when the data is unchanged")] = False,
) -> None:
    """Run the retrain flow: re-run finetune for adapters whose data fingerprint changed."""
    from lorafleet.config import ConfigError, load_retrain_config

    try:
        load_retrain_config(config)
    except ConfigError as error:
        fail(str(error))
    load_settings()  # an unusable LORAFLEET_HOME fails here in one line, not as a traceback inside the flow
    from lorafleet.flows.retrain import retrain as retrain_flow

    for row in retrain_flow(config=str(config.resolve()), force=force):
        console.print(row)


@app.command()
def serve(
    port: Annotated[int, typer.Option(help="HTTP port")] = 3000,
    host: Annotated[str, typer.Option(help="interface to bind (beyond loopback, set API keys: see the README)")]
    = "127.0.0.1",
) -> None:
    """Serve the base model and every champion adapter (OpenAI-compatible API under /v1)."""
    from lorafleet.serving.api.auth import exposure_warnings
    from lorafleet.serving.launcher import BIND_HOST_ENV, serve_foreground
    from lorafleet.serving.settings import ServiceSettings

    settings = load_settings()
    try:  # the service reads the same variables: fail here, with the variable named, not in its log
        service = ServiceSettings.from_env(settings, {**os.environ, BIND_HOST_ENV: host})
    except ValueError as error:
        fail(str(error))
    for warning in exposure_warnings(service):
        err_console.print(f"[bold red]WARNING:[/] {escape(warning)}", soft_wrap=True)
    raise typer.Exit(serve_foreground(settings, port=port, host=host))


@app.command()
def schedule(
    retrain_config: Annotated[Path, typer.Option(help="retrain config")] = REPO_ROOT / "configs/retrain.yaml",
    finetune_config: Annotated[Path, typer.Option(help="default finetune config")] = REPO_ROOT / "configs/demo.yaml",
    cron: Annotated[str, typer.Option(help="retrain schedule (cron, UTC)")] = "0 2 * * *",
) -> None:
    """Serve the flows with the nightly retrain schedule from this process (flow.serve, no worker needed)."""
    from lorafleet.flows.schedules import serve_schedules

    load_settings()  # the scheduled runs would each fail later on an unusable LORAFLEET_HOME: say so now
    serve_schedules(retrain_config, finetune_config, cron=cron)


@app.command()
def models(as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """List registered adapters: versions, aliases and key metrics."""
    from lorafleet.tasks import registry, tracking

    settings = load_settings()
    with _store_errors(settings):
        rows = registry.list_adapters(tracking.mlflow_client(settings))
    if as_json:
        print(json.dumps([row.as_dict() for row in rows], indent=2))
        return
    if not rows:
        console.print("no adapters registered yet: run `lorafleet finetune CONFIG` (or `make demo`)")
        return
    table = Table(title="registered adapters")
    for column in ("name", "version", "aliases", "method", "base model", "field_f1", "exact_match", "tokens/s"):
        table.add_column(column)
    for row in rows:
        for version in row.versions:
            metrics = version.metrics
            table.add_row(row.name, str(version.version), ", ".join(version.aliases), version.method,
                          row.base_model, _fmt(metrics.get("field_f1")), _fmt(metrics.get("exact_match")),
                          _fmt(metrics.get("tokens_per_s")))
    console.print(table)


@app.command()
def promote(name: str, version: str) -> None:
    """Make VERSION of adapter NAME the champion (by hand; the gate is not applied)."""
    from lorafleet.tasks import registry, tracking

    settings = load_settings()
    try:
        with _store_errors(settings):
            registry.promote(tracking.mlflow_client(settings), name, version, reason="promoted by hand (CLI)")
    except (ValueError, LookupError) as error:
        fail(str(error))
    console.print(f"{name}: champion is now version {version}")


@app.command()
def rollback(name: str) -> None:
    """Move NAME's champion back to the previous champion version."""
    from lorafleet.tasks import registry, tracking

    settings = load_settings()
    try:
        with _store_errors(settings):
            before, after = registry.rollback(tracking.mlflow_client(settings), name)
    except (ValueError, LookupError) as error:
        fail(str(error))
    console.print(f"{name}: champion rolled back from version {before} to version {after}")


@app.command()
def export(
    name: Annotated[str, typer.Argument(help="adapter: a folder, NAME, NAME@ALIAS, NAME@VERSION or models:/ URI")],
    merged: Annotated[Path, typer.Option(
        "--merged", help="write base + LoRA merged here as a full transformers model folder (safetensors, "
                         "config, tokenizer, lorafleet.json, Turbo heads if any); the only export kind today. "
                         "Must not exist or be empty")],
    device: Annotated[str, typer.Option(help="where to merge: cpu, cuda, cuda:1, ...")] = "cpu",
) -> None:
    """Export an adapter merged into its base model, loadable by stock transformers."""
    from lorafleet.models.export import export_merged
    from lorafleet.tasks.adapter_sources import resolve_model_reference

    settings = load_settings()
    try:
        with _store_errors(settings):
            folder, pinned = resolve_model_reference(name, settings)
        report = export_merged(folder, merged, model_cache_dir=settings.model_cache_dir, device=device)
    except (ValueError, LookupError, OSError) as error:  # OSError: OUT_DIR taken or not writable
        fail(str(error))
    print(json.dumps({"out_dir": report.out_dir, "model": pinned, "method": report.method,
                      "base_model": report.base_model, "parameters": report.parameters, "heads": report.heads,
                      "revision_matches": report.revision_matches}))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"


def _print_summary(summary: dict) -> None:
    from lorafleet.evaluation.report import comparison_markdown

    console.print(f"[bold]{summary['name']}[/] version {summary['version']}: "
                  + ("[green]promoted to champion[/]" if summary["promoted"] else "[yellow]not promoted[/]"))
    for reason in summary["gate_reasons"]:
        console.print(f"  - {reason}")
    train = summary["train"]
    resumed = f", resumed from step {train['resumed_from_step']}" if train["resumed_from_step"] else ""
    console.print(f"training: {train['steps']} steps{resumed}, best validation loss {train['best_val_loss']:.4f}")
    rows = [(summary["labels"][k], v) for k, v in summary["metrics"].items()]
    console.print(comparison_markdown(rows))
    console.print(f"adapter: {summary['adapter_dir']}   MLflow run: {summary['run_id']}")


if __name__ == "__main__":
    app()
