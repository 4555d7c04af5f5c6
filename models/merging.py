"""Merging LoRA adapters into one: the arithmetic shared by `lorafleet merge` and per-request merges.

Both paths must give the same weights (a merge served per request answers exactly like the same merge
registered offline), so both call `merge_lora` here. It reproduces PEFT's `add_weighted_adapter`
(`peft/tuners/lora/model.py`) on plain A/B tensors, with PEFT's own merge functions
(`peft.utils.merge_utils`: task arithmetic, TIES, DARE) doing the maths; `tests/test_merging.py` checks
the result against `add_weighted_adapter` on a real PEFT model for every method. Working on tensors
instead of a PEFT model is what lets the engine merge resident adapters without the base model, and
lets DARE's random drops be seeded per merge instead of depending on what consumed the global RNG
before (PEFT initialises the new adapter's A from it first).

Methods, as PEFT defines them (weights w_i, parent scalings s_i):
* `linear`, `ties`, `dare_linear`, `dare_ties`: A and B are merged separately with weights
  sign(w s)·sqrt(|w s|) and sqrt(|w s|); every parent must have the same rank. Cheap, approximate
  (PEFT's own words: "a very rough approximation") because B_merged A_merged has cross terms.
* `cat`: A and B are concatenated along the rank: B A = sum_i w_i s_i B_i A_i exactly (rank = sum).
* `svd`: the exact weighted sum of deltas, truncated to the largest parent rank by SVD.
The merged adapter has scaling 1 (PEFT writes lora_alpha = r): the parents' scalings are in its tensors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, get_args

import torch

from .lora_weights import ATTENTION_MODULES, LORA_MODULES

if TYPE_CHECKING:
    from .adapter_dir import AdapterManifest

MergeMethod = Literal["linear", "cat", "svd", "ties", "dare_linear", "dare_ties"]
MERGE_METHODS: tuple[str, ...] = get_args(MergeMethod)
DENSITY_METHODS = frozenset({"ties", "dare_linear", "dare_ties"})  # methods that prune to `density`
SAME_RANK_METHODS = frozenset({"linear", "ties", "dare_linear", "dare_ties"})
SignMethod = Literal["total", "frequency"]
# `LORA_MODULES` is the order PEFT visits a Llama layer's projections in (`named_modules`): DARE draws its
# random masks module by module, so this order is part of what a seed means.
MAX_MERGED = 16  # parents of one merge: more is a mistake (and a request-sized amount of work)

Key = tuple[int, str]  # (layer, module)


class LoraTensors(Protocol):
    """What a parent adapter must offer: A (r, in) and B (out, r) per (layer, module), and its scaling."""

    rank: int
    scaling: float
    a: Mapping[Key, torch.Tensor]
    b: Mapping[Key, torch.Tensor]


@dataclass(frozen=True)
class MergeRecipe:
    """How to merge: checked on construction, so a bad recipe fails before any tensor is touched."""

    weights: tuple[float, ...]
    method: MergeMethod = "linear"
    density: float | None = None
    majority_sign_method: SignMethod = "total"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= len(self.weights) <= MAX_MERGED:
            raise ValueError(f"a merge takes 1 to {MAX_MERGED} adapters, got {len(self.weights)}")
        for index, weight in enumerate(self.weights):
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"weights[{index}] must be a finite number")
        if all(weight == 0 for weight in self.weights):
            raise ValueError("at least one weight must be non-zero")
        if self.method not in MERGE_METHODS:
            raise ValueError(f"method must be one of {', '.join(MERGE_METHODS)}")
        if self.method in DENSITY_METHODS:
            if self.density is None:
                raise ValueError(f"method {self.method!r} prunes: give a density in (0, 1]")
            if isinstance(self.density, bool) or not 0 < self.density <= 1:
                raise ValueError("density must be in (0, 1]")
        elif self.density is not None:
            raise ValueError(f"density applies to {', '.join(sorted(DENSITY_METHODS))} only, not {self.method!r}")
        if self.majority_sign_method not in get_args(SignMethod):
            raise ValueError("majority_sign_method must be 'total' or 'frequency'")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError("seed must be an integer in [0, 2**63)")

    @property
    def effective_method(self) -> str:
        """PEFT merges a single adapter linearly whatever the method asked."""
        return "linear" if len(self.weights) == 1 else self.method

    def describe(self) -> dict[str, object]:
        """The recipe as lineage (manifest, MLflow tags, cache identity)."""
        described: dict[str, object] = {"method": self.method, "weights": list(self.weights)}
        if self.density is not None:
            described["density"] = self.density
        if self.effective_method in ("ties", "dare_ties"):
            described["majority_sign_method"] = self.majority_sign_method
        if self.effective_method.startswith("dare"):
            described["seed"] = self.seed
        return described


@dataclass(frozen=True)
class MergedLora:
    rank: int
    scaling: float
    target_modules: frozenset[str]
    a: dict[Key, torch.Tensor]
    b: dict[Key, torch.Tensor]


def merged_rank(ranks: Sequence[int], method: str) -> int:
    """The merged adapter's rank (raises when the method needs equal ranks and they differ)."""
    if method in SAME_RANK_METHODS and len(set(ranks)) != 1:
        raise ValueError(f"method {method!r} needs adapters of one rank, got ranks {list(ranks)}: use "
                         f"'cat' or 'svd' to merge adapters of different ranks")
    if method == "cat":
        return sum(ranks)
    return max(ranks)


def mergeable_rank(peft_config: object, where: str) -> int:
    """A parent's rank from its `adapter_config.json`, refusing (ValueError naming `where`) what is not merged:
    no valid rank, or rsLoRA (PEFT's merged config keeps `use_rslora` and would rescale the result by sqrt(r))."""
    rank = peft_config.get("r") if isinstance(peft_config, dict) else None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{where}: its adapter_config.json has no valid rank r")
    if peft_config.get("use_rslora"):
        raise ValueError(f"{where}: rsLoRA adapters are not merged (PEFT's merge would rescale the result by sqrt(r))")
    return rank


def merge_lora(parents: Sequence[LoraTensors], recipe: MergeRecipe) -> MergedLora:
    """One adapter from `parents` weighted by `recipe.weights` (PEFT's `add_weighted_adapter` arithmetic)."""
    if len(parents) != len(recipe.weights):
        raise ValueError(f"{len(parents)} adapters but {len(recipe.weights)} weights")
    method = recipe.effective_method
    rank = merged_rank([parent.rank for parent in parents], method)
    keys = sorted({key for parent in parents for key in parent.a}, key=_module_position)
    a: dict[Key, torch.Tensor] = {}
    b: dict[Key, torch.Tensor] = {}
    with torch.random.fork_rng(devices=[]):  # DARE's masks: seeded here, the caller's RNG untouched
        torch.manual_seed(recipe.seed)
        for key in keys:
            # fp32 whatever the files hold: parents saved in different dtypes still merge alike
            present = [(parent.a[key].float(), parent.b[key].float(), parent.scaling, weight)
                       for parent, weight in zip(parents, recipe.weights, strict=True) if key in parent.a]
            a[key], b[key] = _merge_module(present, recipe, method, rank)
    return MergedLora(rank=rank, scaling=1.0, target_modules=frozenset(module for _, module in keys), a=a, b=b)


def _module_position(key: Key) -> tuple[int, int]:
    layer, module = key
    return layer, LORA_MODULES.index(module) if module in LORA_MODULES else len(LORA_MODULES)


def _merge_module(present: list[tuple[torch.Tensor, torch.Tensor, float, float]], recipe: MergeRecipe,
                  method: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's merged (A, B) from its (A, B, scaling, weight) in each parent that targets it."""
    from peft.utils import merge_utils

    if method == "cat":
        a = torch.cat([a * weight * scaling for a, _, scaling, weight in present], dim=0)
        b = torch.cat([b for _, b, _, _ in present], dim=1)
        # PEFT fills a zero tensor of the full merged rank: a module some parents lack keeps zero rows.
        return _pad_rows(a, rank), _pad_rows(b.T, rank).T.contiguous()
    if method == "svd":
        deltas = [(b @ a) * scaling for a, b, scaling, _ in present]
        weights = torch.tensor([weight for *_, weight in present]).to(deltas[0].device)
        delta = merge_utils.task_arithmetic(deltas, weights)
        u, s, vh = torch.linalg.svd(delta, full_matrices=True)
        return vh[:rank, :].contiguous(), (u[:, :rank] @ torch.diag(s[:rank])).contiguous()
    scaled = [weight * scaling for _, _, scaling, weight in present]
    weights_a = torch.tensor([math.sqrt(abs(w)) * (1 if w >= 0 else -1) for w in scaled])
    weights_b = torch.tensor([math.sqrt(abs(w)) for w in scaled])
    merged = []
    for tensors, weights in (([a for a, *_ in present], weights_a), ([b for _, b, *_ in present], weights_b)):
        if method == "linear":
            out = merge_utils.task_arithmetic(tensors, weights)
        elif method == "ties":
            out = merge_utils.ties(tensors, weights, recipe.density, recipe.majority_sign_method)
        elif method == "dare_linear":
            out = merge_utils.dare_linear(tensors, weights, recipe.density)
        else:
            out = merge_utils.dare_ties(tensors, weights, recipe.density, recipe.majority_sign_method)
        merged.append(out.contiguous())
    return merged[0], merged[1]


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    padded = tensor.new_zeros((rows, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    return padded


def peft_key(layer: int, module: str, which: str) -> str:
    """PEFT's tensor name for a Llama projection's LoRA matrix (`which`: "A" or "B")."""
    group = "self_attn" if module in ATTENTION_MODULES else "mlp"
    return f"base_model.model.model.layers.{layer}.{group}.{module}.lora_{which}.weight"


def peft_config_of(merged: MergedLora, template: Mapping[str, object]) -> dict[str, object]:
    """The merged adapter's `adapter_config.json`: the first parent's, with PEFT's merged values
    (lora_alpha = r, so scaling 1; the union of target modules; no per-module patterns)."""
    config = dict(template)
    config.update(r=merged.rank, lora_alpha=merged.rank, use_rslora=False, rank_pattern={}, alpha_pattern={},
                  target_modules=sorted(merged.target_modules, key=LORA_MODULES.index), lora_dropout=0.0)
    return config


def save_merged_adapter(merged: MergedLora, target_dir: Path, peft_config: Mapping[str, object],
                        manifest: AdapterManifest) -> Path:
    """Write the merged adapter as a PEFT LoRA directory with its manifest, in one atomic step."""
    from safetensors.torch import save_file

    from .adapter_dir import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, validate_adapter_dir, write_manifest
    from .cache import atomic_directory

    tensors = {peft_key(layer, module, "A"): tensor.contiguous() for (layer, module), tensor in merged.a.items()}
    tensors.update({peft_key(layer, module, "B"): tensor.contiguous()
                    for (layer, module), tensor in merged.b.items()})
    with atomic_directory(Path(target_dir), overwrite=True) as staging:
        save_file(tensors, str(staging / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / PEFT_CONFIG_FILE).write_text(json.dumps(dict(peft_config), indent=2), encoding="utf-8")
        write_manifest(staging, manifest)
        validate_adapter_dir(staging)
    return Path(target_dir)
