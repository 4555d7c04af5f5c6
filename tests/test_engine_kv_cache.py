"""Paged KV cache: the integer bookkeeping (allocator, grow/shrink, slots) and the pool tensors."""

from __future__ import annotations

import pytest
import torch

from lorafleet.serving.engine.kv_cache import BlockAllocator, KVPool, OutOfBlocks, grow, shrink, slot_indices


# ----- BlockAllocator ------------------------------------------------------------------------------
def test_allocate_hands_out_distinct_blocks_and_counts_free():
    alloc = BlockAllocator(num_blocks=5, block_size=4)
    a = alloc.allocate(2)
    b = alloc.allocate(3)
    assert len(set(a + b)) == 5 and set(a + b) == set(range(5))
    assert alloc.num_free() == 0
    assert alloc.allocate(0) == []


def test_allocate_is_all_or_nothing():
    alloc = BlockAllocator(num_blocks=4, block_size=2)
    alloc.allocate(3)
    with pytest.raises(OutOfBlocks, match="need 2 KV blocks, only 1"):
        alloc.allocate(2)
    assert alloc.num_free() == 1  # nothing was taken by the failed call
    assert len(alloc.allocate(1)) == 1


def test_free_returns_blocks_for_reuse():
    alloc = BlockAllocator(num_blocks=3, block_size=2)
    blocks = alloc.allocate(3)
    alloc.free(blocks[:2])
    assert alloc.num_free() == 2
    assert sorted(alloc.allocate(2)) == sorted(blocks[:2])


def test_double_free_raises_and_changes_nothing():
    alloc = BlockAllocator(num_blocks=4, block_size=2)
    blocks = alloc.allocate(2)
    alloc.free([blocks[0]])
    with pytest.raises(ValueError, match="double free"):
        alloc.free([blocks[1], blocks[0]])  # blocks[0] is already free
    assert alloc.num_free() == 3  # blocks[1] was not freed by the failed call
    with pytest.raises(ValueError, match="double free"):
        alloc.free([blocks[1], blocks[1]])  # the same block twice in one call
    assert alloc.num_free() == 3
    alloc.free([blocks[1]])
    assert alloc.num_free() == 4


def test_free_rejects_foreign_ids():
    alloc = BlockAllocator(num_blocks=2, block_size=2)
    with pytest.raises(ValueError, match="not a block id"):
        alloc.free([7])
    with pytest.raises(ValueError, match="double free"):
        alloc.free([1])  # in range but never allocated


@pytest.mark.parametrize("num_blocks,block_size", [(0, 4), (4, 0), (-1, 4), (2.0, 4)])
def test_allocator_rejects_bad_sizes(num_blocks, block_size):
    with pytest.raises(ValueError):
        BlockAllocator(num_blocks, block_size)


def test_blocks_for_is_ceil_division():
    alloc = BlockAllocator(num_blocks=8, block_size=4)
    assert [alloc.blocks_for(n) for n in (0, 1, 3, 4, 5, 8, 9)] == [0, 1, 1, 1, 2, 2, 3]
    with pytest.raises(ValueError):
        alloc.blocks_for(-1)
    with pytest.raises(ValueError):
        alloc.allocate(-1)


# ----- grow / shrink / slot_indices ------------------------------------------------------------------
def test_grow_adds_only_missing_blocks():
    alloc = BlockAllocator(num_blocks=6, block_size=4)
    blocks: list[int] = []
    grow(blocks, 5, alloc)
    assert len(blocks) == 2 and alloc.num_free() == 4
    first = list(blocks)
    grow(blocks, 8, alloc)  # already enough
    assert blocks == first
    grow(blocks, 9, alloc)
    assert blocks[:2] == first and len(blocks) == 3 and alloc.num_free() == 3


def test_grow_is_all_or_nothing():
    alloc = BlockAllocator(num_blocks=3, block_size=4)
    blocks = alloc.allocate(1)
    before = list(blocks)
    with pytest.raises(OutOfBlocks):
        grow(blocks, 4 * 4, alloc)  # needs 3 more, only 2 free
    assert blocks == before and alloc.num_free() == 2


def test_shrink_frees_blocks_past_the_tokens_kept():
    alloc = BlockAllocator(num_blocks=6, block_size=4)
    blocks: list[int] = []
    grow(blocks, 20, alloc)
    full = list(blocks)
    shrink(blocks, 9, alloc)  # 9 tokens need 3 blocks
    assert blocks == full[:3] and alloc.num_free() == 3
    shrink(blocks, 12, alloc)  # growing is not shrink's job
    assert blocks == full[:3]
    shrink(blocks, 0, alloc)
    assert blocks == [] and alloc.num_free() == 6


def test_slot_indices_follow_the_block_table():
    blocks = [5, 2, 9]  # deliberately not contiguous nor sorted
    assert slot_indices(blocks, 0, 3, block_size=4) == [20, 21, 22]
    assert slot_indices(blocks, 3, 9, block_size=4) == [23, 8, 9, 10, 11, 36]
    assert slot_indices(blocks, 7, 7, block_size=4) == []
    assert slot_indices(blocks, 11, 12, block_size=4) == [39]


def test_slot_indices_refuse_positions_past_the_reservation():
    with pytest.raises(ValueError, match="past the 2 reserved blocks"):
        slot_indices([0, 1], 6, 9, block_size=4)
    with pytest.raises(ValueError, match="bad token range"):
        slot_indices([0, 1], 3, 2, block_size=4)


# ----- KVPool ----------------------------------------------------------------------------------------
def test_pool_shapes_and_nbytes():
    pool = KVPool(3, 5, 4, 2, 8, dtype=torch.float32, device="cpu")
    assert pool.k.shape == pool.v.shape == (3, 20, 2, 8)
    assert pool.nbytes == 2 * 3 * 20 * 2 * 8 * 4
    assert pool.dtype == torch.float32 and pool.device.type == "cpu"


def test_write_then_gather_round_trips_through_blocks():
    torch.manual_seed(0)
    block_size, kvh, d = 4, 2, 3
    pool = KVPool(2, 6, block_size, kvh, d, dtype=torch.float32, device="cpu")
    alloc = BlockAllocator(6, block_size)
    tables = [alloc.allocate(2), alloc.allocate(1)]  # sequence 0: 6 tokens, sequence 1: 3 tokens
    lengths = [6, 3]
    keys = [torch.randn(n, kvh, d) for n in lengths]
    values = [torch.randn(n, kvh, d) for n in lengths]
    slots = torch.tensor([s for t, n in zip(tables, lengths) for s in slot_indices(t, 0, n, block_size)])
    pool.write(1, slots, torch.cat(keys), torch.cat(values))  # (9,) slots, (9, KVH, D)

    pad = 0  # any slot: padded context positions are masked by attention, not by the pool
    context = torch.tensor([slot_indices(t, 0, n, block_size) + [pad] * (6 - n) for t, n in zip(tables, lengths)])
    k, v = pool.gather(1, context)  # (B=2, C=6, KVH, D)
    assert k.shape == v.shape == (2, 6, kvh, d)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(k[b, :n], keys[b])
        torch.testing.assert_close(v[b, :n], values[b])
    assert torch.count_nonzero(pool.k[0]) == 0  # layers are independent


def test_write_overwrites_a_rolled_back_slot():
    pool = KVPool(1, 2, 2, 1, 2, dtype=torch.float32, device="cpu")
    slot = torch.tensor([3])
    pool.write(0, slot, torch.ones(1, 1, 2), torch.ones(1, 1, 2))
    pool.write(0, slot, torch.full((1, 1, 2), 7.0), torch.full((1, 1, 2), 8.0))
    k, v = pool.gather(0, slot.view(1, 1))
    assert k.flatten().tolist() == [7.0, 7.0] and v.flatten().tolist() == [8.0, 8.0]


def test_write_rejects_mismatched_shapes():
    pool = KVPool(1, 2, 2, 2, 4, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="expects slots"):
        pool.write(0, torch.tensor([0, 1]), torch.zeros(2, 2, 3), torch.zeros(2, 2, 3))
    with pytest.raises(ValueError, match="expects slots"):
        pool.write(0, torch.tensor([0]), torch.zeros(2, 2, 4), torch.zeros(2, 2, 4))


def test_blocks_for_budget_fits_the_budget_exactly():
    args = {"num_layers": 3, "block_size": 4, "num_kv_heads": 2, "head_dim": 8}
    per_block = 2 * 3 * 4 * 2 * 8 * 2  # bf16: 2 bytes
    n = KVPool.blocks_for_budget(10 * per_block + per_block - 1, dtype=torch.bfloat16, **args)
    assert n == 10
    pool = KVPool(3, n, 4, 2, 8, dtype=torch.bfloat16, device="cpu")
    assert pool.nbytes == 10 * per_block
    assert KVPool.blocks_for_budget(per_block - 1, dtype=torch.bfloat16, **args) == 0
    assert KVPool.blocks_for_budget(per_block, dtype=torch.float32, **args) == 0  # fp32 blocks are twice as big
    with pytest.raises(ValueError, match="budget_bytes"):
        KVPool.blocks_for_budget(-1, dtype=torch.float32, **args)


def test_pool_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_kv_heads"):
        KVPool(1, 2, 2, 0, 4, dtype=torch.float32, device="cpu")
