"""`models/merging.py` against PEFT's own `add_weighted_adapter`, method by method, on a real PEFT model."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch

from lorafleet.models.base import load_base_model
from lorafleet.models.merging import MergeRecipe, merge_lora

_NAME = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")


@dataclass
class Parent:
    rank: int
    scaling: float
    a: dict
    b: dict


def lora_layers(model):
    for name, module in model.named_modules():
        match = _NAME.search(name)
        if match and hasattr(module, "lora_A"):
            yield (int(match.group(1)), match.group(2)), module


def parent(model, adapter: str) -> Parent:
    a, b, rank, scaling = {}, {}, None, None
    for key, module in lora_layers(model):
        if adapter in module.lora_A:
            a[key] = module.lora_A[adapter].weight.detach().clone()
            b[key] = module.lora_B[adapter].weight.detach().clone()
            rank, scaling = module.r[adapter], module.scaling[adapter]
    return Parent(rank=rank, scaling=scaling, a=a, b=b)


@pytest.fixture(scope="module")
def peft_model(model_cache):
    """Three adapters on the tiny Llama: x and y of rank 4 (different alphas and modules), z of rank 8."""
    from peft import LoraConfig, get_peft_model

    model = load_base_model("tiny-random-llama", model_cache).model
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                           adapter_name="x")
    model.add_adapter("y", LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "o_proj"]))
    model.add_adapter("z", LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model


def peft_merged(model, name: str, adapters, weights, method, **options) -> Parent:
    model.add_weighted_adapter(adapters, weights, name, combination_type=method, **options)
    return parent(model, name)


@pytest.mark.parametrize(("method", "adapters", "density"), [
    ("linear", ["x", "y"], None),
    ("cat", ["x", "y", "z"], None),
    ("svd", ["x", "z"], None),
    ("ties", ["x", "y"], 0.5),
    ("dare_linear", ["x", "y"], 1.0),  # density 1: no random drop, so PEFT's RNG use does not matter
    ("dare_ties", ["x", "y"], 1.0),
])
def test_merge_equals_peft_add_weighted_adapter(peft_model, method, adapters, density):
    weights = [0.7, -0.4, 0.5][: len(adapters)]
    options = {} if density is None else {"density": density}
    expected = peft_merged(peft_model, f"peft-{method}", adapters, weights, method, **options)
    ours = merge_lora([parent(peft_model, name) for name in adapters],
                      MergeRecipe(weights=tuple(weights), method=method, density=density))
    assert ours.rank == expected.rank
    assert ours.scaling == pytest.approx(expected.scaling)
    assert set(ours.a) == set(expected.a)
    for key in expected.a:
        torch.testing.assert_close(ours.a[key], expected.a[key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.b[key], expected.b[key], rtol=1e-5, atol=1e-6)
    assert any(bool(ours.b[key].abs().sum() > 0) for key in ours.b)  # a real delta, not zeros


def test_cat_is_the_exact_weighted_sum_of_deltas(peft_model):
    x, z = parent(peft_model, "x"), parent(peft_model, "z")
    merged = merge_lora([x, z], MergeRecipe(weights=(0.7, 0.3), method="cat"))
    key = (0, "q_proj")
    expected = 0.7 * x.scaling * x.b[key] @ x.a[key] + 0.3 * z.scaling * z.b[key] @ z.a[key]
    torch.testing.assert_close(merged.scaling * merged.b[key] @ merged.a[key], expected, rtol=1e-5, atol=1e-6)


def test_dare_is_reproducible_by_seed_and_drops_about_one_minus_density(peft_model):
    x, y = parent(peft_model, "x"), parent(peft_model, "y")
    state = torch.random.get_rng_state()
    first = merge_lora([x, y], MergeRecipe(weights=(1.0, 1.0), method="dare_linear", density=0.5, seed=7))
    again = merge_lora([x, y], MergeRecipe(weights=(1.0, 1.0), method="dare_linear", density=0.5, seed=7))
    other = merge_lora([x, y], MergeRecipe(weights=(1.0, 1.0), method="dare_linear", density=0.5, seed=8))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is not consumed
    key = (1, "q_proj")  # a module both parents target
    assert torch.equal(first.a[key], again.a[key])
    assert not torch.equal(first.a[key], other.a[key])
    kept = (first.a[key] != 0).float().mean().item()  # an entry survives unless both parents dropped it
    assert 0.75 - 0.1 < kept < 0.75 + 0.1
    single = merge_lora([x], MergeRecipe(weights=(1.0,), method="dare_linear", density=0.5, seed=7))
    assert bool((single.a[key] != 0).all())  # one parent: PEFT merges it linearly, nothing drops


@pytest.mark.parametrize(("recipe", "message"), [
    ({"weights": ()}, "1 to 16 adapters"),
    ({"weights": (1.0, float("nan"))}, "weights[1]"),
    ({"weights": (0.0, 0.0)}, "non-zero"),
    ({"weights": (1.0, 1.0), "method": "ties"}, "density"),
    ({"weights": (1.0, 1.0), "method": "ties", "density": 1.5}, "(0, 1]"),
    ({"weights": (1.0, 1.0), "method": "linear", "density": 0.5}, "applies to"),
    ({"weights": (1.0, 1.0), "method": "magic"}, "method must be one of"),
])
def test_bad_recipes_are_refused_by_name(recipe, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        MergeRecipe(**recipe)


def test_ranks_must_match_for_linear_and_pruning_methods(peft_model):
    with pytest.raises(ValueError, match="one rank"):
        merge_lora([parent(peft_model, "x"), parent(peft_model, "z")], MergeRecipe(weights=(1.0, 1.0)))
