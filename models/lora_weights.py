"""One LoRA adapter as plain tensors, read from a PEFT directory without PEFT or the base model.

Used by the engine (serving/engine) and by `lorafleet merge` (tasks/merge.py), hence in models/.

The engine serves many adapters over one base model, so it cannot wrap the model in PEFT per
adapter: it needs only the A/B matrices and the scaling. Reading them directly also lets us refuse,
with an error naming the file and field, every PEFT feature whose forward is not plain
`W x + s * B A x` (DoRA, biases, modules_to_save, embedding targets...): serving such an adapter with
the plain formula would silently give wrong outputs.

The files are untrusted (another team's adapter shares the process): tensor names, shapes and dtypes
are checked from the safetensors header against the base model before any tensor is loaded, every
value must be finite, and error messages name files and fields but never quote free text from them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from lorafleet.models.adapter_dir import adapter_file, read_adapter_text
from lorafleet.models.tensor_files import first_non_finite, read_checked_tensors, shown


class LlamaShape(Protocol):
    """The sizes a LoRA must fit (the engine's `serving.engine.model.LlamaShape` is one; `ProjectionShape` too)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class ProjectionShape:
    """A Llama-family model's projection sizes from its transformers config, for reading adapters without
    loading the model (`lorafleet merge`)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_hf_config(cls, config: Any) -> ProjectionShape:
        heads = config.num_attention_heads
        return cls(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                   num_layers=config.num_hidden_layers, num_heads=heads,
                   num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads)

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LORA_MODULES = ATTENTION_MODULES + MLP_MODULES

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_RANK = 4096  # a rank past any real LoRA: refused before its tensors are read
_BIAS_VALUES = ("none", "all", "lora_only")  # PEFT's own values: safe to quote back

# PEFT options that change the forward away from `W x + s * B A x`: set to anything truthy, we refuse.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "a bias on lora_B",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "target_parameters": "parameter targets (target_parameters)",
    "layer_replication": "layer replication",
    "fan_in_fan_out": "transposed (Conv1D) weights (fan_in_fan_out)",
    "use_qalora": "QA-LoRA pooling (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "velora_config": "VeLoRA (velora_config)",
}
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


@dataclass
class LoraWeights:
    """A/B per (layer, module) on CPU; `scaling` is applied by whoever stacks them (LoraSlots)."""

    rank: int
    scaling: float
    target_modules: frozenset[str]
    a: dict[tuple[int, str], torch.Tensor]  # (layer, module) -> (r, in)
    b: dict[tuple[int, str], torch.Tensor]  # (layer, module) -> (out, r)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))


def module_dims(shape: LlamaShape, module: str) -> tuple[int, int]:
    """(in_features, out_features) of a projection: the one place the engine derives LoRA shapes."""
    d, q, kv, inter = (shape.hidden_size, shape.num_heads * shape.head_dim,
                       shape.num_kv_heads * shape.head_dim, shape.intermediate_size)
    dims = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, inter), "up_proj": (d, inter), "down_proj": (inter, d)}
    if module not in dims:
        raise ValueError(f"unknown LoRA target module {module!r} (supported: {', '.join(LORA_MODULES)})")
    return dims[module]


def read_peft_adapter(folder: Path, shape: LlamaShape) -> LoraWeights:
    """Read a PEFT LoRA directory, checking every tensor against the base model's shape."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: {folder} is not a PEFT adapter directory")
    if not (folder / WEIGHTS_FILE).exists():
        extra = " (only safetensors weights are read; adapter_model.bin is not)" \
            if (folder / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{folder / WEIGHTS_FILE} not found{extra}")
    # Both files confined to the folder (no link out of it, no FIFO): see models.adapter_dir.adapter_file.
    weights_path = adapter_file(folder, WEIGHTS_FILE)
    try:
        config = json.loads(read_adapter_text(folder, CONFIG_FILE))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:  # positions only, never the text
        where = f"line {error.lineno} column {error.colno}" if isinstance(error, json.JSONDecodeError) \
            else f"byte {error.start}"
        raise ValueError(f"{config_path} is not valid UTF-8 JSON ({where})") from None
    if not isinstance(config, dict):  # a bad file, not a bad argument: ValueError like every other refusal
        raise ValueError(f"{config_path} must hold a JSON object, got a {type(config).__name__}")  # noqa: TRY004
    rank, scaling = _check_config(config, config_path)

    def check(key: str, declared: tuple[int, ...]) -> None:
        layer, module, which = _parse_key(key, weights_path)
        if not 0 <= layer < shape.num_layers:
            raise ValueError(f"{weights_path}: tensor {shown(key)} is for layer {layer}, outside the base model's "
                             f"{shape.num_layers} layers")
        fan_in, fan_out = module_dims(shape, module)
        expected = (rank, fan_in) if which == "A" else (fan_out, rank)
        if declared != expected:
            raise ValueError(f"{weights_path}: tensor {shown(key)} has shape {declared}; rank {rank} on this base "
                             f"model needs {expected} (an adapter trained on another base model?)")

    tensors = read_checked_tensors(weights_path, check)
    a: dict[tuple[int, str], torch.Tensor] = {}
    b: dict[tuple[int, str], torch.Tensor] = {}
    for key, tensor in tensors.items():
        layer, module, which = _parse_key(key, weights_path)
        (a if which == "A" else b)[(layer, module)] = tensor
    if not a:
        raise ValueError(f"{weights_path} holds no LoRA weights")
    weights = LoraWeights(rank=rank, scaling=scaling, target_modules=frozenset(m for _, m in a), a=a, b=b)
    check_weights(weights, shape, source=str(weights_path))
    return weights


def _parse_key(key: str, weights_path: Path) -> tuple[int, str, str]:
    """(layer, module, "A" or "B") of a PEFT LoRA tensor name; anything else is refused, by name."""
    match = _KEY.search(key)
    if match is None:
        raise ValueError(f"{weights_path}: tensor {shown(key)} is not a LoRA A/B weight of a Llama projection "
                         f"(embedding targets, biases and DoRA magnitudes are not supported)")
    layer, module, which = int(match.group(1)), match.group(2), match.group(3)
    if module not in LORA_MODULES:
        raise ValueError(f"{weights_path}: tensor {shown(key)} targets {module!r}; the engine serves LoRA on "
                         f"{', '.join(LORA_MODULES)} only")
    return layer, module, which


def _shown(value: object, known: tuple[str, ...] = ()) -> str:
    """A config value for an error message: numbers and PEFT's own option names, never free text."""
    if isinstance(value, int) and abs(value) >= 10**40:
        return "a huge int"
    if value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and value in known):
        return repr(value)
    return f"a {type(value).__name__}"


def _check_config(config: dict, path: Path) -> tuple[int, float]:
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type is {_shown(config.get('peft_type'))}, not 'LORA'; only LORA adapters "
                         f"are served")
    for field, what in _UNSUPPORTED_OPTIONS.items():
        if config.get(field):
            raise ValueError(f"{path}: {field} is set; it is not supported ({what} changes the LoRA forward; "
                             f"the engine serves plain LoRA)")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={_shown(config['bias'], _BIAS_VALUES)} is not supported (only bias='none')")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
        raise ValueError(f"{path}: r={_shown(rank)} must be an integer in [1, {MAX_RANK}]")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
        raise ValueError(f"{path}: lora_alpha={_shown(alpha)} must be a finite positive number")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, float(scaling)


def check_weights(weights: LoraWeights, shape: LlamaShape, *, source: str = "LoraWeights") -> None:
    """Every A has its B, every matrix fits the base model (catches an adapter of another base) and
    every value is finite (one NaN would make every answer of this adapter garbage)."""
    if set(weights.a) != set(weights.b):
        odd = min(set(weights.a) ^ set(weights.b))
        raise ValueError(f"{source}: layer {odd[0]} {odd[1]} has lora_A without lora_B or the reverse")
    for (layer, module), a in weights.a.items():
        b = weights.b[(layer, module)]
        if not 0 <= layer < shape.num_layers:
            raise ValueError(f"{source}: layer {layer} {module} is outside the base model's "
                             f"{shape.num_layers} layers")
        fan_in, fan_out = module_dims(shape, module)
        if a.dim() != 2 or b.dim() != 2 or a.shape != (weights.rank, fan_in) or b.shape != (fan_out, weights.rank):
            raise ValueError(
                f"{source}: layer {layer} {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                f"rank {weights.rank} on this base model needs ({weights.rank}, {fan_in}) and "
                f"({fan_out}, {weights.rank}) (an adapter trained on another base model?)")
        for which, tensor in (("lora_A", a), ("lora_B", b)):
            if not tensor.is_floating_point():
                raise ValueError(f"{source}: layer {layer} {module} {which} is {tensor.dtype}, not a float tensor")
    tensors = {(layer, module, "lora_A"): a for (layer, module), a in weights.a.items()}
    tensors.update({(layer, module, "lora_B"): b for (layer, module), b in weights.b.items()})
    bad = first_non_finite(tensors)
    if bad is not None:
        raise ValueError(f"{source}: layer {bad[0]} {bad[1]} {bad[2]} holds non-finite values (NaN or Inf)")
    if not math.isfinite(weights.scaling):
        raise ValueError(f"{source}: scaling {weights.scaling} is not finite")


def random_lora(shape: LlamaShape, rank: int, target_modules: Iterable[str], *, seed: int,
                scaling: float = 2.0) -> LoraWeights:
    """A LoRA with non-zero B (unlike a fresh PEFT one), so tests and benchmarks see a real delta."""
    modules = tuple(dict.fromkeys(target_modules))
    if rank < 1 or not modules:
        raise ValueError(f"random_lora needs rank >= 1 and at least one target module, got rank={rank}, "
                         f"target_modules={modules}")
    generator = torch.Generator().manual_seed(seed)
    a, b = {}, {}
    for layer in range(shape.num_layers):
        for module in modules:
            fan_in, fan_out = module_dims(shape, module)
            a[(layer, module)] = torch.randn(rank, fan_in, generator=generator) / math.sqrt(fan_in)
            b[(layer, module)] = torch.randn(fan_out, rank, generator=generator) * (0.5 / math.sqrt(rank))
    return LoraWeights(rank=rank, scaling=scaling, target_modules=frozenset(modules), a=a, b=b)
