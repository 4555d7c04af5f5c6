"""`bench serving`: a closed-loop HTTP load generator against the service's OpenAI API.

Closed loop: each of `concurrency` clients sends one streaming `/v1/chat/completions` request, reads
it to `[DONE]`, and only then sends the next, so the offered load follows the server's speed (what a
fixed pool of users or workers does) instead of piling up an unbounded queue. Each request picks an
adapter by Zipf popularity (rank 1, `models[0]`, most popular), so a few adapters are hot and a long
tail keeps the adapter cache loading and evicting.

What is measured, per request, on the client's clock:
  * TTFT: from sending the request to the first chunk that carries text (the role-only opening chunk
    does not count);
  * inter-token latency: the gaps between successive text chunks. The server sends one chunk per
    decoded piece of text, which is one token except where a token ends mid-character or a speculative
    step accepts several at once, so these are per-chunk figures;
  * tokens: `usage.completion_tokens` from the final chunk (`stream_options.include_usage`), else
    the number of text chunks.
A 429 (the server's bounded queue is full) is retried after a short jittered backoff and counted in
`rejected_429`, never in `errors`; any other failure (HTTP status, an error event mid-stream, a stream
that ends without `[DONE]`, a transport error) is an error. After `duration_s` no client starts a new
request; the ones in flight are awaited for at most `drain_timeout_s`, then cancelled and counted as
`abandoned`. Rates are over the whole wall time, drain included, so tokens and seconds match.

This module is plain asyncio + httpx: it knows nothing of how the server was started (flows/ does that).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from lorafleet.evaluation.hostile_load import HostileOutcome, HostileSpec, run_hostile

CHAT_PATH = "/v1/chat/completions"
ERROR_SAMPLES = 5  # distinct error messages kept in the report
METRIC_PREFIX = "lorafleet_"
PER_ADAPTER_LABELS = frozenset({"model", "adapter"})


@dataclass(frozen=True)
class LoadOptions:
    """How hard and how long to push; validated on creation, so a bad option fails before any setup."""

    concurrency: int = 16
    duration_s: float = 30.0
    max_tokens: int = 64
    zipf: float = 1.0
    seed: int = 0
    drain_timeout_s: float = 120.0
    request_timeout_s: float = 600.0
    backoff_s: float = 0.05  # after a 429; stretched by up to 100% jitter
    check: int = 0  # answered requests re-sent alone after the load to compare greedy answers

    def __post_init__(self) -> None:
        positive = {"concurrency": self.concurrency, "duration_s": self.duration_s, "max_tokens": self.max_tokens,
                    "drain_timeout_s": self.drain_timeout_s, "request_timeout_s": self.request_timeout_s}
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        for name, value in {"zipf": self.zipf, "backoff_s": self.backoff_s, "check": self.check}.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")


@dataclass(frozen=True)
class LoadSpec:
    url: str
    models: tuple[str, ...]  # popularity order: models[0] is Zipf rank 1
    prompts: tuple[str, ...]  # user messages
    options: LoadOptions = LoadOptions()

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("models: at least one model (adapter) to send requests to")
        if not self.prompts:
            raise ValueError("prompts: at least one prompt to send")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")


# ----- Zipf popularity --------------------------------------------------------------------------

def zipf_weights(n: int, exponent: float) -> list[float]:
    """P(rank k) ∝ 1 / k**exponent for k = 1..n, normalised; exponent 0 is uniform."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if exponent < 0:
        raise ValueError(f"zipf exponent must be >= 0, got {exponent}")
    raw = [1.0 / k**exponent for k in range(1, n + 1)]
    total = sum(raw)
    return [weight / total for weight in raw]


class ZipfSampler:
    """Draws ranks 0..n-1 (0 = most popular) from its own seeded generator."""

    def __init__(self, n: int, exponent: float, rng: random.Random) -> None:
        self._cumulative = list(itertools.accumulate(zipf_weights(n, exponent)))
        self._rng = rng

    def sample(self) -> int:
        # `min` guards the float sum ending a hair below 1.0
        return min(bisect.bisect_right(self._cumulative, self._rng.random()), len(self._cumulative) - 1)


# ----- one request --------------------------------------------------------------------------------

@dataclass
class RequestRecord:
    model: str
    prompt_index: int
    ok: bool
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    tokens: int = 0
    usage_reported: bool = False
    text: str = ""
    error: str | None = None


class _Rejected(Exception):
    """The server answered 429."""


def chat_body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}


async def stream_chat(client: httpx.AsyncClient, model: str, prompt: str, prompt_index: int,
                      max_tokens: int) -> RequestRecord:
    """One streaming chat completion, timed; raises `_Rejected` on 429 and records any other failure."""
    record = RequestRecord(model=model, prompt_index=prompt_index, ok=False)
    started = time.perf_counter()
    stamps: list[float] = []
    pieces: list[str] = []
    done = False
    try:
        async with client.stream("POST", CHAT_PATH, json=chat_body(model, prompt, max_tokens)) as response:
            if response.status_code == 429:
                await response.aread()
                raise _Rejected
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", errors="replace")
                record.error = f"HTTP {response.status_code}: {_error_message(body)}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    record.error = f"error event: {chunk['error'].get('message', chunk['error'])}"
                    continue
                if chunk.get("usage"):
                    record.tokens = int(chunk["usage"]["completion_tokens"])
                    record.usage_reported = True
                for choice in chunk.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        stamps.append(time.perf_counter())
                        pieces.append(content)
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        record.error = f"{type(error).__name__}: {error}"
        return record
    if record.error is None and not done:
        record.error = "the stream ended without [DONE]"
    if record.error is not None:
        return record
    record.ok = True
    record.text = "".join(pieces)
    record.ttft_s = stamps[0] - started if stamps else None
    record.itl_s = [later - earlier for earlier, later in itertools.pairwise(stamps)]
    if not record.usage_reported:
        record.tokens = len(stamps)
    return record


def _error_message(body: str) -> str:
    try:
        return str(json.loads(body)["error"]["message"])[:300]
    except (json.JSONDecodeError, KeyError, TypeError):
        return body[:300]


# ----- the closed loop ----------------------------------------------------------------------------

@dataclass
class LoadOutcome:
    records: list[RequestRecord]
    rejected_429: int
    abandoned: int
    elapsed_s: float


async def run_load(spec: LoadSpec, client: httpx.AsyncClient) -> LoadOutcome:
    """`options.concurrency` clients in a closed loop for `options.duration_s`, then a bounded drain."""
    options = spec.options
    records: list[RequestRecord] = []
    rejected = 0
    in_flight: set[int] = set()
    started = time.perf_counter()
    deadline = started + options.duration_s

    async def one_client(index: int) -> None:
        nonlocal rejected
        rng = random.Random(f"{options.seed}:{index}")
        sampler = ZipfSampler(len(spec.models), options.zipf, rng)
        while time.perf_counter() < deadline:
            model = spec.models[sampler.sample()]
            prompt_index = rng.randrange(len(spec.prompts))
            in_flight.add(index)
            try:
                while True:
                    try:
                        record = await stream_chat(client, model, spec.prompts[prompt_index], prompt_index,
                                                   options.max_tokens)
                        break
                    except _Rejected:
                        rejected += 1
                        if time.perf_counter() >= deadline:
                            return  # the run is over: give up on this request, it was never served
                        await asyncio.sleep(options.backoff_s * (1 + rng.random()))
                records.append(record)
            finally:
                in_flight.discard(index)

    tasks = [asyncio.create_task(one_client(index)) for index in range(options.concurrency)]
    await asyncio.wait(tasks, timeout=options.duration_s + options.drain_timeout_s)
    abandoned = len(in_flight)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:  # a bug in a client must not pass for a quiet run
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    return LoadOutcome(records=records, rejected_429=rejected, abandoned=abandoned,
                       elapsed_s=time.perf_counter() - started)


async def check_greedy(client: httpx.AsyncClient, spec: LoadSpec, records: Sequence[RequestRecord]) -> dict[str, Any]:
    """Re-send up to `spec.options.check` answered requests one at a time; greedy answers must not depend on
    what else shared the batch, so each must equal its answer under load."""
    seen: dict[tuple[str, int], RequestRecord] = {}
    for record in records:
        if record.ok:
            seen.setdefault((record.model, record.prompt_index), record)
    keys = sorted(seen)
    random.Random(spec.options.seed).shuffle(keys)
    mismatches = []
    checked = 0
    for model, prompt_index in keys[:spec.options.check]:
        again = await stream_chat(client, model, spec.prompts[prompt_index], prompt_index,
                                   spec.options.max_tokens)
        checked += 1
        if not again.ok or again.text != seen[(model, prompt_index)].text:
            mismatches.append({"model": model, "prompt_index": prompt_index,
                               "under_load": seen[(model, prompt_index)].text[:200],
                               "alone": again.text[:200] if again.ok else f"failed: {again.error}"})
    return {"checked": checked, "identical": checked - len(mismatches), "mismatches": mismatches[:ERROR_SAMPLES]}


# ----- the server's own figures -------------------------------------------------------------------

def parse_metrics(text: str) -> dict[str, float]:
    """`lorafleet_*` samples from a Prometheus page, summed over the per-adapter labels (`model`,
    `adapter`: 100 adapters would otherwise make the report unreadable); histogram buckets are left
    out. Unparsable text gives {}."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if not sample.name.startswith(METRIC_PREFIX) or sample.name.endswith(("_bucket", "_created")):
                    continue
                labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items())
                                  if key not in PER_ADAPTER_LABELS)
                key = f"{sample.name}{{{labels}}}" if labels else sample.name
                values[key] = values.get(key, 0.0) + float(sample.value)
    except ValueError:
        return {}
    return values


async def fetch_metrics(client: httpx.AsyncClient) -> dict[str, float] | None:
    try:
        response = await client.get("/metrics", timeout=30)
    except httpx.HTTPError:
        return None
    return parse_metrics(response.text) if response.status_code == 200 else None


def process_tree_rss_mb(pid: int | None) -> float | None:
    """Resident memory of `pid` and all its descendants (BentoML's arbiter and workers), in MiB."""
    if pid is None:
        return None
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass  # exited between listing and reading
    return total / 2**20


# ----- the report ---------------------------------------------------------------------------------

@dataclass
class ServingBenchReport:
    tokens_per_s: float
    requests_per_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    errors: int
    rejected_429: int
    concurrency: int
    n_adapters: int
    duration_s: float  # wall time of the run, drain included (the denominator of the rates)
    rss_mb_before: float | None
    rss_mb_after: float | None
    completed: int
    tokens_total: int
    per_adapter_requests: dict[str, int]
    abandoned: int
    url: str
    device: str | None
    requested_duration_s: float
    max_tokens: int
    zipf: float
    seed: int
    tokens_from: str  # "usage" (server-reported) or "chunks"
    error_samples: list[str]
    server_metrics: dict[str, float] | None  # after the run
    server_metrics_delta: dict[str, float] | None  # after - before
    check: dict[str, Any] | None
    hostile: dict[str, Any] | None = None  # `bench serving --hostile`: statuses per attack (hostile_load.py)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile_ms(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation, numpy's default) of seconds, in ms; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return 1000 * (ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def summarize(spec: LoadSpec, outcome: LoadOutcome, *, device: str | None, rss_before: float | None,
              rss_after: float | None, metrics_before: dict[str, float] | None,
              metrics_after: dict[str, float] | None, check: dict[str, Any] | None,
              hostile: HostileOutcome | None = None) -> ServingBenchReport:
    options = spec.options
    done = [record for record in outcome.records if record.ok]
    failed = [record for record in outcome.records if not record.ok]
    ttft = [record.ttft_s for record in done if record.ttft_s is not None]
    itl = [gap for record in done for gap in record.itl_s]
    tokens = sum(record.tokens for record in done)
    per_adapter = Counter(record.model for record in done)
    delta = None
    if metrics_before is not None and metrics_after is not None:
        delta = {key: value - metrics_before.get(key, 0.0) for key, value in metrics_after.items()
                 if value != metrics_before.get(key, 0.0)}
    elapsed = outcome.elapsed_s
    return ServingBenchReport(
        tokens_per_s=tokens / elapsed, requests_per_s=len(done) / elapsed,
        ttft_p50_ms=percentile_ms(ttft, 50), ttft_p99_ms=percentile_ms(ttft, 99),
        itl_p50_ms=percentile_ms(itl, 50), itl_p99_ms=percentile_ms(itl, 99),
        errors=len(failed), rejected_429=outcome.rejected_429, concurrency=options.concurrency,
        n_adapters=len(spec.models), duration_s=elapsed, rss_mb_before=rss_before, rss_mb_after=rss_after,
        completed=len(done), tokens_total=tokens,
        per_adapter_requests={model: per_adapter[model] for model in spec.models if per_adapter[model]},
        abandoned=outcome.abandoned, url=spec.url, device=device, requested_duration_s=options.duration_s,
        max_tokens=options.max_tokens, zipf=options.zipf, seed=options.seed,
        tokens_from="usage" if done and all(record.usage_reported for record in done) else "chunks",
        error_samples=sorted({record.error or "" for record in failed})[:ERROR_SAMPLES],
        server_metrics=metrics_after, server_metrics_delta=delta, check=check,
        hostile=None if hostile is None else hostile.to_dict())


async def measure_serving_async(spec: LoadSpec, *, server_pid: int | None = None, device: str | None = None,
                                hostile: HostileSpec | None = None) -> ServingBenchReport:
    """The load, and with `hostile` one more client attacking the server for the same duration."""
    connections = spec.options.concurrency + 6  # + /metrics, the check and the hostile client
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    timeout = httpx.Timeout(spec.options.request_timeout_s, connect=30.0)
    async with httpx.AsyncClient(base_url=spec.url, limits=limits, timeout=timeout) as client:
        metrics_before = await fetch_metrics(client)
        rss_before = process_tree_rss_mb(server_pid)
        attacks = None
        if hostile is not None:
            attacks = asyncio.create_task(run_hostile(hostile, client,
                                                      deadline=time.perf_counter() + spec.options.duration_s))
        outcome = await run_load(spec, client)
        hostile_outcome = await attacks if attacks is not None else None
        rss_after = process_tree_rss_mb(server_pid)
        metrics_after = await fetch_metrics(client)
        check = await check_greedy(client, spec, outcome.records) if spec.options.check else None
    return summarize(spec, outcome, device=device, rss_before=rss_before, rss_after=rss_after,
                     metrics_before=metrics_before, metrics_after=metrics_after, check=check,
                     hostile=hostile_outcome)


def measure_serving(spec: LoadSpec, *, server_pid: int | None = None, device: str | None = None,
                    hostile: HostileSpec | None = None) -> ServingBenchReport:
    """Run the load against `spec.url` and report (blocking; owns its event loop)."""
    return asyncio.run(measure_serving_async(spec, server_pid=server_pid, device=device, hostile=hostile))
