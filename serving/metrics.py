"""lorafleet's own Prometheus metrics, exported next to BentoML's on `/metrics`.

BentoML 1.4 serves whatever `prometheus_client` collects; its workers set `PROMETHEUS_MULTIPROC_DIR`
only after importing the service module, so `prometheus_client` is imported here lazily, when the
service instance builds its metrics, never at module import. In that multiprocess mode a Gauge
needs a `multiprocess_mode`: "livemostrecent" reports the latest value a live worker set (the
default, "all", would add a `pid` label per worker and keep dead workers' values). A "mostrecent"
gauge is exported only once `set` (an untouched one has no timestamp), so the engine's gauges appear
from the first `observe_engine`, which the `EngineGenerator` makes at start-up.

Names follow vLLM's `vllm:*` metrics under our prefix where vLLM has one (`vllm:num_requests_running`
is `lorafleet_num_requests_running`). The engine core has no Prometheus import: after every pass of
the engine thread, `observe_engine` reads the engine's `EngineStats` and the adapter cache's counters
and publishes deltas, plus the per-request latencies the `EngineGenerator` measured (a `StepReport`).
That runs between forwards, so it does O(requests touched) work and no more.

`vllm:lora_requests_info` keeps vLLM's exact name and shape, because LoRA-affinity routers (the Gateway
API Inference Extension's endpoint picker, llm-d's scorers) read it from every replica to send a request
to a replica that already runs its adapter: labels `running_lora_adapters` and `waiting_lora_adapters`
(comma-separated adapter names with requests running / queued; base-model requests are not named) and
`max_lora` (adapters resident at once: the engine's slot count); the value is the wall-clock time at which
that label set was last the current one. As in vLLM, earlier label sets are not removed (in BentoML's
multiprocess mode prometheus_client cannot remove a series anyway): a reader takes the series with the
largest value, which is what those routers do. Names are the ones clients put in `model`, as /v1/models
lists them (`NAME` for a champion or local adapter, `NAME@VERSION` otherwise), through the
`name_adapters` mapping the backend installs; without it the engine's adapter names are shown.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import Any

REQUESTS = "lorafleet_requests"
GENERATED_TOKENS = "lorafleet_generated_tokens"
REQUEST_SECONDS = "lorafleet_request_duration_seconds"
BATCH_SIZE = "lorafleet_batch_size"
# vLLM's names (vllm:spec_decode_*) under our prefix: drafts = row-steps that verified drafted tokens.
SPEC_DRAFTS = "lorafleet_spec_decode_num_drafts"
SPEC_DRAFT_TOKENS = "lorafleet_spec_decode_num_draft_tokens"
SPEC_ACCEPTED_TOKENS = "lorafleet_spec_decode_num_accepted_tokens"
SPEC_MEAN_ACCEPTANCE = "lorafleet_spec_decode_mean_acceptance_length"
SPEC_DECISIONS = "lorafleet_spec_decode_decisions"  # counter: steps with heads that drafted (on) or not (off)
SPEC_TAU = "lorafleet_spec_decode_tau"  # gauge per adapter: the speculation policy's running tau
# The engine (vLLM's names).
RUNNING = "lorafleet_num_requests_running"
WAITING = "lorafleet_num_requests_waiting"
KV_USAGE = "lorafleet_kv_cache_usage_perc"
PROMPT_TOKENS = "lorafleet_prompt_tokens"
GENERATION_TOKENS = "lorafleet_generation_tokens"
REQUEST_SUCCESS = "lorafleet_request_success"
TTFT = "lorafleet_time_to_first_token_seconds"
ITL = "lorafleet_inter_token_latency_seconds"
E2E = "lorafleet_e2e_request_latency_seconds"
PREEMPTIONS = "lorafleet_num_preemptions"
PREFIX_QUERIES = "lorafleet_prefix_cache_queries"
PREFIX_HITS = "lorafleet_prefix_cache_hits"
# The adapter cache (no vLLM equivalent).
CACHE_HITS = "lorafleet_adapter_cache_hits"
CACHE_MISSES = "lorafleet_adapter_cache_misses"
CACHE_LOADS = "lorafleet_adapter_cache_loads"
CACHE_EVICTIONS = "lorafleet_adapter_cache_evictions"
CACHE_FAILURES = "lorafleet_adapter_cache_failures"
CACHE_LOAD_SECONDS = "lorafleet_adapter_load_seconds"
CACHE_RESIDENT = "lorafleet_adapter_cache_resident"
CACHE_SLOTS = "lorafleet_adapter_cache_slots"
# Read by LoRA-affinity routers: vLLM's name and labels, unprefixed on purpose.
LORA_INFO = "vllm:lora_requests_info"
LORA_RUNNING_LABEL = "running_lora_adapters"
LORA_WAITING_LABEL = "waiting_lora_adapters"
LORA_MAX_LABEL = "max_lora"

# A/B experiments, per arm (serving/experiments.py): the experiment is the adapter name.
EXPERIMENT_REQUESTS = "lorafleet_experiment_requests"
EXPERIMENT_TOKENS = "lorafleet_experiment_generated_tokens"
EXPERIMENT_SECONDS = "lorafleet_experiment_request_duration_seconds"
EXPERIMENT_FEEDBACK = "lorafleet_experiment_feedback_score"
EXPERIMENT_SPEC_TAU = "lorafleet_experiment_spec_decode_tau"  # the arm's adapter's running tau

BASE_LABEL = "base"  # the `adapter` label of requests on the bare base model (served adapters are NAME-vN)
_GAUGE_MODE = "livemostrecent"
_CACHE_COUNTERS = ("hits", "misses", "loads", "evictions", "failures")

# Seconds; small buckets first because the tiny test model and short prompts answer in milliseconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 7.5, 10.0, 20.0)
E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)
LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServingMetrics:
    """The service's metrics: HTTP requests, the engine's queue/batch/KV/latency, speculation, adapters."""

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Summary

        self.registry = REGISTRY if registry is None else registry
        registry = self.registry

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
            return Counter(name, doc, list(labels), registry=registry)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
            return Gauge(name, doc, list(labels), registry=registry, multiprocess_mode=_GAUGE_MODE)

        def histogram(name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()) -> Any:
            return Histogram(name, doc, list(labels), buckets=buckets, registry=registry)

        # HTTP side (both generators).
        self.requests = counter(REQUESTS, "OpenAI API requests by served model, endpoint and HTTP status",
                                ("model", "endpoint", "status"))
        self.generated_tokens = counter(GENERATED_TOKENS, "completion tokens sent, by served model", ("model",))
        self.request_seconds = histogram(REQUEST_SECONDS,
                                         "wall time of OpenAI API requests (until the last token is sent)",
                                         (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), ("endpoint",))
        self.experiment_requests = counter(EXPERIMENT_REQUESTS, "requests of A/B experiments by experiment, arm, "
                                           "served version and HTTP status", ("experiment", "arm", "version",
                                                                             "status"))
        self.experiment_tokens = counter(EXPERIMENT_TOKENS, "completion tokens of A/B experiment requests",
                                         ("experiment", "arm"))
        self.experiment_seconds = histogram(EXPERIMENT_SECONDS, "wall time of A/B experiment requests", E2E_BUCKETS,
                                            ("experiment", "arm"))
        self.experiment_feedback = Summary(EXPERIMENT_FEEDBACK, "online scores posted to /v1/feedback, by arm "
                                           "(_sum / _count is the arm's mean)", ["experiment", "arm"],
                                           registry=registry)
        self.experiment_spec_tau = gauge(EXPERIMENT_SPEC_TAU, "the speculation policy's running tau of the adapter "
                                         "serving each A/B arm (1 + accepted drafts per verification)",
                                         ("experiment", "arm"))
        self._arm_of_adapter: dict[str, tuple[str, str]] = {}  # engine adapter -> (experiment, arm) serving it
        self.batch_size = histogram(BATCH_SIZE, "requests per generation batch (engine: per step)",
                                    (1, 2, 4, 8, 16, 32, 64))
        self.spec_drafts = counter(SPEC_DRAFTS, "speculative verification steps (per row)")
        self.spec_draft_tokens = counter(SPEC_DRAFT_TOKENS, "tokens drafted by Turbo heads")
        self.spec_accepted_tokens = counter(SPEC_ACCEPTED_TOKENS, "drafted tokens accepted by verification")
        # The engine.
        self.spec_mean_acceptance = gauge(SPEC_MEAN_ACCEPTANCE, "tokens per drafting row-step since start: "
                                          "1 + accepted / drafts (0 before any draft)")
        self.spec_decisions = counter(SPEC_DECISIONS, "engine steps with Turbo heads live, by the speculation "
                                      "policy's decision (on: they drafted)", ("decision",))
        self.spec_tau = gauge(SPEC_TAU, "the speculation policy's running tau (1 + accepted drafts per "
                              "verification, moving average) by engine adapter", ("adapter",))
        self.running = gauge(RUNNING, "requests in the engine's running batch")
        self.waiting = gauge(WAITING, "requests queued in the engine (incl. those waiting for their adapter)")
        self.kv_usage = gauge(KV_USAGE, "fraction of KV-cache blocks in use (0-1)")
        self.prompt_tokens = counter(PROMPT_TOKENS, "prompt tokens of requests whose prefill finished, "
                                     "by engine adapter", ("adapter",))
        self.generation_tokens = counter(GENERATION_TOKENS, "tokens generated by the engine, by engine adapter",
                                         ("adapter",))
        self.request_success = counter(REQUEST_SUCCESS, "requests the engine finished, by engine adapter and "
                                       "finished_reason (stop, length, abort, error)",
                                       ("adapter", "finished_reason"))
        self.ttft = histogram(TTFT, "seconds from submit to the request's first token", TTFT_BUCKETS)
        self.itl = histogram(ITL, "seconds between consecutive tokens of a request (a step delivering k "
                             "tokens counts k intervals of gap / k)", ITL_BUCKETS)
        self.e2e = histogram(E2E, "seconds from submit to the last token, requests finished by stop or length",
                             E2E_BUCKETS)
        self.preemptions = counter(PREEMPTIONS, "running requests preempted (KV blocks freed, recomputed later)")
        self.prefix_queries = counter(PREFIX_QUERIES, "tokens of admitted requests looked up in the prefix cache")
        self.prefix_hits = counter(PREFIX_HITS, "of those, tokens whose K/V the prefix cache already held")
        self._prefix_last = (0, 0)
        # The adapter cache.
        self.cache_counters = {
            "hits": counter(CACHE_HITS, "adapter requests that found it resident"),
            "misses": counter(CACHE_MISSES, "adapter requests that started a load"),
            "loads": counter(CACHE_LOADS, "adapters installed into slots (first loads and reloads)"),
            "evictions": counter(CACHE_EVICTIONS, "resident adapters evicted (LRU) to make room"),
            "failures": counter(CACHE_FAILURES, "adapter reads or installs that failed"),
        }
        self.cache_load_seconds = histogram(CACHE_LOAD_SECONDS, "seconds to read an installed adapter from disk",
                                            LOAD_BUCKETS)
        self.cache_resident = gauge(CACHE_RESIDENT, "adapters resident in the cache")
        self.cache_slots = gauge(CACHE_SLOTS, "LoRA slots of the adapter cache (its capacity)")
        self.lora_info = Gauge(LORA_INFO, "Running stats on lora requests: the time this label set was last "
                               "current (vLLM's gauge, read by LoRA-affinity routers)",
                               [LORA_MAX_LABEL, LORA_WAITING_LABEL, LORA_RUNNING_LABEL], registry=registry,
                               multiprocess_mode=_GAUGE_MODE)
        self._served_names: Callable[[Collection[str]], dict[str, str]] | None = None
        # Counters at the previous engine pass: the engine and the cache keep totals, metrics take deltas.
        self._engine_last: tuple[int, ...] | None = None  # steps, drafts, draft tokens, accepted, preemptions
        self._decisions_last = (0, 0)  # speculation policy decisions (on, off) already counted
        self._cache_last = dict.fromkeys(_CACHE_COUNTERS, 0)
        self._slots = -1

    # ----- HTTP side and the PEFT runner ------------------------------------------------------------
    def observe_speculative(self, drafts: int, draft_tokens: int, accepted: int) -> None:
        if drafts:
            self.spec_drafts.inc(drafts)
        if draft_tokens:
            self.spec_draft_tokens.inc(draft_tokens)
        if accepted:
            self.spec_accepted_tokens.inc(accepted)

    def observe(self, *, model: str, endpoint: str, status: int, tokens: int, seconds: float) -> None:
        self.requests.labels(model=model, endpoint=endpoint, status=str(status)).inc()
        if tokens:
            self.generated_tokens.labels(model=model).inc(tokens)
        self.request_seconds.labels(endpoint=endpoint).observe(seconds)

    def observe_arm(self, *, experiment: str, arm: str, version: int | None, status: int, tokens: int,
                    seconds: float, adapter: str | None = None) -> None:
        if adapter is not None:  # the engine reports tau by adapter: remember which arm this one serves
            self._arm_of_adapter[adapter] = (experiment, arm)
        self.experiment_requests.labels(experiment=experiment, arm=arm, version=str(version or ""),
                                        status=str(status)).inc()
        if tokens:
            self.experiment_tokens.labels(experiment=experiment, arm=arm).inc(tokens)
        if status == 200:
            self.experiment_seconds.labels(experiment=experiment, arm=arm).observe(seconds)

    def observe_feedback(self, *, experiment: str, arm: str, score: float) -> None:
        self.experiment_feedback.labels(experiment=experiment, arm=arm).observe(score)

    def observe_batch(self, rows: int) -> None:
        self.batch_size.observe(rows)

    # ----- the engine -----------------------------------------------------------------------------
    def name_adapters(self, served_names: Callable[[Collection[str]], dict[str, str]]) -> None:
        """How `vllm:lora_requests_info` names engine adapters (`alpha-v3`): `served_names` maps a batch of
        them to the `model` names clients send (`alpha`); a name it leaves out is shown as it is."""
        self._served_names = served_names

    def observe_engine(self, report: Any) -> None:
        """After a pass of the engine thread (an `EngineGenerator.StepReport`), on that thread."""
        engine = report.engine
        # First: a scrape that sees the running/waiting gauges of this pass sees its adapters too.
        self._observe_lora_info(engine, report.cache.slots.num_slots)
        self._observe_engine_counters(engine.stats)
        self.running.set(engine.num_running())
        self.waiting.set(engine.num_waiting())
        allocator = engine.allocator
        self.kv_usage.set(1.0 - allocator.num_free() / allocator.num_blocks)
        prefix = (engine.scheduler.prefix_query_tokens, engine.scheduler.prefix_hit_tokens)
        if prefix != self._prefix_last:
            self.prefix_queries.inc(prefix[0] - self._prefix_last[0])
            self.prefix_hits.inc(prefix[1] - self._prefix_last[1])
            self._prefix_last = prefix
        self._observe_requests(report)
        self._observe_cache(report.cache)

    def _observe_lora_info(self, engine: Any, max_lora: int) -> None:
        """vLLM's `vllm:lora_requests_info`: this pass's adapters, stamped with the current time."""
        scheduler = engine.scheduler
        running = {seq.adapter for seq in scheduler.running if seq.adapter is not None}
        waiting = {seq.adapter for seq in scheduler.waiting if seq.adapter is not None}
        names = self._served_names(running | waiting) if self._served_names and (running or waiting) else {}

        def joined(adapters: set[str]) -> str:  # sorted: one label set per combination, not per order
            return ",".join(sorted({names.get(adapter, adapter) for adapter in adapters}))

        self.lora_info.labels(**{LORA_MAX_LABEL: str(max_lora), LORA_WAITING_LABEL: joined(waiting),
                                 LORA_RUNNING_LABEL: joined(running)}).set(time.time())

    def _observe_engine_counters(self, stats: Any) -> None:
        current = (stats.steps, stats.spec_drafts, stats.spec_draft_tokens, stats.spec_accepted_tokens,
                   stats.preemptions)
        if self._engine_last is None:  # the first report: publish the gauge even before any draft
            self.spec_mean_acceptance.set(stats.mean_acceptance_length)
            self._engine_last = (0, 0, 0, 0, 0)
        last = self._engine_last
        if current == last:
            return
        if stats.steps != last[0]:
            self.batch_size.observe(stats.last_batch_size)
        self.observe_speculative(current[1] - last[1], current[2] - last[2], current[3] - last[3])
        if current[1] != last[1]:
            self.spec_mean_acceptance.set(stats.mean_acceptance_length)
        if current[4] != last[4]:
            self.preemptions.inc(current[4] - last[4])
        self._engine_last = current
        self._observe_spec_policy(stats)

    def _observe_spec_policy(self, stats: Any) -> None:
        decisions = (stats.spec_decisions_on, stats.spec_decisions_off)
        last = self._decisions_last
        if decisions[0] != last[0]:
            self.spec_decisions.labels(decision="on").inc(decisions[0] - last[0])
        if decisions[1] != last[1]:
            self.spec_decisions.labels(decision="off").inc(decisions[1] - last[1])
        self._decisions_last = decisions
        for adapter, tau in dict(stats.spec_tau_by_adapter).items():
            self.spec_tau.labels(adapter=adapter or BASE_LABEL).set(tau)
            arm = self._arm_of_adapter.get(adapter)
            if arm is not None:
                self.experiment_spec_tau.labels(experiment=arm[0], arm=arm[1]).set(tau)

    def _observe_requests(self, report: Any) -> None:
        for seconds in report.ttft_s:
            self.ttft.observe(seconds)
        for seconds, count in report.itl_s:
            for _ in range(count):  # k <= 1 + drafts per row: a handful
                self.itl.observe(seconds)
        for adapter, tokens in report.prompt_tokens.items():
            self.prompt_tokens.labels(adapter=adapter or BASE_LABEL).inc(tokens)
        for adapter, tokens in report.generation_tokens.items():
            self.generation_tokens.labels(adapter=adapter or BASE_LABEL).inc(tokens)
        for adapter, reason, seconds in report.finished:
            self.request_success.labels(adapter=adapter or BASE_LABEL, finished_reason=reason).inc()
            if reason in ("stop", "length"):
                self.e2e.observe(seconds)

    def _observe_cache(self, cache: Any) -> None:
        last = self._cache_last
        stats = cache.stats_since(last["loads"])
        for name in _CACHE_COUNTERS:
            value = getattr(stats, name)
            if value != last[name]:
                self.cache_counters[name].inc(value - last[name])
                last[name] = value
        for ms in stats.load_ms:
            self.cache_load_seconds.observe(ms / 1000.0)
        self.cache_resident.set(stats.resident)
        if cache.slots.num_slots != self._slots:
            self._slots = cache.slots.num_slots
            self.cache_slots.set(self._slots)
