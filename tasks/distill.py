"""Self-distillation data for `turbo` heads: the frozen model's own greedy continuations.

A head trained on the model's own outputs predicts exactly what verification will accept, so a
`turbo` adapter speeds the model up without changing a single served token. Generating the targets
is the expensive part (one greedy generation per training prompt): it runs on the serving engine's
continuous batching when the engine takes the base model (`evaluation/engine_generation.py`, the same
greedy outputs as `generate`), and the rows are cached in the training run's checkpoint folder and
reused by a resumed or repeated run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorafleet.evaluation.generation import GenerationResult, generate_texts
from lorafleet.models.batching import IGNORE_INDEX
from lorafleet.models.cache import atomic_write_text
from lorafleet.models.prompting import encode_prompt, target_end_id
from lorafleet.models.turbo_settings import TurboSettings
from lorafleet.tasks.data.prepare import PreparedData

log = logging.getLogger(__name__)
DISTILL_BATCH_SIZE = 32  # prompts per `generate` call on the transformers path
# (prompts, max_new_tokens, progress label) -> greedy completions in input order
Continue = Callable[[list[list[int]], int, str], list[GenerationResult]]


def hf_continue(model: Any, tokenizer: Any) -> Continue:
    """Greedy continuations with transformers `generate` (the baseline; any model PEFT wraps)."""
    def run(prompts: list[list[int]], max_new_tokens: int, desc: str) -> list[GenerationResult]:
        return generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                              batch_size=DISTILL_BATCH_SIZE, desc=desc)
    return run


def distilled_rows(make_continue: Callable[[], Continue], tokenizer: Any, prepared: PreparedData, split: str,
                   folder: Path, turbo: TurboSettings, limit: int | None) -> list[dict[str, list[int]]]:
    """Rows `prompt + the model's greedy continuation (+ eos)` with labels on the continuation.

    `make_continue` is called only when the rows are not cached (building an engine copies weights)."""
    cache = Path(folder) / f"distill-{split}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    records = prepared.records(split)[:limit] if limit else prepared.records(split)
    prompts = [encode_prompt(tokenizer, record["messages"]) for record in records]
    log.info("self-distillation: generating %d greedy continuations of the %s prompts", len(prompts), split)
    outputs = make_continue()(prompts, turbo.distill_max_new_tokens, f"self-distillation ({split})")
    rows = []
    for prompt, output in zip(prompts, outputs, strict=True):
        continuation = list(output.token_ids) + ([target_end_id(tokenizer)] if output.hit_eos else [])
        if continuation:
            rows.append({"input_ids": prompt + continuation,
                         "labels": [IGNORE_INDEX] * len(prompt) + continuation})
    Path(folder).mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache, json.dumps(rows))
    return rows
