"""Score a model (base or adapted) on prepared examples: build prompts, generate, compute metrics.

Examples are rows of a prepared split: `messages` are the prompt turns exactly as training built
them (system line and template already applied) and `completion` is the reference. Prompts go
through `models/prompting.py:encode_prompt`, the function training used, so the evaluated prompt is
token-for-token the trained one.

Few-shot pairs are (user turn, answer) inserted verbatim before the last user turn. They are not
re-templated (unlike `prompting.build_messages`, which takes raw inputs) because prepared rows carry
only the templated turn; `few_shot_from_examples` takes them from training rows in that form, so the
examples look exactly like the question that follows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lorafleet.evaluation.generation import GenerationResult, generate_texts
from lorafleet.evaluation.metrics import compute_quality
from lorafleet.evaluation.parsing import STRUCTURED_FORMATS, parse_fields
from lorafleet.models.adapter_dir import TaskInfo
from lorafleet.models.prompting import encode_prompt
from lorafleet.sections.evaluation import EvaluationSettings

Message = dict[str, str]
# (prompt token ids, progress label) -> greedy completions in input order: `generate_texts` on `model`
# when none is given, or the engine (evaluation/engine_generation.py).
Generate = Callable[[list[list[int]], str], list[GenerationResult]]


@dataclass(frozen=True)
class QualityReport:
    """Metrics plus the raw outputs behind them (logged as an artifact so a score can be audited)."""

    label: str
    metrics: dict[str, float]
    predictions: list[str]
    references: list[str]
    n_examples: int


def evaluate_quality(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Mapping[str, Any]],
    task: TaskInfo,
    settings: EvaluationSettings,
    *,
    few_shot: Sequence[tuple[str, str]] = (),
    label: str = "",
    progress: bool = True,
    generate: Generate | None = None,
) -> QualityReport:
    """Greedy-generate an answer for the first `settings.max_examples` examples and score them.

    Metrics: those of `compute_quality` for `task.output_format`, plus `truncation_rate` (answers
    cut by `max_new_tokens` before EOS: if high, scores understate the model) and `mean_new_tokens`.
    References are parsed before any generation so a data problem fails in milliseconds, not after
    minutes of decoding.
    """
    limit = len(examples) if settings.max_examples is None else min(settings.max_examples, len(examples))
    chosen = [examples[i] for i in range(limit)]  # indexing, not slicing: a `datasets.Dataset` works too
    if not chosen:
        raise ValueError("evaluate_quality: no examples to score")
    references = [_completion(example, index) for index, example in enumerate(chosen)]
    _check_references(references, chosen, task)
    prompts = build_prompts(tokenizer, chosen, few_shot)
    desc = f"evaluate {label or task.name}"
    if generate is not None:
        results = generate(prompts, desc)
    else:
        results = generate_texts(model, tokenizer, prompts, max_new_tokens=settings.max_new_tokens,
                                 batch_size=settings.batch_size, progress=progress, desc=desc)
    predictions = [result.text for result in results]
    metrics = compute_quality(predictions, references, task.output_format)
    metrics["truncation_rate"] = sum(not result.hit_eos for result in results) / len(results)
    metrics["mean_new_tokens"] = sum(result.n_tokens for result in results) / len(results)
    return QualityReport(label=label, metrics=metrics, predictions=predictions, references=references,
                         n_examples=len(chosen))


def build_prompts(tokenizer: Any, examples: Sequence[Mapping[str, Any]],
                  few_shot: Sequence[tuple[str, str]] = ()) -> list[list[int]]:
    """Chat-template token ids (ending with the assistant header) for each example's prompt turns."""
    return [encode_prompt(tokenizer, with_few_shot(_messages(example, index), few_shot))
            for index, example in enumerate(examples)]


def with_few_shot(messages: Sequence[Mapping[str, str]],
                  few_shot: Sequence[tuple[str, str]]) -> list[Message]:
    """`messages` with each (prompt, answer) pair as a user/assistant turn before the last user turn.

    The system turn, if any, stays first; earlier turns of a multi-turn prompt keep their place.
    """
    turns = [dict(message) for message in messages]
    last_user = max((i for i, turn in enumerate(turns) if turn.get("role") == "user"), default=None)
    if last_user is None:
        raise ValueError("messages have no user turn to put few-shot examples before")
    shots: list[Message] = []
    for index, pair in enumerate(few_shot):
        if len(pair) != 2 or not all(isinstance(part, str) for part in pair):
            raise ValueError(f"few_shot[{index}] must be a (prompt, answer) pair of strings, got {pair!r}")
        shots += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return turns[:last_user] + shots + turns[last_user:]


def few_shot_from_examples(examples: Sequence[Mapping[str, Any]], k: int) -> list[tuple[str, str]]:
    """(last user turn, completion) of the first `k` prepared rows, the form `evaluate_quality` takes."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k > len(examples):
        raise ValueError(f"asked for {k} few-shot examples but only {len(examples)} rows were given")
    pairs = []
    for index in range(k):
        example = examples[index]
        users = [turn for turn in _messages(example, index) if turn["role"] == "user"]
        if not users:
            raise ValueError(f"{_where(example, index)}: messages have no user turn")
        pairs.append((users[-1]["content"], _completion(example, index)))
    return pairs


def _messages(example: Mapping[str, Any], index: int) -> list[Message]:
    messages = example.get("messages") if isinstance(example, Mapping) else None
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError(f"{_where(example, index)}: `messages` must be a non-empty list of "
                         "{role, content}")
    for turn_index, turn in enumerate(messages):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("role"), str) \
                or not isinstance(turn.get("content"), str):
            # ValueError, not TypeError: a malformed data row is bad input, not a caller's bug.
            raise ValueError(f"{_where(example, index)}: messages[{turn_index}] must have "  # noqa: TRY004
                             f"string `role` and `content`, got {turn!r}")
    return [{"role": turn["role"], "content": turn["content"]} for turn in messages]


def _completion(example: Mapping[str, Any], index: int) -> str:
    completion = example.get("completion") if isinstance(example, Mapping) else None
    if not isinstance(completion, str):
        raise ValueError(f"{_where(example, index)}: `completion` must be a string, "  # noqa: TRY004
                         f"got {completion!r}")
    return completion


def _check_references(references: list[str], examples: Sequence[Mapping[str, Any]], task: TaskInfo) -> None:
    if task.output_format not in STRUCTURED_FORMATS:
        return
    for index, reference in enumerate(references):
        if parse_fields(reference, task.output_format) is None:
            raise ValueError(f"{_where(examples[index], index)}: the reference completion is not valid "
                             f"{task.output_format} (task {task.name!r}): {reference[:120]!r}")


def _where(example: Any, index: int) -> str:
    row_id = example.get("id") if isinstance(example, Mapping) else None
    return f"example {index}" + (f" (id {row_id})" if row_id is not None else "")
