"""Speculation modes side by side at several concurrencies: does `adaptive` ever lose to plain decoding?

The engine's speculation policy (serving/engine/speculation_policy.py) drafts in a step only while the
measured tokens per second of drafting steps beat plain steps at that batch size. Drafting pays at
batch 1 (a verification of 1+k tokens costs little more than one token) and stops paying as batches
grow (the step becomes compute-bound and rejected drafts are wasted rows). This bench runs the same
greedy requests, N at once, with speculation `off`, `adaptive` and `on` in interleaved rounds, and
reports tokens per second per mode: the claim is adaptive >= off at every N, and adaptive ~ on at 1.

Each N starts with one untimed adaptive run (the policy's moving averages at that batch size, as a
server has them after its first requests), and each timed run starts from an empty prefix cache.
Greedy outputs must be identical across modes (speculation never changes greedy tokens); the report
says whether they were.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lorafleet.serving.engine.sequence import SamplingParams

MODES = ("off", "adaptive", "on")


@dataclass
class ModeFigures:
    mode: str
    concurrency: int
    tokens_per_s: float  # median over rounds
    rounds_tokens_per_s: list[float] = field(default_factory=list)
    drafting_steps: int = 0  # steps whose rows with heads drafted, over the timed rounds
    plain_steps: int = 0  # steps whose rows with heads did not


@dataclass
class SpeculationModesReport:
    adapter: str
    concurrency: list[int]
    max_new_tokens: int
    rounds: int
    figures: list[ModeFigures]
    identical_outputs: bool  # every mode produced the same greedy tokens for every request

    def figure(self, mode: str, concurrency: int) -> ModeFigures:
        return next(f for f in self.figures if f.mode == mode and f.concurrency == concurrency)

    @property
    def ratios(self) -> dict[str, float]:
        """Per concurrency, adaptive's and on's tokens/s over off's (>= 1: not slower than plain)."""
        out = {}
        for n in self.concurrency:
            plain = self.figure("off", n).tokens_per_s
            for mode in ("adaptive", "on"):
                out[f"{mode}_vs_off_at_{n}"] = self.figure(mode, n).tokens_per_s / plain
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratios": self.ratios}


def run_requests(scorer: Any, prompts: Sequence[Sequence[int]], *, mode: str,
                 max_new_tokens: int) -> tuple[list[list[int]], float, int, int]:
    """All `prompts` at once on the scorer's adapter with speculation `mode`: (tokens per request,
    seconds, drafting steps, plain steps). The engine's configured mode is restored after."""
    engine = scorer.engine
    params = SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=scorer.stops)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    on, off = engine.policy.decisions["on"], engine.policy.decisions["off"]
    with scorer.speculation(mode):
        started = time.perf_counter()
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), [int(t) for t in prompt], params, "adapter")
        while engine.has_unfinished():
            for out in engine.step():
                if out.error is not None:
                    raise RuntimeError(f"request {out.request_id} failed: {out.error}")
                tokens[out.request_id].extend(out.new_token_ids)
        seconds = time.perf_counter() - started
    return ([tokens[str(i)] for i in range(len(prompts))], seconds, engine.policy.decisions["on"] - on,
            engine.policy.decisions["off"] - off)


def measure_speculation_modes(scorer: Any, prompts: Sequence[Sequence[int]], *, adapter: str,
                              concurrency: Sequence[int], max_new_tokens: int, rounds: int = 3,
                              progress: Callable[[str], None] = print) -> SpeculationModesReport:
    """Every mode at every concurrency N (requests: the first N prompts, cycled when fewer)."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    if not prompts:
        raise ValueError("no prompts to run")
    if not concurrency or min(concurrency) < 1:
        raise ValueError(f"concurrency levels must be >= 1, got {list(concurrency)}")
    figures, identical = [], True
    for n in concurrency:
        batch = [prompts[i % len(prompts)] for i in range(n)]
        run_requests(scorer, batch, mode="adaptive", max_new_tokens=max_new_tokens)  # the policy learns N
        rates: dict[str, list[float]] = {mode: [] for mode in MODES}
        steps = {mode: [0, 0] for mode in MODES}
        outputs: dict[str, list[list[int]]] = {}
        for round_no in range(1, rounds + 1):
            for mode in MODES:
                tokens, seconds, drafting, plain = run_requests(scorer, batch, mode=mode,
                                                                max_new_tokens=max_new_tokens)
                rates[mode].append(sum(map(len, tokens)) / seconds)
                steps[mode][0] += drafting
                steps[mode][1] += plain
                outputs.setdefault(mode, tokens)
                identical = identical and tokens == outputs["off" if "off" in outputs else mode]
                progress(f"N={n} round {round_no}/{rounds}: {mode} {rates[mode][-1]:.1f} tok/s "
                         f"({drafting} drafting / {plain} plain steps)")
        for mode in MODES:
            figures.append(ModeFigures(mode, n, statistics.median(rates[mode]), rates[mode], *steps[mode]))
    return SpeculationModesReport(adapter=adapter, concurrency=list(concurrency), max_new_tokens=max_new_tokens,
                                  rounds=rounds, figures=figures, identical_outputs=identical)
