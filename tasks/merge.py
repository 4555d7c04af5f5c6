"""The `merge` method's stage: parents resolved and pinned, checked, merged, written as an adapter folder.

It stands where training stands in the `finetune` flow and hands evaluation the same thing
(`TrainedAdapter`), so a merged adapter is evaluated, registered and gated like a trained one. Parents
are read with the engine's checked reader (names, shapes against the base model, finite values,
files confined to their folder) before anything is merged, and every parent must have been trained on
the configured base model: a delta applied to weights it was not trained against means nothing.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from transformers import AutoConfig

from lorafleet import __version__
from lorafleet.config import FinetuneConfig
from lorafleet.models.adapter_dir import (
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    AdapterManifest,
    BaseModelRef,
    has_lora,
    read_adapter_text,
    validate_adapter_dir,
)
from lorafleet.models.base import load_tokenizer, resolve_base_model, tokenizer_fingerprint
from lorafleet.models.cache import sha256_file
from lorafleet.models.lora_weights import ProjectionShape, read_peft_adapter
from lorafleet.models.merging import merge_lora, mergeable_rank, peft_config_of, save_merged_adapter
from lorafleet.settings import Settings
from lorafleet.tasks.adapter_sources import resolve_model_reference
from lorafleet.tasks.data.prepare import PreparedData
from lorafleet.tasks.train import TrainedAdapter

log = logging.getLogger(__name__)


class MergeRefused(ValueError):
    """A parent that cannot be merged into this adapter; the message names the parent and why."""


def pinned_parents(config: FinetuneConfig, settings: Settings) -> list[tuple[str, Path, float]]:
    """(pinned reference, local folder, weight) per parent: an alias is pinned to the version it means now."""
    assert config.merge is not None
    parents = []
    for index, parent in enumerate(config.merge.adapters):
        try:
            folder, pinned = resolve_model_reference(parent.adapter, settings)
        except (LookupError, ValueError, OSError) as error:
            raise MergeRefused(f"merge.adapters.{index} ({parent.adapter!r}): {error}") from error
        parents.append((pinned, folder, parent.weight))
    return parents


def pin_parents(config: FinetuneConfig, settings: Settings) -> FinetuneConfig:
    """The config with each parent replaced by its pinned reference (`models:/NAME/VERSION` or a resolved
    folder), so the training key and the merge read the same versions even if an alias moves meanwhile."""
    assert config.merge is not None
    pinned = [parent.model_copy(update={"adapter": reference})
              for parent, (reference, _, _) in zip(config.merge.adapters, pinned_parents(config, settings), strict=True)]
    return config.model_copy(update={"merge": config.merge.model_copy(update={"adapters": pinned})})


def merge_key_parts(config: FinetuneConfig, settings: Settings) -> list[str]:
    """What makes a merge's weights: each parent's pinned reference and the hash of its LoRA weights."""
    parts = []
    for pinned, folder, _ in pinned_parents(config, settings):
        weights = folder / PEFT_WEIGHTS_FILE
        parts += [pinned, sha256_file(weights) if weights.exists() else "no-lora"]
    return parts


def merge_from_config(config: FinetuneConfig, prepared: PreparedData, settings: Settings, *, key: str) -> TrainedAdapter:
    """Merge the configured parents into `adapters/NAME/KEY` (atomically) and describe it like a training."""
    assert config.merge is not None
    started = time.perf_counter()
    resolved = resolve_base_model(config.base_model, settings.model_cache_dir)
    shape = ProjectionShape.from_hf_config(AutoConfig.from_pretrained(str(resolved.path)))
    tokenizer = load_tokenizer(resolved)
    parents, lineage, template = [], [], None
    for index, (pinned, folder, weight) in enumerate(pinned_parents(config, settings)):
        where = f"merge.adapters.{index} ({pinned})"
        manifest = validate_adapter_dir(folder)
        if not has_lora(folder):
            raise MergeRefused(f"{where}: a {manifest.method} adapter without LoRA weights has nothing to merge")
        if manifest.base_model.id != resolved.model_id or manifest.base_model.revision != resolved.revision:
            raise MergeRefused(f"{where} was trained on {manifest.base_model.id} (revision "
                               f"{manifest.base_model.revision}), not on {resolved.model_id} (revision "
                               f"{resolved.revision})")
        peft_config = json.loads(read_adapter_text(folder, PEFT_CONFIG_FILE))
        try:
            mergeable_rank(peft_config, where)
        except ValueError as error:
            raise MergeRefused(str(error)) from error
        try:
            parents.append(read_peft_adapter(folder, shape))
        except (ValueError, OSError) as error:
            raise MergeRefused(f"{where}: {error}") from error
        template = template or peft_config
        lineage.append({"reference": pinned, "name": manifest.name, "method": manifest.method, "weight": weight})
    recipe = config.merge.recipe()
    try:
        merged = merge_lora(parents, recipe)
    except ValueError as error:
        raise MergeRefused(f"merge: {error}") from error
    manifest = AdapterManifest(
        name=config.name, method="merge",
        base_model=BaseModelRef(id=resolved.model_id, revision=resolved.revision),
        tokenizer_hash=tokenizer_fingerprint(tokenizer), chat_template=tokenizer.chat_template,
        task=prepared.task, data_fingerprint=prepared.fingerprint,
        training_config=config.model_dump(mode="json"),
        lineage={"parents": lineage, "recipe": recipe.describe()},
        lorafleet_version=__version__,
    )
    adapter_dir = save_merged_adapter(merged, settings.adapters_dir / config.name / key,
                                      peft_config_of(merged, template or {}), manifest)
    params = sum(t.numel() for t in (*merged.a.values(), *merged.b.values()))
    log.info("merged %s (%s, rank %d) from %s", config.name, recipe.method, merged.rank,
             ", ".join(f"{p['reference']} x {p['weight']}" for p in lineage))
    return TrainedAdapter(adapter_dir=adapter_dir, steps=0, total_steps=0, best_val_loss=None, best_step=None,
                          stopped_early=False, resumed_from_step=None, already_finished=False, precision="fp32",
                          trainable_params=params, total_params=params, head_params=0,
                          train_seconds=time.perf_counter() - started, tokens_seen=0)
