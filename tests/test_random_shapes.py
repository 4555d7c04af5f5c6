"""Random models of named real shapes (models/random_shapes.py): built once, resolved by name, exact shape."""

from __future__ import annotations

import pytest

from lorafleet.models.base import load_base_model, resolve_base_model
from lorafleet.models.random_shapes import SHAPES, random_model_dir


def test_random_tiny_builds_once_loads_with_its_shape_and_serves_on_the_engine(tmp_path):
    from lorafleet.serving.engine.model import CompactLlama

    first = random_model_dir("random:tiny", tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert random_model_dir("random:tiny", tmp_path) == first  # cached, not rebuilt
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    resolved = resolve_base_model("random:tiny", tmp_path)
    assert resolved.path == first and resolved.revision
    loaded = load_base_model("random:tiny", tmp_path, device="cpu", dtype="float32")
    config = loaded.model.config
    for field, value in SHAPES["tiny"].items():
        assert getattr(config, field) == value, field
    compact = CompactLlama.from_hf(loaded.model)
    assert compact.shape.vocab_size == SHAPES["tiny"]["vocab_size"]
    assert loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_the_named_shapes_are_the_published_ones_and_unknown_names_list_them(tmp_path):
    llama = SHAPES["llama-1b"]
    assert (llama["hidden_size"], llama["num_hidden_layers"], llama["num_key_value_heads"], llama["vocab_size"]) == (
        2048, 16, 8, 128256)
    with pytest.raises(ValueError, match="random:llama-1b"):
        random_model_dir("random:llama-70b", tmp_path)
    assert not any(tmp_path.iterdir())  # nothing built for a bad name
