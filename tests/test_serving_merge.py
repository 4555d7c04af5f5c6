"""Per-request merges (`merged_adapters`) through the OpenAI API on the engine: each equals the same merge
written offline (`models/merging.py`, what `lorafleet merge` registers), batches with other adapters'
rows unchanged, and bad merges are 400s naming the field."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lorafleet.models.adapter_dir import read_manifest
from lorafleet.models.base import load_base_model
from lorafleet.models.lora_weights import read_peft_adapter
from lorafleet.models.merging import MergeRecipe, merge_lora, peft_config_of, save_merged_adapter
from lorafleet.registry_read import FetchedAdapter
from lorafleet.serving.api.openai_api import create_app
from lorafleet.serving.backend import ServingBackend
from lorafleet.serving.catalogue.adapters import AdapterCatalogue
from lorafleet.serving.engine.config import EngineConfig
from lorafleet.serving.engine.model import LlamaShape
from lorafleet.serving.generation.engine_generator import EngineGenerator
from lorafleet.serving.generation.interface import GenerationRequest, SamplingParams
from lorafleet.serving.settings import ServiceSettings

from serving_helpers import BASE, make_adapter, reference_greedy

PROMPT = [1, 40, 41, 42, 43, 44, 45]
TOKENS = 12
RECIPES = {  # name: (strategy, weights, density, seed)
    "mix-linear": ("linear", (0.7, 0.3), None, 0),
    "mix-cat": ("cat", (0.7, 0.3), None, 0),
    "mix-svd": ("svd", (0.7, 0.3), None, 0),
    "mix-ties": ("ties", (0.7, 0.3), 0.5, 0),
    "mix-dare": ("dare_ties", (0.7, 0.3), 0.5, 3),
}


def offline_merge(parents: list[Path], recipe: MergeRecipe, target: Path, shape: LlamaShape) -> Path:
    """The merge as `lorafleet merge` writes it (tasks/merge.py: merge_lora + save_merged_adapter)."""
    import json

    merged = merge_lora([read_peft_adapter(folder, shape) for folder in parents], recipe)
    template = json.loads((parents[0] / "adapter_config.json").read_text())
    manifest = read_manifest(parents[0]).model_copy(update={"name": target.name, "method": "merge"})
    return save_merged_adapter(merged, target, peft_config_of(merged, template), manifest)


@pytest.fixture(scope="module")
def served(tmp_path_factory, model_cache: Path):
    root = tmp_path_factory.mktemp("merge")
    alpha = make_adapter(model_cache, root / "alpha", name="alpha", seed=1, system_prompt="You are alpha.")
    beta = make_adapter(model_cache, root / "beta", name="beta", seed=2)
    loaded = load_base_model(BASE, model_cache)
    shape = LlamaShape.from_hf_config(loaded.model.config)
    offline = {name: offline_merge([alpha, beta], MergeRecipe(weights=w, method=m, density=d, seed=s),
                                   root / name, shape)
               for name, (m, w, d, s) in RECIPES.items()}
    generator = EngineGenerator(loaded.model, EngineConfig(kv_cache_mb=16, adapter_slots=3, max_lora_rank=8),
                                eos_token_ids=frozenset({loaded.tokenizer.eos_token_id}))
    catalogue = AdapterCatalogue(base_model_id=BASE, base_revision=loaded.resolved.revision, loader=generator,
                                 registry=None)
    catalogue.install_champions([FetchedAdapter(name, 1, folder, read_manifest(folder)) for name, folder in
                                 {"alpha": alpha, "beta": beta, **offline}.items()])
    settings = ServiceSettings(tracking_uri="sqlite:///unused.db", model_cache_dir=model_cache,
                               adapter_download_dir=root / "downloads", default_max_tokens=TOKENS,
                               max_tokens_limit=64, bind_host="127.0.0.1", allowed_hosts=("testserver",))
    backend = ServingBackend(settings=settings, tokenizer=loaded.tokenizer, catalogue=catalogue,
                             generator=generator, context_length=128,
                             eos_token_ids=(loaded.tokenizer.eos_token_id,), metrics=None)
    with TestClient(create_app(backend)) as client:
        yield client, generator, offline, catalogue
    backend.close()


def complete(client, model: str, **fields):
    body = {"model": model, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "return_token_ids": True,
            **fields}
    return client.post("/v1/completions", json=body)


def merged_body(name: str) -> dict:
    strategy, weights, density, seed = RECIPES[name]
    body = {"ids": ["alpha", "beta"], "weights": list(weights), "merge_strategy": strategy, "seed": seed}
    return body | ({"density": density} if density is not None else {})


@pytest.mark.parametrize("name", list(RECIPES))
def test_per_request_merge_equals_the_offline_merge(served, model_cache, name):
    client, _, offline, _ = served
    response = complete(client, BASE, merged_adapters=merged_body(name))
    assert response.status_code == 200, response.text
    tokens = response.json()["choices"][0]["token_ids"]
    assert tokens == complete(client, name).json()["choices"][0]["token_ids"]
    assert tokens == reference_greedy(model_cache, offline[name], PROMPT, TOKENS)  # stock PEFT on the folder
    assert response.json()["model"] == BASE


def test_a_merge_differs_from_its_parents_and_is_reused(served):
    client, generator, _, _ = served
    alpha = complete(client, "alpha").json()["choices"][0]["token_ids"]
    merged = complete(client, BASE, merged_adapters=merged_body("mix-cat")).json()["choices"][0]["token_ids"]
    assert merged != alpha
    loads = generator.cache.stats.loads
    complete(client, BASE, merged_adapters=merged_body("mix-cat"))
    assert generator.cache.stats.loads == loads  # the same recipe is the same resident slot


def test_merge_rows_batch_with_other_adapters_unchanged(served):
    """One batch: a merge, its two parents and the base model; each equals its request alone."""
    client, generator, _, catalogue = served
    models = ["alpha", "beta", BASE]
    alone = {model: complete(client, model).json()["choices"][0]["token_ids"] for model in models}
    alone["merge"] = complete(client, BASE, merged_adapters=merged_body("mix-linear")).json()["choices"][0][
        "token_ids"]
    names = {model: catalogue.resolve(model).adapter for model in models}
    merge_name = generator.load_merge([names["alpha"], names["beta"]],
                                      MergeRecipe(weights=(0.7, 0.3), method="linear"))

    async def together() -> dict[str, list[int]]:
        params = SamplingParams(max_tokens=TOKENS, temperature=0.0)
        streams = {model: generator.submit(GenerationRequest(tuple(PROMPT), params, names[model]))
                   for model in models}
        streams["merge"] = generator.submit(GenerationRequest(tuple(PROMPT), params, merge_name))
        return {model: [token async for token in stream] for model, stream in streams.items()}

    assert asyncio.run(together()) == alone


@pytest.mark.parametrize(("merge", "status", "param", "words"), [
    ({"ids": ["alpha", "nope"]}, 404, "merged_adapters.ids.1", "nope"),
    ({"ids": ["alpha", BASE]}, 400, "merged_adapters.ids.1", "base model"),
    ({"ids": ["alpha", "alpha"]}, 400, "merged_adapters", "distinct"),
    ({"ids": ["alpha", "beta"], "weights": [1.0]}, 400, "merged_adapters", "weights"),
    ({"ids": ["alpha", "beta"], "merge_strategy": "ties"}, 400, "merged_adapters", "density"),
    ({"ids": ["alpha", "beta"], "weights": [True, 1.0]}, 400, "merged_adapters.weights.0", "number"),
    ({"ids": ["alpha", "beta"], "weights": [0, 0]}, 400, "merged_adapters", "non-zero"),
    ({"ids": ["alpha", "mix-cat"], "merge_strategy": "linear"}, 400, "merged_adapters", "one rank"),
    ({"ids": ["mix-cat", "alpha"], "merge_strategy": "cat"}, 400, "merged_adapters", "rank <= 8"),
])
def test_bad_merges_are_4xx_naming_the_field(served, merge, status, param, words):
    client, *_ = served
    response = complete(client, BASE, merged_adapters=merge)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert complete(client, "alpha").status_code == 200  # the server carries on


def test_merge_needs_the_base_model_as_model(served):
    client, *_ = served
    response = complete(client, "alpha", merged_adapters={"ids": ["alpha", "beta"]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "model"
