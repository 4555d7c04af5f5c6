"""lorafleet's own Prometheus metrics, exported next to BentoML's on `/metrics`.

BentoML 1.4 serves whatever `prometheus_client` collects; its workers set `PROMETHEUS_MULTIPROC_DIR`
only after importing the service module, so `prometheus_client` is imported here lazily, when the
service instance builds its metrics, never at module import.
"""

from __future__ import annotations

from typing import Any

REQUESTS = "lorafleet_requests"
GENERATED_TOKENS = "lorafleet_generated_tokens"
REQUEST_SECONDS = "lorafleet_request_duration_seconds"
BATCH_SIZE = "lorafleet_batch_size"
# vLLM's names (vllm:spec_decode_*) under our prefix: drafts = row-steps that verified drafted tokens.
SPEC_DRAFTS = "lorafleet_spec_decode_num_drafts"
SPEC_DRAFT_TOKENS = "lorafleet_spec_decode_num_draft_tokens"
SPEC_ACCEPTED_TOKENS = "lorafleet_spec_decode_num_accepted_tokens"


class ServingMetrics:
    """Requests by model/endpoint/status, generated tokens by model, latency by endpoint, batch sizes."""

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import REGISTRY, Counter, Histogram

        self.registry = REGISTRY if registry is None else registry
        self._engine_last = (0, 0, 0, 0)  # engine counters at the previous step: metrics take deltas
        registry = self.registry
        self.requests = Counter(
            REQUESTS,
            "OpenAI API requests by served model, endpoint and HTTP status",
            ["model", "endpoint", "status"],
            registry=registry,
        )
        self.generated_tokens = Counter(
            GENERATED_TOKENS, "completion tokens generated, by served model", ["model"], registry=registry
        )
        self.request_seconds = Histogram(
            REQUEST_SECONDS,
            "wall time of OpenAI API requests (until the last token is sent)",
            ["endpoint"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=registry,
        )
        self.batch_size = Histogram(
            BATCH_SIZE, "requests per generation batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=registry
        )
        self.spec_drafts = Counter(SPEC_DRAFTS, "speculative verification steps (per row)", registry=registry)
        self.spec_draft_tokens = Counter(SPEC_DRAFT_TOKENS, "tokens drafted by Turbo heads", registry=registry)
        self.spec_accepted_tokens = Counter(SPEC_ACCEPTED_TOKENS, "drafted tokens accepted by verification",
                                            registry=registry)

    def observe_speculative(self, drafts: int, draft_tokens: int, accepted: int) -> None:
        self.spec_drafts.inc(drafts)
        self.spec_draft_tokens.inc(draft_tokens)
        self.spec_accepted_tokens.inc(accepted)

    def observe(self, *, model: str, endpoint: str, status: int, tokens: int, seconds: float) -> None:
        self.requests.labels(model=model, endpoint=endpoint, status=str(status)).inc()
        if tokens:
            self.generated_tokens.labels(model=model).inc(tokens)
        self.request_seconds.labels(endpoint=endpoint).observe(seconds)

    def observe_batch(self, rows: int) -> None:
        self.batch_size.observe(rows)

    def observe_engine(self, engine: Any, outputs: list[Any]) -> None:
        """After every engine step (on its thread): batch size and speculative counters as deltas."""
        stats = engine.stats
        last = self._engine_last
        if stats.steps != last[0]:
            self.batch_size.observe(stats.last_batch_size)
        self.observe_speculative(stats.spec_drafts - last[1], stats.spec_draft_tokens - last[2],
                                 stats.spec_accepted_tokens - last[3])
        self._engine_last = (stats.steps, stats.spec_drafts, stats.spec_draft_tokens, stats.spec_accepted_tokens)
