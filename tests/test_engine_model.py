"""CompactLlama (serving/engine/model.py, attention.py) against transformers as the oracle.

Every packed layout the engine produces is covered: several prompts prefilled together, decode
steps, chunked prefill over two forwards, speculative multi-token chunks with rollback, and the
Qwen2 / Mistral / llama3-RoPE / untied variants. Runs in ~6 s (the slow SmolLM2 test: ~15 s more).
"""

from __future__ import annotations

import random

import pytest
import torch

from lorafleet.models.tiny import tiny_llama_config
from lorafleet.serving.engine.model import CompactLlama, ForwardBatch, LlamaShape

ATOL = 1e-4


def tiny_hf(seed: int = 0, family: str = "llama", **overrides):
    """A fresh tiny random transformers model (fp32) of the given family."""
    from transformers import (
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    config = tiny_llama_config(**overrides)
    if family == "qwen2":
        config = Qwen2Config(**{**config.to_dict(), "model_type": "qwen2"})
        return Qwen2ForCausalLM(config).eval()
    if family == "mistral":
        config = MistralConfig(**{**config.to_dict(), "model_type": "mistral"})
        return MistralForCausalLM(config).eval()
    return LlamaForCausalLM(config).eval()


def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    """Oracle: logits of every position of `tokens` from one plain transformers forward."""
    with torch.inference_mode():
        return hf_model(torch.tensor([tokens])).logits[0]  # (T, V)


class Driver:
    """Feeds sequences through CompactLlama the way the engine does: paged blocks (shuffled, so a
    sequence's blocks are not contiguous), several sequences packed into one forward."""

    def __init__(self, model: CompactLlama, *, num_blocks: int = 96, block_size: int = 4, lora=None,
                 seed: int = 0) -> None:
        self.model, self.block_size, self.lora = model, block_size, lora
        self.kv = model.new_kv_pool(num_blocks, block_size)
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.blocks: dict[str, list[int]] = {}

    def step(self, feeds: list[tuple[str, list[int], int, int]]) -> list[torch.Tensor]:
        """feeds: (sequence name, new tokens, start position, adapter slot) -> logits (n, V) per feed."""
        for name, tokens, start, _ in feeds:
            table = self.blocks.setdefault(name, [])
            while len(table) * self.block_size < start + len(tokens):
                table.append(self.free.pop())
        batch = ForwardBatch.build([f[1] for f in feeds], [f[2] for f in feeds],
                                   [self.blocks[f[0]] for f in feeds], self.block_size, [f[3] for f in feeds])
        logits = self.model.logits(self.model(batch, self.kv, self.lora))
        return list(logits.split(batch.query_lens))


def assert_close(ours: torch.Tensor, reference: torch.Tensor, *, atol: float = ATOL, rtol: float = 0.0) -> None:
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours, reference, atol=atol, rtol=rtol)


@pytest.fixture(scope="module", params=["prepacked", "dense"])
def llama(request):
    """Both weight paths: oneDNN-prepacked (the CPU default) and plain dense (what CUDA uses)."""
    hf = tiny_hf()
    model = CompactLlama.from_hf(hf, prepack=request.param == "prepacked")
    assert model.prepacked == (request.param == "prepacked")
    return hf, model


PROMPTS = {"a": [5, 6, 7, 8, 9, 10, 11], "b": [12, 13, 14], "c": [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31]}


def test_packed_prefill_then_decode_steps_match_transformers(llama):
    hf, model = llama
    driver = Driver(model)
    histories = {name: list(prompt) for name, prompt in PROMPTS.items()}
    outputs = driver.step([(name, prompt, 0, 0) for name, prompt in PROMPTS.items()])
    for (name, prompt), logits in zip(PROMPTS.items(), outputs):
        assert_close(logits, hf_logits(hf, prompt))
    for step in range(3):  # unequal context lengths: the masked decode path
        feeds = [(name, [40 + step + i], len(histories[name]), 0) for i, name in enumerate(histories)]
        for (name, tokens, _, _), logits in zip(feeds, driver.step(feeds)):
            histories[name] += tokens
            assert_close(logits, hf_logits(hf, histories[name])[-1:])


def test_decode_of_equal_length_sequences_and_a_single_sequence(llama):
    hf, model = llama
    driver = Driver(model)
    one, two = [3, 4, 5, 6], [7, 8, 9, 10]
    driver.step([("x", one, 0, 0), ("y", two, 0, 0)])  # equal query lengths: no padding needed
    x_logits, y_logits = driver.step([("x", [11], 4, 0), ("y", [12], 4, 0)])  # equal contexts: no mask at all
    assert_close(x_logits, hf_logits(hf, one + [11])[-1:])
    assert_close(y_logits, hf_logits(hf, two + [12])[-1:])
    (alone,) = driver.step([("x", [13], 5, 0)])
    assert_close(alone, hf_logits(hf, one + [11, 13])[-1:])


def test_chunked_prefill_across_two_forwards_beside_a_decode(llama):
    hf, model = llama
    driver = Driver(model)
    prompt = list(range(30, 50))
    driver.step([("short", [1, 2, 3], 0, 0)])
    first = driver.step([("long", prompt[:12], 0, 0), ("short", [4], 3, 0)])
    second = driver.step([("short", [5], 4, 0), ("long", prompt[12:], 12, 0)])
    reference = hf_logits(hf, prompt)
    assert_close(first[0], reference[:12])
    assert_close(second[1], reference[12:])
    assert_close(second[0], hf_logits(hf, [1, 2, 3, 4, 5])[-1:])


def test_speculative_chunks_and_rollback_match_transformers(llama):
    hf, model = llama
    driver = Driver(model)
    driver.step([("p", [9, 8, 7, 6, 5], 0, 0), ("q", [1, 2], 0, 0), ("r", [3, 3, 3], 0, 0)])
    # [last token, 4 drafts], [last, 2 drafts] and a plain decode in one forward.
    outputs = driver.step([("p", [60, 61, 62, 63, 64], 5, 0), ("q", [70], 2, 0), ("r", [80, 81, 82], 3, 0)])
    assert_close(outputs[0], hf_logits(hf, [9, 8, 7, 6, 5, 60, 61, 62, 63, 64])[5:])
    assert_close(outputs[1], hf_logits(hf, [1, 2, 70])[2:])
    assert_close(outputs[2], hf_logits(hf, [3, 3, 3, 80, 81, 82])[3:])
    # Rollback: only 60, 61 of p's chain were accepted; the next chain overwrites positions 7.. in place.
    (logits,) = driver.step([("p", [90, 91, 92], 7, 0)])
    assert_close(logits, hf_logits(hf, [9, 8, 7, 6, 5, 60, 61, 90, 91, 92])[7:])


def test_long_prompt_with_llama3_rope_scaling_and_untied_head():
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    hf = tiny_hf(seed=3, rope_parameters=rope, tie_word_embeddings=False)
    model = CompactLlama.from_hf(hf)
    assert model.shape.rope_scaling is not None and not model.shape.tie_word_embeddings
    assert model.lm_head.weight is not model.embed_tokens.weight
    prompt = [(7 * i) % 300 for i in range(150)]
    driver = Driver(model, block_size=8)
    (logits,) = driver.step([("long", prompt, 0, 0)])
    assert_close(logits, hf_logits(hf, prompt))
    (logits,) = driver.step([("long", [17], 150, 0)])
    assert_close(logits, hf_logits(hf, prompt + [17])[-1:])


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_qwen2_bias_and_mistral_sliding_window(family):
    overrides = {"sliding_window": 6} if family == "mistral" else {}
    hf = tiny_hf(seed=4, family=family, **overrides)
    model = CompactLlama.from_hf(hf)
    assert model.shape.attention_bias == (family == "qwen2")
    assert model.shape.sliding_window == (6 if family == "mistral" else None)
    driver = Driver(model)
    prompts = {"a": list(range(40, 55)), "b": [5, 6, 7]}
    outputs = driver.step([(name, prompt, 0, 0) for name, prompt in prompts.items()])
    for prompt, logits in zip(prompts.values(), outputs):
        assert_close(logits, hf_logits(hf, prompt))
    outputs = driver.step([("a", [99], 15, 0), ("b", [98, 97], 3, 0)])
    assert_close(outputs[0], hf_logits(hf, prompts["a"] + [99])[-1:])
    assert_close(outputs[1], hf_logits(hf, prompts["b"] + [98, 97])[-2:])


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_decodes_beside_ragged_chunks_take_split_unpadded_paths(family):
    """A forward mixing decodes with chunks of very different lengths (a fresh 40-token prompt, short
    chunks after cached prefixes, a speculative chain) attends per sequence without padding, and the
    decodes separately; every row must still equal transformers (mistral: sliding window masks too)."""
    from lorafleet.serving.engine.attention import AttentionPlan, SplitAttentionPlan, plan_attention

    hf = tiny_hf(seed=5, family=family, **({"sliding_window": 6} if family == "mistral" else {}))
    model = CompactLlama.from_hf(hf)
    driver = Driver(model)
    prefixes = {"d1": [5, 6, 7], "d2": [8, 9, 10, 11, 12], "c1": list(range(60, 72)), "c2": [3, 1, 4, 1, 5]}
    driver.step([(name, tokens, 0, 0) for name, tokens in prefixes.items()])
    fresh = [(13 * i) % 250 for i in range(40)]
    feeds = [("d1", [40], 3, 0), ("fresh", fresh, 0, 0), ("c1", [41, 42, 43], 12, 0), ("d2", [44], 5, 0),
             ("c2", [45, 46], 5, 0)]
    batch = ForwardBatch.build([f[1] for f in feeds], [f[2] for f in feeds],
                               [list(range(12 * i, 12 * i + 12)) for i in range(5)], 4, [0] * 5)  # layout only
    plan = plan_attention(batch, model.shape, model.rope)
    assert isinstance(plan, SplitAttentionPlan) and plan.chunk_plan.ragged is not None
    assert isinstance(plan_attention(batch.subset([0, 3])[0], model.shape, model.rope), AttentionPlan)
    outputs = driver.step(feeds)
    histories = {name: prefixes.get(name, []) + tokens for name, tokens, _, _ in feeds}
    for (name, tokens, _, _), logits in zip(feeds, outputs):
        assert_close(logits, hf_logits(hf, histories[name])[-len(tokens):])


def test_from_pretrained_reads_a_sharded_folder_like_from_hf(tmp_path, llama):
    hf, model = llama
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    loaded = CompactLlama.from_pretrained(tmp_path, prepack=model.prepacked)
    assert loaded.shape == model.shape
    expected = model.dense_weights()
    assert expected.keys() == loaded.dense_weights().keys()
    for name, tensor in loaded.dense_weights().items():
        assert torch.equal(tensor, expected[name]), name
    assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_from_pretrained_refuses_missing_and_mismatched_weights(tmp_path, llama):
    hf, _ = llama
    with pytest.raises(FileNotFoundError, match="config.json"):
        CompactLlama.from_pretrained(tmp_path)
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "model.safetensors"))
    state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="layers.1.mlp.up_proj.weight"):
        CompactLlama.from_pretrained(tmp_path)


@pytest.mark.parametrize(("change", "field"), [
    ({"model_type": "gpt2"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "yarn"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "low_freq_factor"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"mlp_bias": True}, "mlp_bias"),
])
def test_shape_refuses_unsupported_configs_naming_the_field(change, field):
    config = {**tiny_llama_config().to_dict(), **change}
    with pytest.raises(ValueError, match=field):
        LlamaShape.from_hf_config(config)


def test_shape_reads_old_style_rope_scaling_from_a_dict():
    config = {**tiny_llama_config().to_dict(), "rope_parameters": None, "rope_theta": 5e5,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    shape = LlamaShape.from_hf_config(config)
    assert shape.rope_theta == 5e5 and shape.rope_scaling["factor"] == 8.0


def test_forward_batch_build_layout_and_errors():
    batch = ForwardBatch.build([[1, 2, 3], [4]], [0, 5], [[7], [2, 9]], 4, [0, 3])
    assert batch.positions.tolist() == [0, 1, 2, 5]
    assert batch.slot_mapping.tolist() == [28, 29, 30, 37]  # block 7 offsets 0-2; position 5 -> block 9 offset 1
    assert batch.context_lens == [3, 6] and batch.query_lens == [3, 1]
    assert batch.context_slots[1].tolist() == [8, 9, 10, 11, 36, 37]
    assert batch.adapter_ids.tolist() == [0, 0, 0, 3]
    with pytest.raises(ValueError, match="sequence 1"):
        ForwardBatch.build([[1], [2, 3]], [0, 3], [[0], [1]], 4, [0, 0])
    with pytest.raises(ValueError, match="sequence 0"):
        ForwardBatch.build([[]], [0], [[0]], 4, [0])


def test_positions_past_the_model_limit_are_refused(llama):
    _, model = llama
    driver = Driver(model, num_blocks=600)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        driver.step([("far", [1], model.shape.max_position_embeddings, 0)])


@pytest.mark.slow
def test_smollm2_logits_match_transformers(model_cache):
    """On 30 layers, 1e-4 is fp32's own noise: transformers in fp32 is itself ~9e-5 away from the same
    model in fp64. So the oracle is fp64: our error must stay within 3x transformers' own."""
    import copy

    from lorafleet.models.base import load_base_model
    from lorafleet.models.embedded import EMBEDDED_MODEL_ID
    from lorafleet.models.prompting import encode_prompt

    loaded = load_base_model(EMBEDDED_MODEL_ID, model_cache, dtype="float32", device="cpu")
    model = CompactLlama.from_pretrained(loaded.resolved.path)
    prompt = encode_prompt(loaded.tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    driver = Driver(model, num_blocks=16, block_size=16)
    (logits,) = driver.step([("chat", prompt, 0, 0)])
    reference = hf_logits(loaded.model, prompt)
    exact = hf_logits(copy.deepcopy(loaded.model).double(), prompt)
    assert (logits.double() - exact).abs().max() <= 3 * (reference.double() - exact).abs().max()
    assert_close(logits, reference, atol=2.5e-4)
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))
    token = int(reference[-1].argmax())
    (step,) = driver.step([("chat", [token], len(prompt), 0)])
    assert_close(step, hf_logits(loaded.model, prompt + [token])[-1:], atol=2.5e-4)
