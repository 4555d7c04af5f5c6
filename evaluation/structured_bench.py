"""`bench structured`: what a JSON schema costs and buys on the engine, for the base model and an adapter.

The schema is derived from the task's own training answers (`schema_from_answers`: one object shape per
key set seen, each key typed by the JSON types seen, strings no longer than the longest seen, no other
keys), which is the schema a team would
write for its extraction task. On the same test rows, in one process, it reports per variant (base /
adapter, without / with the schema): parse rate, field F1, and tokens/s of batched scoring on the engine;
then batch-1 greedy decoding of the adapter without and with the schema (ms per token: the mask's cost per
token), and, when the adapter has Turbo heads, the same with speculation on: τ and tokens/s without and
with the schema (drafts are cut where the grammar stops accepting them).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.evaluation.engine_generation import EngineScorer
from lorafleet.evaluation.quality import build_prompts, evaluate_quality
from lorafleet.models.adapter_dir import TaskInfo
from lorafleet.models.grammar import GrammarCompiler
from lorafleet.models.sampling_rules import eos_token_ids
from lorafleet.models.turbo_heads import has_heads
from lorafleet.sections.evaluation import EvaluationSettings

_JSON_TYPES = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array"),
               (dict, "object"), (type(None), "null"))


def schema_from_answers(answers: Sequence[str]) -> dict[str, Any]:
    """A JSON schema every answer satisfies: `anyOf` one closed object shape per distinct key set."""
    # Keyed by the key set; properties keep the order the answers write them in, because the grammar makes
    # the model write them in declared order (sorted keys would force an order the adapter never learned).
    # Strings are bounded by the longest value seen for their key: a schema states the field's range, and a
    # model that does not know the task (the base) would otherwise fill a free string until max_tokens.
    shapes: dict[frozenset[str], dict[str, set[str]]] = {}
    longest: dict[tuple[frozenset[str], str], int] = {}
    for answer in answers:
        value = json.loads(answer)
        if not isinstance(value, dict):
            raise ValueError("schema_from_answers: every answer must be a JSON object")  # noqa: TRY004 - bad data
        shape = frozenset(value)
        types = shapes.setdefault(shape, {})
        for key, item in value.items():
            types.setdefault(key, set()).add(next(name for kind, name in _JSON_TYPES if isinstance(item, kind)))
            if isinstance(item, str):
                longest[(shape, key)] = max(longest.get((shape, key), 0), len(item))

    def field(shape: frozenset[str], key: str, kinds: set[str]) -> dict[str, Any]:
        spec: dict[str, Any] = {"type": min(kinds) if len(kinds) == 1 else sorted(kinds)}
        if (shape, key) in longest:
            spec["maxLength"] = longest[(shape, key)]
        return spec

    variants = [{"type": "object", "additionalProperties": False, "required": list(types),
                 "properties": {key: field(shape, key, kinds) for key, kinds in types.items()}}
                for shape, types in shapes.items()]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


@dataclass
class Variant:
    model: str  # "base" or "adapter"
    schema: bool
    seconds: float
    tokens: int
    metrics: dict[str, float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@dataclass
class StructuredBenchReport:
    adapter: str
    rows: int
    schema: dict[str, Any]
    variants: list[Variant] = field(default_factory=list)
    decode: dict[str, Any] = field(default_factory=dict)  # batch-1: ms/token (plain, schema), tau with heads

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "variants": [{**asdict(v), "tokens_per_s": v.tokens_per_s} for v in self.variants]}


def measure_structured(loaded: Any, adapter_dir: Path, label: str, rows: Sequence[Mapping[str, Any]],
                       task: TaskInfo, train_answers: Sequence[str], *, max_new_tokens: int, decode_prompts: int,
                       progress: bool = True) -> StructuredBenchReport:
    tokenizer = loaded.tokenizer
    stops = sorted(eos_token_ids(loaded.model, tokenizer, required=True))
    schema = schema_from_answers(train_answers)
    compiler = GrammarCompiler(tokenizer, loaded.model.config.vocab_size, stops)
    grammar = compiler.compile({"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    settings = EvaluationSettings(max_examples=None, max_new_tokens=max_new_tokens)
    report = StructuredBenchReport(adapter=label, rows=len(rows), schema=schema)
    with EngineScorer(loaded.model, tokenizer, adapter_dir, eos_token_ids=stops) as scorer:
        for model in ("base", "adapter"):
            for constrained in (False, True):
                produced: list[int] = []

                def generate(prompts: Any, desc: str, *, adapter: bool = model == "adapter",
                             constrained: bool = constrained, produced: list[int] = produced) -> Any:
                    results = scorer.generate(prompts, max_new_tokens=max_new_tokens, adapter=adapter,
                                              progress=progress, desc=desc, grammar=grammar if constrained else None)
                    produced.append(sum(result.n_tokens for result in results))
                    return results

                started = time.perf_counter()
                quality = evaluate_quality(None, tokenizer, rows, task, settings, generate=generate, progress=progress,
                                           label=f"{model}{' + schema' if constrained else ''}")
                report.variants.append(Variant(model=model, schema=constrained, seconds=time.perf_counter() - started,
                                               tokens=sum(produced), metrics=quality.metrics))
        prompts = build_prompts(tokenizer, list(rows[:decode_prompts]))
        modes = [("plain", False)] + ([("speculative", True)] if has_heads(adapter_dir) else [])
        for mode, speculative in modes:
            for constrained in (False, True):
                tokens = drafts = accepted = 0
                started = time.perf_counter()
                for prompt in prompts:
                    out, steps, took = scorer.decode_one(prompt, max_new_tokens=max_new_tokens, speculative=speculative,
                                                         grammar=grammar if constrained else None)
                    tokens, drafts, accepted = tokens + len(out), drafts + steps, accepted + took
                seconds = time.perf_counter() - started
                key = f"{mode}{'_schema' if constrained else ''}"
                report.decode[key] = {"tokens": tokens, "ms_per_token": 1000 * seconds / max(tokens, 1),
                                      "tokens_per_s": tokens / seconds if seconds else 0.0,
                                      "tau": 1 + accepted / drafts if drafts else None}
    return report
