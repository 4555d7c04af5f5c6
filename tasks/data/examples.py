"""The in-memory shape every source (file or generator) is read into, and the seeded train split."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Example:
    """One validated input row, before prompting and tokenization.

    Exactly one of `prompt` (raw input; the task's template is applied later) and `messages` (the
    prompt turns of a chat row, used as given) is set. `id` names the source row (`train.csv:17`) so
    it survives shuffling and splitting and keeps the fingerprint independent of where data lives.
    """

    id: str
    completion: str
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None


def split_counts(total: int, validation_fraction: float, test_fraction: float, *,
                 need_validation: bool = True, need_test: bool = True) -> tuple[int, int]:
    """Rows carved out of `total` for validation and test: at least one each when asked for."""
    validation = max(1, round(total * validation_fraction)) if need_validation else 0
    test = max(1, round(total * test_fraction)) if need_test else 0
    if total - validation - test < 1:
        raise ValueError(f"{total} rows are too few to split into train/validation/test")
    return validation, test


def carve_splits(examples: Sequence[Example], *, validation_fraction: float, test_fraction: float,
                 seed: int, need_validation: bool = True,
                 need_test: bool = True) -> dict[str, list[Example]]:
    """Shuffle with `seed` and cut test, then validation, off the front; the rest is train.

    Returns only the splits asked for (train always). Deterministic for a given seed and input order.
    """
    order = list(examples)
    random.Random(seed).shuffle(order)
    n_validation, n_test = split_counts(len(order), validation_fraction, test_fraction,
                                        need_validation=need_validation, need_test=need_test)
    out: dict[str, list[Example]] = {}
    if need_test:
        out["test"] = order[:n_test]
    if need_validation:
        out["validation"] = order[n_test:n_test + n_validation]
    out["train"] = order[n_test + n_validation:]
    return out
