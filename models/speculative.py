"""Speculative drafting and verification as pure tensor functions (no model calls, no cache).

One verification step feeds the model `[x, d_1..d_K]`: x is the last emitted token (not yet
processed) and d_1..d_K the heads' chain of drafts. `target_logits[:, j]` is the model's distribution
after consuming input position j, so it judges d_{j+1}, and position K gives a bonus token when every
draft was accepted.

Acceptance rule, greedy and sampled alike: draw s_j from target position j with `sample_tokens` (the
same function plain decoding uses); accept d_{j+1} while s_j == d_{j+1}; the first s_j that differs
is emitted as the bonus token. Every emitted token is therefore a draw from the target's own
conditional distribution given the tokens before it, so the output distribution is exactly that of
plain decoding (greedy: token-for-token identical). Draws after the first mismatch are computed (all
positions are sampled in one call) but discarded, which leaves the kept draws independent.

For a draft that is a single token per position (our chain), this rule accepts with probability
p_target(d), exactly what Leviathan-style rejection sampling gives for a one-hot draft
distribution (min(1, p/q) with q(d) = 1), so nothing is lost by not using rejection sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

Scalar = float | int
_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Verification:
    """The result of one verification step for every row of the batch."""

    accepted: torch.Tensor  # (B,) long in [0, K]: drafts accepted, a prefix of the chain
    next_token: torch.Tensor  # (B,) long: the target's own token at position `accepted` (the bonus)
    target_tokens: torch.Tensor  # (B, K+1) long: the target's token at every position

    def emitted(self, row: int) -> list[int]:
        """Tokens row `row` emits this step: accepted drafts (equal to the target's) then the bonus."""
        return self.target_tokens[row, : int(self.accepted[row]) + 1].tolist()


def propose(draft_logits: torch.Tensor) -> torch.Tensor:
    """Head logits (B, K, V) → a greedy chain of candidates (B, K): top-1 of every head."""
    if draft_logits.ndim != 3:
        raise ValueError(f"draft_logits must be (batch, heads, vocab), got shape {tuple(draft_logits.shape)}")
    return draft_logits.argmax(dim=-1)  # (B, K)


def sample_tokens(
    logits: torch.Tensor,
    *,
    temperature: torch.Tensor | Scalar = 0.0,
    top_p: torch.Tensor | Scalar = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of `logits` (..., V) → (...): argmax where temperature is 0, else a draw.

    `temperature` and `top_p` are scalars or tensors broadcastable to `logits.shape[:-1]` (per-row
    settings in one batch). Top-p keeps the smallest set of most likely tokens whose mass reaches
    `top_p` (always at least the most likely one). Plain and speculative decoding both sample through
    here, so their distributions agree by construction.
    """
    _check_sampling(temperature, top_p)
    if logits.dtype in _LOW_PRECISION:
        logits = logits.float()
    greedy = logits.argmax(dim=-1)  # (...)
    if not isinstance(temperature, torch.Tensor):
        if temperature == 0:
            return greedy
        temperature = torch.tensor(float(temperature), dtype=logits.dtype, device=logits.device)
    temperature = temperature.to(device=logits.device, dtype=logits.dtype).expand(logits.shape[:-1])  # (...)
    is_greedy = temperature == 0  # (...)
    if bool(is_greedy.all()):
        return greedy
    probs = F.softmax(logits / temperature.clamp_min(1e-6).unsqueeze(-1), dim=-1)  # (..., V)
    if isinstance(top_p, torch.Tensor) or top_p < 1.0:
        probs = _nucleus(probs, top_p)
    flat = probs.reshape(-1, probs.shape[-1])  # (N, V)
    sampled = torch.multinomial(flat, 1, generator=generator).reshape(greedy.shape)  # (...)
    return torch.where(is_greedy, greedy, sampled)


def verify(
    draft: torch.Tensor,
    target_logits: torch.Tensor,
    *,
    temperature: torch.Tensor | Scalar = 0.0,
    top_p: torch.Tensor | Scalar = 1.0,
    generator: torch.Generator | None = None,
) -> Verification:
    """Drafts (B, K) and the model's logits over `[x, d_1..d_K]` (B, K+1, V) → accepted prefix + bonus.

    Per-row `temperature`/`top_p` tensors are (B,). K may be 0: that is plain decoding.
    """
    batch, k = draft.shape
    if target_logits.ndim != 3 or target_logits.shape[:2] != (batch, k + 1):
        raise ValueError(f"target_logits must be (batch={batch}, K+1={k + 1}, vocab), "
                         f"got shape {tuple(target_logits.shape)}")
    target_tokens = sample_tokens(target_logits, temperature=_per_row(temperature), top_p=_per_row(top_p),
                                  generator=generator)  # (B, K+1)
    matches = (target_tokens[:, :k] == draft).long()  # (B, K)
    accepted = matches.cumprod(dim=1).sum(dim=1)  # (B,) length of the all-match prefix
    next_token = target_tokens.gather(1, accepted.unsqueeze(1)).squeeze(1)  # (B,)
    return Verification(accepted=accepted, next_token=next_token, target_tokens=target_tokens)


def head_acceptance(accepted: list[int] | torch.Tensor, num_heads: int) -> tuple[list[int], list[int]]:
    """Per-head-position trials and accepts from per-step accepted counts.

    Position k (0-based) is only tried when positions < k were all accepted, so trials[k] counts steps
    with accepted >= k and accepts[k] those with accepted > k; accepts[k] / trials[k] is that head's
    conditional acceptance rate.
    """
    counts = torch.as_tensor(accepted, dtype=torch.long).reshape(-1)  # (S,)
    trials = [int((counts >= k).sum()) for k in range(num_heads)]
    accepts = [int((counts > k).sum()) for k in range(num_heads)]
    return trials, accepts


def _per_row(value: torch.Tensor | Scalar) -> torch.Tensor | Scalar:
    """(B,) settings broadcast over the K+1 positions of each row."""
    if isinstance(value, torch.Tensor) and value.ndim == 1:
        return value.unsqueeze(1)  # (B, 1)
    return value


def _nucleus(probs: torch.Tensor, top_p: torch.Tensor | Scalar) -> torch.Tensor:
    """Zero every token outside the top-p nucleus and renormalise."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # (..., V)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (..., V) mass of strictly likelier tokens
    if isinstance(top_p, torch.Tensor):
        top_p = top_p.to(device=probs.device, dtype=probs.dtype).expand(probs.shape[:-1]).unsqueeze(-1)
    outside = mass_before >= top_p
    # The most likely token is always kept, structurally: a top_p too small for the dtype (1e-300 is 0.0
    # in fp32) would otherwise zero every token and turn the row into NaN.
    outside[..., 0] = False
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)  # (..., V)
    return kept / kept.sum(dim=-1, keepdim=True)


def _check_sampling(temperature: torch.Tensor | Scalar, top_p: torch.Tensor | Scalar) -> None:
    low_t = bool((temperature < 0).any()) if isinstance(temperature, torch.Tensor) else temperature < 0
    if low_t:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if isinstance(top_p, torch.Tensor):
        bad_p = bool(((top_p <= 0) | (top_p > 1)).any())
    else:
        bad_p = not 0 < top_p <= 1
    if bad_p:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
