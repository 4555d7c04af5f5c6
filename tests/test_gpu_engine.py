"""The engine's correctness suite on CUDA: run when a GPU is lent (`pytest -m gpu`, scripts/gpu-check.sh).

The same equalities the CPU suite holds (tests/test_engine_model.py, test_engine_lora.py, test_engine.py)
on the CUDA path, which has no prepacked weights and its own attention kernels: logits against
transformers, a batch mixing adapters equal to each request alone, speculative equal to plain, and a KV
pool small enough to preempt. `make test` skips them on a machine without CUDA.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorafleet.models.lora_weights import LORA_MODULES, random_lora
from lorafleet.serving.engine.adapter_cache import AdapterCache, LoadedAdapter, ResolvedAdapter
from lorafleet.serving.engine.config import EngineConfig
from lorafleet.serving.engine.engine import Engine
from lorafleet.serving.engine.lora_slots import LoraSlots
from lorafleet.serving.engine.model import CompactLlama
from lorafleet.serving.engine.sequence import SamplingParams
from tests.test_engine_model import Driver, hf_logits, tiny_hf

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="the engine's CUDA path needs a CUDA device"),
]

DEVICE = torch.device("cuda")
PROMPTS = [[5, 17, 42, 8, 99], [3, 3, 7], [120, 64, 2, 11, 19, 23, 31, 77, 6], [9], [44, 45, 46, 47]]


def engine_with_adapters(model: CompactLlama, names: list[str], **config) -> Engine:
    settings = EngineConfig(**{"kv_cache_mb": 4, "adapter_slots": len(names), "max_lora_rank": 8, **config})
    slots = LoraSlots(model.shape, len(names), 8, dtype=model.lm_head_weight.dtype, device=DEVICE)

    def read(path: Path, shape: object) -> LoadedAdapter:
        return LoadedAdapter(random_lora(model.shape, 8, LORA_MODULES, seed=names.index(path.name)), None)

    cache = AdapterCache(slots, model.shape, lambda name: ResolvedAdapter(name, "v1", Path(name)), reader=read)
    return Engine(model, settings, adapters=cache)


def greedy(engine: Engine, requests: list[tuple[str | None, list[int]]], new: int = 8) -> list[list[int]]:
    for i, (adapter, prompt) in enumerate(requests):
        engine.add_request(str(i), prompt, SamplingParams(max_new_tokens=new), adapter)
    out: dict[str, list[int]] = {str(i): [] for i in range(len(requests))}
    while engine.has_unfinished():
        for result in engine.step():
            assert result.error is None, result.error
            out[result.request_id].extend(result.new_token_ids)
    return [out[str(i)] for i in range(len(requests))]


def test_cuda_logits_equal_transformers():
    hf = tiny_hf(seed=0).to(DEVICE)
    model = CompactLlama.from_hf(hf)
    assert model.lm_head_weight.device.type == DEVICE.type and not model.prepacked  # CUDA: dense weights
    tokens = [5, 9, 14, 2, 77, 31, 8]
    ours = Driver(model).step([("a", tokens, 0, 0)])[0]
    torch.testing.assert_close(ours, hf_logits(hf, tokens), atol=1e-4, rtol=0)


def test_cuda_mixed_adapters_equal_each_alone_and_preemption_changes_nothing():
    model = CompactLlama.from_hf(tiny_hf(seed=1).to(DEVICE))
    names = ["a0", "a1", "a2"]
    requests = [(names[i % 3] if i % 4 else None, prompt) for i, prompt in enumerate(PROMPTS)]
    together = greedy(engine_with_adapters(model, names), requests)
    for request, tokens in zip(requests, together):
        assert greedy(engine_with_adapters(model, names), [request]) == [tokens]
    tight = engine_with_adapters(model, names, kv_cache_mb=0.02, block_size=4)  # forces preemption
    assert greedy(tight, requests) == together


def test_cuda_speculative_greedy_equals_plain():
    from lorafleet.models.turbo_heads import new_heads

    hf = tiny_hf(seed=2).to(DEVICE)
    model = CompactLlama.from_hf(hf)
    heads = new_heads(hf, 3).to(DEVICE)
    outputs = {}
    for mode in ("on", "off"):
        settings = EngineConfig(kv_cache_mb=4, adapter_slots=1, max_lora_rank=8, speculation=mode)
        slots = LoraSlots(model.shape, 1, 8, device=DEVICE)
        cache = AdapterCache(slots, model.shape, lambda name: ResolvedAdapter(name, "v1", Path(name)),
                             reader=lambda path, shape: LoadedAdapter(None, heads))
        engine = Engine(model, settings, adapters=cache)
        outputs[mode] = greedy(engine, [("turbo", prompt) for prompt in PROMPTS], new=12)
        if mode == "on":
            assert engine.stats.spec_draft_tokens > 0
    assert outputs["on"] == outputs["off"]
