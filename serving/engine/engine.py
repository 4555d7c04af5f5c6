"""The engine: continuous batching of requests for many adapters over one base model.

The tiny API of STYLE rule 6: `add_request`, `abort`, `step() -> outputs`. Each `step` asks the
scheduler (policy) what to run, packs every scheduled sequence's tokens into one `ForwardBatch`
(prefill chunks, plain decodes and speculative `[x, d_1..d_K]` chains side by side, each row with its
own adapter slot), runs one forward and one LM-head call, then verifies drafts, samples, appends,
rolls the KV cache back past rejected drafts and reports new tokens.

Speculation uses each sequence's own adapter heads (rows without heads decode one token); whether a
step drafts is decided by measured gain (`speculation_policy.py`: each adapter's acceptance against the
cost of a drafting step vs a plain one at this batch size), since once the batch is compute-bound
verifying extra tokens stops paying, at a batch size that depends on the machine. Greedy stays
token-for-token identical to plain decoding because verification keeps only tokens the target itself
picks (`models.speculative`).

The engine is single-threaded on purpose: the async front (`serving/generation/engine_generator.py`) owns
the thread that calls `step`, and adapter loading happens elsewhere but is installed here, between forwards.

Isolation (one tenant never hurts another): `add_request` checks everything before it changes any
state. In `step`, what one request or adapter causes fails that request only: per-row work is guarded
row by row, non-finite logits end their row with an error, and a shared forward that raises is rerun
one sequence at a time so only those that still raise fail (`isolation.py`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from lorafleet.models.grammar import GrammarMatcher, apply_masks, grammar_bitmask
from lorafleet.models.sampling_rules import TOKEN_ID_MAX, InvalidRequest, cut_at_stop
from lorafleet.models.speculative import verify
from lorafleet.models.thread_tuning import ThreadTuner
from lorafleet.serving.engine.config import EngineConfig
from lorafleet.serving.engine.isolation import (
    NonFiniteValues,
    RowLogits,
    describe,
    draft_rows,
    row_logits,
    run_isolated,
)
from lorafleet.serving.engine.kv_cache import BlockAllocator, KVPool
from lorafleet.serving.engine.lora_slots import LoraSlots
from lorafleet.serving.engine.model import CompactLlama, ForwardBatch
from lorafleet.serving.engine.scheduler import QueueFull, ScheduledSeq, Scheduler
from lorafleet.serving.engine.sequence import SamplingParams, SeqStatus, Sequence, check_prompt
from lorafleet.serving.engine.speculation_policy import SpeculationPolicy, bucket

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "abort", "error"]


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
    spec_decisions_on: int = 0  # steps whose rows with heads drafted (the policy's count, copied per step)
    spec_decisions_off: int = 0  # steps whose rows with heads did not
    spec_tau_by_adapter: dict[str, float] = field(default_factory=dict)  # the policy's running tau ("" = base)
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
    grammar: GrammarMatcher | None = None  # structured output: what the output may be (models/grammar.py)


class Engine:
    """One base model, many adapters, one batch. Not thread-safe: one thread calls it."""

    def __init__(self, model: CompactLlama, config: EngineConfig | None = None, *,
                 adapters: Any | None = None, lora: LoraSlots | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 timer: Callable[[], float] = time.perf_counter) -> None:
        """`clock` seeds unseeded sampling; `timer` measures step costs for the speculation policy."""
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
                                   # every running sequence needs a token per step
                                   max_tokens_per_step=max(self.config.max_tokens_per_step,
                                                           self.config.max_num_seqs),
                                   max_waiting=self.config.max_waiting,
                                   prefix_caching=self.config.prefix_caching)
        self.adapters = adapters  # an AdapterCache, or None: base model only
        self.lora = lora if lora is not None else getattr(adapters, "slots", None)
        self.stats = EngineStats()
        self.clock, self.timer = clock, timer
        self.policy = SpeculationPolicy(self.config.speculation)
        # CPU threads follow the measured step time (contention); None on CUDA or when turned off.
        self.threads = ThreadTuner() if self.config.thread_tuning and self.device.type == "cpu" else None
        if self.config.compile_decode:  # compile now, not on the first request (module compiled_decode)
            model.compile_decode().warm_up()
        self._draft_next = False  # the policy's decision for the next step's rows with heads
        self._draft_seconds = 0.0  # time the heads took this step (a drafting step's extra cost)
        self._live: dict[str, _Live] = {}
        self._seeds = itertools.count(1)
        self._unresolvable: dict[str, str] = {}  # request id -> why its adapter name no longer resolves
        self._bitmasks: dict[int, torch.Tensor] = {}  # grammar mask buffers by (rows, width), reused per step

    # ----- the API ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    adapter: str | None = None, grammar: GrammarMatcher | None = None) -> None:
        """Queue a request, all or nothing: every check runs and every object that can fail (the
        sequence, the RNG, the adapter lookup) is built before any state changes, so a refused request
        (InvalidRequest, QueueFull, AdapterNotFound) leaves the engine exactly as it was.

        `grammar` (a fresh matcher of a compiled response format) constrains every token the request
        samples, drafts included: its Turbo drafts are cut where the grammar stops accepting them, and
        verification compares them with the target's masked choices, so constrained output is the same
        with and without speculation."""
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {type(request_id).__name__}")
        if request_id in self._live:
            raise ValueError(f"request_id {request_id!r} is already live")
        if not isinstance(params, SamplingParams):
            raise InvalidRequest(f"params must be a SamplingParams, got {type(params).__name__}")
        if adapter is not None and (not isinstance(adapter, str) or not adapter):
            raise InvalidRequest("adapter must be a non-empty string or None", param="adapter")
        prompt = check_prompt(prompt_ids, params, vocab_size=self.model.shape.vocab_size,
                              limits=((self.model.shape.max_position_embeddings, "the model's context length"),
                                      (self.scheduler.capacity_tokens, "the KV cache's capacity")))
        if self.scheduler.num_waiting() >= self.scheduler.max_waiting:
            raise QueueFull(f"request {request_id!r} refused: {self.scheduler.num_waiting()} requests already "
                            f"waiting (max_waiting={self.scheduler.max_waiting})")
        seq = Sequence(request_id=request_id, prompt_ids=prompt, params=params, adapter=adapter)
        generator = self._generator(params)
        if adapter is not None:
            if self.adapters is None:
                raise LookupError(f"adapter {adapter!r} requested but this engine serves the base model only")
            self.adapters.request(adapter)  # AdapterNotFound now; otherwise starts loading on a miss
        # State changes from here on; nothing below refuses a request the checks above accepted.
        self.scheduler.add(seq)
        self._live[request_id] = _Live(seq=seq, generator=generator, grammar=grammar)
        key = adapter or ""
        self.stats.requests_by_adapter[key] = self.stats.requests_by_adapter.get(key, 0) + 1

    def _generator(self, params: SamplingParams) -> torch.Generator | None:
        """The request's own RNG (None for greedy); seeded from the clock when the request gives no seed."""
        if params.temperature == 0:
            return None
        seed = params.seed if params.seed is not None else (next(self._seeds) + int(self.clock() * 1e6)) % TOKEN_ID_MAX
        try:
            return torch.Generator(device=self.device).manual_seed(int(seed))
        except (RuntimeError, ValueError, OverflowError) as error:
            raise InvalidRequest(f"seed {seed} is not accepted by the engine's RNG: {error}", param="seed") from error

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
        """One scheduling decision, one forward, one LM-head call; outputs of every touched request.

        A failure caused by one request or adapter fails that request only (see the module docstring)."""
        outputs = self._install_adapters()
        self._draft_seconds = 0.0
        self._plan_speculation()
        plan = self.scheduler.schedule(self._adapter_ready)
        outputs.extend(self._fail_unresolvable())
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
        scheduled = []
        for item in plan.scheduled:
            failure = self._pin(self._live[item.seq.request_id])
            if failure is None:
                scheduled.append(item)
            else:
                outputs.append(self._fail(item.seq.request_id, failure))
        if not scheduled:
            return outputs
        # A pure decode step (every row feeds its next token, maybe with drafts) is a sample of the
        # step cost the speculation policy weighs; prefill chunks would blur it.
        decode_only = all(item.samples and item.num_tokens == 1 for item in scheduled)
        verifying = any(item.seq.lookahead > 0 for item in scheduled)
        kind = ("decode", bucket(len(scheduled)), verifying) if decode_only else \
            ("mixed", bucket(sum(item.num_tokens for item in scheduled)))
        if self.threads is not None:
            self.threads.threads(kind)
        started = self.timer()
        scheduled, rows, hidden, failed = self._forward(scheduled)
        outputs.extend(failed)
        if not scheduled:
            return outputs
        self.stats.steps += 1
        self.stats.last_batch_size = len(scheduled)
        outputs.extend(self._advance(scheduled, rows, hidden))
        if not failed:
            elapsed = self.timer() - started
            if decode_only:
                self.policy.observe_step(len(scheduled), verifying, elapsed - self._draft_seconds)
            if self.threads is not None:
                self.threads.observe(kind, elapsed)
        return outputs

    def _forward(self, scheduled: list[ScheduledSeq]
                 ) -> tuple[list[ScheduledSeq], list[tuple[int, int]], torch.Tensor | None, list[RequestOutput]]:
        """One forward of every scheduled sequence; if it raises, one forward per sequence.

        Rerunning is safe: a forward writes K/V only at positions >= each sequence's `num_computed`, in
        blocks it holds alone (prefix-cache hits end before `num_computed`; registration waits for
        `after_step`), and nothing counts those positions as computed until `_advance`, so a rerun just
        rewrites them. Returns the sequences that ran, their (first row, count) in `hidden`, and the
        failures of those that raised on their own."""
        def run(items: list[ScheduledSeq]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
            batch, rows = self._pack(items)
            return self.model(batch, self.kv, self.lora), rows  # (N, d)

        result = run_isolated(scheduled, run)
        failed = [self._fail(item.seq.request_id, f"the forward pass failed for this request "
                                                  f"({self._what(item.seq)}): {describe(error)}")
                  for item, error in result.failures]
        return result.kept, result.rows, result.hidden, failed

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
        try:
            # `request` when not resident: an adapter evicted while this sequence waited is loaded again
            # (a plain lookup otherwise, so each request counts one cache hit or miss, not one per step).
            if self.adapters.slot_of(seq.adapter) is None and self.adapters.request(seq.adapter) is None:
                return False
        except Exception as error:  # noqa: BLE001 - e.g. the name was removed while the request waited
            # Failed after `schedule` returns: the scheduler is iterating its queue right now.
            self._unresolvable[seq.request_id] = f"adapter {seq.adapter!r} cannot be loaded: {describe(error)}"
            return False
        # K/V depends on the adapter's weights: share cached prefixes only within one loaded identity.
        seq.cache_salt = f"{seq.adapter}\x00{self.adapters.identity_of(seq.adapter)}"
        return True

    def _fail_unresolvable(self) -> list[RequestOutput]:
        failed = [self._fail(request_id, message) for request_id, message in self._unresolvable.items()
                  if request_id in self._live]
        self._unresolvable.clear()
        return failed

    def _pin(self, live: _Live) -> str | None:
        """Pin the adapter of a scheduled sequence; a reason to fail it when its slot vanished meanwhile."""
        if live.pinned or live.seq.adapter is None:
            return None
        self.adapters.pin(live.seq.adapter)
        slot = self.adapters.slot_of(live.seq.adapter)
        if slot is None:  # unloaded by another thread between scheduling and pinning
            self.adapters.unpin(live.seq.adapter)
            return f"adapter {live.seq.adapter!r} was unloaded while this request was being scheduled"
        live.slot, live.pinned = slot, True
        return None

    def _unpin(self, live: _Live) -> None:
        if live.pinned:
            self.adapters.unpin(live.seq.adapter)
            live.pinned, live.slot = False, 0

    def _heads(self, live: _Live) -> Any | None:
        if self.adapters is None or live.seq.adapter is None:
            return None
        return self.adapters.heads(live.seq.adapter)

    def _plan_speculation(self) -> None:
        """Per sequence, whether it verifies drafts this step (the scheduler reserves blocks for them):
        those drafted last step, when the policy decided so then."""
        for live in self._live.values():
            decoding = live.seq.status == SeqStatus.RUNNING and live.seq.num_computed == live.seq.num_tokens - 1
            live.seq.lookahead = len(live.drafts) if self._draft_next and decoding and live.drafts else 0

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
        batch = ForwardBatch.build(tokens, starts, blocks, self.config.block_size, adapters, self.device)
        return batch, rows

    def _advance(self, scheduled: list[ScheduledSeq], rows: list[tuple[int, int]],
                 hidden: torch.Tensor) -> list[RequestOutput]:
        """Verify/sample every sequence that reached the end of its tokens; move the rest along.

        Each row's work is guarded on its own: whatever one row raises fails that request only."""
        outputs: list[RequestOutput] = []
        sampling = []
        for item, (start, count) in zip(scheduled, rows):
            seq = item.seq
            if seq.num_computed < len(seq.prompt_ids):
                self.stats.prompt_tokens += min(item.num_tokens, len(seq.prompt_ids) - seq.num_computed)
            if item.samples:
                sampling.append((item, start, count))
                continue
            try:  # a prefill chunk short of the prompt's end: nothing to emit yet
                self.scheduler.after_step(seq, seq.num_computed + item.num_tokens)
            except Exception as error:  # noqa: BLE001 - this request's own failure
                outputs.append(self._fail_row(seq, error))
        if not sampling:
            return outputs
        # Logit rows: every position of a drafting chain, else the last position only.
        spans = [(start + count - 1 - item.seq.lookahead, item.seq.lookahead + 1) for item, start, count in sampling]
        logits = row_logits(self.model.logits, hidden, spans)  # per row, or the exception computing it raised
        draft_states, draft_owners = [], []
        for (item, start, count), row in zip(sampling, logits):
            seq, live = item.seq, self._live[item.seq.request_id]
            try:
                output, accepted = self._sample_row(item, live, row)
            except Exception as error:  # noqa: BLE001 - this request's own failure
                outputs.append(self._fail_row(seq, error))
                continue
            outputs.append(output)
            if output.finished:
                continue
            heads = self._heads(live)
            if heads is not None:
                draft_states.append(hidden[start + count - 1 - seq.lookahead + accepted])
                draft_owners.append((live, heads))
            else:
                live.drafts = []
        batch = min(len(self._live), self.config.max_num_seqs)  # rows of the next step, about
        self._draft_next = self.policy.decide(batch, [live.seq.adapter for live, _ in draft_owners])
        self.stats.spec_decisions_on, self.stats.spec_decisions_off = (self.policy.decisions["on"],
                                                                       self.policy.decisions["off"])
        if self._draft_next:
            started = self.timer()
            failures = self._draft(draft_states, draft_owners)
            self._draft_seconds = self.timer() - started
            if draft_states:
                self.policy.observe_drafting(batch, self._draft_seconds)
            for i, output in enumerate(outputs):
                if output.request_id in failures and output.request_id in self._live:
                    failed = self._fail(output.request_id, failures[output.request_id])
                    outputs[i] = dataclasses.replace(failed, new_token_ids=output.new_token_ids)
        else:  # nobody verifies drafts next step: skip the heads
            for live, _ in draft_owners:
                live.drafts = []
        return outputs

    def _sample_row(self, item: ScheduledSeq, live: _Live, row: RowLogits | Exception) -> tuple[RequestOutput, int]:
        """Verify the row's drafts and sample its next tokens from its (k+1, V) logits; append them."""
        if isinstance(row, Exception):
            raise row
        seq, (logits, targets, finite) = item.seq, row
        if not finite:  # garbage in every token it would sample (or a crash inside multinomial)
            raise NonFiniteValues(f"{self._what(seq)} produced non-finite values (NaN or Inf) for this request")
        k = seq.lookahead
        drafts = live.drafts[:k]
        if live.grammar is not None:  # only the draft prefix the grammar accepts can be verified
            logits, targets, drafts = self._constrain(live.grammar, logits, drafts)
        if live.generator is None:
            accepted = next((j for j in range(len(drafts)) if targets[j] != drafts[j]), len(drafts))
            emitted = targets[: accepted + 1]
        else:
            result = verify(torch.tensor([drafts], dtype=torch.long, device=self.device), logits.unsqueeze(0),
                            temperature=seq.params.temperature, top_p=seq.params.top_p, generator=live.generator)
            accepted = int(result.accepted[0])
            emitted = result.emitted(0)
        if k:
            self.stats.spec_drafts += 1
            self.stats.spec_draft_tokens += k
            self.stats.spec_accepted_tokens += accepted
            self.policy.observe_acceptance(seq.adapter, accepted)
            self.stats.spec_tau_by_adapter[seq.adapter or ""] = self.policy.tau(seq.adapter)
        seq.num_computed += item.num_tokens + accepted  # x and the accepted drafts are in the cache
        output = self._emit(live, emitted)
        if live.grammar is not None:
            for token in output.new_token_ids:  # sampled under the masks: the grammar must take each one
                if not live.grammar.accept(token):
                    raise RuntimeError(f"the grammar refused token {token}, sampled under its own mask")
        if not output.finished:
            self.scheduler.after_step(seq, seq.num_computed)  # rolls back blocks past rejected drafts
        return output, accepted

    def _constrain(self, grammar: GrammarMatcher, logits: torch.Tensor,
                   drafts: list[int]) -> tuple[torch.Tensor, list[int], list[int]]:
        """Mask a row's (k+1, V) logits with the grammar at each draft position; the draft prefix the
        grammar accepts (n tokens) keeps n+1 masked rows and their greedy targets."""
        bitmask = grammar_bitmask(self._bitmasks, len(drafts) + 1, grammar)
        valid = grammar.fill_draft_masks(drafts, bitmask, 0)
        masked = apply_masks(logits[: valid + 1].clone(), bitmask[: valid + 1])  # (n+1, V)
        return masked, masked.argmax(dim=-1).tolist(), drafts[:valid]

    def _emit(self, live: _Live, tokens: list[int]) -> RequestOutput:
        """Append `tokens` up to the request's budget and first stop token; finish it if done."""
        seq, params = live.seq, live.seq.params
        tokens, reason = cut_at_stop(tokens, params.max_new_tokens - len(seq.output_ids), params.stop_token_ids)
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

    def _draft(self, states: list[torch.Tensor], owners: list[tuple[_Live, Any]]) -> dict[str, str]:
        """Next step's drafts: each row's heads over the state that produced its newest token
        (`isolation.draft_rows`); returns request id -> why, for rows whose heads failed."""
        if not states:
            return {}
        drafts, failures = draft_rows(states, [heads for _, heads in owners], self.model.logits, self.dtype)
        for (live, _), chain in zip(owners, drafts):
            chain = chain or []
            if live.grammar is not None and chain:  # a draft the grammar refuses would only be rejected
                chain = chain[: live.grammar.accepts_prefix(chain)]
            live.drafts = chain
        return {owners[i][0].seq.request_id: f"the Turbo heads of {self._what(owners[i][0].seq)} failed: "
                                             f"{describe(error)}" for i, error in failures.items()}

    def _what(self, seq: Sequence) -> str:
        return f"adapter {seq.adapter!r}" if seq.adapter is not None else "the base model"

    def _fail_row(self, seq: Sequence, error: Exception) -> RequestOutput:
        if not isinstance(error, NonFiniteValues):
            log.warning("request %s failed while sampling", seq.request_id, exc_info=error)
            return self._fail(seq.request_id, f"generation failed for this request ({self._what(seq)}): "
                                              f"{describe(error)}")
        return self._fail(seq.request_id, str(error))

    def _fail(self, request_id: str, message: str) -> RequestOutput:
        live = self._live.pop(request_id)
        self.scheduler.abort(request_id)
        self._unpin(live)
        return RequestOutput(request_id=request_id, new_token_ids=[], finished=True, finish_reason="error",
                             error=message, num_prompt_tokens=len(live.seq.prompt_ids),
                             num_output_tokens=len(live.seq.output_ids))

