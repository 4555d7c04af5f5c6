"""One request's token state, shared by the scheduler (policy) and the engine (tensors).

Pure Python on purpose: the scheduler is tested with fake engines, and a sequence must survive
preemption (blocks gone, `num_computed` back to 0) with nothing but these integers, because
recomputing from `all_ids` rebuilds every K/V it lost.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOP = "finished_stop"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORT = "finished_abort"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({SeqStatus.FINISHED_STOP, SeqStatus.FINISHED_LENGTH, SeqStatus.FINISHED_ABORT})


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens; frozen because a request's params must not change under a running batch.

    Validated here, at the edge of the engine, so a bad request fails before anything is allocated.
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        try:
            stops = frozenset(self.stop_token_ids)
        except TypeError as error:
            raise ValueError(f"stop_token_ids must be a collection of ints, got {self.stop_token_ids!r}") from error
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in stops):
            raise ValueError(f"stop_token_ids must be ints >= 0, got {sorted(stops, key=repr)!r}")
        object.__setattr__(self, "stop_token_ids", stops)  # accept any iterable, store a frozenset


@dataclass(eq=False)
class Sequence:
    """A request as token ids. It feeds `all_ids[num_computed:]`; K/V of the first `num_computed`
    tokens are in the blocks listed in `blocks`.

    Identity equality (eq=False): two requests with the same tokens are still two sequences, and the
    scheduler removes sequences from its queues by identity.
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V is in the cache
    blocks: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    arrival: int = -1  # set by Scheduler.add: FCFS order, and who is preempted first (the newest)
    lookahead: int = 0  # draft tokens wanted per decode step; schedule() may lower it to what it reserved
    cache_salt: str = ""  # prefix caching: sequences share K/V blocks only under the same salt (adapter)
    block_keys: list = field(default_factory=list, repr=False)  # prefix-cache keys of its full blocks so far
    keys_salt: str = ""  # the salt `block_keys` were computed with (a new salt invalidates them)
    num_registered: int = 0  # leading blocks already registered in the prefix cache

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError(f"request_id must be a non-empty string, got {self.request_id!r}")
        if not self.prompt_ids:
            raise ValueError(f"request {self.request_id!r}: prompt_ids is empty (generation needs a prompt token)")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.prompt_ids):
            raise ValueError(f"request {self.request_id!r}: prompt_ids must be ints >= 0")

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_prefilling(self) -> bool:
        """More than one token left to feed. In decode state only the last sampled token is unfed
        (num_computed == num_tokens - 1), so a decode step feeds exactly one token (+ drafts)."""
        return self.num_computed < self.num_tokens - 1

    @property
    def finished(self) -> bool:
        return self.status.finished
