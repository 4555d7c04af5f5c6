"""The token-level contract between the HTTP layer and whatever generates tokens.

The OpenAI layer speaks only these types: a request is prompt token ids + sampling parameters + an
adapter name, and the answer is an async stream of token ids that ends with a finish reason. Today
`serving.runner.GenerationRunner` (PEFT + `generate`) implements it; the continuous-batching engine
planned under `serving/engine/` will implement the same `TokenGenerator` protocol, so swapping it in
touches only the service wiring.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

FinishReason = Literal["stop", "length", "cancelled"]


class GenerationFailed(RuntimeError):
    """The batch this request ran in raised; the message says why. Other batches are unaffected."""


class GeneratorBusy(RuntimeError):
    """The request queue is full: the caller should retry later (HTTP 429)."""


class RequestRejected(ValueError):
    """The generator cannot run this request as asked (HTTP 400); nothing was queued or allocated.

    `param` names the request field at fault when one is (`seed`, `max_tokens`, `prompt`...)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding knobs. `temperature == 0` means greedy decoding."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    # Extra ids that end this request; the model's own EOS ids always do.
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    adapter: str | None = None  # a name given to `load_adapter`; None = the bare base model

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


class TokenGenerator(Protocol):
    """What the service needs from a generation backend."""

    def submit(self, request: GenerationRequest) -> TokenStream:
        """Queue a request; must be called on the event loop that will consume the stream."""
        ...

    def load_adapter(self, name: str, adapter_dir: Path) -> None:
        """Make `name` usable as `GenerationRequest.adapter` (blocking; safe from any thread)."""
        ...

    def close(self) -> None: ...
