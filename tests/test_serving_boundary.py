"""The HTTP boundary holds against hostile input (issue 13, A1 API side, A4, A8, A9).

In-process (FastAPI TestClient) over the real engine and the tiny model, so hundreds of property-based
requests stay cheap. Every answer to bad input is an OpenAI-shaped 4xx naming the field, never a 5xx;
CPU work never blocks the event loop; bodies are bounded; fields we do not implement are refused.
The real-server hostile suite (tests/test_hostile.py) repeats the reproductions over the network.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafleet.models.adapter_dir import read_manifest
from lorafleet.models.base import load_base_model
from lorafleet.registry_read import FetchedAdapter
from lorafleet.serving.api import body_limit
from lorafleet.serving.api.body_limit import BodyLimit
from lorafleet.serving.api.openai_api import create_app
from lorafleet.serving.api.openai_schema import UNSUPPORTED
from lorafleet.serving.api.text_stream import MAX_HELD_TOKENS, TextAssembler
from lorafleet.serving.backend import ServingBackend, build_backend
from lorafleet.serving.catalogue.adapters import AdapterCatalogue
from lorafleet.serving.engine.config import EngineConfig
from lorafleet.serving.generation.engine_generator import EngineGenerator
from lorafleet.serving.generation.interface import RequestRejected
from lorafleet.serving.settings import ServiceSettings

from serving_helpers import BASE, make_adapter

CONTEXT = 256
LIMIT = 512  # max_tokens_limit, above CONTEXT
BODY_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def backend(tmp_path_factory, model_cache: Path):
    root = tmp_path_factory.mktemp("boundary")
    alpha = make_adapter(model_cache, root / "alpha", name="alpha", seed=1, system_prompt="You are alpha.")
    loaded = load_base_model(BASE, model_cache)
    generator = EngineGenerator(loaded.model, EngineConfig(kv_cache_mb=16, adapter_slots=2, max_lora_rank=8),
                                eos_token_ids=frozenset({loaded.tokenizer.eos_token_id}))
    catalogue = AdapterCatalogue(base_model_id=BASE, base_revision=loaded.resolved.revision, loader=generator,
                                 registry=None)
    catalogue.install_champions([FetchedAdapter("alpha", 1, alpha, read_manifest(alpha))])
    service = ServiceSettings(tracking_uri="sqlite:///unused.db", model_cache_dir=model_cache,
                              adapter_download_dir=root / "downloads", default_max_tokens=8,
                              max_tokens_limit=LIMIT, max_request_bytes=BODY_LIMIT)
    backend = ServingBackend(settings=service, tokenizer=loaded.tokenizer, catalogue=catalogue,
                             generator=generator, context_length=CONTEXT,
                             eos_token_ids=(loaded.tokenizer.eos_token_id,))
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def client(backend):
    with TestClient(create_app(backend)) as client:
        client.baseline = greedy_ids(client)  # before any hostile request: compared at the end
        yield client


def post(client: TestClient, path: str, body: dict[str, Any]):
    """JSON as Python writes it (NaN and Infinity included), which httpx's own encoder refuses."""
    return client.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


def chat_body(**fields: Any) -> dict[str, Any]:
    return {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
            "max_tokens": 4, **fields}


def text_body(**fields: Any) -> dict[str, Any]:
    return {"model": BASE, "prompt": "The quick brown fox", "temperature": 0, "max_tokens": 4, **fields}


def assert_error(response, status: int, param: str | None, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def greedy_ids(client: TestClient) -> list[int]:
    response = post(client, "/v1/chat/completions", chat_body(max_tokens=8, return_token_ids=True))
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


# -- A1: every numeric field against what the engine can represent --------------------------------

NAN, INF = float("nan"), float("inf")
NUMERIC_ERRORS = [
    ("chat", {"seed": 2**64}, "seed"),
    ("chat", {"seed": -(2**63) - 1}, "seed"),
    ("chat", {"seed": 10**40}, "seed"),
    ("chat", {"seed": 1.5}, "seed"),
    ("chat", {"max_tokens": 10**30}, "max_tokens"),
    ("chat", {"max_tokens": True}, "max_tokens"),
    ("chat", {"max_tokens": 2.0}, "max_tokens"),
    ("chat", {"max_tokens": "8"}, "max_tokens"),
    ("chat", {"max_completion_tokens": 10**30}, "max_completion_tokens"),
    ("chat", {"max_completion_tokens": 2**63}, "max_completion_tokens"),
    ("chat", {"temperature": NAN}, "temperature"),
    ("chat", {"temperature": INF}, "temperature"),
    ("chat", {"temperature": -INF}, "temperature"),
    ("chat", {"temperature": True}, "temperature"),
    ("chat", {"top_p": NAN}, "top_p"),
    ("chat", {"top_p": INF}, "top_p"),
    ("chat", {"n": 10**30}, "n"),
    ("chat", {"n": True}, "n"),
    ("chat", {"logprobs": 10**30}, "logprobs"),
    ("chat", {"top_logprobs": 10**30}, "top_logprobs"),
    ("chat", {"stream": "yes"}, "stream"),
    ("text", {"prompt": [5, 10**30]}, "prompt"),
    ("text", {"prompt": [5, 2**63]}, "prompt"),
    ("text", {"prompt": [-1, 5]}, "prompt"),
    ("text", {"prompt": [True, 5]}, "prompt"),
    ("text", {"prompt": [5, 1.5]}, "prompt"),
    ("text", {"max_tokens": -(10**30)}, "max_tokens"),
]


@pytest.mark.parametrize(("kind", "fields", "param"), NUMERIC_ERRORS,
                         ids=[f"{k}-{p}-{i}" for i, (k, _, p) in enumerate(NUMERIC_ERRORS)])
def test_out_of_range_numbers_are_400_naming_the_field(client, kind, fields, param):
    body, path = (chat_body(**fields), "/v1/chat/completions") if kind == "chat" else \
        (text_body(**fields), "/v1/completions")
    error = assert_error(post(client, path, body), 400, param)
    assert error["type"] == "invalid_request_error" and param in error["message"]


def test_an_unrepresentable_seed_is_refused_and_the_server_keeps_its_answers(client):
    """Issue 13 A1: seed 2**64 with sampling used to queue a sequence the engine did not know, and every
    later request failed with 500 until restart."""
    before = greedy_ids(client)
    assert_error(post(client, "/v1/chat/completions", chat_body(seed=2**64, temperature=1)), 400, "seed")
    assert greedy_ids(client) == before, "a refused request changed a later request's answer"
    for seed in (2**64 - 1, -(2**63)):  # the ends of the range are valid seeds
        response = post(client, "/v1/chat/completions", chat_body(seed=seed, temperature=1))
        assert response.status_code == 200, response.text
    assert greedy_ids(client) == before


class Rejecting:
    """A generator that refuses every request, as the engine does for what it cannot run."""

    def __init__(self, param: str | None) -> None:
        self.param = param

    def submit(self, request):
        raise RequestRejected(f"refused by the generator ({self.param})", param=self.param)


@pytest.mark.parametrize(
    ("kind", "engine_param", "fields", "api_param"),
    [("chat", "prompt", {}, "messages"), ("text", "prompt", {}, "prompt"),
     ("chat", "max_tokens", {"max_completion_tokens": 4}, "max_completion_tokens"),
     ("chat", "seed", {"seed": 3}, "seed"), ("text", None, {}, None)],
)
def test_a_request_the_generator_rejects_is_400_naming_the_field(backend, kind, engine_param, fields, api_param):
    app = create_app(dataclasses.replace(backend, generator=Rejecting(engine_param)))
    with TestClient(app) as client:
        body, path = (chat_body(**fields), "/v1/chat/completions") if kind == "chat" else \
            (text_body(**fields), "/v1/completions")
        error = assert_error(post(client, path, body), 400, api_param, "invalid_value")
    assert "refused by the generator" in error["message"]


# -- A1: property test over the request schema ----------------------------------------------------

EDGE_INTS = st.sampled_from([0, 1, -1, 2, 255, 258, 259, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64,
                             -(2**63), -(2**63) - 1, 10**30, -(10**30)])
EDGE_FLOATS = st.sampled_from([0.0, -0.0, 0.5, 1.0, 2.0, 2.0000001, 1e-300, 1e308, NAN, INF, -INF])
SCALARS = (st.none() | st.booleans() | st.integers() | EDGE_INTS | st.floats() | EDGE_FLOATS
           | st.text(max_size=12))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
MESSAGES = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["user", "system", "developer", "assistant", "tool", "robot"]) | JSON,
    "content": st.text(max_size=40) | st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                      "text": st.text(max_size=10)})) | JSON,
}), max_size=3)
PROMPTS = st.text(max_size=40) | st.lists(st.integers(-5, 300) | EDGE_INTS, max_size=6) | JSON
COMMON_FIELDS = ["model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options",
                 "return_token_ids", "n", "logprobs", "top_logprobs", "logit_bias", "presence_penalty",
                 "frequency_penalty", "response_format", "tools", "tool_choice", "user", "metadata"]
CHAT_FIELDS = [*COMMON_FIELDS, "messages", "max_completion_tokens"]
TEXT_FIELDS = [*COMMON_FIELDS, "prompt", "echo", "best_of", "suffix"]
MODELS = st.sampled_from(["alpha", BASE, "alpha@1", "nope", "", "a" * 300, "../x@1"]) | JSON


NUMBERS = EDGE_INTS | EDGE_FLOATS | st.integers() | st.floats()


def _value(field: str) -> st.SearchStrategy:
    return {"messages": MESSAGES | JSON, "prompt": PROMPTS, "model": MODELS}.get(field, NUMBERS | JSON)


def overrides(fields: list[str]) -> st.SearchStrategy:
    """1-3 fields set to anything, on a request that samples or decodes greedily (seeds matter only when
    sampling)."""
    keys = st.lists(st.sampled_from(fields), min_size=1, max_size=3, unique=True)
    chosen = keys.flatmap(lambda names: st.fixed_dictionaries({key: _value(key) for key in names}))
    return st.tuples(st.sampled_from([0, 1]), chosen).map(lambda pair: {"temperature": pair[0], **pair[1]})


def assert_no_server_error(response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    elif response.headers["content-type"].startswith("text/event-stream"):
        events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
        assert events[-1] == "[DONE]"
        assert not any("error" in json.loads(event) for event in events[:-1]), response.text


PROPERTY = settings(max_examples=120, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@PROPERTY
@given(fields=overrides(CHAT_FIELDS))
def test_arbitrary_chat_fields_never_give_a_server_error(client, fields):
    assert_no_server_error(post(client, "/v1/chat/completions", chat_body(**fields)))


@PROPERTY
@given(fields=overrides(TEXT_FIELDS))
def test_arbitrary_completion_fields_never_give_a_server_error(client, fields):
    assert_no_server_error(post(client, "/v1/completions", text_body(**fields)))


@PROPERTY
@given(body=JSON)
def test_arbitrary_bodies_never_give_a_server_error(client, body):
    assert_no_server_error(post(client, "/v1/chat/completions", body))


def test_after_hostile_requests_the_answers_are_unchanged(client):
    """Runs after the property tests above: the server still answers, and as it did before them."""
    assert client.get("/v1/models").status_code == 200
    assert greedy_ids(client) == client.baseline


# -- A8: fields we do not implement are refused, harmless values accepted -------------------------

REFUSED = [
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
              "tool_choice": "required"}, "tools"),
    ("chat", {"tool_choice": "required"}, "tool_choice"),
    ("chat", {"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ("chat", {"guided_json": {"type": "object"}}, "guided_json"),
    ("text", {"guided_regex": "[a-z]+"}, "guided_regex"),
    ("chat", {"logit_bias": {"50": 100}}, "logit_bias"),
    ("chat", {"presence_penalty": 0.5}, "presence_penalty"),
    ("chat", {"frequency_penalty": -1}, "frequency_penalty"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"logprobs": True}, "logprobs"),
    ("chat", {"n": 2}, "n"),
    ("chat", {"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ("chat", {"function_call": {"name": "f"}}, "function_call"),
    ("chat", {"parallel_tool_calls": False}, "parallel_tool_calls"),
    ("chat", {"top_k": 5}, "top_k"),
    ("text", {"best_of": 2}, "best_of"),
    ("text", {"suffix": "the end"}, "suffix"),
    ("text", {"echo": True}, "echo"),
    ("text", {"logprobs": 3}, "logprobs"),
    ("text", {"presence_penalty": 1.0}, "presence_penalty"),
]


@pytest.mark.parametrize(("kind", "fields", "param"), REFUSED,
                         ids=[f"{k}-{p}-{i}" for i, (k, _, p) in enumerate(REFUSED)])
def test_unsupported_fields_are_refused_naming_the_field(client, kind, fields, param):
    body, path = (chat_body(**fields), "/v1/chat/completions") if kind == "chat" else \
        (text_body(**fields), "/v1/completions")
    error = assert_error(post(client, path, body), 400, param, "unsupported_parameter")
    assert param in error["message"] and UNSUPPORTED[param].reason in error["message"]


@pytest.mark.parametrize("field", sorted(UNSUPPORTED))
def test_every_listed_field_is_refused_when_set(client, field):
    """The table is the behaviour: each field in it, set to something it would have to honour, is a 400."""
    for body, path in [(chat_body(**{field: "on"}), "/v1/chat/completions"),
                       (text_body(**{field: "on"}), "/v1/completions")]:
        assert_error(post(client, path, body), 400, field, "unsupported_parameter")


HARMLESS = [
    {"response_format": {"type": "text"}}, {"tools": []}, {"tool_choice": "none"}, {"tool_choice": "auto"},
    {"presence_penalty": 0}, {"frequency_penalty": 0.0}, {"logit_bias": {}}, {"logit_bias": {"5": 0}},
    {"n": 1}, {"logprobs": False}, {"top_logprobs": 0}, {"parallel_tool_calls": True}, {"functions": []},
    {"n": None, "logprobs": None, "tools": None, "response_format": None, "seed": None},
    {"user": "u-1", "metadata": {"team": "a"}, "store": False, "service_tier": "auto",
     "prompt_cache_key": "k", "safety_identifier": "s"},
]


@pytest.mark.parametrize("fields", HARMLESS, ids=[",".join(f) for f in HARMLESS])
def test_harmless_values_and_metadata_are_accepted(client, fields):
    assert post(client, "/v1/chat/completions", chat_body(**fields)).status_code == 200


@pytest.mark.parametrize("fields", [{"best_of": 1}, {"echo": False}, {"suffix": ""}, {"logprobs": 0},
                                    {"logprobs": None}])
def test_harmless_completion_values_are_accepted(client, fields):
    assert post(client, "/v1/completions", text_body(**fields)).status_code == 200


def test_tool_calls_in_the_conversation_are_refused(client):
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "user", "content": "and?"}]
    body = chat_body(messages=messages)
    assert_error(post(client, "/v1/chat/completions", body), 400, "messages.1.tool_calls", "unsupported_parameter")
    messages[1]["tool_calls"] = []
    assert post(client, "/v1/chat/completions", body).status_code == 200


# -- A4: body size limit and CPU work off the event loop -------------------------------------------


def test_bodies_over_the_limit_are_413_with_and_without_content_length(client):
    big = chat_body(messages=[{"role": "user", "content": "x" * BODY_LIMIT}])
    data = json.dumps(big).encode()
    declared = client.post("/v1/chat/completions", content=data, headers={"content-type": "application/json"})
    error = assert_error(declared, 413, None, "request_too_large")
    assert str(BODY_LIMIT) in error["message"] and "max_request_bytes" in error["message"]
    chunks = (data[i : i + 4096] for i in range(0, len(data), 4096))  # no Content-Length: chunked
    streamed = client.post("/v1/chat/completions", content=chunks, headers={"content-type": "application/json"})
    assert "content-length" not in streamed.request.headers
    assert_error(streamed, 413, None, "request_too_large")
    assert post(client, "/v1/chat/completions", chat_body()).status_code == 200, "still serving afterwards"


def test_a_body_just_under_the_limit_is_read(client):
    body = chat_body(messages=[{"role": "user", "content": ""}])
    room = BODY_LIMIT - len(json.dumps(body).encode())
    body["messages"][0]["content"] = "a " * (room // 2)
    response = post(client, "/v1/chat/completions", body)
    assert_error(response, 400, "messages", "context_length_exceeded")  # read and tokenised, then too long


def _run_asgi(app, headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple[list[dict], int]:
    """Drive an ASGI app with a body sent in `chunks`; returns what it sent and how many chunks it pulled."""
    sent: list[dict] = []
    pulled = 0

    async def receive() -> dict:
        nonlocal pulled
        pulled += 1
        if pulled > len(chunks):
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunks[pulled - 1], "more_body": pulled < len(chunks)}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    asyncio.run(app(scope, receive, send))
    return sent, pulled


class _Reader:
    """An app that reads its whole body, then answers 200 with the byte count."""

    def __init__(self) -> None:
        self.received = 0
        self.disconnected = False

    async def __call__(self, scope, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                break
            self.received += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(self.received).encode()})


def test_body_limit_refuses_a_declared_length_before_the_app_sees_the_body():
    inner = _Reader()
    sent, pulled = _run_asgi(BodyLimit(inner, lambda: 1000), [(b"content-length", b"1001")], [b"x" * 1001])
    assert inner.received == 0, "the app never sees an oversized body"
    assert pulled == 1, "a body within the drain bound is read and thrown away, so the client reads the 413"
    assert sent[0]["status"] == 413 and (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_too_large"


def test_body_limit_does_not_read_a_body_declared_beyond_the_drain_bound():
    inner = _Reader()
    declared = str(body_limit.DRAIN_BYTES + 1).encode()
    sent, pulled = _run_asgi(BodyLimit(inner, lambda: 1000), [(b"content-length", declared)], [b"x" * 1001])
    assert pulled == 0 and inner.received == 0
    assert sent[0]["status"] == 413


def test_body_limit_counts_a_chunked_body_and_stops_at_the_limit():
    inner = _Reader()
    chunks = [b"x" * 300] * 1000  # 300 kB, no Content-Length
    sent, pulled = _run_asgi(BodyLimit(inner, lambda: 1000), [], chunks)
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [413], "one answer: the 413"
    assert inner.disconnected and inner.received <= 1000, "the app never gets more than the limit"
    assert pulled == len(chunks), "the rest is drained (discarded, within DRAIN_BYTES) before the 413"


def test_body_limit_passes_bodies_up_to_the_limit():
    for headers in ([(b"content-length", b"1000")], []):
        inner = _Reader()
        sent, _ = _run_asgi(BodyLimit(inner, lambda: 1000), headers, [b"x" * 500, b"y" * 500])
        assert sent[0]["status"] == 200 and sent[1]["body"] == b"1000"


class BlockingTokenizer:
    """The real tokenizer, except that a prompt holding MARK blocks until the test releases it."""

    MARK = "@@block@@"

    def __init__(self, real: Any) -> None:
        self._real = real
        self.entered = threading.Event()
        self.release = threading.Event()
        self.released_by_test = False

    def _block(self, text: str) -> None:
        if self.MARK in text:
            self.entered.set()
            # The wait only breaks the deadlock tokenising on the event loop would cause: it is not timed.
            self.released_by_test = self.release.wait(timeout=60)

    def __call__(self, text, *args, **kwargs):
        self._block(text if isinstance(text, str) else "")
        return self._real(text, *args, **kwargs)

    def apply_chat_template(self, messages, *args, **kwargs):
        self._block(" ".join(str(m.get("content")) for m in messages))
        return self._real.apply_chat_template(messages, *args, **kwargs)

    def __len__(self) -> int:
        return len(self._real)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest.mark.parametrize("kind", ["chat", "text"])
def test_other_requests_are_answered_while_a_prompt_is_tokenised(backend, kind):
    """Issue 13 A4: a 3 MB prompt froze /v1/models for ~6 s because tokenisation ran on the event loop."""
    tokenizer = BlockingTokenizer(backend.tokenizer)
    app = create_app(dataclasses.replace(backend, tokenizer=tokenizer))
    prompt = BlockingTokenizer.MARK + " a" * 20_000  # large (40 kB) but under the body limit
    body = chat_body(messages=[{"role": "user", "content": prompt}]) if kind == "chat" else text_body(prompt=prompt)
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    with TestClient(app) as client:
        slow: dict[str, Any] = {}
        worker = threading.Thread(target=lambda: slow.update(response=post(client, path, body)))
        worker.start()
        try:
            assert tokenizer.entered.wait(timeout=60), "the large prompt never reached the tokenizer"
            models = client.get("/v1/models")  # answered only if the event loop is free
            assert models.status_code == 200
        finally:
            tokenizer.release.set()
            worker.join(timeout=120)
    assert tokenizer.released_by_test, "/v1/models waited for the tokenizer: it ran on the event loop"
    param = "messages" if kind == "chat" else "prompt"
    assert_error(slow["response"], 400, param, "context_length_exceeded")


# -- A9: a prompt larger than the KV pool; unexpected errors echo nothing ----------------------------


def test_a_prompt_larger_than_the_kv_pool_is_400_context_length_exceeded(tmp_path, model_cache):
    """The engine's KV pool (here ~96 tokens) bounds the context below the model's 2048 positions."""
    service = ServiceSettings(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", model_cache_dir=model_cache,
                              adapter_download_dir=tmp_path / "downloads", base_model=BASE, device="cpu",
                              engine=EngineConfig(kv_cache_mb=0.05), load_champions=False, registry_poll_s=0, default_max_tokens=8)
    backend = build_backend(service)
    try:
        assert backend.context_length < 2048
        with TestClient(create_app(backend)) as client:
            long_text = "a " * 400
            assert_error(post(client, "/v1/chat/completions",
                              chat_body(model=BASE, messages=[{"role": "user", "content": long_text}])),
                         400, "messages", "context_length_exceeded")
            assert_error(post(client, "/v1/completions", text_body(prompt=long_text)), 400, "prompt",
                         "context_length_exceeded")
            assert_error(post(client, "/v1/completions", text_body(max_tokens=backend.context_length)), 400,
                         "max_tokens", "context_length_exceeded")
            assert post(client, "/v1/completions", text_body()).status_code == 200, "still serving"
    finally:
        backend.close()


def test_unexpected_errors_answer_a_request_id_and_never_the_exception_text(backend, caplog):
    def boom():
        raise RuntimeError("SECRET-FILE-CONTENTS")

    stub = dataclasses.replace(backend, catalogue=SimpleNamespace(models=boom))
    with caplog.at_level(logging.ERROR, logger="lorafleet.serving.api.openai_api"), \
            TestClient(create_app(stub), raise_server_exceptions=False) as client:
        response = client.get("/v1/models")
    error = assert_error(response, 500, None, "internal_error")
    assert "SECRET" not in response.text and "RuntimeError" not in response.text
    request_id = response.headers["x-request-id"]
    assert request_id in error["message"]
    logged = [record for record in caplog.records if request_id in record.getMessage()]
    assert logged and "SECRET-FILE-CONTENTS" in str(logged[0].exc_info[1])


# -- streams: decoding a token costs the same at token 10 and at token 2000 ---------------------------


class CountingTokenizer:
    def __init__(self, real: Any) -> None:
        self.real, self.longest = real, 0

    def decode(self, ids, **kwargs):
        self.longest = max(self.longest, len(ids))
        return self.real.decode(ids, **kwargs)


@pytest.mark.parametrize("token_text", ["\xa9", "<|im_start|>"])  # a lone UTF-8 continuation byte, a special token
def test_tokens_that_never_form_text_do_not_grow_the_decode_window(tiny_tokenizer, token_text):
    """Incomplete characters are held back; bytes that never complete one used to be held (and re-decoded
    on every push) for the rest of the stream: quadratic work on the event loop."""
    token = tiny_tokenizer(token_text, add_special_tokens=False)["input_ids"][-1]
    ids = tiny_tokenizer("héllo ✓", add_special_tokens=False)["input_ids"] + [token] * 500 \
        + tiny_tokenizer(" wörld", add_special_tokens=False)["input_ids"]
    counting = CountingTokenizer(tiny_tokenizer)
    assembler = TextAssembler(counting)
    text = "".join(assembler.push(token_id) for token_id in ids) + assembler.finish()
    assert counting.longest <= 2 * MAX_HELD_TOKENS + 1
    assert text == tiny_tokenizer.decode(ids, skip_special_tokens=True)
