"""The `lorafleet` command line (Typer).

This is an entry point: it reads the environment once (`Settings.from_env`) and hands explicit
settings to everything below it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, NoReturn

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(help="lorafleet: fine-tune, evaluate, register, promote and serve LoRA adapters.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
console = Console()
err_console = Console(stderr=True)
bench_app = typer.Typer(help="Benchmarks: print a table and write JSON, baselines measured in the same run.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")
REPO_ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Everything runs offline; Prefect's temporary server would otherwise try to send analytics.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# A first start on a fresh PREFECT_HOME migrates its SQLite database; on a busy 2-core machine that can take longer
# than Prefect's 20 s default, and the flow would then fail before it began.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _settings():
    """The environment's settings with their folders made, or one error line naming what to change."""
    from lorafleet.settings import Settings, SettingsError

    try:
        return Settings.from_env().ensure()
    except SettingsError as error:
        _fail(str(error))


def _fail(message: str) -> NoReturn:
    """One line, exit 2: for bad input and unusable state, never a traceback."""
    # Escaped: a path or value may contain [brackets] that Rich would read as markup. Not wrapped at the
    # terminal width, so the message stays one line that scripts can grep.
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code=2)


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
        _fail(redact(f"MLflow store {settings.tracking_uri}: {first_line} "
                     "(check MLFLOW_TRACKING_URI, or LORAFLEET_HOME for the default store)"))


@app.command()
def demo(
    config: Annotated[Path, typer.Option(help="finetune config for the demo adapter")] = REPO_ROOT / "configs/demo.yaml",
    port: Annotated[int | None, typer.Option(help="port for the demo server (default: a free one)")] = None,
) -> None:
    """Train, evaluate, register and promote an adapter of the embedded SmolLM2, then serve it and ask it."""
    from lorafleet.flows.demo import run_demo

    run_demo(config, _settings(), port=port, console=console)


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
        _fail(str(error))
    holder = finetune_holder(_settings().home, spec.name)  # the flow takes the lock; this only fails fast
    if holder is not None:
        _fail(already_running_message(spec.name, holder))
    from lorafleet.flows.finetune import finetune as finetune_flow

    try:
        summary = finetune_flow(config=str(config.resolve()), promote=promote)
    except AlreadyRunning as error:
        _fail(str(error))
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

    settings = _settings()
    parents = [part.strip() for part in adapters.split(",") if part.strip()]
    try:  # fail fast, before Prefect starts, with the argument or field named
        merge_config(name, parents, settings, method=method, density=density, seed=seed, config=config)
    except (ConfigError, ValueError, LookupError, OSError) as error:
        _fail(str(error))
    from lorafleet.flows.merge import merge as merge_flow

    try:
        summary = merge_flow(name=name, adapters=parents, method=method, density=density, seed=seed,
                             config=str(config.resolve()) if config else None, promote=promote)
    except AlreadyRunning as error:
        _fail(str(error))
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
        _fail(str(error))
    _settings()  # an unusable LORAFLEET_HOME fails here in one line, not as a traceback inside the flow
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

    settings = _settings()
    try:  # the service reads the same variables: fail here, with the variable named, not in its log
        service = ServiceSettings.from_env(settings, {**os.environ, BIND_HOST_ENV: host})
    except ValueError as error:
        _fail(str(error))
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

    _settings()  # the scheduled runs would each fail later on an unusable LORAFLEET_HOME: say so now
    serve_schedules(retrain_config, finetune_config, cron=cron)


@app.command()
def models(as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """List registered adapters: versions, aliases and key metrics."""
    from lorafleet.tasks import registry, tracking

    settings = _settings()
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

    settings = _settings()
    try:
        with _store_errors(settings):
            registry.promote(tracking.mlflow_client(settings), name, version, reason="promoted by hand (CLI)")
    except (ValueError, LookupError) as error:
        _fail(str(error))
    console.print(f"{name}: champion is now version {version}")


@app.command()
def rollback(name: str) -> None:
    """Move NAME's champion back to the previous champion version."""
    from lorafleet.tasks import registry, tracking

    settings = _settings()
    try:
        with _store_errors(settings):
            before, after = registry.rollback(tracking.mlflow_client(settings), name)
    except (ValueError, LookupError) as error:
        _fail(str(error))
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

    settings = _settings()
    try:
        with _store_errors(settings):
            folder, pinned = resolve_model_reference(name, settings)
        report = export_merged(folder, merged, model_cache_dir=settings.model_cache_dir, device=device)
    except (ValueError, LookupError, OSError) as error:  # OSError: OUT_DIR taken or not writable
        _fail(str(error))
    print(json.dumps({"out_dir": report.out_dir, "model": pinned, "method": report.method,
                      "base_model": report.base_model, "parameters": report.parameters, "heads": report.heads,
                      "revision_matches": report.revision_matches}))


@bench_app.command("speculative")
def bench_speculative(
    model: Annotated[str, typer.Option(help="adapter with Turbo heads: a folder, NAME, NAME@ALIAS, NAME@VERSION")],
    json_out: Annotated[Path, typer.Option("--json", help="where to write the JSON report")],
    data: Annotated[str | None, typer.Option(help="data preset for prompts (default: the adapter's own)")] = None,
    n: Annotated[int, typer.Option(help="number of test prompts")] = 100,
    max_new_tokens: Annotated[int, typer.Option(help="new tokens per prompt")] = 96,
    prompt_lookup: Annotated[int, typer.Option(help="HF prompt-lookup draft length")] = 10,
) -> None:
    """Speculative decoding vs plain decoding, HF generate and HF prompt lookup, on the same prompts."""
    from lorafleet.flows.bench import print_speculative, speculative_bench, write_json

    try:
        report = speculative_bench(model, _settings(), data=data, n=n, max_new_tokens=max_new_tokens,
                                   prompt_lookup_num_tokens=prompt_lookup, console=console)
    except (ValueError, LookupError, FileNotFoundError) as error:
        _fail(str(error))
    print_speculative(report, console)
    write_json(report, json_out, console)


@bench_app.command("training")
def bench_training(
    config: Annotated[Path, typer.Argument(help="finetune config YAML: its base model, data and training settings")],
    json_out: Annotated[Path, typer.Option("--json", help="where to write the JSON report")] = Path("training.json"),
    methods: Annotated[str, typer.Option(help="comma-separated methods, the first is the baseline")] = "lora,qlora",
    steps: Annotated[int, typer.Option(min=1, help="optimizer steps per method")] = 20,
) -> None:
    """LoRA vs QLoRA (or other methods) on the same config: tokens/s, seconds per step and peak memory,
    each method in a fresh process."""
    from lorafleet.config import ConfigError, load_config
    from lorafleet.flows.bench import write_json
    from lorafleet.tasks.training_bench import TrainingBenchError, training_bench

    try:
        report = training_bench(load_config(config), _settings(), steps=steps,
                                methods=[m.strip() for m in methods.split(",") if m.strip()], on_line=console.print)
    except (ConfigError, ValueError, TrainingBenchError) as error:
        _fail(str(error))
    console.print_json(json.dumps(report.to_dict()["ratios"]))
    write_json(report, json_out, console)


@bench_app.command("adalora")
def bench_adalora(
    config: Annotated[Path, typer.Argument(help="finetune config YAML (method lora or adalora): base model, data, "
                                                "training, lora.alpha/target_modules and the `adalora` section")],
    json_out: Annotated[Path, typer.Option("--json", help="where to write the JSON report")] = Path("adalora.json"),
    steps: Annotated[int | None, typer.Option(min=1, help="optimizer steps per variant (default: the config's)")]
    = None,
) -> None:
    """AdaLoRA vs fixed-rank LoRA at r = adalora.target_r (the same rank budget) on the same config: final rank
    pattern, parameters, validation loss and the finetune flow's task metrics, side by side."""
    from lorafleet.config import ConfigError, load_config
    from lorafleet.flows.bench import write_json
    from lorafleet.tasks.adalora_bench import adalora_bench

    try:
        report = adalora_bench(load_config(config), _settings(), steps=steps, on_line=console.print)
    except (ConfigError, ValueError) as error:
        _fail(str(error))
    console.print(report.markdown(), soft_wrap=True)
    console.print_json(json.dumps(report.ratios))
    write_json(report, json_out, console)


@bench_app.command("engine")
def bench_engine(
    json_out: Annotated[Path, typer.Option("--json", help="where to write the JSON report")] = Path("engine.json"),
    adapters: Annotated[int, typer.Option(help="random r=16 adapters the mixed batch spreads over")] = 8,
    requests: Annotated[int, typer.Option(help="concurrent requests")] = 16,
    max_new_tokens: Annotated[int, typer.Option(min=2, help="new tokens per request (decode is timed after the first)")]
    = 32,
    rounds: Annotated[int, typer.Option(min=1, help="interleaved rounds of the batched runs (medians reported)")] = 3,
    base: Annotated[str, typer.Option(help="base model: the embedded SmolLM2, a folder, or a random model of a "
                                           "real shape (random:llama-1b, random:llama-3b, random:smollm2-135m)")]
    = "smollm2-135m-instruct",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16")] = "auto",
) -> None:
    """The engine vs transformers generate, PEFT mixed batches and serial PEFT, on the same requests."""
    from lorafleet.flows.bench import engine_bench, print_engine, write_json

    try:
        report = engine_bench(_settings(), n_adapters=adapters, n_requests=requests, max_new_tokens=max_new_tokens,
                              rounds=rounds, console=console, base=base, device=device, dtype=dtype)
    except ValueError as error:
        _fail(str(error))
    print_engine(report, console)
    write_json(report, json_out, console)


@bench_app.command("speculation")
def bench_speculation(
    model: Annotated[str, typer.Argument(help="adapter with Turbo heads: a folder, NAME, NAME@ALIAS, NAME@VERSION")],
    json_out: Annotated[Path, typer.Option("--json", help="where to write the JSON report")] = Path(
        "speculation.json"),
    concurrency: Annotated[str, typer.Option(help="comma-separated request counts run at once")] = "1,4,16,64",
    max_new_tokens: Annotated[int, typer.Option(min=2, help="greedy tokens per request")] = 64,
    rounds: Annotated[int, typer.Option(min=1, help="interleaved rounds (medians reported)")] = 3,
    compile_decode: Annotated[bool, typer.Option("--compile-decode", help="compiled decode steps (needs g++)")] = False,
) -> None:
    """Speculation off / adaptive / on on the engine at several concurrencies: is adaptive ever slower?"""
    from lorafleet.flows.bench import print_speculation_modes, speculation_modes_bench, write_json

    try:
        levels = [int(level) for level in concurrency.split(",") if level.strip()]
    except ValueError:
        _fail(f"--concurrency: expected comma-separated integers, got {concurrency!r}")
    try:
        report = speculation_modes_bench(model, _settings(), concurrency=levels, max_new_tokens=max_new_tokens,
                                         rounds=rounds, compile_decode=compile_decode, console=console)
    except (ValueError, LookupError, FileNotFoundError) as error:
        _fail(str(error))
    print_speculation_modes(report, console)
    write_json(report, json_out, console)


@bench_app.command("weights")
def bench_weights(
    json_out: Annotated[Path, typer.Option("--json", help="where to write the JSON report")] = Path("weights.json"),
    formats: Annotated[str, typer.Option(help="comma-separated: fp32, bf16, int8, int4")] = "fp32,bf16,int8,int4",
    prompts: Annotated[int, typer.Option(min=1, help="test prompts for greedy agreement (the first is timed)")] = 32,
    max_new_tokens: Annotated[int, typer.Option(min=2, help="greedy tokens per prompt")] = 64,
    rounds: Annotated[int, typer.Option(min=1, help="interleaved timing rounds (medians reported)")] = 3,
    adapter: Annotated[str | None, typer.Option(
        help="also score this adapter (NAME, NAME@VERSION or a folder) under each format")] = None,
    score_rows: Annotated[int, typer.Option(min=1, help="test rows scored for --adapter")] = 200,
    compile_decode: Annotated[bool, typer.Option(
        "--compile-decode", help="also time each format with its decode steps compiled (needs g++; "
        "minutes of compiling per format on 2 cores the first time, Inductor caches them)")] = False,
) -> None:
    """Weight formats of the embedded base side by side: decode speed, agreement with fp32, llama.cpp."""
    from lorafleet.flows.bench import print_weights, weights_bench, write_json

    try:
        report = weights_bench(_settings(), formats=[f.strip() for f in formats.split(",") if f.strip()],
                               n_prompts=prompts, max_new_tokens=max_new_tokens, rounds=rounds, adapter=adapter,
                               score_rows=score_rows, compile_decode=compile_decode, console=console)
    except (ValueError, LookupError) as error:
        _fail(str(error))
    print_weights(report, console)
    write_json(report, json_out, console)


@bench_app.command("merge")
def bench_merge(
    json_out: Annotated[Path, typer.Option("--json", help="where to write the JSON report")] = Path("merge.json"),
    requests: Annotated[int, typer.Option(min=1, help="completions per variant per round")] = 32,
    clients: Annotated[int, typer.Option(min=1, help="concurrent HTTP clients")] = 8,
    max_tokens: Annotated[int, typer.Option(min=1, help="greedy tokens per completion")] = 32,
    rounds: Annotated[int, typer.Option(min=1, help="interleaved rounds (medians reported)")] = 3,
    base_model: Annotated[str, typer.Option(help="base model (without --url)")] = "smollm2-135m-instruct",
    url: Annotated[str | None, typer.Option(help="a running server serving the two adapters")] = None,
    adapters: Annotated[str | None, typer.Option(help="A,B: two registered adapters of one rank (default: random "
                                                      "bench-000,bench-001)")] = None,
) -> None:
    """Per-request merges (linear, ties) vs one adapter on one server: tokens/s, first-request latency."""
    from lorafleet.flows.merge_bench import merge_bench

    names = [name.strip() for name in adapters.split(",") if name.strip()] if adapters else None
    try:
        report = merge_bench(_settings(), url=url, base_model=base_model, requests=requests, clients=clients,
                             max_tokens=max_tokens, rounds=rounds, adapters=names, console=console)
    except (ValueError, LookupError, httpx.HTTPError) as error:
        _fail(str(error))
    console.print_json(data={key: report[key] for key in ("tokens_per_s", "ratio_to_single", "mean_completion_tokens",
                                                           "first_request_ms")})
    _write_json(report, json_out)


@bench_app.command("structured")
def bench_structured(
    adapter: Annotated[str, typer.Argument(help="a JSON-task adapter: NAME, NAME@VERSION, models:/ URI or folder")],
    json_out: Annotated[Path, typer.Option("--json", help="where to write the JSON report")] = Path("structured.json"),
    rows: Annotated[int, typer.Option(min=1, help="test rows scored per variant")] = 100,
    decode_prompts: Annotated[int, typer.Option(min=1, help="prompts decoded one at a time (ms/token, tau)")] = 8,
) -> None:
    """JSON schema on vs off on the engine: parse rate, field F1, tokens/s (base and adapter), mask cost, tau."""
    from lorafleet.flows.bench import print_structured, structured_bench, write_json

    try:
        report = structured_bench(_settings(), adapter, rows=rows, decode_prompts=decode_prompts, console=console)
    except (ValueError, LookupError) as error:
        _fail(str(error))
    print_structured(report, console)
    write_json(report, json_out, console)


@bench_app.command("experiment")
def bench_experiment(
    json_out: Annotated[Path, typer.Option("--json", help="where to write the JSON report")] = Path("experiment.json"),
    share: Annotated[float, typer.Option(min=0.0, max=1.0, help="challenger share of the experiment")] = 0.1,
    requests: Annotated[int, typer.Option(min=2, help="one-token completions sent (half of them with `user`)")] = 10_000,
    users: Annotated[int, typer.Option(min=1, help="distinct `user` values for the sticky half")] = 500,
    workers: Annotated[int, typer.Option(min=1, help="concurrent HTTP clients")] = 8,
    base_model: Annotated[str, typer.Option(help="base of the two bench-ab versions (without --url)")] = "tiny-random-llama",
    url: Annotated[str | None, typer.Option(help="a running server to measure instead (with --name)")] = None,
    name: Annotated[str, typer.Option(help="with --url: an adapter with a champion and a challenger")] = "bench-ab",
) -> None:
    """A/B split accuracy over HTTP: observed challenger share (anonymous and per user) and stickiness."""
    from lorafleet.flows.experiment_bench import experiment_bench

    try:
        report = experiment_bench(_settings(), url=url, name=name, base_model=base_model, share=share,
                                  requests=requests, users=users, workers=workers, console=console)
    except (ValueError, LookupError, httpx.HTTPError) as error:
        _fail(str(error))
    console.print_json(data=report)
    _write_json(report, json_out)


@bench_app.command("scoring")
def bench_scoring(
    adapter: Annotated[str, typer.Argument(help="NAME, NAME@VERSION, models:/ URI or an adapter folder")],
    json_out: Annotated[Path, typer.Option("--json", help="where to write the JSON report")] = Path("scoring.json"),
    rows: Annotated[int | None, typer.Option(min=1, help="test rows (default: the whole test split)")] = None,
) -> None:
    """Score an adapter on its test split with the engine and with transformers generate: time, identity."""
    from lorafleet.flows.bench import print_scoring, scoring_bench, write_json

    try:
        report = scoring_bench(_settings(), adapter, rows=rows, console=console)
    except (ValueError, LookupError) as error:
        _fail(str(error))
    print_scoring(report, console)
    write_json(report, json_out, console)


@bench_app.command("grammar")
def bench_grammar(
    json_out: Annotated[Path, typer.Option("--json", help="where to write the JSON report")] = Path("grammar.json"),
    models: Annotated[str, typer.Option(help="comma-separated base models whose tokenizers are measured")]
    = "smollm2-135m-instruct,tiny-random-llama",
    answers: Annotated[int, typer.Option(min=2, help="valid answers fed token by token per grammar")] = 20,
    rounds: Annotated[int, typer.Option(min=1, help="interleaved rounds (medians reported)")] = 7,
) -> None:
    """Constrained JSON decoding: xgrammar vs llguidance per-token mask cost, compile time, mask application."""
    from lorafleet.evaluation.grammar_bench import load_bench_tokenizer, measure_grammar
    from lorafleet.flows.bench import write_json
    from lorafleet.tasks.data.generated import generate_examples

    settings = _settings()
    names = [name.strip() for name in models.split(",") if name.strip()]
    if not names:
        _fail(f"--models {models!r} names no model")
    try:
        tokenizers = {name: load_bench_tokenizer(name, settings.model_cache_dir) for name in names}
    except (ValueError, OSError) as error:
        _fail(str(error))
    # The extraction task's own answers (valid JSON, its exact output format); 8x as many as needed, since the
    # nested-list case pairs the order records among them (about a quarter).
    targets = [example.completion for example in generate_examples(8 * answers, seed=0)]
    report = measure_grammar(tokenizers, targets, answers=answers, rounds=rounds, on_line=console.print)
    print(json.dumps(report.summary(), indent=2))
    write_json(report, json_out, console)


@bench_app.command("serving")
def bench_serving(
    json_out: Annotated[Path, typer.Option("--json", help="where to write the JSON report")] = Path("serving.json"),
    url: Annotated[str | None, typer.Option(help="a running server (default: start one on this home's registry)")]
    = None,
    server_pid: Annotated[int | None, typer.Option(help="with --url: the server's pid, for its RSS")] = None,
    concurrency: Annotated[int, typer.Option(help="closed-loop clients")] = 16,
    adapters: Annotated[int, typer.Option(help="adapters the requests spread over (Zipf popularity)")] = 8,
    duration: Annotated[float, typer.Option(help="seconds of load (in-flight requests then finish)")] = 30.0,
    max_tokens: Annotated[int, typer.Option(help="max_tokens of every request")] = 64,
    zipf: Annotated[float, typer.Option(help="Zipf exponent of adapter popularity (0 = uniform)")] = 1.0,
    seed: Annotated[int, typer.Option(help="seeds adapter and prompt choice")] = 0,
    check: Annotated[int, typer.Option(help="re-send this many answered requests alone and compare")] = 0,
    serve_env: Annotated[list[str] | None, typer.Option(
        help="KEY=VALUE for the server this command starts, repeatable (e.g. LORAFLEET_SERVE_ADAPTER_SLOTS=16)")]
    = None,
    models: Annotated[str | None, typer.Option(
        help="comma-separated models to request, most popular first (default: the first --adapters champions)")]
    = None,
    hostile: Annotated[bool, typer.Option(
        help="one more client sends hostile requests (bad parameters, junk names, oversized bodies) and, on a "
             "server this command starts, loads a NaN adapter and mis-shaped Turbo heads")] = False,
) -> None:
    """Closed-loop HTTP load on the OpenAI API: N streaming clients over M adapters with Zipf popularity."""
    import httpx

    from lorafleet.evaluation.serving_bench import LoadOptions
    from lorafleet.flows.bench import write_json
    from lorafleet.flows.serving_bench import parse_env_pairs, print_serving, serving_bench
    from lorafleet.serving.launcher import ServerStartError

    # Registering 100 bench adapters would print MLflow's download bar 100 times.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        options = LoadOptions(concurrency=concurrency, duration_s=duration, max_tokens=max_tokens, zipf=zipf,
                              seed=seed, check=check)
        env = parse_env_pairs(serve_env or [])
        if url is not None and env:
            raise ValueError("--serve-env configures the server this command starts; it cannot apply to --url")
        chosen = [name.strip() for name in (models or "").split(",") if name.strip()]
        if models is not None and not chosen:
            raise ValueError(f"--models {models!r} names no model")
        report = serving_bench(_settings(), options, url=url, server_pid=server_pid,
                               n_adapters=len(chosen) or adapters, serve_env=env, console=console, models=chosen,
                               hostile=hostile)
    except (ValueError, LookupError, ServerStartError) as error:
        _fail(str(error))
    except httpx.HTTPError as error:
        _fail(f"{url}: {error}")
    print_serving(report, console)
    write_json(report, json_out, console)


def _write_json(report: dict, path: Path) -> None:
    """A bench report that is a plain dict (the others have `to_dict`: flows/bench.write_json)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    console.print(f"wrote {path}")


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
