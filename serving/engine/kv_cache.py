"""Paged KV cache: fixed-size blocks handed out by an integer allocator, and the tensors they index.

Why blocks: sequences grow one token (or one speculative chain) at a time and finish in any order.
Reserving whole contiguous regions per request wastes memory on the longest possible answer and
fragments the pool; fixed-size blocks let any free block serve any sequence, and rolling back
rejected speculative drafts is just handing trailing blocks back.

The split is deliberate: `BlockAllocator`, `grow`, `shrink` and `slot_indices` are plain integers so
the scheduler (policy, no tensors) can be tested with fakes; `KVPool` owns the tensors and knows
nothing about sequences. A token at position `p` of a sequence with block table `blocks` lives at
flat slot `blocks[p // block_size] * block_size + p % block_size` of every layer.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections import OrderedDict
from collections.abc import Iterable
from collections.abc import Sequence as SequenceABC

import torch

BlockKey = bytes  # keyed digest of (previous block's key, salt, this block's tokens): names the whole prefix
_KEY_SECRET = os.urandom(16)  # per process: nobody can craft a prompt whose key collides with another's


class OutOfBlocks(RuntimeError):
    """The pool cannot satisfy an allocation; the scheduler reacts by preempting, not by failing."""


class BlockAllocator:
    """Hands out block ids 0..num_blocks-1. Integers only, so the scheduler stays tensor-free.

    Freed blocks go to the top of a stack and are reused first: recently freed blocks are the ones
    most likely still warm in the CPU cache, and reuse order stays deterministic for tests.

    Prefix caching (vLLM's automatic prefix caching, in integers): a full block whose K/V is computed
    can be `register`ed under a `BlockKey` (a digest of its tokens, the key of the block before it and a salt
    naming the adapter, since an adapter's LoRA changes every layer's K/V). Blocks are reference
    counted: `match_prefix` lends registered blocks to a new sequence, and a registered block nobody
    holds is not free but *evictable*: it keeps its K/V for the next request with the same prefix
    until `allocate` runs out of truly free blocks and recycles it, least recently used first.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() yields 0, 1, 2, ...
        self._refs: dict[int, int] = {}  # block -> holders; every block held by a sequence is here
        self._by_key: dict[BlockKey, int] = {}  # registered blocks (held or evictable)
        self._key_of: dict[int, BlockKey] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered, unheld; oldest first

    def num_free(self) -> int:
        """Blocks `allocate` can hand out now: truly free ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    def holders(self, block: int) -> int:
        """How many sequences hold `block` (0: free or evictable); a block held twice is read-only."""
        return self._refs.get(block, 0)

    def num_unused(self) -> int:
        """Blocks free without forgetting any cached prefix (what optional work, like drafts, may take)."""
        return len(self._free)

    def num_cached(self) -> int:
        """Registered blocks (held or evictable): what the prefix cache currently remembers."""
        return len(self._by_key)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens (ceil division)."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        """All-or-nothing, so a failed request never leaves half-reserved blocks to clean up."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > self.num_free():
            raise OutOfBlocks(f"need {n} KV blocks, only {self.num_free()} of {self.num_blocks} are free")
        blocks = []
        for _ in range(n):
            if self._free:
                block = self._free.pop()
            else:  # recycle the least recently used cached block: its prefix is forgotten
                block, _ = self._evictable.popitem(last=False)
                del self._by_key[self._key_of.pop(block)]
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one hold on each block; validated in full first so a bad call changes nothing.

        A double free means two owners think they hold the same block, which would silently mix two
        sequences' K/V; failing loudly here is the only place that bug is still cheap to find.
        """
        blocks = list(blocks)
        drops: dict[int, int] = {}
        for block in blocks:
            if not isinstance(block, int) or not 0 <= block < self.num_blocks:
                raise ValueError(f"block {block!r} is not a block id of this pool (0..{self.num_blocks - 1})")
            drops[block] = drops.get(block, 0) + 1
            if drops[block] > self._refs.get(block, 0):
                raise ValueError(f"double free of KV block {block}")
        released = []
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                del self._refs[block]
                released.append(block)
        # A chain's tail is evicted before its head: matching stops at the first missing block, so an
        # evicted head would strand the rest of its chain in the cache.
        for block in reversed(released):
            if block in self._key_of:
                self._evictable[block] = None  # newest at the end: evicted last
        self._free.extend(reversed([b for b in released if b not in self._key_of]))

    # ----- prefix caching ----------------------------------------------------------------------
    def register(self, block: int, key: BlockKey) -> None:
        """Remember that held `block` holds the computed K/V of `key`. If another block already
        holds that key (two sequences computed the same prefix at once), the first one stays."""
        if self._refs.get(block, 0) < 1:
            raise ValueError(f"register: KV block {block} is not held by anyone")
        if key in self._by_key or block in self._key_of:
            return
        self._by_key[key] = block
        self._key_of[block] = key

    def forget_cached(self) -> None:
        """Empty the prefix cache: evictable blocks become free, held blocks stay held but unshared."""
        self._free.extend(reversed(self._evictable))
        self._evictable.clear()
        self._by_key.clear()
        self._key_of.clear()

    def is_cached(self, key: BlockKey) -> bool:
        return key in self._by_key

    def match_prefix(self, keys: Iterable[BlockKey]) -> list[int]:
        """The registered blocks of the longest run of `keys` from the start, each now held once more."""
        matched = []
        for key in keys:
            block = self._by_key.get(key)
            if block is None:
                break
            matched.append(block)
        for block in matched:
            self._evictable.pop(block, None)
            self._refs[block] = self._refs.get(block, 0) + 1
        return matched


def block_keys(tokens: SequenceABC[int], salt: str, block_size: int, known: list[BlockKey]) -> list[BlockKey]:
    """Keys of the full blocks of `tokens`, extending `known` (the keys already computed) in place.

    A key is a 128-bit keyed BLAKE2b digest of (the previous block's key, salt, this block's tokens), so
    it names the whole prefix; the per-process secret makes a deliberate collision (one tenant's prompt
    crafted to read another's cached K/V, vLLM's CVE-2025-25183) infeasible.
    """
    salt_bytes = salt.encode()
    for start in range(len(known) * block_size, len(tokens) - block_size + 1, block_size):
        digest = hashlib.blake2b(known[-1] if known else b"", key=_KEY_SECRET, digest_size=16)
        digest.update(len(salt_bytes).to_bytes(4, "little") + salt_bytes)
        digest.update(array("q", tokens[start: start + block_size]).tobytes())
        known.append(digest.digest())
    return known


def grow(blocks: list[int], num_tokens: int, allocator: BlockAllocator) -> None:
    """Make `blocks` hold at least `num_tokens` tokens, in place; unchanged on OutOfBlocks."""
    missing = allocator.blocks_for(num_tokens) - len(blocks)
    if missing > 0:
        blocks.extend(allocator.allocate(missing))


def shrink(blocks: list[int], num_tokens: int, allocator: BlockAllocator) -> None:
    """Rollback: free every block past the ones `num_tokens` tokens need, in place."""
    keep = allocator.blocks_for(num_tokens)
    if len(blocks) > keep:
        allocator.free(blocks[keep:])
        del blocks[keep:]


def slot_indices(blocks: SequenceABC[int], start: int, stop: int, block_size: int) -> list[int]:
    """Flat pool slots of positions start..stop-1; raises if the table does not reach `stop`.

    The bound check matters: writing past the reserved blocks would land in another sequence's
    block (or out of the pool) without any error from the tensors.
    """
    if not 0 <= start <= stop:
        raise ValueError(f"bad token range [{start}, {stop})")
    if stop > len(blocks) * block_size:
        raise ValueError(f"token position {stop - 1} is past the {len(blocks)} reserved blocks "
                         f"({len(blocks) * block_size} tokens)")
    return [blocks[p // block_size] * block_size + p % block_size for p in range(start, stop)]


class KVPool:
    """K and V of every layer for every block, one tensor each: (L, num_blocks * block_size, KVH, D).

    One flat slot axis (rather than (blocks, block_size)) lets a forward write all new tokens of
    all sequences with one `index_copy_` and read all contexts with one `index_select` per layer.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks), ("block_size", block_size),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KVPool {name} must be a positive int, got {value!r}")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, slots, KVH, D)
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # (L, slots, KVH, D)

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @staticmethod
    def blocks_for_budget(budget_bytes: int, num_layers: int, block_size: int, num_kv_heads: int,
                          head_dim: int, dtype: torch.dtype) -> int:
        """How many blocks fit in `budget_bytes` (K and V, all layers); may be 0, the caller decides."""
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        per_block = 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize
        if per_block <= 0:
            raise ValueError("num_layers, block_size, num_kv_heads and head_dim must be positive")
        return int(budget_bytes // per_block)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new tokens' K/V: slots (N,), k and v (N, KVH, D)."""
        if k.shape != v.shape or k.shape[1:] != self.k.shape[2:] or slots.shape != k.shape[:1]:
            raise ValueError(f"KVPool.write expects slots (N,) and k, v (N, {self.num_kv_heads}, {self.head_dim}); "
                             f"got slots {tuple(slots.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
        self.k[layer].index_copy_(0, slots, k)
        self.v[layer].index_copy_(0, slots, v)

    def write_layers(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new tokens' K/V of every layer at once: slots (N,), k and v (L, N, KVH, D)."""
        expected = (self.num_layers, slots.shape[0], self.num_kv_heads, self.head_dim)
        if k.shape != v.shape or tuple(k.shape) != expected:
            raise ValueError(f"KVPool.write_layers expects k, v {expected}; got k {tuple(k.shape)}, v {tuple(v.shape)}")
        self.k.index_copy_(1, slots, k)
        self.v.index_copy_(1, slots, v)

    def gather(self, layer: int, context_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of context slots (B, C) -> two (B, C, KVH, D) tensors; padding slots read whatever is there."""
        flat = context_slots.reshape(-1)  # (B*C,)
        out_shape = (*context_slots.shape, self.num_kv_heads, self.head_dim)
        k = self.k[layer].index_select(0, flat).view(out_shape)  # (B, C, KVH, D)
        v = self.v[layer].index_select(0, flat).view(out_shape)  # (B, C, KVH, D)
        return k, v
