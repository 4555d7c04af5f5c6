"""The real embedded base model: converted from the wheel's GGUF once, then answering a question."""

from __future__ import annotations

import pytest
import torch

from lorafleet.models.base import load_base_model, resolve_base_model
from lorafleet.models.embedded import EMBEDDED_MODEL_ID
from lorafleet.models.prompting import encode_prompt


@pytest.mark.slow
def test_embedded_smollm2_answers_a_question(model_cache):
    loaded = load_base_model(EMBEDDED_MODEL_ID, model_cache)
    config = loaded.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert sum(p.numel() for p in loaded.model.parameters()) == pytest.approx(134.5e6, rel=0.01)

    prompt = encode_prompt(loaded.tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    with torch.inference_mode():
        output = loaded.model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)
    answer = loaded.tokenizer.decode(output[0, len(prompt):], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_embedded_model_is_converted_once_and_reused(model_cache):
    first = resolve_base_model(EMBEDDED_MODEL_ID, model_cache)  # converts if this is the first use
    weights = first.path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    second = resolve_base_model(EMBEDDED_MODEL_ID, model_cache)
    assert second == first and len(first.revision) == 16
    assert weights.stat().st_mtime_ns == stamp  # not converted again
    assert not list(model_cache.glob(f".{EMBEDDED_MODEL_ID}.*.partial"))  # no half-written cache entry
