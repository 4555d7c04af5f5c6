"""Scheduler policy, driven by fake engines (no model, no tensors).

The fake engine writes (request, position, token) into a fake paged KV cache at the slots the
scheduler reserved and reads the whole context back before "sampling": a block shared by two
sequences, a lost block or a missing reservation fails the read. Its model is a deterministic hash
of the context, so recomputation after preemption must reproduce exactly the same outputs.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from lorafleet.serving.engine.kv_cache import BlockAllocator, slot_indices
from lorafleet.serving.engine.scheduler import QueueFull, Scheduler, SchedulerOutput
from lorafleet.serving.engine.sequence import SamplingParams, SeqStatus, Sequence

VOCAB, STOP = 40, 3


def target(tokens: list[int]) -> int:
    """The fake model's greedy token: depends on the whole context, like a real one."""
    h = 17
    for t in tokens:
        h = (h * 1_000_003 + t) % 2_147_483_647
    return h % VOCAB


def reference(prompt: list[int], params: SamplingParams) -> list[int]:
    out: list[int] = []
    while len(out) < params.max_new_tokens:
        token = target(prompt + out)
        if token in params.stop_token_ids:
            break
        out.append(token)
    return out


def make(rid: str, n: int, max_new: int = 4, adapter: str | None = None, first: int = 1) -> Sequence:
    params = SamplingParams(max_new_tokens=max_new, stop_token_ids=frozenset({STOP}))
    return Sequence(rid, [first + i for i in range(n)], params, adapter=adapter)


def make_scheduler(num_blocks: int = 64, block_size: int = 4, *, max_num_seqs: int | None = None, budget: int = 64,
                   max_waiting: int = 32) -> Scheduler:
    max_num_seqs = max_num_seqs if max_num_seqs is not None else min(8, budget)
    return Scheduler(BlockAllocator(num_blocks, block_size), max_num_seqs=max_num_seqs,
                     max_tokens_per_step=budget, max_waiting=max_waiting)


def check_invariants(sched: Scheduler, out: SchedulerOutput) -> None:
    owned = [b for s in sched.running for b in s.blocks]
    assert len(owned) == len(set(owned)), "a KV block is owned by two sequences"
    assert all(not s.blocks and s.num_computed == 0 for s in sched.waiting)
    assert len(owned) + sched.allocator.num_free() == sched.allocator.num_blocks, "blocks leaked"
    assert len(sched.running) <= sched.max_num_seqs
    fed = sum(item.num_tokens + item.seq.lookahead for item in out.scheduled)
    assert out.num_batched_tokens == fed <= sched.max_tokens_per_step
    for item in out.scheduled:
        seq = item.seq
        assert seq.status is SeqStatus.RUNNING and item.num_tokens >= 1
        assert item.samples == (seq.num_computed + item.num_tokens == seq.num_tokens)
        assert len(seq.blocks) * sched.allocator.block_size >= seq.num_computed + item.num_tokens + seq.lookahead
    assert len({id(i.seq) for i in out.scheduled}) == len(out.scheduled)


class FakeEngine:
    """Plays the engine's part: sets lookahead, feeds tokens and drafts, verifies, reports back."""

    def __init__(self, sched: Scheduler, *, drafts: int = 0, ready: Callable[[Sequence], bool] | None = None):
        self.sched, self.block_size = sched, sched.allocator.block_size
        self.cache: dict[int, tuple[str, int, int]] = {}  # slot -> (request, position, token)
        self.drafts = drafts
        self.ready = ready or (lambda s: True)
        self.outputs: dict[str, list[int]] = {}
        self.capped: set[str] = set()
        self.preemptions = 0

    def run(self, max_steps: int = 5000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                return
            self.step()
        raise AssertionError("sequences did not finish: the scheduler is stuck")

    def step(self) -> SchedulerOutput:
        for seq in self.sched.running:
            seq.lookahead = 0 if seq.is_prefilling else self.drafts
        out = self.sched.schedule(self.ready)
        check_invariants(self.sched, out)
        self.preemptions += len(out.preempted)
        for seq in out.finished:
            assert seq.status is SeqStatus.FINISHED_LENGTH and not seq.blocks
            self.capped.add(seq.request_id)
        for item in out.scheduled:
            self._run(item.seq, item.num_tokens, item.samples)
        return out

    def _run(self, seq: Sequence, num_tokens: int, samples: bool) -> None:
        start = seq.num_computed
        drafts = self._propose(seq) if samples else []
        fed = seq.all_ids[start:start + num_tokens] + drafts
        for offset, slot in enumerate(slot_indices(seq.blocks, start, start + len(fed), self.block_size)):
            self.cache[slot] = (seq.request_id, start + offset, fed[offset])
        if not samples:
            seq.num_computed += num_tokens
            self.sched.after_step(seq, seq.num_computed)
            return
        context = self._read(seq, start + num_tokens)
        emitted = [target(context)]
        for draft in drafts:  # greedy verification: keep drafts while the model agrees
            if draft != emitted[-1]:
                break
            context.append(draft)
            emitted.append(target(context))
        seq.num_computed = start + num_tokens + len(emitted) - 1
        emitted = emitted[:seq.params.max_new_tokens - len(seq.output_ids)]
        stop = STOP in emitted
        seq.output_ids.extend(emitted[:emitted.index(STOP)] if stop else emitted)
        if stop or len(seq.output_ids) == seq.params.max_new_tokens:
            self.sched.finish(seq, SeqStatus.FINISHED_STOP if stop else SeqStatus.FINISHED_LENGTH)
            self.outputs[seq.request_id] = list(seq.output_ids)
        else:
            self.sched.after_step(seq, seq.num_computed)

    def _propose(self, seq: Sequence) -> list[int]:
        """`seq.lookahead` drafts: the true continuation, deliberately wrong at some positions."""
        context, drafts = seq.all_ids, []
        for j in range(seq.lookahead):
            token = target(context + drafts)
            drafts.append((token + 1) % VOCAB if (len(context) + j) % 3 == 0 else token)
        return drafts

    def _read(self, seq: Sequence, n: int) -> list[int]:
        """The context as the cache holds it; must be exactly this sequence's tokens."""
        slots = slot_indices(seq.blocks, 0, n, self.block_size)
        got = [self.cache.get(slot) for slot in slots]
        assert got == [(seq.request_id, p, t) for p, t in enumerate(seq.all_ids[:n])], seq.request_id
        return [entry[2] for entry in got]


def feed(sched: Scheduler, out: SchedulerOutput, token: int = 7) -> None:
    """Minimal engine step for hand-written scenarios: everything computed, sample `token`."""
    for item in out.scheduled:
        item.seq.num_computed += item.num_tokens
        if item.samples:
            item.seq.output_ids.append(token)
        sched.after_step(item.seq, item.seq.num_computed)


def ids(out: SchedulerOutput) -> list[tuple[str, int, bool]]:
    return [(i.seq.request_id, i.num_tokens, i.samples) for i in out.scheduled]


# ----- admission, order, budget ------------------------------------------------------------------
def test_fcfs_order_and_chunking_under_the_budget():
    sched = make_scheduler(budget=5)
    for rid in "abc":
        sched.add(make(rid, 4))
    assert [s.arrival for s in sched.waiting] == [0, 1, 2]
    out = sched.schedule()
    assert ids(out) == [("a", 4, True), ("b", 1, False)] and out.num_batched_tokens == 5
    feed(sched, out)
    out = sched.schedule()  # running first (a decodes, b continues), then c with what is left
    assert ids(out) == [("a", 1, True), ("b", 3, True), ("c", 1, False)]


def test_long_prompt_is_prefilled_in_chunks_and_samples_once():
    sched = make_scheduler(budget=8)
    seq = make("long", 25)
    sched.add(seq)
    plan = []
    for _ in range(5):
        out = sched.schedule()
        check_invariants(sched, out)
        plan.append(ids(out)[0][1:])
        feed(sched, out)
    assert plan == [(8, False), (8, False), (8, False), (1, True), (1, True)]
    assert seq.num_computed == 26 and seq.output_ids == [7, 7]


def test_max_num_seqs_limits_running():
    sched = make_scheduler(max_num_seqs=2)
    seqs = [make(str(i), 3) for i in range(5)]
    for seq in seqs:
        sched.add(seq)
    out = sched.schedule()
    assert [i.seq for i in out.scheduled] == seqs[:2] and sched.num_running() == 2
    feed(sched, out)
    sched.finish(seqs[0], SeqStatus.FINISHED_STOP)
    out = sched.schedule()
    assert [i.seq.request_id for i in out.scheduled] == ["1", "2"] and sched.num_waiting() == 2


def test_waiting_queue_is_bounded():
    sched = make_scheduler(max_waiting=2)
    sched.add(make("a", 3))
    sched.add(make("b", 3))
    c = make("c", 3)
    with pytest.raises(QueueFull, match="max_waiting=2"):
        sched.add(c)
    assert c.arrival == -1 and sched.abort("c") is None  # the refused request left no state
    sched.schedule()  # a and b start running, the queue empties
    sched.add(c)
    assert sched.waiting == (c,)


def test_not_ready_sequences_are_skipped_without_blocking_others():
    sched = make_scheduler()
    sched.add(make("needs-x", 3, adapter="x"))
    sched.add(make("base", 3))
    out = sched.schedule(lambda s: s.adapter is None)
    assert ids(out) == [("base", 3, True)]
    assert [s.request_id for s in sched.waiting] == ["needs-x"]
    feed(sched, out)
    out = sched.schedule(lambda s: True)
    assert [i.seq.request_id for i in out.scheduled] == ["base", "needs-x"]


def test_add_refuses_what_can_never_run():
    sched = make_scheduler(num_blocks=3, block_size=4)
    with pytest.raises(ValueError, match=r"'huge'.*13 tokens.*3 blocks x 4 tokens = 12"):
        sched.add(make("huge", 13))
    assert not sched.has_unfinished() and sched.allocator.num_free() == 3
    sched.add(make("a", 12))
    with pytest.raises(ValueError, match="already scheduled"):
        sched.add(make("a", 2))
    running = make("r", 2)
    running.status = SeqStatus.RUNNING
    with pytest.raises(ValueError, match="new sequence"):
        sched.add(running)
    with pytest.raises(ValueError, match="max_tokens_per_step"):
        make_scheduler(max_num_seqs=8, budget=4)


@pytest.mark.parametrize("kwargs", [{"max_new_tokens": 0}, {"max_new_tokens": 2, "temperature": -1.0},
                                    {"max_new_tokens": 2, "temperature": float("nan")}, {"max_new_tokens": 2, "top_p": 0.0},
                                    {"max_new_tokens": 2, "seed": 1.5}, {"max_new_tokens": 2, "stop_token_ids": {-1}}])
def test_sampling_params_are_validated(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_sequence_state_helpers():
    assert SamplingParams(max_new_tokens=1, stop_token_ids=[2, 2]).stop_token_ids == frozenset({2})
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        Sequence("x", [], SamplingParams(max_new_tokens=1))
    seq = make("s", 3)
    seq.output_ids.append(9)
    assert seq.all_ids == [1, 2, 3, 9] and seq.num_tokens == 4 and seq.is_prefilling
    seq.num_computed = 3
    assert not seq.is_prefilling and not seq.finished


# ----- speculative reservations and rollback ---------------------------------------------------------
def decoding(sched: Scheduler, rid: str, prompt: int) -> Sequence:
    seq = make(rid, prompt, max_new=50)
    sched.add(seq)
    feed(sched, sched.schedule())
    assert not seq.is_prefilling
    return seq


def test_decode_reserves_blocks_for_drafts_and_after_step_rolls_back():
    sched = make_scheduler(num_blocks=8, block_size=4)
    seq = decoding(sched, "s", 4)  # 5 tokens, 4 computed
    seq.lookahead = 6
    out = sched.schedule()
    assert ids(out) == [("s", 1, True)] and out.num_batched_tokens == 7 and seq.lookahead == 6
    assert len(seq.blocks) == 3  # 4 computed + 1 fed + 6 drafts = 11 tokens
    free = sched.allocator.num_free()
    seq.output_ids.append(7)  # every draft rejected: only the bonus token
    sched.after_step(seq, 5)
    assert len(seq.blocks) == 2 and sched.allocator.num_free() == free + 1
    seq.lookahead = 6
    sched.schedule()
    seq.output_ids.extend([7] * 7)  # every draft accepted
    sched.after_step(seq, 12)
    assert len(seq.blocks) == 3 and seq.num_computed == 12  # nothing to roll back; growing waits for schedule()
    seq.lookahead = 0
    sched.schedule()
    assert len(seq.blocks) == 4  # the 13th token's K/V gets its block


def test_drafts_are_trimmed_to_budget_and_pool():
    sched = make_scheduler(num_blocks=8, block_size=4, max_num_seqs=2, budget=4)
    seq = decoding(sched, "s", 4)
    seq.lookahead = 6
    assert sched.schedule().num_batched_tokens == 4 and seq.lookahead == 3
    small = make_scheduler(num_blocks=3, block_size=4)
    seq = decoding(small, "t", 9)  # 10 tokens in a pool of 12
    seq.lookahead = 6
    small.schedule()
    assert seq.lookahead == 2 and len(seq.blocks) == 3


def test_drafts_never_preempt():
    sched = make_scheduler(num_blocks=4, block_size=4)
    a, b = make("a", 3, max_new=9), make("b", 11, max_new=9)
    sched.add(a)
    sched.add(b)
    feed(sched, sched.schedule())  # a: 1 block (4 tokens), b: 3 blocks (12 tokens); pool full
    a.lookahead = 3
    out = sched.schedule()
    assert out.preempted == [] and ids(out) == [("a", 1, True), ("b", 1, True)] and a.lookahead == 0


# ----- preemption, abort, finish ---------------------------------------------------------------------
def test_newest_running_sequence_is_preempted_to_the_front_of_waiting():
    sched = make_scheduler(num_blocks=4, block_size=4)
    a, b = make("a", 8, max_new=9), make("b", 8, max_new=9)
    sched.add(a)
    sched.add(b)
    feed(sched, sched.schedule())  # pool full: 2 blocks each, both now have 9 tokens
    c = make("c", 2)
    sched.add(c)
    out = sched.schedule(lambda s: s is not b)  # a needs a 3rd block: b goes; c would fit the free block
    assert out.preempted == [b] and ids(out) == [("a", 1, True)] and sched.allocator.num_free() == 1
    assert b.status is SeqStatus.WAITING and b.blocks == [] and b.num_computed == 0 and b.output_ids == [7]
    assert [s.request_id for s in sched.waiting] == ["b", "c"]  # nothing admitted in a preempting step
    feed(sched, out)
    feed(sched, sched.schedule(lambda s: s is not b))  # c takes the free block while b is not ready
    sched.finish(a, SeqStatus.FINISHED_STOP)
    out = sched.schedule()
    assert ids(out) == [("c", 1, True), ("b", 9, True)]  # b recomputes prompt + its output
    assert sched.running == (b, c)  # back in arrival order: c, not b, is the next victim


def test_admission_is_first_come_first_served_on_memory():
    sched = make_scheduler(num_blocks=4, block_size=4)
    sched.add(make("a", 8))
    feed(sched, sched.schedule())  # a holds 3 of 4 blocks (9 tokens)
    sched.add(make("big", 8))
    sched.add(make("small", 2))
    assert ids(sched.schedule()) == [("a", 1, True)]  # small would fit, but big came first


def test_a_sequence_that_cannot_grow_preempts_itself():
    sched = make_scheduler(num_blocks=4, block_size=4)
    a, b = make("a", 11), make("b", 4)
    sched.add(a)
    sched.add(b)
    feed(sched, sched.schedule())  # a: 3 blocks (12 tokens), b: 1 block (5 tokens)
    out = sched.schedule()
    assert ids(out) == [("a", 1, True)] and out.preempted == [b] and sched.waiting == (b,)


def test_abort_waiting_and_running_frees_blocks():
    sched = make_scheduler(num_blocks=8, block_size=4)
    run, wait = make("run", 6), make("wait", 6)
    sched.add(run)
    sched.schedule()
    sched.add(wait)
    assert sched.allocator.num_free() == 6
    assert sched.abort("wait") is wait and wait.status is SeqStatus.FINISHED_ABORT and sched.waiting == ()
    assert sched.abort("run") is run and run.status is SeqStatus.FINISHED_ABORT and run.blocks == []
    assert sched.allocator.num_free() == 8 and sched.abort("run") is None and not sched.has_unfinished()
    assert sched.schedule().scheduled == [] and sched.running == ()


def test_finish_and_after_step_reject_bad_reports():
    sched = make_scheduler()
    seq = make("s", 3)
    with pytest.raises(ValueError, match="not a live sequence"):
        sched.finish(seq, SeqStatus.FINISHED_STOP)
    sched.add(seq)
    with pytest.raises(ValueError, match="FINISHED_"):
        sched.finish(seq, SeqStatus.RUNNING)
    with pytest.raises(ValueError, match="not RUNNING"):
        sched.after_step(seq, 0)
    sched.schedule()
    with pytest.raises(ValueError, match="must be < num_tokens"):
        sched.after_step(seq, 3)  # sampled token not appended
    with pytest.raises(ValueError, match="must be < num_tokens"):
        sched.after_step(seq, -1)
    seq.output_ids.extend([1, 1, 1])  # 6 tokens, but only one block (4 slots) was reserved
    with pytest.raises(ValueError, match="only 4 token slots were reserved"):
        sched.after_step(seq, 5)
    sched.after_step(seq, 3)
    assert seq.num_computed == 3


def test_sequence_outgrowing_the_whole_pool_ends_with_length():
    sched = make_scheduler(num_blocks=2, block_size=4)
    seq = make("s", 6, max_new=50)
    sched.add(seq)
    for _ in range(3):  # prefill 6 -> 7 tokens, decode -> 8, decode -> 9
        feed(sched, sched.schedule())
    out = sched.schedule()
    assert out.finished == [seq] and out.scheduled == [] and seq.status is SeqStatus.FINISHED_LENGTH
    assert sched.allocator.num_free() == 2 and not sched.has_unfinished()


# ----- whole runs ------------------------------------------------------------------------------------
def workload(n: int, seed: int) -> list[Sequence]:
    rng = random.Random(seed)
    return [make(f"r{i}", rng.randint(3, 14), max_new=rng.randint(3, 12), first=rng.randint(4, 30))
            for i in range(n)]


@pytest.mark.parametrize("drafts", [0, 3])
def test_tiny_pool_preempts_yet_produces_the_same_outputs(drafts):
    results = {}
    for num_blocks in (7, 1000):  # 28 tokens: enough for any one request, far too few for all
        sched = make_scheduler(num_blocks=num_blocks, block_size=4, max_num_seqs=4, budget=12)
        engine = FakeEngine(sched, drafts=drafts)
        seqs = workload(12, seed=1)
        for seq in seqs:
            sched.add(seq)
        engine.run()
        assert not engine.capped and sched.allocator.num_free() == num_blocks
        assert all(s.status in (SeqStatus.FINISHED_STOP, SeqStatus.FINISHED_LENGTH) for s in seqs)
        results[num_blocks] = (engine.outputs, engine.preemptions)
    assert results[7][1] > 0 and results[1000][1] == 0  # the tiny pool really preempted
    assert results[7][0] == results[1000][0] == {s.request_id: reference(s.prompt_ids, s.params)
                                                 for s in workload(12, seed=1)}


@pytest.mark.parametrize("seed", range(6))
def test_random_traffic_keeps_invariants(seed):
    """Adds, aborts, adapters that come and go, varying drafts: checked after every schedule()."""
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 8])
    num_blocks = rng.randint(24, 48) // block_size + 1
    sched = make_scheduler(num_blocks, block_size, max_num_seqs=rng.randint(1, 5),
                           budget=rng.randint(5, 16), max_waiting=rng.randint(1, 8))
    resident = {None}
    engine = FakeEngine(sched, ready=lambda s: s.adapter in resident)
    added, aborted = {}, set()
    for step in range(400):
        if rng.random() < 0.4:
            seq = make(f"q{step}", rng.randint(1, 30), max_new=rng.randint(1, 20),
                       adapter=rng.choice([None, "x", "y"]), first=rng.randint(4, 30))
            full = sched.num_waiting() >= sched.max_waiting
            try:
                sched.add(seq)
                added[seq.request_id] = seq
            except QueueFull:
                assert full
            except ValueError:
                assert seq.num_tokens > sched.capacity_tokens
        if added and rng.random() < 0.05:
            rid = rng.choice(sorted(added))
            if sched.abort(rid) is not None:
                aborted.add(rid)
        resident = {None} | {a for a in ("x", "y") if rng.random() < 0.7}
        engine.drafts = rng.randint(0, 4)
        engine.step()
    resident = {None, "x", "y"}
    engine.run()
    assert sched.allocator.num_free() == num_blocks and not sched.has_unfinished()
    for rid, seq in added.items():
        if rid not in aborted and rid not in engine.capped:
            assert engine.outputs[rid] == reference(seq.prompt_ids, seq.params), rid
