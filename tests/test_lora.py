"""LoRA apply/save/load and the adapter directory contract."""

from __future__ import annotations

import json

import pytest
import torch

from lorafleet.models.adapter_dir import (
    MANIFEST_FILE,
    AdapterManifest,
    BaseModelRef,
    InvalidAdapterDir,
    TaskInfo,
    read_manifest,
    validate_adapter_dir,
)
from lorafleet.models.base import load_base_model, tokenizer_fingerprint
from lorafleet.models.lora import LoraSettings, apply_lora, load_adapter, save_adapter


def manifest_for(loaded, name: str = "roundtrip") -> AdapterManifest:
    return AdapterManifest(
        name=name, method="lora", base_model=BaseModelRef(id=loaded.resolved.model_id,
                                                          revision=loaded.resolved.revision),
        tokenizer_hash=tokenizer_fingerprint(loaded.tokenizer), task=TaskInfo(name="test", output_format="json"))


def randomize_lora_b(model) -> None:
    """PEFT initialises B to zero (adapter = identity); make it non-zero so the adapter matters."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)


def test_saved_adapter_reloads_with_identical_outputs(model_cache, tmp_path):
    from peft import PeftModel

    loaded = load_base_model("tiny-random-llama", model_cache)
    model = apply_lora(loaded.model, LoraSettings(r=4))
    randomize_lora_b(model)
    model.eval()
    ids = torch.tensor([[1, 40, 41, 42, 43, 2]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
    assert not torch.allclose(expected, base_logits)

    adapter_dir = save_adapter(model, tmp_path / "adapter", manifest_for(loaded))
    files = {p.name for p in adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", MANIFEST_FILE} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl"))]  # safetensors only

    ours = load_adapter(load_base_model("tiny-random-llama", model_cache).model, adapter_dir)
    stock = PeftModel.from_pretrained(load_base_model("tiny-random-llama", model_cache).model, str(adapter_dir))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(input_ids=ids).logits, expected)
        torch.testing.assert_close(stock.eval()(input_ids=ids).logits, expected)
    assert read_manifest(adapter_dir).base_model.revision == loaded.resolved.revision


def test_failed_save_leaves_no_partial_adapter(model_cache, tmp_path):
    loaded = load_base_model("tiny-random-llama", model_cache)
    model = apply_lora(loaded.model, LoraSettings(r=4))
    turbo_manifest = manifest_for(loaded).model_copy(update={"method": "turbo_lora"})
    with pytest.raises(InvalidAdapterDir, match="turbo_config.json"):
        save_adapter(model, tmp_path / "adapter", turbo_manifest)  # turbo files missing → refused
    assert list(tmp_path.iterdir()) == []


def test_unknown_target_module_is_named(model_cache):
    loaded = load_base_model("tiny-random-llama", model_cache)
    with pytest.raises(ValueError, match=r"lora.target_modules: \['qkv_proj'\]"):
        apply_lora(loaded.model, LoraSettings(target_modules=("q_proj", "qkv_proj")))


def test_adapter_dir_validation_errors(tmp_path):
    with pytest.raises(InvalidAdapterDir, match="lorafleet.json is missing"):
        validate_adapter_dir(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"name": "x"}))
    with pytest.raises(InvalidAdapterDir, match="not a valid manifest"):
        validate_adapter_dir(tmp_path)
