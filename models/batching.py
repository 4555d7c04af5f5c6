"""Turning tokenized rows into padded training batches, in an order that can be replayed on resume.

Rows of similar length are batched together (less padding: on CPU every padded token costs as much
as a real one), and the order depends only on (seed, epoch), so a resumed run can rebuild the epoch's
batch order and skip the batches it already trained on. With several data-parallel processes every rank
builds the same global order and trains on its own slice of each batch (`shard`), so the order does
not depend on the world size either.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

import torch

IGNORE_INDEX = -100
T = TypeVar("T")


def length_grouped_batches(lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int,
                           group_factor: int = 32) -> list[list[int]]:
    """Shuffle, sort within groups of `group_factor` batches by length, then shuffle the batches."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    group = batch_size * group_factor
    batches: list[list[int]] = []
    for start in range(0, len(order), group):
        chunk = sorted(order[start:start + group], key=lambda i: lengths[i])
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank `rank`'s disjoint part of a global batch: every `world_size`-th row, starting at `rank`.

    Strided rather than contiguous because a length-grouped batch is sorted by length: striding gives
    every rank rows of about the same lengths, so no rank waits on the others' padding.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size} processes")
    return list(items[rank::world_size])


def count_targets(rows: Sequence[dict]) -> int:
    """Target tokens of rows as `collate` + the shifted loss see them (a label at position 0 has no
    predecessor, so it is never a target); lets every rank weight its slice by the global count."""
    return sum(sum(1 for label in row["labels"][1:] if label != IGNORE_INDEX) for row in rows)


def collate(rows: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `input_ids`/`labels` to the longest row; padded labels are ignored by the loss."""
    width = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.as_tensor(row["input_ids"])
        labels[i, :n] = torch.as_tensor(row["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
