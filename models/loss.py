"""Causal-LM loss computed only where there is a target.

The LM head (hidden × vocab, 49k columns for SmolLM2) is the single largest matmul per token. Prompt
tokens carry no loss, so we run the decoder once and apply the head only at positions whose *next*
token is a completion token — about half the head's work on typical instruction data. Speculative
heads (issue 3) reuse `decoder_hidden_states` for the same reason.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .batching import IGNORE_INDEX


def unwrap_causal_lm(model: Any) -> Any:
    """The transformers `*ForCausalLM` inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_hidden_states(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last-layer hidden states (B, T, H), LoRA layers included, without the LM head."""
    decoder = unwrap_causal_lm(model).get_decoder()
    return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def completion_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over target tokens, and how many target tokens there were."""
    hidden = decoder_hidden_states(model, batch["input_ids"], batch["attention_mask"])  # (B, T, H)
    targets = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    keep = targets != IGNORE_INDEX  # (B, T-1)
    n_targets = int(keep.sum())
    if n_targets == 0:
        return hidden.sum() * 0.0, 0
    selected = hidden[:, :-1][keep]  # (N, H)
    logits = unwrap_causal_lm(model).get_output_embeddings()(selected).float()  # (N, V)
    return F.cross_entropy(logits, targets[keep]), n_targets
