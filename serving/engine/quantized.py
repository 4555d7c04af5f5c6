"""Weight-only int8 and int4 projections for the CPU engine: fewer bytes read per decoded token.

A batch-1 decode step reads every weight once, so on a CPU its floor is the weights' bytes over memory
bandwidth: 538 MB in fp32 for SmolLM2-135M, 269 MB in bf16, ~80 MB in 4 bits. These projections keep
the weights packed and let PyTorch's own CPU weight-only kernels dequantize inside the matmul
(`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`, the ops torchao's CPU int4/int8 weight-only
configs lower to). Both are fast only with bf16 activations (measured here, AMD Zen 4: a 576x3072 GEMV
takes 52 us in bf16 and 1.5 ms with fp32 activations, a reference loop) and take only bf16 scales, so
each projection casts its input to bf16 and its product back to the model's dtype: the rest of the
model (norms, residual stream, attention, KV cache, LoRA) keeps the dtype it was given, fp32 by default
(teacher-forced greedy agreement with the fp32 engine, int4 layers: 97.6% with bf16 everywhere, 98.8%
with fp32 around the kernels).

* int4: asymmetric groups of 32 input columns (`w = (q - 8) * scale + zero`, q in 0..15), the Q4_1
  layout of llama.cpp. For the embedded model, whose fp32 weights are the GGUF's Q4_1 blocks decoded,
  min-max quantisation recovers the file's own 4-bit codes; only its fp16 scales round to bf16.
* int8: symmetric, one scale per output row; under int4 also any weight whose shape the int4 kernel
  does not take (out % 16, in % 32).
The output head stays dense bf16 under both (`model.Bf16Projection`): the logits are the most sensitive
product (llama.cpp's Q4 files keep it in 8 bits with a scale per 32 values, which no PyTorch CPU kernel
takes; one scale per row lost more agreement than bf16 did).

The fp32 engine stays the reference: `bench engine --weights` reports greedy agreement against it.
"""

from __future__ import annotations

import torch

from lorafleet.serving.engine.config import WEIGHT_FORMATS, WeightFormat

__all__ = ["WEIGHT_FORMATS", "Int4Projection", "Int8Projection", "WeightFormat", "quantized_projection"]
INT4_GROUP = 32  # input columns per scale/zero pair (Q4_1's block)
_INT4_INNER_K_TILES = 8  # the CPU packing's inner tile count (the value torchao uses on CPU)
_INT4_OUT_MULTIPLE = 16  # `_convert_weight_to_int4pack_for_cpu` needs out_features % 16 == 0


def int4_fits(weight: torch.Tensor) -> bool:
    """Whether the int4 CPU kernel takes this (out, in) weight."""
    out_features, in_features = weight.shape
    return out_features % _INT4_OUT_MULTIPLE == 0 and in_features % INT4_GROUP == 0


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (4-bit codes (out, in) int32 in 0..15, scales_and_zeros (in/32, out, 2) bf16).

    Scale and zero are rounded to bf16 first and the codes chosen against the rounded values, so the
    reconstruction `(q - 8) * scale + zero` is the nearest the kernel can represent, not a second rounding."""
    if not int4_fits(weight):
        raise ValueError(f"int4 needs out_features % {_INT4_OUT_MULTIPLE} == 0 and in_features % {INT4_GROUP} == 0, "
                         f"got a weight of shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    groups = weight.detach().float().reshape(out_features, in_features // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(-1), groups.amax(-1)  # (out, G)
    scale = ((high - low) / 15).to(torch.bfloat16)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # a constant group: any scale, codes all 8
    zero = (low + 8 * scale.float()).to(torch.bfloat16)
    codes = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp_(0, 15)
    codes = codes.reshape(out_features, in_features).to(torch.int32)
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # (G, out, 2)
    return codes, scales_and_zeros


def dequantize_int4(codes: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """The fp32 weight the int4 kernel multiplies by: the reference for tests and `dense()`."""
    scale = scales_and_zeros[..., 0].t().float().repeat_interleave(INT4_GROUP, dim=1)  # (out, in)
    zero = scales_and_zeros[..., 1].t().float().repeat_interleave(INT4_GROUP, dim=1)
    return (codes.float() - 8) * scale + zero


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (int8 codes (out, in), one bf16 scale per output row)."""
    rows = weight.detach().float()
    scale = (rows.abs().amax(dim=1) / 127).to(torch.bfloat16)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.round(rows / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes, scale


class Int4Projection:
    """`x @ W^T` with W in 4-bit groups; the interface of `model.Projection` (bf16 activations)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.out_features, self.in_features = weight.shape
        codes, self.scales_and_zeros = quantize_int4(weight)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, _INT4_INNER_K_TILES)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return _finish(self._mm(_bf16(x)), x.dtype, bias)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return residual + self._mm(_bf16(x))  # the add promotes a bf16 product to an fp32 residual

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, INT4_GROUP, self.scales_and_zeros)

    def dense(self) -> torch.Tensor:
        codes = _unpack_int4(self.packed, self.out_features, self.in_features)
        return dequantize_int4(codes, self.scales_and_zeros).to(torch.bfloat16)


class Int8Projection:
    """`x @ W^T` with W in int8 rows and one scale per row; the interface of `model.Projection`."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.out_features, self.in_features = weight.shape
        self.codes, self.scales = quantize_int8(weight)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return _finish(self._mm(_bf16(x)), x.dtype, bias)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return residual + self._mm(_bf16(x))

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.codes, self.scales)

    def dense(self) -> torch.Tensor:
        return (self.codes.float() * self.scales.float()[:, None]).to(torch.bfloat16)


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)


def _finish(out: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel's bf16 product back in the model's dtype, plus the bias."""
    out = out if out.dtype == dtype else out.to(dtype)
    return out if bias is None else out.add_(bias)


def _unpack_int4(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The codes back from the kernel's packed layout, read through the kernel itself (an identity
    input with scale 1 and zero 0 returns each code minus 8): the layout is the kernel's private business."""
    eye = torch.eye(in_features, dtype=torch.bfloat16)
    unit = torch.zeros(in_features // INT4_GROUP, out_features, 2, dtype=torch.bfloat16)
    unit[..., 0] = 1
    codes = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, INT4_GROUP, unit)  # (in, out): q - 8
    return (codes.t().float() + 8).round().to(torch.int32)


def quantized_projection(weight: torch.Tensor, weights: WeightFormat) -> Int4Projection | Int8Projection:
    """The projection for one weight under `weights` ('int8' or 'int4'); under int4, a weight whose
    shape the int4 kernel cannot take is int8."""
    if weights == "int4" and int4_fits(weight):
        return Int4Projection(weight)
    if weights in ("int4", "int8"):
        return Int8Projection(weight)
    raise ValueError(f"weights={weights!r} is not a quantized format (choose from {', '.join(WEIGHT_FORMATS[1:])})")


def check_quantizable(weights: WeightFormat, device: torch.device) -> None:
    """int8/int4 are CPU paths here (the CUDA kernels take other layouts): refuse them elsewhere, naming why."""
    if weights != "dense" and device.type != "cpu":
        raise ValueError(f"weights={weights!r} runs on CPU only (PyTorch's CPU weight-only kernels); on {device} "
                         f"use weights='dense' with dtype bfloat16")
