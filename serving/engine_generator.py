"""The service's `TokenGenerator` on the continuous-batching engine (`serving/engine/`).

The engine speaks token ids and knows nothing of HTTP; this adapter gives it the service's
contract: `submit` returns a `TokenStream` fed from the engine's stepping thread, `load_adapter`
tells the engine where an adapter name lives (the adapter cache loads it on first use, LRU under
its slot budget), and a full queue raises `GeneratorBusy`, which the API answers with 429.

This is the engine's async front: a background thread steps the engine; callers iterate a
`TokenStream` (an async iterator of token ids); cancelling it aborts the request and frees its KV
blocks. One thread owns the engine. `submit` and `abort` take the same lock as `step`, so they never overlap
a forward, and errors (queue full, bad prompt) reach the caller synchronously.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED
from pathlib import Path
from typing import Any

from lorafleet.serving.engine.adapter_cache import AdapterCache, AdapterNotFound, ResolvedAdapter
from lorafleet.serving.engine.engine import Engine, EngineConfig, RequestOutput
from lorafleet.serving.engine.lora_slots import LoraSlots
from lorafleet.serving.engine.model import CompactLlama
from lorafleet.serving.engine.scheduler import QueueFull
from lorafleet.serving.engine.sequence import SamplingParams as EngineSampling
from lorafleet.serving.generation import GenerationRequest, GeneratorBusy, TokenStream

log = logging.getLogger(__name__)
_IDLE_WAIT_S = 0.5


class EngineGenerator:
    """Continuous batching for every adapter the catalogue names, on one stepping thread."""

    def __init__(self, hf_model: Any, config: EngineConfig, *, eos_token_ids: frozenset[int],
                 on_step: Callable[[Engine, list[RequestOutput]], None] | None = None) -> None:
        self.model = CompactLlama.from_hf(hf_model)
        self.eos_token_ids = frozenset(eos_token_ids)
        self._paths: dict[str, Path] = {}
        slots = LoraSlots(self.model.shape, config.adapter_slots, config.max_lora_rank,
                          dtype=self.model.lm_head_weight.dtype, device=self.model.lm_head_weight.device)
        self.cache = AdapterCache(slots, self.model.shape, self._resolve)
        self.engine = Engine(self.model, config, adapters=self.cache)
        self.on_step = on_step
        self._streams: dict[str, TokenStream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._work, name="lorafleet-engine", daemon=True)
        self._thread.start()

    # ----- TokenGenerator ------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> TokenStream:
        stream = TokenStream(loop=asyncio.get_running_loop())
        params = EngineSampling(max_new_tokens=request.params.max_tokens, temperature=request.params.temperature,
                                top_p=request.params.top_p, seed=request.params.seed,
                                stop_token_ids=self.eos_token_ids | set(request.params.stop_token_ids))
        request_id = f"req-{next(self._ids)}"
        with self._lock:
            try:
                self.engine.add_request(request_id, list(request.prompt_ids), params, request.adapter)
            except QueueFull as error:
                raise GeneratorBusy(f"{self.engine.num_waiting()} requests are waiting: {error}") from error
            self._streams[request_id] = stream
        self._wake.set()
        return stream

    def load_adapter(self, name: str, adapter_dir: Path) -> None:
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

    # ----- admin -----------------------------------------------------------------------------------
    def unload_adapter(self, name: str) -> bool:
        with self._lock:
            return self.cache.unload(name)

    def _resolve(self, name: str) -> ResolvedAdapter:
        path = self._paths.get(name)
        if path is None:
            raise AdapterNotFound(f"adapter {name!r} is not known to this server")
        return ResolvedAdapter(name=name, identity=str(path), path=path)

    # ----- the stepping thread -------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                self._drop_cancelled()
                busy = self.engine.has_unfinished()
                outputs = self._step() if busy else []
            self._deliver(outputs)
            if not busy:
                self._wake.wait(_IDLE_WAIT_S)
                self._wake.clear()
            elif not outputs:  # everything may be waiting on an adapter load: block on it, not a spin
                self.cache.wait_loading(timeout=0.05, return_when=FIRST_COMPLETED)

    def _drop_cancelled(self) -> None:
        for request_id, stream in list(self._streams.items()):
            if stream.cancelled:  # client went away: free its KV blocks now
                self.engine.abort(request_id)
                del self._streams[request_id]

    def _step(self) -> list[RequestOutput]:
        try:
            outputs = self.engine.step()
        except Exception as error:
            log.exception("engine step failed; failing the requests in flight")
            outputs = []
            for request_id in list(self._streams):
                self.engine.abort(request_id)
                outputs.append(RequestOutput(request_id=request_id, new_token_ids=[], finished=True,
                                             finish_reason="error", error=f"engine step failed: {error}"))
        if self.on_step is not None:
            try:
                self.on_step(self.engine, outputs)
            except Exception:
                log.exception("engine metrics hook failed")
        return outputs

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
