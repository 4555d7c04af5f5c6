"""`bench engine`: our engine against transformers + PEFT on the same requests, in one process.

Every figure decodes the same prompts to the same length (end tokens are ignored, so no decoder
stops early and tokens/s compare like for like), greedy, after one warm-up call per decoder. The
baselines are what a user gets off the shelf: `generate` at batch 1, PEFT's static mixed-adapter
batch (`adapter_names=`) and one request at a time with PEFT switching adapters.

The engine's prefix cache is emptied before every measured run, so a run reuses only K/V computed
within itself (the 16 requests share the task's system prompt; two per adapter in the mixed run), never
K/V left over from an earlier figure. That favours one adapter: its 16 requests compute the system
prompt once, the mixed run once per adapter (LoRA on k/v makes K/V adapter-specific; vLLM keys its
prefix blocks by LoRA id for the same reason). So the single and mixed runs are also measured like for
like twice: with prefix caching off, and warm, as a server in steady state runs them (each adapter's
system prompt cached by earlier requests with other user turns, `warm_prompts`).

Those six engine runs and the PEFT mixed batch are measured in interleaved rounds and reported as
medians: each run lasts a few seconds, and on a shared 2-core VM one pass alone moved the
one-vs-many-adapters ratio by more than 0.1 between two invocations.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from lorafleet.evaluation.generation import left_pad
from lorafleet.models.lora_weights import read_peft_adapter
from lorafleet.serving.engine.adapter_cache import AdapterCache, ResolvedAdapter
from lorafleet.serving.engine.config import EngineConfig
from lorafleet.serving.engine.engine import Engine
from lorafleet.serving.engine.lora_slots import LoraSlots
from lorafleet.serving.engine.model import CompactLlama
from lorafleet.serving.engine.sequence import SamplingParams


@dataclass
class EngineBenchReport:
    hf_generate_tokens_per_s: float
    batch1_tokens_per_s: float
    hf_decode_ms_per_token: float  # batch 1, after the first token (prefill excluded): time per output token
    batch1_decode_ms_per_token: float  # the engine's, same prompt
    single_adapter_tokens_per_s: float
    mixed_adapters_tokens_per_s: float
    peft_mixed_batch_tokens_per_s: float
    mixed_adapters_no_prefix_cache_tokens_per_s: float  # the same mixed run with prefix caching off
    single_adapter_no_prefix_cache_tokens_per_s: float  # and the single-adapter run
    mixed_adapters_warm_prefix_tokens_per_s: float  # mixed run after other requests cached each system prompt
    single_adapter_warm_prefix_tokens_per_s: float  # and the single-adapter run
    mixed_prefix_cache_hit_rate: float  # prompt tokens of the mixed run whose K/V was reused
    mixed_warm_prefix_cache_hit_rate: float  # the same in the warm mixed run
    serial_tokens_per_s: float
    cold_load_p50_ms: float
    n_adapters: int
    n_requests: int
    max_new_tokens: int
    rounds: int  # the single, mixed and PEFT mixed-batch figures are medians over this many interleaved rounds
    round_tokens_per_s: dict[str, list[float]]  # every round's rate of those figures, to show their spread
    device: str
    dtype: str  # the model's weights, and so the LoRA slots and KV cache

    @property
    def ratios(self) -> dict[str, float]:
        return {
            "batch1_vs_hf_generate": self.batch1_tokens_per_s / self.hf_generate_tokens_per_s,
            # Decode alone: tokens/s above include the prompt's prefill, which is compute-bound on both sides.
            "batch1_decode_vs_hf_decode": self.hf_decode_ms_per_token / self.batch1_decode_ms_per_token,
            "mixed_vs_single_adapter": self.mixed_adapters_tokens_per_s / self.single_adapter_tokens_per_s,
            # Like for like: with the prefix cache on, 16 requests of one adapter share more K/V than 2 per adapter.
            "mixed_vs_single_adapter_no_prefix_cache":
                self.mixed_adapters_no_prefix_cache_tokens_per_s / self.single_adapter_no_prefix_cache_tokens_per_s,
            "mixed_vs_single_adapter_warm_prefix":
                self.mixed_adapters_warm_prefix_tokens_per_s / self.single_adapter_warm_prefix_tokens_per_s,
            "mixed_vs_peft_mixed_batch": self.mixed_adapters_tokens_per_s / self.peft_mixed_batch_tokens_per_s,
            "mixed_no_prefix_cache_vs_peft_mixed_batch":
                self.mixed_adapters_no_prefix_cache_tokens_per_s / self.peft_mixed_batch_tokens_per_s,
            "mixed_warm_prefix_vs_peft_mixed_batch":
                self.mixed_adapters_warm_prefix_tokens_per_s / self.peft_mixed_batch_tokens_per_s,
            "mixed_vs_serial": self.mixed_adapters_tokens_per_s / self.serial_tokens_per_s,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratios": self.ratios}


def run_engine(engine: Engine, prompts: Sequence[list[int]], adapters: Sequence[str | None],
               max_new_tokens: int) -> tuple[float, list[list[int]]]:
    """All requests added at once (16 concurrent clients), stepped to completion → (tokens/s, outputs)."""
    params = SamplingParams(max_new_tokens=max_new_tokens)
    outputs: dict[str, list[int]] = {}
    start = time.perf_counter()
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters)):
        engine.add_request(f"r{i}", list(prompt), params, adapter)
        outputs[f"r{i}"] = []
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id].extend(out.new_token_ids)
    elapsed = time.perf_counter() - start
    tokens = [outputs[f"r{i}"] for i in range(len(prompts))]
    return sum(map(len, tokens)) / elapsed, tokens


def engine_decode_ms_per_token(engine: Engine, prompt: list[int], max_new_tokens: int) -> float:
    """One request alone: the mean time of the steps after its first token (vLLM's time per output token)."""
    engine.add_request("decode", list(prompt), SamplingParams(max_new_tokens=max_new_tokens), None)
    seconds, tokens, started = 0.0, 0, False
    while engine.has_unfinished():
        start = time.perf_counter()
        new = sum(len(out.new_token_ids) for out in engine.step())
        if started:
            seconds, tokens = seconds + time.perf_counter() - start, tokens + new
        started = started or new > 0
    if not tokens:
        raise ValueError(f"max_new_tokens={max_new_tokens}: at least 2 tokens are needed to time decoding")
    return seconds / tokens * 1000


class _TokenClock(BaseStreamer):
    """Stamps each `put` of `generate` (the prompt first, then one call per new token)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: Any) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_decode_ms_per_token(model: Any, prompt: list[int], max_new_tokens: int, *, pad_id: int) -> float:
    """`generate` at batch 1: the mean gap between its new tokens after the first (prefill excluded)."""
    clock = _TokenClock()
    ids, mask = left_pad([prompt], pad_id, model.device)  # (1, T): the same inputs as `hf_generate`'s
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                       min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, streamer=clock)
    tokens = clock.stamps[1:]  # stamps[0] is the prompt
    if len(tokens) < 2:
        raise ValueError(f"max_new_tokens={max_new_tokens}: at least 2 tokens are needed to time decoding")
    return (tokens[-1] - tokens[0]) / (len(tokens) - 1) * 1000


def hf_generate(model: Any, prompts: Sequence[list[int]], max_new_tokens: int, *, pad_id: int,
                adapter_names: list[str] | None = None) -> tuple[float, int]:
    """One static `generate` call over `prompts` (left-padded) → (seconds, generated tokens)."""
    ids, mask = left_pad(prompts, pad_id, model.device)  # (B, T), (B, T)
    width = ids.shape[1]
    kwargs: dict[str, Any] = {"adapter_names": adapter_names} if adapter_names else {}
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, **kwargs)
    return time.perf_counter() - start, (out.shape[1] - width) * len(prompts)


def measure_engine(hf_model: Any, make_peft: Callable[[], Any], adapter_dirs: dict[str, Path],
                   prompts: Sequence[list[int]], *, max_new_tokens: int, pad_id: int,
                   warm_prompts: Sequence[list[int]], config: EngineConfig | None = None, rounds: int = 3,
                   progress: Callable[[str], None] = print) -> EngineBenchReport:
    """Every figure of the report, measured in this process on the same prompts.

    `warm_prompts` (as many as `prompts`, other user turns of the same task) fill the prefix cache
    before the warm runs, one request per measured request with the same adapter.

    `make_peft()` wraps `hf_model` with every adapter of `adapter_dirs` loaded under its name; it is
    called after the engine copied the base weights and the plain `generate` baseline ran, because
    PEFT injects its LoRA layers into `hf_model` in place.
    """
    names = list(adapter_dirs)
    n = len(prompts)
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    if len(warm_prompts) != n:
        raise ValueError(f"warm_prompts needs one prompt per request ({n}), got {len(warm_prompts)}")
    compact = CompactLlama.from_hf(hf_model)
    shape = compact.shape
    max_rank = max(read_peft_adapter(path, shape).rank for path in adapter_dirs.values())
    cold = []
    # LoRA slots in the model's dtype and on its device, as the service builds them (engine_generator)
    weight = compact.lm_head_weight
    probe = LoraSlots(shape, 1, max_rank, dtype=weight.dtype, device=weight.device)
    for path in list(adapter_dirs.values()) * 2:
        start = time.perf_counter()
        probe.load(1, read_peft_adapter(path, shape))
        cold.append((time.perf_counter() - start) * 1000)
    # The benchmark measures decoding, not the cache: every adapter is made resident up front.
    cache = AdapterCache(LoraSlots(shape, len(names), max_rank, dtype=weight.dtype, device=weight.device), shape,
                         lambda name: ResolvedAdapter(name=name, identity="bench", path=adapter_dirs[name]))
    for name in names:
        cache.request(name)
    cache.wait_loading()
    cache.install_ready()
    engine = Engine(compact, config or EngineConfig(adapter_slots=len(names)), adapters=cache)

    def engine_rate(batch: Sequence[list[int]], adapters: Sequence[str | None], *, prefix_caching: bool = True,
                    warm: bool = False) -> tuple[float, float]:
        """→ (tokens/s, prefix-cache hit rate: prompt tokens of this run whose K/V was reused)."""
        run_engine(engine, batch[:2], adapters[:2], 4)  # warm-up
        engine.allocator.forget_cached()
        if warm:  # steady state: earlier traffic of the same adapters left its prompt prefixes cached
            run_engine(engine, warm_prompts, adapters, 1)
        scheduler = engine.scheduler
        scheduler.prefix_caching = prefix_caching
        queried, hit = scheduler.prefix_query_tokens, scheduler.prefix_hit_tokens
        try:
            rate = run_engine(engine, batch, adapters, max_new_tokens)[0]
        finally:
            scheduler.prefix_caching = True
        queried = scheduler.prefix_query_tokens - queried
        return rate, (scheduler.prefix_hit_tokens - hit) / queried if queried else 0.0

    progress("engine batch 1")
    one = [prompts[0]]
    batch1 = statistics.median(engine_rate(one, [None])[0] for _ in range(3))
    progress("transformers generate batch 1")
    hf_generate(hf_model, one, 4, pad_id=pad_id)
    hf_runs = [hf_generate(hf_model, one, max_new_tokens, pad_id=pad_id) for _ in range(3)]
    hf_rate = statistics.median(tokens / seconds for seconds, tokens in hf_runs)
    progress("decode alone (prefill excluded), batch 1: transformers generate and engine, interleaved")
    hf_decode, engine_decode = [], []
    for _ in range(3):
        hf_decode.append(hf_decode_ms_per_token(hf_model, prompts[0], max_new_tokens, pad_id=pad_id))
        engine.allocator.forget_cached()
        engine_decode.append(engine_decode_ms_per_token(engine, prompts[0], max_new_tokens))
    peft_model = make_peft()
    mixed_names = [names[i % len(names)] for i in range(n)]
    runs = {  # figure: (label, adapters, prefix caching, warm)
        "single": (f"{n} requests on one adapter", [names[0]] * n, True, False),
        "single_uncached": (f"{n} requests on one adapter, prefix caching off", [names[0]] * n, False, False),
        "single_warm": (f"{n} requests on one adapter, warm prefix cache", [names[0]] * n, True, True),
        "mixed": (f"{n} requests over {len(names)} adapters", mixed_names, True, False),
        "mixed_uncached": (f"{n} requests over {len(names)} adapters, prefix caching off", mixed_names, False, False),
        "mixed_warm": (f"{n} requests over {len(names)} adapters, warm prefix cache", mixed_names, True, True),
    }
    rates: dict[str, list[float]] = {figure: [] for figure in [*runs, "peft"]}
    hits: dict[str, list[float]] = {figure: [] for figure in runs}
    hf_generate(peft_model, prompts[:2], 4, pad_id=pad_id, adapter_names=mixed_names[:2])  # warm-up
    # Rounds interleave every figure, so a slow spell of a shared machine lands on all of them alike and
    # each figure is a median: one pass measured the one-vs-many-adapters ratio anywhere from 0.71 to 0.85.
    for round_no in range(1, rounds + 1):
        for figure, (label, adapters, prefix_caching, warm) in runs.items():
            rate, hit_rate = engine_rate(prompts, adapters, prefix_caching=prefix_caching, warm=warm)
            rates[figure].append(rate)
            hits[figure].append(hit_rate)
            progress(f"round {round_no}/{rounds}: engine, {label}: {rates[figure][-1]:.1f} tokens/s")
        seconds, tokens = hf_generate(peft_model, prompts, max_new_tokens, pad_id=pad_id, adapter_names=mixed_names)
        rates["peft"].append(tokens / seconds)
        progress(f"round {round_no}/{rounds}: PEFT static mixed batch of {n}: {rates['peft'][-1]:.1f} tokens/s")
    rate = {figure: statistics.median(values) for figure, values in rates.items()}
    progress(f"serial: {n} requests one at a time through PEFT")
    serial_seconds, serial_tokens = 0.0, 0
    for prompt, name in zip(prompts, mixed_names):
        peft_model.set_adapter(name)
        seconds, tokens = hf_generate(peft_model, [prompt], max_new_tokens, pad_id=pad_id)
        serial_seconds, serial_tokens = serial_seconds + seconds, serial_tokens + tokens
    cache.close()
    return EngineBenchReport(
        hf_generate_tokens_per_s=hf_rate, batch1_tokens_per_s=batch1,
        hf_decode_ms_per_token=statistics.median(hf_decode),
        batch1_decode_ms_per_token=statistics.median(engine_decode), single_adapter_tokens_per_s=rate["single"],
        mixed_adapters_tokens_per_s=rate["mixed"], peft_mixed_batch_tokens_per_s=rate["peft"],
        mixed_adapters_no_prefix_cache_tokens_per_s=rate["mixed_uncached"],
        mixed_prefix_cache_hit_rate=statistics.median(hits["mixed"]),
        single_adapter_no_prefix_cache_tokens_per_s=rate["single_uncached"],
        mixed_adapters_warm_prefix_tokens_per_s=rate["mixed_warm"],
        single_adapter_warm_prefix_tokens_per_s=rate["single_warm"],
        mixed_warm_prefix_cache_hit_rate=statistics.median(hits["mixed_warm"]),
        serial_tokens_per_s=serial_tokens / serial_seconds, cold_load_p50_ms=statistics.median(cold),
        n_adapters=len(names), n_requests=n, max_new_tokens=max_new_tokens, rounds=rounds,
        round_tokens_per_s=rates, device=str(weight.device), dtype=str(weight.dtype).removeprefix("torch."))
