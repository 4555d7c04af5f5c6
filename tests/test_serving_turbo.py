"""The serving runner with Turbo adapters: their requests decode speculatively, outputs unchanged.

Oracle: greedy `generate` of PEFT with the adapter alone (or the bare base for heads on the base).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lorafleet.models.base import load_base_model
from lorafleet.serving.generation.interface import GenerationRequest, SamplingParams
from lorafleet.serving.generation.runner import GenerationRunner, RunnerConfig

from serving_helpers import add_heads, make_adapter, reference_greedy

PROMPT = "speculate on this"


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, model_cache: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("turbo-adapters")
    plain = make_adapter(model_cache, root / "plain", name="plain", seed=1)
    turbo = add_heads(make_adapter(model_cache, root / "turbo", name="turbo", seed=2), model_cache, seed=3)
    heads = add_heads(turbo, model_cache, seed=4, heads_only_target=root / "heads")
    return {"plain": plain, "turbo": turbo, "heads": heads}


@pytest.fixture(scope="module")
def runner(adapter_dirs, model_cache: Path):
    loaded = load_base_model("tiny-random-llama", model_cache)
    runner = GenerationRunner(loaded.model, pad_token_id=loaded.tokenizer.pad_token_id,
                              config=RunnerConfig(batch_wait_ms=200))
    for name, path in adapter_dirs.items():
        runner.load(name, path)
    runner.prompt = tuple(loaded.tokenizer(PROMPT)["input_ids"])
    yield runner
    runner.close()


async def collect(runner, adapter: str | None, max_tokens: int, **params) -> list[int]:
    params.setdefault("temperature", 0.0)
    stream = runner.submit(GenerationRequest(runner.prompt, SamplingParams(max_tokens=max_tokens, **params), adapter))
    return [token async for token in stream]


def test_turbo_adapters_decode_speculatively_with_unchanged_greedy_output(runner, adapter_dirs, model_cache):
    async def together():
        return await asyncio.gather(*(collect(runner, name, 24) for name in ("plain", "turbo", "heads", None)))

    batches, steps = runner.counters.batches, runner.counters.speculative_steps
    plain, turbo, heads, base = asyncio.run(together())
    assert runner.counters.batches == batches + 3, "plain+base share a batch; each Turbo adapter decodes on its own"
    assert runner.counters.speculative_steps > steps
    prompt = list(runner.prompt)
    assert turbo == reference_greedy(model_cache, adapter_dirs["turbo"], prompt, 24)
    assert plain == reference_greedy(model_cache, adapter_dirs["plain"], prompt, 24)
    # heads on the bare base must not change the base model's output
    assert heads == base == reference_greedy(model_cache, None, prompt, 24)
    assert turbo != base


def test_sampled_turbo_requests_are_reproducible_with_a_seed(runner):
    first = asyncio.run(collect(runner, "turbo", 16, temperature=1.0, seed=11))
    again = asyncio.run(collect(runner, "turbo", 16, temperature=1.0, seed=11))
    greedy = asyncio.run(collect(runner, "turbo", 16))
    assert first == again and len(first) > 0
    assert first != greedy


def test_max_tokens_and_stop_ids_hold_on_the_speculative_path(runner):
    full = asyncio.run(collect(runner, "turbo", 20))
    assert len(asyncio.run(collect(runner, "turbo", 5))) == 5  # a step may accept past the limit: trimmed
    stop = full[6]
    stopped = asyncio.run(collect(runner, "turbo", 20, stop_token_ids=(stop,)))
    assert stopped == full[: full.index(stop)]
