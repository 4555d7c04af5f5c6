"""Turbo heads: K small speculative heads that reuse the base model's frozen LM head.

Head k (k = 1..K) maps the last hidden state h_t — which the model itself turns into token t+1 — to
a state whose LM-head projection predicts token t+1+k. Medusa-1 gives every head its own d×d block
*and* its own d×V LM head (V = 49k for SmolLM2: 28M parameters per head). Ours is one residual
block per head, `h + W_up · SiLU(W_down · h)`, projected by the model's own LM head, so a head costs
2·d·r parameters (r ≤ d) — about 1% of a Medusa-1 head at SmolLM2's size.

`W_up` starts at zero: every head starts as "predict the next token", a useful prior for structured
text, and training moves each one to its own offset.

Loading is a trust boundary (the server loads other teams' heads next to everyone's requests): the
config's sizes are bounded and, given the base model's sizes, must match them before anything is
allocated; tensor names, shapes and dtypes are checked from the safetensors header before a tensor is
read; every value must be finite. Errors name the file and field, never the values in the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors.torch import save_file
from torch import nn

from .adapter_dir import (
    TURBO_CONFIG_FILE,
    TURBO_WEIGHTS_FILE,
    adapter_file,
    describe_invalid,
    read_adapter_text,
)
from .tensor_files import read_checked_tensors, shown

# Bounds on turbo_config.json, checked before the heads are built: far past real models (SmolLM2:
# d=576, V=49152; Llama 3 70B: d=8192, V=128256), far below sizes that would exhaust memory.
MAX_HIDDEN_SIZE = 65536
MAX_VOCAB_SIZE = 1 << 21


class TurboHeadsConfig(BaseModel):
    """Shape of the heads; saved as `turbo_config.json` next to the weights."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_heads: int = Field(4, ge=1, le=8, description="K: head k predicts the token k+1 positions ahead")
    hidden_size: int = Field(ge=1, le=MAX_HIDDEN_SIZE, description="d of the base model")
    block_size: int = Field(ge=1, le=MAX_HIDDEN_SIZE, description="r: inner width of each residual block")
    vocab_size: int = Field(ge=1, le=MAX_VOCAB_SIZE, description="V of the base model's LM head (for parameter "
                                                                 "reports)")

    @model_validator(mode="after")
    def _block_fits(self) -> TurboHeadsConfig:
        if self.block_size > self.hidden_size:  # heads are small residual blocks (r <= d), never wider
            raise ValueError(f"block_size ({self.block_size}) must not exceed hidden_size ({self.hidden_size})")
        return self

    def check_base(self, hidden_size: int | None, vocab_size: int | None, source: str) -> None:
        """Refuse heads made for another base model: they would fail (or draft garbage) at serving time."""
        for field, expected in (("hidden_size", hidden_size), ("vocab_size", vocab_size)):
            value = getattr(self, field)
            if expected is not None and value != expected:
                raise ValueError(f"{source}: {field}: is {value} but the base model's is {expected} (heads "
                                 f"trained for another base model?)")

    def state_shapes(self) -> dict[str, tuple[int, int]]:
        """The tensor names and shapes `TurboHeads(self).state_dict()` has, without building it."""
        d, r = self.hidden_size, self.block_size
        return {name: shape for k in range(self.num_heads)
                for name, shape in ((f"heads.{k}.down.weight", (r, d)), (f"heads.{k}.up.weight", (d, r)))}


class ResidualHead(nn.Module):
    def __init__(self, hidden_size: int, block_size: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, block_size, bias=False)
        self.up = nn.Linear(block_size, hidden_size, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(F.silu(self.down(hidden)))  # (..., d)


class TurboHeads(nn.Module):
    def __init__(self, config: TurboHeadsConfig) -> None:
        super().__init__()
        self.config = config
        self.heads = nn.ModuleList(ResidualHead(config.hidden_size, config.block_size)
                                   for _ in range(config.num_heads))

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., d) → (K, ..., d): each head's state, ready for the LM head."""
        return torch.stack([head(hidden) for head in self.heads])

    def draft_logits(self, hidden: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """Last hidden state per row (B, d) → draft logits (B, K, V) through the shared LM head."""
        states = self(hidden.to(self.heads[0].down.weight.dtype))  # (K, B, d)
        return lm_head(states.to(lm_head.weight.dtype)).transpose(0, 1)  # (B, K, V)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def medusa1_equivalent_parameters(num_heads: int, hidden_size: int, vocab_size: int) -> int:
    """Medusa-1: per head a d×d residual block (+ bias) and its own d×V LM head."""
    return num_heads * (hidden_size * hidden_size + hidden_size + hidden_size * vocab_size)


def new_heads(model: Any, num_heads: int, block_size: int | None = None) -> TurboHeads:
    """Heads sized for `model` (a transformers causal LM or a PEFT wrapper), in its dtype and device."""
    from .loss import unwrap_causal_lm

    base = unwrap_causal_lm(model)
    lm_head = base.get_output_embeddings()
    vocab_size, hidden_size = lm_head.weight.shape
    config = TurboHeadsConfig(num_heads=num_heads, hidden_size=hidden_size,
                              block_size=block_size or hidden_size, vocab_size=vocab_size)
    heads = TurboHeads(config)
    return heads.to(device=lm_head.weight.device, dtype=torch.float32)


def save_heads(heads: TurboHeads, folder: Path) -> None:
    folder = Path(folder)
    (folder / TURBO_CONFIG_FILE).write_text(heads.config.model_dump_json(indent=2))
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in heads.state_dict().items()}
    save_file(state, str(folder / TURBO_WEIGHTS_FILE))


def load_heads(folder: Path, *, device: torch.device | str = "cpu", hidden_size: int | None = None,
               vocab_size: int | None = None) -> TurboHeads:
    """Rebuild heads from `turbo_config.json` + `turbo_heads.safetensors` (never unpickles anything).

    With the base model's `hidden_size` / `vocab_size`, heads made for another base are refused before
    anything is allocated (the server passes them; training-side callers know their own model)."""
    folder = Path(folder)
    config = read_heads_config(folder)
    config_path = folder / TURBO_CONFIG_FILE
    config.check_base(hidden_size, vocab_size, str(config_path))
    weights_path = adapter_file(folder, TURBO_WEIGHTS_FILE)  # confined to the folder, like every adapter file
    expected = config.state_shapes()

    def check(name: str, declared: tuple[int, ...]) -> None:
        if name not in expected:
            raise ValueError(f"{weights_path}: tensor {shown(name)} is not a weight of {config.num_heads} heads "
                             f"(expected {', '.join(sorted(expected))})")
        if declared != expected[name]:
            raise ValueError(f"{weights_path}: tensor {shown(name)} has shape {declared}, but {config_path.name} "
                             f"implies {expected[name]}")

    tensors = read_checked_tensors(weights_path, check)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{weights_path}: tensor {missing[0]!r} is missing ({len(missing)} of {len(expected)} "
                         f"expected tensors are)")
    heads = TurboHeads(config)
    heads.load_state_dict(tensors)
    return heads.to(device).eval()


def read_heads_config(folder: Path) -> TurboHeadsConfig:
    """`turbo_config.json` validated; errors give file, field and rule, never the file's values."""
    path = Path(folder) / TURBO_CONFIG_FILE
    try:
        raw = json.loads(read_adapter_text(Path(folder), TURBO_CONFIG_FILE))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:  # positions only, never the text
        where = f"line {error.lineno} column {error.colno}" if isinstance(error, json.JSONDecodeError) \
            else f"byte {error.start}"
        raise ValueError(f"{path} is not valid UTF-8 JSON ({where})") from None
    try:
        return TurboHeadsConfig.model_validate(raw)
    except ValidationError as error:
        raise ValueError(f"{path} is not a valid Turbo heads config: "
                         f"{describe_invalid(TURBO_CONFIG_FILE, error)}") from None


def has_heads(folder: Path) -> bool:
    return (Path(folder) / TURBO_CONFIG_FILE).exists() and (Path(folder) / TURBO_WEIGHTS_FILE).exists()
