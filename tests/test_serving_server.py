"""End to end: a real `bentoml serve` subprocess over a real SQLite MLflow registry (~40 s).

One server for the whole module: base `tiny-random-llama` (chosen automatically: it is the base of
most champions), champions `alpha` and `beta`, a champion `gamma` trained on another base (must be
skipped), and `alpha` version 2 under the alias `challenger` (loaded on demand). The catalogue is
also exercised in-process against the same registry.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from lorafleet.models.base import load_tokenizer, resolve_base_model
from lorafleet.models.embedded import EMBEDDED_MODEL_ID
from lorafleet.models.prompting import encode_prompt
from lorafleet.registry_read import RegistryReader
from lorafleet.serving.catalogue.adapters import (
    AdapterCatalogue,
    AdapterIncompatible,
    ModelNotFound,
    choose_base_model,
    fetch_champions,
)
from lorafleet.serving.launcher import ServerStartError, start_server
from lorafleet.settings import Settings

from serving_helpers import BASE, make_adapter, reference_greedy, register_adapter

SYSTEM = {"alpha": "You are alpha.", "beta": "You are beta."}


@dataclass
class Fleet:
    settings: Settings
    dirs: dict[str, Path]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, model_cache: Path) -> Fleet:
    from mlflow import MlflowClient

    settings = Settings.for_home(
        tmp_path_factory.mktemp("fleet") / "home", model_cache_dir=model_cache
    ).ensure()
    client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
    src = settings.home / "src"
    dirs = {
        "alpha": make_adapter(
            model_cache, src / "alpha", name="alpha", seed=1, system_prompt=SYSTEM["alpha"]
        ),
        "beta": make_adapter(model_cache, src / "beta", name="beta", seed=2, system_prompt=SYSTEM["beta"]),
        "gamma": make_adapter(model_cache, src / "gamma", name="gamma", seed=3, base_model=f"{BASE}-seed1"),
        "alpha@2": make_adapter(model_cache, src / "alpha2", name="alpha", seed=4),
    }
    for name in ("alpha", "beta", "gamma"):
        register_adapter(client, dirs[name], name=name, artifact_root=settings.mlflow_artifacts_dir)
    version = register_adapter(
        client, dirs["alpha@2"], name="alpha", artifact_root=settings.mlflow_artifacts_dir, champion=False
    )
    assert client.get_model_version_by_alias("alpha", "challenger").version in (version, str(version))
    return Fleet(settings, dirs)


@pytest.fixture(scope="module")
def server(fleet: Fleet):
    # A long batching window makes the concurrent requests below share one batch.
    with start_server(
        fleet.settings, env={"LORAFLEET_SERVE_BATCH_WAIT_MS": "200", "HF_HUB_OFFLINE": "1"}
    ) as handle:
        yield handle


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(model_cache: Path):
    return load_tokenizer(resolve_base_model(BASE, model_cache))


def chat(http, model: str, content: str = "Tell me a story.", **fields) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 12,
        "return_token_ids": True,
        **fields,
    }
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_models_lists_base_and_compatible_champions(http):
    ids = [model["id"] for model in http.get("/v1/models").json()["data"]]
    assert ids[:3] == [BASE, "alpha", "beta"], "gamma (other base) must be skipped"
    assert "gamma" not in ids


def test_greedy_chat_equals_peft_with_that_adapter_alone(http, fleet, tokenizer, model_cache):
    body = chat(http, "alpha")
    prompt = encode_prompt(
        tokenizer,
        [{"role": "system", "content": SYSTEM["alpha"]}, {"role": "user", "content": "Tell me a story."}],
    )
    assert body["prompt_token_ids"] == prompt, "the adapter's system prompt is prepended"
    tokens = body["choices"][0]["token_ids"]
    assert tokens == reference_greedy(model_cache, fleet.dirs["alpha"], prompt, 12)
    assert body["usage"] == {
        "prompt_tokens": len(prompt),
        "completion_tokens": len(tokens),
        "total_tokens": len(prompt) + len(tokens),
    }
    assert body["choices"][0]["finish_reason"] == ("length" if len(tokens) == 12 else "stop")


def test_name_alias_and_version_resolve_to_the_champion(http):
    answers = {
        model: chat(http, model)["choices"][0]["token_ids"]
        for model in ("alpha", "alpha@champion", "alpha@1")
    }
    assert len({tuple(tokens) for tokens in answers.values()}) == 1
    assert chat(http, "beta")["choices"][0]["token_ids"] != answers["alpha"]


def test_challenger_alias_loads_version_two_on_demand(http, fleet, tokenizer, model_cache):
    body = chat(http, "alpha@challenger")
    prompt = body["prompt_token_ids"]
    assert body["choices"][0]["token_ids"] == reference_greedy(model_cache, fleet.dirs["alpha@2"], prompt, 12)
    ids = [model["id"] for model in http.get("/v1/models").json()["data"]]
    assert "alpha@2" in ids


def test_completions_stream_and_non_stream_agree(http, oai):
    request = {"model": "beta", "prompt": "Once upon a time", "max_tokens": 10, "temperature": 0}
    whole = oai.completions.create(**request)
    assert whole.usage.completion_tokens > 0
    with http.stream("POST", "/v1/completions", json={**request, "stream": True}) as response:
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == whole.choices[0].text
    assert chunks[-1]["choices"][0]["finish_reason"] == whole.choices[0].finish_reason


def test_per_request_merge_over_http_equals_peft_on_the_offline_merge(oai, fleet, tokenizer, model_cache, tmp_path):
    """LoRAX-style `merged_adapters` through the OpenAI client's `extra_body`, on the real server."""
    from transformers import AutoConfig

    from lorafleet.models.adapter_dir import read_manifest
    from lorafleet.models.lora_weights import ProjectionShape, read_peft_adapter
    from lorafleet.models.merging import MergeRecipe, merge_lora, peft_config_of, save_merged_adapter

    merge = {"ids": ["alpha", "beta"], "weights": [0.6, 0.4], "merge_strategy": "ties", "density": 0.7}
    whole = oai.completions.create(model=BASE, prompt="Once upon a time", max_tokens=10, temperature=0,
                                   extra_body={"merged_adapters": merge, "return_token_ids": True})
    shape = ProjectionShape.from_hf_config(AutoConfig.from_pretrained(str(resolve_base_model(BASE, model_cache).path)))
    parents = [fleet.dirs["alpha"], fleet.dirs["beta"]]
    merged = merge_lora([read_peft_adapter(folder, shape) for folder in parents],
                        MergeRecipe(weights=(0.6, 0.4), method="ties", density=0.7))
    template = json.loads((parents[0] / "adapter_config.json").read_text())
    offline = save_merged_adapter(merged, tmp_path / "merged", peft_config_of(merged, template),
                                  read_manifest(parents[0]).model_copy(update={"method": "merge"}))
    prompt = tokenizer("Once upon a time")["input_ids"]
    tokens = whole.choices[0].model_extra["token_ids"]
    assert tokens == reference_greedy(model_cache, offline, prompt, 10)


def test_openai_client_chat_stream(oai):
    messages = [{"role": "user", "content": "Hello!"}]
    whole = oai.chat.completions.create(model="alpha", messages=messages, max_tokens=10, temperature=0)
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in oai.chat.completions.create(
            model="alpha", messages=messages, max_tokens=10, temperature=0, stream=True
        )
        if chunk.choices
    ]
    assert "".join(pieces) == whole.choices[0].message.content
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


def test_concurrent_requests_for_different_adapters_match_their_solo_answers(http, server):
    models = ["alpha", "beta", BASE, "alpha@challenger"]
    # Long enough that the four requests overlap in the engine: at 8 tokens a request on the tiny
    # model could finish before the next HTTP handler had submitted its own.
    max_tokens = 32
    solo = {model: chat(http, model, max_tokens=max_tokens)["choices"][0]["token_ids"] for model in models}
    before = _batch_metrics(http)
    barrier = threading.Barrier(len(models))

    def one(model: str) -> list[int]:
        barrier.wait()
        return chat(http, model, max_tokens=max_tokens)["choices"][0]["token_ids"]

    with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
        together = dict(zip(models, pool.map(one, models), strict=True))
    assert together == solo
    batches, rows = (after - first for after, first in zip(_batch_metrics(http), before, strict=True))
    # The histogram observes rows per forward (the engine: per step); more rows than forwards means
    # some forward carried several of these requests at once.
    assert batches >= 1 and rows > batches, "the requests shared a batch"


def _batch_metrics(http) -> tuple[float, float]:
    text = http.get("/metrics").text
    values = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith(("lorafleet_batch_size_count", "lorafleet_batch_size_sum"))
    }
    return values["lorafleet_batch_size_count"], values["lorafleet_batch_size_sum"]


def test_a_client_that_disconnects_mid_stream_is_dropped(http, server):
    body = {"model": "alpha", "prompt": "x", "max_tokens": 1500, "temperature": 0, "stream": True}
    with (
        httpx.Client(base_url=server.url, timeout=60) as own,
        own.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert next(line for line in response.iter_lines() if line).startswith("data: {")
    # Leaving both blocks closed the connection after one chunk; the server notices within ~0.25 s.
    gone = 'lorafleet_requests_total{endpoint="completions",model="alpha",status="499"} 1.0'
    deadline = time.monotonic() + 120  # a hang guard, not a timing check: a busy machine may take long
    while gone not in http.get("/metrics").text and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone in http.get("/metrics").text
    assert chat(http, "alpha", max_tokens=2)["usage"]["completion_tokens"] > 0


BAD_REQUESTS = [
    ({"max_tokens": -5}, "max_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "a" * 2100}]}, "messages"),
    ({"model": "gamma"}, "model"),
]


def test_bad_requests_get_openai_errors_and_the_server_survives(http, oai):
    for fields, param in BAD_REQUESTS:
        body = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], **fields}
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 400, (fields, response.text)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert response.json()["error"]["param"] == param
    malformed = http.post(
        "/v1/completions",
        content=b'{"model": "alpha", "prompt": ',
        headers={"content-type": "application/json"},
    )
    assert malformed.status_code == 400 and malformed.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as missing:
        oai.chat.completions.create(model="no-such-adapter", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as invalid:
        oai.completions.create(model="alpha", prompt="hi", temperature=3)
    assert invalid.value.body["param"] == "temperature"
    assert chat(http, "alpha", max_tokens=2)["usage"]["completion_tokens"] > 0


def test_health_and_metrics_endpoints(http):
    assert http.get("/livez").status_code == 200
    assert http.get("/readyz").status_code == 200
    chat(http, "beta", max_tokens=2)
    metrics = http.get("/metrics")
    assert metrics.status_code == 200
    assert 'lorafleet_requests_total{endpoint="chat.completions",model="beta",status="200"}' in metrics.text
    assert 'lorafleet_generated_tokens_total{model="beta"}' in metrics.text
    assert "bentoml_service_request_total" in metrics.text


# -- the catalogue in-process, against the same registry ------------------------------------------


class RecordingLoader:
    def __init__(self) -> None:
        self.loaded: list[str] = []
        self.lock = threading.Lock()

    def load(self, name: str, adapter_dir: Path) -> None:
        assert (adapter_dir / "adapter_model.safetensors").exists()
        with self.lock:
            self.loaded.append(name)


def test_catalogue_resolution_against_the_registry(fleet, tmp_path):
    registry = RegistryReader(fleet.settings.tracking_uri, tmp_path / "downloads")
    champions = fetch_champions(registry)
    assert sorted((a.name, a.version) for a in champions) == [("alpha", 1), ("beta", 1), ("gamma", 1)]
    assert choose_base_model(None, champions) == BASE
    assert choose_base_model("other", champions) == "other"
    assert choose_base_model(None, []) == EMBEDDED_MODEL_ID

    loader = RecordingLoader()
    catalogue = AdapterCatalogue(base_model_id=BASE, base_revision="r", loader=loader, registry=registry)
    installed = catalogue.install_champions(champions)
    assert [entry.name for entry in installed] == ["alpha", "beta"]
    assert catalogue.resolve("alpha") == catalogue.resolve("alpha@champion") == catalogue.resolve("alpha@1")
    assert catalogue.resolve(BASE).adapter is None
    assert catalogue.resolve("alpha").system_prompt == SYSTEM["alpha"]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        resolved = list(pool.map(catalogue.resolve, ["alpha@challenger", "alpha@2"] * 2))
    assert {entry.version for entry in resolved} == {2}
    assert loader.loaded.count(resolved[0].adapter) == 1, "a version is loaded once, however many ask"
    assert (tmp_path / "downloads" / "alpha" / "v2" / "lorafleet.json").exists()

    for model in ("alpha@99", "nope", "alpha@nope", "alpha@", "@1", "a@b@c"):
        with pytest.raises(ModelNotFound):
            catalogue.resolve(model)
    with pytest.raises(AdapterIncompatible, match="seed1"):
        catalogue.resolve("gamma")


def test_launcher_reports_a_server_that_cannot_start(fleet, tmp_path):
    with pytest.raises(ServerStartError, match="LORAFLEET_SERVE_MAX_BATCH_SIZE"):
        start_server(
            fleet.settings,
            env={"LORAFLEET_SERVE_MAX_BATCH_SIZE": "0"},
            log_file=tmp_path / "bad.log",
            startup_timeout=120,
        )
