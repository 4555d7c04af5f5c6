"""The project's own `evaluate` metrics: values on hand-made cases, offline loading, concurrent loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import evaluate
import pytest

from lorafleet.evaluation.metrics import METRIC_NAMES, compute_quality, load_metric, metric_path

MR = "inform(name[Tomb Raider], release_year[1999], genres[puzzle, platformer], rating[excellent])"
# Same fields as MR in another order and spacing: not an exact match, a perfect field match.
MR_REORDERED = "inform(rating[excellent],  genres[platformer, puzzle], name[Tomb Raider], release_year[1999])"
# 3 of MR's 6 fields right (act, name, puzzle) plus 2 wrong ones (release_year, rating).
MR_PARTIAL = "inform(name[Tomb Raider], release_year[2001], genres[puzzle], rating[poor])"


# --- structured_match values ----------------------------------------------------------------------

def test_perfect_viggo():
    metrics = compute_quality([MR, MR_REORDERED], [MR, MR], "viggo_mr")
    assert metrics["exact_match"] == 0.5
    assert metrics["field_precision"] == metrics["field_recall"] == metrics["field_f1"] == 1.0
    assert metrics["set_match"] == 1.0 and metrics["parse_rate"] == 1.0


def test_partial_viggo_is_micro_averaged():
    metrics = compute_quality([MR_PARTIAL], [MR], "viggo_mr")
    # MR has 6 fields; MR_PARTIAL has 5, of which act, name, genres=puzzle are right.
    assert metrics["field_precision"] == pytest.approx(3 / 5)
    assert metrics["field_recall"] == pytest.approx(3 / 6)
    assert metrics["field_f1"] == pytest.approx(2 * (3 / 5) * (3 / 6) / (3 / 5 + 3 / 6))
    assert metrics["exact_match"] == 0.0 and metrics["set_match"] == 0.0


def test_unparsable_predictions_count_as_no_fields():
    """A broken answer predicts nothing: precision is untouched, recall pays for the missed fields."""
    metrics = compute_quality([MR, "I don't know"], [MR, MR], "viggo_mr")
    assert metrics["parse_rate"] == 0.5
    assert metrics["field_precision"] == 1.0
    assert metrics["field_recall"] == pytest.approx(0.5)
    assert metrics["field_f1"] == pytest.approx(2 / 3)
    assert metrics["set_match"] == 0.5


def test_all_unparsable_scores_zero():
    metrics = compute_quality(["", "nope"], ['{"a": 1}', '{"b": 2}'], "json")
    assert metrics["parse_rate"] == 0.0
    assert metrics["field_precision"] == metrics["field_recall"] == metrics["field_f1"] == 0.0


def test_json_fields_and_exact_match_whitespace():
    predictions = ['{"a": 1, "b": "X"}', '{"a":1,"b":"x"}', '{"a": 2.0}']
    references = ['{"a": 1, "b": "x"}', '{"a": 1,  "b": "x"}', '{"a": 2, "b": "y"}']
    metrics = compute_quality(predictions, references, "json")
    assert metrics["exact_match"] == pytest.approx(0.0)  # case and inner spacing differ from every reference
    assert metrics["field_precision"] == 1.0  # 5 predicted fields, all right
    assert metrics["field_recall"] == pytest.approx(5 / 6)
    assert metrics["set_match"] == pytest.approx(2 / 3)
    assert compute_quality(['  {"a": 1}\n'], ['{"a": 1}'], "json")["exact_match"] == 1.0


def test_empty_objects_on_both_sides_are_perfect():
    metrics = compute_quality(["{}"], ["{}"], "json")
    assert metrics["field_precision"] == metrics["field_recall"] == metrics["field_f1"] == 1.0


def test_empty_prediction_against_fields_is_zero():
    metrics = compute_quality(["{}"], ['{"a": 1}'], "json")
    assert metrics["parse_rate"] == 1.0
    assert metrics["field_precision"] == 0.0 and metrics["field_recall"] == 0.0 and metrics["field_f1"] == 0.0


def test_text_format_has_only_exact_match_and_rouge():
    metrics = compute_quality(["the cat sat", "hello"], ["the cat sat", "goodbye"], "text")
    assert set(metrics) == {"exact_match", "rouge_l"}
    assert metrics["exact_match"] == 0.5
    assert metrics["rouge_l"] == pytest.approx(0.5)


def test_structured_keys():
    assert set(compute_quality([MR], [MR], "viggo_mr")) == {
        "exact_match", "rouge_l", "field_precision", "field_recall", "field_f1", "set_match", "parse_rate"}


def test_unparsable_reference_is_an_error_naming_the_row():
    with pytest.raises(ValueError, match="reference 1"):
        compute_quality([MR, MR], [MR, "not an MR"], "viggo_mr")


@pytest.mark.parametrize("predictions, references, error", [
    ([], [], "no predictions"),
    (["a"], ["a", "b"], "1 predictions but 2 references"),
    ([None], ["a"], "prediction 0"),
])
def test_bad_inputs(predictions, references, error):
    with pytest.raises((ValueError, TypeError), match=error):
        compute_quality(predictions, references, "text")


def test_unknown_format():
    with pytest.raises(ValueError, match="output_format"):
        compute_quality(["a"], ["a"], "yaml")


# --- rouge_l values -------------------------------------------------------------------------------

def test_rouge_l_values():
    rouge = load_metric("rouge_l")
    assert rouge.compute(predictions=["a b c d"], references=["a b c d"])["rouge_l"] == 1.0
    # LCS "a c" = 2 of 3 tokens each side: P = R = F = 2/3
    assert rouge.compute(predictions=["a x c"], references=["a c y"])["rouge_l"] == pytest.approx(2 / 3)
    assert rouge.compute(predictions=["q r s"], references=["a b c"])["rouge_l"] == 0.0
    assert rouge.compute(predictions=["", "x"], references=["", "x"])["rouge_l"] == 1.0  # identical empties


# --- loading --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", METRIC_NAMES)
def test_evaluate_load_by_folder_and_by_file(name):
    for path in (metric_path(name), metric_path(name) / f"{name}.py"):
        module = evaluate.load(str(path), keep_in_memory=True)
        assert isinstance(module, evaluate.Metric)
        assert module.name == name


def test_load_metric_is_cached_and_rejects_unknown_names():
    assert load_metric("rouge_l") is load_metric("rouge_l")
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        load_metric("bleu")


_CHILD = textwrap.dedent("""
    import json, os, socket, sys, time
    from pathlib import Path

    attempts = []
    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network disabled in this test")
    socket.socket.connect = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse

    import evaluate  # noqa: F401 - the slow import happens before the start line
    from lorafleet.evaluation.metrics import compute_quality
    ready, go = Path(sys.argv[1]), Path(sys.argv[2])
    ready.touch()
    while not go.exists():
        time.sleep(0.005)
    metrics = compute_quality(["inform(name[X], rating[good])", "zzz"], ["inform(name[X], rating[poor])"] * 2,
                              "viggo_mr")
    print(json.dumps({"metrics": metrics, "attempts": attempts}))
""")


N_CHILDREN = 2  # each child spends ~4 s importing evaluate; two are enough to race


def test_offline_and_concurrent_loading(tmp_path: Path):
    """Fresh module caches, sockets disabled, several processes loading at the same instant."""
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "HF_METRICS_CACHE": str(tmp_path / "metrics"),
           "HF_EVALUATE_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    go = tmp_path / "go"
    children = [subprocess.Popen([sys.executable, str(script), str(tmp_path / f"ready{i}"), str(go)],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for i in range(N_CHILDREN)]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready{i}").exists() for i in range(N_CHILDREN)):
            assert all(child.poll() is None for child in children), "a child died before loading"
            assert time.monotonic() < deadline, "children did not get ready"
            time.sleep(0.01)
        go.touch()
        outputs = [child.communicate(timeout=120) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    for child, (stdout, stderr) in zip(children, outputs):
        assert child.returncode == 0, stderr[-2000:]
        result = json.loads(stdout.strip().splitlines()[-1])
        assert result["attempts"] == []
        assert result["metrics"]["field_precision"] == pytest.approx(2 / 3)
        assert result["metrics"]["parse_rate"] == 0.5
    copies = sorted(p.relative_to(tmp_path / "modules") for p in (tmp_path / "modules").rglob("*.py")
                    if p.name in {"structured_match.py", "rouge_l.py"})
    assert [p.parts[:3] for p in copies] == [("evaluate_modules", "metrics", "rouge_l"),
                                             ("evaluate_modules", "metrics", "structured_match")]
