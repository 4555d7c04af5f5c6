"""LoRA and QLoRA through PEFT: apply to a base model, save as an adapter directory, load back.

PEFT does the adapter math; this module only fixes our defaults, turns PEFT's errors into ones that
name the config field, and writes the adapter directory atomically with its manifest.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .adapter_dir import AdapterManifest, validate_adapter_dir, write_manifest
from .cache import atomic_directory

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


class LoraSettings(BaseModel):
    """LoRA hyper-parameters (config section `lora`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    r: int = Field(16, ge=1, le=1024, description="rank")
    alpha: float = Field(32.0, gt=0, description="scaling numerator: the update is scaled by alpha / r")
    # 0.0 by default: on CPU, dropout on every adapted projection's input costs ~21% of a training step
    # (docs/performance.md) and buys little in the one- or two-epoch runs adapters usually get.
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("target_modules must name at least one module")
        return value


def apply_lora(model: Any, settings: LoraSettings, *, quantized: bool = False) -> Any:
    """Wrap `model` in a trainable PEFT LoRA; the base weights stay frozen."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    check_target_modules(model, settings)
    if quantized:
        # Casts norms to fp32 and enables input grads, which 4-bit bases need for a stable backward.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_layout(model)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
    )
    return get_peft_model(model, config)


def check_target_modules(model: Any, settings: LoraSettings) -> None:
    """Raise ValueError naming `lora.target_modules` when one of them is not a module of `model`."""
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [name for name in settings.target_modules if name not in present]
    if missing:
        raise ValueError(
            f"lora.target_modules: {missing} not found in the base model "
            f"(linear layers present include {sorted(n for n in present if n.endswith('_proj'))})"
        )


def keep_4bit_layout(model: Any) -> int:
    """Stop bitsandbytes from repacking a training model's 4-bit weights; returns how many layers.

    On a CPU with AVX512-BF16 (this machine's Zen 4), bitsandbytes 0.50 rewrites a `Linear4bit`'s
    weight and quant state in place into a bf16-kernel layout the first time the layer runs in eval
    mode without gradients, i.e. at the first validation pass. Training then carries on in another
    numeric path (measured on the tiny model: the loss one step after a validation 4.25 instead of
    4.03), and under FSDP the repacked shard is dropped at the next reshard while the shared quant
    state still says "packed", so every later step computes with garbage. A training run keeps the
    layout it loaded.
    """
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def count_trainable(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def save_adapter(peft_model: Any | None, target_dir: Path, manifest: AdapterManifest, *,
                 heads: Any | None = None, overwrite: bool = True,
                 state_dict: dict[str, Any] | None = None,
                 lora_files: Callable[[Path], None] | None = None) -> Path:
    """Write the adapter directory in one atomic step: nobody ever sees a half-written adapter.

    `peft_model` is None for a Turbo adapter on the bare base (heads only); `heads` adds the
    speculative heads (`turbo_config.json`, `turbo_heads.safetensors`). `state_dict` replaces the
    model's own weights, e.g. the whole tensors gathered from an FSDP run's shards. `lora_files` writes
    the PEFT LoRA files into the folder instead of `peft_model` (an AdaLoRA converted to plain LoRA,
    `adalora.PlainLora.save`).
    """
    from .turbo_heads import save_heads

    target_dir = Path(target_dir)
    with atomic_directory(target_dir, overwrite=overwrite) as staging:
        if lora_files is not None:
            lora_files(staging)
        elif peft_model is not None:
            peft_model.save_pretrained(str(staging), safe_serialization=True, state_dict=state_dict)
        if heads is not None:
            save_heads(heads, staging)
        write_manifest(staging, manifest)
        validate_adapter_dir(staging)
    return target_dir


def load_adapter(base_model: Any, adapter_dir: Path, *, adapter_name: str = "default",
                 trainable: bool = False) -> Any:
    """Load an adapter directory onto `base_model` with stock PEFT."""
    from peft import PeftModel

    validate_adapter_dir(adapter_dir)
    return PeftModel.from_pretrained(base_model, str(adapter_dir), adapter_name=adapter_name,
                                     is_trainable=trainable)
