"""Scoring generation on the serving engine: every prompt through continuous batching.

`generate_texts` (Hugging Face `generate` in static, length-sorted batches) stops every batch at its
longest answer and pads the rest, and runs the generic transformers forward: scoring the 1,083 ViGGO
test rows took ~33 min. Here the same prompts go through the engine the service runs (one base model,
the adapter in a LoRA slot, up to `max_num_seqs` sequences decoding together, a finished row replaced by
the next prompt at once). Greedy outputs are the same (tests hold both paths to it on a tiny model);
`generate_texts` stays as the measured baseline (`evaluation.generator: hf`).

The base model's weights are copied into the engine's compact model before PEFT wraps the transformers
model, so one loaded base serves the base and adapter variants of an evaluation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

from tqdm.auto import tqdm

from lorafleet.evaluation.generation import GenerationResult
from lorafleet.models.adapter_dir import has_lora
from lorafleet.models.grammar import CompiledGrammar
from lorafleet.models.lora_weights import read_peft_adapter
from lorafleet.serving.engine.adapter_cache import AdapterCache, AdapterNotFound, ResolvedAdapter
from lorafleet.serving.engine.config import EngineConfig, SpeculationMode, WeightFormat
from lorafleet.serving.engine.engine import Engine
from lorafleet.serving.engine.lora_slots import LoraSlots
from lorafleet.serving.engine.model import CompactLlama
from lorafleet.serving.engine.sequence import SamplingParams


class EngineScorer:
    """Greedy completions of many prompts on one base model and, optionally, one LoRA adapter.

    Build it from the plain transformers base model (before PEFT injects LoRA layers into it);
    `generate(prompts, adapter=True)` uses the adapter, `adapter=False` the base model."""

    def __init__(self, hf_base: Any, tokenizer: Any, adapter_dir: Path | None, *, eos_token_ids: Sequence[int],
                 config: EngineConfig | None = None, weight_format: WeightFormat = "dense",
                 dtype: Any = None) -> None:
        if not eos_token_ids:
            raise ValueError("EngineScorer needs at least one end-of-sequence token id")
        self.tokenizer = tokenizer
        self.model = CompactLlama.from_hf(hf_base, weight_format=weight_format, dtype=dtype)
        self.config = config or EngineConfig(weights=weight_format)
        self.stops = frozenset(int(token) for token in eos_token_ids)
        self.adapter_dir = Path(adapter_dir) if adapter_dir is not None else None
        cache = None
        if self.adapter_dir is not None:
            shape = self.model.shape
            # a bad adapter fails here, before decoding; a heads-only (Turbo) adapter needs one rank-1 slot
            rank = read_peft_adapter(self.adapter_dir, shape).rank if has_lora(self.adapter_dir) else 1
            weight = self.model.lm_head_weight
            slots = LoraSlots(shape, 1, rank, dtype=weight.dtype, device=weight.device)
            cache = AdapterCache(slots, shape, self._resolve)
        self.cache = cache
        self.engine = Engine(self.model, self.config, adapters=cache)

    def _resolve(self, name: str) -> ResolvedAdapter:
        if self.adapter_dir is None or name != "adapter":
            raise AdapterNotFound(name)
        return ResolvedAdapter(name=name, identity=str(self.adapter_dir), path=self.adapter_dir)

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, adapter: bool,
                 progress: bool = True, desc: str = "", grammar: CompiledGrammar | None = None
                 ) -> list[GenerationResult]:
        """Complete every prompt greedily; results in input order, shaped like `generate_texts`'.
        With `grammar`, every completion is constrained to it (structured output)."""
        if adapter and self.adapter_dir is None:
            raise ValueError("this EngineScorer was built without an adapter")
        params = SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=self.stops)
        name = "adapter" if adapter else None
        tokens: dict[int, list[int]] = {}
        reasons: dict[int, str | None] = {}
        pending = list(enumerate(prompts))[::-1]  # popped from the end: input order
        queue_room = self.config.max_waiting
        with tqdm(total=len(prompts), desc=desc or "generate (engine)", unit="prompt", disable=not progress) as bar:
            while pending or self.engine.has_unfinished():
                while pending and self.engine.num_waiting() < queue_room:
                    index, prompt = pending.pop()
                    try:
                        self.engine.add_request(str(index), [int(t) for t in prompt], params, name,
                                                grammar=grammar.matcher() if grammar is not None else None)
                    except (ValueError, TypeError) as error:  # e.g. longer than the model's context
                        raise ValueError(f"prompt {index}: the engine refused it: {error}") from error
                    tokens[index] = []
                for out in self.engine.step():
                    index = int(out.request_id)
                    if out.error is not None:
                        raise RuntimeError(f"prompt {index}: the engine failed it: {out.error}")
                    tokens[index].extend(out.new_token_ids)
                    if out.finished:
                        reasons[index] = out.finish_reason
                        bar.update(1)
        return [self._result(tokens[i], reasons.get(i)) for i in range(len(prompts))]

    def decode_one(self, prompt: Sequence[int], *, max_new_tokens: int, speculative: bool,
                   grammar: CompiledGrammar | None = None) -> tuple[list[int], int, int]:
        """One request alone on the adapter, greedy, with its Turbo heads drafting or not: (tokens
        before the stop token, verification steps that carried drafts, draft tokens accepted). Each call
        starts from an empty prefix cache, so a timed call never reuses the K/V of an earlier one."""
        if self.adapter_dir is None:
            raise ValueError("this EngineScorer was built without an adapter")
        engine = self.engine
        drafts, accepted = engine.stats.spec_drafts, engine.stats.spec_accepted_tokens
        tokens: list[int] = []
        with self.speculation("on" if speculative else "off"):
            engine.add_request("decode-one", [int(t) for t in prompt],
                               SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=self.stops), "adapter",
                               grammar=grammar.matcher() if grammar is not None else None)
            while engine.has_unfinished():
                for out in engine.step():
                    if out.error is not None:
                        raise RuntimeError(f"the engine failed the request: {out.error}")
                    tokens.extend(out.new_token_ids)
        return tokens, engine.stats.spec_drafts - drafts, engine.stats.spec_accepted_tokens - accepted

    @contextmanager
    def speculation(self, mode: SpeculationMode) -> Iterator[None]:
        """Run timed requests with speculation `mode` from an empty prefix cache (a timed run never
        reuses an earlier run's K/V); the configured mode is back afterwards, whatever happened."""
        self.engine.allocator.forget_cached()
        self.engine.policy.mode = mode
        try:
            yield
        finally:
            self.engine.policy.mode = self.config.speculation

    def _result(self, kept: list[int], reason: str | None) -> GenerationResult:
        """The engine never emits the stop token (it counts against the budget, as in `generate`)."""
        hit_eos = reason == "stop"
        return GenerationResult(text=self.tokenizer.decode(kept, skip_special_tokens=True), token_ids=kept,
                                n_tokens=len(kept) + 1 if hit_eos else len(kept), hit_eos=hit_eos)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
