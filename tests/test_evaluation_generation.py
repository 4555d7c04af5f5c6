"""Batched generation for evaluation: order, padding, stopping, PEFT, determinism (tiny random Llama)."""

from __future__ import annotations

import pytest
import torch

from lorafleet.evaluation.generation import generate_texts
from lorafleet.models.lora import LoraSettings, apply_lora
from lorafleet.models.prompting import encode_prompt
from lorafleet.models.sampling_rules import eos_token_ids

QUESTIONS = ["hi", "What is the capital of France?", "ok", "Tell me a story about a dragon and a knight.",
             "2+2?", "List three colours", "abc"]


def _prompts(tokenizer) -> list[list[int]]:
    return [encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]


def _one_at_a_time(model, tokenizer, prompts, max_new_tokens):
    return [generate_texts(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, batch_size=1,
                           progress=False)[0] for prompt in prompts]


def test_batched_greedy_equals_one_at_a_time(tiny_model):
    model, tokenizer = tiny_model.model, tiny_model.tokenizer
    prompts = _prompts(tokenizer)
    assert len({len(p) for p in prompts}) > 3  # real padding happens
    single = _one_at_a_time(model, tokenizer, prompts, 12)
    for batch_size in (3, len(prompts)):
        batched = generate_texts(model, tokenizer, prompts, max_new_tokens=12, batch_size=batch_size,
                                 progress=False)
        assert batched == single


def test_results_come_back_in_input_order(tiny_model):
    model, tokenizer = tiny_model.model, tiny_model.tokenizer
    prompts = _prompts(tokenizer)
    forward = generate_texts(model, tokenizer, prompts, max_new_tokens=6, batch_size=2, progress=False)
    backward = generate_texts(model, tokenizer, prompts[::-1], max_new_tokens=6, batch_size=2, progress=False)
    assert backward == forward[::-1]
    assert len({tuple(r.token_ids) for r in forward}) > 1  # distinct outputs, so order is observable


def test_each_row_stops_at_its_own_eos(tiny_model):
    """Declare a token the model really emits as EOS: every row must be cut at its first occurrence."""
    model, tokenizer = tiny_model.model, tiny_model.tokenizer
    prompts = _prompts(tokenizer)
    free = generate_texts(model, tokenizer, prompts, max_new_tokens=16, batch_size=4, progress=False)
    # A token the first row emits after its opening token: rows reach it (if ever) at different steps.
    stop = next(t for t in free[0].token_ids if t != free[0].token_ids[0])
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    stopped = generate_texts(model, tokenizer, prompts, max_new_tokens=16, batch_size=4, progress=False)
    hits = 0
    for before, after in zip(free, stopped):
        if stop in before.token_ids:
            cut = before.token_ids.index(stop)
            assert after.token_ids == before.token_ids[:cut]
            assert after.hit_eos and after.n_tokens == cut + 1
            hits += 1
        else:
            assert after.token_ids == before.token_ids and not after.hit_eos and after.n_tokens == 16
        assert after.text == tokenizer.decode(after.token_ids, skip_special_tokens=True)
    assert hits >= 1
    assert len({len(r.token_ids) for r in stopped}) > 1  # rows of one batch ended at different steps


def test_stop_tokens_union_tokenizer_and_generation_config(tiny_model):
    model, tokenizer = tiny_model.model, tiny_model.tokenizer
    assert eos_token_ids(model, tokenizer) == (tokenizer.eos_token_id,)
    model.generation_config.eos_token_id = [0, tokenizer.eos_token_id]
    assert eos_token_ids(model, tokenizer) == (tokenizer.eos_token_id, 0)


def test_peft_model_in_train_mode(tiny_model):
    """A LoRA model left in train mode (dropout on) decodes deterministically and gets its mode back."""
    model, tokenizer = tiny_model.model, tiny_model.tokenizer
    peft_model = apply_lora(model, LoraSettings(r=4, dropout=0.5))
    torch.manual_seed(1)
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.5)  # B starts at zero; make the adapter change the outputs
    peft_model.train()
    prompts = _prompts(tokenizer)[:4]
    batched = generate_texts(peft_model, tokenizer, prompts, max_new_tokens=10, batch_size=4, progress=False)
    assert peft_model.training
    assert batched == _one_at_a_time(peft_model, tokenizer, prompts, 10)
    with peft_model.disable_adapter():
        plain = generate_texts(peft_model, tokenizer, prompts, max_new_tokens=10, batch_size=4,
                               progress=False)
    assert plain != batched


def test_tokenizer_and_rng_are_left_alone(tiny_model):
    model, tokenizer = tiny_model.model, tiny_model.tokenizer
    side = tokenizer.padding_side
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate_texts(model, tokenizer, _prompts(tokenizer), max_new_tokens=4, batch_size=3, do_sample=True,
                   progress=False)
    assert torch.equal(torch.rand(3), expected)
    assert tokenizer.padding_side == side


def test_sampling_is_seeded(tiny_model):
    model, tokenizer = tiny_model.model, tiny_model.tokenizer
    prompts = _prompts(tokenizer)
    options = {"max_new_tokens": 12, "batch_size": 7, "do_sample": True, "temperature": 1.5,
               "progress": False}
    first = generate_texts(model, tokenizer, prompts, seed=3, **options)
    assert generate_texts(model, tokenizer, prompts, seed=3, **options) == first
    assert generate_texts(model, tokenizer, prompts, seed=4, **options) != first


def test_empty_prompt_list():
    assert generate_texts(None, None, [], max_new_tokens=4, batch_size=2) == []


@pytest.mark.parametrize("kwargs, error", [
    ({"prompts": [[]]}, "prompt 0 is empty"),
    ({"prompts": [[1, "a"]]}, "prompt 0 must be a list of int"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"batch_size": 0}, "batch_size"),
    ({"do_sample": True, "temperature": 0.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
])
def test_bad_arguments(tiny_model, kwargs, error):
    arguments = {"prompts": [[1, 2, 3]], "max_new_tokens": 4, "batch_size": 2, **kwargs}
    with pytest.raises((ValueError, TypeError), match=error):
        generate_texts(tiny_model.model, tiny_model.tokenizer, **arguments)
