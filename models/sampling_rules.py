"""What a request may ask of a decoder, and where its answer ends: one set of rules for every decoder.

Three decoders produce tokens (`models/decoding.py`, the engine under `serving/engine/`, the PEFT runner in
`serving/generation/runner.py`) and the HTTP API checks requests before any of them sees one. They used to
carry their own copies of these rules and disagreed (which ids end a sequence, whether a seed fits). Now:

- the **bounds** a request's sampling fields must meet (`check_*`, `SEED_MIN`...): the values every decoder
  can represent, so the API refuses exactly what the engine would fail on;
- the **end-of-sequence ids** of a model and tokenizer (`eos_token_ids`): the tokenizer's EOS and the
  generation config's, which chat models set differently (SmolLM2 ends turns with `<|im_end|>`);
- the **cut** (`cut_at_stop`): a step's new tokens are cut at the row's remaining budget, then before its
  first stop token; as in Hugging Face `generate`, a stop token counts against the budget.

Pure Python: importable by models/, the engine, evaluation and the API alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

# What the engine can represent; the HTTP schema imports these so both edges refuse the same values.
SEED_MIN = -(2**63)  # torch.Generator.manual_seed takes any int in [-2**63, 2**64 - 1]
SEED_MAX = 2**64 - 1
MAX_NEW_TOKENS_LIMIT = 2**20  # far past any context served here; refuses absurd budgets early
TOKEN_ID_MAX = 2**63 - 1  # token ids become int64 tensors
TEMPERATURE_MAX = 2.0  # OpenAI's range, kept by the API and the service's requests; decoders take any finite >= 0

StopReason = Literal["stop", "length"]


class InvalidRequest(ValueError):
    """A request a decoder cannot run as asked; nothing was queued or allocated.

    `param` names the field at fault as the caller named it (`max_new_tokens`, `seed`, `prompt_ids`...), so
    the service can name the matching API parameter in its 400 answer."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def is_int(value: object) -> bool:
    """An int that is not a bool (`True` is not a token id or a budget)."""
    return isinstance(value, int) and not isinstance(value, bool)


def shown(value: object) -> str:
    """A refused value for an error message, bounded (a 10**5-digit int must not become a 100 kB error)."""
    if isinstance(value, int) and abs(value) >= 10**40:  # repr of a huge int is slow, past 4300 digits an error
        return f"an int of about 10**{int(value.bit_length() * 0.30103)}"
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_max_new_tokens(value: object, *, minimum: int = 1, param: str = "max_new_tokens") -> int:
    """A token budget in [minimum, MAX_NEW_TOKENS_LIMIT]."""
    if not is_int(value) or not minimum <= value <= MAX_NEW_TOKENS_LIMIT:
        raise InvalidRequest(f"{param} must be an int in [{minimum}, {MAX_NEW_TOKENS_LIMIT}], got {shown(value)}",
                             param=param)
    return value


def check_temperature(value: object, *, maximum: float = math.inf, param: str = "temperature") -> float:
    """A finite temperature >= 0 (0 = greedy), at most `maximum`."""
    if not _is_number(value) or not math.isfinite(value) or not 0 <= value <= maximum:
        bound = "" if maximum == math.inf else f" and <= {maximum:g}"
        raise InvalidRequest(f"{param} must be a finite number >= 0{bound} (0 = greedy), got {shown(value)}",
                             param=param)
    return float(value)


def check_top_p(value: object, *, param: str = "top_p") -> float:
    """A nucleus mass in (0, 1]."""
    if not _is_number(value) or not 0 < value <= 1:  # NaN fails both comparisons
        raise InvalidRequest(f"{param} must be a number in (0, 1], got {shown(value)}", param=param)
    return float(value)


def check_seed(value: object, *, param: str = "seed") -> int | None:
    """None, or an int the engine's RNG accepts."""
    if value is not None and (not is_int(value) or not SEED_MIN <= value <= SEED_MAX):
        raise InvalidRequest(f"{param} must be an int in [{SEED_MIN}, {SEED_MAX}] or None, got {shown(value)}",
                             param=param)
    return value


def check_stop_ids(value: object, *, param: str = "stop_token_ids") -> frozenset[int]:
    """A collection of token ids as a frozenset of ints in [0, TOKEN_ID_MAX]."""
    try:
        stops = frozenset(value)  # type: ignore[arg-type]
    except TypeError as error:
        raise InvalidRequest(f"{param} must be a collection of ints, got {type(value).__name__}",
                             param=param) from error
    if any(not is_int(t) or not 0 <= t <= TOKEN_ID_MAX for t in stops):
        raise InvalidRequest(f"{param} must be ints in [0, {TOKEN_ID_MAX}]", param=param)
    return stops


def eos_token_ids(model: Any = None, tokenizer: Any = None, *, required: bool = False) -> tuple[int, ...]:
    """Every id that ends a sequence: the tokenizer's EOS, then the model's generation-config EOS ids.

    Both matter: chat models often list several (SmolLM2's chat template ends turns with `<|im_end|>`, its
    base config with `<|endoftext|>`), training appends the tokenizer's EOS, and Hugging Face `generate`
    always stops at the generation config's. A PEFT wrapper forwards `generation_config` to its base model.
    `required`: a ValueError when neither defines one (a decoder could then never stop early)."""
    ids: list[int] = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (getattr(tokenizer, "eos_token_id", None), config_eos):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    if required and not ids:
        raise ValueError("neither the tokenizer nor the model's generation_config defines an EOS token: "
                         "generation could never stop early")
    return tuple(ids)


def cut_at_stop(tokens: Sequence[int], budget: int, stops: Iterable[int] | frozenset[int]
                ) -> tuple[list[int], StopReason | None]:
    """(the tokens a row keeps, why it ends or None): cut at `budget`, then before the first stop token.

    A row that keeps exactly `budget` tokens ends for "length"; the stop token itself is never kept but
    counts against the budget (it was generated), as in Hugging Face `generate`."""
    budget = max(budget, 0)
    kept = list(tokens[:budget])
    stop_set = stops if isinstance(stops, (frozenset, set)) else frozenset(stops)
    stop_at = next((j for j, token in enumerate(kept) if token in stop_set), None)
    if stop_at is not None:
        return kept[:stop_at], "stop"
    if len(kept) == budget:
        return kept, "length"
    return kept, None
