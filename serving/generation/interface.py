"""The one generator interface: what the HTTP layer, the catalogue and the admin API may ask of a generator.

Two generators implement `TokenGenerator` fully: `EngineGenerator` (the continuous-batching engine under
`serving/engine/`, the default) and `GenerationRunner` (PEFT + Hugging Face `generate`: base models the
engine does not implement, and the baseline the benchmarks compare against). Callers never ask which one
they hold: where the two differ, the difference is an answer of the interface (`warm` returns no slot,
`unload` raises `UnloadNotSupported`, `stats()` says which backend and what it can hold).

The types speak token ids only: a request is prompt ids + sampling parameters + an adapter name, the answer
an async stream of token ids that ends with a finish reason. Sampling bounds and stop rules are the shared
ones of `models/sampling_rules.py`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from lorafleet.models.grammar import CompiledGrammar
from lorafleet.models.merging import MergeRecipe
from lorafleet.models.sampling_rules import (
    TEMPERATURE_MAX,
    InvalidRequest,
    check_max_new_tokens,
    check_seed,
    check_stop_ids,
    check_temperature,
    check_top_p,
)

FinishReason = Literal["stop", "length", "cancelled"]


class GenerationFailed(RuntimeError):
    """The batch this request ran in raised; the message says why. Other batches are unaffected."""


class GeneratorBusy(RuntimeError):
    """The request queue is full: the caller should retry later (HTTP 429)."""


class UnknownAdapter(LookupError):
    """A name never given to `load` (the engine's cache raises its own LookupError, AdapterNotFound)."""


class UnloadNotSupported(RuntimeError):
    """This generator keeps every adapter it loaded and cannot evict one (the admin API answers 501)."""


class RequestRejected(ValueError):
    """The generator cannot run this request as asked (HTTP 400); nothing was queued or allocated.

    `param` names the request field at fault when one is (`seed`, `max_tokens`, `prompt`...)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# Decoder-side field names as the API's request names them (RequestRejected.param).
_API_PARAMS = {"prompt_ids": "prompt", "max_new_tokens": "max_tokens", "adapter": "model", "stop_token_ids": "stop"}


def rejected(error: Exception) -> RequestRejected:
    """A decoder's refusal (`sampling_rules.InvalidRequest`...) as the service's 400, its `param` renamed to
    the API's field."""
    param = getattr(error, "param", None)
    return RequestRejected(str(error), param=_API_PARAMS.get(param, param))


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding knobs, checked by the shared rules (`sampling_rules`) with the API's names.
    `temperature == 0` means greedy decoding."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    # Extra ids that end this request; the model's own EOS ids always do.
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        try:
            check_max_new_tokens(self.max_tokens, param="max_tokens")
            check_temperature(self.temperature, maximum=TEMPERATURE_MAX)
            check_top_p(self.top_p)
            check_seed(self.seed)
            check_stop_ids(self.stop_token_ids)
        except InvalidRequest as error:
            raise rejected(error) from None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    adapter: str | None = None  # a name given to `TokenGenerator.load`; None = the bare base model
    grammar: CompiledGrammar | None = None  # structured output (`response_format`), compiled by the API

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("prompt_ids must hold at least one token")


@dataclass
class _Finished:
    reason: FinishReason


@dataclass
class _Failed:
    message: str


StreamItem = int | _Finished | _Failed


@dataclass(eq=False)
class TokenStream:
    """Async iterator over one request's generated token ids (stop tokens excluded).

    Created on the caller's event loop; the generator thread feeds it with `push_threadsafe`.
    After iteration ends, `finish_reason` says why. `cancel()` ends iteration at once and tells the
    generator to drop the request (used when the client disconnects or a stop string matched).
    """

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finish_reason: FinishReason | None = None
    cancelled: bool = False

    def __aiter__(self) -> AsyncIterator[int]:
        return self

    async def __anext__(self) -> int:
        if self.finish_reason is not None:
            raise StopAsyncIteration
        item = _Finished("cancelled") if self.cancelled else await self.queue.get()
        if self.cancelled:  # tokens still queued when the consumer cancelled are not wanted
            item = _Finished("cancelled")
        if isinstance(item, int):
            return item
        if isinstance(item, _Finished):
            self.finish_reason = item.reason
            raise StopAsyncIteration
        self.finish_reason = "cancelled"
        raise GenerationFailed(item.message)

    def cancel(self) -> None:
        """Safe to call more than once and after the stream finished; only the first call counts."""
        if self.finish_reason is None and not self.cancelled:
            self.cancelled = True
            self.queue.put_nowait(_Finished("cancelled"))  # wakes a consumer blocked in __anext__

    # -- producer side (any thread) --------------------------------------------------------------

    def push_threadsafe(self, item: StreamItem) -> bool:
        """Hand an item to the consumer's loop; False when that loop is gone (treat as cancelled)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop was closed: nobody is listening any more
            self.cancelled = True
            return False
        return True

    def finish_threadsafe(self, reason: FinishReason) -> None:
        self.push_threadsafe(_Finished(reason))

    def fail_threadsafe(self, message: str) -> None:
        self.push_threadsafe(_Failed(message))


@dataclass(frozen=True)
class ResidentAdapter:
    """One adapter in a generator's memory, as the admin listing shows it."""

    adapter: str
    slot: int | None  # the engine's LoRA slot (0: Turbo heads only); None: the generator has no slots
    turbo_heads: bool | None  # None: the generator does not say
    running: int  # running requests pin it: it cannot be unloaded until they finish

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GeneratorStats:
    """What a generator is and holds now (admin listing, context limit)."""

    backend: Literal["engine", "peft"]
    adapter_slots: int | None  # adapters resident at once; None: no limit (every loaded adapter stays)
    capacity_tokens: int | None  # prompt + completion tokens one request can ever hold; None: the model's limit
    waiting: int  # requests queued, not yet running
    running: int  # requests generating now
    # The speculation policy's running tau per adapter name ("" = base); empty when the generator has none.
    spec_tau: dict[str, float] = field(default_factory=dict)


class AdapterLoader(Protocol):
    """What the adapter catalogue needs: make a name usable, and undo it after a failed admin load."""

    def load(self, name: str, adapter_dir: Path) -> None:
        """Make `name` usable as `GenerationRequest.adapter` (blocking; safe from any thread). The engine
        starts reading it in the background; the PEFT runner loads it before returning."""
        ...

    def unload(self, name: str) -> bool:
        """Evict `name` now; it is read again on its next request. False when running requests pin it or it
        was not resident. Raises UnloadNotSupported when this generator cannot evict."""
        ...


class TokenGenerator(AdapterLoader, Protocol):
    """A generation backend: the whole of what the service may ask of one."""

    @property
    def adapters(self) -> frozenset[str]:
        """Every name given to `load` (resident or not)."""
        ...

    def submit(self, request: GenerationRequest) -> TokenStream:
        """Queue a request; must be called on the event loop that will consume the stream. Raises
        RequestRejected (400), GeneratorBusy (429) or LookupError (an adapter never loaded); nothing is
        queued then."""
        ...

    def load_merge(self, parents: Sequence[str], recipe: MergeRecipe) -> str:
        """The adapter name under which a merge of loaded `parents` runs (`models/merging.py` arithmetic).
        Raises RequestRejected (400) for a merge this generator cannot serve, UnknownAdapter for a parent
        never loaded."""
        ...

    def warm(self, name: str) -> int | None:
        """Make a loaded `name` resident now (blocking); its slot, or None (no free slot yet, or a generator
        without slots). Raises LookupError for a name never loaded, and the loading error when its files
        cannot be read."""
        ...

    def resident(self) -> list[ResidentAdapter]:
        """The adapters in memory now, most recently used first."""
        ...

    def stats(self) -> GeneratorStats: ...

    def close(self) -> None: ...
