"""`bench grammar`: what constrained JSON decoding costs per token with xgrammar and with llguidance.

Both libraries are measured in the same process on the same tokenizers and the same token streams:

* tokenizer info: the one-off per-server conversion of the Hugging Face tokenizer;
* compile: a response format to a ready matcher (xgrammar with its compile cache off), and the first mask;
* per token: computing the next-token bitmask and accepting the token, fed the tokens of valid answers
  (`tokenizer(text)`, then EOS) one at a time, exactly as a decoder would; medians over rounds;
* applying a bitmask to a logits row of the model's vocabulary width (torch).

No model runs: the mask cost is what constrained decoding adds to every decoded token of a request.
The answers come from the caller (the CLI passes the extraction task's generated targets), so this module
knows no task.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from lorafleet.models.grammar import GrammarCompiler, GrammarSettings, apply_masks

LIBRARIES = ("xgrammar", "llguidance")
DATE = r"^\d{4}-\d{2}-\d{2}$"
# Whitespace between JSON tokens: free but bounded, the same bound for both libraries as the engine's.
MAX_WHITESPACE = GrammarSettings().max_whitespace


# --- grammars and answers ---------------------------------------------------------------------------------

def schema_from_records(records: Sequence[Mapping[str, Any]], *, tag: str = "type") -> dict[str, Any]:
    """A strict JSON schema that the given flat records satisfy: one alternative per value of `tag`, every
    key required and in the records' order, each value typed by what the records hold (null included),
    strings that all look like dates constrained to YYYY-MM-DD."""
    shapes: dict[str, dict[str, set[str]]] = {}
    for record in records:
        keys = shapes.setdefault(record[tag], {key: set() for key in record})
        for key, value in record.items():
            keys[key].add(_json_type(value) if not (isinstance(value, str) and re.match(DATE, value)) else "date")
    alternatives = []
    for kind, keys in shapes.items():
        properties: dict[str, Any] = {}
        for key, types in keys.items():
            if key == tag:
                properties[key] = {"const": kind}
                continue
            names = sorted(t for t in types if t != "date") + (["string"] if "date" in types else [])
            properties[key] = {"type": names[0] if len(names) == 1 else sorted(set(names))}
            if "date" in types and types <= {"date", "null"}:
                properties[key]["pattern"] = DATE
        alternatives.append({"type": "object", "properties": properties, "required": list(keys),
                             "additionalProperties": False})
    return alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string"


ORDER_ITEMS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "customer": {"type": "string"},
        "items": {"type": "array", "minItems": 1, "items": {
            "type": "object", "properties": {"item": {"type": "string"}, "quantity": {"type": "integer"}},
            "required": ["item", "quantity"], "additionalProperties": False}},
        "total": {"type": ["number", "null"]},
        "date": {"type": ["string", "null"], "pattern": DATE},
    },
    "required": ["customer", "items", "total", "date"],
    "additionalProperties": False,
}


def order_items_answers(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Answers for ORDER_ITEMS_SCHEMA (an object with a nested list of objects), built from pairs of order
    records: the first one's customer, total and date, both ones' items."""
    orders = [r for r in records if r.get("type") == "order"]
    answers = []
    for first, second in zip(orders[::2], orders[1::2], strict=False):
        answer = {"customer": first["customer"],
                  "items": [{"item": r["item"], "quantity": r["quantity"]} for r in (first, second)],
                  "total": first["total"], "date": first["date"]}
        answers.append(json.dumps(answer, ensure_ascii=False, separators=(",", ":")))
    return answers


@dataclass(frozen=True)
class GrammarCase:
    """One response format and answers that satisfy it."""

    name: str
    response_format: dict[str, Any]
    answers: tuple[str, ...]


def cases_from_targets(targets: Sequence[str], *, n: int) -> list[GrammarCase]:
    """The three cases timed: any JSON object (answers re-written with `, ` / `: ` spacing, as a chat model
    writes JSON), the extraction record schema (the task's own compact answers) and an object with a
    nested list."""
    records = [json.loads(t) for t in targets]
    spaced = tuple(json.dumps(r, ensure_ascii=False) for r in records[:n])
    return [
        GrammarCase("json_object", {"type": "json_object"}, spaced),
        GrammarCase("extraction", _schema_format("extraction", schema_from_records(records)), tuple(targets[:n])),
        GrammarCase("order_items", _schema_format("order_items", ORDER_ITEMS_SCHEMA),
                    tuple(order_items_answers(records)[:n])),
    ]


def _schema_format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


# --- the two libraries behind one small interface -------------------------------------------------------

class _Backend:
    """What the bench times, per library: build tokenizer info, compile, make a matcher, fill, accept."""

    name: str

    def build_info(self, tokenizer: Any, vocab_size: int, eos: Sequence[int]) -> Any: ...
    def compile(self, info: Any, response_format: dict[str, Any]) -> Any: ...
    def matcher(self, info: Any, compiled: Any) -> Any: ...
    def fill(self, matcher: Any, bitmask: torch.Tensor, row: int) -> None: ...
    def accept(self, matcher: Any, token: int) -> bool: ...


class _XGrammar(_Backend):
    name = "xgrammar"

    def __init__(self, threads: int):
        import xgrammar

        self.xgr = xgrammar
        self.threads = threads

    def build_info(self, tokenizer, vocab_size, eos):
        return self.xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(eos))

    def compile(self, info, response_format):
        # A new compiler with its cache off: every call compiles (the per-server compiler would cache).
        compiler = self.xgr.GrammarCompiler(info, max_threads=self.threads, cache_enabled=False)
        if response_format["type"] == "json_object":
            return compiler.compile_json_schema({"type": "object"}, strict_mode=False,
                                                max_whitespace_cnt=MAX_WHITESPACE)
        return compiler.compile_json_schema(response_format["json_schema"]["schema"],
                                            max_whitespace_cnt=MAX_WHITESPACE)

    def matcher(self, info, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher, bitmask, row):
        matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, matcher, token):
        return matcher.accept_token(token)


class _LLGuidance(_Backend):
    name = "llguidance"

    def __init__(self, threads: int):  # llguidance compiles lazily, on the calling thread
        import llguidance
        import llguidance.hf

        self.llg = llguidance
        self.eos: frozenset[int] = frozenset()

    def build_info(self, tokenizer, vocab_size, eos):
        self.eos = frozenset(eos)  # one tokenizer at a time: measure_tokenizer builds, then uses it
        return self.llg.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(eos))

    def compile(self, info, response_format):
        schema = ({"type": "object"} if response_format["type"] == "json_object"
                  else response_format["json_schema"]["schema"])
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            schema, overrides={"whitespace_pattern": rf"[\x20\x0A\x0D\x09]{{0,{MAX_WHITESPACE}}}"})
        # The compiled form is a matcher at the start state; each request deep-copies it.
        template = self.llg.LLMatcher(info, grammar, log_level=0)
        if template.is_error():
            raise ValueError(template.get_error())
        return template

    def matcher(self, info, compiled):
        return compiled.deep_copy()

    def fill(self, matcher, bitmask, row):
        target = bitmask[row]
        matcher.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * 4)

    def accept(self, matcher, token):
        # A stopped llguidance matcher takes no EOS token (try_consume_tokens answers 0): EOS is accepted
        # by looking at the state, as models/grammar.py does.
        if token in self.eos:
            return matcher.is_accepting()
        return matcher.try_consume_tokens([token]) == 1


class _Wrapped(_Backend):
    """models/grammar.py itself (llguidance behind the engine's API): what the engine pays."""

    name = "lorafleet_grammar"

    def __init__(self, threads: int):
        import llguidance  # noqa: F401  (without it, reported as not installed like the others)

    def build_info(self, tokenizer, vocab_size, eos):
        return GrammarCompiler(tokenizer, vocab_size, eos)

    def compile(self, info, response_format):
        info.clear_cache()
        return info.compile(response_format)

    def matcher(self, info, compiled):
        return compiled.matcher()

    def fill(self, matcher, bitmask, row):
        matcher.fill_mask(bitmask, row)

    def accept(self, matcher, token):
        return matcher.accept(token)


def available_backends(threads: int) -> dict[str, _Backend | str]:
    """name -> backend, or the reason it cannot be measured (a library that is not installed)."""
    found: dict[str, _Backend | str] = {}
    for name, make in (("xgrammar", _XGrammar), ("llguidance", _LLGuidance), ("lorafleet_grammar", _Wrapped)):
        try:
            found[name] = make(threads)
        except ImportError as error:
            found[name] = f"not installed ({error})"
    return found


# --- measuring -----------------------------------------------------------------------------------------

@dataclass
class TokenizerTiming:
    tokenizer: str
    vocab_size: int
    libraries: dict[str, dict[str, Any]] = field(default_factory=dict)  # library -> numbers (or "error")

    def ratios(self) -> dict[str, float]:
        """xgrammar / llguidance for every number both have (> 1: llguidance is faster)."""
        x, g = self.libraries.get("xgrammar", {}), self.libraries.get("llguidance", {})
        out = {}
        if x.get("tokenizer_info_ms") and g.get("tokenizer_info_ms"):
            out["tokenizer_info_ms"] = x["tokenizer_info_ms"] / g["tokenizer_info_ms"]
        for case, numbers in x.get("grammars", {}).items():
            other = g.get("grammars", {}).get(case, {})
            for key in ("compile_ms", "first_mask_ms", "matcher_us", "fill_us", "accept_us", "per_token_us",
                        "p99_token_us"):
                if key in numbers and key in other and other[key] > 0:
                    out[f"{case}.{key}"] = numbers[key] / other[key]
        return out


@dataclass
class GrammarBenchReport:
    environment: dict[str, Any]
    rounds: int
    tokenizers: list[TokenizerTiming]
    apply_mask: dict[str, dict[str, float]]  # "rows=N" -> {"torch_us": ..., "xgrammar_cpu_us": ...}

    def summary(self) -> dict[str, Any]:
        """The headline numbers side by side: tokenizer -> number -> {library: value, "ratio": x / l}."""
        keys = ("per_token_us", "fill_us", "accept_us", "p99_token_us", "compile_ms", "first_mask_ms")
        out: dict[str, Any] = {}
        for timing in self.tokenizers:
            ratios = timing.ratios()
            rows: dict[str, Any] = {"tokenizer_info_ms": self._side_by_side(timing, None, "tokenizer_info_ms")}
            rows["tokenizer_info_ms"]["ratio"] = _round(ratios.get("tokenizer_info_ms"))
            cases = next((lib["grammars"] for lib in timing.libraries.values() if "grammars" in lib), {})
            for case in cases:
                for key in keys:
                    rows[f"{case}.{key}"] = {**self._side_by_side(timing, case, key),
                                             "ratio": _round(ratios.get(f"{case}.{key}"))}
            out[timing.tokenizer] = rows
        out["apply_mask"] = self.apply_mask
        return out

    @staticmethod
    def _side_by_side(timing: TokenizerTiming, case: str | None, key: str) -> dict[str, Any]:
        values = {}
        for name, numbers in timing.libraries.items():
            source = numbers if case is None else numbers.get("grammars", {}).get(case, {})
            if key in source:
                values[name] = round(source[key], 2)
        return values

    def to_dict(self) -> dict[str, Any]:
        return {"environment": self.environment, "rounds": self.rounds, "summary": self.summary(),
                "tokenizers": [{"tokenizer": t.tokenizer, "vocab_size": t.vocab_size, "libraries": t.libraries,
                                "ratios_xgrammar_over_llguidance": t.ratios()} for t in self.tokenizers],
                "apply_mask": self.apply_mask}


def _ms(run: Callable[[], Any]) -> float:
    started = time.perf_counter()
    run()
    return (time.perf_counter() - started) * 1e3


def measure_tokenizer(backends: Mapping[str, _Backend], tokenizer: Any, vocab_size: int, eos: Sequence[int],
                      cases: Sequence[GrammarCase], *, rounds: int) -> dict[str, dict[str, Any]]:
    """Every library on one tokenizer: tokenizer info, then per case compile, first mask and per-token cost.

    The libraries take turns inside every round (this 2-core machine is shared: a busy neighbour then slows
    all of them alike) and each number is the median over rounds."""
    info_ms: dict[str, list[float]] = {name: [] for name in backends}
    infos: dict[str, Any] = {}
    for _ in range(rounds):
        for name, backend in backends.items():
            info_ms[name].append(_ms(lambda b=backend, n=name: infos.__setitem__(
                n, b.build_info(tokenizer, vocab_size, eos))))
    out: dict[str, dict[str, Any]] = {name: {"tokenizer_info_ms": statistics.median(info_ms[name]), "grammars": {}}
                                      for name in backends}
    bitmask = torch.full((1, (vocab_size + 31) // 32), -1, dtype=torch.int32)
    for case in cases:
        streams = [tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos[0]] for answer in case.answers]
        compile_ms: dict[str, list[float]] = {name: [] for name in backends}
        first_ms: dict[str, list[float]] = {name: [] for name in backends}
        passes: dict[str, list[dict[str, Any]]] = {name: [] for name in backends}
        for _ in range(rounds):
            for name, backend in backends.items():
                info = infos[name]
                fmt = case.response_format
                compile_ms[name].append(_ms(lambda b=backend, i=info, f=fmt: b.compile(i, f)))
                first_ms[name].append(_ms(lambda b=backend, i=info, f=fmt: b.fill(b.matcher(i, b.compile(i, f)),
                                                                                   bitmask, 0)))
                compiled = backend.compile(info, fmt)
                passes[name].append(_token_pass(backend, info, compiled, streams, bitmask))
        for name in backends:
            out[name]["grammars"][case.name] = {**_summarise(passes[name], streams),
                                                "compile_ms": statistics.median(compile_ms[name]),
                                                "first_mask_ms": statistics.median(first_ms[name])}
    return out


def _token_pass(backend: _Backend, info: Any, compiled: Any, streams: Sequence[Sequence[int]],
                bitmask: torch.Tensor) -> dict[str, Any]:
    """Feed every stream token by token (mask, then accept) as a decoder would; ns per call."""
    clock = time.perf_counter_ns
    fill_ns, accept_ns, matcher_ns, totals = [], [], [], []
    rejected = 0
    for stream in streams:
        t0 = clock()
        matcher = backend.matcher(info, compiled)
        matcher_ns.append(clock() - t0)
        for token in stream:
            t0 = clock()
            backend.fill(matcher, bitmask, 0)
            t1 = clock()
            ok = backend.accept(matcher, token)
            t2 = clock()
            fill_ns.append(t1 - t0)
            accept_ns.append(t2 - t1)
            totals.append(t2 - t0)
            if not ok:
                rejected += 1
                break
    return {"fill": fill_ns, "accept": accept_ns, "matcher": matcher_ns, "totals": totals, "rejected": rejected}


def _summarise(passes: Sequence[dict[str, Any]], streams: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Mean µs per token of each pass, median over passes; p50 / p99 over every token of every pass."""
    def median_mean(key: str) -> float:
        return statistics.median(sum(p[key]) / len(p[key]) for p in passes) / 1e3

    totals = sorted(t for p in passes for t in p["totals"])
    fill, accept = median_mean("fill"), median_mean("accept")
    return {"answers": len(streams), "tokens": sum(len(s) for s in streams),
            "rejected": max(p["rejected"] for p in passes),
            "matcher_us": median_mean("matcher"), "fill_us": fill, "accept_us": accept, "per_token_us": fill + accept,
            "p50_token_us": totals[len(totals) // 2] / 1e3, "p99_token_us": totals[int(0.99 * (len(totals) - 1))] / 1e3}


def measure_apply_mask(vocab_size: int, *, rounds: int, rows: Sequence[int] = (1, 8),
                       repeats: int = 200) -> dict[str, dict[str, float]]:
    """µs to apply an int32 bitmask to a (rows, vocab) float32 logits tensor: the torch ops of
    models/grammar.py (`apply_masks`) and, when installed, xgrammar's C++ CPU kernel; with one
    torch thread and with torch's current count."""
    threads = torch.get_num_threads()
    out: dict[str, dict[str, float]] = {}
    for count in sorted({1, threads}):
        torch.set_num_threads(count)
        try:
            for label, numbers in _apply_mask_at(vocab_size, rounds=rounds, rows=rows, repeats=repeats).items():
                out[f"{label},threads={count}"] = numbers
        finally:
            torch.set_num_threads(threads)
    return out


def _apply_mask_at(vocab_size: int, *, rounds: int, rows: Sequence[int],
                   repeats: int) -> dict[str, dict[str, float]]:
    kernels: dict[str, Callable[[torch.Tensor, torch.Tensor], Any]] = {"torch_us": apply_masks}
    try:
        import xgrammar

        kernels["xgrammar_cpu_us"] = lambda logits, bitmask: xgrammar.apply_token_bitmask_inplace(logits, bitmask)
    except ImportError:
        pass
    generator = torch.Generator().manual_seed(0)
    out: dict[str, dict[str, float]] = {}
    for n in rows:
        logits = torch.randn(n, vocab_size, generator=generator)
        bitmask = torch.randint(-2**31, 2**31 - 1, (n, (vocab_size + 31) // 32), dtype=torch.int32,
                                generator=generator)
        times: dict[str, list[float]] = {name: [] for name in kernels}
        for name, kernel in kernels.items():
            kernel(logits.clone(), bitmask)  # warm-up: the byte table, first-call dispatch
        for _ in range(rounds):
            for name, kernel in kernels.items():
                work = logits.clone()
                times[name].append(_ms(lambda k=kernel, w=work, m=bitmask: [k(w, m) for _ in range(repeats)]))
        out[f"rows={n}"] = {name: statistics.median(t) * 1e3 / repeats for name, t in times.items()}
    return out


def environment(threads: int) -> dict[str, Any]:
    versions = {}
    for name in (*LIBRARIES, "torch"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"machine": platform.machine(), "processor": _cpu_name(), "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(), "compile_threads": threads, "versions": versions}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as lines:
            for line in lines:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def load_bench_tokenizer(name: str, cache_dir: Path) -> tuple[Any, int, tuple[int, ...]]:
    """A base model's (tokenizer, logits width from its config, EOS ids) without loading its weights."""
    from transformers import AutoConfig, GenerationConfig

    from lorafleet.models.base import load_tokenizer, resolve_base_model
    from lorafleet.models.sampling_rules import eos_token_ids

    resolved = resolve_base_model(name, cache_dir)
    tokenizer = load_tokenizer(resolved)
    width = AutoConfig.from_pretrained(str(resolved.path)).vocab_size
    try:
        generation = GenerationConfig.from_pretrained(str(resolved.path))
    except OSError:  # no generation_config.json: the tokenizer's EOS alone
        generation = None
    return tokenizer, width, eos_token_ids(SimpleNamespace(generation_config=generation), tokenizer, required=True)


def measure_grammar(tokenizers: Mapping[str, tuple[Any, int, Sequence[int]]], targets: Sequence[str], *,
                    answers: int = 20, rounds: int = 5, threads: int = 2,
                    on_line: Callable[[str], None] = print) -> GrammarBenchReport:
    """Every installed library on every tokenizer (name -> (tokenizer, logits width, EOS ids)), over the
    cases built from `targets` (valid extraction answers), then the bitmask application."""
    cases = cases_from_targets(targets, n=answers)
    found = available_backends(threads)
    backends = {name: b for name, b in found.items() if not isinstance(b, str)}
    timings = []
    for label, (tokenizer, vocab_size, eos) in tokenizers.items():
        on_line(f"{label}: {', '.join(backends)}, {rounds} rounds")
        timing = TokenizerTiming(label, vocab_size)
        timing.libraries = {name: {"error": why} for name, why in found.items() if isinstance(why, str)}
        timing.libraries.update(measure_tokenizer(backends, tokenizer, vocab_size, eos, cases, rounds=rounds))
        timings.append(timing)
    widest = max(vocab_size for _, vocab_size, _ in tokenizers.values())
    return GrammarBenchReport(environment(threads), rounds, timings, measure_apply_mask(widest, rounds=rounds))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
