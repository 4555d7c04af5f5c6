"""GenerationRunner on the tiny random Llama with two real LoRA adapters, no server (~10 s).

The oracle is plain PEFT: greedy tokens for a row of a mixed-adapter batch must equal greedy
`generate` of the base model with that one adapter loaded alone.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lorafleet.models.base import load_base_model
from lorafleet.serving.generation.interface import (
    GenerationFailed,
    GenerationRequest,
    GeneratorBusy,
    SamplingParams,
)
from lorafleet.serving.generation.runner import GenerationRunner, RunnerConfig

from serving_helpers import make_adapter, reference_greedy

PROMPTS = {"alpha": "hello there", "beta": "a much longer prompt for the beta adapter", None: "x"}


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, model_cache: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runner-adapters")
    return {
        name: make_adapter(model_cache, root / name, name=name, seed=seed)
        for seed, name in enumerate(["alpha", "beta"], start=1)
    }


@pytest.fixture(scope="module")
def runner(adapter_dirs, model_cache: Path):
    loaded = load_base_model("tiny-random-llama", model_cache)
    runner = GenerationRunner(
        loaded.model, pad_token_id=loaded.tokenizer.pad_token_id, config=RunnerConfig(batch_wait_ms=200), max_queue=4
    )
    for name, path in adapter_dirs.items():
        runner.load(name, path)
    runner.tokenizer = loaded.tokenizer  # for the tests only
    yield runner
    runner.close()


def ids(runner, text: str) -> tuple[int, ...]:
    return tuple(runner.tokenizer(text)["input_ids"])


def greedy(runner, adapter: str | None, max_tokens: int, **params) -> GenerationRequest:
    return GenerationRequest(
        ids(runner, PROMPTS[adapter]),
        SamplingParams(max_tokens=max_tokens, temperature=0.0, **params),
        adapter,
    )


async def collect(runner, request: GenerationRequest) -> tuple[list[int], str | None]:
    stream = runner.submit(request)
    tokens = [token async for token in stream]
    return tokens, stream.finish_reason


def test_mixed_adapter_batch_matches_each_adapter_alone(runner, adapter_dirs, model_cache):
    async def together():
        return await asyncio.gather(*(collect(runner, greedy(runner, name, 12)) for name in PROMPTS))

    before = runner.counters.batches
    results = asyncio.run(together())
    assert runner.counters.batches == before + 1, "three greedy requests submitted together share one batch"
    for (tokens, reason), name in zip(results, PROMPTS, strict=True):
        oracle = reference_greedy(model_cache, adapter_dirs.get(name), list(ids(runner, PROMPTS[name])), 12)
        assert tokens == oracle, f"row for {name or 'base'} differs from PEFT with that adapter alone"
        assert reason == ("length" if len(tokens) == 12 else "stop")
    assert results[0][0] != results[2][0], "the adapter must change the output (LoRA B is non-zero)"


def test_each_row_keeps_its_own_max_tokens(runner):
    async def together():
        return await asyncio.gather(
            collect(runner, greedy(runner, "alpha", 3)), collect(runner, greedy(runner, "beta", 9))
        )

    (short, short_reason), (long, long_reason) = asyncio.run(together())
    assert (len(short), short_reason) == (3, "length")
    assert (len(long), long_reason) == (9, "length")


def test_stop_token_ids_end_the_row_without_emitting_the_stop_token(runner):
    full, _ = asyncio.run(collect(runner, greedy(runner, "alpha", 12)))
    stop = full[4]
    tokens, reason = asyncio.run(collect(runner, greedy(runner, "alpha", 12, stop_token_ids=(stop,))))
    assert tokens == full[: full.index(stop)]
    assert reason == "stop"


def test_cancel_drops_the_request_and_stops_its_batch_early(runner):
    async def cancel_after_three():
        stream = runner.submit(greedy(runner, "alpha", 1500))
        received = []
        async for token in stream:
            received.append(token)
            if len(received) == 3:
                stream.cancel()
        follow_up = await collect(runner, greedy(runner, None, 2))
        return received, stream.finish_reason, follow_up

    steps_before = runner.counters.decode_steps
    received, reason, follow_up = asyncio.run(cancel_after_three())
    assert len(received) == 3 and reason == "cancelled"
    assert len(follow_up[0]) == 2, "the worker keeps serving after a cancellation"
    assert runner.counters.decode_steps - steps_before < 1500, "generation stopped once every row was cancelled"


def test_a_failing_batch_fails_its_requests_and_the_worker_survives(runner):
    async def bad_then_good():
        bad = runner.submit(GenerationRequest((5, 10_000), SamplingParams(max_tokens=3, temperature=0.0)))
        with pytest.raises(GenerationFailed, match="IndexError"):
            [token async for token in bad]
        return await collect(runner, greedy(runner, "beta", 4))

    failed_before = runner.counters.failed_batches
    tokens, reason = asyncio.run(bad_then_good())
    assert runner.counters.failed_batches == failed_before + 1
    assert len(tokens) == 4 and reason == "length"


def test_full_queue_is_refused_with_generator_busy(runner):
    async def flood():
        first = runner.submit(greedy(runner, "alpha", 1500))
        await first.__anext__()  # the worker is now busy generating `first`
        waiting = [runner.submit(greedy(runner, None, 1)) for _ in range(4)]
        with pytest.raises(GeneratorBusy):
            runner.submit(greedy(runner, None, 1))
        first.cancel()
        return [await collect_stream(stream) for stream in waiting]

    async def collect_stream(stream):
        return [token async for token in stream]

    results = asyncio.run(flood())
    assert [len(tokens) for tokens in results] == [1, 1, 1, 1]


def test_seeded_sampling_is_reproducible_and_not_greedy(runner):
    def sample(seed: int) -> list[int]:
        request = GenerationRequest(
            ids(runner, "sampling"), SamplingParams(max_tokens=16, temperature=1.5, seed=seed), "alpha"
        )
        return asyncio.run(collect(runner, request))[0]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_unknown_adapter_and_invalid_names_are_refused(runner):
    async def submit_unknown():
        runner.submit(GenerationRequest((5,), SamplingParams(max_tokens=1), "nope"))

    with pytest.raises(LookupError, match="not loaded"):  # the generator interface's error, as the engine's
        asyncio.run(submit_unknown())
    with pytest.raises(ValueError, match="not usable"):
        runner.load("has.dot", Path("/nonexistent"))
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
