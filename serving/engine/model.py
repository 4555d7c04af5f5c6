"""A compact Llama-family decoder for serving: packed batches, paged KV cache, per-row LoRA.

transformers' model is built for generality (hooks, cache objects, per-layer mask and RoPE work).
This one is built for a small CPU: weights fused (q|k|v and gate|up: one matmul each) and, on CPU,
prepacked for oneDNN (see `Projection`: the matmuls are most of a decode step and MKL's fp32 GEMV is
slow here); residual adds ride on the o/down matmuls; RoPE rows, masks and LoRA routing are built
once per forward, not per layer. It speaks only token ids. It covers Llama 2/3 (incl. llama3 RoPE
scaling), Mistral (uniform sliding window), Qwen2 (q/k/v bias) and SmolLM2 shapes; anything else is
refused by `LlamaShape.from_hf_config` naming the offending config field.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorafleet.serving.engine import prepacked_ops
from lorafleet.serving.engine.attention import (
    AttentionPlan,
    ForwardBatch,
    RotaryTable,
    SplitAttentionPlan,
    plan_attention,
)
from lorafleet.serving.engine.compiled_decode import CompiledDecode
from lorafleet.serving.engine.kv_cache import KVPool
from lorafleet.serving.engine.lora_slots import GROUPS, LoraSlots
from lorafleet.serving.engine.quantized import (
    Int4Projection,
    Int8Projection,
    WeightFormat,
    check_quantizable,
    quantized_projection,
)

__all__ = ["CompactLlama", "ForwardBatch", "LlamaShape"]

_MODEL_TYPES = ("llama", "mistral", "qwen2")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class LlamaShape:
    """Everything the engine needs to know about the base architecture, validated once."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, float] | None  # None, or llama3's factor / low / high / original max positions
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v biases (Qwen2)
    max_position_embeddings: int
    sliding_window: int | None = None  # Mistral: each token sees only the last `sliding_window` positions

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads={self.num_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

    @classmethod
    def from_hf_config(cls, config: Any) -> LlamaShape:
        """From a transformers config or a config.json dict (old `rope_scaling` or new `rope_parameters`)."""
        raw = dict(config) if isinstance(config, dict) else config.to_dict()
        model_type = raw.get("model_type")
        if model_type not in _MODEL_TYPES:
            raise ValueError(f"model_type={model_type!r} is not supported (supported: {', '.join(_MODEL_TYPES)})")

        def need(field: str) -> Any:
            if raw.get(field) is None:
                raise ValueError(f"config field {field!r} is missing")
            return raw[field]

        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={raw['hidden_act']!r} is not supported (only 'silu')")
        if raw.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported")
        qkv_bias = model_type == "qwen2"
        if model_type == "llama" and raw.get("attention_bias"):
            raise ValueError("attention_bias=True is not supported for llama (it adds an o_proj bias)")
        window = None
        if model_type == "qwen2" and raw.get("use_sliding_window"):
            raise ValueError("use_sliding_window=True is not supported for qwen2 (per-layer windows)")
        if model_type == "mistral":
            window = raw.get("sliding_window")
        heads = need("num_attention_heads")
        theta, scaling = _rope_settings(raw)
        return cls(
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or need("hidden_size") // heads,
            vocab_size=need("vocab_size"),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            max_position_embeddings=need("max_position_embeddings"),
            sliding_window=window,
        )


def _rope_settings(raw: dict) -> tuple[float, dict[str, float] | None]:
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    if params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported (only default and llama3)")
    params.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings"))
    missing = [key for key in _LLAMA3_KEYS if params.get(key) is None]
    if missing:
        raise ValueError(f"llama3 rope_scaling is missing {missing}")
    return theta, {key: float(params[key]) for key in _LLAMA3_KEYS}


def onednn_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether weights can be prepacked for oneDNN (CPU, fp32 or bf16, a torch whose oneDNN ops work)."""
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and _onednn_works(dtype)


@functools.cache
def _onednn_works(dtype: torch.dtype) -> bool:
    """Tried once on a 2x2 weight: these are the ops torch's own compiler uses for CPU linears, but they
    are not public API, so a build (or platform) without them must fall back, not fail mid-forward."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        weight = torch.eye(2, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 2, dtype=dtype), packed, None, "none", [], "")
        return bool(torch.equal(out, torch.ones(1, 2, dtype=dtype)))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


class Projection:
    """`x @ W^T` for one (fused) weight (out, in), frozen at load.

    On CPU the weight is prepacked once into oneDNN's blocked layout and multiplied by oneDNN: measured
    here (AMD EPYC, fp32, 1 thread), MKL's sgemm streams a decode GEMV at ~18 GB/s and small-M GEMMs far
    below peak, while prepacked oneDNN reaches ~40 GB/s at M=1 and is 2-3x faster for M=5..128
    (speculative chains, batches, prefill). Elsewhere (CUDA) it is a plain dense weight.
    """

    def __init__(self, weight: torch.Tensor, *, prepack: bool) -> None:
        self.out_features, self.in_features = weight.shape
        self.prepacked = prepack
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous()) if prepack else weight

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.prepacked:
            if torch.compiler.is_compiling():  # inside `compiled_decode`'s graph: see `prepacked_ops`
                return prepacked_ops.prepacked_linear(x, self.weight, bias, self.out_features)
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, bias, "none", [], "")
        return F.linear(x, self.weight, bias)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """residual + x @ W^T in one op (the residual add rides on the matmul)."""
        if self.prepacked:
            if torch.compiler.is_compiling():
                return prepacked_ops.prepacked_linear_add(x, residual, self.weight)
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, None, "add")
        return torch.addmm(residual, x, self.weight.t())

    def dense(self) -> torch.Tensor:
        return self.weight.to_dense() if self.prepacked else self.weight


class Bf16Projection:
    """A dense bf16 projection (prepacked when oneDNN can) for activations of any dtype: the output
    head of a quantized model. Measured on SmolLM2 (teacher-forced greedy agreement with fp32, int4
    layers): fp32 head 98.8%, bf16 97.9%, int8 per row 97.6%, int4 87.2%; bf16 also reads fastest after
    int4 here (1.9 ms vs 2.1 ms int8 and 5.0 ms fp32), so the quantized formats keep the head in bf16."""

    def __init__(self, weight: torch.Tensor) -> None:
        half = weight.detach().to(torch.bfloat16)
        self.projection = Projection(half, prepack=onednn_available(half.device, torch.bfloat16))
        self.out_features, self.in_features = self.projection.out_features, self.projection.in_features

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = self.projection(x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16))
        out = out if out.dtype == x.dtype else out.to(x.dtype)
        return out if bias is None else out.add_(bias)

    def dense(self) -> torch.Tensor:
        return self.projection.dense()


AnyProjection = Projection | Int4Projection | Int8Projection | Bf16Projection


def make_projection(weight: torch.Tensor, *, prepack: bool, weights: WeightFormat,
                    head: bool = False) -> AnyProjection:
    """A dense (maybe prepacked) projection, or a quantized one under weights='int8'/'int4' (whose
    output head stays dense bf16: see `Bf16Projection`)."""
    if weights == "dense":
        return Projection(weight, prepack=prepack)
    if head:
        return Bf16Projection(weight)
    return quantized_projection(weight, weights)


class LMHead(nn.Module):
    """The output projection as a module with a dense `.weight` (tied to the embedding when the model
    ties them), which turbo heads and the engine read; the matmul itself goes through a Projection,
    so on CPU a prepacked (or quantized) copy costs one extra V x d weight in memory for a 1.4-3.5x
    faster head."""

    def __init__(self, weight: nn.Parameter, *, prepack: bool, weights: WeightFormat = "dense") -> None:
        super().__init__()
        self.weight = weight
        self.projection = make_projection(weight.detach(), prepack=prepack, weights=weights, head=True)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])  # (M, d)
        return self.projection(flat).view(*hidden.shape[:-1], self.projection.out_features)  # (..., V)


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


class DecoderLayer(nn.Module):
    """One pre-norm block with fused q|k|v and gate|up weights (names: see `CompactLlama._fuse`)."""

    def __init__(self, shape: LlamaShape, weights: dict[str, torch.Tensor], *, prepack: bool,
                 weight_format: WeightFormat = "dense") -> None:
        super().__init__()
        self.input_norm, self.post_norm = _frozen(weights["input_norm"]), _frozen(weights["post_norm"])
        self.qkv_bias = _frozen(weights["qkv_bias"]) if "qkv_bias" in weights else None

        def project(name: str) -> AnyProjection:
            return make_projection(weights[name], prepack=prepack, weights=weight_format)

        self.qkv, self.o, self.gate_up, self.down = project("qkv"), project("o"), project("gate_up"), project("down")
        self.eps, self.inter = shape.rms_norm_eps, shape.intermediate_size

    def forward(self, h: torch.Tensor, index: int, kv: KVPool, plan: AttentionPlan | SplitAttentionPlan,
                lora: LoraSlots | None, routing: Any) -> torch.Tensor:
        x = F.rms_norm(h, h.shape[-1:], self.input_norm, self.eps)  # (N, d)
        qkv = self.qkv(x, self.qkv_bias)  # (N, (H+2KVH)*D)
        if routing is not None:
            qkv = lora.apply(index, "qkv", x, qkv, routing)
        attn = plan.attend(qkv, kv, index)  # (N, H*D)
        h = self.o.add_to(h, attn)  # (N, d) residual included
        if routing is not None:
            h = lora.apply(index, "o", attn, h, routing)
        x = F.rms_norm(h, h.shape[-1:], self.post_norm, self.eps)
        gate_up = self.gate_up(x)  # (N, 2I)
        if routing is not None:
            gate_up = lora.apply(index, "gate_up", x, gate_up, routing)
        act = F.silu(gate_up[:, : self.inter]) * gate_up[:, self.inter:]  # (N, I) SwiGLU
        h = self.down.add_to(h, act)
        if routing is not None:
            h = lora.apply(index, "down", act, h, routing)
        return h


class CompactLlama(nn.Module):
    """The serving model. Inference only: weights are frozen at load (prepacked on CPU), forward runs in
    inference mode, and the model is built on its device (`.to()` does not move prepacked weights)."""

    def __init__(self, shape: LlamaShape, weights: dict[str, torch.Tensor], *, prepack: bool | None = None,
                 weight_format: WeightFormat = "dense") -> None:
        """`weights` in the fused naming (see `_fuse`); the model computes in their dtype. weight_format
        'int8'/'int4' quantizes the projections from these tensors, which then multiply in bf16 inside
        the kernels only (module `quantized`)."""
        super().__init__()
        self.shape, self.weight_format = shape, weight_format
        embed = weights["embed_tokens"]
        device = embed.device
        check_quantizable(weight_format, device)
        usable = weight_format == "dense" and onednn_available(device, embed.dtype)
        prepack = usable if prepack is None else prepack
        if prepack and not usable:
            raise ValueError(f"prepack=True needs dense fp32/bf16 weights on a CPU with oneDNN, got {embed.dtype} "
                             f"{weight_format} on {device}")
        self.prepacked = prepack
        self.embed_tokens = nn.Embedding.from_pretrained(embed, freeze=True)
        self.layers = nn.ModuleList(
            DecoderLayer(shape, {name.split(".", 1)[1]: tensor for name, tensor in weights.items()
                                 if name.startswith(f"{i}.")}, prepack=prepack, weight_format=weight_format)
            for i in range(shape.num_layers))
        self.norm = _frozen(weights["norm"])
        head = self.embed_tokens.weight if shape.tie_word_embeddings else _frozen(weights["lm_head"])
        self.lm_head = LMHead(head, prepack=prepack, weights=weight_format)
        self.rope = RotaryTable(shape, embed.dtype, device)
        self.compiled_decode: CompiledDecode | None = None  # see `compile_decode`

    def compile_decode(self, **kwargs: Any) -> CompiledDecode:
        """Route pure decode forwards through one compiled graph from now on (module `compiled_decode`);
        idempotent. Compilation itself happens on the first such forward of each variant."""
        if self.compiled_decode is None:
            self.compiled_decode = CompiledDecode(self, **kwargs)
        return self.compiled_decode

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.lm_head.weight  # (V, d)

    def new_kv_pool(self, num_blocks: int, block_size: int) -> KVPool:
        weight = self.lm_head.weight
        return KVPool(self.shape.num_layers, num_blocks, block_size, self.shape.num_kv_heads, self.shape.head_dim,
                      dtype=weight.dtype, device=weight.device)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: KVPool, lora: LoraSlots | None = None) -> torch.Tensor:
        """Run every layer on the packed tokens, writing their K/V; (N, d) final-normed hidden states."""
        plan = plan_attention(batch, self.shape, self.rope)  # masks, RoPE rows, padding: once, not per layer
        routing = lora.route(batch.adapter_ids) if lora is not None else None
        if routing is not None and not routing.active:
            routing = None  # every row is base (or its adapter adapts nothing here): plain forward
        h = F.embedding(batch.input_ids, self.embed_tokens.weight)  # (N, d)
        compiled = self.compiled_decode
        if compiled is not None and compiled.takes(plan, routing):
            out = compiled(h, plan, kv)
            if out is not None:
                return out
        for index, layer in enumerate(self.layers):
            h = layer(h, index, kv, plan, lora, routing)
        return F.rms_norm(h, h.shape[-1:], self.norm, self.shape.rms_norm_eps)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # (..., V)

    # ----- loading -----------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model: nn.Module, *, prepack: bool | None = None, weight_format: WeightFormat = "dense",
                dtype: torch.dtype | None = None) -> CompactLlama:
        """From an in-memory transformers LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM, on its
        device and in its dtype unless `dtype` says otherwise (quantized formats compute in bf16 either
        way); the transformers model is left untouched."""
        weight = hf_model.get_input_embeddings().weight
        state = {name: tensor.detach() for name, tensor in hf_model.state_dict().items()}
        shape = LlamaShape.from_hf_config(hf_model.config)
        return cls(shape, _fuse(shape, state, dtype or weight.dtype, weight.device), prepack=prepack,
                   weight_format=weight_format)

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", prepack: bool | None = None,
                        weight_format: WeightFormat = "dense") -> CompactLlama:
        """From a model folder: config.json plus one or several (sharded) *.safetensors files."""
        from safetensors.torch import load_file

        folder = Path(folder)
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: {folder} is not a model folder")
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in {folder}")
        shape = LlamaShape.from_hf_config(json.loads(config_path.read_text()))
        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(load_file(str(file)))
        return cls(shape, _fuse(shape, state, dtype, torch.device(device)), prepack=prepack,
                   weight_format=weight_format)

    def dense_weights(self) -> dict[str, torch.Tensor]:
        """Every weight in the fused naming, dense (prepacked ones unpacked): for checks and debugging."""
        out = {"embed_tokens": self.embed_tokens.weight, "norm": self.norm, "lm_head": self.lm_head.weight}
        for i, layer in enumerate(self.layers):
            out.update({f"{i}.input_norm": layer.input_norm, f"{i}.post_norm": layer.post_norm})
            out.update({f"{i}.{name}": getattr(layer, name).dense() for name in ("qkv", "o", "gate_up", "down")})
            if layer.qkv_bias is not None:
                out[f"{i}.qkv_bias"] = layer.qkv_bias
        return out


def _fuse(shape: LlamaShape, state: dict[str, torch.Tensor], dtype: torch.dtype,
          device: torch.device) -> dict[str, torch.Tensor]:
    """transformers-named weights -> the fused names CompactLlama takes; unknown or missing names and
    wrong shapes are errors naming the weight (a checkpoint of another architecture or size)."""
    state = {name.removeprefix("model."): tensor for name, tensor in state.items()
             if not name.endswith("rotary_emb.inv_freq")}
    used: set[str] = set()
    d, inter = shape.hidden_size, shape.intermediate_size
    qkv_out = (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim
    fused: dict[str, torch.Tensor] = {}

    def put(target: str, size: tuple[int, ...], *names: str) -> None:
        missing = [name for name in names if name not in state]
        if missing:
            raise ValueError(f"weight {missing[0]!r} is missing from the checkpoint")
        used.update(names)
        tensor = torch.cat([state[name] for name in names])  # fuses q|k|v and gate|up
        if tuple(tensor.shape) != size:
            raise ValueError(f"weight {' + '.join(names)} has shape {tuple(tensor.shape)}, the config implies {size}")
        fused[target] = tensor.to(device=device, dtype=dtype).contiguous()

    put("embed_tokens", (shape.vocab_size, d), "embed_tokens.weight")
    put("norm", (d,), "norm.weight")
    if not shape.tie_word_embeddings:
        put("lm_head", (shape.vocab_size, d), "lm_head.weight")
    elif "lm_head.weight" in state:
        used.add("lm_head.weight")  # a tied head saved anyway: the same tensor as the embedding
    for i in range(shape.num_layers):
        attn, mlp = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        put(f"{i}.qkv", (qkv_out, d), *(f"{attn}{m}.weight" for m in GROUPS["qkv"]))
        if shape.attention_bias:
            put(f"{i}.qkv_bias", (qkv_out,), *(f"{attn}{m}.bias" for m in GROUPS["qkv"]))
        put(f"{i}.o", (d, shape.num_heads * shape.head_dim), f"{attn}o_proj.weight")
        put(f"{i}.gate_up", (2 * inter, d), *(f"{mlp}{m}.weight" for m in GROUPS["gate_up"]))
        put(f"{i}.down", (d, inter), f"{mlp}down_proj.weight")
        put(f"{i}.input_norm", (d,), f"layers.{i}.input_layernorm.weight")
        put(f"{i}.post_norm", (d,), f"layers.{i}.post_attention_layernorm.weight")
    unused = sorted(set(state) - used)
    if unused:
        raise ValueError(f"checkpoint weights not understood by CompactLlama: {unused[:5]}"
                         f"{' ...' if len(unused) > 5 else ''}")
    return fused
