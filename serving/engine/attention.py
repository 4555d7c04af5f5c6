"""Attention over a packed batch of sequences whose K/V live in the paged pool.

A forward packs every sequence's new tokens into one (N, ...) stream: prefill chunks, single decode
tokens and speculative chains side by side. Everything that depends only on the batch layout (the
RoPE rows, the padded query index, the mask) is built once per forward in `AttentionPlan.build` and
reused by every layer, because on a small CPU model per-op dispatch, not arithmetic, is the cost.

Per layer: RoPE on q and k in one go, write the new K/V into the pool, gather each sequence's whole
context, one `scaled_dot_product_attention`, unpad. Decode-only batches (every sequence feeds one
token) take a fast path: no padding, and the query heads that share a KV head are laid out as that
head's query rows, so GQA costs neither a K/V repeat nor a mask unless context lengths differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from lorafleet.serving.engine.kv_cache import KVPool
    from lorafleet.serving.engine.model import LlamaShape


@dataclass
class ForwardBatch:
    """One forward's packed tokens and where their K/V go; built once by the engine, read by every layer."""

    input_ids: torch.Tensor  # (N,) packed new tokens
    positions: torch.Tensor  # (N,) position of each token in its sequence
    slot_mapping: torch.Tensor  # (N,) pool slot receiving each new token's K/V
    query_lens: list[int]  # (B,) new tokens per sequence, in packing order
    context_lens: list[int]  # (B,) tokens in cache for the sequence after this forward (prefix + new)
    context_slots: torch.Tensor  # (B, C_max) pool slot of every context token; padding masked out
    adapter_ids: torch.Tensor  # (N,) LoRA slot per token; 0 = base model

    @classmethod
    def build(cls, query_tokens: list[list[int]], start_positions: list[int], blocks: list[list[int]],
              block_size: int, adapters: list[int], device: str | torch.device = "cpu") -> ForwardBatch:
        """Pack sequences: sequence b feeds `query_tokens[b]` at positions start_positions[b]..., its
        K/V living in `blocks[b]` (block ids of `block_size` tokens each, in position order)."""
        count = len(query_tokens)
        if count == 0 or not count == len(start_positions) == len(blocks) == len(adapters):
            raise ValueError(f"ForwardBatch.build needs one entry per sequence in query_tokens, start_positions, "
                             f"blocks and adapters; got {count}, {len(start_positions)}, {len(blocks)}, "
                             f"{len(adapters)}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        query_lens = [len(tokens) for tokens in query_tokens]
        context_lens = [start + n for start, n in zip(start_positions, query_lens)]
        for b, (n, start, table) in enumerate(zip(query_lens, start_positions, blocks)):
            if n == 0 or start < 0:
                raise ValueError(f"sequence {b}: needs >= 1 new token and start_position >= 0, got {n} tokens "
                                 f"at {start}")
            if len(table) * block_size < start + n:
                raise ValueError(f"sequence {b}: {len(table)} blocks of {block_size} hold {len(table) * block_size} "
                                 f"tokens, fewer than its context of {start + n}")
        max_blocks = max(len(table) for table in blocks)
        table = torch.tensor([t + [0] * (max_blocks - len(t)) for t in blocks], dtype=torch.long)  # (B, nb)
        slots = (table[:, :, None] * block_size + torch.arange(block_size)).view(count, -1)  # (B, nb*bs)
        context_slots = slots[:, : max(context_lens)]  # (B, C_max)
        # Padding past a sequence's context reads its own position 0, never a slot that may hold another
        # sequence's K/V (a stale or foreign NaN there survives the mask: softmax weight 0 x NaN = NaN).
        past_end = torch.arange(context_slots.shape[1]) >= torch.tensor(context_lens)[:, None]  # (B, C_max)
        context_slots = torch.where(past_end, context_slots[:, :1], context_slots)
        lens = torch.tensor(query_lens)
        seq = torch.repeat_interleave(torch.arange(count), lens)  # (N,) sequence of each packed token
        first = torch.tensor(start_positions) - (torch.cumsum(lens, 0) - lens)  # position minus packed index
        positions = torch.arange(int(lens.sum())) + first[seq]  # (N,)
        flat_ids = [token for tokens in query_tokens for token in tokens]
        return cls(
            input_ids=torch.tensor(flat_ids, dtype=torch.long, device=device),
            positions=positions.to(device),
            slot_mapping=slots[seq, positions].to(device),
            query_lens=query_lens,
            context_lens=context_lens,
            context_slots=context_slots.contiguous().to(device),
            adapter_ids=torch.tensor(adapters, dtype=torch.long)[seq].to(device),
        )

    def subset(self, seqs: list[int]) -> tuple[ForwardBatch, torch.Tensor]:
        """The sequences `seqs` (indices, in order) as a batch of their own, and their packed token rows."""
        starts = [0]
        for n in self.query_lens:
            starts.append(starts[-1] + n)
        rows = [r for b in seqs for r in range(starts[b], starts[b + 1])]
        index = torch.tensor(rows, device=self.positions.device)
        context_lens = [self.context_lens[b] for b in seqs]
        seq_index = torch.tensor(seqs, device=self.context_slots.device)
        return ForwardBatch(
            input_ids=self.input_ids[index], positions=self.positions[index], slot_mapping=self.slot_mapping[index],
            query_lens=[self.query_lens[b] for b in seqs], context_lens=context_lens,
            context_slots=self.context_slots[seq_index, : max(context_lens)].contiguous(),
            adapter_ids=self.adapter_ids[index],
        ), index


class RotaryTable:
    """cos and sign-folded sin per position, computed once (in fp32, like transformers) and indexed by
    position, so no layer recomputes them. Grows on demand up to max_position_embeddings."""

    def __init__(self, shape: LlamaShape, dtype: torch.dtype, device: torch.device) -> None:
        self.shape, self.dtype, self.device = shape, dtype, device
        self.inv_freq = rope_inverse_frequencies(shape)  # (D/2,) fp32 on CPU
        self.cos = self.sin = torch.empty(0, shape.head_dim, dtype=dtype, device=device)

    def lookup(self, positions: torch.Tensor, max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (N, 1, D) of `positions`; max_position (exclusive) comes from the batch's lists."""
        if max_position > self.cos.shape[0]:
            limit = self.shape.max_position_embeddings
            if max_position > limit:
                raise ValueError(f"position {max_position - 1} is past max_position_embeddings={limit}")
            self._grow(min(limit, max(max_position, 2 * self.cos.shape[0], 256)))
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def _grow(self, length: int) -> None:
        freqs = torch.outer(torch.arange(length, dtype=torch.float32), self.inv_freq)  # (T, D/2)
        half = freqs.shape[1]
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
        sin = emb.sin()
        sin[:, :half] = -sin[:, :half]  # rotate_half's minus sign, folded in (see apply_rope)
        self.cos = emb.cos().to(self.device, self.dtype)
        self.sin = sin.to(self.device, self.dtype)


def rope_inverse_frequencies(shape: LlamaShape) -> torch.Tensor:
    """Default RoPE frequencies, or Llama 3.1's scaled ones (same formula as transformers)."""
    dim = shape.head_dim
    inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = shape.rope_scaling
    if scaling is None:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (N, heads, D): x*cos + rotate_half(x)*sin. Rolling by D/2 gives [x2, x1]; the table's sin
    carries rotate_half's minus sign on its first half, so this is 3 ops instead of 6."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


class AttentionPlan:
    """The per-forward attention layout shared by every layer (see the module docstring)."""

    def __init__(self, batch: ForwardBatch, shape: LlamaShape, rope: RotaryTable) -> None:
        self.num_heads, self.num_kv_heads, self.head_dim = shape.num_heads, shape.num_kv_heads, shape.head_dim
        self.scale = shape.head_dim ** -0.5
        self.slot_mapping, self.context_slots = batch.slot_mapping, batch.context_slots
        self.num_seqs, self.max_query = len(batch.query_lens), max(batch.query_lens)
        self.num_tokens = int(batch.input_ids.shape[0])
        context = int(batch.context_slots.shape[1])
        device = batch.positions.device
        self.cos, self.sin = rope.lookup(batch.positions, max(batch.context_lens))  # (N, 1, D) each
        self.decode = self.max_query == 1
        # Chunks of very different lengths: padding them to the longest would multiply the attention
        # work, so each sequence attends on its own (a loop of B large ops rather than one padded op).
        self.ragged = None
        if not self.decode and self.num_seqs > 1 and self.num_seqs * self.max_query > 1.5 * self.num_tokens:
            self.ragged = self._ragged_layout(batch, shape.sliding_window)
            return
        # Padded layout (B, Q_max): pad rows repeat their sequence's last token, so their mask rows are
        # valid (no all-masked row, hence no NaN) and they are dropped when unpadding.
        self.query_index = self.output_index = None
        query_positions = batch.positions.view(self.num_seqs, self.max_query) \
            if self.decode or len(set(batch.query_lens)) == 1 else None
        if query_positions is None:
            starts, index, unpad = 0, [], []
            for b, n in enumerate(batch.query_lens):
                index.extend(starts + min(j, n - 1) for j in range(self.max_query))
                unpad.extend(b * self.max_query + j for j in range(n))
                starts += n
            self.query_index = torch.tensor(index, device=device)  # (B*Q_max,)
            self.output_index = torch.tensor(unpad, device=device)  # (N,)
            query_positions = batch.positions[self.query_index].view(self.num_seqs, self.max_query)
        window = shape.sliding_window
        needs_mask = not self.decode or window is not None or min(batch.context_lens) < context
        self.mask = None
        if needs_mask:
            ctx = torch.arange(context, device=device)  # (C,)
            mask = ctx <= query_positions[:, :, None]  # (B, Q, C): causal, and padding lies past the end
            if window is not None:
                mask &= ctx > query_positions[:, :, None] - window
            self.mask = mask.unsqueeze(1)  # (B, 1, Q, C); in decode Q = 1 broadcasts over grouped heads

    @staticmethod
    def _ragged_layout(batch: ForwardBatch, window: int | None) -> list[tuple[int, int, int, torch.Tensor | None]]:
        """Per sequence: its token rows [start, stop), its context length and its mask (None = causal)."""
        layout, start = [], 0
        device = batch.positions.device
        for n, context in zip(batch.query_lens, batch.context_lens):
            mask = None
            if context != n or window is not None:  # a chunk after cached K/V: causal, bottom-right aligned
                query_positions = torch.arange(context - n, context, device=device)[:, None]  # (n, 1)
                ctx = torch.arange(context, device=device)  # (C,)
                mask = ctx <= query_positions  # (n, C)
                if window is not None:
                    mask &= ctx > query_positions - window
            layout.append((start, start + n, context, mask))
            start += n
        return layout

    def attend(self, qkv: torch.Tensor, kv: KVPool, layer: int) -> torch.Tensor:
        """qkv (N, (H+2*KVH)*D) fused projection output -> attention output (N, H*D)."""
        n, heads, kv_heads, dim = self.num_tokens, self.num_heads, self.num_kv_heads, self.head_dim
        qk = apply_rope(qkv[:, : (heads + kv_heads) * dim].view(n, heads + kv_heads, dim), self.cos, self.sin)
        v_new = qkv[:, (heads + kv_heads) * dim:].view(n, kv_heads, dim)  # (N, KVH, D)
        kv.write(layer, self.slot_mapping, qk[:, heads:], v_new)
        k, v = kv.gather(layer, self.context_slots)  # (B, C, KVH, D) each
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, KVH, C, D)
        q = qk[:, :heads]  # (N, H, D)
        if self.ragged is not None:
            out = q.new_empty(n, heads * dim)
            for b, (start, stop, context, mask) in enumerate(self.ragged):
                q_b = q[start:stop].transpose(0, 1).unsqueeze(0)  # (1, H, n_b, D)
                o = F.scaled_dot_product_attention(q_b, k[b: b + 1, :, :context], v[b: b + 1, :, :context],
                                                   attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                                   enable_gqa=heads != kv_heads)  # (1, H, n_b, D)
                out[start:stop] = o[0].transpose(0, 1).reshape(stop - start, heads * dim)
            return out
        batch = self.num_seqs
        if self.decode:
            # Query heads h = kvh*G + g share KV head kvh: view them as G query rows of that head.
            q = q.reshape(batch, kv_heads, heads // kv_heads, dim)  # (B, KVH, G, D)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=self.scale)
            return out.reshape(n, heads * dim)  # (B, KVH, G, D) -> (N, H*D)
        if self.query_index is not None:
            q = q[self.query_index]  # (B*Q, H, D)
        q = q.reshape(batch, self.max_query, heads, dim).transpose(1, 2)  # (B, H, Q, D)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=self.scale,
                                             enable_gqa=heads != kv_heads)  # (B, H, Q, D)
        out = out.transpose(1, 2).reshape(batch * self.max_query, heads * dim)  # (B*Q, H*D)
        return out if self.output_index is None else out[self.output_index]


class SplitAttentionPlan:
    """A forward mixing single-token decodes with longer chunks (prefill, speculative chains): two plans.

    One padded layout would pad every decode row to the longest chunk (a 150-token prefill makes each
    decode attend 150 query rows), so decodes take the unpadded decode path and only the chunks are
    padded, to their own longest. Same interface as `AttentionPlan`.
    """

    def __init__(self, batch: ForwardBatch, shape: LlamaShape, rope: RotaryTable) -> None:
        singles = [b for b, n in enumerate(batch.query_lens) if n == 1]
        chunks = [b for b, n in enumerate(batch.query_lens) if n > 1]
        decode_batch, self.decode_rows = batch.subset(singles)
        chunk_batch, self.chunk_rows = batch.subset(chunks)
        self.decode_plan = AttentionPlan(decode_batch, shape, rope)
        self.chunk_plan = AttentionPlan(chunk_batch, shape, rope)
        self.num_tokens = int(batch.input_ids.shape[0])
        self.width = shape.num_heads * shape.head_dim

    def attend(self, qkv: torch.Tensor, kv: KVPool, layer: int) -> torch.Tensor:
        out = qkv.new_empty(self.num_tokens, self.width)  # (N, H*D)
        for plan, rows in ((self.decode_plan, self.decode_rows), (self.chunk_plan, self.chunk_rows)):
            out.index_copy_(0, rows, plan.attend(qkv.index_select(0, rows), kv, layer))
        return out


def plan_attention(batch: ForwardBatch, shape: LlamaShape, rope: RotaryTable) -> AttentionPlan | SplitAttentionPlan:
    """Split decodes from chunks when a forward has both (see `SplitAttentionPlan`), else one plan."""
    lens = batch.query_lens
    if 1 in lens and max(lens) > 1 and len(lens) > 1:
        return SplitAttentionPlan(batch, shape, rope)
    return AttentionPlan(batch, shape, rope)
