"""Continuous-batching policy: which sequences run this step, with how many tokens, in which blocks.

Policy only (STYLE rule 6): integers and `Sequence` objects, no tensors, so every rule here is
tested with fake engines. One `schedule()` call decides one forward:

1. Running sequences, oldest first. A decode feeds 1 token plus up to `seq.lookahead` speculative
   drafts (as many as the budget and the free blocks allow: drafts never cause a preemption); a
   sequence still prefilling feeds the next chunk its share of the token budget allows.
   Blocks for everything fed (drafts included) are reserved *now*, so the engine can never run out
   of cache in the middle of a forward. When blocks run out, the most recently arrived running
   sequence is preempted (blocks freed, recomputed later from its token ids): the oldest request
   always makes progress, so every request finishes.
2. Then waiting sequences, first come first served, are admitted while the token budget, the
   sequence limit and free blocks allow; a long prompt is prefilled in chunks over several steps.
   A sequence whose adapter is not resident yet (`ready(seq)` is False) is skipped without holding
   up the ones behind it. Nothing is admitted in a step that had to preempt: memory is tight.

Not thread-safe: the engine's single stepping thread owns it.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from lorafleet.serving.engine.kv_cache import BlockAllocator, OutOfBlocks, block_keys, grow, shrink
from lorafleet.serving.engine.sequence import SeqStatus, Sequence


class QueueFull(RuntimeError):
    """The waiting queue is at `max_waiting`: the service answers 429 instead of queueing forever."""


@dataclass
class ScheduledSeq:
    """Feed `seq.all_ids[seq.num_computed : seq.num_computed + num_tokens]` this step.

    For a decode (num_tokens == 1) the engine may append up to `seq.lookahead` draft tokens: their
    blocks are reserved and they are counted in the step's token budget. `samples` is True when the
    chunk reaches the end of all_ids, i.e. the engine must sample (and verify drafts) for it.
    """

    seq: Sequence
    num_tokens: int
    samples: bool


@dataclass
class SchedulerOutput:
    """One step's plan. `num_batched_tokens` counts every token the forward will carry, drafts included.

    `finished` lists sequences the scheduler ended as FINISHED_LENGTH because they outgrew the whole
    KV pool (not even alone could they take another step); the engine reports them as done.
    """

    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]
    num_batched_tokens: int
    finished: list[Sequence] = field(default_factory=list)


def _always_ready(seq: Sequence) -> bool:
    return True


class Scheduler:
    """FCFS continuous batching with chunked prefill, speculative reservations and preemption."""

    def __init__(self, allocator: BlockAllocator, *, max_num_seqs: int, max_tokens_per_step: int,
                 max_waiting: int, prefix_caching: bool = False) -> None:
        for name, value in (("max_num_seqs", max_num_seqs), ("max_tokens_per_step", max_tokens_per_step),
                            ("max_waiting", max_waiting)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Scheduler {name} must be an int >= 1, got {value!r}")
        if max_tokens_per_step < max_num_seqs:
            # Otherwise some running decodes could never be scheduled in a step at all.
            raise ValueError(f"max_tokens_per_step ({max_tokens_per_step}) must be >= max_num_seqs "
                             f"({max_num_seqs}): every running sequence needs at least one token per step")
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_tokens_per_step = max_tokens_per_step
        self.max_waiting = max_waiting
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # kept sorted by arrival: the newest is the preemption victim
        self._live: dict[str, Sequence] = {}
        self._arrivals = itertools.count()
        self.prefix_caching = prefix_caching
        self.prefix_query_tokens = 0  # tokens of admitted sequences looked up in the prefix cache
        self.prefix_hit_tokens = 0  # of those, tokens whose K/V came from the cache

    # ----- queues ----------------------------------------------------------------------------------
    @property
    def waiting(self) -> tuple[Sequence, ...]:
        return tuple(self._waiting)

    @property
    def running(self) -> tuple[Sequence, ...]:
        return tuple(self._running)

    @property
    def capacity_tokens(self) -> int:
        """Tokens the whole pool holds: the longest context any one sequence can ever have."""
        return self.allocator.num_blocks * self.allocator.block_size

    def has_unfinished(self) -> bool:
        return bool(self._live)

    def num_waiting(self) -> int:
        return len(self._waiting)

    def num_running(self) -> int:
        return len(self._running)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; refuses up front what could never run, leaving no state behind."""
        if seq.request_id in self._live:
            raise ValueError(f"request {seq.request_id!r} is already scheduled")
        if seq.status is not SeqStatus.WAITING or seq.blocks or seq.num_computed:
            raise ValueError(f"request {seq.request_id!r}: add() takes a new sequence (status WAITING, "
                             f"no blocks, nothing computed), got status {seq.status.name}")
        if seq.num_tokens > self.capacity_tokens:
            raise ValueError(f"request {seq.request_id!r}: prompt of {seq.num_tokens} tokens can never fit the "
                             f"KV cache of {self.allocator.num_blocks} blocks x {self.allocator.block_size} "
                             f"tokens = {self.capacity_tokens} tokens")
        if len(self._waiting) >= self.max_waiting:
            raise QueueFull(f"request {seq.request_id!r} refused: {len(self._waiting)} requests already "
                            f"waiting (max_waiting={self.max_waiting})")
        seq.arrival = next(self._arrivals)
        self._waiting.append(seq)
        self._live[seq.request_id] = seq

    def abort(self, request_id: str) -> Sequence | None:
        """Cancel a waiting or running sequence; None if it is not (or no longer) here."""
        seq = self._live.get(request_id)
        if seq is None:
            return None
        self._remove(seq, SeqStatus.FINISHED_ABORT)
        return seq

    def finish(self, seq: Sequence, status: SeqStatus) -> None:
        """The engine decided `seq` is done (stop token, length, error): free its blocks."""
        if not status.finished:
            raise ValueError(f"finish() needs a FINISHED_* status, got {status.name}")
        self._owned(seq, "finish")
        self._remove(seq, status)

    def after_step(self, seq: Sequence, num_computed: int) -> None:
        """The engine's report after a forward: K/V of the first `num_computed` tokens are valid.

        Blocks past what the next step needs (num_computed + 1) are freed: that is the rollback of
        rejected speculative drafts, whose K/V was written but is garbage now.
        """
        self._owned(seq, "after_step")
        if seq.status is not SeqStatus.RUNNING:
            raise ValueError(f"after_step: request {seq.request_id!r} is {seq.status.name}, not RUNNING")
        if not 0 <= num_computed < seq.num_tokens:
            raise ValueError(f"after_step: request {seq.request_id!r} reports num_computed={num_computed} for "
                             f"{seq.num_tokens} tokens (must be < num_tokens: append sampled tokens first)")
        reserved = len(seq.blocks) * self.allocator.block_size
        if num_computed > reserved:
            raise ValueError(f"after_step: request {seq.request_id!r} reports num_computed={num_computed} but "
                             f"only {reserved} token slots were reserved")
        seq.num_computed = num_computed
        shrink(seq.blocks, num_computed + 1, self.allocator)
        self._register(seq)

    # ----- the step --------------------------------------------------------------------------------
    def schedule(self, ready: Callable[[Sequence], bool] = _always_ready) -> SchedulerOutput:
        """Plan one forward (see the module docstring for the order of decisions)."""
        out = SchedulerOutput(scheduled=[], preempted=[], num_batched_tokens=0)
        budget = self._schedule_running(self.max_tokens_per_step, out)
        if not out.preempted:
            budget = self._admit_waiting(budget, ready, out)
        out.num_batched_tokens = self.max_tokens_per_step - budget
        return out

    def _schedule_running(self, budget: int, out: SchedulerOutput) -> int:
        i = 0
        while i < len(self._running) and budget > 0:
            seq = self._running[i]
            if seq.num_tokens > self.capacity_tokens:
                self._end_too_long(seq, out)
                continue
            if seq.is_prefilling:
                seq.lookahead = 0
                num_tokens = min(seq.num_tokens - seq.num_computed, budget)
            else:
                # Drafts are an optimisation: trimmed to the budget and to blocks free right now, they
                # never skip a decode nor preempt anyone. The engine reads seq.lookahead after schedule().
                num_tokens = 1
                # Only truly free blocks: optional drafts must not evict cached prefixes.
                room = (len(seq.blocks) + self.allocator.num_unused()) * self.allocator.block_size - seq.num_tokens
                seq.lookahead = max(0, min(seq.lookahead, budget - 1, room))
            if not self._reserve(seq, seq.num_computed + num_tokens + seq.lookahead, out.preempted):
                break  # seq preempted itself: it was the newest running sequence, none follow it
            out.scheduled.append(ScheduledSeq(seq, num_tokens, seq.num_computed + num_tokens == seq.num_tokens))
            budget -= num_tokens + seq.lookahead
            i += 1
        return budget

    def _reserve(self, seq: Sequence, num_tokens: int, preempted: list[Sequence]) -> bool:
        """Grow `seq` to `num_tokens`, preempting the newest running sequences until it fits.

        Victims come from the end of the arrival-sorted running list, which the caller has not
        scheduled yet this step (it walks from the front), unless the victim is `seq` itself.
        """
        while True:
            try:
                grow(seq.blocks, num_tokens, self.allocator)
                return True
            except OutOfBlocks:
                victim = self._running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    return False

    def _preempt(self, seq: Sequence) -> None:
        """Recompute policy: drop all K/V; the token ids (outputs included) rebuild it on readmission
        (from the prefix cache, as far as its registered blocks survive until then)."""
        self._release(seq)
        seq.lookahead = 0
        seq.status = SeqStatus.WAITING
        self._waiting.appendleft(seq)  # victims go newest first, so older ones end up in front

    def _admit_waiting(self, budget: int, ready: Callable[[Sequence], bool], out: SchedulerOutput) -> int:
        admitted = False
        computing = self._first_blocks_in_flight()
        for seq in list(self._waiting):
            if budget <= 0 or len(self._running) >= self.max_num_seqs:
                break
            if not ready(seq) or self._wait_for_prefix(seq, computing):
                continue
            self._match_prefix(seq)  # num_computed: 0, or the tokens whose K/V the prefix cache holds
            num_tokens = min(seq.num_tokens - seq.num_computed, budget)
            try:
                grow(seq.blocks, seq.num_computed + num_tokens, self.allocator)
            except OutOfBlocks:
                self._release(seq)
                break  # FCFS: a later, smaller request does not overtake this one on memory
            if self.prefix_caching:
                self.prefix_query_tokens += seq.num_tokens
                self.prefix_hit_tokens += seq.num_computed
            seq.status = SeqStatus.RUNNING
            seq.lookahead = 0
            bisect.insort(self._running, seq, key=lambda s: s.arrival)
            out.scheduled.append(ScheduledSeq(seq, num_tokens, seq.num_computed + num_tokens == seq.num_tokens))
            budget -= num_tokens
            admitted = True
            if self.prefix_caching and seq.num_registered == 0 and seq.block_keys:
                computing.add(seq.block_keys[0])
        if admitted:  # one O(waiting) rebuild instead of a deque.remove per admitted sequence
            self._waiting = deque(s for s in self._waiting if s.status is SeqStatus.WAITING)
        return budget

    # ----- bookkeeping -----------------------------------------------------------------------------
    def _end_too_long(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Its next token cannot fit even with the whole pool: the cache size is its length limit."""
        self._remove(seq, SeqStatus.FINISHED_LENGTH)
        out.finished.append(seq)

    def _owned(self, seq: Sequence, action: str) -> None:
        if self._live.get(seq.request_id) is not seq:
            raise ValueError(f"{action}: request {seq.request_id!r} is not a live sequence of this scheduler")

    # ----- prefix caching ---------------------------------------------------------------------------
    def _match_prefix(self, seq: Sequence) -> None:
        """Start a sequence on the cached blocks of its longest cached prefix, leaving at least one
        token to feed: the step that samples needs that token's hidden state."""
        if not self.prefix_caching:
            return
        size = self.allocator.block_size
        keys = self._keys(seq)
        matched = self.allocator.match_prefix(keys[: (seq.num_tokens - 1) // size])
        seq.blocks.extend(matched)
        seq.num_computed = len(matched) * size
        seq.num_registered = len(matched)

    def _first_blocks_in_flight(self) -> set:
        """Keys of first blocks that running sequences are computing now (not in the cache yet)."""
        if not self.prefix_caching:
            return set()
        return {seq.block_keys[0] for seq in self._running if seq.num_registered == 0 and seq.block_keys}

    def _wait_for_prefix(self, seq: Sequence, computing: set) -> bool:
        """Cache-aware admission (as SGLang schedules): a request whose first block another request is
        computing right now waits one step and then reuses it, instead of computing the same K/V twice.
        The other request is running and registers the block when this step ends, so the wait is short."""
        if not computing:
            return False
        if seq.num_tokens < self.allocator.block_size:
            return False
        fresh = seq.block_keys and seq.keys_salt == seq.cache_salt  # no list rebuild per waiting step
        first = seq.block_keys[0] if fresh else self._keys(seq)[0]
        return first in computing and not self.allocator.is_cached(first)

    def _keys(self, seq: Sequence) -> list:
        """`seq`'s block keys, recomputed from scratch when its salt changed (its adapter was reloaded)."""
        if seq.keys_salt != seq.cache_salt:
            seq.block_keys.clear()
            seq.keys_salt = seq.cache_salt
        return block_keys(seq.all_ids, seq.cache_salt, self.allocator.block_size, seq.block_keys)

    def _register(self, seq: Sequence) -> None:
        """Offer every newly completed full block of computed K/V to the prefix cache."""
        if not self.prefix_caching:
            return
        size = self.allocator.block_size
        # A finishing sequence may have computed accepted drafts past the stop token it was cut at.
        full = min(min(seq.num_computed, seq.num_tokens) // size, len(seq.blocks))
        if full <= seq.num_registered:
            return
        keys = self._keys(seq)
        for i in range(seq.num_registered, full):
            self.allocator.register(seq.blocks[i], keys[i])
        seq.num_registered = full

    def _release(self, seq: Sequence) -> None:
        """Give back all of `seq`'s blocks (registered ones stay cached) and forget its progress."""
        self._register(seq)
        self.allocator.free(seq.blocks)
        seq.blocks.clear()
        seq.num_computed = seq.num_registered = 0

    def _remove(self, seq: Sequence, status: SeqStatus) -> None:
        self._release(seq)
        if seq.status is SeqStatus.RUNNING:
            self._running.remove(seq)
        else:
            self._waiting.remove(seq)
        seq.status = status
        seq.lookahead = 0
        del self._live[seq.request_id]
