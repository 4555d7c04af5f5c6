"""Prefix caching: K/V blocks of computed prompt prefixes are shared, per adapter, and outputs never change.

The allocator is tested in integers; the scheduler with a fake engine whose cache records
(salt, position, token) per slot, so a sequence reading a block computed for another adapter or
another prefix, or writing into a shared block, fails the read; the real engine is checked against
itself with caching off on the tiny random Llama.
"""

from __future__ import annotations

import random

import pytest
import test_engine
from test_engine import PROMPTS, make_engine, run
from test_engine_scheduler import STOP, reference, target

from lorafleet.serving.engine.kv_cache import BlockAllocator, OutOfBlocks, block_keys, slot_indices
from lorafleet.serving.engine.scheduler import Scheduler, SchedulerOutput
from lorafleet.serving.engine.sequence import SamplingParams, SeqStatus, Sequence


# ----- allocator --------------------------------------------------------------------------------------
def keys_of(tokens: list[int], salt: str = "", block_size: int = 4) -> list:
    return block_keys(tokens, salt, block_size, [])


def test_registered_blocks_are_shared_then_evictable_then_recycled_lru():
    alloc = BlockAllocator(4, 4)
    a = alloc.allocate(2)
    keys = keys_of(list(range(8)))
    for block, key in zip(a, keys):
        alloc.register(block, key)
    assert alloc.match_prefix(keys) == a and [alloc.holders(b) for b in a] == [2, 2]
    alloc.free(a)  # the first owner leaves: still held by the second
    assert alloc.num_free() == 2 and alloc.num_cached() == 2
    alloc.free(a)  # nobody holds them: evictable, counted as free, still matchable
    assert alloc.num_free() == 4 and alloc.match_prefix(keys[:1]) == a[:1]
    alloc.free(a[:1])
    fresh = alloc.allocate(2)  # truly free blocks go first: the cache survives
    assert set(fresh).isdisjoint(a) and alloc.num_cached() == 2
    recycled = alloc.allocate(1)  # now a cached block must be recycled: the least recently used one
    assert recycled == [a[1]] and alloc.match_prefix(keys) == [a[0]]


def test_free_counts_holds_and_refuses_one_too_many():
    alloc = BlockAllocator(2, 4)
    (block,) = alloc.allocate(1)
    alloc.register(block, keys_of([1, 2, 3, 4])[0])
    alloc.match_prefix(keys_of([1, 2, 3, 4]))
    with pytest.raises(ValueError, match="double free"):
        alloc.free([block, block, block])
    assert alloc.holders(block) == 2  # the refused call changed nothing
    alloc.free([block, block])
    with pytest.raises(ValueError, match="double free"):
        alloc.free([block])
    with pytest.raises(ValueError, match="not held"):
        alloc.register(block, keys_of([5, 6, 7, 8])[0])


def test_keys_name_the_whole_prefix_and_the_adapter():
    same_block_other_prefix = keys_of([9, 9, 9, 9, 1, 2, 3, 4])[1], keys_of([0, 0, 0, 0, 1, 2, 3, 4])[1]
    assert same_block_other_prefix[0] != same_block_other_prefix[1]
    assert keys_of([1, 2, 3, 4], "a")[0] != keys_of([1, 2, 3, 4], "b")[0]
    assert len(keys_of(list(range(11)))) == 2  # only full blocks have keys
    known = keys_of(list(range(8)))
    assert block_keys(list(range(12)), "", 4, known)[:2] == keys_of(list(range(8))) and len(known) == 3


def test_forget_cached_frees_evictable_blocks_and_stops_matching():
    alloc = BlockAllocator(3, 2)
    blocks = alloc.allocate(2)
    keys = keys_of([1, 2, 3, 4], block_size=2)
    for block, key in zip(blocks, keys):
        alloc.register(block, key)
    alloc.free(blocks[1:])
    alloc.forget_cached()
    assert alloc.num_cached() == 0 and alloc.match_prefix(keys) == [] and alloc.num_free() == 2
    alloc.free(blocks[:1])  # still held through the call; freed now, to the free list
    assert alloc.num_free() == 3 and alloc.num_cached() == 0


def test_allocate_is_all_or_nothing_with_cached_blocks():
    alloc = BlockAllocator(3, 2)
    blocks = alloc.allocate(2)
    alloc.register(blocks[0], keys_of([1, 2], block_size=2)[0])
    alloc.free(blocks)
    held = alloc.allocate(2)
    with pytest.raises(OutOfBlocks):
        alloc.allocate(2)
    assert alloc.num_free() == 1 and held


# ----- scheduler with a fake engine -------------------------------------------------------------------
class PrefixFakeEngine:
    """Feeds tokens like tests/test_engine_scheduler.FakeEngine, with a cache keyed by what K/V depends
    on (salt, position, token), and refuses to write into a block another sequence also holds."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched, self.block_size = sched, sched.allocator.block_size
        self.cache: dict[int, tuple[str, int, int]] = {}
        self.outputs: dict[str, list[int]] = {}
        self.fed_tokens = 0

    def run(self, max_steps: int = 5000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                return
            self.step()
        raise AssertionError("sequences did not finish: the scheduler is stuck")

    def step(self) -> SchedulerOutput:
        out = self.sched.schedule()
        for item in out.scheduled:
            seq, start = item.seq, item.seq.num_computed
            fed = seq.all_ids[start:start + item.num_tokens]
            self.fed_tokens += len(fed)
            for offset, slot in enumerate(slot_indices(seq.blocks, start, start + len(fed), self.block_size)):
                assert self.sched.allocator.holders(slot // self.block_size) == 1, "write into a shared block"
                self.cache[slot] = (seq.cache_salt, start + offset, fed[offset])
            seq.num_computed += item.num_tokens
            if not item.samples:
                self.sched.after_step(seq, seq.num_computed)
                continue
            slots = slot_indices(seq.blocks, 0, seq.num_computed, self.block_size)
            expected = [(seq.cache_salt, p, t) for p, t in enumerate(seq.all_ids[:seq.num_computed])]
            assert [self.cache.get(s) for s in slots] == expected, seq.request_id
            token = target(seq.all_ids)
            if token == STOP or len(seq.output_ids) + 1 == seq.params.max_new_tokens:
                if token != STOP:
                    seq.output_ids.append(token)
                self.sched.finish(seq, SeqStatus.FINISHED_STOP if token == STOP else SeqStatus.FINISHED_LENGTH)
                self.outputs[seq.request_id] = list(seq.output_ids)
            else:
                seq.output_ids.append(token)
                self.sched.after_step(seq, seq.num_computed)
        return out


def shared_prefix_workload(n: int, seed: int) -> list[Sequence]:
    """Prompts = one of three long common prefixes + a short private tail; three adapters (salts)."""
    rng = random.Random(seed)
    prefixes = [[rng.randint(4, 30) for _ in range(rng.randint(5, 14))] for _ in range(3)]
    seqs = []
    for i in range(n):
        prompt = rng.choice(prefixes) + [rng.randint(4, 30) for _ in range(rng.randint(0, 3))]
        params = SamplingParams(max_new_tokens=rng.randint(1, 8), stop_token_ids=frozenset({STOP}))
        seq = Sequence(f"r{i}", prompt, params)
        seq.cache_salt = rng.choice(["", "x", "y"])
        seqs.append(seq)
    return seqs


@pytest.mark.parametrize("seed", range(4))
def test_shared_prefixes_are_computed_once_and_outputs_do_not_change(seed):
    fed = {}
    for caching, num_blocks in ((False, 1000), (True, 1000), (True, 14)):  # 14: evictions, preemptions
        sched = Scheduler(BlockAllocator(num_blocks, 2), max_num_seqs=4, max_tokens_per_step=12, max_waiting=64,
                          prefix_caching=caching)
        engine = PrefixFakeEngine(sched)
        seqs = shared_prefix_workload(24, seed)
        for seq in seqs:
            sched.add(seq)
        engine.run()
        assert engine.outputs == {s.request_id: reference(s.prompt_ids, s.params) for s in seqs}
        assert sched.allocator.num_free() == num_blocks  # nothing held: all free or evictable
        fed[(caching, num_blocks)] = engine.fed_tokens
        if caching:
            assert 0 < sched.prefix_hit_tokens < sched.prefix_query_tokens
    assert fed[(True, 1000)] < fed[(False, 1000)]  # the cache really saved prefill work


def test_a_fully_cached_prompt_still_feeds_its_last_token():
    sched = Scheduler(BlockAllocator(16, 4), max_num_seqs=4, max_tokens_per_step=64, max_waiting=8,
                      prefix_caching=True)
    engine = PrefixFakeEngine(sched)
    params = SamplingParams(max_new_tokens=1)
    sched.add(Sequence("first", list(range(4, 12)), params))
    engine.run()
    sched.add(Sequence("again", list(range(4, 12)), params))  # 8 tokens = 2 full cached blocks
    out = sched.schedule()
    (item,) = out.scheduled
    assert item.seq.num_computed == 4 and item.num_tokens == 4 and item.samples  # one block reused
    other = Sequence("other adapter", list(range(4, 12)), params)
    other.cache_salt = "x"
    sched.add(other)
    assert [i.seq.num_computed for i in sched.schedule().scheduled if i.seq is other] == [0]


# ----- the real engine --------------------------------------------------------------------------------
compact, adapters = test_engine.compact, test_engine.adapters  # the engine tests' module fixtures
LONG = [PROMPTS[2] * 4 + [5, 6], PROMPTS[2] * 4 + [7], PROMPTS[2] * 4 + [8, 9, 10]]  # 38-40 tokens, 2 shared blocks


def test_engine_outputs_with_prefix_caching_equal_without(compact, adapters):
    requests = [(name, i) for name in (None, "a0", "a1", "turbo") for i in range(3)]

    def serve(engine):
        outputs = {}
        for round_ in range(2):  # the second round finds every prefix cached
            out = run(engine, requests, prompts=LONG)
            outputs.update({f"{round_}-{k}": v for k, v in out.items()})
        return outputs

    plain = serve(make_engine(compact, adapters, prefix_caching=False, speculation="on"))
    cached_engine = make_engine(compact, adapters, speculation="on")
    assert serve(cached_engine) == plain
    assert cached_engine.scheduler.prefix_hit_tokens >= 12 * 32  # round two: 2 blocks of 16 per request
    small = make_engine(compact, adapters, kv_cache_mb=0.05, speculation="on")  # evicts as it goes
    assert serve(small) == plain


def test_a_request_waits_one_step_for_a_prefix_another_is_computing():
    """Cache-aware admission: of two requests with the same first block arriving together, the second
    waits while the first computes it, then reuses it; a different adapter's request does not wait."""
    sched = Scheduler(BlockAllocator(32, 4), max_num_seqs=8, max_tokens_per_step=64, max_waiting=8,
                      prefix_caching=True)
    params = SamplingParams(max_new_tokens=2)
    first, twin, other = (Sequence(rid, list(range(4, 14)) + [tail], params) for rid, tail in
                          (("first", 20), ("twin", 21), ("other", 22)))
    other.cache_salt = "x"
    for seq in (first, twin, other):
        sched.add(seq)
    engine = PrefixFakeEngine(sched)
    step1 = engine.step()
    assert [item.seq.request_id for item in step1.scheduled] == ["first", "other"]
    step2 = engine.step()
    (admitted,) = [item for item in step2.scheduled if item.seq is twin]
    assert admitted.num_tokens == 3 and sched.prefix_hit_tokens == 8  # two cached blocks reused, 3 tokens fed
    engine.run()
    assert sched.prefix_hit_tokens == 8


def test_a_sequence_that_hit_the_cache_registers_its_later_blocks():
    """Multi-turn chats: turn 2 (turn 1's tokens + more) must leave its own full blocks cached for turn 3."""
    sched = Scheduler(BlockAllocator(32, 4), max_num_seqs=4, max_tokens_per_step=64, max_waiting=8,
                      prefix_caching=True)
    engine = PrefixFakeEngine(sched)
    turn1 = list(range(4, 13))  # 9 tokens: 2 full blocks
    sched.add(Sequence("turn1", turn1, SamplingParams(max_new_tokens=1)))
    engine.run()
    turn2 = turn1 + list(range(20, 36))  # 25 tokens: 6 full blocks, the first 2 cached
    sched.add(Sequence("turn2", turn2, SamplingParams(max_new_tokens=1)))
    engine.run()
    assert sched.prefix_hit_tokens == 8 and sched.allocator.num_cached() == 6
    sched.add(Sequence("turn3", turn2 + [40, 41], SamplingParams(max_new_tokens=1)))
    engine.run()
    assert sched.prefix_hit_tokens == 8 + 24


def test_eviction_takes_a_chain_from_its_tail():
    alloc = BlockAllocator(4, 2)
    chain = alloc.allocate(3)
    keys = keys_of([1, 2, 3, 4, 5, 6], block_size=2)
    for block, key in zip(chain, keys):
        alloc.register(block, key)
    alloc.free(chain)
    alloc.allocate(2)  # one truly free block, then one cached block must go: the chain's last
    assert alloc.match_prefix(keys) == chain[:2]


def test_a_new_salt_discards_keys_computed_with_the_old_one():
    sched = Scheduler(BlockAllocator(16, 4), max_num_seqs=4, max_tokens_per_step=64, max_waiting=8,
                      prefix_caching=True)
    engine = PrefixFakeEngine(sched)
    prompt = list(range(4, 13))
    old = Sequence("old weights", prompt, SamplingParams(max_new_tokens=1))
    old.cache_salt = "adapter\x00v1"
    sched.add(old)
    engine.run()
    again = Sequence("reloaded", prompt, SamplingParams(max_new_tokens=1))
    again.cache_salt = "adapter\x00v1"
    again.block_keys.extend(block_keys(prompt, "adapter\x00v1", 4, []))  # keys from before the reload
    again.keys_salt = "adapter\x00v1"
    again.cache_salt = "adapter\x00v2"  # the adapter was reloaded with new weights meanwhile
    sched.add(again)
    engine.run()  # the fake engine's cache check fails if v1's K/V were read under v2
    assert sched.prefix_hit_tokens == 0
