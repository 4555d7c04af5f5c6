"""The engine: continuous batching of requests for many adapters over one base model.

The tiny API of STYLE rule 6: `add_request`, `abort`, `step() -> outputs`. Each `step` asks the
scheduler (policy) what to run, packs every scheduled sequence's tokens into one `ForwardBatch`
(prefill chunks, plain decodes and speculative `[x, d_1..d_K]` chains side by side, each row with its
own adapter slot), runs one forward and one LM-head call, then verifies drafts, samples, appends,
rolls the KV cache back past rejected drafts and reports new tokens.

Speculation uses each sequence's own adapter heads (rows without heads decode one token); it is
switched off when more than `speculative_max_batch` sequences are live, where the batch is already
compute-bound and verifying extra tokens stops paying. Greedy stays token-for-token identical to plain
decoding because verification keeps only tokens the target itself picks (`models.speculative`).

The engine is single-threaded on purpose: the async front (`serving/engine_generator.py`) owns the thread that
calls `step`, and adapter loading happens elsewhere but is installed here, between forwards.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from lorafleet.models.speculative import verify
from lorafleet.serving.engine.kv_cache import BlockAllocator, KVPool
from lorafleet.serving.engine.lora_slots import LoraSlots
from lorafleet.serving.engine.model import CompactLlama, ForwardBatch
from lorafleet.serving.engine.scheduler import ScheduledSeq, Scheduler
from lorafleet.serving.engine.sequence import SamplingParams, SeqStatus, Sequence

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(frozen=True)
class EngineConfig:
    """Budgets of one engine; defaults suit the embedded SmolLM2 on a laptop CPU."""

    block_size: int = 16
    kv_cache_mb: float = 256  # KV pool budget; the scheduler preempts when it runs out
    max_num_seqs: int = 32  # running sequences per step
    max_tokens_per_step: int = 512  # packed tokens per forward (prefill chunks + decodes)
    max_waiting: int = 256  # queue bound: beyond it `add_request` raises QueueFull (HTTP 429)
    speculative_max_batch: int = 4  # live sequences above which no row drafts
    adapter_slots: int = 16
    max_lora_rank: int = 16  # slots are sized (and LoRA work done) at this rank: keep it at the largest in use
    prefix_caching: bool = True  # reuse K/V of prompt prefixes already computed with the same adapter


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0


@dataclass
class EngineStats:
    """Counters the service turns into Prometheus metrics (vLLM's names where they exist)."""

    steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    spec_drafts: int = 0  # verification steps that carried drafts (one per row-step)
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    preemptions: int = 0
    last_batch_size: int = 0
    tokens_by_adapter: dict[str, int] = field(default_factory=dict)
    requests_by_adapter: dict[str, int] = field(default_factory=dict)

    @property
    def mean_acceptance_length(self) -> float:
        """τ: tokens emitted per verification step of a drafting row (1 + accepted drafts)."""
        return 1.0 + self.spec_accepted_tokens / self.spec_drafts if self.spec_drafts else 0.0


@dataclass
class _Live:
    """Engine-side state of a sequence the scheduler does not own: RNG, drafts, adapter binding."""

    seq: Sequence
    generator: torch.Generator | None
    slot: int = 0  # LoRA slot (0 = base); valid while pinned
    pinned: bool = False
    drafts: list[int] = field(default_factory=list)


class Engine:
    """One base model, many adapters, one batch. Not thread-safe: one thread calls it."""

    def __init__(self, model: CompactLlama, config: EngineConfig | None = None, *,
                 adapters: Any | None = None, lora: LoraSlots | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.model, self.config = model, config or EngineConfig()
        shape = model.shape
        weight = model.lm_head_weight
        self.device, self.dtype = weight.device, weight.dtype
        num_blocks = KVPool.blocks_for_budget(self.config.kv_cache_mb * 2**20, shape.num_layers,
                                              self.config.block_size, shape.num_kv_heads, shape.head_dim,
                                              self.dtype)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_mb={self.config.kv_cache_mb} is too small for one block of "
                             f"{self.config.block_size} tokens")
        self.kv = model.new_kv_pool(num_blocks, self.config.block_size)
        self.allocator = BlockAllocator(num_blocks, self.config.block_size)
        self.scheduler = Scheduler(self.allocator, max_num_seqs=self.config.max_num_seqs,
                                   max_tokens_per_step=self.config.max_tokens_per_step,
                                   max_waiting=self.config.max_waiting,
                                   prefix_caching=self.config.prefix_caching)
        self.adapters = adapters  # an AdapterCache, or None: base model only
        self.lora = lora if lora is not None else getattr(adapters, "slots", None)
        self.stats = EngineStats()
        self.clock = clock
        self._live: dict[str, _Live] = {}
        self._seeds = itertools.count(1)

    # ----- the API ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    adapter: str | None = None) -> None:
        """Queue a request. Bad input raises here (ValueError, QueueFull, AdapterNotFound), before
        anything is allocated, so a refused request leaves no state behind."""
        if request_id in self._live:
            raise ValueError(f"request_id {request_id!r} is already live")
        if not prompt_ids:
            raise ValueError("prompt_ids is empty: generation needs at least one prompt token")
        vocab = self.model.shape.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"prompt_ids contain a token id outside the vocabulary [0, {vocab})")
        limit = self.model.shape.max_position_embeddings
        if len(prompt_ids) + params.max_new_tokens > limit:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens + max_new_tokens {params.max_new_tokens} "
                             f"exceeds the model's context length {limit}")
        if adapter is not None:
            if self.adapters is None:
                raise LookupError(f"adapter {adapter!r} requested but this engine serves the base model only")
            self.adapters.request(adapter)  # AdapterNotFound now; otherwise starts loading on a miss
        seq = Sequence(request_id=request_id, prompt_ids=list(prompt_ids), params=params, adapter=adapter)
        self.scheduler.add(seq)
        seed = params.seed if params.seed is not None else next(self._seeds) + int(self.clock() * 1e6)
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=self.device).manual_seed(int(seed))
        self._live[request_id] = _Live(seq=seq, generator=generator)
        key = adapter or ""
        self.stats.requests_by_adapter[key] = self.stats.requests_by_adapter.get(key, 0) + 1

    def abort(self, request_id: str) -> bool:
        """Cancel a waiting or running request and free its KV blocks; False if it was not live."""
        live = self._live.pop(request_id, None)
        if live is None:
            return False
        self.scheduler.abort(request_id)
        self._unpin(live)
        return True

    def has_unfinished(self) -> bool:
        return bool(self._live)

    def num_waiting(self) -> int:
        return self.scheduler.num_waiting()

    def num_running(self) -> int:
        return self.scheduler.num_running()

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One scheduling decision, one forward, one LM-head call; outputs of every touched request."""
        outputs = self._install_adapters()
        self._plan_speculation()
        plan = self.scheduler.schedule(self._adapter_ready)
        self.stats.preemptions += len(plan.preempted)
        for seq in plan.finished:  # outgrew the whole KV pool: ends for length, as vLLM does
            live = self._live.pop(seq.request_id)
            self._unpin(live)
            outputs.append(RequestOutput(request_id=seq.request_id, new_token_ids=[], finished=True,
                                         finish_reason="length", num_prompt_tokens=len(seq.prompt_ids),
                                         num_output_tokens=len(seq.output_ids)))
        for seq in plan.preempted:
            live = self._live[seq.request_id]
            live.drafts = []
            self._unpin(live)
        if not plan.scheduled:
            return outputs
        for item in plan.scheduled:
            self._pin(self._live[item.seq.request_id])
        batch, rows = self._pack(plan.scheduled)
        hidden = self.model(batch, self.kv, self.lora)  # (N, d)
        self.stats.steps += 1
        self.stats.last_batch_size = len(plan.scheduled)
        outputs.extend(self._advance(plan.scheduled, rows, hidden))
        return outputs

    # ----- adapters -----------------------------------------------------------------------------
    def _install_adapters(self) -> list[RequestOutput]:
        """Install finished loads; fail the requests whose adapter could not be loaded."""
        if self.adapters is None:
            return []
        self.adapters.install_ready()
        failed = []
        for request_id, live in list(self._live.items()):
            name = live.seq.adapter
            if name is None or live.pinned:
                continue
            error = self.adapters.error(name)
            if error is not None:
                failed.append(self._fail(request_id, f"adapter {name!r} could not be loaded: {error}"))
        return failed

    def _adapter_ready(self, seq: Sequence) -> bool:
        if seq.adapter is None:
            return True
        live = self._live.get(seq.request_id)
        if live is not None and live.pinned:
            return True
        # `request` when not resident: an adapter evicted while this sequence waited is loaded again
        # (a plain lookup otherwise, so each request counts one cache hit or miss, not one per step).
        if self.adapters.slot_of(seq.adapter) is None and self.adapters.request(seq.adapter) is None:
            return False
        # K/V depends on the adapter's weights: share cached prefixes only within one loaded identity.
        seq.cache_salt = f"{seq.adapter}\x00{self.adapters.identity_of(seq.adapter)}"
        return True

    def _pin(self, live: _Live) -> None:
        if live.pinned or live.seq.adapter is None:
            return
        self.adapters.pin(live.seq.adapter)
        live.slot = self.adapters.slot_of(live.seq.adapter)
        live.pinned = True

    def _unpin(self, live: _Live) -> None:
        if live.pinned:
            self.adapters.unpin(live.seq.adapter)
            live.pinned, live.slot = False, 0

    def _heads(self, live: _Live) -> Any | None:
        if self.adapters is None or live.seq.adapter is None:
            return None
        return self.adapters.heads(live.seq.adapter)

    def _speculating(self) -> bool:
        """Whether rows with heads draft at the current number of live sequences."""
        return len(self._live) <= self.config.speculative_max_batch

    def _plan_speculation(self) -> None:
        """Decide per sequence whether it drafts this step (the scheduler reserves blocks for it)."""
        speculate = self._speculating()
        for live in self._live.values():
            decoding = live.seq.status == SeqStatus.RUNNING and live.seq.num_computed == live.seq.num_tokens - 1
            live.seq.lookahead = len(live.drafts) if speculate and decoding and live.drafts else 0

    # ----- one forward --------------------------------------------------------------------------
    def _pack(self, scheduled: list[ScheduledSeq]) -> tuple[ForwardBatch, list[tuple[int, int]]]:
        """Tokens, positions and blocks of every scheduled sequence; `rows[i]` = (first row, count).

        Sequences are packed grouped by adapter slot (stable, so the scheduler's order holds within a
        slot): the LoRA rows of one adapter are then one contiguous run, which is what lets the
        segmented LoRA path (`LoraSlots.route`) multiply each row by its own adapter only."""
        tokens, starts, blocks, adapters = [], [], [], []
        rows: list[tuple[int, int]] = [(0, 0)] * len(scheduled)
        offset = 0
        order = sorted(range(len(scheduled)), key=lambda i: self._live[scheduled[i].seq.request_id].slot)
        for position in order:
            item = scheduled[position]
            seq, live = item.seq, self._live[item.seq.request_id]
            chunk = seq.all_ids[seq.num_computed: seq.num_computed + item.num_tokens]
            if item.samples and seq.lookahead:
                chunk = chunk + live.drafts[: seq.lookahead]
            tokens.append(chunk)
            starts.append(seq.num_computed)
            blocks.append(seq.blocks)
            adapters.append(live.slot)
            rows[position] = (offset, len(chunk))
            offset += len(chunk)
            if seq.num_computed < len(seq.prompt_ids):
                self.stats.prompt_tokens += min(item.num_tokens, len(seq.prompt_ids) - seq.num_computed)
        batch = ForwardBatch.build(tokens, starts, blocks, self.config.block_size, adapters, self.device)
        return batch, rows

    def _advance(self, scheduled: list[ScheduledSeq], rows: list[tuple[int, int]],
                 hidden: torch.Tensor) -> list[RequestOutput]:
        """Verify/sample every sequence that reached the end of its tokens; move the rest along."""
        sampling = [(item, start, count) for item, (start, count) in zip(scheduled, rows) if item.samples]
        for item, (start, count) in zip(scheduled, rows):
            if not item.samples:  # a prefill chunk short of the prompt's end: nothing to emit yet
                item.seq.num_computed += item.num_tokens
                self.scheduler.after_step(item.seq, item.seq.num_computed)
        if not sampling:
            return []
        # Logit rows: every position of a drafting chain, else the last position only.
        index = []
        for item, start, count in sampling:
            k = item.seq.lookahead
            index.extend(range(start + count - 1 - k, start + count))
        logits = self.model.logits(hidden[torch.tensor(index, device=self.device)])  # (M, V)
        greedy_tokens = logits.argmax(dim=-1).tolist()  # (M,) cheap, used by every greedy row
        outputs, cursor, draft_states, draft_owners = [], 0, [], []
        for item, start, count in sampling:
            seq, live = item.seq, self._live[item.seq.request_id]
            k = seq.lookahead
            drafts = live.drafts[:k]
            if live.generator is None:
                targets = greedy_tokens[cursor: cursor + k + 1]
                accepted = next((j for j in range(k) if targets[j] != drafts[j]), k)
                emitted = targets[: accepted + 1]
            else:
                result = verify(torch.tensor([drafts], dtype=torch.long, device=self.device),
                                logits[cursor: cursor + k + 1].unsqueeze(0),
                                temperature=seq.params.temperature, top_p=seq.params.top_p,
                                generator=live.generator)
                accepted = int(result.accepted[0])
                emitted = result.emitted(0)
            cursor += k + 1
            if k:
                self.stats.spec_drafts += 1
                self.stats.spec_draft_tokens += k
                self.stats.spec_accepted_tokens += accepted
            seq.num_computed += item.num_tokens + accepted  # x and the accepted drafts are in the cache
            output = self._emit(live, emitted)
            outputs.append(output)
            if output.finished:
                continue
            self.scheduler.after_step(seq, seq.num_computed)  # rolls back blocks past rejected drafts
            heads = self._heads(live)
            if heads is not None:
                draft_states.append(hidden[start + count - 1 - k + accepted])
                draft_owners.append((live, heads))
            else:
                live.drafts = []
        if self._speculating():
            self._draft(draft_states, draft_owners)
        else:  # nobody verifies drafts next step: skip the heads
            for live, _ in draft_owners:
                live.drafts = []
        return outputs

    def _emit(self, live: _Live, tokens: list[int]) -> RequestOutput:
        """Append `tokens` up to the request's budget and first stop token; finish it if done."""
        seq, params = live.seq, live.seq.params
        budget = params.max_new_tokens - len(seq.output_ids)
        tokens = tokens[:budget]
        reason: FinishReason | None = None
        stop_at = next((j for j, t in enumerate(tokens) if t in params.stop_token_ids), None)
        if stop_at is not None:
            tokens, reason = tokens[:stop_at], "stop"
        elif len(tokens) == budget:
            reason = "length"
        seq.output_ids.extend(tokens)
        key = seq.adapter or ""
        self.stats.generation_tokens += len(tokens)
        self.stats.tokens_by_adapter[key] = self.stats.tokens_by_adapter.get(key, 0) + len(tokens)
        if reason is not None:
            status = SeqStatus.FINISHED_STOP if reason == "stop" else SeqStatus.FINISHED_LENGTH
            self.scheduler.finish(seq, status)
            self._live.pop(seq.request_id, None)
            self._unpin(live)
        return RequestOutput(request_id=seq.request_id, new_token_ids=tokens, finished=reason is not None,
                             finish_reason=reason, num_prompt_tokens=len(seq.prompt_ids),
                             num_output_tokens=len(seq.output_ids))

    def _draft(self, states: list[torch.Tensor], owners: list[tuple[_Live, Any]]) -> None:
        """Next step's drafts: each row's heads over the state that produced its newest token.

        Rows sharing heads (the same adapter) go through the heads together; all head states then
        share one LM-head call, whose cost on CPU is mostly reading the (V × d) weight once.
        """
        if not states:
            return
        groups: dict[int, list[int]] = {}
        for i, (_, heads) in enumerate(owners):
            groups.setdefault(id(heads), []).append(i)
        head_states, order = [], []
        for members in groups.values():
            heads = owners[members[0]][1]
            stacked = torch.stack([states[i] for i in members])  # (n, d)
            head_dtype = next(heads.parameters()).dtype
            head_states.append(heads(stacked.to(head_dtype)).to(self.dtype).transpose(0, 1))  # (n, K, d)
            order.extend(members)
        flat = torch.cat([s.reshape(-1, s.shape[-1]) for s in head_states])  # (Σ n·K, d)
        drafts = self.model.logits(flat).argmax(dim=-1).tolist()
        cursor = 0
        for (members, hs) in zip(groups.values(), head_states):
            k = hs.shape[1]
            for i in members:
                owners[i][0].drafts = drafts[cursor: cursor + k]
                cursor += k

    def _fail(self, request_id: str, message: str) -> RequestOutput:
        live = self._live.pop(request_id)
        self.scheduler.abort(request_id)
        self._unpin(live)
        return RequestOutput(request_id=request_id, new_token_ids=[], finished=True, finish_reason="error",
                             error=message, num_prompt_tokens=len(live.seq.prompt_ids),
                             num_output_tokens=len(live.seq.output_ids))

