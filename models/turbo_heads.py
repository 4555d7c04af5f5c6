"""Turbo heads: K small speculative heads that reuse the base model's frozen LM head.

Head k (k = 1..K) maps the last hidden state h_t — which the model itself turns into token t+1 — to
a state whose LM-head projection predicts token t+1+k. Medusa-1 gives every head its own d×d block
*and* its own d×V LM head (V = 49k for SmolLM2: 28M parameters per head). Ours is one residual
block per head, `h + W_up · SiLU(W_down · h)`, projected by the model's own LM head, so a head costs
2·d·r parameters (r ≤ d) — about 1% of a Medusa-1 head at SmolLM2's size.

`W_up` starts at zero: every head starts as "predict the next token", a useful prior for structured
text, and training moves each one to its own offset.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn

from .adapter_dir import TURBO_CONFIG_FILE, TURBO_WEIGHTS_FILE


class TurboHeadsConfig(BaseModel):
    """Shape of the heads; saved as `turbo_config.json` next to the weights."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_heads: int = Field(4, ge=1, le=8, description="K: head k predicts the token k+1 positions ahead")
    hidden_size: int = Field(ge=1, description="d of the base model")
    block_size: int = Field(ge=1, description="r: inner width of each residual block")
    vocab_size: int = Field(ge=1, description="V of the base model's LM head (for parameter reports)")


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


def load_heads(folder: Path, *, device: torch.device | str = "cpu") -> TurboHeads:
    """Rebuild heads from `turbo_config.json` + `turbo_heads.safetensors` (never unpickles anything)."""
    folder = Path(folder)
    config = TurboHeadsConfig.model_validate(json.loads((folder / TURBO_CONFIG_FILE).read_text()))
    heads = TurboHeads(config)
    heads.load_state_dict(load_file(str(folder / TURBO_WEIGHTS_FILE)))
    return heads.to(device).eval()


def has_heads(folder: Path) -> bool:
    return (Path(folder) / TURBO_CONFIG_FILE).exists() and (Path(folder) / TURBO_WEIGHTS_FILE).exists()
