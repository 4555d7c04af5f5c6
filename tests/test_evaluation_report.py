"""Comparison tables and figures: content, formatting, best-value bolding, number of lines and bars."""

from __future__ import annotations

import math

import pytest
from matplotlib.figure import Figure

from lorafleet.evaluation.report import (
    column_direction,
    comparison_markdown,
    plot_loss_curve,
    plot_metric_comparison,
)

ROWS = [
    ("base", {"field_f1": 0.41234, "tokens_per_s": 12.3, "latency_p50_ms": 81.25, "n_examples": 200}),
    ("lora r16", {"field_f1": 0.9, "tokens_per_s": 11.0, "latency_p50_ms": 90.0, "n_examples": 200,
                  "eval_loss": 0.5}),
    ("qlora", {"field_f1": 0.85, "tokens_per_s": 9.5, "latency_p50_ms": 120.0, "n_examples": 200,
               "eval_loss": math.nan}),
]


def _cells(table: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in table.strip().splitlines()]


def test_table_layout_and_content():
    cells = _cells(comparison_markdown(ROWS))
    assert cells[0] == ["model", "field_f1", "tokens_per_s", "latency_p50_ms", "n_examples", "eval_loss"]
    assert cells[1] == [":---", "---:", "---:", "---:", "---:", "---:"]
    assert [row[0] for row in cells[2:]] == ["base", "lora r16", "qlora"]
    assert cells[2] == ["base", "0.412", "**12.30**", "**81.2**", "200", "–"]
    assert cells[3] == ["lora r16", "**0.900**", "11.00", "90.0", "200", "0.500"]
    assert cells[4] == ["qlora", "0.850", "9.50", "120.0", "200", "–"]  # NaN shows as missing


def test_columns_select_and_order():
    cells = _cells(comparison_markdown(ROWS, ["tokens_per_s", "field_f1"]))
    assert cells[0] == ["model", "tokens_per_s", "field_f1"]
    assert len(cells) == 2 + len(ROWS)


def test_ties_and_single_values():
    rows = [("a", {"acc": 0.5, "x": 1.0}), ("b", {"acc": 0.5, "x": 2.0}), ("c", {"acc": 0.25, "x": 2.0})]
    cells = _cells(comparison_markdown(rows))
    assert [row[1] for row in cells[2:]] == ["**0.500**", "**0.500**", "0.250"]
    assert [row[2] for row in cells[2:]] == ["1.000", "**2.000**", "**2.000**"]
    single = _cells(comparison_markdown([("only", {"acc": 0.5})]))
    assert single[2] == ["only", "0.500"]  # nothing to beat, nothing bold


def test_direction_override_and_guessing():
    assert column_direction("eval_loss") == "lower"
    assert column_direction("latency_p95_ms") == "lower"
    assert column_direction("tokens_per_s") == "higher"
    assert column_direction("field_f1") == "higher"
    assert column_direction("n_examples") == "none"
    cells = _cells(comparison_markdown(ROWS, ["field_f1"], directions={"field_f1": "lower"}))
    assert cells[2][1] == "**0.412**"


def test_number_formats():
    rows = [("a", {"big": 12345.6, "count": 1500, "tiny": 0.000123, "mid": 150.25}),
            ("b", {"big": 999.0, "count": 7, "tiny": 0.0005, "mid": 3.0})]
    cells = _cells(comparison_markdown(rows, directions={"big": "none", "count": "none", "tiny": "none",
                                                         "mid": "none"}))
    assert cells[2][1:] == ["12,346", "1,500", "0.000123", "150.2"]
    assert cells[3][1:] == ["999", "7", "0.0005", "3.0"]


def test_labels_with_pipes_are_escaped():
    table = comparison_markdown([("a|b", {"x": 1.0})])
    assert "a\\|b" in table


def test_table_errors():
    with pytest.raises(ValueError, match="no rows"):
        comparison_markdown([])
    with pytest.raises(TypeError, match="numbers"):
        comparison_markdown([("a", {"x": "high"})])


def test_loss_curve_lines():
    figure = plot_loss_curve([(3, 1.0), (1, 2.0), (2, 1.5)], [(2, 1.7), (3, 1.2)])
    assert isinstance(figure, Figure)
    lines = figure.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["train", "validation"]
    assert list(lines[0].get_xdata()) == [1, 2, 3]  # sorted by step
    assert list(lines[1].get_ydata()) == [1.7, 1.2]
    assert len(plot_loss_curve([(1, 2.0)], []).axes[0].get_lines()) == 1


def test_loss_curve_renders_to_png(tmp_path):
    path = tmp_path / "loss.png"
    plot_loss_curve([(1, 2.0), (2, 1.0)], [(2, 1.5)]).savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no loss"):
        plot_loss_curve([], [])


def test_metric_comparison_bars():
    figure = plot_metric_comparison(ROWS, ["field_f1", "eval_loss"])
    axes = figure.axes[0]
    assert len(axes.containers) == len(ROWS)  # one bar series per run
    assert all(len(container) == 2 for container in axes.containers)  # one bar per metric
    assert [t.get_text() for t in axes.get_xticklabels()] == ["field_f1", "eval_loss"]
    assert axes.containers[1][0].get_height() == pytest.approx(0.9)
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["base", "lora r16", "qlora"]
    all_metrics = plot_metric_comparison(ROWS)
    assert sum(len(c) for c in all_metrics.axes[0].containers) == len(ROWS) * 5
