"""One request's token state, shared by the scheduler (policy) and the engine (tensors).

Pure Python on purpose: the scheduler is tested with fake engines, and a sequence must survive
preemption (blocks gone, `num_computed` back to 0) with nothing but these integers, because
recomputing from `all_ids` rebuilds every K/V it lost.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from lorafleet.models.sampling_rules import (
    TOKEN_ID_MAX,
    InvalidRequest,
    check_max_new_tokens,
    check_seed,
    check_stop_ids,
    check_temperature,
    check_top_p,
    is_int,
)


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

    Validated on creation, at the edge of the engine, by the shared rules of `models/sampling_rules.py`
    (which the HTTP schema applies too): a seed `torch.Generator` refuses, a NaN temperature or a budget
    no context could hold fails here, before anything is allocated.
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        check_max_new_tokens(self.max_new_tokens)
        check_temperature(self.temperature)
        check_top_p(self.top_p)
        check_seed(self.seed)
        object.__setattr__(self, "stop_token_ids", check_stop_ids(self.stop_token_ids))  # any iterable in


def check_prompt(prompt_ids: Iterable[int], params: SamplingParams, *, vocab_size: int,
                 limits: Iterable[tuple[int, str]]) -> list[int]:
    """The prompt as a list of in-vocabulary ids whose prompt + budget fits every (limit, what) given.

    The engine passes the model's context length and the KV pool's capacity: a sequence longer than
    every block of the pool together could never be scheduled, so it is refused here, as a 400,
    rather than left to fail later."""
    try:
        prompt = list(prompt_ids)
    except TypeError as error:
        raise InvalidRequest("prompt_ids must be a list of token ids", param="prompt_ids") from error
    if not prompt:
        raise InvalidRequest("prompt_ids is empty: generation needs at least one prompt token", param="prompt_ids")
    if any(not is_int(t) or not 0 <= t < vocab_size for t in prompt):
        raise InvalidRequest(f"prompt_ids contain a token id outside the vocabulary [0, {vocab_size})",
                             param="prompt_ids")
    for limit, what in limits:
        if len(prompt) > limit:
            raise InvalidRequest(f"prompt of {len(prompt)} tokens exceeds {what} of {limit} tokens",
                                 param="prompt_ids")
        if len(prompt) + params.max_new_tokens > limit:
            raise InvalidRequest(f"prompt of {len(prompt)} tokens + up to {params.max_new_tokens} generated tokens "
                                 f"exceed {what} of {limit} tokens", param="max_new_tokens")
    return prompt


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
            raise InvalidRequest(f"request {self.request_id!r}: prompt_ids is empty (generation needs a prompt "
                                 f"token)", param="prompt_ids")
        if any(not is_int(t) or not 0 <= t <= TOKEN_ID_MAX for t in self.prompt_ids):
            raise InvalidRequest(f"request {self.request_id!r}: prompt_ids must be ints >= 0", param="prompt_ids")

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
