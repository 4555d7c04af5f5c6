"""`first_non_finite`: one check over all of an adapter's tensors, still naming the culprit."""

from __future__ import annotations

import pytest
import torch

from lorafleet.models.tensor_files import first_non_finite


def tensors() -> dict[str, torch.Tensor]:
    return {"a": torch.ones(3, 4), "b": torch.ones(2, dtype=torch.bfloat16), "c": torch.zeros(5, 1),
            "d": torch.ones(1, dtype=torch.float16)}


def test_all_finite_is_none() -> None:
    assert first_non_finite(tensors()) is None
    assert first_non_finite({}) is None


@pytest.mark.parametrize("key", ["a", "b", "c", "d"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_the_first_non_finite_tensor_is_named_whatever_its_dtype(key: str, value: float) -> None:
    found = tensors()
    found[key].view(-1)[-1] = value
    assert first_non_finite(found) == key


def test_the_first_in_order_is_named_when_several_are_bad() -> None:
    found = tensors()
    found["c"][0, 0] = float("nan")
    found["d"][0] = float("inf")
    assert first_non_finite(found) == "c"
