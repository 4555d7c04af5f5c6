"""The shared stop rules and sampling bounds (`models/sampling_rules.py`), and that every edge uses them.

Decoding, the engine, the PEFT runner and the API used to carry their own copies (three cuts at the budget
and first stop token, four answers for the end-of-sequence ids, bounds declared in the engine and imported
by the schema); these tests pin the one copy and check that the edges agree with it.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from lorafleet.models.sampling_rules import (
    SEED_MAX,
    SEED_MIN,
    TEMPERATURE_MAX,
    InvalidRequest,
    check_max_new_tokens,
    check_seed,
    check_stop_ids,
    check_temperature,
    check_top_p,
    cut_at_stop,
    eos_token_ids,
)
from lorafleet.serving.api.openai_schema import CompletionRequest
from lorafleet.serving.engine.sequence import SamplingParams as EngineSampling
from lorafleet.serving.generation.interface import RequestRejected
from lorafleet.serving.generation.interface import SamplingParams as ServiceSampling


@pytest.mark.parametrize("tokens,budget,stops,expected", [
    ([1, 2, 3], 5, {9}, ([1, 2, 3], None)),  # room left, no stop: go on
    ([1, 2, 3], 3, {9}, ([1, 2, 3], "length")),  # exactly the budget
    ([1, 2, 3, 4], 2, {9}, ([1, 2], "length")),  # cut at the budget
    ([1, 9, 3], 5, {9}, ([1], "stop")),  # the stop token is not kept
    ([9], 1, {9}, ([], "stop")),  # a stop token at the last allowed position is still a stop
    ([1, 2, 9], 2, {9}, ([1, 2], "length")),  # budget first: a stop past it does not count
    ([4, 9, 9], 3, [9, 4], ([], "stop")),  # any of several stops, the first one wins
    ([1], 0, set(), ([], "length")),  # nothing left
])
def test_cut_at_stop(tokens, budget, stops, expected):
    assert cut_at_stop(tokens, budget, stops) == expected


def test_eos_ids_are_the_tokenizer_s_then_the_generation_config_s_without_repeats():
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[7, 2]))
    assert eos_token_ids(model, SimpleNamespace(eos_token_id=2)) == (2, 7)
    assert eos_token_ids(model) == (7, 2)
    assert eos_token_ids(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=5)), None) == (5,)
    assert eos_token_ids(None, None) == ()
    with pytest.raises(ValueError, match="EOS"):
        eos_token_ids(None, SimpleNamespace(eos_token_id=None), required=True)


@pytest.mark.parametrize("check,bad,param", [
    (check_max_new_tokens, [0, -1, 1.5, True, 2**20 + 1], "max_new_tokens"),
    (check_temperature, [-0.1, math.nan, math.inf, "1", None], "temperature"),
    (check_top_p, [0, 1.01, math.nan, None], "top_p"),
    (check_seed, [SEED_MIN - 1, SEED_MAX + 1, 1.0, True], "seed"),
    (check_stop_ids, [5, [-1], [2**63], ["2"]], "stop_token_ids"),
])
def test_bounds_refuse_naming_the_parameter(check, bad, param):
    for value in bad:
        with pytest.raises(InvalidRequest) as error:
            check(value)
        assert error.value.param == param and param in str(error.value), value


def test_the_engine_the_service_and_the_api_refuse_the_same_values():
    """A value the API lets through is one the engine can run; one it refuses, the engine refuses too."""
    for seed in (SEED_MIN, SEED_MAX, 0):
        EngineSampling(max_new_tokens=1, temperature=1.0, seed=seed)
        ServiceSampling(max_tokens=1, seed=seed)
        CompletionRequest(model="m", prompt="p", seed=seed)
    for seed in (SEED_MIN - 1, SEED_MAX + 1):
        with pytest.raises(InvalidRequest):
            EngineSampling(max_new_tokens=1, temperature=1.0, seed=seed)
        with pytest.raises(RequestRejected) as error:
            ServiceSampling(max_tokens=1, seed=seed)
        assert error.value.param == "seed"
        with pytest.raises(ValidationError):
            CompletionRequest(model="m", prompt="p", seed=seed)
    CompletionRequest(model="m", prompt="p", temperature=TEMPERATURE_MAX)
    ServiceSampling(max_tokens=1, temperature=TEMPERATURE_MAX)
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt="p", temperature=TEMPERATURE_MAX + 0.1)
    with pytest.raises(RequestRejected):
        ServiceSampling(max_tokens=1, temperature=TEMPERATURE_MAX + 0.1)
    with pytest.raises(RequestRejected) as error:  # the service names the API's field
        ServiceSampling(max_tokens=1, stop_token_ids=(-3,))
    assert error.value.param == "stop"
