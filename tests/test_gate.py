"""The promotion gate as a decision table (pure: no MLflow). Runs in well under a second."""

from __future__ import annotations

import math

import pytest

from lorafleet.sections.promotion import PromotionSettings
from lorafleet.tasks.gate import CHECKS, GateDecision, decide, render_markdown

M = "field_f1"

# (id, margin, challenger, base, champion, champion_version, promote, reference_label, required)
CASES = [
    ("first-beats-base", 0.0, 0.60, 0.40, None, None, True, "base model", 0.40),
    ("first-ties-base", 0.0, 0.40, 0.40, None, None, False, "base model", 0.40),
    ("first-below-base", 0.0, 0.30, 0.40, None, None, False, "base model", 0.40),
    ("first-beats-by-margin", 0.05, 0.46, 0.40, None, None, True, "base model", 0.45),
    ("first-exactly-margin", 0.05, 0.45, 0.40, None, None, False, "base model", 0.45),
    ("first-inside-margin", 0.05, 0.44, 0.40, None, None, False, "base model", 0.45),
    ("champ-better", 0.0, 0.80, 0.40, 0.70, "2", True, "champion v2", 0.70),
    ("champ-tie-no-margin", 0.0, 0.70, 0.40, 0.70, "2", True, "champion v2", 0.70),
    ("champ-worse", 0.0, 0.69, 0.40, 0.70, "2", False, "champion v2", 0.70),
    ("champ-reaches-margin-float", 0.1, 0.9, 0.40, 0.8, "3", True, "champion v3", 0.9),
    ("champ-inside-margin", 0.02, 0.71, 0.40, 0.70, "2", False, "champion v2", 0.72),
    # a champion is judged against itself, never against the (lower) base model
    ("champ-below-but-above-base", 0.0, 0.50, 0.40, 0.70, "2", False, "champion v2", 0.70),
]


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_decision_table(case: tuple) -> None:
    _, margin, challenger, base, champion, version, promote, label, required = case
    decision = decide(PromotionSettings(metric=M, margin=margin), challenger={M: challenger}, base={M: base},
                      champion=None if champion is None else {M: champion}, champion_version=version)
    assert decision.promote is promote
    assert decision.metric == M
    assert decision.challenger_value == challenger
    assert decision.reference_label == label
    assert decision.required == pytest.approx(required)
    assert len(decision.reasons) == len(CHECKS)
    # the sentence carries the numbers a person needs to check the decision
    assert f"{challenger:.4f}" in decision.reasons[0]
    assert label in decision.reasons[0]
    refused = "not promoting" in decision.reasons[0] or "keeping the" in decision.reasons[0]
    assert refused is not promote
    assert decision.reasons[0].endswith(".")


def test_missing_challenger_metric_is_not_promoted() -> None:
    decision = decide(PromotionSettings(metric=M), challenger={"exact_match": 0.9}, base={M: 0.1},
                      champion=None, champion_version=None)
    assert decision.promote is False
    assert decision.challenger_value is None
    assert "challenger has no field_f1" in decision.reasons[0]


def test_nan_challenger_metric_counts_as_missing() -> None:
    decision = decide(PromotionSettings(metric=M), challenger={M: math.nan}, base={M: 0.1},
                      champion={M: 0.2}, champion_version="1")
    assert decision.promote is False
    assert "challenger has no field_f1" in decision.reasons[0]


def test_missing_base_metric_blocks_the_first_version() -> None:
    decision = decide(PromotionSettings(metric=M), challenger={M: 0.9}, base={}, champion=None,
                      champion_version=None)
    assert decision.promote is False
    assert decision.reference_value is None and decision.required is None
    assert "base model has no field_f1" in decision.reasons[0]


def test_champion_without_metrics_is_not_replaced_by_comparing_with_base() -> None:
    decision = decide(PromotionSettings(metric=M), challenger={M: 0.9}, base={M: 0.1}, champion=None,
                      champion_version="4")
    assert decision.promote is False
    assert decision.reference_label == "champion v4"
    assert "lorafleet promote" in decision.reasons[0]


def test_other_metric_selected_by_settings() -> None:
    decision = decide(PromotionSettings(metric="exact_match", margin=0.0),
                      challenger={M: 0.1, "exact_match": 0.5}, base={M: 0.9, "exact_match": 0.2},
                      champion=None, champion_version=None)
    assert decision.promote is True
    assert decision.metric == "exact_match" and decision.reference_value == 0.2


def test_decision_serialises_for_mlflow_and_prefect() -> None:
    decision = decide(PromotionSettings(metric=M), challenger={M: 0.8}, base={M: 0.4}, champion={M: 0.9},
                      champion_version="2")
    assert isinstance(decision, GateDecision)
    as_dict = decision.to_dict()
    assert as_dict["promote"] is False and as_dict["checks"][0]["passed"] is False
    report = render_markdown(decision, name="viggo", version="3", promoted=False)
    assert "**held**" in report and "| fail |" in report and "challenger 0.8000, champion v2 0.9000" in report


def test_report_distinguishes_promoted_from_passed_but_held() -> None:
    decision = decide(PromotionSettings(metric=M), challenger={M: 0.8}, base={M: 0.4}, champion=None,
                      champion_version=None)
    assert decision.promote is True
    assert "now v1" in render_markdown(decision, name="viggo", version=1, promoted=True)
    assert "auto_promote` is off" in render_markdown(decision, name="viggo", version=1, promoted=False)


# --- speed: a Turbo challenger may not win on quality while losing on speed (or vice versa) -------------

SPEED_CASES = [
    # (min_speedup, speed_margin, challenger speedup, champion speedup, has champion, promote)
    (None, None, 0.5, 3.0, True, True),        # no speed rule configured
    (1.8, None, 2.1, None, False, True),       # first version reaches the minimum
    (1.8, None, 1.7, None, False, False),      # first version too slow
    (None, 0.1, 2.8, 3.0, True, True),         # 2.8 >= 3.0 * 0.9
    (None, 0.1, 2.6, 3.0, True, False),        # 2.6 <  2.7
    (None, 0.1, None, 1.05, True, True),       # plain LoRA (1.0) vs a barely-faster champion: within 10%
    (None, 0.1, None, 2.5, True, False),       # plain LoRA cannot replace a 2.5x Turbo champion
    (1.5, 0.0, 2.0, None, True, True),         # champion without a speedup counts as 1.0
]


@pytest.mark.parametrize("min_speedup, margin, challenger, champion, has_champion, promote", SPEED_CASES)
def test_speed_check(min_speedup, margin, challenger, champion, has_champion, promote):
    settings = PromotionSettings(metric="field_f1", margin=0.0, min_speedup=min_speedup, speed_margin=margin)
    challenger_metrics = {"field_f1": 0.9} | ({} if challenger is None else {"speedup": challenger})
    champion_metrics = ({"field_f1": 0.9} | ({} if champion is None else {"speedup": champion})
                        if has_champion else None)
    decision = decide(settings, challenger=challenger_metrics, base={"field_f1": 0.1},
                      champion=champion_metrics, champion_version="1" if has_champion else None)
    assert decision.checks[0].passed  # quality passes in every row: speed decides
    assert decision.promote is promote, decision.reasons
    assert any("speed" in r.lower() for r in decision.reasons)


def test_worse_quality_fails_even_when_faster():
    settings = PromotionSettings(metric="field_f1", margin=0.0, min_speedup=1.5, speed_margin=0.1)
    decision = decide(settings, challenger={"field_f1": 0.85, "speedup": 3.0}, base={"field_f1": 0.1},
                      champion={"field_f1": 0.9, "speedup": 1.0}, champion_version="1")
    assert not decision.promote
    assert [c.passed for c in decision.checks] == [False, True]


# --- direction: a latency is better when lower, and the margin points the same way ----------------------------

LATENCY = "latency_p50_ms"
DIRECTION_CASES = [
    # (id, margin, challenger, base, champion, promote, required)
    ("slower-challenger-held", 0.0, 900.0, 50.0, 12.0, False, 12.0),
    ("faster-challenger-promoted", 0.0, 10.0, 50.0, 12.0, True, 12.0),
    ("tie-promoted", 0.0, 12.0, 50.0, 12.0, True, 12.0),
    ("faster-but-inside-margin", 5.0, 10.0, 50.0, 12.0, False, 7.0),
    ("faster-by-margin", 5.0, 7.0, 50.0, 12.0, True, 7.0),
    ("first-faster-than-base", 0.0, 40.0, 50.0, None, True, 50.0),
    ("first-slower-than-base", 0.0, 60.0, 50.0, None, False, 50.0),
    ("first-ties-base", 0.0, 50.0, 50.0, None, False, 50.0),
]


@pytest.mark.parametrize("case", DIRECTION_CASES, ids=[case[0] for case in DIRECTION_CASES])
def test_lower_is_better_metrics(case: tuple) -> None:
    _, margin, challenger, base, champion, promote, required = case
    decision = decide(PromotionSettings(metric=LATENCY, margin=margin), challenger={LATENCY: challenger},
                      base={LATENCY: base}, champion=None if champion is None else {LATENCY: champion},
                      champion_version=None if champion is None else "1")
    assert decision.promote is promote, decision.reasons
    assert decision.better == "lower" and decision.required == pytest.approx(required)
    assert "lower is better" in decision.checks[0].name
    report = render_markdown(decision, name="viggo", version="2", promoted=promote)
    assert f"required at most {required:.4f}" in report


def test_unknown_metric_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown metric 'latency'.*latency_p50_ms"):
        PromotionSettings(metric="latency")


def test_best_base_variant_follows_the_metric_direction() -> None:
    from lorafleet.tasks.evaluate import EvaluationOutcome

    outcome = EvaluationOutcome(variants={"adapter": {}, "base": {M: 0.2, LATENCY: 30.0},
                                          "base_3shot": {M: 0.4, LATENCY: 90.0}}, labels={}, n_examples=1)
    assert outcome.best_base(M)[M] == 0.4  # the gate must beat the base at its best: the higher score...
    assert outcome.best_base(LATENCY)[LATENCY] == 30.0  # ...and the lower latency
