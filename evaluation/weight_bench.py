"""Weight formats side by side: batch-1 decode speed and greedy agreement with the fp32 engine, and
llama.cpp on the same GGUF as the peer a laptop user would pick.

* Speed: one request alone, the mean time per token after the first (`engine_decode_ms_per_token`),
  each format measured in interleaved rounds (medians), with llama.cpp inside the same rounds.
* Agreement: the fp32 engine's greedy continuation of each prompt is fed, teacher-forced, to the other
  format; the figure is the fraction of positions where its argmax is the fp32 token. Teacher forcing
  counts each disagreement once (free-running decoding would count every token after a first
  divergence, which says more about the prompt than about the weights).
* llama.cpp (`llama-cpp-python`, an optional bench extra, never a runtime dependency) runs the GGUF the
  embedded model was converted from, with as many threads as torch uses; absent, the report says so.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorafleet.evaluation.engine_bench import engine_decode_ms_per_token
from lorafleet.serving.engine.attention import ForwardBatch
from lorafleet.serving.engine.config import EngineConfig
from lorafleet.serving.engine.engine import Engine
from lorafleet.serving.engine.model import CompactLlama
from lorafleet.serving.engine.sequence import SamplingParams

# What `bench weights` calls each format: (dtype of the weights for 'dense', EngineConfig.weights).
FORMATS: dict[str, tuple[torch.dtype | None, str]] = {
    "fp32": (torch.float32, "dense"), "bf16": (torch.bfloat16, "dense"), "int8": (None, "int8"), "int4": (None, "int4"),
}


def build_format(hf_model: Any, name: str) -> CompactLlama:
    """The engine's model of `hf_model` in format `name` (a key of FORMATS); quantized from full precision."""
    if name not in FORMATS:
        raise ValueError(f"unknown weight format {name!r} (choose from {', '.join(FORMATS)})")
    dtype, weight_format = FORMATS[name]
    return CompactLlama.from_hf(hf_model, dtype=dtype, weight_format=weight_format)  # type: ignore[arg-type]


@dataclass
class FormatFigures:
    weights: str  # a key of FORMATS
    dtype: str  # what the model computes in
    decode_ms_per_token: float  # median over rounds
    greedy_agreement: float  # teacher-forced argmax agreement with the fp32 engine (1.0 for fp32 itself)
    agreement_tokens: int  # positions compared
    weight_bytes: int  # bytes of the base weights as this format holds them (what a decode step reads)
    rounds_ms: list[float] = field(default_factory=list)
    compiled: bool = False  # decode steps through `compiled_decode`
    # the same agreement fed token by token through one-token forwards (what serving runs; for a compiled
    # variant the compiled step, so this is its agreement figure); None when not measured
    decode_agreement: float | None = None

    @property
    def label(self) -> str:
        return f"{self.weights}+compiled" if self.compiled else self.weights


@dataclass
class WeightBenchReport:
    formats: list[FormatFigures]
    llama_cpp_decode_ms_per_token: float | None  # None: not measured (see llama_cpp_note)
    llama_cpp_rounds_ms: list[float]
    llama_cpp_file: str | None
    llama_cpp_note: str
    threads: int
    decode_tokens: int
    agreement_prompts: int
    adapter: str | None = None  # the adapter scored under each format, when one was given
    adapter_scores: dict[str, dict[str, float]] = field(default_factory=dict)  # format -> task metrics

    @property
    def ratios(self) -> dict[str, float]:
        """llama.cpp's ms/token over each format's (above 1: the engine is faster), and each format's
        speed-up over the fp32 engine."""
        ratios = {}
        fp32 = next((fig for fig in self.formats if fig.weights == "fp32" and not fig.compiled), None)
        for fig in self.formats:
            if self.llama_cpp_decode_ms_per_token is not None:
                ratios[f"{fig.label}_vs_llama_cpp"] = self.llama_cpp_decode_ms_per_token / fig.decode_ms_per_token
            if fp32 is not None and fig is not fp32:
                ratios[f"{fig.label}_vs_fp32"] = fp32.decode_ms_per_token / fig.decode_ms_per_token
        return ratios

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for fig, data in zip(self.formats, out["formats"]):
            data["label"] = fig.label
        return {**out, "ratios": self.ratios}


def greedy_continuations(model: CompactLlama, prompts: Sequence[list[int]], max_new_tokens: int) -> list[list[int]]:
    """The engine's greedy continuation of each prompt (end tokens ignored: every row gets the budget)."""
    engine = Engine(model, EngineConfig())
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), list(prompt), SamplingParams(max_new_tokens=max_new_tokens), None)
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for result in engine.step():
            if result.error is not None:
                raise RuntimeError(f"reference decoding failed: {result.error}")
            out[result.request_id].extend(result.new_token_ids)
    return [out[str(i)] for i in range(len(prompts))]


@torch.inference_mode()
def teacher_forced_agreement(model: CompactLlama, prompts: Sequence[list[int]],
                             continuations: Sequence[list[int]], *, block_size: int = 16,
                             decode_steps: bool = False) -> tuple[int, int]:
    """(positions whose argmax equals the continuation's token, positions compared): one forward per
    sequence over prompt + continuation, read at the positions that predict each continuation token.
    With `decode_steps`, the prompt is one forward and each continuation token then its own one-token
    forward, as serving decodes (the path `compile_decode` replaces)."""
    matches = total = 0
    device = model.lm_head_weight.device
    for prompt, continuation in zip(prompts, continuations):
        tokens = list(prompt) + list(continuation)
        blocks = -(-len(tokens) // block_size)
        kv = model.new_kv_pool(blocks, block_size)
        table = list(range(blocks))
        if decode_steps:
            hidden = model(ForwardBatch.build([list(prompt)], [0], [table], block_size, [0], device=device), kv)[-1:]
            states = [hidden]
            for position in range(len(prompt), len(tokens) - 1):
                batch = ForwardBatch.build([[tokens[position]]], [position], [table], block_size, [0], device=device)
                states.append(model(batch, kv))
            hidden = torch.cat(states)
        else:
            batch = ForwardBatch.build([tokens], [0], [table], block_size, [0], device=device)
            hidden = model(batch, kv)[len(prompt) - 1: len(tokens) - 1]  # the positions predicting the continuation
        predicted = model.logits(hidden).argmax(-1).tolist()
        matches += sum(p == t for p, t in zip(predicted, continuation))
        total += len(continuation)
    return matches, total


def weight_bytes(model: CompactLlama) -> int:
    """Bytes of the projection weights (and the head) as held: what one decode step streams."""
    total = 0
    for layer in model.layers:
        for projection in (layer.qkv, layer.o, layer.gate_up, layer.down):
            total += _projection_bytes(projection)
    return total + _projection_bytes(model.lm_head.projection)


def _projection_bytes(projection: Any) -> int:
    """Bytes of the tensors a projection holds (a prepacked oneDNN weight counts its dense size), looking
    inside wrappers such as `Bf16Projection`."""
    total = 0
    for value in vars(projection).values():
        if isinstance(value, torch.Tensor):
            count = projection.out_features * projection.in_features if value.is_mkldnn else value.numel()
            total += count * value.element_size()
        elif hasattr(value, "out_features") and hasattr(value, "dense"):  # a wrapped projection
            total += _projection_bytes(value)
    return total


class LlamaCppDecoder:
    """llama.cpp on one GGUF file, timed like the engine: one request alone, ms per token after the first."""

    def __init__(self, gguf: Path, threads: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=1024,
                         n_batch=512, verbose=False, seed=0)

    def decode_ms_per_token(self, prompt: list[int], max_new_tokens: int) -> float:
        stamps: list[float] = []
        for _ in self.llm.generate(list(prompt), temp=0.0, top_k=1, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) >= max_new_tokens:
                break
        gaps = [later - earlier for earlier, later in itertools.pairwise(stamps)]
        if not gaps:
            raise ValueError("llama.cpp ended before its second token: nothing to time")
        return sum(gaps) / len(gaps) * 1000


def load_llama_cpp(gguf: Path | None, threads: int) -> tuple[LlamaCppDecoder | None, str]:
    """(the decoder, a note): None with the reason when llama.cpp or the file is not there."""
    if gguf is None:
        return None, "no GGUF for this base model (llama.cpp runs only the embedded model's file)"
    try:
        return LlamaCppDecoder(gguf, threads), f"llama-cpp-python on {gguf.name}, {threads} threads"
    except ImportError:
        return None, "llama-cpp-python is not installed (pip install 'lorafleet[bench]' to add the peer)"


def measure_weight_formats(hf_model: Any, formats: Sequence[str], *, decode_prompt: list[int],
                           agreement_prompts: Sequence[list[int]], max_new_tokens: int, rounds: int = 3,
                           gguf: Path | None = None, compile_decode: bool = False,
                           progress: Callable[[str], None] = print) -> WeightBenchReport:
    """Every figure in one process; the fp32 engine of `hf_model` is the reference. With `compile_decode`
    each format is also timed with its decode steps compiled (a second model of the same weights)."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    if not formats:
        raise ValueError("name at least one weight format")
    models = {name: build_format(hf_model, name) for name in formats}  # unknown names fail before any work
    threads = torch.get_num_threads()
    reference = models.get("fp32") or build_format(hf_model, "fp32")
    progress(f"reference: fp32 engine's greedy continuations of {len(agreement_prompts)} prompts")
    continuations = greedy_continuations(reference, agreement_prompts, max_new_tokens)
    engines = {name: Engine(model, EngineConfig()) for name, model in models.items()}
    compiled: dict[str, CompactLlama] = {}
    if compile_decode:
        for name in formats:
            progress(f"compiling {name}'s decode step")
            compiled[name] = build_format(hf_model, name)
            engines[f"{name}+compiled"] = Engine(compiled[name], EngineConfig(compile_decode=True))
    llama, note = load_llama_cpp(gguf, threads)
    timings: dict[str, list[float]] = {name: [] for name in engines}
    llama_ms: list[float] = []
    for name, engine in engines.items():  # warm-up: allocator, kernels' first-call costs
        engine_decode_ms_per_token(engine, decode_prompt, 4)
    if llama is not None:
        llama.decode_ms_per_token(decode_prompt, 4)
    for round_no in range(1, rounds + 1):
        for name, engine in engines.items():
            engine.allocator.forget_cached()
            timings[name].append(engine_decode_ms_per_token(engine, decode_prompt, max_new_tokens))
            progress(f"round {round_no}/{rounds}: engine {name}: {timings[name][-1]:.2f} ms/token")
        if llama is not None:
            llama_ms.append(llama.decode_ms_per_token(decode_prompt, max_new_tokens))
            progress(f"round {round_no}/{rounds}: llama.cpp: {llama_ms[-1]:.2f} ms/token")
    figures = []
    for name, model in models.items():
        matches, total = teacher_forced_agreement(model, agreement_prompts, continuations)
        figures.append(FormatFigures(
            weights=name, dtype=str(model.lm_head_weight.dtype).removeprefix("torch."),
            decode_ms_per_token=statistics.median(timings[name]), greedy_agreement=matches / total if total else 0.0,
            agreement_tokens=total, weight_bytes=weight_bytes(model), rounds_ms=timings[name]))
        progress(f"{name}: greedy agreement with fp32 {figures[-1].greedy_agreement:.4f} over {total} tokens")
        if name in compiled:
            eager = figures[-1]
            matches, total = teacher_forced_agreement(model, agreement_prompts, continuations, decode_steps=True)
            eager.decode_agreement = matches / total
            matches, total = teacher_forced_agreement(compiled[name], agreement_prompts, continuations,
                                                      decode_steps=True)
            label = f"{name}+compiled"
            figures.append(dataclasses.replace(
                eager, decode_ms_per_token=statistics.median(timings[label]), rounds_ms=timings[label],
                compiled=True, greedy_agreement=matches / total, decode_agreement=matches / total))
            progress(f"{name}, one-token forwards: eager {eager.decode_agreement:.4f}, compiled "
                     f"{figures[-1].decode_agreement:.4f} agreement with fp32")
    return WeightBenchReport(
        formats=figures, llama_cpp_decode_ms_per_token=statistics.median(llama_ms) if llama_ms else None,
        llama_cpp_rounds_ms=llama_ms, llama_cpp_file=gguf.name if llama is not None and gguf else None,
        llama_cpp_note=note, threads=threads, decode_tokens=max_new_tokens, agreement_prompts=len(agreement_prompts))
