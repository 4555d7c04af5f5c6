"""Markdown tables and matplotlib figures comparing runs: what lands in MLflow and Prefect artifacts.

Figures are built on `matplotlib.figure.Figure` with an Agg canvas, never through `pyplot`: no
display, no global figure registry that leaks memory in a long-running flow, safe from threads.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Literal

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Row = tuple[str, Mapping[str, float]]
Direction = Literal["higher", "lower", "none"]

# Words (split on "_") that mark a column where smaller is better.
_LOWER_WORDS = frozenset({"loss", "latency", "ms", "seconds", "time", "runtime", "perplexity", "ppl",
                          "memory", "mb", "gb", "bytes", "error", "errors", "truncation", "wer", "cer"})
# Counts and sizes describe a run; no value of theirs is "best".
_NEUTRAL_WORDS = frozenset({"n", "count", "params", "parameters", "examples", "requests", "step", "epoch"})
_NEUTRAL_NAMES = frozenset({"mean_new_tokens", "generated_tokens"})


def column_direction(name: str) -> Direction:
    """Whether a higher or lower value of column `name` is better, guessed from its words."""
    words = set(re.split(r"[_\W]+", name.casefold()))
    if name.casefold() in _NEUTRAL_NAMES or words & _NEUTRAL_WORDS:
        return "none"
    return "lower" if words & _LOWER_WORDS else "higher"


def comparison_markdown(rows: Sequence[Row], columns: Sequence[str] | None = None, *,
                        directions: Mapping[str, Direction] | None = None,
                        label_header: str = "model") -> str:
    """A markdown table, one row per run, best value of each column in bold.

    `columns` defaults to every metric in first-seen order. Which way is best is guessed from the
    column name (`column_direction`: loss/latency lower, counts not ranked, the rest higher) unless
    `directions` says otherwise. Each column gets one number format (decimals from its largest
    value), missing values show as an en dash, ties for best are all bold (and nothing is
    bold when every run ties).
    """
    if not rows:
        raise ValueError("comparison_markdown: no rows to compare")
    columns = list(columns) if columns is not None else _all_columns(rows)
    overrides = dict(directions or {})
    cells = [[_escape(label)] for label, _ in rows]
    for column in columns:
        values = [_number(metrics.get(column)) for _, metrics in rows]
        texts = _format_column(values)
        best = _best(values, texts, overrides.get(column) or column_direction(column))
        for row_cells, text, is_best in zip(cells, texts, best):
            row_cells.append(f"**{text}**" if is_best else text)
    header = [_escape(label_header)] + [_escape(column) for column in columns]
    align = [":---"] + ["---:"] * len(columns)
    lines = [_line(header), _line(align)] + [_line(row_cells) for row_cells in cells]
    return "\n".join(lines) + "\n"


def format_column(values: Sequence[float | None]) -> list[str]:
    """Public for reuse in text reports: same formatting as the markdown table."""
    return _format_column([_number(value) for value in values])


def plot_loss_curve(train: Sequence[tuple[int, float]], validation: Sequence[tuple[int, float]],
                    *, title: str = "loss") -> Figure:
    """Training loss per step as a line, validation loss as a line with markers (when there is any)."""
    if not train and not validation:
        raise ValueError("plot_loss_curve: no loss values to plot")
    figure = _figure((7, 4))
    axes = figure.add_subplot()
    for points, name, style in ((train, "train", {}), (validation, "validation", {"marker": "o"})):
        if points:
            steps, losses = zip(*sorted(points))
            axes.plot(steps, losses, label=name, **style)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure


def plot_metric_comparison(rows: Sequence[Row], columns: Sequence[str] | None = None, *,
                           title: str = "metrics") -> Figure:
    """Grouped bars: one group per metric, one bar (colour) per run; a missing value leaves a gap.

    Put metrics of one scale together (all in [0, 1], or all tokens/s): one axis serves them all.
    """
    if not rows:
        raise ValueError("plot_metric_comparison: no rows to plot")
    columns = list(columns) if columns is not None else _all_columns(rows)
    if not columns:
        raise ValueError("plot_metric_comparison: the rows have no metrics")
    figure = _figure((max(6.0, 1.2 * len(columns) * max(1, len(rows)) ** 0.5 + 2), 4))
    axes = figure.add_subplot()
    width = 0.8 / len(rows)
    for index, (label, metrics) in enumerate(rows):
        offsets = [group + (index - (len(rows) - 1) / 2) * width for group in range(len(columns))]
        heights = [_number(metrics.get(column)) for column in columns]
        axes.bar(offsets, [math.nan if h is None else h for h in heights], width, label=label)
    axes.set_xticks(range(len(columns)), columns, rotation=20 if len(columns) > 4 else 0, ha="right"
                    if len(columns) > 4 else "center")
    axes.set_title(title)
    axes.grid(axis="y", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure


def plot_acceptance_histogram(histogram: Sequence[int], *, title: str = "accepted drafts per step") -> Figure:
    """Share of verification steps that accepted 0, 1, …, K drafted tokens (τ = 1 + the mean)."""
    if not histogram or sum(histogram) == 0:
        raise ValueError("plot_acceptance_histogram: no verification steps")
    total = sum(histogram)
    mean = sum(k * n for k, n in enumerate(histogram)) / total
    figure = _figure((6, 4))
    axes = figure.add_subplot()
    axes.bar(range(len(histogram)), [n / total for n in histogram], color="tab:blue")
    axes.axvline(mean, color="tab:red", linestyle="--", label=f"mean {mean:.2f} (τ = {1 + mean:.2f})")
    axes.set_xticks(range(len(histogram)))
    axes.set_xlabel("drafted tokens accepted in one step")
    axes.set_ylabel("share of steps")
    axes.set_title(title)
    axes.legend()
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return figure


def plot_throughput(rates: Mapping[str, float], *, baseline: str | None = None,
                    title: str = "tokens/s, batch 1, greedy") -> Figure:
    """One bar per decoder; with `baseline`, each bar is labelled with its ratio to that decoder."""
    if not rates:
        raise ValueError("plot_throughput: no decoders")
    figure = _figure((max(6.0, 1.6 * len(rates)), 4))
    axes = figure.add_subplot()
    names = list(rates)
    bars = axes.bar(names, [rates[n] for n in names], color="tab:green")
    if baseline is not None:
        for bar, name in zip(bars, names, strict=True):
            axes.annotate(f"{rates[name] / rates[baseline]:.2f}x", (bar.get_x() + bar.get_width() / 2,
                                                                   bar.get_height()), ha="center", va="bottom")
    axes.set_ylabel("tokens/s")
    axes.set_title(title)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return figure


def _figure(size: tuple[float, float]) -> Figure:
    figure = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(figure)  # attaches itself: savefig/print_png work without pyplot
    return figure


def _all_columns(rows: Sequence[Row]) -> list[str]:
    seen: dict[str, None] = {}
    for _, metrics in rows:
        seen.update(dict.fromkeys(metrics))
    return list(seen)


def _number(value: object) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if not isinstance(value, numbers.Real):
        raise TypeError(f"metric values must be numbers, got {value!r}")
    value = float(value)
    return None if math.isnan(value) else value


def _format_column(values: list[float | None]) -> list[str]:
    present = [v for v in values if v is not None]
    if not present:
        return ["–"] * len(values)
    if all(isinstance(v, int) or (math.isfinite(v) and v.is_integer() and abs(v) >= 1000) for v in present):
        return ["–" if v is None else f"{int(v):,}" for v in values]
    finite = [abs(v) for v in present if math.isfinite(v)]
    largest = max(finite, default=0)
    if 0 < largest < 0.01:
        spec = ".3g"
    else:
        decimals = 0 if largest >= 1000 else 1 if largest >= 100 else 2 if largest >= 10 else 3
        spec = f",.{decimals}f"
    return ["–" if v is None else format(v, spec) for v in values]


def _best(values: list[float | None], texts: list[str], direction: Direction) -> list[bool]:
    """Best by displayed text's value, so two cells that print alike are both bold or neither."""
    present = [v for v in values if v is not None]
    if direction == "none" or len(present) < 2:
        return [False] * len(values)
    target = min(present) if direction == "lower" else max(present)
    target_text = texts[values.index(target)]
    if all(text == target_text for text, v in zip(texts, values) if v is not None):
        return [False] * len(values)  # everyone ties: nothing stands out
    return [v is not None and text == target_text for text, v in zip(texts, values)]


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"
