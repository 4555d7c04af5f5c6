"""Structured output (`response_format`) on the engine: valid JSON by construction, the same tokens with and
without Turbo speculation, unconstrained rows of the same batch unchanged, and 400s naming the problem."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jsonschema
import pytest
from fastapi.testclient import TestClient

from lorafleet.models.adapter_dir import read_manifest
from lorafleet.models.base import load_base_model
from lorafleet.models.grammar import GrammarCompiler, GrammarSettings
from lorafleet.registry_read import FetchedAdapter
from lorafleet.serving.api.openai_api import create_app
from lorafleet.serving.backend import ServingBackend
from lorafleet.serving.catalogue.adapters import AdapterCatalogue
from lorafleet.serving.engine.config import EngineConfig
from lorafleet.serving.generation.engine_generator import EngineGenerator
from lorafleet.serving.generation.interface import GenerationRequest, SamplingParams
from lorafleet.serving.generation.runner import GenerationRunner
from lorafleet.serving.settings import ServiceSettings

from serving_helpers import BASE, add_heads, make_adapter

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "ok": {"type": "boolean"}},
          "required": ["name", "age", "ok"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
PROMPTS = [[1, 40, 41, 42], [1, 50, 51], [1, 60, 61, 62, 63, 64], [1, 70]]
TOKENS = 120  # the tiny tokenizer spells one byte per token
# The random model loves whitespace: the engine tests bound it to 2 characters between JSON tokens (the
# server's default, 16, is exercised through the API below with a larger max_tokens).
TIGHT = GrammarSettings(max_whitespace=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, model_cache: Path):
    root = tmp_path_factory.mktemp("structured")
    turbo = add_heads(make_adapter(model_cache, root / "turbo", name="turbo", seed=2), model_cache, seed=3)
    loaded = load_base_model(BASE, model_cache)
    eos = loaded.tokenizer.eos_token_id
    compiler = GrammarCompiler(loaded.tokenizer, loaded.model.config.vocab_size, [eos], TIGHT)
    generators = {mode: EngineGenerator(loaded.model, EngineConfig(kv_cache_mb=16, adapter_slots=2, max_lora_rank=8,
                                                                   speculation=mode), eos_token_ids=frozenset({eos}))
                  for mode in ("off", "on")}
    for generator in generators.values():
        generator.load("turbo", turbo)
    yield {"generators": generators, "compiler": compiler, "tokenizer": loaded.tokenizer, "turbo": turbo,
           "loaded": loaded}
    for generator in generators.values():
        generator.close()


def run(generator, requests: list[GenerationRequest]) -> list[list[int]]:
    async def together():
        streams = [generator.submit(request) for request in requests]
        return [[token async for token in stream] for stream in streams]

    return asyncio.run(together())


def requests(compiler, adapter, constrained=True, **params) -> list[GenerationRequest]:
    grammar = compiler.compile(FORMAT) if constrained else None
    params = {"temperature": 0.0, **params}
    return [GenerationRequest(tuple(prompt), SamplingParams(max_tokens=TOKENS, **params), adapter,
                              grammar=grammar) for prompt in PROMPTS]


@pytest.mark.parametrize("adapter", [None, "turbo"])
def test_constrained_output_is_valid_json_of_the_schema(setup, adapter):
    outputs = run(setup["generators"]["off"], requests(setup["compiler"], adapter))
    for tokens in outputs:
        value = json.loads(setup["tokenizer"].decode(tokens))
        jsonschema.validate(value, SCHEMA)


def test_unconstrained_output_of_the_random_model_is_not_json(setup):
    """The test above can fail: without the grammar the tiny random model writes no JSON at all."""
    outputs = run(setup["generators"]["off"], requests(setup["compiler"], None, constrained=False))
    for tokens in outputs:
        with pytest.raises(ValueError):
            json.loads(setup["tokenizer"].decode(tokens))


def test_constrained_speculation_gives_the_plain_tokens_and_drafts_are_checked(setup):
    compiler, generators = setup["compiler"], setup["generators"]
    plain = run(generators["off"], requests(compiler, "turbo"))
    on = generators["on"]
    before = on.engine.stats.spec_drafts
    speculative = run(on, requests(compiler, "turbo"))
    assert speculative == plain
    assert on.engine.stats.spec_drafts > before  # the heads drafted and verification ran under the masks
    sampled = [run(generators[mode], requests(compiler, "turbo", temperature=0.8, seed=5)[:1])[0]
               for mode in ("off", "on")]
    for tokens in sampled:  # sampling under the grammar: valid too
        jsonschema.validate(json.loads(setup["tokenizer"].decode(tokens)), SCHEMA)


def test_unconstrained_rows_in_a_constrained_batch_are_unchanged(setup):
    compiler, generator = setup["compiler"], setup["generators"]["on"]
    alone = run(generator, requests(compiler, "turbo", constrained=False))
    mixed = run(generator, [request for pair in zip(requests(compiler, "turbo", constrained=False),
                                                     requests(compiler, "turbo")) for request in pair])
    assert mixed[0::2] == alone


@pytest.fixture(scope="module")
def client(setup, model_cache, tmp_path_factory):
    loaded = setup["loaded"]
    generator = setup["generators"]["on"]
    catalogue = AdapterCatalogue(base_model_id=BASE, base_revision=loaded.resolved.revision, loader=generator,
                                 registry=None)
    catalogue.install_champions([FetchedAdapter("turbo", 1, setup["turbo"], read_manifest(setup["turbo"]))])
    settings = ServiceSettings(tracking_uri="sqlite:///unused.db", model_cache_dir=model_cache,
                               adapter_download_dir=tmp_path_factory.mktemp("dl"), default_max_tokens=TOKENS,
                               max_tokens_limit=512, bind_host="127.0.0.1", allowed_hosts=("testserver",))
    backend = ServingBackend(settings=settings, tokenizer=loaded.tokenizer, catalogue=catalogue, generator=generator,
                             context_length=512, eos_token_ids=(loaded.tokenizer.eos_token_id,),
                             vocab_size=loaded.model.config.vocab_size)
    with TestClient(create_app(backend)) as client:
        yield client


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_both_endpoints_enforce_json_schema_and_json_object(client, endpoint):
    for response_format, check in ((FORMAT, lambda v: jsonschema.validate(v, SCHEMA)),
                                   ({"type": "json_object"}, lambda v: isinstance(v, dict) or pytest.fail(v))):
        body = {"model": "turbo", "temperature": 0, "max_tokens": 400, "response_format": response_format}
        if endpoint == "chat":
            response = client.post("/v1/chat/completions", json={**body, "messages": [{"role": "user",
                                                                                       "content": "Who?"}]})
            text = response.json()["choices"][0]["message"]["content"]
        else:
            response = client.post("/v1/completions", json={**body, "prompt": "Who?"})
            text = response.json()["choices"][0]["text"]
        assert response.status_code == 200, response.text
        if response.json()["choices"][0]["finish_reason"] == "stop":  # json_object may outrun max_tokens
            check(json.loads(text))
        else:
            assert response_format["type"] == "json_object"


@pytest.mark.parametrize(("response_format", "words"), [
    ({"type": "xml"}, "type must be"),
    ({"type": "json_schema"}, "json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}, "json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "not": {}}}}, "json_schema"),
])
def test_invalid_formats_are_400_naming_response_format(client, response_format, words):
    response = client.post("/v1/completions", json={"model": "turbo", "prompt": "x", "max_tokens": 4,
                                                    "response_format": response_format})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"].startswith("response_format") and words in error["message"], error
    assert client.post("/v1/completions", json={"model": "turbo", "prompt": "x", "max_tokens": 2}).status_code == 200


def test_the_peft_backend_refuses_structured_output(setup):
    runner = GenerationRunner(setup["loaded"].model, pad_token_id=setup["tokenizer"].pad_token_id)
    try:
        request = requests(setup["compiler"], None)[0]
        with pytest.raises(Exception, match="needs the engine backend"):
            asyncio.run(_submit(runner, request))
    finally:
        runner.close()


async def _submit(runner, request):
    return runner.submit(request)


def test_schema_from_answers_keeps_the_answers_key_order_and_shapes():
    from lorafleet.evaluation.structured_bench import schema_from_answers

    answers = ['{"type": "person", "name": "Ana", "age": 3}', '{"type": "person", "name": "Bo", "age": null}',
               '{"type": "order", "item": "pen", "total": 2.5}']
    schema = schema_from_answers(answers)
    person, order = schema["anyOf"]
    assert list(person["properties"]) == ["type", "name", "age"]  # written order, not sorted
    assert person["properties"]["age"]["type"] == ["integer", "null"]
    assert person["properties"]["name"] == {"type": "string", "maxLength": 3}  # the longest name seen
    assert order["required"] == ["type", "item", "total"] and order["additionalProperties"] is False
    for answer in answers:
        jsonschema.validate(json.loads(answer), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"type": "person", "name": "Ana"}, schema)
