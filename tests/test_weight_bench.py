"""`bench weights` (evaluation/weight_bench.py) on the tiny model: its agreement and size figures mean
what they say; timing figures are only checked for presence (tests never judge speed)."""

from __future__ import annotations

import pytest

from lorafleet.evaluation.weight_bench import (
    build_format,
    greedy_continuations,
    load_llama_cpp,
    measure_weight_formats,
    teacher_forced_agreement,
    weight_bytes,
)
from tests.test_engine_model import tiny_hf

PROMPTS = [list(range(3, 3 + n)) for n in (5, 9, 14)]


def test_teacher_forced_agreement_counts_each_position_once():
    hf = tiny_hf(seed=2)
    fp32 = build_format(hf, "fp32")
    continuations = greedy_continuations(fp32, PROMPTS, 12)
    assert [len(c) for c in continuations] == [12, 12, 12]
    assert teacher_forced_agreement(fp32, PROMPTS, continuations) == (36, 36)
    wrong = [[(token + 1) % 320 for token in c] for c in continuations]  # no position can match
    assert teacher_forced_agreement(fp32, PROMPTS, wrong) == (0, 36)
    # a changed token is a miss at its own position (the positions before it are untouched)
    one_off = [c[:5] + [(c[5] + 1) % 320] + c[6:] for c in continuations]
    matches, total = teacher_forced_agreement(fp32, PROMPTS, one_off)
    assert total == 36 and 3 * 5 <= matches <= 36 - 3


def test_weight_bytes_shrink_with_the_format():
    hf = tiny_hf(seed=2)
    sizes = {name: weight_bytes(build_format(hf, name)) for name in ("fp32", "bf16", "int8", "int4")}
    assert sizes["fp32"] == 2 * sizes["bf16"]
    assert sizes["int4"] < sizes["int8"] < sizes["bf16"]
    with pytest.raises(ValueError, match="unknown weight format 'int3'"):
        build_format(hf, "int3")


def test_report_without_llama_cpp_says_why_and_keeps_engine_ratios():
    hf = tiny_hf(seed=2)
    report = measure_weight_formats(hf, ["fp32", "int4"], decode_prompt=PROMPTS[1], agreement_prompts=PROMPTS,
                                    max_new_tokens=6, rounds=1, gguf=None, progress=lambda line: None)
    assert [fig.weights for fig in report.formats] == ["fp32", "int4"]
    assert report.formats[0].greedy_agreement == 1.0 and report.formats[0].agreement_tokens == 18
    assert 0.0 <= report.formats[1].greedy_agreement <= 1.0
    assert report.llama_cpp_decode_ms_per_token is None and "no GGUF" in report.llama_cpp_note
    assert set(report.ratios) == {"int4_vs_fp32"} and report.formats[1].decode_ms_per_token > 0
    assert load_llama_cpp(None, 2)[0] is None


def test_token_by_token_agreement_reads_the_same_positions_as_the_one_forward_figure():
    """`decode_steps` feeds each continuation token through its own one-token forward (the path serving
    and `compile_decode` run); on the reference model itself both readings agree everywhere."""
    hf = tiny_hf(seed=2)
    fp32 = build_format(hf, "fp32")
    continuations = greedy_continuations(fp32, PROMPTS, 10)
    assert teacher_forced_agreement(fp32, PROMPTS, continuations, decode_steps=True) == (30, 30)
    wrong = [[(token + 1) % 320 for token in c] for c in continuations]
    assert teacher_forced_agreement(fp32, PROMPTS, wrong, decode_steps=True) == (0, 30)


def test_report_with_compiled_decode_adds_a_compiled_twin_per_format():
    hf = tiny_hf(seed=2)
    report = measure_weight_formats(hf, ["int4"], decode_prompt=PROMPTS[1], agreement_prompts=PROMPTS,
                                    max_new_tokens=6, rounds=1, gguf=None, compile_decode=True,
                                    progress=lambda line: None)
    eager, compiled = report.formats
    assert (eager.label, compiled.label) == ("int4", "int4+compiled") and compiled.compiled
    assert compiled.decode_ms_per_token > 0 and compiled.agreement_tokens == eager.agreement_tokens == 18
    # same weights, same arithmetic up to fused rounding: the compiled step's token-by-token agreement
    # equals the eager step's on this tiny model
    assert compiled.decode_agreement == eager.decode_agreement == compiled.greedy_agreement
    assert report.to_dict()["formats"][1]["label"] == "int4+compiled"
