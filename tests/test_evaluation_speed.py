"""measure_speed: report fields are consistent with what was generated (no assertions on time values)."""

from __future__ import annotations

import pytest

from lorafleet.evaluation.generation import generate_texts
from lorafleet.evaluation.speed import SpeedReport, measure_speed
from lorafleet.models.prompting import encode_prompt


def _prompts(tokenizer):
    questions = ("hi", "a longer question?", "ok")
    return [encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q in questions]


def test_report_fields_are_sane(tiny_model):
    model, tokenizer = tiny_model.model, tiny_model.tokenizer
    prompts = _prompts(tokenizer)
    model.train()
    report = measure_speed(model, tokenizer, prompts, max_new_tokens=8, warmup=2, label="tiny",
                           progress=False)
    assert model.training  # mode restored
    assert isinstance(report, SpeedReport) and report.label == "tiny"
    assert report.n_requests == 3
    expected = generate_texts(model, tokenizer, prompts, max_new_tokens=8, batch_size=1, progress=False)
    assert report.generated_tokens == sum(r.n_tokens for r in expected)
    assert 3 <= report.generated_tokens <= 24
    assert report.tokens_per_s > 0
    assert report.latency_p95_ms >= report.latency_p50_ms > 0
    assert report.as_metrics("base_") == {"base_tokens_per_s": report.tokens_per_s,
                                          "base_latency_p50_ms": report.latency_p50_ms,
                                          "base_latency_p95_ms": report.latency_p95_ms}


def test_fixed_length_runs_through_generate_kwargs(tiny_model):
    model, tokenizer = tiny_model.model, tiny_model.tokenizer
    report = measure_speed(model, tokenizer, _prompts(tokenizer), max_new_tokens=5, warmup=0,
                           generate_kwargs={"min_new_tokens": 5}, progress=False)
    assert report.generated_tokens == 15


@pytest.mark.parametrize("kwargs, error", [
    ({"prompts": []}, "no prompts"),
    ({"prompts": [[1], []]}, "prompt 1 is empty"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"warmup": -1}, "warmup"),
])
def test_bad_arguments(tiny_model, kwargs, error):
    arguments = {"prompts": [[1, 2]], "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=error):
        measure_speed(tiny_model.model, tiny_model.tokenizer, **arguments)
