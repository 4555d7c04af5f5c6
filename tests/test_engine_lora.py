"""Multi-adapter LoRA in the engine (lora_slots.py, models/lora_weights.py).

PEFT is the oracle for one adapter read from a saved PEFT directory; `reference_lora_delta` (plain
gather + bmm) is the oracle for every faster routing path; a mixed batch of adapters and base rows
must equal running each sequence alone. Runs in ~5 s.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_engine_model import Driver, assert_close, hf_logits, tiny_hf

from lorafleet.models.lora_weights import LORA_MODULES, random_lora, read_peft_adapter
from lorafleet.models.tiny import tiny_llama_config
from lorafleet.serving.engine.lora_slots import LoraSlots, reference_lora_delta
from lorafleet.serving.engine.model import CompactLlama, LlamaShape

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def save_peft_adapter(hf_model, folder, **lora_options):
    """A PEFT LoRA with random (non-zero) B on `hf_model`, saved the standard way; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    options = {"r": 4, "lora_alpha": 8, "target_modules": list(LORA_MODULES), "init_lora_weights": False}
    torch.manual_seed(7)
    peft_model = get_peft_model(hf_model, LoraConfig(**{**options, **lora_options})).eval()
    peft_model.save_pretrained(folder)
    return peft_model


@pytest.fixture(scope="module")
def tiny():
    hf = tiny_hf(seed=1)
    return hf, CompactLlama.from_hf(hf)


@pytest.fixture(scope="module")
def three_adapters(tiny):
    """Mixed ranks and disjoint / overlapping target sets, in slots 1-3 of 4 (max rank 8)."""
    _, model = tiny
    slots = LoraSlots(model.shape, num_slots=4, max_rank=8)
    slots.load(1, random_lora(model.shape, 2, ATTENTION, seed=1))
    slots.load(2, random_lora(model.shape, 8, ("gate_proj", "up_proj", "down_proj"), seed=2))
    slots.load(3, random_lora(model.shape, 4, ("q_proj", "v_proj", "down_proj"), seed=3))
    return slots


@pytest.mark.parametrize("options", [{}, {"use_rslora": True, "target_modules": ["q_proj", "v_proj", "up_proj"]}])
def test_peft_adapter_read_and_served_matches_peft(tmp_path, options):
    hf = tiny_hf(seed=2)
    model = CompactLlama.from_hf(hf)  # before PEFT wraps hf's layers
    prompt = list(range(50, 70))
    base = hf_logits(hf, prompt)
    peft_model = save_peft_adapter(hf, tmp_path, **options)
    weights = read_peft_adapter(tmp_path, model.shape)
    assert weights.rank == 4 and weights.nbytes > 0
    assert weights.scaling == pytest.approx(8 / 2 if options else 8 / 4)
    slots = LoraSlots(model.shape, num_slots=2, max_rank=8)
    slots.load(2, weights)
    driver = Driver(model, lora=slots)
    (prefill,) = driver.step([("s", prompt, 0, 2)])
    expected = hf_logits(peft_model, prompt)
    assert (expected - base).abs().max() > 0.05  # the adapter really changes the output
    assert_close(prefill, expected)
    (decode,) = driver.step([("s", [3], len(prompt), 2)])
    assert_close(decode, hf_logits(peft_model, prompt + [3])[-1:])


def test_mixed_adapter_batch_equals_each_sequence_alone(tiny, three_adapters):
    _, model = tiny
    prompts = {"a": list(range(10, 40)), "b": list(range(60, 85)), "c": list(range(100, 120)),
               "d": [7, 8, 9], "e": [200, 201, 202, 203]}
    adapters = {"a": 1, "b": 2, "c": 0, "d": 3, "e": 1}
    chunks = [
        dict(prompts),  # 82 rows in 4 adapter runs: the segmented path
        {"a": [1], "b": [2], "c": [3], "d": [4], "e": [5]},  # decode of mixed slots: the padded path
        {"a": [6, 7, 8, 9], "b": [10], "d": [11, 12]},  # speculative chains beside a decode
    ]
    together = Driver(model, lora=three_adapters)
    alone = {name: Driver(model, lora=three_adapters, seed=i + 1) for i, name in enumerate(prompts)}
    positions = dict.fromkeys(prompts, 0)
    for chunk in chunks:
        feeds = [(name, tokens, positions[name], adapters[name]) for name, tokens in chunk.items()]
        for feed, logits in zip(feeds, together.step(feeds)):
            (single,) = alone[feed[0]].step([feed])
            assert_close(logits, single, atol=1e-5)
            positions[feed[0]] += len(feed[1])
    # Two long chunks of different adapters: segmented again, now over cached prefixes.
    feeds = [("a", list(range(40, 80)), positions["a"], 1), ("d", list(range(80, 120)), positions["d"], 3)]
    for feed, logits in zip(feeds, together.step(feeds)):
        (single,) = alone[feed[0]].step([feed])
        assert_close(logits, single, atol=1e-5)


def test_adapter_rows_differ_from_base_rows(tiny, three_adapters):
    """Guards the test above: the adapters must actually change their rows' logits."""
    _, model = tiny
    prompt = list(range(10, 30))
    (base,) = Driver(model, lora=three_adapters).step([("x", prompt, 0, 0)])
    for slot in (1, 2, 3):
        (adapted,) = Driver(model, lora=three_adapters).step([("x", prompt, 0, slot)])
        assert (adapted - base).abs().max() > 0.05, slot


@pytest.mark.parametrize("path", ["auto", "dense", "segmented", "padded"])
@pytest.mark.parametrize("ids", [
    [0, 1, 2, 3, 0, 3, 1, 1, 2, 0],  # slots 1..3 and base rows interleaved: 8 runs (segmented)
    [0, 0, 3, 3, 3, 0],  # a single used slot with base rows
    [2] * 5,  # one adapter on every row: no mask
    [1] * 40 + [0] * 10 + [3] * 30,  # few long runs (prefill chunks)
    [3, 1, 3, 0, 1, 3, 3],  # unsorted, uneven: slot 3's rows are two runs, padded groups them
])
def test_fast_delta_equals_reference(tiny, three_adapters, ids, path):
    _, model = tiny
    slots = three_adapters
    adapter_ids = torch.tensor(ids)
    if path == "dense" and len(set(ids)) > 1:  # dense would multiply rows by other slots' weights
        with pytest.raises(ValueError, match="one adapter slot"):
            slots.route(adapter_ids, path=path)
        return
    routing = slots.route(adapter_ids, path=path)
    if path != "auto":
        assert (routing.runs is not None) == (path == "segmented")
        assert (routing.padded is not None) == (path == "padded")
    used = set(ids) - {0}
    generator = torch.Generator().manual_seed(len(ids))
    for layer in range(model.shape.num_layers):
        for module in LORA_MODULES:
            a_stack, b_stack = slots.stacks(layer, module)
            x = torch.randn(len(ids), a_stack.shape[-1], generator=generator)
            fast = slots.delta(layer, module, x, routing)
            if not any(module in slots.targets(s) for s in used):
                assert fast is None, module
                continue
            reference = reference_lora_delta(x, a_stack, b_stack, adapter_ids)
            assert reference.abs().max() > 0
            assert_close(fast, reference, atol=1e-5)


def test_route_picks_padded_for_decode_segments_for_a_prompt_chunk_and_dense_for_one_adapter():
    """The cost model on SmolLM2's widths (2 layers: the choice is per layer). Measured on 30 layers of
    8 r=16 adapters (docs/performance.md): a 16-row decode batch over 8 adapters costs dense 10.6 ms,
    segmented 12.0, padded 5.2; a 200-token prompt chunk beside 15 decodes costs dense 57, segmented
    18, padded 72 (every adapter's group padded to 200 rows); one adapter on every row needs no mask."""
    shape = LlamaShape(hidden_size=576, intermediate_size=1536, num_layers=2, num_heads=9, num_kv_heads=3,
                       head_dim=64, vocab_size=49152, rms_norm_eps=1e-5, rope_theta=1e5, rope_scaling=None,
                       tie_word_embeddings=True, attention_bias=False, max_position_embeddings=8192)
    slots = LoraSlots(shape, num_slots=8, max_rank=16)
    for slot in range(1, 9):
        slots.load(slot, random_lora(shape, 16, ATTENTION, seed=slot))
    decode = torch.repeat_interleave(torch.arange(1, 9), 2)  # 16 rows, sorted by slot as the engine packs them
    chunk = torch.tensor(sorted([3] * 200 + [1, 1, 2, 2, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 8]))
    one = torch.full((16,), 5)
    assert slots.route(decode).padded is not None
    assert slots.route(chunk).runs is not None
    routing = slots.route(one)
    assert routing.runs is None and routing.padded is None and routing.lo == routing.hi == 5
    with pytest.raises(ValueError, match="path"):
        slots.route(decode, path="fastest")


def test_delta_is_none_for_base_rows_and_unknown_modules(tiny, three_adapters):
    x = torch.randn(3, tiny[1].shape.hidden_size)
    assert three_adapters.delta(0, "q_proj", x, torch.zeros(3, dtype=torch.long)) is None
    with pytest.raises(ValueError, match="lm_head"):
        three_adapters.delta(0, "lm_head", x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="slot 9"):
        three_adapters.route(torch.tensor([9]))


def test_reload_and_clear_leave_no_stale_weights(tiny):
    _, model = tiny
    slots = LoraSlots(model.shape, num_slots=1, max_rank=8)
    slots.load(1, random_lora(model.shape, 8, LORA_MODULES, seed=5))
    small = random_lora(model.shape, 2, ("q_proj",), seed=6)
    slots.load(1, small)  # rank 2 over rank 8, one module over seven: the rest must be zero again
    a_stack, b_stack = slots.stacks(0, "q_proj")
    assert torch.equal(a_stack[1, :2], small.a[(0, "q_proj")]) and not a_stack[1, 2:].any()
    assert torch.allclose(b_stack[1, :, :2], small.b[(0, "q_proj")] * small.scaling)
    assert not slots.stacks(1, "down_proj")[0][1].any() and slots.targets(1) == {"q_proj"}
    slots.clear(1)
    assert not any(slots.stacks(layer, m)[i][1].any() for layer in range(2) for m in LORA_MODULES for i in (0, 1))
    assert slots.bytes_per_slot > 0


def test_slot_load_refusals_leave_the_slot_unchanged(tiny):
    _, model = tiny
    slots = LoraSlots(model.shape, num_slots=2, max_rank=4)
    slots.load(1, random_lora(model.shape, 4, ATTENTION, seed=1))
    before = slots.stacks(0, "q_proj")[0].clone()
    with pytest.raises(ValueError, match="max_rank"):
        slots.load(1, random_lora(model.shape, 8, ATTENTION, seed=2))
    other = tiny_llama_config(hidden_size=32, head_dim=8)
    from lorafleet.serving.engine.model import LlamaShape

    with pytest.raises(ValueError, match="another base model"):
        slots.load(1, random_lora(LlamaShape.from_hf_config(other), 4, ATTENTION, seed=3))
    with pytest.raises(ValueError, match="slot 0 is the base model"):
        slots.load(0, random_lora(model.shape, 4, ATTENTION, seed=4))
    assert torch.equal(slots.stacks(0, "q_proj")[0], before) and slots.targets(1) == set(ATTENTION)


def test_read_peft_adapter_refuses_missing_files_and_unsupported_features(tmp_path, tiny):
    _, model = tiny
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        read_peft_adapter(tmp_path / "nothing", model.shape)
    dora, bias, embedding = tmp_path / "dora", tmp_path / "bias", tmp_path / "embedding"
    save_peft_adapter(tiny_hf(seed=1), dora, use_dora=True)
    save_peft_adapter(tiny_hf(seed=1), bias, bias="lora_only")
    save_peft_adapter(tiny_hf(seed=1), embedding, target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(ValueError, match="use_dora"):
        read_peft_adapter(dora, model.shape)
    with pytest.raises(ValueError, match="bias='lora_only'"):
        read_peft_adapter(bias, model.shape)
    with pytest.raises(ValueError, match="embed_tokens"):
        read_peft_adapter(embedding, model.shape)
    (dora / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        read_peft_adapter(dora, model.shape)


def test_read_peft_adapter_refuses_an_adapter_of_another_base(tmp_path, tiny):
    _, model = tiny
    save_peft_adapter(tiny_hf(seed=1, intermediate_size=96), tmp_path)
    with pytest.raises(ValueError, match="another base model"):
        read_peft_adapter(tmp_path, model.shape)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 0}))
    with pytest.raises(ValueError, match="r=0"):
        read_peft_adapter(tmp_path, model.shape)


def test_bf16_model_and_slots_stay_near_fp32_and_mismatched_dtypes_are_refused():
    hf = tiny_hf(seed=5)
    full = CompactLlama.from_hf(hf)
    half = CompactLlama.from_hf(tiny_hf(seed=5).to(torch.bfloat16))
    adapter = random_lora(full.shape, 4, ("q_proj", "down_proj"), seed=0)
    feeds = [("a", list(range(20)), 0, 1), ("b", [3, 4], 0, 0)]
    outputs = {}
    for model, dtype in ((full, torch.float32), (half, torch.bfloat16)):
        slots = LoraSlots(model.shape, num_slots=1, max_rank=4, dtype=dtype)
        slots.load(1, adapter)
        outputs[dtype] = Driver(model, lora=slots).step(feeds)
    for low, high in zip(outputs[torch.bfloat16], outputs[torch.float32]):
        assert low.dtype == torch.bfloat16
        assert_close(low.float(), high, atol=0.15)  # bf16 keeps ~3 significant digits
    slots = LoraSlots(half.shape, num_slots=1, max_rank=4)  # fp32 slots under a bf16 model
    slots.load(1, adapter)
    with pytest.raises(ValueError, match="dtype"):
        Driver(half, lora=slots).step(feeds)
