"""KV-cache bookkeeping for speculative decoding over a transformers `DynamicCache`.

A verification step appends K+1 slots to every row, and rows keep different numbers of them. A
`DynamicCache` is one rectangular tensor per layer, so rows cannot be cut to different lengths.
Instead each cache slot is marked valid or a hole:

* a rejected slot becomes a hole: it stays in the tensor but the 2-D attention mask hides it, and
  position ids count only valid slots, so every real token keeps the RoPE position it would have in
  plain decoding;
* when every row rejects the same tail (always at batch 1), the tail is cropped instead;
* left padding of prompts of different lengths is just holes at the start.

Causality is by slot index (transformers builds the causal mask from the cache length), which stays
right because holes never reorder real tokens. `compact()` squeezes the holes out when they waste
too much room. With no holes the mask is `None`, exactly what plain decoding passes.
"""

from __future__ import annotations

from typing import Any

import torch


class SpecCache:
    """A `DynamicCache` plus per-row valid-slot masks; `commit`/`rollback` follow every forward."""

    def __init__(self, config: Any, batch_size: int, device: torch.device | str) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=config)
        if any(self.cache.is_sliding) or any(getattr(self.cache, "is_linear", [])):
            raise ValueError("speculative decoding needs a model whose layers all use full attention "
                             "(sliding-window and linear-attention caches cannot hold holes)")
        self.device = torch.device(device)
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=self.device)  # (B, L)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # (B,) real tokens
        self.has_holes = False

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def num_slots(self) -> int:
        """Committed slots per row, holes included (the cache tensors' sequence length)."""
        return self.valid.shape[1]

    @property
    def pending(self) -> int:
        """Slots the last forward appended that are not committed yet."""
        return self.cache.get_seq_length() - self.num_slots

    def positions_for(self, n: int) -> torch.Tensor:
        """Position ids (B, n) for n new real tokens: each row continues from its own length."""
        return self.lengths.unsqueeze(1) + torch.arange(n, device=self.device)  # (B, n)

    def attention_mask(self, n: int) -> torch.Tensor | None:
        """2-D mask (B, L+n) for a forward of n new real tokens; `None` when nothing needs hiding."""
        if not self.has_holes:
            return None
        return torch.cat([self.valid, self.valid.new_ones(self.batch_size, n)], dim=1)  # (B, L+n)

    def inputs_for_mask(self, input_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Position ids and attention mask for new slots of which only `input_mask` (B, n) are real.

        Used at prefill, where left padding makes the first slots of shorter prompts holes.
        """
        input_mask = input_mask.to(device=self.device, dtype=torch.bool)  # (B, n)
        before = input_mask.long().cumsum(dim=1) - 1  # (B, n) real tokens before each slot
        positions = self.lengths.unsqueeze(1) + before.clamp_min(0)  # (B, n)
        if not self.has_holes and bool(input_mask.all()):
            return positions, None
        return positions, torch.cat([self.valid, input_mask], dim=1)  # (B, L+n)

    def commit(self, keep: torch.Tensor) -> None:
        """Keep the first `keep[b]` (B,) of row b's pending slots; the rest become holes or are cropped."""
        pending = self.pending
        if keep.shape != (self.batch_size,):
            raise ValueError(f"keep must have shape ({self.batch_size},), got {tuple(keep.shape)}")
        keep = keep.to(self.device)
        if bool(((keep < 0) | (keep > pending)).any()):
            raise ValueError(f"keep must be in [0, {pending}] (the pending slots), got {keep.tolist()}")
        mask = torch.arange(pending, device=self.device) < keep.unsqueeze(1)  # (B, pending)
        self._append(mask, used=int(keep.max()) if self.batch_size else 0)

    def commit_mask(self, mask: torch.Tensor) -> None:
        """Commit pending slots with an explicit per-slot mask (B, pending): True = real token."""
        pending = self.pending
        if mask.shape != (self.batch_size, pending):
            raise ValueError(f"mask must have shape ({self.batch_size}, {pending}), got {tuple(mask.shape)}")
        mask = mask.to(device=self.device, dtype=torch.bool)
        used_columns = mask.any(dim=0).nonzero()  # (U, 1)
        self._append(mask, used=int(used_columns[-1]) + 1 if used_columns.numel() else 0)

    def rollback(self) -> None:
        """Discard every pending slot (the forward's tokens are all rejected)."""
        self._crop(self.pending)

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep only rows `index` (finished rows leave the batch); needs nothing pending."""
        self._require_committed("select_rows")
        index = index.to(self.device)
        self.cache.batch_select_indices(index)
        self.valid = self.valid[index]
        self.lengths = self.lengths[index]
        self.has_holes = not bool(self.valid.all())

    def wasted_fraction(self) -> float:
        """Share of slots compaction would free (rows are right-aligned to the longest row)."""
        if self.num_slots == 0:
            return 0.0
        return 1.0 - int(self.lengths.max()) / self.num_slots

    def compact(self) -> None:
        """Move each row's real slots, in order, to the right end; drop the columns left empty."""
        self._require_committed("compact")
        width = int(self.lengths.max())
        if width == self.num_slots:
            return
        # Stable sort puts holes first and keeps real tokens in their order: causality is unchanged.
        order = self.valid.to(torch.int8).sort(dim=1, stable=True).indices  # (B, L)
        order = order[:, self.num_slots - width:]  # (B, W)
        for layer in self.cache.layers:
            if not getattr(layer, "is_initialized", False):
                continue
            gather = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            layer.keys = layer.keys.gather(2, gather)  # (B, H, W, D)
            layer.values = layer.values.gather(2, gather)  # (B, H, W, D)
        self.valid = self.valid.gather(1, order)  # (B, W)
        self.has_holes = not bool(self.valid.all())

    def _append(self, mask: torch.Tensor, *, used: int) -> None:
        """Crop the tail no row kept, then record the remaining pending slots as `mask`."""
        self._crop(mask.shape[1] - used)
        mask = mask[:, :used]  # (B, used)
        self.valid = torch.cat([self.valid, mask], dim=1)  # (B, L+used)
        self.lengths = self.lengths + mask.sum(dim=1)
        self.has_holes = self.has_holes or not bool(mask.all())

    def _crop(self, n: int) -> None:
        if n > 0:
            self.cache.crop(-n)

    def _require_committed(self, what: str) -> None:
        if self.pending:
            raise RuntimeError(f"{what} needs every slot committed; {self.pending} slots are pending")
