"""Constrained decoding for OpenAI `response_format` JSON: compile once per schema, one matcher per request.

The grammar library is llguidance (docs/decisions.md, "Structured output: grammar library"). This module is
all the engine sees of it:

* `GrammarCompiler(tokenizer, vocab_size, eos_token_ids)`: built once per server; it converts the tokenizer
  (0.4-0.8 s for SmolLM2) and compiles `response_format` dicts into `CompiledGrammar`s, cached by a canonical
  key (LRU). A format it cannot honour raises `InvalidGrammar` naming the field ("json_schema.schema: ...").
* `CompiledGrammar.matcher()`: a `GrammarMatcher` per request, the parser state of one output.
* `GrammarMatcher.fill_mask(bitmask, row)` writes the allowed next tokens as one row of an int32 bitmask
  (bit `t % 32` of word `t // 32` set = token t allowed); `apply_masks(logits, bitmask)` then masks a whole
  (rows, vocab) logits tensor in one op. `accept`, `rollback`, `accepts_prefix` and `fill_draft_masks`
  serve speculative decoding: drafts are checked and verified against the grammar, and rolled back.

End of sequence: llguidance's tokenizer is given `eos_token_ids`; while the output so far is complete JSON
the mask allows them, and once nothing else can follow (`is_terminated()`) it allows only them. The
tokenizer's other special tokens (`<|im_start|>`, ...) are never allowed, nor are ids past the tokenizer's
length when the model's logits are wider (`vocab_size` > len(tokenizer)). EOS itself is accepted here, never
passed to llguidance: a stopped llguidance matcher does not record it, so its rollback would undo the token
before.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


class InvalidGrammar(ValueError):
    """A response_format that cannot be compiled; the message names the field (for a 400)."""


@dataclass(frozen=True)
class GrammarSettings:
    """Bounds on what one request may ask for; validated on creation."""

    max_schema_bytes: int = 32 * 1024  # the schema as compact JSON
    max_schema_depth: int = 32  # nesting of JSON objects/arrays in the schema
    cache_size: int = 128  # compiled grammars kept (LRU)
    # Whitespace allowed between JSON tokens: free (a model writes `{"a": 1}` or pretty-prints) but bounded,
    # so a model cannot spend its whole budget on newlines inside an unfinished object.
    max_whitespace: int = 16

    def __post_init__(self) -> None:
        for name in ("max_schema_bytes", "max_schema_depth", "cache_size", "max_whitespace"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"GrammarSettings.{name}: expected a positive integer, got {getattr(self, name)!r}")


_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MESSAGE_CHARS = 300  # a library message is cut to this: it may quote the schema back


class GrammarCompiler:
    """One per server: the tokenizer converted for llguidance, and the cache of compiled grammars."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int],
                 settings: GrammarSettings | None = None):
        import llguidance
        import llguidance.hf

        eos = tuple(int(t) for t in eos_token_ids)
        if not eos:
            raise ValueError("eos_token_ids: at least one id is needed (a constrained output must end)")
        if vocab_size < len(tokenizer):
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
        if any(not 0 <= t < vocab_size for t in eos):
            raise ValueError(f"eos_token_ids {list(eos)}: every id must be below vocab_size {vocab_size}")
        self._llg = llguidance
        self.vocab_size = vocab_size
        self.eos_token_ids = eos
        self.settings = settings or GrammarSettings()
        # n_vocab = the logits width: ids past the tokenizer's own exist in the mask and are never allowed.
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(eos))
        # verbose_errors off: messages name the problem without dumping parser state or the grammar.
        self._limits = llguidance.LLParserLimits(verbose_errors=False)
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()  # the API may compile (to answer 400s early) while the engine steps

    @property
    def bitmask_width(self) -> int:
        """int32 words per bitmask row: ceil(vocab_size / 32)."""
        return (self.vocab_size + 31) // 32

    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        """A (rows, bitmask_width) int32 CPU bitmask, every token allowed."""
        return torch.full((rows, self.bitmask_width), -1, dtype=torch.int32)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def compile(self, response_format: dict[str, Any]) -> CompiledGrammar:
        """`{"type": "json_object"}` or `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`
        -> a compiled grammar (cached); InvalidGrammar naming the problem otherwise."""
        kind, schema = _read_format(response_format, self.settings)
        key = json.dumps({"type": kind, "schema": _canonical(schema)}, separators=(",", ":"), ensure_ascii=False)
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
        compiled = self._compile(kind, schema, key)
        with self._lock:
            compiled = self._cache.setdefault(key, compiled)  # a racing compile of the same key: keep one
            self._cache.move_to_end(key)
            while len(self._cache) > self.settings.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, kind: str, schema: dict[str, Any], key: str) -> CompiledGrammar:
        whitespace = rf"[\x20\x0A\x0D\x09]{{0,{self.settings.max_whitespace}}}"
        try:
            grammar = self._llg.LLMatcher.grammar_from_json_schema(
                schema, overrides={"whitespace_pattern": whitespace})
        except (ValueError, TypeError) as error:
            raise InvalidGrammar(f"{_FIELD[kind]}: {_short(str(error))}") from None
        # Never raises: a schema it cannot honour (unknown type, unimplemented keyword, bad $ref or regex,
        # unsatisfiable constraints, a grammar over the parser limits) leaves the matcher in its error state.
        start = self._llg.LLMatcher(self._tokenizer, grammar, log_level=0, limits=self._limits)
        if not start.is_error():
            # The first mask builds the lexer states every copy shares: a lexer over its limits is a 400 now,
            # not a dead request later, and the first decode step of each request starts warm.
            scratch = self.allocate_bitmask(1)
            start.unsafe_compute_mask_ptr(scratch.data_ptr(), self.bitmask_width * 4)
        if start.is_error():
            raise InvalidGrammar(f"{_FIELD[kind]}: {_short(start.get_error())}")
        return CompiledGrammar(kind, key, start, self)


_FIELD = {"json_object": "response_format", "json_schema": "json_schema.schema"}


def _short(message: str) -> str:
    message = " ".join(message.split())
    return message if len(message) <= _MESSAGE_CHARS else message[:_MESSAGE_CHARS] + "..."


def _read_format(response_format: Any, settings: GrammarSettings) -> tuple[str, dict[str, Any]]:
    """(kind, JSON schema) of an OpenAI response_format, or InvalidGrammar naming the field."""
    if not isinstance(response_format, dict):
        raise InvalidGrammar(f"response_format: expected an object, got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "json_object":
        _no_other_fields(response_format, {"type"}, "response_format")
        return kind, {"type": "object"}
    if kind != "json_schema":
        shown = json.dumps(kind)[:40] if isinstance(kind, str) else type(kind).__name__
        raise InvalidGrammar(f"response_format.type: expected 'json_object' or 'json_schema', got {shown}")
    _no_other_fields(response_format, {"type", "json_schema"}, "response_format")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidGrammar("response_format.json_schema: required, an object with name and schema")
    _no_other_fields(spec, {"name", "schema", "strict", "description"}, "json_schema")
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidGrammar("json_schema.name: required, 1-64 characters of a-z, A-Z, 0-9, _ and -")
    if not isinstance(spec.get("strict", False), bool | None):
        raise InvalidGrammar("json_schema.strict: expected true or false")
    if not isinstance(spec.get("description", ""), str):
        raise InvalidGrammar("json_schema.description: expected a string")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise InvalidGrammar("json_schema.schema: required, a JSON Schema object"
                             + ("" if schema is None else f" (got {type(schema).__name__})"))
    _check_size(schema, settings)
    return kind, schema


def _no_other_fields(value: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(str(k)[:40] for k in value if k not in allowed)
    if unknown:
        raise InvalidGrammar(f"{where}: unknown field {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


def _check_size(schema: dict[str, Any], settings: GrammarSettings) -> None:
    depth, stack = 0, [(schema, 1)]
    while stack:  # iterative: a hostile nesting must not reach the recursion limit first
        node, level = stack.pop()
        depth = max(depth, level)
        if depth > settings.max_schema_depth:
            raise InvalidGrammar(f"json_schema.schema: nested deeper than {settings.max_schema_depth} levels")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, level + 1) for child in children if isinstance(child, dict | list))
    try:
        size = len(json.dumps(schema, separators=(",", ":"), allow_nan=False).encode())
    except (TypeError, ValueError) as error:
        raise InvalidGrammar(f"json_schema.schema: not JSON ({_short(str(error))})") from None
    if size > settings.max_schema_bytes:
        raise InvalidGrammar(f"json_schema.schema: {size} bytes, over the limit of {settings.max_schema_bytes}")


# Keywords whose values are sub-schemas (or lists / name->schema maps of them). Everything else is data
# (const, enum, default, ...) or a scalar and is kept exactly as written.
_SUBSCHEMA = {"items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
              "additionalItems", "unevaluatedProperties", "unevaluatedItems", "contentSchema"}
_SUBSCHEMA_LISTS = {"anyOf", "oneOf", "allOf", "prefixItems", "items"}
_SCHEMA_MAPS = {"$defs", "definitions", "patternProperties", "dependentSchemas"}


def _canonical(schema: Any) -> Any:
    """The schema with keyword order normalised, for the cache key: schemas that differ only in the order
    of their keywords (or of `$defs` entries) share one grammar. The order of `properties` is kept, and so is
    every data value (const, enum, ...): the grammar writes properties and const objects in that order."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for keyword in sorted(schema):
        value = schema[keyword]
        if keyword == "properties" and isinstance(value, dict):
            out[keyword] = [[name, _canonical(sub)] for name, sub in value.items()]  # a list: order kept
        elif keyword in _SCHEMA_MAPS and isinstance(value, dict):
            out[keyword] = {name: _canonical(value[name]) for name in sorted(value)}
        elif keyword in _SUBSCHEMA_LISTS and isinstance(value, list):
            out[keyword] = [_canonical(sub) for sub in value]
        elif keyword in _SUBSCHEMA:
            out[keyword] = _canonical(value)
        else:
            out[keyword] = value
    return out


class CompiledGrammar:
    """A compiled response format: a matcher at the start state that each request copies."""

    def __init__(self, kind: str, key: str, start: Any, compiler: GrammarCompiler):
        self.kind = kind  # "json_object" | "json_schema"
        self.key = key  # canonical cache key
        self._start = start
        self._eos = frozenset(compiler.eos_token_ids)
        self._width = compiler.bitmask_width

    def matcher(self) -> GrammarMatcher:
        """A fresh parser state for one request (a copy of the start state: ~3 µs)."""
        return GrammarMatcher(self._start.deep_copy(), self._eos, self._width)


class GrammarMatcher:
    """The grammar state of one request's output. Not thread-safe: one owner (the engine step) at a time."""

    def __init__(self, matcher: Any, eos: frozenset[int], width: int):
        self._matcher = matcher
        self._eos = eos
        self._width = width
        self._history: list[bool] = []  # per accepted token: True = consumed by llguidance, False = our EOS
        self._eos_mask: torch.Tensor | None = None

    @property
    def num_accepted(self) -> int:
        return len(self._history)

    @property
    def bitmask_width(self) -> int:
        """int32 words of one mask row."""
        return self._width

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the next-token mask into `bitmask[row]` (an int32 CPU tensor of shape (rows, bitmask_width)
        with contiguous rows). After EOS was accepted the row allows only EOS again."""
        if not (bitmask.dtype == torch.int32 and bitmask.device.type == "cpu" and bitmask.dim() == 2
                and bitmask.shape[1] == self._width and bitmask.stride(1) == 1 and 0 <= row < bitmask.shape[0]):
            raise ValueError(f"bitmask row {row}: expected an int32 CPU tensor (rows, {self._width}) with "
                             f"contiguous rows, got {bitmask.dtype} on {bitmask.device}, shape {tuple(bitmask.shape)}")
        if self.eos_accepted:
            bitmask[row].copy_(self._only_eos())
            return
        # llguidance writes the row in place (the checks above keep the pointer inside the tensor) and drops
        # the GIL while it computes.
        self._matcher.unsafe_compute_mask_ptr(bitmask.data_ptr() + row * bitmask.stride(0) * 4, self._width * 4)

    def accept(self, token_id: int) -> bool:
        """Advance by one token; False (state unchanged) when the grammar does not allow it."""
        if self.eos_accepted:
            return False
        if token_id in self._eos:
            if not self._matcher.is_accepting():
                return False
            self._history.append(False)
            return True
        # try_consume_tokens leaves the state unchanged on a bad token; consume_token would enter a
        # permanent error state.
        if self._matcher.try_consume_tokens([token_id]) != 1:
            return False
        self._history.append(True)
        return True

    def rollback(self, n: int) -> None:
        """Undo the last `n` accepted tokens (speculative tokens the target model did not confirm)."""
        if not 0 <= n <= len(self._history):
            raise ValueError(f"rollback({n}): only {len(self._history)} tokens were accepted")
        if n == 0:
            return
        undone = self._history[-n:]
        del self._history[-n:]
        consumed = sum(undone)
        if consumed and not self._matcher.rollback(consumed):
            raise RuntimeError(f"llguidance refused to roll back {consumed} tokens")

    @property
    def error(self) -> str | None:
        """Why the grammar gave up mid-output (a parser limit hit on a pathological schema), else None.
        Its masks then allow only EOS, so the request ends instead of looping."""
        return self._matcher.get_error() or None if self._matcher.is_error() else None

    @property
    def eos_accepted(self) -> bool:
        """The output is finished: EOS was accepted."""
        return bool(self._history) and not self._history[-1]

    def can_stop(self) -> bool:
        """The output so far is complete: EOS is allowed next (more may still be allowed, e.g. digits)."""
        return not self.eos_accepted and self._matcher.is_accepting()

    def is_terminated(self) -> bool:
        """Nothing but EOS can follow (or EOS was accepted): the engine may end the request without
        another forward pass."""
        return self.eos_accepted or self._matcher.is_stopped()

    def accepts_prefix(self, tokens: Sequence[int]) -> int:
        """How many leading `tokens` the grammar accepts from the current state; the state is unchanged.
        Nothing after an EOS counts."""
        if self.eos_accepted:
            return 0
        tokens = [int(t) for t in tokens]
        stop = next((i for i, t in enumerate(tokens) if t in self._eos), len(tokens))
        valid = self._matcher.validate_tokens(tokens[:stop]) if stop else 0
        if valid < stop or stop == len(tokens):
            return valid
        # Every token before the EOS is valid: the EOS counts when the state after them is complete JSON.
        if stop and self._matcher.try_consume_tokens(tokens[:stop]) != stop:
            raise RuntimeError("llguidance validated tokens it then refused")
        complete = self._matcher.is_accepting()
        if stop and not self._matcher.rollback(stop):
            raise RuntimeError(f"llguidance refused to roll back {stop} tokens")
        return stop + 1 if complete else stop

    def fill_draft_masks(self, draft: Sequence[int], bitmask: torch.Tensor, first_row: int) -> int:
        """Masks for verifying a draft: row `first_row + i` gets the mask after the first i draft tokens,
        for i = 0 .. n where n = how many leading draft tokens the grammar accepts (returned). Rows past
        `first_row + n` are not written. The state is unchanged afterwards.

        With these rows applied to the target's logits at the draft positions, constrained greedy
        verification accepts exactly what constrained plain decoding would produce."""
        accepted = 0
        try:
            for i in range(len(draft) + 1):
                self.fill_mask(bitmask, first_row + i)
                if i == len(draft) or not self.accept(int(draft[i])):
                    break
                accepted += 1
        finally:
            self.rollback(accepted)
        return accepted

    def _only_eos(self) -> torch.Tensor:
        if self._eos_mask is None:
            words = [0] * self._width
            for token in self._eos:
                words[token // 32] |= 1 << (token % 32)
            # Each word as the int32 with the same bits (1 << 31 alone does not fit a signed int32).
            self._eos_mask = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)
        return self._eos_mask


# --- applying masks to logits -----------------------------------------------------------------------------

_TABLES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _byte_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(256, 8): row b holds 0 where bit j of byte b is set (allowed) and -inf where it is not."""
    table = _TABLES.get((device, dtype))
    if table is None:
        bits = (torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1  # (256, 8)
        table = torch.zeros(256, 8, dtype=dtype).masked_fill_(bits == 0, float("-inf")).to(device)
        _TABLES[(device, dtype)] = table
    return table


def apply_masks(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Set the disallowed logits to -inf, in place, for a whole batch in one op; returns `logits`.

    logits: (B, V) float, any device. bitmask: (R, W) int32 from `fill_mask` (on CPU; copied to the logits'
    device). Without `rows`, R == B and row i masks logits row i; with `rows` (R indices into the batch) only
    those logits rows are masked, so unconstrained rows of a mixed batch pay nothing. Columns past 32·W
    (logits wider than the mask) are disallowed. ~40 µs for one SmolLM2 row on this CPU (docs/performance.md).
    """
    if sys.byteorder != "little":
        raise NotImplementedError("apply_masks reads the int32 bitmask as little-endian bytes")
    vocab = logits.shape[-1]
    bitmask = bitmask.to(logits.device, non_blocking=True)
    words = bitmask.shape[-1]
    # Little-endian bytes of each int32 word: byte k of word w holds tokens 32w + 8k .. 32w + 8k + 7.
    as_bytes = bitmask.contiguous().view(torch.uint8).int()  # (R, 4W)
    forbidden = torch.nn.functional.embedding(as_bytes, _byte_table(logits.device, logits.dtype))  # (R, 4W, 8)
    forbidden = forbidden.view(bitmask.shape[0], words * 32)  # (R, 32W): 0 allowed, -inf not
    if words * 32 < vocab:
        pad = forbidden.new_full((bitmask.shape[0], vocab - words * 32), float("-inf"))
        forbidden = torch.cat([forbidden, pad], dim=-1)
    forbidden = forbidden[:, :vocab]  # (R, V)
    if rows is None:
        logits.add_(forbidden)
    else:
        logits.index_add_(0, rows.to(logits.device), forbidden)
    return logits


def grammar_bitmask(buffers: dict[int, torch.Tensor], rows: int, matcher: GrammarMatcher) -> torch.Tensor:
    """A (rows, width) int32 buffer for `matcher`'s masks, reused across steps from `buffers` (one per width;
    a step overwrites the rows it uses)."""
    width = matcher.bitmask_width
    buffer = buffers.get(width)
    if buffer is None or buffer.shape[0] < rows:
        buffer = buffers[width] = torch.full((max(rows, 8), width), -1, dtype=torch.int32)
    return buffer[:rows]
