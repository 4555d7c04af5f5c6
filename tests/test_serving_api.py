"""The OpenAI API in-process (FastAPI TestClient) over the real runner and tiny model, plus the text
stream and settings helpers. No registry, no subprocess: those are in test_serving_server.py (~8 s).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lorafleet.models.adapter_dir import read_manifest
from lorafleet.models.base import load_base_model
from lorafleet.registry_read import FetchedAdapter
from lorafleet.serving.api.openai_api import create_app
from lorafleet.serving.api.text_stream import TextAssembler
from lorafleet.serving.backend import ServingBackend
from lorafleet.serving.catalogue.adapters import AdapterCatalogue
from lorafleet.serving.engine.config import EngineConfig
from lorafleet.serving.generation.engine_generator import EngineGenerator
from lorafleet.serving.generation.runner import GenerationRunner
from lorafleet.serving.metrics import ServingMetrics
from lorafleet.serving.settings import ServiceSettings
from lorafleet.settings import Settings

from serving_helpers import BASE, make_adapter

CONTEXT = 256  # small on purpose: over-long prompts stay cheap
LIMIT = 512  # above CONTEXT, so prompt + max_tokens can overflow the context


@pytest.fixture(scope="module", params=["engine", "peft"])
def backend(request, tmp_path_factory, model_cache: Path):
    """Both generators behind the same API: the engine (the default) and PEFT + generate."""
    from prometheus_client import CollectorRegistry

    root = tmp_path_factory.mktemp("api")
    alpha = make_adapter(model_cache, root / "alpha", name="alpha", seed=1, system_prompt="You are alpha.")
    loaded = load_base_model(BASE, model_cache)
    if request.param == "engine":
        runner = EngineGenerator(loaded.model, EngineConfig(kv_cache_mb=16, adapter_slots=2, max_lora_rank=8),
                                 eos_token_ids=frozenset({loaded.tokenizer.eos_token_id}))
    else:
        runner = GenerationRunner(loaded.model, pad_token_id=loaded.tokenizer.pad_token_id)
    catalogue = AdapterCatalogue(
        base_model_id=BASE, base_revision=loaded.resolved.revision, loader=runner, registry=None
    )
    catalogue.install_champions([FetchedAdapter("alpha", 1, alpha, read_manifest(alpha))])
    settings = ServiceSettings(
        tracking_uri="sqlite:///unused.db",
        model_cache_dir=model_cache,
        adapter_download_dir=root / "downloads",
        default_max_tokens=16,
        max_tokens_limit=LIMIT,
    )
    backend = ServingBackend(
        settings=settings,
        tokenizer=loaded.tokenizer,
        catalogue=catalogue,
        generator=runner,
        context_length=CONTEXT,
        eos_token_ids=(loaded.tokenizer.eos_token_id,),
        metrics=ServingMetrics(CollectorRegistry()),
    )
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def client(backend):
    with TestClient(create_app(backend)) as client:
        yield client


def chat(client, *, model="alpha", content="hi", **fields):
    body = {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0, **fields}
    return client.post("/v1/chat/completions", json=body)


def sse_events(response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]


def test_adapter_system_prompt_is_added_only_when_the_chat_has_none(client, backend):
    decode = backend.tokenizer.decode
    plain = chat(client, return_token_ids=True, max_tokens=2).json()
    assert "You are alpha." in decode(plain["prompt_token_ids"])
    own = client.post(
        "/v1/chat/completions",
        json={
            "model": "alpha",
            "max_tokens": 2,
            "return_token_ids": True,
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        },
    ).json()
    assert "Be brief." in decode(own["prompt_token_ids"]) and "alpha" not in decode(own["prompt_token_ids"])
    base = chat(client, model=BASE, return_token_ids=True, max_tokens=2).json()
    assert "You are alpha." not in decode(base["prompt_token_ids"])
    assert plain["usage"]["prompt_tokens"] == len(plain["prompt_token_ids"])


def test_default_max_tokens_and_usage(client, backend):
    body = chat(client, return_token_ids=True).json()
    tokens = body["choices"][0]["token_ids"]
    assert len(tokens) <= backend.settings.default_max_tokens
    assert body["usage"]["completion_tokens"] == len(tokens)
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + len(tokens)


def test_stop_string_cuts_the_text_in_both_modes(client):
    body = {"model": "alpha", "prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0}
    full = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert len(full) >= 6, f"the adapter must say a few characters, got {full!r}"
    stop = full[len(full) // 3 : len(full) // 3 + 2]
    expected = full[: full.index(stop)]
    cut = client.post("/v1/completions", json={**body, "stop": [stop]}).json()["choices"][0]
    assert (cut["text"], cut["finish_reason"]) == (expected, "stop")
    streamed = client.post("/v1/completions", json={**body, "stop": stop, "stream": True})
    chunks = [json.loads(event) for event in sse_events(streamed)[:-1]]
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_chat_stream_chunks_rebuild_the_non_streamed_answer(client):
    whole = chat(client, max_tokens=10).json()
    events = sse_events(chat(client, max_tokens=10, stream=True, stream_options={"include_usage": True}))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks if chunk["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == whole["usage"] and chunks[-1]["choices"] == []


def test_token_id_prompt_for_completions(client, backend):
    ids = backend.tokenizer("hello")["input_ids"]
    by_ids = client.post(
        "/v1/completions", json={"model": BASE, "prompt": ids, "max_tokens": 4, "temperature": 0}
    )
    by_text = client.post(
        "/v1/completions", json={"model": BASE, "prompt": "hello", "max_tokens": 4, "temperature": 0}
    )
    assert by_ids.json()["choices"][0]["text"] == by_text.json()["choices"][0]["text"]


LONG = "a" * (CONTEXT + 10)
CHAT_ERRORS = [
    ({"max_tokens": -1}, "max_tokens", None),
    ({"max_tokens": 0}, "max_tokens", None),
    ({"max_tokens": LIMIT + 1}, "max_tokens", None),
    ({"max_tokens": CONTEXT - 10}, "max_tokens", "context_length_exceeded"),
    ({"max_completion_tokens": -3}, "max_completion_tokens", None),
    ({"temperature": -0.1}, "temperature", None),
    ({"temperature": 2.5}, "temperature", None),
    ({"top_p": 0}, "top_p", None),
    ({"top_p": 1.5}, "top_p", None),
    ({"n": 2}, "n", None),
    ({"logprobs": True}, "logprobs", None),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", None),
    ({"messages": []}, "messages", None),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", None),
    ({"messages": [{"role": "user", "content": LONG}]}, "messages", "context_length_exceeded"),
    ({"model": None}, "model", None),
]


@pytest.mark.parametrize(
    ("fields", "param", "code"), CHAT_ERRORS, ids=[c[1] + str(i) for i, c in enumerate(CHAT_ERRORS)]
)
def test_invalid_chat_parameters_are_400_naming_the_field(client, fields, param, code):
    body = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], **fields}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param.split(".")[0] in error["message"]
    if code:
        assert error["code"] == code


@pytest.mark.parametrize(
    ("prompt", "why"),
    [([], "empty"), ([5, 100_000], "token ids must be in"), (["a", "b"], "only one prompt"), ("", "empty")],
)
def test_invalid_completion_prompts_are_400(client, prompt, why):
    response = client.post("/v1/completions", json={"model": BASE, "prompt": prompt})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt" and why in response.json()["error"]["message"]


def test_malformed_json_unknown_model_and_unknown_route(client):
    broken = client.post(
        "/v1/chat/completions",
        content=b'{"model": "alpha", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"
    missing = chat(client, model="nope")
    assert missing.status_code == 404
    assert missing.json()["error"] == {
        "message": missing.json()["error"]["message"],
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    assert "nope" in missing.json()["error"]["message"]
    assert client.get("/v1/nothing").json()["error"]["code"] == "not_found"
    assert chat(client, max_tokens=1).status_code == 200, "the API still answers after bad requests"


def test_models_lists_base_and_champions(client):
    listed = client.get("/v1/models").json()
    assert listed["object"] == "list"
    assert [(m["id"], m["parent"]) for m in listed["data"]] == [(BASE, None), ("alpha", BASE)]


def test_requests_are_counted_in_metrics(client, backend):
    registry = backend.metrics.registry

    def value(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    labels = {"model": "alpha", "endpoint": "chat.completions", "status": "200"}
    before = value("lorafleet_requests_total", **labels)
    tokens_before = value("lorafleet_generated_tokens_total", model="alpha")
    body = chat(client, max_tokens=3).json()
    assert value("lorafleet_requests_total", **labels) == before + 1
    assert (
        value("lorafleet_generated_tokens_total", model="alpha")
        == tokens_before + body["usage"]["completion_tokens"]
    )
    chat(client, model="nope")
    assert value("lorafleet_requests_total", model="unknown", endpoint="chat.completions", status="404") >= 1


def test_not_ready_until_the_backend_is_set():
    with TestClient(create_app(None)) as client:
        response = client.get("/v1/models")
    assert response.status_code == 503 and response.json()["error"]["code"] == "not_ready"


# -- text stream ---------------------------------------------------------------------------------


def test_incremental_text_never_splits_a_character(tiny_tokenizer):
    text = "héllo ✓ wörld ∑"
    assembler = TextAssembler(tiny_tokenizer)
    deltas = [assembler.push(token) for token in tiny_tokenizer(text)["input_ids"]] + [assembler.finish()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in delta for delta in deltas)


def test_stop_string_across_tokens_is_never_partially_sent(tiny_tokenizer):
    assembler = TextAssembler(tiny_tokenizer, stop=["STOP", "zzz"])
    deltas = []
    for token in tiny_tokenizer("abc STOP def")["input_ids"]:
        deltas.append(assembler.push(token))
        if assembler.stopped:
            break
    assert "".join(deltas) == "abc " and assembler.stopped
    assert not any("S" in delta for delta in deltas)
    assert assembler.finish() == ""


# -- settings ------------------------------------------------------------------------------------


def test_service_settings_from_env(tmp_path):
    settings = Settings.for_home(tmp_path)
    service = ServiceSettings.from_env(
        settings,
        {
            "LORAFLEET_BASE_MODEL": BASE,
            "LORAFLEET_SERVE_MAX_BATCH_SIZE": "3",
            "LORAFLEET_SERVE_BATCH_WAIT_MS": "0",
        },
    )
    assert (service.base_model, service.peft.max_batch_size, service.peft.batch_wait_ms) == (BASE, 3, 0.0)
    assert service.adapter_download_dir == settings.adapter_download_dir
    assert ServiceSettings.from_env(settings, {}).base_model is None
    with pytest.raises(ValueError, match="LORAFLEET_SERVE_MAX_BATCH_SIZE"):
        ServiceSettings.from_env(settings, {"LORAFLEET_SERVE_MAX_BATCH_SIZE": "0"})
    with pytest.raises(ValueError, match="default_max_tokens"):
        ServiceSettings.from_env(settings, {"LORAFLEET_SERVE_DEFAULT_MAX_TOKENS": "5000"})


def test_engine_settings_are_nested_not_redeclared_and_keep_their_variables(tmp_path):
    """One place per default: the service nests the engine's and the runner's configs (it used to re-declare
    them, with a KV budget of 512 MB against the engine's 256), and the documented variables still set them."""
    from lorafleet.serving.engine.config import EngineConfig
    from lorafleet.serving.generation.runner import RunnerConfig

    assert not set(ServiceSettings.model_fields) & (set(EngineConfig.model_fields) | set(RunnerConfig.model_fields)
                                                    | {"max_queue"})
    settings = Settings.for_home(tmp_path)
    default = ServiceSettings.from_env(settings, {})
    assert default.engine == EngineConfig() and default.peft == RunnerConfig()
    assert (default.engine.kv_cache_mb, default.engine.max_waiting) == (512, 256)  # what the service ran with
    service = ServiceSettings.from_env(settings, {
        "LORAFLEET_SERVE_KV_CACHE_MB": "300", "LORAFLEET_SERVE_MAX_QUEUE": "9", "LORAFLEET_SERVE_ADAPTER_SLOTS": "3",
        "LORAFLEET_SERVE_MAX_LORA_RANK": "8", "LORAFLEET_SERVE_MAX_NUM_SEQS": "64",
        "LORAFLEET_SERVE_SPECULATION": "off", "LORAFLEET_SERVE_PREFIX_CACHING": "false",
        "LORAFLEET_SERVE_WEIGHTS": "int4"})
    assert service.engine == EngineConfig(kv_cache_mb=300, max_waiting=9, adapter_slots=3, max_lora_rank=8,
                                          max_num_seqs=64, speculation="off", prefix_caching=False,
                                          weights="int4")
    for variable, value in (("LORAFLEET_SERVE_KV_CACHE_MB", "0"), ("LORAFLEET_SERVE_MAX_QUEUE", "many"),
                            ("LORAFLEET_SERVE_WEIGHTS", "int3"),
                            ("LORAFLEET_SERVE_PREFIX_CACHING", "maybe"), ("LORAFLEET_SERVE_BATCH_WAIT_MS", "-1")):
        with pytest.raises(ValueError, match=f"invalid serving settings: {variable}: "):
            ServiceSettings.from_env(settings, {variable: value})


def test_server_env_points_the_subprocess_at_this_home(tmp_path):
    from lorafleet.serving.launcher import server_env

    settings = Settings.for_home(tmp_path / "home", model_cache_dir=tmp_path / "cache")
    env = server_env(settings, {"LORAFLEET_BASE_MODEL": BASE, "MLFLOW_TRACKING_URI": "sqlite:///x.db"})
    assert env["LORAFLEET_HOME"] == str(settings.home)
    assert env["LORAFLEET_MODEL_CACHE"] == str(settings.model_cache_dir)
    assert env["LORAFLEET_BASE_MODEL"] == BASE
    assert env["MLFLOW_TRACKING_URI"] == "sqlite:///x.db", "explicit overrides win"
    assert Settings.from_env(env).home == settings.home
