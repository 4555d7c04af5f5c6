"""Per-request merges: several resident adapters combined into one LoRA slot (LoRAX's `merged_adapters`).

A merge is one more adapter to the cache: its "files" are its parents' folders plus a `MergeRecipe`,
read in the background like any adapter (each parent through the same checked reader), merged by
`models/merging.merge_lora` (the arithmetic `lorafleet merge` registers offline, so a merge served per
request answers exactly like the same merge registered), then installed in a slot and LRU-evicted like
any other. Rows of a merge batch with rows of every other adapter: to the step it is just a slot.

`check_merge` is the boundary check, run before anything is queued: it reads only the parents' small
`adapter_config.json` files to refuse what would otherwise fail later in the background read (a
heads-only parent, ranks a method cannot merge, a merged rank beyond the slots' `max_rank`), so such a
request is a 400 naming the problem instead of a failed generation.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lorafleet.models.adapter_dir import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, read_adapter_text
from lorafleet.models.lora_weights import LoraWeights, check_weights
from lorafleet.models.merging import MergeRecipe, merge_lora, mergeable_rank, merged_rank

if TYPE_CHECKING:
    from lorafleet.serving.engine.adapter_cache import LoadedAdapter
    from lorafleet.serving.engine.model import LlamaShape


@dataclass(frozen=True)
class MergePlan:
    """What a merged cache entry is made of: parent folders, in order, and the recipe."""

    parents: tuple[Path, ...]
    recipe: MergeRecipe


def check_merge(plan: MergePlan, *, max_rank: int) -> int:
    """The merged rank, after refusing (ValueError, naming the parent by position) what cannot be merged."""
    ranks = []
    for index, folder in enumerate(plan.parents):
        if not (folder / PEFT_WEIGHTS_FILE).exists():
            raise ValueError(f"ids.{index}: a Turbo adapter without LoRA weights has nothing to merge")
        try:
            config = json.loads(read_adapter_text(folder, PEFT_CONFIG_FILE))
        except (OSError, ValueError) as error:
            raise ValueError(f"ids.{index}: its {PEFT_CONFIG_FILE} cannot be read ({type(error).__name__})") from None
        ranks.append(mergeable_rank(config, f"ids.{index}"))
    rank = merged_rank(ranks, plan.recipe.effective_method)
    if rank > max_rank:
        raise ValueError(f"the merged adapter would have rank {rank} ({plan.recipe.method} of ranks {ranks}); this "
                         f"server's slots hold rank <= {max_rank} (engine.max_lora_rank)")
    return rank


def read_merge(plan: MergePlan, reader: Callable[[Path, LlamaShape], LoadedAdapter],
               shape: LlamaShape) -> LoadedAdapter:
    """Read every parent with `reader` (all checks included) and merge them: the cache's read of a merge."""
    from lorafleet.serving.engine.adapter_cache import LoadedAdapter

    parents: list[LoraWeights] = []
    for index, folder in enumerate(plan.parents):
        loaded = reader(folder, shape)
        if loaded.weights is None:
            raise ValueError(f"merge parent {index} ({folder}) has no LoRA weights to merge")
        parents.append(loaded.weights)
    merged = merge_lora(parents, plan.recipe)
    weights = LoraWeights(rank=merged.rank, scaling=merged.scaling, target_modules=merged.target_modules,
                          a=merged.a, b=merged.b)
    check_weights(weights, shape, source="merged adapter")  # finite parents can still overflow when summed
    return LoadedAdapter(weights=weights, heads=None)  # heads fit one adapter's outputs, not a blend


def merge_identity(parent_identities: Sequence[str], recipe: MergeRecipe) -> str:
    """What the merged weights depend on: the parents' exact weights (their identities) and the recipe."""
    return json.dumps({"parents": list(parent_identities), "recipe": recipe.describe()}, sort_keys=True)
