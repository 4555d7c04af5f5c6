"""The compiled decode step (serving/engine/compiled_decode.py) against the eager forward it replaces.

The arithmetic is checked uncompiled first (cheap, every model family); then compiled graphs on a tiny
model: equal logits and K/V for the variants serving uses (adapter rows between them stay eager), two models of one shape but different
weight formats in one process (they must not share a graph), the engine end to end, and the fault
class "compiling or running the graph fails", which must cost speed and never a request.
"""

from __future__ import annotations

import pytest
import torch

from lorafleet.serving.engine.compiled_decode import CompiledDecode, check_compiler
from lorafleet.serving.engine.config import EngineConfig
from lorafleet.serving.engine.engine import Engine
from lorafleet.serving.engine.lora_slots import LoraSlots
from lorafleet.serving.engine.model import CompactLlama
from lorafleet.serving.engine.sequence import SamplingParams
from tests.serving_helpers import BASE
from tests.test_engine import adapters, make_engine, oracle  # noqa: F401 - the engine suite's fixtures
from tests.test_engine import run as run_engine
from tests.test_engine_lora import random_lora
from tests.test_engine_model import Driver, tiny_hf

PREFILL = [("a", list(range(3, 23)), 0, 0), ("b", [5, 6, 7], 0, 0), ("c", [9, 10, 11, 12], 0, 1)]
# (feeds of one decode forward, whether the compiled step takes it)
DECODES = [
    ([("a", [7], 20, 0)], True),  # one row, base
    ([("c", [8], 4, 1)], False),  # one row on an adapter: LoRA rows stay eager
    ([("a", [9], 21, 0), ("b", [4], 3, 0)], True),  # rows of different contexts: masked
    ([("a", [3], 22, 0), ("b", [5], 4, 0)], True),
    ([("c", [2], 5, 1), ("b", [6], 5, 0)], False),  # mixed adapters: the eager path
    ([("a", [1], 23, 0), ("b", [8], 6, 0)], True),
]


def run(model: CompactLlama, *, seed: int = 3) -> tuple[list[list[torch.Tensor]], Driver]:
    """The prefill and every decode forward above on a fresh paged cache; logits per forward."""
    slots = LoraSlots(model.shape, num_slots=2, max_rank=4, dtype=model.lm_head_weight.dtype)
    slots.load(1, random_lora(model.shape, 4, ("q_proj", "v_proj", "down_proj"), seed=seed))
    driver = Driver(model, lora=slots)
    return [driver.step(feeds) for feeds in [PREFILL, *(d[0] for d in DECODES)]], driver


def assert_same_run(ours: list[list[torch.Tensor]], reference: list[list[torch.Tensor]], atol: float) -> None:
    for forward, (mine, theirs) in enumerate(zip(ours, reference)):
        for logits, expected in zip(mine, theirs):
            torch.testing.assert_close(logits, expected, atol=atol, rtol=0, msg=f"forward {forward}")
            assert torch.equal(logits.argmax(-1), expected.argmax(-1)), f"forward {forward}"


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_the_step_uncompiled_computes_what_the_eager_forward_does(family):
    """The step's arithmetic on its own (no compiler): q/k/v biases (Qwen2) and a sliding window
    (Mistral) included, with the K/V it returns written exactly where the eager path writes them."""
    overrides = {"sliding_window": 6} if family == "mistral" else {}
    hf = tiny_hf(seed=2, family=family, **overrides)
    eager, stepped = CompactLlama.from_hf(hf), CompactLlama.from_hf(hf)
    compiled = stepped.compile_decode(compile_fn=lambda step: step)
    reference, eager_driver = run(eager)
    ours, our_driver = run(stepped)
    assert_same_run(ours, reference, atol=1e-5)
    assert compiled.calls == sum(takes for _, takes in DECODES)
    torch.testing.assert_close(our_driver.kv.k, eager_driver.kv.k, atol=1e-6, rtol=0)
    torch.testing.assert_close(our_driver.kv.v, eager_driver.kv.v, atol=1e-6, rtol=0)


@pytest.mark.parametrize("weight_format", ["dense", "int4"])
def test_compiled_graphs_equal_the_eager_forward(weight_format):
    """Compiled for real: dense fp32 (oneDNN's prepacked weights through custom ops) and int4 (the
    weight-only kernel inside the graph); one row and several, with adapter rows between them."""
    hf = tiny_hf(seed=3)
    reference, _ = run(CompactLlama.from_hf(hf, weight_format=weight_format))
    model = CompactLlama.from_hf(hf, weight_format=weight_format)
    compiled = model.compile_decode()
    ours, _ = run(model)
    assert compiled.disabled is None, compiled.disabled
    assert compiled.calls == sum(takes for _, takes in DECODES)
    assert_same_run(ours, reference, atol=1e-4)


def test_two_models_of_one_shape_and_different_formats_never_share_a_graph():
    """Guards on the weights are dropped for speed; `structure` must keep an int8 model off the int4
    model's graph (same shape, same dtype, same call signature)."""
    hf = tiny_hf(seed=5)
    runs = {}
    for weight_format in ("int4", "int8"):
        model = CompactLlama.from_hf(hf, weight_format=weight_format)
        model.compile_decode()
        runs[weight_format] = run(model)[0]
        assert model.compiled_decode.disabled is None, model.compiled_decode.disabled
    for weight_format, ours in runs.items():
        assert_same_run(ours, run(CompactLlama.from_hf(hf, weight_format=weight_format))[0], atol=1e-4)


def test_engine_with_compiled_decode_generates_what_the_eager_engine_does():
    hf = tiny_hf(seed=4)
    outputs = []
    for compile_decode in (False, True):
        engine = Engine(CompactLlama.from_hf(hf, weight_format="int4"),
                        EngineConfig(kv_cache_mb=4, block_size=4, compile_decode=compile_decode))
        for i in range(3):
            engine.add_request(str(i), list(range(2 + i, 12 + 2 * i)), SamplingParams(max_new_tokens=8), None)
        out: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for result in engine.step():
                assert result.error is None
                out.setdefault(result.request_id, []).extend(result.new_token_ids)
        outputs.append(out)
        if compile_decode:
            assert engine.model.compiled_decode.calls > 0 and engine.model.compiled_decode.disabled is None
    assert outputs[0] == outputs[1]


def test_a_compiled_engine_serves_base_and_any_adapter_without_compiling_after_startup(
        model_cache, adapters, oracle):  # noqa: F811
    """Warm-up compiles every graph a request can need (one row and several, all threads and one fewer):
    base, LoRA and Turbo requests are served with no compile after startup (a compile mid-serving would stall every
    request), and greedy output is plain `generate`'s (PEFT for adapters)."""
    from torch._dynamo.utils import counters

    from lorafleet.models.base import load_base_model

    model = CompactLlama.from_hf(load_base_model(BASE, model_cache).model)  # its own: compiling changes it
    engine = make_engine(model, adapters, compile_decode=True)
    graphs = counters["stats"]["unique_graphs"]
    requests = [(None, 0), ("a0", 1), ("a1", 0), ("turbo", 1), ("heads_only", 0)]
    together = run_engine(engine, requests)
    alone = [run_engine(engine, [request]) for request in requests[:3]]
    threads, seen = torch.get_num_threads(), []
    step = model.compiled_decode._step

    def spy(*args):
        seen.append(torch.get_num_threads())
        return step(*args)

    model.compiled_decode._step = spy
    engine.threads = None  # the count set here, not the tuner's
    try:  # one thread fewer, what thread tuning picks beside a busy neighbour: its graphs exist too
        torch.set_num_threads(max(1, threads - 1))
        fewer = run_engine(engine, [(None, 0)], params=SamplingParams(max_new_tokens=4), prompts=[[5, 6, 7]])
    finally:
        torch.set_num_threads(threads)
        model.compiled_decode._step = step
    assert seen and set(seen) == {max(1, threads - 1)}  # compiled steps ran at that count, not pinned
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled while serving
    assert len(fewer["r0"]) == 4
    assert model.compiled_decode.calls > 0 and model.compiled_decode.disabled is None
    for i, (name, prompt) in enumerate(requests):
        if name != "heads_only":
            assert together[f"r{i}"] == oracle[(name, prompt)], name
    assert [out["r0"] for out in alone] == [oracle[request] for request in requests[:3]]


def test_a_failing_graph_costs_speed_never_a_request():
    """Whatever breaks inside the compiled step (here: the graph raises on its second call), the forward
    reruns eagerly with the same result and the step stays off; no caller sees an error."""
    hf = tiny_hf(seed=6)
    calls = []

    def flaky(step):
        def wrapped(*args):
            calls.append(1)
            if len(calls) > 1:
                raise RuntimeError("simulated inductor failure")
            return step(*args)
        return wrapped

    model = CompactLlama.from_hf(hf)
    compiled = model.compile_decode(compile_fn=flaky)
    ours, _ = run(model)
    assert_same_run(ours, run(CompactLlama.from_hf(hf))[0], atol=1e-5)
    assert compiled.calls == 1 and len(calls) == 2
    assert "simulated inductor failure" in compiled.disabled


def test_warm_up_refuses_when_the_step_cannot_compile():
    def broken(step):
        def wrapped(*args):
            raise RuntimeError("no kernels today")
        return wrapped

    model = CompactLlama.from_hf(tiny_hf(seed=6))
    with pytest.raises(RuntimeError, match="compile_decode could not compile the decode step.*no kernels today"):
        model.compile_decode(compile_fn=broken).warm_up()


def test_compile_decode_without_a_compiler_is_refused_naming_it(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    with pytest.raises(ValueError, match="C\\+\\+ compiler.*no-such-c\\+\\+-compiler"):
        check_compiler()
    with pytest.raises(ValueError, match="compile_decode needs a C\\+\\+ compiler"):
        Engine(CompactLlama.from_hf(tiny_hf(seed=6)), EngineConfig(kv_cache_mb=4, compile_decode=True))
    with pytest.raises(ValueError, match="compile_decode needs a C\\+\\+ compiler"):
        CompiledDecode(CompactLlama.from_hf(tiny_hf(seed=6)))
