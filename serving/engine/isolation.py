"""How a failure stays with the request or adapter that caused it (DESIGN: tenancy and trust).

Many tenants share one forward, so a single bad input would otherwise fail everyone in the batch:
an adapter whose weights overflow, Turbo heads of the wrong shape, a bug hit by one request's layout.
The engine runs the shared work once and, only when it raises, again in smaller pieces, so that what
still raises can be pinned on its own request:

* `run_isolated`: a forward over many sequences that raised is rerun one sequence at a time;
* `row_logits`: one LM-head call for every row, row by row only if it raises;
* `draft_rows`: Turbo heads run per adapter, so one adapter's heads failing fails only its rows;
* `NonFiniteValues`: a row whose logits hold NaN/Inf is failed, never sampled (garbage, or a crash
  inside `torch.multinomial` that would take the batch down).

Pure PyTorch and policy-free: the engine decides what a failure means for its requests.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

log = logging.getLogger(__name__)

Item = TypeVar("Item")
_MESSAGE_CHARS = 300  # of an exception's first line quoted in a request's error


class NonFiniteValues(ArithmeticError):
    """Logits or head states hold NaN or Inf: sampling them would emit garbage."""


def describe(error: BaseException) -> str:
    """An exception for a request's error message: its type and first line, bounded."""
    lines = str(error).splitlines()
    text = lines[0][:_MESSAGE_CHARS] if lines else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@dataclass
class Isolated(Generic[Item]):
    """What `run_isolated` ran: the items that succeeded, their (first row, count) in `hidden`, and the
    items that raised on their own with their errors."""

    kept: list[Item]
    rows: list[tuple[int, int]]
    hidden: torch.Tensor | None
    failures: list[tuple[Item, Exception]] = field(default_factory=list)


def run_isolated(items: list[Item], run: Callable[[list[Item]], tuple[torch.Tensor, list[tuple[int, int]]]]
                 ) -> Isolated[Item]:
    """`run(items)` -> (hidden (N, d), rows (first row, count) per item); if it raises, `run([item])`
    for each item, keeping those that succeed (their hidden states concatenated in item order).

    Only safe when rerunning an item is idempotent (the engine's forward is: see `Engine._forward`)."""
    try:
        hidden, rows = run(items)
        return Isolated(list(items), rows, hidden)
    except Exception:  # attributed below, one item at a time
        log.warning("a forward of %d sequences failed; running them one by one", len(items), exc_info=True)
    result: Isolated[Item] = Isolated([], [], None)
    parts, offset = [], 0
    for item in items:
        try:
            hidden, ((_, count),) = run([item])
        except Exception as error:  # this item's own failure
            log.warning("a sequence failed in the forward pass on its own", exc_info=True)
            result.failures.append((item, error))
            continue
        result.kept.append(item)
        result.rows.append((offset, count))
        parts.append(hidden)  # (count, d)
        offset += count
    result.hidden = torch.cat(parts) if parts else None
    return result


RowLogits = tuple[torch.Tensor, list[int], bool]  # one row's (k+1, V) logits, their argmax, all finite


def row_logits(lm_head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
               spans: list[tuple[int, int]]) -> list[RowLogits | Exception]:
    """Logits, greedy tokens and finiteness of each (first row, count) span of `hidden`: one LM-head
    call, one argmax and one finiteness check for all rows; span by span only if that call raises."""
    index = [row for first, count in spans for row in range(first, first + count)]
    try:
        return _split(lm_head(hidden[torch.tensor(index, device=hidden.device)]), spans)  # (M, V)
    except Exception:  # attributed below, span by span
        log.warning("the LM head failed for %d rows; computing them one by one", len(index), exc_info=True)
    out: list[RowLogits | Exception] = []
    for first, count in spans:
        try:
            out.extend(_split(lm_head(hidden[first: first + count]), [(first, count)]))
        except Exception as error:  # noqa: BLE001 - this row's own failure, returned to its owner
            out.append(error)
    return out


def _split(logits: torch.Tensor, spans: list[tuple[int, int]]) -> list[RowLogits]:
    counts = [count for _, count in spans]
    greedy = logits.argmax(dim=-1).tolist()  # (M,) cheap, used by every greedy row
    finite = torch.isfinite(logits).all(dim=-1).tolist()  # (M,)
    out, cursor = [], 0
    for part, count in zip(logits.split(counts), counts):
        out.append((part, greedy[cursor: cursor + count], all(finite[cursor: cursor + count])))
        cursor += count
    return out


def draft_rows(states: list[torch.Tensor], heads: list[Any], logits: Callable[[torch.Tensor], torch.Tensor],
               dtype: torch.dtype) -> tuple[list[list[int] | None], dict[int, Exception]]:
    """Each row's draft chain from its own heads over its state (d,); failures per row index.

    Rows sharing heads (the same adapter) go through the heads together; every group's head states
    then share one LM-head call (`logits`), whose cost on CPU is mostly reading the (V x d) weight once.
    Heads that raise or return states of the wrong shape, or non-finite ones, fail their own rows only.
    """
    drafts: list[list[int] | None] = [None] * len(states)
    failures: dict[int, Exception] = {}
    groups: dict[int, list[int]] = {}
    for i, row_heads in enumerate(heads):
        groups.setdefault(id(row_heads), []).append(i)
    done: list[tuple[list[int], torch.Tensor]] = []  # members, head states (n, K, d)
    for members in groups.values():
        try:
            done.append((members, head_states(heads[members[0]], [states[i] for i in members], dtype)))
        except Exception as error:  # these heads' own failure
            log.warning("Turbo heads failed for %d rows", len(members), exc_info=True)
            failures.update(dict.fromkeys(members, error))
    if not done:
        return drafts, failures
    flat = torch.cat([hs.reshape(-1, hs.shape[-1]) for _, hs in done])  # (sum n*K, d)
    try:
        tokens = logits(flat).argmax(dim=-1).tolist()
    except Exception:  # states were checked, so not any one adapter's fault: nobody drafts this step
        log.warning("the LM head failed on head states; no drafts this step", exc_info=True)
        return drafts, failures
    cursor = 0
    for members, hs in done:
        k = hs.shape[1]
        for i in members:
            drafts[i] = tokens[cursor: cursor + k]
            cursor += k
    return drafts, failures


def head_states(heads: Any, states: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """(n, K, d) states of one adapter's heads over its rows' states, checked before they meet the LM head."""
    stacked = torch.stack(states)  # (n, d)
    head_dtype = next(heads.parameters()).dtype
    out = heads(stacked.to(head_dtype)).to(dtype).transpose(0, 1)  # (n, K, d)
    if out.dim() != 3 or out.shape[0] != len(states) or out.shape[2] != stacked.shape[1]:
        raise ValueError(f"heads returned states of shape {tuple(out.shape)} for {len(states)} rows of width "
                         f"{stacked.shape[1]}")
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteValues("the heads produced non-finite values (NaN or Inf)")
    return out
