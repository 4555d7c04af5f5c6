"""Prompt building and label masking (models/prompting.py). Runs in ~1 s on the tiny byte tokenizer."""

from __future__ import annotations

import pytest

from lorafleet.models.adapter_dir import TaskInfo
from lorafleet.models.prompting import (
    IGNORE_INDEX,
    build_messages,
    encode_example,
    encode_prompt,
    render_prompt,
)

JSON_TEMPLATE = 'Answer like {"name": "...", "n": 1}.\nText: {prompt}'


def test_build_messages_orders_system_shots_and_user_turn():
    task = TaskInfo(name="t", system_prompt="Be terse.", prompt_template="Q: {prompt}")
    messages = build_messages(task, "three?", few_shot=[("one?", "1"), ("two?", "2")])
    assert messages == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Q: one?"},
        {"role": "assistant", "content": "1"},
        {"role": "user", "content": "Q: two?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "Q: three?"},
    ]


def test_build_messages_without_system_prompt_starts_with_user():
    messages = build_messages(TaskInfo(name="t"), "hello")
    assert messages == [{"role": "user", "content": "hello"}]


def test_only_the_prompt_placeholder_is_substituted():
    # str.format would raise KeyError on the JSON braces; an input holding "{prompt}" stays literal.
    task = TaskInfo(name="t", prompt_template=JSON_TEMPLATE)
    content = build_messages(task, "a {prompt} b {x}")[-1]["content"]
    assert content == 'Answer like {"name": "...", "n": 1}.\nText: a {prompt} b {x}'


def test_template_without_placeholder_is_rejected():
    with pytest.raises(ValueError, match=r"\{prompt\}"):
        render_prompt("no placeholder here", "input")


def test_encode_prompt_matches_chat_template_text(tiny_tokenizer):
    messages = build_messages(TaskInfo(name="t", system_prompt="S"), "hi")
    ids = encode_prompt(tiny_tokenizer, messages)
    assert all(isinstance(token, int) for token in ids)
    text = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tiny_tokenizer.decode(ids) == text
    assert text.endswith("<|im_start|>assistant\n")


def test_labels_mask_exactly_the_prompt(tiny_tokenizer):
    messages = build_messages(TaskInfo(name="t", system_prompt="Extract."), "Ana bought 3 lamps.")
    completion = '{"customer":"Ana","quantity":3}'
    example = encode_example(tiny_tokenizer, messages, completion)
    prompt_ids = encode_prompt(tiny_tokenizer, messages)

    assert example.prompt_length == len(prompt_ids)
    assert example.input_ids[: example.prompt_length] == prompt_ids
    assert len(example.labels) == len(example.input_ids)
    assert example.labels[: example.prompt_length] == [IGNORE_INDEX] * example.prompt_length
    answer = example.labels[example.prompt_length:]
    assert IGNORE_INDEX not in answer
    assert answer == example.input_ids[example.prompt_length:]
    assert answer[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(answer) == completion + tiny_tokenizer.eos_token


def test_completion_is_tokenized_without_special_tokens(tiny_tokenizer):
    example = encode_example(tiny_tokenizer, [{"role": "user", "content": "x"}], "ok")
    answer = example.input_ids[example.prompt_length:]
    # "ok" is two byte tokens, then EOS: no BOS or chat markers were added to the completion.
    assert len(answer) == 3
    assert tiny_tokenizer.bos_token_id not in answer
