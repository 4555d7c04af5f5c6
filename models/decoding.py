"""The generation loop: plain and speculative decoding through the same code, over token ids.

We call the decoder and the LM head ourselves (as `models/loss.py` does) so the last hidden state,
which the Turbo heads draft from, comes for free. One step feeds `[x, d_1..d_K]` per row (K = 0 for
plain decoding), verifies with `speculative.verify`, and commits the kept slots in `SpecCache`. Plain
decoding is the same loop with K = 0, so speed comparisons measure only the speculation.

Rows stop independently at an end token or `max_new_tokens`; a finished row leaves the batch (its
cache rows are dropped), which keeps later steps as cheap as the rows still running.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .loss import unwrap_causal_lm
from .sampling_rules import (
    check_max_new_tokens,
    check_seed,
    check_temperature,
    check_top_p,
    cut_at_stop,
)
from .spec_cache import SpecCache
from .speculative import head_acceptance, propose, sample_tokens, verify

FinishReason = Literal["stop", "length"]
# Compact the cache when more than this share of its slots would be freed (holes from batch > 1).
_COMPACT_ABOVE = 0.5
# Score target and draft rows in one LM-head call while B·(K+1)·(K+1) is at most this (see `_score`).
_MERGED_HEAD_ROWS = 32


@dataclass
class DecodeStats:
    """Counts for τ, tokens/s and per-head acceptance; `accepted_per_step` has one entry per row-step."""

    steps: int = 0  # verification forwards (batch-wide), prefill excluded
    emitted_tokens: int = 0  # tokens returned to callers (end tokens excluded), prefill token included
    num_heads: int = 0  # K drafted per step (0 = plain decoding)
    accepted_per_step: list[int] = field(default_factory=list)

    @property
    def tau(self) -> float:
        """Mean tokens emitted per verification step of one row: 1 + mean accepted drafts."""
        if not self.accepted_per_step:
            return 0.0
        return 1.0 + sum(self.accepted_per_step) / len(self.accepted_per_step)

    @property
    def head_trials(self) -> list[int]:
        return head_acceptance(self.accepted_per_step, self.num_heads)[0]

    @property
    def head_accepts(self) -> list[int]:
        return head_acceptance(self.accepted_per_step, self.num_heads)[1]

    def accepted_histogram(self) -> list[int]:
        """How many row-steps accepted 0, 1, …, K drafts."""
        counts = [0] * (self.num_heads + 1)
        for accepted in self.accepted_per_step:
            counts[accepted] += 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        trials, accepts = head_acceptance(self.accepted_per_step, self.num_heads)
        return {"steps": self.steps, "emitted_tokens": self.emitted_tokens, "num_heads": self.num_heads,
                "row_steps": len(self.accepted_per_step), "tau": self.tau,
                "accepted_histogram": self.accepted_histogram(),
                "head_trials": trials, "head_accepts": accepts}


@dataclass
class DecodeResult:
    tokens: list[list[int]]  # per prompt, end token excluded
    finish_reasons: list[FinishReason]
    stats: DecodeStats


@dataclass(frozen=True)
class StepOutput:
    """Tokens one step appended to each running prompt (`rows` index the original prompts)."""

    rows: list[int]
    new_tokens: list[list[int]]
    finished: dict[int, FinishReason]


def generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_token_ids: int | Sequence[int],
    heads: Any | None = None,
    speculative: bool = True,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> DecodeResult:
    """Decode every prompt; speculative when `heads` (a `TurboHeads`) is given and `speculative`.

    Greedy (`temperature=0`) output is identical to plain greedy decoding; sampled output has the
    same distribution (see `speculative.py`). `tokens` exclude the end token, which (as in Hugging Face
    `generate`) counts against `max_new_tokens`. `seed` drives sampling only.
    """
    tokens: list[list[int]] = [[] for _ in prompts]
    reasons: list[FinishReason] = ["length"] * len(prompts)
    stats = DecodeStats()
    steps = stream(model, prompts, max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids, heads=heads,
                   speculative=speculative, temperature=temperature, top_p=top_p, seed=seed, stats=stats)
    for step in steps:
        for row, new in zip(step.rows, step.new_tokens):
            tokens[row].extend(new)
        for row, reason in step.finished.items():
            reasons[row] = reason
    return DecodeResult(tokens=tokens, finish_reasons=reasons, stats=stats)


def stream(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_token_ids: int | Sequence[int],
    heads: Any | None = None,
    speculative: bool = True,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stats: DecodeStats | None = None,
) -> Iterator[StepOutput]:
    """`generate` one step at a time (for streaming); `stats`, if given, is filled in as it goes.

    Arguments are checked here, before the first step, so bad input fails at the call.
    """
    stops = _validate(prompts, max_new_tokens, eos_token_ids, temperature, top_p, seed)
    stats = stats if stats is not None else DecodeStats()
    if max_new_tokens == 0 or not prompts:
        finished: dict[int, FinishReason] = dict.fromkeys(range(len(prompts)), "length")
        return iter([StepOutput(rows=[], new_tokens=[], finished=finished)])
    base = unwrap_causal_lm(model)
    lm_head = base.get_output_embeddings()
    drafting = heads is not None and speculative
    stats.num_heads = heads.num_heads if drafting else 0
    _check_context(base.config, prompts, max_new_tokens + stats.num_heads)
    device = lm_head.weight.device
    sampling = {"temperature": temperature, "top_p": top_p,
                "generator": torch.Generator(device=device).manual_seed(seed)}
    batch = _RunningBatch(base.get_decoder(), lm_head, heads if drafting else None, base.config,
                          device=device, stops=stops, sampling=sampling, stats=stats)
    return _steps(batch, prompts, max_new_tokens)


def _steps(batch: _RunningBatch, prompts: Sequence[Sequence[int]],
           max_new_tokens: int) -> Iterator[StepOutput]:
    # Inference mode is entered inside each step, never across a `yield`: it is thread-local and
    # would otherwise leak into the caller's code between steps.
    out = batch.prefill(prompts, max_new_tokens)
    yield out
    while batch.drop_finished(out.finished):
        out = batch.step()
        yield out


class _RunningBatch:
    """The rows still decoding: their cache, pending token, last hidden state and remaining budget."""

    def __init__(self, decoder: Any, lm_head: torch.nn.Module, heads: Any | None, config: Any, *,
                 device: torch.device, stops: frozenset[int], sampling: dict[str, Any],
                 stats: DecodeStats) -> None:
        self.decoder, self.lm_head, self.heads, self.config = decoder, lm_head, heads, config
        self.device, self.stops, self.sampling, self.stats = device, stops, sampling, stats
        self.num_heads = stats.num_heads

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> StepOutput:
        """One forward over the left-padded prompts; its last position gives every row's first token."""
        input_ids, prompt_mask = _left_pad(prompts, self.device)  # (B, T), (B, T)
        self.cache = SpecCache(self.config, len(prompts), self.device)
        positions, mask = self.cache.inputs_for_mask(prompt_mask)
        states = self.decoder(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                              past_key_values=self.cache.cache, use_cache=True).last_hidden_state  # (B, T, d)
        self.cache.commit_mask(prompt_mask)
        last = states[:, -1:]  # (B, 1, d) every row ends at the last column
        logits, drafts = self._score(last)  # (B, 1, V), (B, 1, K) | None
        self.token = sample_tokens(logits[:, 0], **self.sampling)  # (B,) emitted, not yet processed
        self.no_draft = torch.empty(len(prompts), 0, dtype=torch.long, device=self.device)  # (B, 0)
        self.draft = self._next_draft(last, torch.zeros_like(self.token), drafts)  # (B, K)
        self.rows = list(range(len(prompts)))  # original prompt index of each running row
        self.budget = [max_new_tokens] * len(prompts)  # tokens each running row may still emit
        return _emit(self.rows, self.budget, [[t] for t in self.token.tolist()], self.stops, self.stats)

    @torch.inference_mode()
    def drop_finished(self, finished: dict[int, FinishReason]) -> bool:
        """Remove finished rows from the batch; False when none is left."""
        if finished:
            keep = [i for i, row in enumerate(self.rows) if row not in finished]
            if not keep:
                return False
            index = torch.tensor(keep, device=self.device)
            self.cache.select_rows(index)
            self.token, self.draft, self.no_draft = self.token[index], self.draft[index], self.no_draft[index]
            self.rows, self.budget = [self.rows[i] for i in keep], [self.budget[i] for i in keep]
        if self.cache.has_holes and self.cache.wasted_fraction() > _COMPACT_ABOVE:
            self.cache.compact()
        return True

    @torch.inference_mode()
    def step(self) -> StepOutput:
        """One forward over `[x, d_1..d_K]`, verify, commit, emit, and draft for the next step."""
        k, cache = self.num_heads, self.cache
        step_ids = torch.cat([self.token.unsqueeze(1), self.draft], dim=1)  # (B, K+1)
        states = self.decoder(input_ids=step_ids, attention_mask=cache.attention_mask(k + 1),
                              position_ids=cache.positions_for(k + 1), past_key_values=cache.cache,
                              use_cache=True).last_hidden_state  # (B, K+1, d)
        logits, drafts = self._score(states)  # (B, K+1, V), (B, K+1, K) | None
        result = verify(self.draft, logits, **self.sampling)
        cache.commit(result.accepted + 1)  # x and the accepted drafts are now in the cache
        self.token = result.next_token  # the bonus: emitted now, processed next step
        self.draft = self._next_draft(states, result.accepted, drafts)  # from the state behind the bonus
        accepted = result.accepted.tolist()
        targets = result.target_tokens.tolist()  # accepted drafts equal the target's own tokens
        self.stats.steps += 1
        self.stats.accepted_per_step.extend(accepted)
        return _emit(self.rows, self.budget, [t[:a + 1] for t, a in zip(targets, accepted)], self.stops,
                     self.stats)

    def _score(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Target logits (B, T, V) for hidden states (B, T, d), plus every position's drafts (B, T, K)
        when one LM-head call for both is cheaper.

        On CPU the LM head (V × d, 113 MB for SmolLM2) is bound by reading its weights at few rows, so
        at batch 1 one call over the T target rows and T·K head rows beats a second call over the K
        head rows of the accepted position (SmolLM2, 2 cores: 18 ms for 25 rows vs 11 + 11 ms).
        With more rows the matmul itself dominates and the two-call path wins.
        """
        if self.heads is None or states.shape[0] * states.shape[1] * (self.num_heads + 1) > _MERGED_HEAD_ROWS:
            return self.lm_head(states), None
        head_dtype = next(self.heads.parameters()).dtype
        head_states = self.heads(states.to(head_dtype)).to(self.lm_head.weight.dtype)  # (K, B, T, d)
        logits = self.lm_head(torch.cat([states.unsqueeze(0), head_states]))  # (K+1, B, T, V)
        return logits[0], logits[1:].argmax(dim=-1).permute(1, 2, 0)  # (B, T, V), (B, T, K)

    def _next_draft(self, states: torch.Tensor, position: torch.Tensor,
                    drafts: torch.Tensor | None) -> torch.Tensor:
        """Drafts (B, K) from each row's state at `position` (B,): the one that produced its bonus token."""
        if self.heads is None:
            return self.no_draft  # (B, 0)
        rows = torch.arange(states.shape[0], device=self.device)  # (B,)
        if drafts is not None:
            return drafts[rows, position]  # (B, K)
        return propose(self.heads.draft_logits(states[rows, position], self.lm_head))  # (B, K)


def _emit(rows: list[int], budget: list[int], proposed: list[list[int]], stops: frozenset[int],
          stats: DecodeStats) -> StepOutput:
    """Cut each row's new tokens to its budget, then at its first end token (`sampling_rules.cut_at_stop`).

    As in Hugging Face `generate`, the end token counts against `max_new_tokens`: a row that returns
    exactly `max_new_tokens` tokens finished for "length".
    """
    new_tokens: list[list[int]] = []
    finished: dict[int, FinishReason] = {}
    for i, (row, tokens) in enumerate(zip(rows, proposed)):
        tokens, reason = cut_at_stop(tokens, budget[i], stops)
        if reason is not None:
            finished[row] = reason
        budget[i] -= len(tokens)
        stats.emitted_tokens += len(tokens)
        new_tokens.append(tokens)
    return StepOutput(rows=list(rows), new_tokens=new_tokens, finished=finished)


def _left_pad(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts → (B, T) ids and a (B, T) bool mask, padded on the left so every row ends at column T-1."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)  # (B, T) pad id is irrelevant: masked out
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)  # (B, T)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[i, width - len(prompt):] = True
    return ids.to(device), mask.to(device)


def _validate(prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_token_ids: int | Sequence[int],
              temperature: float, top_p: float, seed: int) -> frozenset[int]:
    """The shared sampling bounds (`sampling_rules`), a budget of 0 allowed; returns the stop ids."""
    check_max_new_tokens(max_new_tokens, minimum=0)
    check_temperature(temperature)
    check_top_p(top_p)
    check_seed(seed)
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompts[{i}] is empty: generation needs at least one prompt token")
    # Any ints: an id no model emits (tests use -1) simply never stops a row.
    return frozenset(int(t) for t in ([eos_token_ids] if isinstance(eos_token_ids, int) else eos_token_ids))


def _check_context(config: Any, prompts: Sequence[Sequence[int]], extra: int) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    longest = max(len(p) for p in prompts)
    if limit is not None and longest + extra > limit:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens and drafts ({extra}) exceeds the "
                         f"model's max_position_embeddings ({limit})")
