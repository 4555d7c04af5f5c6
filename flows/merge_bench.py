"""`lorafleet bench merge`: what a per-request merge costs against serving one adapter, on one server.

Two served adapters of one rank (`--adapters A,B`; default two random r=16 champions `bench-000`,
`bench-001`, registered by `bench serving`'s helper when missing) are served by a started `bentoml serve` (or `--url`). In interleaved rounds it sends the
same greedy completions, `--clients` at a time: to `bench-000` alone, and as per-request merges of both
(`linear`, `ties` with density 0.5), as chat requests (the adapters' own prompt shape), and reports tokens/s per variant (medians over rounds) with the
ratio to the single adapter. The one-time cost is measured apart: the latency of the first request of a
recipe never seen (a new seed each round: the merge is read, computed and installed) against a request
to the resident single adapter.
"""

from __future__ import annotations

import concurrent.futures as cf
import statistics
import time
from collections.abc import Sequence
from typing import Any

import httpx
from rich.console import Console

from lorafleet.settings import Settings

ADAPTERS = ("bench-000", "bench-001")


def _variants(base: str, adapters: Sequence[str]) -> dict[str, dict[str, Any]]:
    merge = {"ids": list(adapters), "weights": [0.6, 0.4]}
    return {
        "single": {"model": adapters[0]},
        "merge-linear": {"model": base, "merged_adapters": {**merge, "merge_strategy": "linear"}},
        "merge-ties": {"model": base, "merged_adapters": {**merge, "merge_strategy": "ties", "density": 0.5}},
    }


def measure_merge(url: str, base: str, *, requests: int, clients: int, max_tokens: int, rounds: int,
                  adapters: Sequence[str] = ADAPTERS, console: Console | None = None) -> dict[str, Any]:
    cities = ("Porto", "Lyon", "Turin", "Gdansk", "Leeds", "Graz", "Bilbao", "Malmo")
    prompts = [f"Ana Silva, {20 + i % 50}, works as a nurse in {cities[i % len(cities)]} and ordered {i + 2} lamps."
               for i in range(requests)]
    variants = _variants(base, adapters)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    lengths: dict[str, list[float]] = {name: [] for name in variants}  # mean completion tokens per round
    cold_ms, warm_ms = [], []
    with httpx.Client(base_url=url, timeout=600) as http:
        def post(body: dict[str, Any]) -> int:
            """A chat request (the adapters' own prompt shape: their system prompt is added by the server)."""
            body = dict(body)
            messages = [{"role": "user", "content": body.pop("prompt")}]
            response = http.post("/v1/chat/completions", json={"max_tokens": max_tokens, "temperature": 0,
                                                               "messages": messages, **body})
            response.raise_for_status()
            return response.json()["usage"]["completion_tokens"]

        for name, fields in variants.items():  # warm-up: every variant resident before timing
            post({**fields, "prompt": prompts[0]})
        for round_index in range(rounds):
            for name, fields in variants.items():
                started = time.perf_counter()
                with cf.ThreadPoolExecutor(clients) as pool:
                    bodies = [{**fields, "prompt": prompt} for prompt in prompts]
                    tokens = sum(pool.map(post, bodies))
                rates[name].append(tokens / (time.perf_counter() - started))
                lengths[name].append(tokens / len(prompts))
            fresh = {"model": base, "merged_adapters": {"ids": list(adapters), "weights": [0.5, 0.5],
                                                        "merge_strategy": "dare_linear", "density": 0.5,
                                                        "seed": 1000 + round_index}}
            for target, fields in ((cold_ms, fresh), (warm_ms, variants["single"])):
                started = time.perf_counter()
                post({**fields, "prompt": prompts[0], "max_tokens": 1})
                target.append((time.perf_counter() - started) * 1000)
            if console is not None:
                console.print(f"round {round_index + 1}/{rounds}: " + ", ".join(
                    f"{name} {values[-1]:.1f} tok/s" for name, values in rates.items()))
    median = {name: statistics.median(values) for name, values in rates.items()}
    if not median["single"]:
        raise ValueError(f"{adapters[0]} answered every request with end-of-sequence at once: nothing to time")
    return {
        "adapters": list(adapters), "requests": requests, "clients": clients, "max_tokens": max_tokens,
        "rounds": rounds,
        "tokens_per_s": median, "tokens_per_s_rounds": rates,
        # Outputs differ per variant (each merge is another model): shorter answers turn requests over faster,
        # so tokens/s also moves with the mean completion length, shown here.
        "mean_completion_tokens": {name: statistics.mean(values) for name, values in lengths.items()},
        "ratio_to_single": {name: value / median["single"] for name, value in median.items()},
        "first_request_ms": {"new_merge": statistics.median(cold_ms), "resident_single": statistics.median(warm_ms),
                             "new_merge_rounds": cold_ms, "resident_single_rounds": warm_ms},
    }


def merge_bench(settings: Settings, *, url: str | None, base_model: str, requests: int, clients: int,
                max_tokens: int, rounds: int, adapters: Sequence[str] | None = None,
                console: Console | None = None) -> dict[str, Any]:
    """`adapters`: two served adapters of one rank (default: the random `bench-000`, `bench-001`, created when
    missing; random adapters answer in a few tokens, so trained ones measure decoding better)."""
    if adapters is not None and len(adapters) != 2:
        raise ValueError(f"--adapters: name two adapters, got {len(adapters)}")
    if url is not None:
        return measure_merge(url, base_model, requests=requests, clients=clients, max_tokens=max_tokens,
                             rounds=rounds, adapters=adapters or ADAPTERS, console=console)
    from lorafleet.flows.serving_bench import STARTUP_TIMEOUT_S, ensure_bench_adapters
    from lorafleet.serving.launcher import start_server

    if adapters is None:
        ensure_bench_adapters(settings, base_model=base_model, count=len(ADAPTERS), console=console)
    env = {"LORAFLEET_BASE_MODEL": base_model, "HF_HUB_OFFLINE": "1", "LORAFLEET_SERVE_REGISTRY_POLL_S": "0"}
    with start_server(settings, env=env, startup_timeout=STARTUP_TIMEOUT_S) as handle:
        return measure_merge(handle.url, base_model, requests=requests, clients=clients, max_tokens=max_tokens,
                             rounds=rounds, adapters=adapters or ADAPTERS, console=console)
