"""The speculative-decoding benchmark: our plain and speculative decoding against Hugging Face's.

For each prompt, in turn, each decoder produces a greedy continuation at batch 1: the serving engine
with the adapter's heads off and on (the decoder the service runs, when the engine takes the model),
our HF-model loop (`models.decoding`) off and on, transformers `generate`, and `generate` with
prompt-lookup decoding. Interleaving per prompt means all see the same machine conditions, so their
ratios are meaningful on a shared, noisy CPU. Speculative greedy output must be token-for-token equal
to plain greedy output: `greedy_identical_fraction` reports it.

`tau` and `speedup` (what the promotion gate's `min_speedup` judges) are the engine's: in the HF loop a
1+4-token verification costs ~1.6-1.9x a plain step, on the engine ~1.1x, so the loop understates what
the heads buy where they serve (a free-text adapter: tau 2.26 showed as 1.17x). The loop's figures stay
beside them (`tau_hf_loop`, `speedup_hf_loop`) as the baseline, and are `tau`/`speedup` when no engine
was given.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from lorafleet.models.decoding import DecodeStats, generate
from lorafleet.models.loss import unwrap_causal_lm
from lorafleet.models.sampling_rules import cut_at_stop, eos_token_ids
from lorafleet.models.turbo_heads import medusa1_equivalent_parameters

PLAIN, SPECULATIVE, HF_GENERATE, HF_PROMPT_LOOKUP = "plain", "speculative", "hf_generate", "hf_prompt_lookup"
ENGINE_PLAIN, ENGINE_SPECULATIVE = "engine_plain", "engine_speculative"
DECODERS = (PLAIN, SPECULATIVE, HF_GENERATE, HF_PROMPT_LOOKUP)


@dataclass
class SpeculativeReport:
    """Everything `lorafleet bench speculative` writes; field names are the JSON keys."""

    n_prompts: int
    device: str
    num_heads: int
    max_new_tokens: int
    tau: float
    per_head_acceptance: list[float]
    accepted_histogram: list[int]
    tokens_per_s_plain: float
    tokens_per_s_speculative: float
    speedup: float
    tokens_per_s_hf_generate: float
    tokens_per_s_hf_prompt_lookup: float
    speedup_vs_hf_generate: float
    speedup_vs_hf_prompt_lookup: float
    greedy_identical_fraction: float
    head_params: int
    medusa1_equivalent_params: int
    head_params_fraction_of_medusa1: float
    prompt_lookup_num_tokens: int
    generated_tokens: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    decoder: str = "hf_loop"  # where tau and speedup were measured: "engine" or "hf_loop"
    tau_hf_loop: float = 0.0
    speedup_hf_loop: float = 0.0
    tokens_per_s_engine_plain: float | None = None
    tokens_per_s_engine_speculative: float | None = None
    greedy_identical_fraction_engine: float | None = None  # engine speculative vs engine plain

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def as_metrics(self) -> dict[str, float]:
        """Flat numbers for MLflow and the promotion gate (`speedup` is what the gate reads)."""
        metrics = {name: float(getattr(self, name)) for name in (
            "tau", "speedup", "tokens_per_s_plain", "tokens_per_s_speculative", "tokens_per_s_hf_generate",
            "tokens_per_s_hf_prompt_lookup", "speedup_vs_hf_prompt_lookup", "greedy_identical_fraction",
            "head_params", "head_params_fraction_of_medusa1", "tau_hf_loop", "speedup_hf_loop",
            "tokens_per_s_engine_plain", "tokens_per_s_engine_speculative", "greedy_identical_fraction_engine")
            if getattr(self, name) is not None}
        metrics.update({f"head{k}_acceptance": rate for k, rate in enumerate(self.per_head_acceptance, start=1)})
        return metrics


def measure_speculative(model: Any, heads: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], *,
                        max_new_tokens: int, prompt_lookup_num_tokens: int = 10, warmup: int = 1,
                        progress: bool = True, engine: Any = None) -> SpeculativeReport:
    """Greedy, batch 1, one prompt at a time through every decoder (see module docstring). `engine`:
    an `EngineScorer` holding the same adapter (base copied before PEFT wrapped `model`), or None."""
    if not prompts:
        raise ValueError("measure_speculative needs at least one prompt")
    eos = list(eos_token_ids(model, tokenizer))
    engine_stats = {ENGINE_PLAIN: [0, 0], ENGINE_SPECULATIVE: [0, 0]}  # drafting steps, accepted drafts

    def on_engine(name: str, ids: Sequence[int]) -> tuple[list[int], None]:
        tokens, drafts, accepted = engine.decode_one(ids, max_new_tokens=max_new_tokens,
                                                     speculative=name == ENGINE_SPECULATIVE)
        engine_stats[name][0] += drafts
        engine_stats[name][1] += accepted
        return tokens, None

    runners = {
        PLAIN: lambda ids: _ours(model, None, ids, max_new_tokens, eos),
        SPECULATIVE: lambda ids: _ours(model, heads, ids, max_new_tokens, eos),
        HF_GENERATE: lambda ids: _hf(model, tokenizer, ids, max_new_tokens, eos, {}),
        HF_PROMPT_LOOKUP: lambda ids: _hf(model, tokenizer, ids, max_new_tokens, eos,
                                          {"prompt_lookup_num_tokens": prompt_lookup_num_tokens}),
    }
    if engine is not None:
        runners[ENGINE_PLAIN] = lambda ids: on_engine(ENGINE_PLAIN, ids)
        runners[ENGINE_SPECULATIVE] = lambda ids: on_engine(ENGINE_SPECULATIVE, ids)
    decoders = tuple(runners)
    for ids in prompts[:warmup]:  # untimed: first calls pay for allocation and kernel selection
        for run in runners.values():
            run(ids)
    engine_stats = {ENGINE_PLAIN: [0, 0], ENGINE_SPECULATIVE: [0, 0]}  # the warm-up does not count
    tokens = dict.fromkeys(decoders, 0)
    seconds = dict.fromkeys(decoders, 0.0)
    stats = DecodeStats(num_heads=heads.num_heads)
    identical = identical_engine = 0
    for index, ids in enumerate(tqdm(prompts, desc="speculative benchmark", unit="prompt", disable=not progress)):
        outputs = {}
        shift = index % len(decoders)
        for name in decoders[shift:] + decoders[:shift]:  # rotate who goes first
            started = time.perf_counter()
            outputs[name] = runners[name](ids)
            seconds[name] += time.perf_counter() - started
            tokens[name] += len(outputs[name][0])
        identical += outputs[SPECULATIVE][0] == outputs[PLAIN][0]
        if engine is not None:
            identical_engine += outputs[ENGINE_SPECULATIVE][0] == outputs[ENGINE_PLAIN][0]
        stats.accepted_per_step.extend(outputs[SPECULATIVE][1].accepted_per_step)
    rate = {name: tokens[name] / max(seconds[name], 1e-9) for name in decoders}
    speedup_loop = rate[SPECULATIVE] / rate[PLAIN]
    tau, speedup, decoder, served = stats.tau, speedup_loop, "hf_loop", SPECULATIVE
    if engine is not None:
        drafts, accepted = engine_stats[ENGINE_SPECULATIVE]
        tau = 1 + accepted / drafts if drafts else 1.0
        speedup, decoder, served = rate[ENGINE_SPECULATIVE] / rate[ENGINE_PLAIN], "engine", ENGINE_SPECULATIVE
    trials, accepts = stats.head_trials, stats.head_accepts
    lm_head = unwrap_causal_lm(model).get_output_embeddings()
    medusa = medusa1_equivalent_parameters(heads.num_heads, lm_head.weight.shape[1], lm_head.weight.shape[0])
    return SpeculativeReport(
        n_prompts=len(prompts), device=str(lm_head.weight.device), num_heads=heads.num_heads,
        max_new_tokens=max_new_tokens, tau=tau,
        per_head_acceptance=[a / t if t else 0.0 for a, t in zip(accepts, trials, strict=True)],
        accepted_histogram=stats.accepted_histogram(),
        tokens_per_s_plain=rate[PLAIN], tokens_per_s_speculative=rate[SPECULATIVE],
        speedup=speedup,
        tokens_per_s_hf_generate=rate[HF_GENERATE], tokens_per_s_hf_prompt_lookup=rate[HF_PROMPT_LOOKUP],
        speedup_vs_hf_generate=rate[served] / rate[HF_GENERATE],
        speedup_vs_hf_prompt_lookup=rate[served] / rate[HF_PROMPT_LOOKUP],
        greedy_identical_fraction=identical / len(prompts),
        head_params=heads.num_parameters(), medusa1_equivalent_params=medusa,
        head_params_fraction_of_medusa1=heads.num_parameters() / medusa,
        prompt_lookup_num_tokens=prompt_lookup_num_tokens, generated_tokens=tokens, seconds=seconds,
        decoder=decoder, tau_hf_loop=stats.tau, speedup_hf_loop=speedup_loop,
        tokens_per_s_engine_plain=rate.get(ENGINE_PLAIN), tokens_per_s_engine_speculative=rate.get(ENGINE_SPECULATIVE),
        greedy_identical_fraction_engine=identical_engine / len(prompts) if engine is not None else None,
    )


def _ours(model: Any, heads: Any | None, ids: Sequence[int], max_new_tokens: int,
          eos: list[int]) -> tuple[list[int], DecodeStats]:
    result = generate(model, [list(ids)], max_new_tokens=max_new_tokens, eos_token_ids=eos, heads=heads,
                      speculative=heads is not None)
    return result.tokens[0], result.stats


def _hf(model: Any, tokenizer: Any, ids: Sequence[int], max_new_tokens: int, eos: list[int],
        extra: dict[str, Any]) -> tuple[list[int], None]:
    device = unwrap_causal_lm(model).get_output_embeddings().weight.device
    input_ids = torch.tensor([list(ids)], device=device)
    with torch.inference_mode():
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                max_new_tokens=max_new_tokens, eos_token_id=eos,
                                pad_token_id=tokenizer.pad_token_id, **extra)
    new = output[0, input_ids.shape[1]:].tolist()
    return cut_at_stop(new, len(new), eos)[0], None  # stop at the first end token, as our decoder does
