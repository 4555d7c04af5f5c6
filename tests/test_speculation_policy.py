"""The speculation policy (serving/engine/speculation_policy.py) on synthetic measurements, and the
engine running it: whatever it decides, greedy output stays the plain output, and /metrics-facing
counters record each decision."""

from __future__ import annotations

import pytest

from lorafleet.serving.engine.speculation_policy import MovingAverage, SpeculationPolicy, bucket
from tests.test_engine import PROMPTS, adapters, compact, make_engine, oracle, run  # noqa: F401 - the engine suite's fixtures


def measured(plain: float, verify: float, heads: float, *, batch: int = 1, **options) -> SpeculationPolicy:
    policy = SpeculationPolicy("adaptive", **options)
    policy.observe_step(batch, False, plain)
    policy.observe_step(batch, True, verify)
    policy.observe_drafting(batch, heads)
    return policy


def test_bucket_and_moving_average():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 64, 65)] == [1, 2, 4, 4, 8, 8, 16, 64, 128]
    average = MovingAverage(0.5)
    average.add(4.0)
    average.add(2.0)
    assert (average.value, average.samples) == (3.0, 2)


def test_unmeasured_sides_are_tried_first_drafting_then_plain():
    policy = SpeculationPolicy("adaptive")
    assert policy.decide(1, ["a"]) is True  # no drafting cost known: try drafting
    policy.observe_step(1, True, 0.011)
    policy.observe_drafting(1, 0.001)
    assert policy.decide(1, ["a"]) is False  # no plain cost known: try plain
    assert policy.decisions == {"on": 1, "off": 1}


def test_drafts_while_accepted_tokens_per_second_beat_plain_steps():
    cheap = measured(plain=0.010, verify=0.011, heads=0.001)  # a drafting step costs 1.2x
    assert cheap.tau("a") == 2.0  # the prior: one accepted draft
    assert cheap.decide(1, ["a"]) is True  # 2 tokens / 12 ms beat 1 token / 10 ms
    for _ in range(30):
        cheap.observe_acceptance("a", 0)  # the heads never hit
    assert cheap.tau("a") == pytest.approx(1.0, abs=0.01)
    assert cheap.decide(1, ["a"]) is False  # ~1 token / 12 ms loses
    costly = measured(plain=0.010, verify=0.040, heads=0.002, batch=16)  # compute-bound: 4.2x
    for _ in range(30):
        costly.observe_acceptance("a", 2)  # tau 3
    assert costly.decide(16, ["a"] * 16) is False  # 48 tokens / 42 ms lose to 16 / 10 ms
    assert costly.decide(1, ["a"]) is True  # batch 1 is its own bucket, never measured: tried
    # rows without heads count one token each on both sides
    mixed = measured(plain=0.010, verify=0.013, heads=0.001, batch=4)
    assert mixed.decide(4, ["a"]) is False  # (2 + 3) / 14 ms < 4 / 10 ms
    assert mixed.decide(4, ["a"] * 4) is True  # 8 / 14 ms > 4 / 10 ms


def test_the_side_not_taken_is_tried_ever_less_often_while_trials_confirm_the_choice():
    """A trial runs after `explore_every` decisions; each trial that confirms the choice doubles the
    interval (to `max_explore_every`): at batch 16 a drafting trial costs ~3 plain steps."""
    policy = measured(plain=0.010, verify=0.011, heads=0.001, explore_every=4, max_explore_every=8)
    choices = [policy.decide(1, ["a"]) for _ in range(20)]
    trials = [i + 1 for i, choice in enumerate(choices) if not choice]
    assert trials == [4, 12, 20]  # after 4, then 8, then 8 (the cap) decisions


def test_a_trial_that_changes_the_choice_resets_the_interval():
    policy = measured(plain=0.010, verify=0.011, heads=0.001, explore_every=4)
    assert [policy.decide(1, ["a"]) for _ in range(4)] == [True, True, True, False]  # the 4th: a plain trial
    for _ in range(10):
        policy.observe_step(1, False, 0.005)  # plain turns out cheaper now (not by 2x: see the next test)
    later = [policy.decide(1, ["a"]) for _ in range(8)]
    assert later[:3] == [False, False, False]  # the trial changed the choice...
    assert later.index(True) == 3  # ...so the next trial comes after explore_every decisions again


def test_modes_and_steps_without_heads():
    for mode, expected in (("on", True), ("off", False)):
        policy = SpeculationPolicy(mode)
        assert policy.decide(64, ["a"]) is expected
    policy = SpeculationPolicy("adaptive")
    assert policy.decide(4, []) is False and not policy.decisions  # nobody can draft: not a decision
    with pytest.raises(ValueError, match="smoothing"):
        SpeculationPolicy(smoothing=0)
    with pytest.raises(ValueError, match="explore_every"):
        SpeculationPolicy(explore_every=1)


def test_adaptive_engine_keeps_greedy_output_and_counts_its_decisions(compact, adapters, oracle):  # noqa: F811
    """Whatever the measured costs make the policy choose (they depend on the machine), greedy output
    equals plain decoding's, and every decode step with heads live is one decision."""
    requests = [("turbo", i) for i in range(len(PROMPTS))] + [("a1", 0), (None, 2)]
    engine = make_engine(compact, adapters, speculation="adaptive")
    out = run(engine, requests)
    for i, key in enumerate(requests):
        assert out[f"r{i}"] == oracle[key], key
    stats = engine.stats
    assert stats.spec_decisions_on >= 1  # the first decision at a new batch size tries drafting
    assert stats.spec_decisions_on + stats.spec_decisions_off >= 2
    assert set(stats.spec_tau_by_adapter) == {"turbo"} and stats.spec_tau_by_adapter["turbo"] >= 1.0


def test_speculative_report_is_measured_on_the_engine_with_the_hf_loop_beside_it(adapters, model_cache):  # noqa: F811
    from lorafleet.evaluation.engine_generation import EngineScorer
    from lorafleet.evaluation.speculative import measure_speculative
    from lorafleet.models.base import load_base_model
    from lorafleet.models.lora import load_adapter
    from lorafleet.models.sampling_rules import eos_token_ids
    from lorafleet.models.turbo_heads import load_heads

    loaded = load_base_model("tiny-random-llama", model_cache)
    folder = adapters["turbo"]
    stops = eos_token_ids(loaded.model, loaded.tokenizer, required=True)
    with EngineScorer(loaded.model, loaded.tokenizer, folder, eos_token_ids=stops) as engine:
        model = load_adapter(loaded.model, folder).eval()  # after the engine copied the base
        report = measure_speculative(model, load_heads(folder), loaded.tokenizer, PROMPTS, max_new_tokens=12,
                                     warmup=0, progress=False, engine=engine)
    assert report.decoder == "engine" and report.tau >= 1.0 and report.tau_hf_loop >= 1.0
    assert report.greedy_identical_fraction_engine == 1.0 and report.greedy_identical_fraction == 1.0
    tokens = report.generated_tokens
    assert tokens["engine_plain"] == tokens["engine_speculative"] == tokens["plain"] == tokens["speculative"] > 0
    assert report.speedup == pytest.approx(report.tokens_per_s_engine_speculative / report.tokens_per_s_engine_plain)
    assert {"tau_hf_loop", "speedup_hf_loop", "tokens_per_s_engine_plain"} <= set(report.as_metrics())


def test_a_side_far_behind_waits_the_longest_interval():
    policy = measured(plain=0.010, verify=0.050, heads=0.005, batch=64, explore_every=4, max_explore_every=32)
    for _ in range(30):
        policy.observe_acceptance("a", 1)  # tau 2: drafting at 2 x 64 / 55 ms, under half of 64 / 10 ms
    choices = [policy.decide(64, ["a"] * 64) for _ in range(64)]
    assert [i + 1 for i, choice in enumerate(choices) if choice] == [32, 64]
