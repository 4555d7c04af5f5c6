"""`lorafleet bench merge`: what a per-request merge costs against serving one adapter, on one server.

Two random r=16 champions of the base (`bench-000`, `bench-001`, registered by `bench serving`'s helper
when missing) are served by a started `bentoml serve` (or `--url`). In interleaved rounds it sends the
same greedy completions, `--clients` at a time: to `bench-000` alone, and as per-request merges of both
(`linear`, `ties` with density 0.5), and reports tokens/s per variant (medians over rounds) with the
ratio to the single adapter. The one-time cost is measured apart: the latency of the first request of a
recipe never seen (a new seed each round: the merge is read, computed and installed) against a request
to the resident single adapter.
"""

from __future__ import annotations

import concurrent.futures as cf
import statistics
import time
from typing import Any

import httpx
from rich.console import Console

from lorafleet.settings import Settings

ADAPTERS = ("bench-000", "bench-001")


def _variants(base: str) -> dict[str, dict[str, Any]]:
    merge = {"ids": list(ADAPTERS), "weights": [0.6, 0.4]}
    return {
        "single": {"model": ADAPTERS[0]},
        "merge-linear": {"model": base, "merged_adapters": {**merge, "merge_strategy": "linear"}},
        "merge-ties": {"model": base, "merged_adapters": {**merge, "merge_strategy": "ties", "density": 0.5}},
    }


def measure_merge(url: str, base: str, *, requests: int, clients: int, max_tokens: int, rounds: int,
                  console: Console | None = None) -> dict[str, Any]:
    prompts = [f"Describe item number {i} in one sentence." for i in range(requests)]
    variants = _variants(base)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    cold_ms, warm_ms = [], []
    with httpx.Client(base_url=url, timeout=600) as http:
        def post(body: dict[str, Any]) -> int:
            response = http.post("/v1/completions", json={"max_tokens": max_tokens, "temperature": 0, **body})
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
            fresh = {"model": base, "merged_adapters": {"ids": list(ADAPTERS), "weights": [0.5, 0.5],
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
    return {
        "requests": requests, "clients": clients, "max_tokens": max_tokens, "rounds": rounds,
        "tokens_per_s": median, "tokens_per_s_rounds": rates,
        "ratio_to_single": {name: value / median["single"] for name, value in median.items()},
        "first_request_ms": {"new_merge": statistics.median(cold_ms), "resident_single": statistics.median(warm_ms),
                             "new_merge_rounds": cold_ms, "resident_single_rounds": warm_ms},
    }


def merge_bench(settings: Settings, *, url: str | None, base_model: str, requests: int, clients: int,
                max_tokens: int, rounds: int, console: Console | None = None) -> dict[str, Any]:
    if url is not None:
        return measure_merge(url, base_model, requests=requests, clients=clients, max_tokens=max_tokens,
                             rounds=rounds, console=console)
    from lorafleet.flows.serving_bench import STARTUP_TIMEOUT_S, ensure_bench_adapters
    from lorafleet.serving.launcher import start_server

    ensure_bench_adapters(settings, base_model=base_model, count=len(ADAPTERS), console=console)
    env = {"LORAFLEET_BASE_MODEL": base_model, "HF_HUB_OFFLINE": "1", "LORAFLEET_SERVE_REGISTRY_POLL_S": "0"}
    with start_server(settings, env=env, startup_timeout=STARTUP_TIMEOUT_S) as handle:
        return measure_merge(handle.url, base_model, requests=requests, clients=clients, max_tokens=max_tokens,
                             rounds=rounds, console=console)
