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

from lorafleet.models.lora_weights import LORA_MODULES

Row = tuple[str, Mapping[str, float]]
Direction = Literal["higher", "lower", "none"]

# Words (split on "_") that mark a column where smaller is better.
_LOWER_WORDS = frozenset({"loss", "latency", "ms", "seconds", "time", "runtime", "perplexity", "ppl",
                          "memory", "mb", "gb", "bytes", "error", "errors", "truncation", "wer", "cer"})
# Counts and sizes describe a run; no value of theirs is "best".
_NEUTRAL_WORDS = frozenset({"n", "count", "params", "parameters", "examples", "requests", "step", "epoch"})
_NEUTRAL_NAMES = frozenset({"mean_new_tokens", "generated_tokens"})
_LAYER = re.compile(r"layers\.(\d+)\.")


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


def rank_grid(rank_pattern: Mapping[str, int]) -> tuple[list[str], list[str], list[list[int | None]]]:
    """(layer labels, module names, ranks[layer][module]) of an adapter's per-projection ranks.

    Keys are PEFT module names (`model.layers.3.self_attn.q_proj`): the number after `layers.` is the
    layer, the last part the module; a projection the pattern does not name is None."""
    if not rank_pattern:
        raise ValueError("rank_grid: the rank pattern is empty")
    cells: dict[tuple[str, str], int] = {}
    for name, rank in rank_pattern.items():
        match = _LAYER.search(name)
        cells[(match.group(1) if match else name.rsplit(".", 1)[0], name.rsplit(".", 1)[-1])] = int(rank)
    layers = sorted({layer for layer, _ in cells},
                    key=lambda x: (not x.isdigit(), int(x) if x.isdigit() else 0, x))
    modules = sorted({module for _, module in cells},
                     key=lambda m: (LORA_MODULES.index(m) if m in LORA_MODULES else len(LORA_MODULES), m))
    return layers, modules, [[cells.get((layer, module)) for module in modules] for layer in layers]


def describe_rank_pattern(rank_pattern: Mapping[str, int], *, budget: int | None = None) -> str:
    """One line for a log: total rank (against the budget), mean rank per module, total per layer."""
    layers, modules, grid = rank_grid(rank_pattern)
    total = sum(rank for row in grid for rank in row if rank is not None)
    per_module = []
    for j, module in enumerate(modules):
        ranks = [row[j] for row in grid if row[j] is not None]
        per_module.append(f"{module} {sum(ranks) / len(ranks):.1f}")
    per_layer = [f"{layer}: {sum(rank for rank in row if rank is not None)}"
                 for layer, row in zip(layers, grid, strict=True)]
    against = f" of a budget of {budget}" if budget is not None else ""
    return (f"total rank {total}{against} over {len(rank_pattern)} projections; mean rank per module: "
            f"{', '.join(per_module)}; rank per layer: {', '.join(per_layer)}")


def plot_rank_pattern(rank_pattern: Mapping[str, int], *, max_rank: int | None = None,
                      title: str = "AdaLoRA rank per projection") -> Figure:
    """Heatmap of the rank each projection kept: layers down, modules across, the rank in each cell.

    `max_rank` (AdaLoRA's init_r) fixes the colour scale, so patterns of different runs compare."""
    layers, modules, grid = rank_grid(rank_pattern)
    values = [[math.nan if rank is None else rank for rank in row] for row in grid]
    top = max_rank or max((rank for row in grid for rank in row if rank is not None), default=1)
    figure = _figure((1.2 + 0.9 * len(modules), 1.2 + 0.32 * len(layers)))
    axes = figure.add_subplot()
    image = axes.imshow(values, aspect="auto", cmap="viridis", vmin=0, vmax=max(top, 1))
    if len(layers) * len(modules) <= 400:  # beyond that the numbers are unreadable; the colours remain
        for i, row in enumerate(grid):
            for j, rank in enumerate(row):
                if rank is not None:
                    axes.text(j, i, str(rank), ha="center", va="center", fontsize=7,
                              color="white" if rank < 0.6 * top else "black")
    axes.set_xticks(range(len(modules)), modules, rotation=30, ha="right")
    axes.set_yticks(range(len(layers)), layers)
    axes.set_xlabel("module")
    axes.set_ylabel("layer")
    total = sum(rank for row in grid for rank in row if rank is not None)
    axes.set_title(f"{title} (total {total})")
    figure.colorbar(image, ax=axes, label="rank")
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
