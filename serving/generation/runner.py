"""Batched multi-adapter generation with PEFT + Hugging Face `generate`, on one worker thread.

Why a single thread owns the model: PEFT mutates the module tree when an adapter is loaded, and
`generate` is not re-entrant, so every touch of the model (generation and adapter loading) runs on
the worker, between batches. The event loop only queues requests and reads token streams.

Batching policy (request-level, not continuous: that is `serving/engine/`'s job): the worker takes
the oldest waiting request, waits up to `batch_wait_s` for company, and runs it together with every
waiting request whose sampling is compatible (all greedy, or the same temperature/top_p; a request
with a seed runs alone so its sample is reproducible). Rows of one batch may use different
adapters: PEFT's `adapter_names=` applies each row's LoRA (or none, `__base__`) in one forward.

Per-row limits are enforced by a streamer plus a stopping criterion that apply the same rule
(`_Row.decide`, the shared `sampling_rules.cut_at_stop`): a row ends at one of its stop ids (not emitted),
at its own `max_tokens`, or when cancelled; `generate` keeps stepping until every row has ended, and
tokens a finished row still receives (padding) are dropped.

Adapters with Turbo heads (turbo_lora, or heads alone on the bare base) decode speculatively through
`models.decoding.stream`: their requests batch only with requests for the same adapter, the adapter
is made PEFT's active one (or switched off for heads on the bare base), and each verification step
streams however many tokens it accepted. Greedy output is identical to the HF path.

As a `TokenGenerator` (`interface.py`): `load` loads before it returns, so `warm` has nothing left to do;
PEFT keeps every adapter it loaded, so `resident` lists them all and `unload` raises UnloadNotSupported.
Its batching knobs are `RunnerConfig` (the service nests it as `ServiceSettings.peft`); its queue bound
is the engine's (`EngineConfig.max_waiting`), so one setting bounds the queue whichever generator runs.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lorafleet.models.merging import MergeRecipe
from lorafleet.models.sampling_rules import cut_at_stop, eos_token_ids
from lorafleet.serving.engine.config import DEFAULT_MAX_WAITING
from lorafleet.serving.generation.interface import (
    FinishReason,
    GenerationRequest,
    GeneratorBusy,
    GeneratorStats,
    RequestRejected,
    ResidentAdapter,
    TokenStream,
    UnknownAdapter,
    UnloadNotSupported,
)

log = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in `adapter_names=`
_ids = itertools.count()


class RunnerConfig(BaseModel):
    """The PEFT runner's batching knobs: the one place their defaults live."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_batch_size: int = Field(8, ge=1, le=256, description="peft: rows in one generate() call")
    batch_wait_ms: float = Field(5.0, ge=0.0, le=1000.0, description="peft: how long a new request waits for "
                                 "others to share its batch")


@dataclass
class RunnerCounters:
    """Counters for tests and logs (written by the worker thread only)."""

    batches: int = 0
    rows: int = 0
    decode_steps: int = 0
    failed_batches: int = 0
    largest_batch: int = 0
    speculative_steps: int = 0  # row-steps that verified drafts
    speculative_drafted: int = 0  # draft tokens proposed by heads
    speculative_accepted: int = 0  # draft tokens accepted


@dataclass(eq=False)
class _Row:
    request: GenerationRequest
    stream: TokenStream
    stop_ids: frozenset[int]
    arrived: float
    key: tuple = ()
    done: bool = False

    def decide(self, token: int, position: int) -> FinishReason | None:
        """Why the row ends at its `position`-th generated token (1-based), or None to go on."""
        if self.stream.cancelled:
            return "cancelled"
        return cut_at_stop([token], self.request.params.max_tokens - position + 1, self.stop_ids)[1]


def _batch_key(row: _Row, speculative: bool) -> tuple:
    """Requests that may share a batch share a key; a Turbo adapter's requests batch only together."""
    params = row.request.params
    prefix = ("speculative", row.request.adapter) if speculative else ()
    if params.greedy:
        return (*prefix, "greedy")
    if params.seed is not None:
        return ("seeded", next(_ids))  # alone: a shared RNG would make its sample depend on neighbours
    return (*prefix, "sample", params.temperature, params.top_p)


def _make_streamer(rows: list[_Row]):
    from transformers.generation.streamers import BaseStreamer

    class RowStreamer(BaseStreamer):
        """Routes column `i` of each decoding step to row `i`'s stream."""

        def __init__(self) -> None:
            self.position = 0
            self.seen_prompt = False

        def put(self, value) -> None:
            if not self.seen_prompt:  # generate() first hands over the prompt itself
                self.seen_prompt = True
                return
            self.position += 1
            for row, token in zip(rows, value.reshape(-1).tolist(), strict=True):
                if row.done:
                    continue
                reason = row.decide(token, self.position)
                if reason in (None, "length") and not row.stream.push_threadsafe(token):
                    reason = "cancelled"
                if reason is not None:
                    row.done = True
                    row.stream.finish_threadsafe(reason)

        def end(self) -> None:
            for row in rows:
                if not row.done:
                    row.done = True
                    row.stream.finish_threadsafe("length")

    return RowStreamer()


def _make_stopping(rows: list[_Row], prompt_width: int):
    import torch
    from transformers import StoppingCriteria

    class RowStopping(StoppingCriteria):
        """Tells `generate` which rows are finished, so it stops once all are (e.g. all cancelled)."""

        def __init__(self) -> None:
            self.finished = [False] * len(rows)

        def __call__(self, input_ids, scores, **kwargs):
            position = input_ids.shape[1] - prompt_width
            last = input_ids[:, -1].tolist()
            for index, row in enumerate(rows):
                if not self.finished[index]:
                    self.finished[index] = row.decide(last[index], position) is not None
            return torch.tensor(self.finished, dtype=torch.bool, device=input_ids.device)

    return RowStopping()


class GenerationRunner:
    """Implements `TokenGenerator` (`interface.py`) over a (PEFT-wrapped) Hugging Face causal LM."""

    def __init__(
        self,
        model: Any,
        *,
        pad_token_id: int,
        config: RunnerConfig | None = None,
        max_queue: int = DEFAULT_MAX_WAITING,
        eos_token_ids: frozenset[int] | None = None,
        device: Any = None,
        on_batch: Callable[[int], None] | None = None,
        on_speculative: Callable[[int, int, int], None] | None = None,
    ) -> None:
        """`eos_token_ids`: the ids that end every request (default: the model's own, `sampling_rules`)."""
        config = config or RunnerConfig()
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self._model = model
        self._device = device if device is not None else next(model.parameters()).device
        self._pad_token_id = int(pad_token_id)
        self._eos_ids = frozenset(eos_token_ids if eos_token_ids is not None else _eos_token_ids(model))
        self._max_batch_size = config.max_batch_size
        self._batch_wait_s = config.batch_wait_ms / 1000
        self._max_queue = max_queue
        self._on_batch = on_batch  # told each batch's size (metrics), on the worker thread
        self._on_speculative = on_speculative  # told (row-steps, drafted, accepted) per speculative batch
        self._adapters: frozenset[str] = frozenset(getattr(model, "peft_config", {}) or ())
        self._heads: dict[str, Any] = {}  # adapter name -> TurboHeads
        self._heads_only: set[str] = set()  # adapters that are heads on the bare base (no LoRA)
        self._pending: collections.deque[_Row] = collections.deque()
        self._calls: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.counters = RunnerCounters()
        self._running = 0  # rows of the batch generating now (read by `stats`)
        self._thread = threading.Thread(target=self._work, name="lorafleet-generation", daemon=True)
        self._thread.start()

    # -- public API (event loop / any thread) ----------------------------------------------------

    @property
    def adapters(self) -> frozenset[str]:
        return self._adapters

    def submit(self, request: GenerationRequest) -> TokenStream:
        import asyncio

        if request.adapter is not None and request.adapter not in self._adapters:
            raise UnknownAdapter(f"adapter {request.adapter!r} is not loaded (loaded: {sorted(self._adapters)})")
        if request.grammar is not None:
            raise RequestRejected("structured output (response_format json_object / json_schema) needs the engine "
                                  "backend", param="response_format")
        stream = TokenStream(loop=asyncio.get_running_loop())
        row = _Row(
            request=request,
            stream=stream,
            arrived=time.monotonic(),
            stop_ids=self._eos_ids | frozenset(request.params.stop_token_ids),
        )
        row.key = _batch_key(row, speculative=request.adapter in self._heads)
        with self._cond:
            if self._closed:
                raise RuntimeError("the generation runner is closed")
            if len(self._pending) >= self._max_queue:
                raise GeneratorBusy(
                    f"{len(self._pending)} requests are already waiting (limit {self._max_queue})"
                )
            self._pending.append(row)
            self._cond.notify_all()
        return stream

    def load(self, name: str, adapter_dir: Path) -> None:
        """Load a PEFT adapter directory under `name`; blocks until the worker has done it."""
        if not name or "." in name or name == BASE_ADAPTER:
            raise ValueError(f"adapter name {name!r} is not usable by PEFT (no '.', not {BASE_ADAPTER!r})")
        self._call(lambda: self._load_adapter(name, Path(adapter_dir)))

    def load_merge(self, parents: Sequence[str], recipe: MergeRecipe) -> str:
        """Per-request merges are an engine feature (merged slots); this backend refuses them (HTTP 400)."""
        raise RequestRejected("per-request merges (merged_adapters) need the engine backend; register the merge "
                              "with `lorafleet merge` to serve it here", param="merged_adapters")

    def warm(self, name: str) -> int | None:
        """Nothing left to do: `load` loaded it synchronously. There are no slots, hence None."""
        if name not in self._adapters:
            raise UnknownAdapter(f"adapter {name!r} is not loaded (loaded: {sorted(self._adapters)})")
        return None

    def unload(self, name: str) -> bool:
        raise UnloadNotSupported("the peft backend keeps every adapter it loaded in memory and cannot unload")

    def resident(self) -> list[ResidentAdapter]:
        """Every adapter it loaded (PEFT keeps them all), by name; no slots, no pinning."""
        return [ResidentAdapter(adapter=name, slot=None, turbo_heads=None, running=0)
                for name in sorted(self._adapters)]

    def stats(self) -> GeneratorStats:
        with self._cond:
            waiting = len(self._pending)
        return GeneratorStats(backend="peft", adapter_slots=None, capacity_tokens=None, waiting=waiting,
                              running=self._running)

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- worker thread -------------------------------------------------------------------------

    def _call(self, fn: Callable[[], Any]) -> Any:
        if threading.current_thread() is self._thread:
            return fn()
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the generation runner is closed")
            self._calls.append((fn, future))
            self._cond.notify_all()
        return future.result()

    def _load_adapter(self, name: str, adapter_dir: Path) -> None:
        from peft import PeftModel

        from lorafleet.models.adapter_dir import has_lora
        from lorafleet.models.turbo_heads import has_heads, load_heads

        if name in self._adapters:
            return
        if has_heads(adapter_dir):
            self._heads[name] = load_heads(adapter_dir, device=self._device)
        if not has_lora(adapter_dir):
            self._heads_only.add(name)
        elif isinstance(self._model, PeftModel):
            self._model.load_adapter(str(adapter_dir), adapter_name=name)
        else:
            self._model = PeftModel.from_pretrained(self._model, str(adapter_dir), adapter_name=name)
        self._model.eval()
        self._adapters = self._adapters | {name}
        log.info("loaded adapter %s from %s%s", name, adapter_dir, " (Turbo heads)" if name in self._heads else "")

    def _work(self) -> None:
        while True:
            work = self._take_work()
            if work is None:
                break
            if isinstance(work, tuple):
                fn, future = work
                try:
                    future.set_result(fn())
                except BaseException as error:  # noqa: BLE001 - handed to the caller
                    future.set_exception(error)
            else:
                self._run_batch(work)
        self._fail_leftovers()

    def _take_work(self) -> list[_Row] | tuple | None:
        with self._cond:
            while True:
                if self._calls:
                    return self._calls.popleft()
                if self._closed:  # waiting requests are failed by _fail_leftovers, not generated
                    return None
                self._drop_cancelled()
                if self._pending:
                    break
                self._cond.wait()
            # Give requests that arrive together a moment to share the batch.
            deadline = self._pending[0].arrived + self._batch_wait_s
            while len(self._pending) < self._max_batch_size and not self._closed and not self._calls:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            self._drop_cancelled()
            if not self._pending:
                return []
            key = self._pending[0].key
            batch = [row for row in self._pending if row.key == key][: self._max_batch_size]
            for row in batch:
                self._pending.remove(row)
            return batch

    def _drop_cancelled(self) -> None:
        for row in [row for row in self._pending if row.stream.cancelled]:
            self._pending.remove(row)

    def _run_batch(self, rows: list[_Row]) -> None:
        if not rows:
            return
        self.counters.batches += 1
        self.counters.rows += len(rows)
        self.counters.largest_batch = max(self.counters.largest_batch, len(rows))
        if self._on_batch is not None:
            try:
                self._on_batch(len(rows))
            except Exception:  # a metrics hook must not stop generation
                log.exception("the on_batch hook failed")
        self._running = len(rows)
        try:
            if rows[0].request.adapter in self._heads:
                self._generate_speculative(rows)
            else:
                self._generate(rows)
        except Exception as error:
            self.counters.failed_batches += 1
            log.exception("a generation batch of %d request(s) failed", len(rows))
            message = f"generation failed: {type(error).__name__}: {error}"
            for row in rows:
                if not row.done:
                    row.done = True
                    row.stream.fail_threadsafe(message)
        finally:
            self._running = 0
            for row in rows:  # generate() returned without ending a row: it hit the length limit
                if not row.done:
                    row.done = True
                    row.stream.finish_threadsafe("length")

    def _generate(self, rows: list[_Row]) -> None:
        import torch
        from transformers import StoppingCriteriaList

        width = max(len(row.request.prompt_ids) for row in rows)
        ids = [
            [self._pad_token_id] * (width - len(r.request.prompt_ids)) + list(r.request.prompt_ids)
            for r in rows
        ]
        mask = [[0] * (width - len(r.request.prompt_ids)) + [1] * len(r.request.prompt_ids) for r in rows]
        params = rows[0].request.params  # the batch key makes these equal for every row
        kwargs: dict[str, Any] = {
            "input_ids": torch.tensor(ids, dtype=torch.long, device=self._device),  # (B, T) left-padded
            "attention_mask": torch.tensor(mask, dtype=torch.long, device=self._device),  # (B, T)
            "max_new_tokens": max(row.request.params.max_tokens for row in rows),
            "streamer": _make_streamer(rows),
            "stopping_criteria": StoppingCriteriaList([_make_stopping(rows, width)]),
            "pad_token_id": self._pad_token_id,
        }
        if params.greedy:
            kwargs["do_sample"] = False
        else:
            # top_k=0: OpenAI sampling has no top-k, but transformers' default would apply 50.
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
            if params.seed is not None:
                torch.manual_seed(params.seed)
        if self._adapters:
            kwargs["adapter_names"] = [row.request.adapter or BASE_ADAPTER for row in rows]
        with torch.inference_mode():
            output = self._model.generate(**kwargs)
        self.counters.decode_steps += int(output.shape[1]) - width

    def _generate_speculative(self, rows: list[_Row]) -> None:
        from lorafleet.models.decoding import DecodeStats, stream

        adapter = rows[0].request.adapter
        params = rows[0].request.params  # the batch key makes these equal for every row
        stats = DecodeStats()
        emitted = [0] * len(rows)
        # An unseeded sampled request still needs a fresh seed: the decoder's default is fixed.
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        with self._adapter_active(adapter):
            steps = stream(self._model, [list(row.request.prompt_ids) for row in rows],
                           max_new_tokens=max(row.request.params.max_tokens for row in rows),
                           eos_token_ids=sorted(self._eos_ids), heads=self._heads[adapter],
                           temperature=0.0 if params.greedy else params.temperature,
                           top_p=1.0 if params.greedy else params.top_p, seed=seed, stats=stats)
            for step in steps:
                for index, tokens in zip(step.rows, step.new_tokens, strict=True):
                    for token in tokens:
                        emitted[index] += 1
                        self._push(rows[index], token, emitted[index])
                for index, reason in step.finished.items():
                    self._finish(rows[index], reason)
                if all(row.done for row in rows):
                    steps.close()
                    break
        self.counters.decode_steps += stats.steps
        accepted = sum(stats.accepted_per_step)
        self.counters.speculative_steps += len(stats.accepted_per_step)
        self.counters.speculative_drafted += stats.num_heads * len(stats.accepted_per_step)
        self.counters.speculative_accepted += accepted
        if self._on_speculative is not None:
            try:
                self._on_speculative(len(stats.accepted_per_step), stats.num_heads * len(stats.accepted_per_step),
                                     accepted)
            except Exception:  # a metrics hook must not stop generation
                log.exception("the on_speculative hook failed")

    def _adapter_active(self, adapter: str):
        """PEFT's active adapter for the speculative decoder (which takes no `adapter_names=`)."""
        if adapter in self._heads_only:
            disable = getattr(self._model, "disable_adapter", None)
            return disable() if callable(disable) else contextlib.nullcontext()
        self._model.set_adapter(adapter)
        return contextlib.nullcontext()

    @staticmethod
    def _push(row: _Row, token: int, position: int) -> None:
        if row.done:
            return
        reason = row.decide(token, position)
        if reason in (None, "length") and not row.stream.push_threadsafe(token):
            reason = "cancelled"
        if reason is not None:
            row.done = True
            row.stream.finish_threadsafe(reason)

    @staticmethod
    def _finish(row: _Row, reason: str) -> None:
        if not row.done:
            row.done = True
            row.stream.finish_threadsafe(reason)

    def _fail_leftovers(self) -> None:
        with self._cond:
            rows, self._pending = list(self._pending), collections.deque()
            calls, self._calls = list(self._calls), collections.deque()
        for row in rows:
            row.stream.fail_threadsafe("the server is shutting down")
        for _, future in calls:
            future.set_exception(RuntimeError("the generation runner is closed"))


def _eos_token_ids(model: Any) -> frozenset[int]:
    """The model's own end ids, which `generate` applies anyway (generation_config.eos_token_id)."""
    return frozenset(eos_token_ids(model))
