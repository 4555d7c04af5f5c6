"""`lorafleet bench serving`: set up what the load needs, run it (evaluation/serving_bench.py), report.

With no `--url` the bench serves the current `LORAFLEET_HOME`'s registry itself: it first makes sure
at least `--adapters` champions of the embedded SmolLM2 are registered, creating random-initialised
r=16 adapters named `bench-000`, `bench-001`, ... when there are too few (random A and B, so each one
changes the answers; they are registered exactly like trained adapters, alias `champion`), then
starts `bentoml serve` through the launcher, measures, and stops it. With `--url` nothing is created
or started: the adapters are whatever that server lists in `/v1/models`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import track
from rich.table import Table

from lorafleet.evaluation.hostile_load import HostileSpec
from lorafleet.evaluation.serving_bench import LoadOptions, LoadSpec, ServingBenchReport, measure_serving
from lorafleet.models.embedded import EMBEDDED_MODEL_ID
from lorafleet.settings import Settings

BENCH_PREFIX = "bench"
BENCH_TAG = "lorafleet.bench"  # on runs and versions this command registered
N_PROMPTS = 256
STARTUP_TIMEOUT_S = 900.0  # 100 champions are downloaded and the base converted on a first start


def champions_for_base(settings: Settings, base_model: str) -> list[str]:
    """Registered adapters whose `champion` was trained on `base_model` (what the server will serve)."""
    from lorafleet.tasks import registry, tracking

    rows = registry.list_adapters(tracking.mlflow_client(settings))
    return sorted(row.name for row in rows if row.champion is not None and row.base_model == base_model)


def ensure_bench_adapters(settings: Settings, *, base_model: str, count: int, rank: int = 16,
                          console: Console | None = None) -> list[str]:
    """Register random r=`rank` champions until `count` champions exist for `base_model`; returns the
    names registered now (none when there were enough)."""
    from lorafleet.flows.bench import write_random_adapters
    from lorafleet.models.base import load_base_model
    from lorafleet.tasks import registry, tracking

    client = tracking.mlflow_client(settings)
    rows = registry.list_adapters(client)
    have = [row.name for row in rows if row.champion is not None and row.base_model == base_model]
    missing = count - len(have)
    if missing <= 0:
        return []
    taken = {row.name for row in rows}  # a name in use for anything else is skipped, never reused
    names = list(itertools.islice((name for name in (f"{BENCH_PREFIX}-{i:03d}" for i in itertools.count())
                                   if name not in taken), missing))
    if console is not None:
        console.print(f"{len(have)} champion(s) of {base_model} registered, {count} wanted: creating "
                      f"{missing} random r={rank} adapters ({names[0]} .. {names[-1]})")
    loaded = load_base_model(base_model, settings.model_cache_dir)
    dirs = write_random_adapters(loaded, settings.home / "bench" / "adapters", names, rank=rank)
    for name in track(names, description="registering", console=console, disable=console is None):
        register_champion(client, settings, name, dirs[name])
    return names


def register_champion(client, settings: Settings, name: str, adapter_dir: Path) -> str:
    """Log `adapter_dir` as a run's `adapter` artifact, register it and make it champion, as the
    pipeline does (`lorafleet.tasks.registry`); returns the version."""
    from lorafleet.tasks import registry, tracking

    experiment_id = tracking.ensure_experiment(client, name, settings)
    run_id = tracking.start_run(client, experiment_id, run_name=f"{name}-random", tags={BENCH_TAG: "random"})
    client.log_artifacts(run_id, str(adapter_dir), registry.ADAPTER_ARTIFACT_PATH)
    client.set_terminated(run_id)
    version = registry.register_adapter(client, name=name, run_id=run_id, tags={BENCH_TAG: "random"})
    registry.set_champion(client, name, version.version, reason="bench serving: random-initialised adapter")
    return str(version.version)


def served_adapters(url: str, count: int) -> list[str]:
    """The first `count` adapters (by name) the server lists as champions; ValueError when fewer."""
    response = httpx.get(f"{url.rstrip('/')}/v1/models", timeout=30)
    response.raise_for_status()
    names = sorted(card["id"] for card in response.json()["data"] if card.get("parent") and "@" not in card["id"])
    if len(names) < count:
        raise ValueError(f"the server at {url} serves {len(names)} adapter(s) ({', '.join(names) or 'none'}), "
                         f"fewer than --adapters {count}")
    return names[:count]


def user_prompts(settings: Settings, base_model: str, n: int) -> list[str]:
    """ViGGO test inputs (the extraction task's without the shared data), as plain user messages."""
    from lorafleet.flows.bench import bench_messages
    from lorafleet.models.base import load_tokenizer, resolve_base_model

    tokenizer = load_tokenizer(resolve_base_model(base_model, settings.model_cache_dir))
    return [next(turn["content"] for turn in reversed(messages) if turn["role"] == "user")
            for messages in bench_messages(tokenizer, settings, n)]


def write_hostile_adapters(settings: Settings, base_model: str) -> tuple[Path, Path]:
    """Two adapter folders a server must refuse to make resident, for `--hostile`: a LoRA whose weights
    hold NaN and Inf, and Turbo heads sized for a base model twice as wide. Rewritten on every call."""
    from safetensors.torch import load_file, save_file

    from lorafleet.flows.bench import write_random_adapters
    from lorafleet.models.adapter_dir import PEFT_WEIGHTS_FILE, read_manifest, write_manifest
    from lorafleet.models.base import load_base_model
    from lorafleet.models.turbo_heads import TurboHeads, TurboHeadsConfig, save_heads

    root = settings.home / "bench" / "hostile"
    loaded = load_base_model(base_model, settings.model_cache_dir)
    nan_dir = write_random_adapters(loaded, root, ["hostile-0"])["hostile-0"]
    tensors = load_file(str(nan_dir / PEFT_WEIGHTS_FILE))
    first, last = min(tensors), max(tensors)
    tensors[first].view(-1)[0] = float("nan")
    tensors[last].view(-1)[-1] = float("inf")
    save_file(tensors, str(nan_dir / PEFT_WEIGHTS_FILE))
    heads_dir = root / "hostile-heads"
    heads_dir.mkdir(parents=True, exist_ok=True)
    vocab, width = loaded.model.get_output_embeddings().weight.shape
    save_heads(TurboHeads(TurboHeadsConfig(num_heads=2, hidden_size=2 * width, block_size=8, vocab_size=vocab)),
               heads_dir)
    write_manifest(heads_dir, read_manifest(nan_dir).model_copy(update={"method": "turbo", "name": "hostile-heads"}))
    return nan_dir, heads_dir


def serving_bench(settings: Settings, options: LoadOptions, *, url: str | None, server_pid: int | None,
                  n_adapters: int, serve_env: Mapping[str, str], console: Console,
                  models: Sequence[str] = (), hostile: bool = False) -> ServingBenchReport:
    """Measure the server at `url`, or set up adapters and start (then stop) our own when it is None.

    `models` names exactly what the requests ask for (most popular first; any `model` string the server
    accepts, e.g. a Turbo adapter against its plain twin); then no bench adapters are created.
    `hostile` adds one attacking client (evaluation/hostile_load.py); when this command starts the server,
    that client also loads a NaN adapter and mis-shaped Turbo heads through the admin API."""
    if n_adapters < 1:
        raise ValueError(f"--adapters must be >= 1, got {n_adapters}")
    base_model = EMBEDDED_MODEL_ID
    prompts = tuple(user_prompts(settings, base_model, N_PROMPTS))

    def spec_for(target: str) -> LoadSpec:
        chosen = tuple(models) if models else tuple(served_adapters(target, n_adapters))
        spec = LoadSpec(url=target, models=chosen, prompts=prompts, options=options)
        console.print(f"{options.concurrency} clients, {len(spec.models)} adapters (Zipf {options.zipf}, "
                      f"{spec.models[0]} most popular), {len(prompts)} prompts, max {options.max_tokens} "
                      f"tokens, {options.duration_s:g} s against {target}")
        return spec

    def hostile_for(spec: LoadSpec, folders: tuple[Path, Path] | None) -> HostileSpec | None:
        if not hostile:
            return None
        nan_dir, heads_dir = folders or (None, None)
        return HostileSpec(models=spec.models, nan_adapter=nan_dir, bad_heads_adapter=heads_dir, seed=options.seed)

    if url is not None:
        spec = spec_for(url.rstrip("/"))
        return measure_serving(spec, server_pid=server_pid, hostile=hostile_for(spec, None))

    from lorafleet.models.base import pick_device
    from lorafleet.serving.launcher import start_server

    if not models:
        ensure_bench_adapters(settings, base_model=base_model, count=n_adapters, console=console)
    folders = write_hostile_adapters(settings, base_model) if hostile else None
    env = {"LORAFLEET_BASE_MODEL": base_model, "HF_HUB_OFFLINE": "1", **serve_env}
    if folders is not None:
        env.setdefault("LORAFLEET_SERVE_ADAPTER_ROOTS", str(folders[0].parent))
    device = str(pick_device(env.get("LORAFLEET_SERVE_DEVICE", "auto")))
    console.print(f"starting the server ({base_model} on {device}"
                  + "".join(f", {key}={value}" for key, value in serve_env.items()) + ")")
    with start_server(settings, env=env, startup_timeout=STARTUP_TIMEOUT_S) as handle:
        spec = spec_for(handle.url)
        return measure_serving(spec, server_pid=handle.process.pid, device=device, hostile=hostile_for(spec, folders))


def parse_env_pairs(pairs: list[str]) -> dict[str, str]:
    """`KEY=VALUE` strings (repeated `--serve-env`) as a dict; a malformed one is a ValueError naming it."""
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--serve-env {pair!r}: expected KEY=VALUE, e.g. LORAFLEET_SERVE_ADAPTER_SLOTS=16")
        parsed[key.strip()] = value
    return parsed


def print_serving(report: ServingBenchReport, console: Console) -> None:
    where = report.device or report.url
    table = Table(title=f"serving: {report.concurrency} clients, {report.n_adapters} adapters "
                        f"(Zipf {report.zipf}), {report.duration_s:.1f} s, {where}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("requests completed", f"{report.completed}"),
        ("requests/s", f"{report.requests_per_s:.2f}"),
        (f"tokens/s ({report.tokens_from})", f"{report.tokens_per_s:.1f}"),
        ("TTFT p50 / p99 (ms)", f"{_ms(report.ttft_p50_ms)} / {_ms(report.ttft_p99_ms)}"),
        ("inter-token p50 / p99 (ms)", f"{_ms(report.itl_p50_ms)} / {_ms(report.itl_p99_ms)}"),
        ("errors", f"{report.errors}"),
        ("rejected (429, retried)", f"{report.rejected_429}"),
        ("abandoned at the end", f"{report.abandoned}"),
        ("server RSS before / after (MB)", f"{_mb(report.rss_mb_before)} / {_mb(report.rss_mb_after)}"),
    ]
    after, delta = report.server_metrics or {}, report.server_metrics_delta or {}
    for key in sorted(after):  # counters as what this run added, gauges as they ended
        if "adapter_cache" in key:
            counter = key.endswith("_total")
            rows.append((key.removeprefix("lorafleet_") + (" (this run)" if counter else ""),
                         f"{delta.get(key, 0.0) if counter else after[key]:g}"))
    if report.check is not None:
        rows.append(("greedy alone == under load", f"{report.check['identical']}/{report.check['checked']}"))
    if report.hostile is not None:
        rows.append(("hostile requests sent", f"{report.hostile['sent']}"))
        rows.append(("hostile requests answered wrongly (5xx, other)", f"{report.hostile['server_errors']}"))
    for label, value in rows:
        table.add_row(label, value)
    console.print(table)
    for message in report.error_samples:
        console.print(f"[red]error:[/] {message}")
    for message in (report.hostile or {}).get("error_samples", []):
        console.print(f"[red]hostile request answered wrongly:[/] {message}")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
