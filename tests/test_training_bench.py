"""`lorafleet bench training`: LoRA vs QLoRA on one config, each trained in a fresh process, with its peak memory.

Numbers are machine-dependent, so the tests check the shape of the report and what must hold whatever the
speed: the same steps and trainable parameters on both bases, losses that are real numbers, ratios
against the first method, and that nothing lands in the user's home.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorafleet.config import parse_config
from lorafleet.tasks.training_bench import training_bench

from flow_helpers import copy_task_config, write_copy_task


def small_config(folder: Path):
    return parse_config(copy_task_config(write_copy_task(folder / "copy.jsonl", n=80), steps=120))


@pytest.mark.timeout(900)
def test_lora_and_qlora_train_side_by_side_each_in_its_own_process(tmp_path, settings):
    lines: list[str] = []
    report = training_bench(small_config(tmp_path), settings, methods=["lora", "qlora"], steps=3,
                            on_line=lines.append)

    lora, qlora = report.rows
    assert (lora.method, qlora.method) == ("lora", "qlora") and report.steps == 3
    for row in report.rows:
        assert row.steps == 3 and row.device == "cpu" and row.memory_measure == "process peak RSS"
        assert row.tokens_per_s > 0 and row.seconds_per_step > 0
        assert row.peak_memory_mb > 50  # a process that imported torch and loaded a model
        assert math.isfinite(row.first_train_loss) and math.isfinite(row.last_train_loss)
    assert qlora.trainable_params == lora.trainable_params  # the same LoRA, on a 4-bit base
    assert qlora.first_train_loss != lora.first_train_loss  # the 4-bit base computes other logits
    ratios = report.to_dict()["ratios"]["qlora"]
    assert ratios["tokens_per_s_vs_lora"] == pytest.approx(qlora.tokens_per_s / lora.tokens_per_s)
    assert ratios["peak_memory_vs_lora"] == pytest.approx(qlora.peak_memory_mb / lora.peak_memory_mb)
    assert any(line.startswith("qlora: ") and "tokens/s" in line for line in lines)
    # trained in throw-away homes: the user's home has no checkpoint, adapter or prepared data from it
    assert not any(settings.checkpoints_dir.glob("*")) and not any(settings.adapters_dir.glob("*"))


def test_an_unknown_method_is_refused_before_anything_trains(tmp_path, settings):
    with pytest.raises(ValueError, match=r"--methods: 'dora' is not one of lora, qlora, turbo_lora"):
        training_bench(small_config(tmp_path), settings, methods=["lora", "dora"], steps=3,
                       on_line=pytest.fail)  # nothing may start training


def test_the_command_names_a_bad_method_without_a_traceback(tmp_path, home):
    from lorafleet.flows.cli import app

    config = tmp_path / "copy.yaml"
    config.write_text(json.dumps(copy_task_config(write_copy_task(tmp_path / "copy.jsonl", n=80))))
    out = tmp_path / "training.json"
    result = CliRunner().invoke(app, ["bench", "training", str(config), "--methods", "lora,turbo",
                                      "--json", str(out)])
    assert result.exit_code == 2, result.output  # _fail: a usage error
    assert "--methods: 'turbo' is not one of" in result.output and "Traceback" not in result.output
    assert not out.exists()
