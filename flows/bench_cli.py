"""The `lorafleet bench ...` commands: each prints a table and writes JSON, baselines measured in the same run.

Thin wrappers: the measurements live in evaluation/ and flows/*_bench.py, set up by flows/bench.py."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import httpx
import typer

from lorafleet.flows.cli_common import console, fail, load_settings, write_dict_json

bench_app = typer.Typer(help="Benchmarks: print a table and write JSON, baselines measured in the same run.",
                        no_args_is_help=True)


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
        report = speculative_bench(model, load_settings(), data=data, n=n, max_new_tokens=max_new_tokens,
                                   prompt_lookup_num_tokens=prompt_lookup, console=console)
    except (ValueError, LookupError, FileNotFoundError) as error:
        fail(str(error))
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
        report = training_bench(load_config(config), load_settings(), steps=steps,
                                methods=[m.strip() for m in methods.split(",") if m.strip()], on_line=console.print)
    except (ConfigError, ValueError, TrainingBenchError) as error:
        fail(str(error))
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
        report = adalora_bench(load_config(config), load_settings(), steps=steps, on_line=console.print)
    except (ConfigError, ValueError) as error:
        fail(str(error))
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
        report = engine_bench(load_settings(), n_adapters=adapters, n_requests=requests, max_new_tokens=max_new_tokens,
                              rounds=rounds, console=console, base=base, device=device, dtype=dtype)
    except ValueError as error:
        fail(str(error))
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
        fail(f"--concurrency: expected comma-separated integers, got {concurrency!r}")
    try:
        report = speculation_modes_bench(model, load_settings(), concurrency=levels, max_new_tokens=max_new_tokens,
                                         rounds=rounds, compile_decode=compile_decode, console=console)
    except (ValueError, LookupError, FileNotFoundError) as error:
        fail(str(error))
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
        report = weights_bench(load_settings(), formats=[f.strip() for f in formats.split(",") if f.strip()],
                               n_prompts=prompts, max_new_tokens=max_new_tokens, rounds=rounds, adapter=adapter,
                               score_rows=score_rows, compile_decode=compile_decode, console=console)
    except (ValueError, LookupError) as error:
        fail(str(error))
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
        report = merge_bench(load_settings(), url=url, base_model=base_model, requests=requests, clients=clients,
                             max_tokens=max_tokens, rounds=rounds, adapters=names, console=console)
    except (ValueError, LookupError, httpx.HTTPError) as error:
        fail(str(error))
    console.print_json(data={key: report[key] for key in ("tokens_per_s", "ratio_to_single", "mean_completion_tokens",
                                                           "first_request_ms")})
    write_dict_json(report, json_out)


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
        report = structured_bench(load_settings(), adapter, rows=rows, decode_prompts=decode_prompts, console=console)
    except (ValueError, LookupError) as error:
        fail(str(error))
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
        report = experiment_bench(load_settings(), url=url, name=name, base_model=base_model, share=share,
                                  requests=requests, users=users, workers=workers, console=console)
    except (ValueError, LookupError, httpx.HTTPError) as error:
        fail(str(error))
    console.print_json(data=report)
    write_dict_json(report, json_out)


@bench_app.command("scoring")
def bench_scoring(
    adapter: Annotated[str, typer.Argument(help="NAME, NAME@VERSION, models:/ URI or an adapter folder")],
    json_out: Annotated[Path, typer.Option("--json", help="where to write the JSON report")] = Path("scoring.json"),
    rows: Annotated[int | None, typer.Option(min=1, help="test rows (default: the whole test split)")] = None,
) -> None:
    """Score an adapter on its test split with the engine and with transformers generate: time, identity."""
    from lorafleet.flows.bench import print_scoring, scoring_bench, write_json

    try:
        report = scoring_bench(load_settings(), adapter, rows=rows, console=console)
    except (ValueError, LookupError) as error:
        fail(str(error))
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

    settings = load_settings()
    names = [name.strip() for name in models.split(",") if name.strip()]
    if not names:
        fail(f"--models {models!r} names no model")
    try:
        tokenizers = {name: load_bench_tokenizer(name, settings.model_cache_dir) for name in names}
    except (ValueError, OSError) as error:
        fail(str(error))
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
        report = serving_bench(load_settings(), options, url=url, server_pid=server_pid,
                               n_adapters=len(chosen) or adapters, serve_env=env, console=console, models=chosen,
                               hostile=hostile)
    except (ValueError, LookupError, ServerStartError) as error:
        fail(str(error))
    except httpx.HTTPError as error:
        fail(f"{url}: {error}")
    print_serving(report, console)
    write_json(report, json_out, console)
