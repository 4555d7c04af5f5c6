"""The service's `TokenGenerator` on the continuous-batching engine (`serving/engine/`).

The engine speaks token ids and knows nothing of HTTP; this adapter gives it the service's
contract (`serving/generation/interface.py`): `submit` returns a `TokenStream` fed from the engine's
stepping thread, `load` tells the engine where an adapter name lives (the adapter cache reads it in the
background, LRU under its slot budget), `warm` waits for that read, `unload` evicts, and a full queue
raises `GeneratorBusy`, which the API answers with 429.

This is the engine's async front: a background thread steps the engine; callers iterate a
`TokenStream` (an async iterator of token ids); cancelling it aborts the request and frees its KV
blocks. One thread owns the engine. `submit` and `abort` take the same lock as `step`, so they never overlap
a forward, and errors (queue full, bad prompt) reach the caller synchronously.

Latencies are measured here, where tokens are handed to the streams, on one monotonic clock: TTFT
from `submit` to the request's first step output, inter-token latency between deliveries, e2e from
`submit` to the finishing output. After every pass of the stepping thread, `on_step` gets a
`StepReport` (on this thread, under the lock, before the tokens are delivered) so the metrics read
the engine's and the adapter cache's counters at a consistent point.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.models.merging import MergeRecipe
from lorafleet.serving.engine.adapter_cache import AdapterCache, AdapterNotFound, ResolvedAdapter
from lorafleet.serving.engine.config import EngineConfig
from lorafleet.serving.engine.engine import Engine, RequestOutput
from lorafleet.serving.engine.lora_slots import LoraSlots
from lorafleet.serving.engine.merged_adapters import MergePlan, check_merge, merge_identity
from lorafleet.serving.engine.model import CompactLlama
from lorafleet.serving.engine.openmp_pool import release_thread_pool
from lorafleet.serving.engine.scheduler import QueueFull
from lorafleet.serving.engine.sequence import SamplingParams as EngineSampling
from lorafleet.serving.generation.interface import (
    GenerationRequest,
    GeneratorBusy,
    GeneratorStats,
    RequestRejected,
    ResidentAdapter,
    TokenStream,
    UnknownAdapter,
    rejected,
)

log = logging.getLogger(__name__)
_IDLE_WAIT_S = 0.5
WARM_TIMEOUT_S = 120.0  # how long `warm` waits for an adapter's files to be read
MAX_MERGES = 256  # per-request merge recipes remembered (those holding a slot are never forgotten)


@dataclass
class _Timing:
    """A live request as the metrics see it (monotonic seconds)."""

    adapter: str | None
    prompt_tokens: int
    submitted: float
    last: float | None = None  # latest delivery; None until the first output (prefill done)


@dataclass
class StepReport:
    """What one pass of the stepping thread did, for `on_step` (metrics).

    Speculative decoding can deliver several tokens in one step; a delivery of k tokens `gap` seconds
    after the previous one counts as k inter-token latencies of gap / k, so the histogram's count is
    always (tokens - 1) per request and its sum the time from first to last token (vLLM observes one
    interval per step instead). A request's first output carries one token (prefill samples one),
    or none when that token was a stop token; either way it ends the TTFT.
    """

    engine: Engine
    cache: AdapterCache
    outputs: list[RequestOutput]
    ttft_s: list[float] = field(default_factory=list)  # requests whose prefill finished this step
    itl_s: list[tuple[float, int]] = field(default_factory=list)  # (seconds per token, tokens)
    prompt_tokens: dict[str | None, int] = field(default_factory=dict)  # adapter -> tokens, at prefill end
    generation_tokens: dict[str | None, int] = field(default_factory=dict)  # adapter -> tokens delivered
    finished: list[tuple[str | None, str, float]] = field(default_factory=list)  # adapter, reason, e2e s


class EngineGenerator:
    """Continuous batching for every adapter the catalogue names, on one stepping thread."""

    def __init__(self, hf_model: Any, config: EngineConfig, *, eos_token_ids: frozenset[int],
                 on_step: Callable[[StepReport], None] | None = None) -> None:
        self.model = CompactLlama.from_hf(hf_model, weight_format=config.weights)
        self.eos_token_ids = frozenset(eos_token_ids)
        self._paths: dict[str, Path] = {}
        self._merges: collections.OrderedDict[str, MergePlan] = collections.OrderedDict()  # per-request merges
        self._merge_lock = threading.Lock()
        slots = LoraSlots(self.model.shape, config.adapter_slots, config.max_lora_rank,
                          dtype=self.model.lm_head_weight.dtype, device=self.model.lm_head_weight.device)
        self.cache = AdapterCache(slots, self.model.shape, self._resolve)
        self.engine = Engine(self.model, config, adapters=self.cache)
        log.info("engine memory budgets: KV cache %.0f MB (%d blocks of %d tokens), %d adapter slots x %.1f MB "
                 "(LoRA rank <= %d)", self.engine.kv.nbytes / 2**20, self.engine.allocator.num_blocks,
                 config.block_size, config.adapter_slots, slots.bytes_per_slot / 2**20, config.max_lora_rank)
        self.on_step = on_step
        self._streams: dict[str, TokenStream] = {}
        self._timings: dict[str, _Timing] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ids = itertools.count()
        self._report([], [])  # metrics show the idle engine (gauges, cache capacity) from the start
        # This thread prepacked the weights; its idle OpenMP team would slow every step by ~50% on 2 cores.
        release_thread_pool()
        self._thread = threading.Thread(target=self._work, name="lorafleet-engine", daemon=True)
        self._thread.start()

    # ----- TokenGenerator ------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> TokenStream:
        """Queue `request`. Anything the engine refuses raises RequestRejected (HTTP 400, `param` named as
        the API names it), a full queue GeneratorBusy, an unknown adapter AdapterNotFound; nothing is
        queued or allocated then."""
        stream = TokenStream(loop=asyncio.get_running_loop())
        try:
            params = EngineSampling(max_new_tokens=request.params.max_tokens,
                                    temperature=request.params.temperature, top_p=request.params.top_p,
                                    seed=request.params.seed,
                                    stop_token_ids=self.eos_token_ids | set(request.params.stop_token_ids))
        except (TypeError, ValueError) as error:
            raise rejected(error) from None
        request_id = f"req-{next(self._ids)}"
        with self._lock:
            try:
                self.engine.add_request(request_id, list(request.prompt_ids), params, request.adapter,
                                        grammar=request.grammar.matcher() if request.grammar is not None else None)
            except QueueFull as error:
                raise GeneratorBusy(f"{self.engine.num_waiting()} requests are waiting: {error}") from error
            except (TypeError, ValueError) as error:  # AdapterNotFound (a LookupError) passes through: 404
                raise rejected(error) from None
            self._streams[request_id] = stream
            self._timings[request_id] = _Timing(request.adapter, len(request.prompt_ids), time.monotonic())
        self._wake.set()
        return stream

    def load_merge(self, parents: Sequence[str], recipe: MergeRecipe) -> str:
        """The adapter name of a merge of loaded `parents` (LoRAX's per-request `merged_adapters`).

        The merge is read and installed like any adapter on its first request and evicted like one; the
        same parents and recipe always get the same name, so repeated requests share one slot. Raises
        RequestRejected (400) for what cannot be merged, UnknownAdapter for a parent never loaded."""
        missing = [name for name in parents if name not in self._paths]
        if missing:
            raise UnknownAdapter(f"adapter {missing[0]!r} is not known to this server")
        plan = MergePlan(parents=tuple(self._paths[name] for name in parents), recipe=recipe)
        try:
            check_merge(plan, max_rank=self.cache.slots.max_rank)
        except ValueError as error:
            raise RequestRejected(str(error), param="merged_adapters") from None
        identity = merge_identity([str(path) for path in plan.parents], recipe)
        name = f"merge-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"
        with self._merge_lock:  # not the step lock: remembering a recipe must not wait for a forward
            self._merges[name] = plan
            self._merges.move_to_end(name)
            while len(self._merges) > MAX_MERGES:  # forget the oldest merge that holds no slot
                idle = next((old for old in self._merges if self.cache.slot_of(old) is None and old != name), None)
                if idle is None:
                    break
                del self._merges[idle]
        return name

    def load(self, name: str, adapter_dir: Path) -> None:
        """Record where `name` lives; the adapter cache reads it on the first request (or now, to warm)."""
        moved = name in self._paths and self._paths[name] != Path(adapter_dir)
        self._paths[name] = Path(adapter_dir)
        if moved:  # a resident name now pointing at another directory is reloaded in place
            with self._lock:
                self.cache.refresh()
        self.cache.request(name)  # start loading now: the first request finds it resident

    @property
    def adapters(self) -> frozenset[str]:
        return frozenset(self._paths)

    def close(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self.cache.close()

    def unload(self, name: str) -> bool:
        """Evict `name` from the adapter cache; it is read again on its next request. False when a running
        request pins it (refused, nothing changes) or it was not resident."""
        with self._lock:
            return self.cache.unload(name)

    def warm(self, name: str, timeout: float = WARM_TIMEOUT_S) -> int | None:
        """Read `name` now and install it between two steps, even while the engine is idle.

        Returns its slot (0: Turbo heads only), or None when every slot is pinned by running requests
        (a later step installs it). Raises AdapterNotFound for an unknown name, the cache's
        AdapterLoadError when the files cannot be read, TimeoutError when reading takes longer.
        Only this adapter's read is waited for: other reads queued or in flight do not count."""
        slot = self.cache.request(name)
        if slot is not None:
            return slot
        if not self.cache.wait_read(name, timeout):
            raise TimeoutError(f"adapter {name!r} was not read within {timeout} s")
        with self._lock:  # holding the step lock: no forward runs while the slots are written
            try:
                self.cache.install_ready()
            finally:  # the slot copies ran here, off the stepping thread (see openmp_pool)
                release_thread_pool()
            slot, error = self.cache.slot_of(name), self.cache.error(name)
        if error is not None:
            raise error
        return slot

    def resident(self) -> list[ResidentAdapter]:
        """The adapter cache's residents, most recently used first; `running` requests pin theirs."""
        with self._lock:
            running: dict[str | None, int] = {}
            for seq in self.engine.scheduler.running:
                running[seq.adapter] = running.get(seq.adapter, 0) + 1
            return [ResidentAdapter(adapter=name, slot=self.cache.slot_of(name),
                                    turbo_heads=self.cache.heads(name) is not None, running=running.get(name, 0))
                    for name in reversed(self.cache.resident())]

    def stats(self) -> GeneratorStats:
        with self._lock:
            return GeneratorStats(backend="engine", adapter_slots=self.cache.slots.num_slots,
                                  capacity_tokens=self.engine.scheduler.capacity_tokens,
                                  waiting=self.engine.num_waiting(), running=self.engine.num_running(),
                                  spec_tau=dict(self.engine.stats.spec_tau_by_adapter))

    def _resolve(self, name: str) -> ResolvedAdapter:
        plan = self._merges.get(name)
        if plan is not None:
            identity = merge_identity([str(path) for path in plan.parents], plan.recipe)
            return ResolvedAdapter(name=name, identity=identity, path=plan.parents[0], merge=plan)
        path = self._paths.get(name)
        if path is None:
            raise AdapterNotFound(f"adapter {name!r} is not known to this server")
        return ResolvedAdapter(name=name, identity=str(path), path=path)

    # ----- the stepping thread -------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                aborted = self._drop_cancelled()
                busy = self.engine.has_unfinished()
                outputs = self._step() if busy else []
                if not busy:  # adapters read in the background (start-up warming) become resident now
                    self.cache.install_ready()
                # Idle passes report too (every _IDLE_WAIT_S at most): admin loads and unloads change
                # the adapter cache while no request runs.
                self._report(outputs, aborted)
            self._deliver(outputs)
            if not busy:
                self._wake.wait(_IDLE_WAIT_S)
                self._wake.clear()
            elif not outputs:  # everything may be waiting on an adapter load: block on it, not a spin
                self.cache.wait_loading(timeout=0.05, return_when=FIRST_COMPLETED)

    def _drop_cancelled(self) -> list[str]:
        aborted = []
        for request_id, stream in list(self._streams.items()):
            if stream.cancelled:  # client went away: free its KV blocks now
                self.engine.abort(request_id)
                del self._streams[request_id]
                aborted.append(request_id)
        return aborted

    def _step(self) -> list[RequestOutput]:
        try:
            outputs = self.engine.step()
        except Exception as error:
            # The engine fails only the request an error belongs to (`Engine.step`); this is the last
            # resort for a failure it could not attribute (a bookkeeping bug), not a normal path.
            log.exception("engine step failed; failing the requests in flight")
            outputs = []
            for request_id in list(self._streams):
                self.engine.abort(request_id)
                outputs.append(RequestOutput(request_id=request_id, new_token_ids=[], finished=True,
                                             finish_reason="error", error=f"engine step failed: {error}"))
        return outputs

    def _report(self, outputs: list[RequestOutput], aborted: list[str]) -> None:
        """Turn this pass into latencies and per-adapter counts; one loop over the outputs, no more."""
        now = time.monotonic()
        report = StepReport(engine=self.engine, cache=self.cache, outputs=outputs)
        for request_id in aborted:
            timing = self._timings.pop(request_id, None)
            if timing is not None:
                report.finished.append((timing.adapter, "abort", now - timing.submitted))
        for output in outputs:
            timing = self._timings.get(output.request_id)
            if timing is None:
                continue
            adapter, count = timing.adapter, len(output.new_token_ids)
            if output.finish_reason != "error":
                if timing.last is None:  # the prefill finished: its sampled token is the first one
                    report.ttft_s.append(now - timing.submitted)
                    report.prompt_tokens[adapter] = report.prompt_tokens.get(adapter, 0) + timing.prompt_tokens
                    if count > 1:
                        report.itl_s.append((0.0, count - 1))
                    timing.last = now
                elif count:
                    report.itl_s.append(((now - timing.last) / count, count))
                    timing.last = now
                if count:
                    report.generation_tokens[adapter] = report.generation_tokens.get(adapter, 0) + count
            if output.finished:
                del self._timings[output.request_id]
                report.finished.append((adapter, output.finish_reason or "stop", now - timing.submitted))
        if self.on_step is not None:
            try:
                self.on_step(report)
            except Exception:
                log.exception("engine metrics hook failed")

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            for token in output.new_token_ids:
                stream.push_threadsafe(token)
            if output.finished:
                self._streams.pop(output.request_id, None)
                if output.finish_reason == "error":
                    stream.fail_threadsafe(output.error or "generation failed")
                else:
                    stream.finish_threadsafe("cancelled" if output.finish_reason == "abort"
                                             else output.finish_reason)
