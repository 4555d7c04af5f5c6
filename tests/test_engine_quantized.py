"""Weight-only int8 / int4 serving (serving/engine/quantized.py) against dense references.

Two oracles: the quantizers against their own decoded weights (a Q4_1-style weight comes back code for
code), and a quantized CompactLlama against a dense bf16 CompactLlama built from the weights its kernels
actually multiply by (`dense_weights`): what is left between them is bf16 rounding, so a wrong packing,
a swapped scale/zero or a misrouted LoRA shows up as a large error, not as "quantization noise".
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lorafleet.serving.engine.config import EngineConfig
from lorafleet.serving.engine.engine import Engine
from lorafleet.serving.engine.lora_slots import LoraSlots
from lorafleet.serving.engine.model import Bf16Projection, CompactLlama
from lorafleet.serving.engine.quantized import (
    INT4_GROUP,
    Int4Projection,
    Int8Projection,
    check_quantizable,
    dequantize_int4,
    quantize_int4,
    quantize_int8,
    quantized_projection,
)
from lorafleet.serving.engine.sequence import SamplingParams
from tests.test_engine_lora import random_lora
from tests.test_engine_model import Driver, tiny_hf


def q4_1_weight(out_features: int, in_features: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight built the way llama.cpp's Q4_1 decodes (codes 0..15 spanning each block, scale and min
    per block of 32), with bf16-representable scales: (weight, codes)."""
    generator = torch.Generator().manual_seed(seed)
    groups = in_features // INT4_GROUP
    codes = torch.randint(0, 16, (out_features, groups, INT4_GROUP), generator=generator)
    codes[..., 0], codes[..., 1] = 0, 15  # every block uses the full range, as Q4_1's min/max scaling does
    scale = (torch.rand(out_features, groups, 1, generator=generator) * 0.05 + 0.01).to(torch.bfloat16).float()
    low = (torch.randn(out_features, groups, 1, generator=generator) * 0.1).to(torch.bfloat16).float()
    zero = (low + 8 * scale).to(torch.bfloat16).float()
    low = zero - 8 * scale  # so that the bf16 zero the kernel stores decodes these values exactly
    weight = (codes * scale + low).reshape(out_features, in_features)
    return weight, codes.reshape(out_features, in_features).to(torch.int32)


def test_int4_recovers_q4_1_codes_exactly_and_decodes_to_the_same_weight():
    weight, codes = q4_1_weight(48, 96)
    found, scales_and_zeros = quantize_int4(weight)
    assert torch.equal(found, codes)
    assert scales_and_zeros.shape == (96 // INT4_GROUP, 48, 2) and scales_and_zeros.dtype == torch.bfloat16
    torch.testing.assert_close(dequantize_int4(found, scales_and_zeros), weight, atol=1e-6, rtol=0)


def test_int4_error_is_within_half_a_step_for_any_weight():
    weight = torch.randn(32, 128) * torch.logspace(-3, 1, 128)  # columns of very different magnitudes
    codes, scales_and_zeros = quantize_int4(weight)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    step = scales_and_zeros[..., 0].t().float().repeat_interleave(INT4_GROUP, dim=1)  # (out, in)
    error = (dequantize_int4(codes, scales_and_zeros) - weight).abs()
    assert bool((error <= step * 0.5 + step * 2 ** -7 + 1e-6).all())  # half a step, plus bf16's rounding of it
    constant = torch.full((16, 32), 0.25)
    codes, scales_and_zeros = quantize_int4(constant)
    torch.testing.assert_close(dequantize_int4(codes, scales_and_zeros), constant)


def test_int8_is_symmetric_per_row_within_half_a_step():
    weight = torch.randn(24, 40) * torch.logspace(-2, 1, 24)[:, None]
    codes, scales = quantize_int8(weight)
    assert codes.dtype == torch.int8 and scales.shape == (24,)
    error = (codes.float() * scales.float()[:, None] - weight).abs()
    assert bool((error <= scales.float()[:, None] * 0.51).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_projection_kernels_multiply_by_their_decoded_weight_in_the_callers_dtype(kind, dtype):
    weight = torch.randn(64, 96)
    projection = Int4Projection(weight) if kind == "int4" else Int8Projection(weight)
    x = torch.randn(5, 96).to(dtype)
    bias = torch.randn(64).to(dtype)
    reference = x.to(torch.bfloat16).float() @ projection.dense().float().t()  # the kernels take bf16 inputs
    assert projection(x).dtype == dtype and projection.add_to(torch.zeros(5, 64, dtype=dtype), x).dtype == dtype
    torch.testing.assert_close(projection(x).float(), reference, atol=0.05, rtol=0.02)
    torch.testing.assert_close(projection(x, bias).float(), reference + bias.float(), atol=0.05, rtol=0.02)
    residual = torch.randn(5, 64).to(dtype)
    torch.testing.assert_close(projection.add_to(residual, x).float(), reference + residual.float(), atol=0.05,
                               rtol=0.02)
    if kind == "int4":  # dense() reads the codes back through the kernel: they must be the quantizer's
        codes, scales_and_zeros = quantize_int4(weight)
        assert torch.equal(projection.dense(), dequantize_int4(codes, scales_and_zeros).to(torch.bfloat16))


def test_int4_falls_back_to_int8_where_its_kernel_cannot_go():
    assert isinstance(quantized_projection(torch.randn(64, 64), "int4"), Int4Projection)
    assert isinstance(quantized_projection(torch.randn(40, 64), "int4"), Int8Projection)  # out % 16
    assert isinstance(quantized_projection(torch.randn(64, 48), "int4"), Int8Projection)  # in % 32
    assert isinstance(quantized_projection(torch.randn(64, 64), "int8"), Int8Projection)
    with pytest.raises(ValueError, match="not a quantized format"):
        quantized_projection(torch.randn(64, 64), "dense")


def test_quantized_formats_are_cpu_only_with_a_clear_error():
    check_quantizable("dense", torch.device("cuda"))
    check_quantizable("int4", torch.device("cpu"))
    with pytest.raises(ValueError, match="weights='int4' runs on CPU only"):
        check_quantizable("int4", torch.device("cuda"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_format", ["int4", "int8"])
def test_quantized_model_with_mixed_lora_rows_equals_a_dense_model_of_its_decoded_weights(weight_format, dtype):
    hf = tiny_hf(seed=3)
    quantized = CompactLlama.from_hf(hf, weight_format=weight_format, dtype=dtype)
    assert quantized.lm_head_weight.dtype == dtype and not quantized.prepacked  # norms, KV, LoRA: model dtype
    layer = quantized.layers[0]
    expected = Int4Projection if weight_format == "int4" else Int8Projection
    assert isinstance(layer.qkv, expected) and isinstance(layer.down, expected)
    assert isinstance(quantized.lm_head.projection, Bf16Projection)
    decoded = {name: tensor.to(dtype) for name, tensor in quantized.dense_weights().items()}
    decoded["lm_head"] = quantized.lm_head.projection.dense().to(dtype)
    shape = quantized.shape
    dense = CompactLlama(dataclasses.replace(shape, tie_word_embeddings=False), decoded, prepack=False)
    adapter = random_lora(shape, 4, ("q_proj", "v_proj", "down_proj"), seed=1)
    feeds = [("a", list(range(3, 23)), 0, 1), ("b", [5, 6, 7], 0, 0), ("c", [9, 10], 0, 1)]
    outputs = []
    for model in (quantized, dense):
        slots = LoraSlots(shape, num_slots=1, max_rank=4, dtype=dtype)
        slots.load(1, adapter)
        outputs.append(Driver(model, lora=slots).step(feeds))
    for ours, reference in zip(*outputs):
        assert ours.dtype == dtype
        scale = reference.float().abs().max()
        torch.testing.assert_close(ours.float(), reference.float(), atol=float(scale) * 0.03, rtol=0)
    # and the quantized model points where the full-precision one it came from does (random tiny weights
    # are the worst case for 4 bits: measured cosine 0.94-0.98 for int4, > 0.999 for int8)
    full = Driver(CompactLlama.from_hf(hf)).step(feeds[1:2])[0]
    near = Driver(quantized).step(feeds[1:2])[0].float()
    floor = 0.9 if weight_format == "int4" else 0.995
    assert float(torch.nn.functional.cosine_similarity(near, full, dim=-1).min()) > floor


def test_engine_serves_an_int4_model_greedily_and_repeatably():
    model = CompactLlama.from_hf(tiny_hf(seed=4), weight_format="int4")  # fp32 around the int4 kernels
    engine = Engine(model, EngineConfig(kv_cache_mb=4, block_size=4))
    runs = []
    for attempt in range(2):
        for i in range(3):
            engine.add_request(f"{attempt}-{i}", list(range(2 + i, 12 + i)), SamplingParams(max_new_tokens=6), None)
        out: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for result in engine.step():
                assert result.error is None
                out.setdefault(result.request_id.split("-")[1], []).extend(result.new_token_ids)
        runs.append(out)
    assert runs[0] == runs[1] and all(len(tokens) == 6 for tokens in runs[0].values())
