"""How a task input becomes chat messages and token ids, identically in training, evaluation and serving.

Training, the evaluator and the service all call these functions with the `TaskInfo` stored in the
adapter manifest, so an adapter never sees a prompt shaped differently from the ones it learned on.
The prompt and the completion are tokenized separately (prompt through the chat template with the
generation prompt, completion as plain text plus EOS) because that is exactly the token sequence
generation produces: tokenizing the concatenated text could merge tokens across the boundary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .adapter_dir import TaskInfo

IGNORE_INDEX = -100  # label value that torch's cross-entropy skips
PROMPT_FIELD = "{prompt}"


@dataclass(frozen=True)
class EncodedExample:
    """One training row: `labels` equals `input_ids` on the completion and IGNORE_INDEX on the prompt."""

    input_ids: list[int]
    labels: list[int]
    prompt_length: int


def render_prompt(template: str, prompt: str) -> str:
    """Fill `{prompt}` only: templates often hold JSON examples whose braces `str.format` would choke on."""
    if PROMPT_FIELD not in template:
        raise ValueError(f"prompt_template {template!r} has no {PROMPT_FIELD} placeholder: the input would be lost")
    return template.replace(PROMPT_FIELD, prompt)


def build_messages(task: TaskInfo, prompt: str,
                   few_shot: Sequence[tuple[str, str]] = ()) -> list[dict[str, str]]:
    """The prompt turns for one input: optional system line, few-shot pairs, then the user turn.

    Few-shot inputs go through the same template as the real input so the examples look like the
    question the model is asked.
    """
    messages: list[dict[str, str]] = []
    if task.system_prompt:
        messages.append({"role": "system", "content": task.system_prompt})
    for shot_prompt, shot_answer in few_shot:
        messages.append({"role": "user", "content": render_prompt(task.prompt_template, shot_prompt)})
        messages.append({"role": "assistant", "content": shot_answer})
    messages.append({"role": "user", "content": render_prompt(task.prompt_template, prompt)})
    return messages


def encode_prompt(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of the chat-formatted prompt, ending with the assistant header generation continues from."""
    encoded = tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True,
                                            tokenize=True)
    # transformers 5 returns a BatchEncoding (a Mapping) here; older versions returned the list itself.
    ids = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded
    if ids and isinstance(ids[0], list):  # a batch of one
        ids = ids[0]
    return [int(token) for token in ids]


def target_end_id(tokenizer: Any) -> int:
    """The id every training target ends with: the tokenizer's EOS. (Which ids *stop* generation is a
    different question, answered once by `sampling_rules.eos_token_ids`.)"""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id: the model could not learn to stop")
    return int(tokenizer.eos_token_id)


def encode_completion(tokenizer: Any, completion: str) -> list[int]:
    """Completion ids followed by EOS, which teaches the model where to stop."""
    end = target_end_id(tokenizer)
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return [int(token) for token in ids] + [end]


def encode_example(tokenizer: Any, messages: Sequence[Mapping[str, str]], completion: str) -> EncodedExample:
    prompt_ids = encode_prompt(tokenizer, messages)
    completion_ids = encode_completion(tokenizer, completion)
    return EncodedExample(
        input_ids=prompt_ids + completion_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + completion_ids,
        prompt_length=len(prompt_ids),
    )
