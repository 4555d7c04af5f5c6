"""Training objectives, computed only where there is a target.

The LM head (hidden × vocab, 49k columns for SmolLM2) is the single largest matmul per token. Prompt
tokens carry no loss, so we run the decoder once and apply the head only at positions whose target
is a completion token — about half the head's work on typical instruction data.

Turbo heads ride on the same decoder pass: head k at position t is scored against the token at
t+1+k, through the same frozen LM head. Each objective returns its loss plus additive sums
(loss × tokens, correct predictions, counts) so validation can aggregate exactly over batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass
class LossOutput:
    loss: torch.Tensor  # what to backpropagate
    n_targets: int  # tokens behind `loss`: weights micro-batches and validation batches
    sums: dict[str, float] = field(default_factory=dict)  # additive statistics, see `summarize`


def summarize(sums: dict[str, float]) -> dict[str, float]:
    """`x_sum`/`x_count` pairs → means; `headK_correct`/`headK_count` → `headK_acc`."""
    metrics = {}
    for key, value in sums.items():
        if key.endswith("_sum"):
            name = key[: -len("_sum")]
            metrics[name] = value / max(sums.get(f"{name}_count", 0), 1)
        elif key.endswith("_correct"):
            name = key[: -len("_correct")]
            metrics[f"{name}_acc"] = value / max(sums.get(f"{name}_count", 0), 1)
    return metrics


def _shifted_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, shift: int,
                           project: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """CE of `project(hidden[:, t])` against `labels[:, t + shift]` where that label is a target."""
    targets = labels[:, shift:]  # (B, T-shift)
    keep = targets != IGNORE_INDEX
    if not bool(keep.any()):
        return None
    logits = project(hidden[:, :-shift][keep]).float()  # (N, V)
    wanted = targets[keep]  # (N,)
    return F.cross_entropy(logits, wanted), logits.argmax(-1) == wanted, wanted


def completion_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over target tokens, and how many target tokens there were."""
    out = CompletionObjective(model)(batch)
    return out.loss, out.n_targets


class CompletionObjective:
    """Plain LoRA / QLoRA: next-token loss on completion tokens."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        hidden = decoder_hidden_states(self.model, batch["input_ids"], batch["attention_mask"])  # (B, T, H)
        lm_head = unwrap_causal_lm(self.model).get_output_embeddings()
        scored = _shifted_cross_entropy(hidden, batch["labels"], 1, lm_head)
        if scored is None:
            return LossOutput(hidden.sum() * 0.0, 0)
        loss, _, wanted = scored
        n = int(wanted.numel())
        return LossOutput(loss, n, {"loss_sum": float(loss.detach()) * n, "loss_count": n})


class TurboObjective:
    """Turbo LoRA (`lm_weight` 1: LM loss + Σ_k w_k·CE(head_k)) or Turbo (`lm_weight` 0: heads only).

    Head k at position t predicts the token at t+1+k through the model's own frozen LM head.
    """

    def __init__(self, model: Any, heads: torch.nn.Module, head_weights: list[float], lm_weight: float) -> None:
        if len(head_weights) != len(heads.heads):
            raise ValueError(f"{len(head_weights)} head weights for {len(heads.heads)} heads")
        self.model, self.heads, self.head_weights, self.lm_weight = model, heads, head_weights, lm_weight

    def __call__(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        hidden = decoder_hidden_states(self.model, batch["input_ids"], batch["attention_mask"])  # (B, T, H)
        labels = batch["labels"]
        lm_head = unwrap_causal_lm(self.model).get_output_embeddings()
        total = hidden.sum() * 0.0
        sums: dict[str, float] = {}
        n_targets = 0
        lm = _shifted_cross_entropy(hidden, labels, 1, lm_head)
        if lm is not None:
            n_targets = int(lm[2].numel())
            sums.update({"lm_loss_sum": float(lm[0].detach()) * n_targets, "lm_loss_count": n_targets})
            if self.lm_weight:
                total = total + self.lm_weight * lm[0]
        for k, (head, weight) in enumerate(zip(self.heads.heads, self.head_weights, strict=True), start=1):
            scored = _shifted_cross_entropy(hidden, labels, 1 + k, lambda h, head=head: lm_head(head(h)))
            if scored is None:
                continue
            loss, correct, wanted = scored
            total = total + weight * loss
            count = int(wanted.numel())
            sums.update({f"head{k}_loss_sum": float(loss.detach()) * count, f"head{k}_loss_count": count,
                         f"head{k}_correct": float(correct.sum()), f"head{k}_count": count})
        if not n_targets:  # no LM target in the batch: weight by head-1 targets instead
            n_targets = int(sums.get("head1_count", 0))
        sums.update({"loss_sum": float(total.detach()) * n_targets, "loss_count": n_targets})
        return LossOutput(total, n_targets, sums)
