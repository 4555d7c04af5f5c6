"""A/B experiments without a server: the split, stickiness, feedback bookkeeping and the online gate's rule."""

from __future__ import annotations

import random

import pytest

from lorafleet.experiment_arms import ArmSums
from lorafleet.serving.experiments import ExperimentBook, ExperimentError
from lorafleet.tasks.experiment_decision import OnlineGateSettings, decide


def test_split_matches_the_share_over_10000_requests():
    book = ExperimentBook(seed=0)
    book.start("viggo", 0.1)
    anonymous = sum(book.assign("viggo", None).arm == "challenger" for _ in range(10_000))
    users = sum(book.assign("viggo", f"user-{i}").arm == "challenger" for i in range(10_000))
    # Binomial(10000, 0.1): sd 30; 4 sd either side.
    assert 880 <= anonymous <= 1120 and 880 <= users <= 1120
    assert book.assign("other", None) is None  # no experiment: nothing is routed


def test_a_user_stays_on_one_arm_until_a_new_experiment():
    book = ExperimentBook(seed=0)
    first = book.start("viggo", 0.5)
    arms = {f"u{i}": book.assign("viggo", f"u{i}").arm for i in range(200)}
    assert all(book.assign("viggo", user).arm == arm for user, arm in arms.items() for _ in range(3))
    book.start("viggo", 0.5)  # a share change keeps the experiment (and every user's arm)
    assert all(book.assign("viggo", user).arm == arm for user, arm in arms.items())
    book.stop("viggo")
    second = book.start("viggo", 0.5)  # a new experiment draws anew
    assert second.id != first.id
    redrawn = {user: book.assign("viggo", user).arm for user in arms}
    assert redrawn != arms


def test_feedback_is_counted_once_in_the_arm_that_served_the_response():
    book = ExperimentBook(seed=1)
    book.start("viggo", 1.0)
    assignment = book.assign("viggo", "u")
    assert assignment.arm == "challenger"
    book.record(assignment, response_id="r1", version=2, status=200, tokens=10, seconds=0.5)
    book.record(assignment, response_id="r2", version=2, status=500, tokens=0, seconds=0.1)
    book.feedback("r1", 0.75)
    with pytest.raises(ExperimentError) as again:
        book.feedback("r1", 0.75)
    assert again.value.status == 409
    with pytest.raises(ExperimentError) as failed:  # a failed request cannot be scored
        book.feedback("r2", 1.0)
    assert failed.value.status == 404
    with pytest.raises(ExperimentError, match="finite"):
        book.feedback("r1", float("nan"))
    arm = book.get("viggo").arms["challenger"]
    assert (arm.requests, arm.errors, arm.tokens, arm.feedback_n, arm.feedback_mean, arm.version) == (2, 1, 10, 1,
                                                                                                      0.75, 2)
    assert arm.seconds_per_token == pytest.approx(0.05)
    assert book.get("viggo").arms["champion"].requests == 0


def test_feedback_for_an_ended_experiment_and_forgotten_ids_is_refused():
    book = ExperimentBook(seed=2, max_tracked=2)
    book.start("viggo", 0.0)
    assignment = book.assign("viggo", None)
    for index in range(3):
        book.record(assignment, response_id=f"r{index}", version=1, status=200, tokens=1, seconds=0.1)
    with pytest.raises(ExperimentError, match="too long ago"):  # the oldest id was forgotten (bounded map)
        book.feedback("r0", 1.0)
    book.stop("viggo")
    with pytest.raises(ExperimentError, match="ended"):
        book.feedback("r2", 1.0)
    with pytest.raises(ExperimentError, match=r"\[0, 1\]"):
        book.start("viggo", 1.5)


def arm(version: int, scores: list[float], seconds_per_token: float = 0.02) -> ArmSums:
    return ArmSums(version=version, requests=len(scores), feedback_n=len(scores), feedback_sum=sum(scores),
                      feedback_sumsq=sum(s * s for s in scores), latency_n=len(scores),
                      latency_sum=seconds_per_token * len(scores),
                      latency_sumsq=seconds_per_token ** 2 * len(scores))


def scores(mean: float, n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [min(max(rng.gauss(mean, 0.2), 0.0), 1.0) for _ in range(n)]


def test_gate_promotes_a_clearly_better_challenger():
    decision = decide(arm(1, scores(0.5, 150, 1)), arm(2, scores(0.7, 150, 2)), OnlineGateSettings())
    assert decision.action == "promote" and decision.p_value < 0.001, decision


def test_gate_waits_for_the_minimum_sample_size():
    decision = decide(arm(1, scores(0.5, 150, 1)), arm(2, scores(0.9, 99, 2)), OnlineGateSettings())
    assert decision.action == "continue" and "needs 100" in decision.reasons[0]


def test_gate_ends_a_worse_a_slower_or_an_indistinguishable_challenger():
    settings = OnlineGateSettings(max_samples=400)
    worse = decide(arm(1, scores(0.7, 150, 1)), arm(2, scores(0.5, 150, 2)), settings)
    assert worse.action == "end" and "significantly worse" in worse.reasons[-1]
    slower = decide(arm(1, scores(0.5, 150, 1)), arm(2, scores(0.7, 150, 2), seconds_per_token=0.03), settings)
    assert slower.action == "end" and "slower" in slower.reasons[-1] and slower.latency_ratio == pytest.approx(1.5)
    same = scores(0.6, 400, 1)  # one list for both arms: no difference at all (p = 0.5)
    same_small = decide(arm(1, same[:150]), arm(2, same[:150]), settings)
    assert same_small.action == "continue" and same_small.p_value == pytest.approx(0.5)
    same_large = decide(arm(1, same), arm(2, same), settings)
    assert same_large.action == "end" and "no significant difference" in same_large.reasons[-1]


def test_replicas_add_up_to_one_arm():
    a, b = arm(2, scores(0.6, 50, 1)), arm(2, scores(0.6, 70, 2))
    total = a + b
    assert total.feedback_n == 120 and total.feedback_sum == pytest.approx(a.feedback_sum + b.feedback_sum)
    assert ArmSums.from_dict({"version": 2, "feedback_n": 3, "feedback_sum": 1.5, "extra": 1}).feedback_mean == 0.5
