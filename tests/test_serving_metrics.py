"""The engine's Prometheus metrics in-process (~15 s): a real `EngineGenerator` on the tiny random Llama,
real LoRA/Turbo adapter folders, feeding `ServingMetrics` on a private `CollectorRegistry`. The last test
starts a real `bentoml serve` over a SQLite MLflow registry (~30 s) for vLLM's `vllm:lora_requests_info`,
which LoRA-affinity routers scrape.

No stop token is configured, so every request generates exactly `max_tokens` tokens and the expected
counts are known. Latency histograms are checked by their counts and by an exact invariant (for a
request that runs to its length limit, e2e = TTFT + the sum of its inter-token latencies), never by
wall-clock values. The real-server side (multiprocess gauges, disconnects) is test_serving_disconnect.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from lorafleet.models.base import load_base_model
from lorafleet.serving.engine.config import EngineConfig
from lorafleet.serving.generation.engine_generator import EngineGenerator, StepReport
from lorafleet.serving.generation.interface import GenerationRequest, SamplingParams, TokenStream
from lorafleet.serving.launcher import start_server
from lorafleet.serving.metrics import BASE_LABEL, ServingMetrics
from lorafleet.settings import Settings

from serving_helpers import BASE, add_heads, make_adapter, register_adapter

PROMPTS = [(5, 17, 42, 8, 99), (3, 3, 7), (120, 64, 2, 11, 19, 23, 31, 77, 6), (9,), (44, 45, 46, 47)]
DEADLINE_S = 60.0  # generous bound on waiting for the engine thread; never a timing assertion
ATTEMPTS = 3  # a real-server check that a starved test process can miss is repeated, never loosened


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("metrics-adapters")
    dirs = {f"a{i}": make_adapter(model_cache, root / f"a{i}", name=f"a{i}", seed=i) for i in range(3)}
    dirs["turbo"] = add_heads(make_adapter(model_cache, root / "turbo", name="turbo", seed=7), model_cache,
                              seed=3, num_heads=3)
    return dirs


@pytest.fixture(scope="module")
def hf_model(model_cache: Path):
    return load_base_model(BASE, model_cache).model


class Served:
    """A generator wired to its own metrics, closed by the fixture."""

    def __init__(self, hf_model, dirs: dict[str, Path], names: list[str],
                 record: Callable[[StepReport, ServingMetrics], None] | None = None, **config) -> None:
        self.metrics = ServingMetrics(CollectorRegistry())

        def on_step(report: StepReport) -> None:
            self.metrics.observe_engine(report)
            if record is not None:
                record(report, self.metrics)

        settings = EngineConfig(**{"kv_cache_mb": 4, "adapter_slots": 2, "max_lora_rank": 8, **config})
        self.generator = EngineGenerator(hf_model, settings, eos_token_ids=frozenset(), on_step=on_step)
        for name in names:
            self.generator.load(name, dirs[name])

    def value(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def submit(self, adapter: str | None, prompt: tuple[int, ...], max_tokens: int) -> TokenStream:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        return self.generator.submit(GenerationRequest(prompt, params, adapter))

    async def generate(self, adapter: str | None, prompt: tuple[int, ...], max_tokens: int) -> list[int]:
        return [token async for token in self.submit(adapter, prompt, max_tokens)]


@pytest.fixture
def serve(hf_model, adapter_dirs):
    made: list[Served] = []

    def build(names: list[str], **kwargs) -> Served:
        made.append(Served(hf_model, adapter_dirs, names, **kwargs))
        return made[-1]

    yield build
    for served in made:
        served.generator.close()


def assert_idle(served: Served) -> None:
    """Gauges after the last request finished: nothing running, queued or holding KV blocks."""
    gauges = {name: served.value(name) for name in
              ("lorafleet_num_requests_running", "lorafleet_num_requests_waiting", "lorafleet_kv_cache_usage_perc")}
    assert gauges == dict.fromkeys(gauges, 0.0)


def test_tokens_requests_and_latencies_match_what_was_generated(serve):
    served = serve(["a0", "a1"])
    jobs = [("a0", PROMPTS[0], 12), ("a1", PROMPTS[1], 7), (None, PROMPTS[2], 9), ("a0", PROMPTS[3], 5)]

    async def together():
        return await asyncio.gather(*(served.generate(*job) for job in jobs))

    outputs = asyncio.run(together())
    assert [len(tokens) for tokens in outputs] == [n for *_, n in jobs]
    for adapter in ("a0", "a1", None):
        label = adapter or BASE_LABEL
        mine = [i for i, job in enumerate(jobs) if job[0] == adapter]
        assert served.value("lorafleet_generation_tokens_total", adapter=label) == sum(len(outputs[i]) for i in mine)
        assert served.value("lorafleet_prompt_tokens_total", adapter=label) == sum(len(jobs[i][1]) for i in mine)
        assert served.value("lorafleet_request_success_total", adapter=label, finished_reason="length") == len(mine)
    requests, tokens = len(jobs), sum(len(tokens) for tokens in outputs)
    assert served.value("lorafleet_time_to_first_token_seconds_count") == requests
    assert served.value("lorafleet_inter_token_latency_seconds_count") == tokens - requests
    assert served.value("lorafleet_e2e_request_latency_seconds_count") == requests
    ttft, itl, e2e = (served.value(f"lorafleet_{name}_seconds_sum")
                      for name in ("time_to_first_token", "inter_token_latency", "e2e_request_latency"))
    assert ttft > 0 and e2e == pytest.approx(ttft + itl, rel=1e-9, abs=1e-9)
    assert served.value("lorafleet_batch_size_count") == served.generator.engine.stats.steps
    assert_idle(served)


def test_adapter_cache_metrics_for_three_adapters_through_two_slots(serve):
    served = serve(["a0", "a1", "a2"], adapter_slots=2)
    for adapter in ("a0", "a1", "a2", "a0"):  # one at a time: every adapter must become resident
        assert len(asyncio.run(served.generate(adapter, PROMPTS[0], 3))) == 3
    stats = served.generator.cache.stats
    for name in ("hits", "misses", "loads", "evictions", "failures"):
        assert served.value(f"lorafleet_adapter_cache_{name}_total") == getattr(stats, name), name
    assert stats.misses >= 3 and stats.loads >= 3 and stats.failures == 0
    # Nothing was unloaded: whatever was installed beyond the two slots was evicted.
    assert stats.evictions == stats.loads - 2 >= 1
    assert served.value("lorafleet_adapter_load_seconds_count") == stats.loads
    assert served.value("lorafleet_adapter_cache_resident") == 2 == len(served.generator.cache.resident())
    assert served.value("lorafleet_adapter_cache_slots") == 2
    # Three warm-ups and four requests, each counted at most once as a hit or a miss (one that finds its
    # adapter still loading is neither), never once per engine step it waits.
    assert stats.hits >= 1 and stats.misses >= 3 and stats.hits + stats.misses <= 7
    # An admin unload on an idle engine shows up too: idle passes of the engine thread report.
    assert served.generator.unload(served.generator.cache.resident()[0])
    deadline = time.monotonic() + DEADLINE_S
    while served.value("lorafleet_adapter_cache_resident") != 1:
        assert time.monotonic() < deadline, "the resident gauge never followed the unload"
        time.sleep(0.05)


def test_waiting_and_running_gauges_while_requests_queue(serve):
    seen: list[tuple[float, float, float]] = []

    def record(report: StepReport, metrics: ServingMetrics) -> None:
        names = ("lorafleet_num_requests_running", "lorafleet_num_requests_waiting", "lorafleet_kv_cache_usage_perc")
        seen.append(tuple(metrics.registry.get_sample_value(name) for name in names))

    served = serve([], record=record, max_num_seqs=1)

    async def queued():
        # Submitted back to back, so the second and third wait while the first (40 tokens) runs.
        streams = [served.submit(None, prompt, 40) for prompt in PROMPTS[:3]]
        return [[token async for token in stream] for stream in streams]

    assert [len(tokens) for tokens in asyncio.run(queued())] == [40, 40, 40]
    assert max(running for running, _, _ in seen) == 1, "max_num_seqs=1: one request runs at a time"
    assert max(waiting for _, waiting, _ in seen) == 2, "two requests waited behind the first"
    assert max(kv for _, _, kv in seen) > 0
    assert seen[-1] == (0.0, 0.0, 0.0)
    assert_idle(served)


def test_preemptions_are_counted_and_prompt_tokens_once_per_request(serve, hf_model):
    config = hf_model.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4  # fp32 K+V
    tight_mb = 12 * 4 * per_token / 2**20  # 12 blocks of 4 tokens: four 30-token requests cannot fit
    served = serve([], kv_cache_mb=tight_mb, block_size=4, max_num_seqs=4)

    async def together():
        return await asyncio.gather(*(served.generate(None, prompt, 24) for prompt in PROMPTS[:4]))

    outputs = asyncio.run(together())
    engine = served.generator.engine
    assert engine.stats.preemptions > 0
    assert served.value("lorafleet_num_preemptions_total") == engine.stats.preemptions
    # A preempted request is recomputed from its prompt; the metric still counts each prompt once.
    prompts = sum(len(prompt) for prompt in PROMPTS[:4])
    assert served.value("lorafleet_prompt_tokens_total", adapter=BASE_LABEL) == prompts
    assert served.value("lorafleet_inter_token_latency_seconds_count") == sum(len(o) - 1 for o in outputs)
    assert_idle(served)


def test_a_cancelled_stream_is_counted_as_aborted_and_frees_its_blocks(serve):
    served = serve([])

    async def cancel_early() -> int:
        stream = served.submit(None, PROMPTS[0], 2000)
        got = 0
        async for _ in stream:
            got += 1
            if got == 3:
                stream.cancel()
        return got

    assert asyncio.run(cancel_early()) == 3
    deadline = time.monotonic() + DEADLINE_S
    while served.value("lorafleet_request_success_total", adapter=BASE_LABEL, finished_reason="abort") < 1:
        assert time.monotonic() < deadline, "the engine thread never reported the abort"
        time.sleep(0.01)
    assert_idle(served)
    allocator = served.generator.engine.allocator
    assert allocator.num_free() == allocator.num_blocks
    assert served.value("lorafleet_e2e_request_latency_seconds_count") == 0, "aborts are not latencies"
    assert served.value("lorafleet_time_to_first_token_seconds_count") == 1


def test_speculative_metrics_with_a_turbo_adapter(serve):
    deliveries: list[int] = []

    def record(report: StepReport, metrics: ServingMetrics) -> None:
        deliveries.extend(len(output.new_token_ids) for output in report.outputs if output.new_token_ids)

    served = serve(["turbo"], record=record, speculation="on")  # "adaptive" would stop for random heads
    tokens = asyncio.run(served.generate("turbo", PROMPTS[0], 40))
    stats = served.generator.engine.stats
    assert stats.spec_drafts > 0 and stats.spec_accepted_tokens > 0, "the random heads accept some drafts here"
    # every step with the heads live was a decision, published by decision; tau by engine adapter
    assert stats.spec_decisions_on > 0 and stats.spec_decisions_off == 0
    assert served.value("lorafleet_spec_decode_decisions_total", decision="on") == stats.spec_decisions_on
    assert served.value("lorafleet_spec_decode_tau", adapter="turbo") == pytest.approx(
        stats.spec_tau_by_adapter["turbo"]) and stats.spec_tau_by_adapter["turbo"] >= 1.0
    assert served.value("lorafleet_spec_decode_num_drafts_total") == stats.spec_drafts
    assert served.value("lorafleet_spec_decode_num_draft_tokens_total") == stats.spec_draft_tokens
    assert served.value("lorafleet_spec_decode_num_accepted_tokens_total") == stats.spec_accepted_tokens
    assert served.value("lorafleet_spec_decode_mean_acceptance_length") == pytest.approx(
        1 + stats.spec_accepted_tokens / stats.spec_drafts)
    # Steps delivered several tokens at once, yet every token after the first has its own interval.
    assert len(tokens) == 40 and len(deliveries) < 40 and sum(deliveries) == 40
    assert served.value("lorafleet_inter_token_latency_seconds_count") == 39
    assert served.value("lorafleet_generation_tokens_total", adapter="turbo") == 40


def test_an_ab_arms_speculation_tau_is_published_per_arm(serve):
    """Per-arm speculative acceptance: the arm's adapter's running tau, under the experiment's labels."""
    served = serve(["turbo"], speculation="on")
    served.metrics.observe_arm(experiment="turbo", arm="challenger", version=2, status=200, tokens=3, seconds=0.1,
                               adapter="turbo")
    asyncio.run(served.generate("turbo", PROMPTS[0], 20))
    tau = served.generator.engine.stats.spec_tau_by_adapter["turbo"]
    assert served.value("lorafleet_experiment_spec_decode_tau", experiment="turbo", arm="challenger") == \
        pytest.approx(tau) and tau >= 1.0
    assert served.value("lorafleet_experiment_requests_total", experiment="turbo", arm="challenger", version="2",
                        status="200") == 1


def test_prefix_cache_queries_and_hits_are_counted_in_tokens(serve):
    served = serve(["a0"], block_size=4)
    prompt = tuple(range(10, 30))  # 20 tokens: 4 full blocks can be reused (one token is always fed)

    async def twice(adapter):
        first = await served.generate(adapter, prompt, 3)
        return first, await served.generate(adapter, prompt, 3)

    first, again = asyncio.run(twice(None))
    assert first == again
    engine = served.generator.engine
    deadline = time.monotonic() + DEADLINE_S
    while served.value("lorafleet_prefix_cache_queries_total") < 2 * len(prompt):
        assert time.monotonic() < deadline, "the engine thread never reported the second prefill"
        time.sleep(0.01)
    assert served.value("lorafleet_prefix_cache_hits_total") == engine.scheduler.prefix_hit_tokens == 16
    asyncio.run(twice("a0"))  # same tokens under an adapter: its first request cannot reuse the base's K/V
    while served.value("lorafleet_prefix_cache_queries_total") < 4 * len(prompt):
        assert time.monotonic() < deadline, "the engine thread never reported the adapter's prefills"
        time.sleep(0.01)
    assert served.value("lorafleet_prefix_cache_hits_total") == 32


# ----- vLLM's `vllm:lora_requests_info`, read by LoRA-affinity routers ------------------------------


def lora_series(registry) -> dict[tuple[str, str, str], float]:
    """(running, waiting, max_lora) -> value of every `vllm:lora_requests_info` series."""
    return {
        (s.labels["running_lora_adapters"], s.labels["waiting_lora_adapters"], s.labels["max_lora"]): s.value
        for family in registry.collect() if family.name == "vllm:lora_requests_info"
        for s in family.samples
    }


def latest(series: dict[tuple[str, str, str], float]) -> tuple[str, str, str]:
    """What a router reads: the label set with the largest value (the time it was last current)."""
    return max(series, key=series.__getitem__)


def test_lora_requests_info_names_running_and_waiting_adapters_not_the_base(serve):
    seen: list[tuple[tuple[str, str, str], tuple[str, str, str]]] = []  # (what a router reads, the engine's truth)
    shown = {"a0": "alpha"}  # the backend maps engine names to what clients request; others are shown as they are

    def record(report: StepReport, metrics: ServingMetrics) -> None:
        scheduler = report.engine.scheduler

        def names(seqs) -> str:
            return ",".join(sorted({shown.get(seq.adapter, seq.adapter) for seq in seqs if seq.adapter}))

        seen.append((latest(lora_series(metrics.registry)), (names(scheduler.running), names(scheduler.waiting), "3")))

    started = time.time()
    served = serve(["a0", "a1"], record=record, max_num_seqs=1, adapter_slots=3)
    served.metrics.name_adapters(lambda adapters: {name: shown[name] for name in adapters if name in shown})
    for name in ("a0", "a1"):  # resident first, so that first come is first served: a0, the base, a1
        served.generator.warm(name)

    async def queued():
        streams = [served.submit(adapter, PROMPTS[0], 30) for adapter in ("a0", None, "a1")]
        return [[token async for token in stream] for stream in streams]

    assert [len(tokens) for tokens in asyncio.run(queued())] == [30, 30, 30]
    mismatched = [(read, truth) for read, truth in seen if read != truth]
    assert not mismatched, f"the newest label set is not the engine's state: {mismatched[:3]}"
    states = [truth for _, truth in seen]
    assert ("alpha", "a1", "3") in states, "a0 (shown as alpha) runs while a1 (and the unnamed base) wait"
    assert ("", "a1", "3") in states, "the base request runs: no adapter named"
    assert ("a1", "", "3") in states
    assert states[-1] == ("", "", "3"), "idle: the newest label set names nothing"
    series = lora_series(served.metrics.registry)
    assert set(states) <= set(series), "earlier label sets stay, with older timestamps, as in vLLM"
    assert started <= max(series.values()) <= time.time(), "the value is the wall-clock time it was current"


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory: pytest.TempPathFactory, model_cache: Path):
    """A real server with one champion, `alpha`; one request runs at a time, so the next one queues."""
    from mlflow import MlflowClient

    settings = Settings.for_home(tmp_path_factory.mktemp("lora-info") / "home", model_cache_dir=model_cache).ensure()
    client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
    adapter = make_adapter(model_cache, settings.home / "src" / "alpha", name="alpha", seed=1)
    register_adapter(client, adapter, name="alpha", artifact_root=settings.mlflow_artifacts_dir)
    env = {"LORAFLEET_SERVE_MAX_NUM_SEQS": "1", "LORAFLEET_SERVE_ADAPTER_SLOTS": "2",
           "LORAFLEET_SERVE_KV_CACHE_MB": "16", "HF_HUB_OFFLINE": "1"}
    with start_server(settings, env=env) as handle:
        yield handle


def scrape_lora(url: str) -> tuple[dict[tuple[str, str, str], float], float, float]:
    """Every `vllm:lora_requests_info` series of a real server's /metrics, and its running/waiting gauges."""
    text = httpx.get(f"{url}/metrics", timeout=60).text
    series, gauges = {}, {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "vllm:lora_requests_info":
                series[(s.labels["running_lora_adapters"], s.labels["waiting_lora_adapters"],
                        s.labels["max_lora"])] = s.value
            elif s.name in ("lorafleet_num_requests_running", "lorafleet_num_requests_waiting"):
                gauges[s.name] = s.value
    return series, gauges.get("lorafleet_num_requests_running", 0.0), gauges.get("lorafleet_num_requests_waiting", 0.0)


class LongChat(threading.Thread):
    """A streamed chat of ~1900 tokens (about a second here) that hangs up when `stop` is set."""

    def __init__(self, url: str, model: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url, self.model, self.stop, self.finished = url, model, stop, False

    def run(self) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1900,
                "temperature": 0, "stream": True}
        with httpx.Client(timeout=120) as client, client.stream("POST", f"{self.url}/v1/chat/completions",
                                                                 json=body) as response:
            for line in response.iter_lines():
                if self.stop.is_set():
                    return  # leaving closes the connection: the server aborts the request
                if line == "data: [DONE]":
                    self.finished = True


def queue_behind(url: str, first: str, second: str) -> tuple[str, str, str] | None:
    """`first` running and `second` queued behind it: the newest label set, or None when `first` ended
    before both were seen at once (a starved test process), so the attempt proves nothing."""
    stop = threading.Event()
    chats = [LongChat(url, first, stop), LongChat(url, second, stop)]
    try:
        chats[0].start()
        deadline = time.monotonic() + DEADLINE_S
        while scrape_lora(url)[1] != 1:  # `first` runs
            assert time.monotonic() < deadline and chats[0].is_alive(), "the first request never ran"
            time.sleep(0.02)
        chats[1].start()
        while True:
            series, running, waiting = scrape_lora(url)
            if running == 1 and waiting == 1:
                return latest(series)
            if chats[0].finished or not chats[0].is_alive():
                return None
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.02)
    finally:
        stop.set()
        for chat in chats:
            chat.join(DEADLINE_S)


def test_lora_requests_info_from_a_real_server(lora_server):
    url = lora_server.url
    for first, second, expected in ((BASE, "alpha", ("", "alpha", "2")), ("alpha", BASE, ("alpha", "", "2"))):
        for _ in range(ATTEMPTS):
            read = queue_behind(url, first, second)
            if read is not None:
                break
        else:
            pytest.fail(f"in {ATTEMPTS} attempts {first} always ended before {second} was seen queued")
        # The champion is named as clients request it (`alpha`, not the engine's `alpha-v1`), the base never.
        assert read == expected, f"{first} running, {second} waiting: a router reads {read}"
    deadline = time.monotonic() + DEADLINE_S
    while (state := scrape_lora(url))[1:] != (0.0, 0.0):  # both hung up: aborted
        assert time.monotonic() < deadline, f"requests still running/waiting: {state[1:]}"
        time.sleep(0.05)
    deadline = time.monotonic() + DEADLINE_S
    while latest(scrape_lora(url)[0]) != ("", "", "2"):  # the idle engine thread stamps an empty set
        assert time.monotonic() < deadline, f"idle, yet a router still reads {latest(scrape_lora(url)[0])}"
        time.sleep(0.05)
    assert {("", "alpha", "2"), ("alpha", "", "2")} <= set(scrape_lora(url)[0]), "earlier sets stay, as in vLLM"
