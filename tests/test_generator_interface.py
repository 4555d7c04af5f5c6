"""Both generators implement the one generator interface fully, on the tiny random Llama (~15 s).

The HTTP layer, the admin API and the catalogue no longer ask which generator they hold (they used to branch on
`isinstance(..., EngineGenerator)` and `getattr(loader, "unload_adapter")`): every difference is an answer of
the interface. This holds each generator to it, and both to the same greedy tokens and the same end ids.
"""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import pytest

from lorafleet.models.base import load_base_model
from lorafleet.models.sampling_rules import eos_token_ids
from lorafleet.serving.engine.config import EngineConfig
from lorafleet.serving.generation.engine_generator import EngineGenerator
from lorafleet.serving.generation.interface import (
    GenerationRequest,
    GeneratorStats,
    ResidentAdapter,
    SamplingParams,
    TokenGenerator,
    UnloadNotSupported,
)
from lorafleet.serving.generation.runner import GenerationRunner

from serving_helpers import BASE, make_adapter

PROMPT = (5, 9, 14, 3, 27)
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, model_cache: Path) -> Path:
    return make_adapter(model_cache, tmp_path_factory.mktemp("interface") / "alpha", name="alpha", seed=3)


@pytest.fixture(scope="module", params=["engine", "peft"])
def generator(request, model_cache: Path, adapter_dir: Path):
    loaded = load_base_model(BASE, model_cache)
    eos = frozenset(eos_token_ids(loaded.model, loaded.tokenizer))
    if request.param == "engine":
        made = EngineGenerator(loaded.model, EngineConfig(kv_cache_mb=4, adapter_slots=2, max_lora_rank=8),
                               eos_token_ids=eos)
    else:
        made = GenerationRunner(loaded.model, pad_token_id=loaded.tokenizer.pad_token_id, eos_token_ids=eos)
    made.load("alpha-v1", adapter_dir)
    yield request.param, made
    made.close()


def run(generator: TokenGenerator, adapter: str | None, stop_token_ids: tuple[int, ...] = ()) -> list[int]:
    async def collect() -> list[int]:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, stop_token_ids=stop_token_ids)
        return [token async for token in generator.submit(GenerationRequest(PROMPT, params, adapter))]

    return asyncio.run(collect())


def test_every_member_of_the_interface_is_implemented():
    members = {name for name, _ in inspect.getmembers(TokenGenerator) if not name.startswith("_")}
    assert {"submit", "load", "warm", "unload", "resident", "stats", "close", "adapters"} <= members
    for cls in (EngineGenerator, GenerationRunner):
        for name in members:
            assert hasattr(cls, name), f"{cls.__name__} lacks {name}"
            if callable(getattr(TokenGenerator, name)):
                wanted = list(inspect.signature(getattr(TokenGenerator, name)).parameters)
                assert list(inspect.signature(getattr(cls, name)).parameters)[: len(wanted)] == wanted, (cls, name)


def test_load_warm_resident_stats_and_unload_answer_through_the_interface(generator):
    backend, made = generator
    assert made.adapters == {"alpha-v1"}
    slot = made.warm("alpha-v1")  # resident now, whichever generator
    resident = {row.adapter: row for row in made.resident()}
    assert isinstance(resident["alpha-v1"], ResidentAdapter) and resident["alpha-v1"].slot == slot
    stats = made.stats()
    assert isinstance(stats, GeneratorStats) and stats.backend == backend
    with pytest.raises(LookupError):
        made.warm("never-loaded")
    if backend == "engine":
        assert slot is not None and stats.adapter_slots == 2 and stats.capacity_tokens > 0
        assert made.unload("alpha-v1") is True and "alpha-v1" not in {r.adapter for r in made.resident()}
        assert made.warm("alpha-v1") is not None  # read again, and served as before
    else:
        assert slot is None and (stats.adapter_slots, stats.capacity_tokens) == (None, None)
        with pytest.raises(UnloadNotSupported):
            made.unload("alpha-v1")
        assert "alpha-v1" in {r.adapter for r in made.resident()}


def test_both_generators_give_the_same_greedy_tokens_and_stop_at_the_same_ids(generator, model_cache):
    """Greedy answers agree across generators (the engine's are checked against PEFT elsewhere too), and a stop id
    cuts both at the same place: the shared `sampling_rules.cut_at_stop`, budget first, then the stop."""
    _, made = generator
    loaded = load_base_model(BASE, model_cache)
    expected = {}
    for adapter in (None, "alpha-v1"):
        expected[adapter] = run(made, adapter)
        assert len(expected[adapter]) == MAX_TOKENS
        stop = expected[adapter][4]
        first = expected[adapter].index(stop)
        assert run(made, adapter, (stop,)) == expected[adapter][:first]
    reference = GenerationRunner(loaded.model, pad_token_id=loaded.tokenizer.pad_token_id)
    try:
        assert run(reference, None) == expected[None]
    finally:
        reference.close()
