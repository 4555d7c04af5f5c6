"""`lorafleet export NAME --merged OUT_DIR`: a merged folder stock transformers loads, with base+adapter logits.

The oracle is PEFT's unmerged base+adapter on a fresh base; the bare base's logits prove the adapter matters.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lorafleet.models import export as export_module
from lorafleet.models.adapter_dir import (
    MANIFEST_FILE,
    PEFT_WEIGHTS_FILE,
    TURBO_CONFIG_FILE,
    TURBO_WEIGHTS_FILE,
    AdapterManifest,
    BaseModelRef,
    InvalidAdapterDir,
    TaskInfo,
)
from lorafleet.models.base import load_base_model, tokenizer_fingerprint
from lorafleet.models.export import export_merged
from lorafleet.models.lora import LoraSettings, apply_lora, load_adapter, save_adapter
from lorafleet.models.turbo_heads import load_heads, new_heads

TEXTS = ("name_ok[x]", "Hello, lorafleet!", "<|im_start|>user\nhi<|im_end|>")


def manifest_for(loaded, method: str = "lora", **extra) -> AdapterManifest:
    return AdapterManifest(
        name="exported", method=method, tokenizer_hash=tokenizer_fingerprint(loaded.tokenizer),
        base_model=BaseModelRef(id=loaded.resolved.model_id, revision=loaded.resolved.revision),
        task=TaskInfo(name="test"), metrics={"field_f1": 0.5}, **extra)


def random_lora(loaded, seed: int = 1):
    """A LoRA whose B matrices are random: PEFT's zero B would make the adapter the identity."""
    model = apply_lora(loaded.model, LoraSettings(r=4, target_modules=("q_proj", "v_proj", "up_proj")))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    return model.eval()


def random_heads(model):
    heads = new_heads(model, num_heads=2, block_size=16)
    with torch.no_grad():
        for param in heads.parameters():
            param.normal_(0, 0.1)  # W_up starts at zero; make the file distinguishable from fresh heads
    return heads


@pytest.fixture
def lora_dir(tiny_model, tmp_path: Path) -> Path:
    return save_adapter(random_lora(tiny_model), tmp_path / "adapter", manifest_for(tiny_model))


@pytest.fixture
def turbo_dir(tiny_model, tmp_path: Path) -> Path:
    model = random_lora(tiny_model, seed=2)
    return save_adapter(model, tmp_path / "turbo", manifest_for(tiny_model, "turbo_lora"),
                        heads=random_heads(model))


def batch_ids(tokenizer) -> list[torch.Tensor]:
    return [torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]]) for text in TEXTS]  # (1, T)


def logits_of(model, ids: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=row).logits for row in ids]  # (1, T, V) each


def reference_logits(adapter_dir: Path, model_cache: Path, ids: list[torch.Tensor]) -> list[torch.Tensor]:
    """PEFT base+adapter, unmerged, on a fresh base."""
    peft_model = load_adapter(load_base_model("tiny-random-llama", model_cache).model, adapter_dir).eval()
    return logits_of(peft_model, ids)


def load_stock(out: Path):
    """Only stock transformers: what someone without lorafleet would do."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(out)).eval(), AutoTokenizer.from_pretrained(str(out))


def test_merged_export_loads_in_stock_transformers_with_base_plus_adapter_logits(lora_dir, model_cache, tmp_path):
    out = tmp_path / "merged"
    report = export_merged(lora_dir, out, model_cache_dir=model_cache)

    model, tokenizer = load_stock(out)
    base = load_base_model("tiny-random-llama", model_cache)
    assert tokenizer.chat_template == base.tokenizer.chat_template
    ids = batch_ids(tokenizer)
    assert [row.tolist() for row in ids] == [row.tolist() for row in batch_ids(base.tokenizer)]
    assert model.dtype == torch.float32
    exported = logits_of(model, ids)
    for got, want, bare in zip(exported, reference_logits(lora_dir, model_cache, ids), logits_of(base.model, ids),
                               strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert (got - bare).abs().max() > 1e-2, "the export must carry the adapter, not just the base"

    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", MANIFEST_FILE} <= files
    assert not files & {"adapter_config.json", PEFT_WEIGHTS_FILE, TURBO_CONFIG_FILE}
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert json.loads((out / MANIFEST_FILE).read_text()) == json.loads((lora_dir / MANIFEST_FILE).read_text())
    assert report.merged_lora and not report.heads and report.revision_matches
    assert report.parameters == sum(p.numel() for p in model.parameters())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left


def test_turbo_export_copies_heads_and_manifest(turbo_dir, model_cache, tmp_path):
    out = tmp_path / "merged"
    report = export_merged(turbo_dir, out, model_cache_dir=model_cache)

    assert report.heads and report.merged_lora and report.method == "turbo_lora"
    for name in (TURBO_CONFIG_FILE, TURBO_WEIGHTS_FILE, MANIFEST_FILE):
        assert (out / name).read_bytes() == (turbo_dir / name).read_bytes(), name
    model, tokenizer = load_stock(out)  # the heads' files do not disturb a stock load
    ids = batch_ids(tokenizer)
    for got, want in zip(logits_of(model, ids), reference_logits(turbo_dir, model_cache, ids), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    heads = load_heads(out, hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size)
    assert heads.num_heads == 2


def test_heads_only_turbo_exports_the_base_and_the_heads(tiny_model, model_cache, tmp_path):
    heads_dir = save_adapter(None, tmp_path / "heads", manifest_for(tiny_model, "turbo"),
                             heads=random_heads(tiny_model.model))
    out = tmp_path / "merged"
    report = export_merged(heads_dir, out, model_cache_dir=model_cache)

    assert report.heads and not report.merged_lora
    assert (out / TURBO_WEIGHTS_FILE).read_bytes() == (heads_dir / TURBO_WEIGHTS_FILE).read_bytes()
    model, tokenizer = load_stock(out)
    ids = batch_ids(tokenizer)
    bare = load_base_model("tiny-random-llama", model_cache).model
    for got, want in zip(logits_of(model, ids), logits_of(bare, ids), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_non_empty_out_dir_is_refused_and_left_untouched(lora_dir, model_cache, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=f"{out} already exists and is not empty"):
        export_merged(lora_dir, out, model_cache_dir=model_cache)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"

    file_out = tmp_path / "a-file"
    file_out.write_text("x")
    with pytest.raises(FileExistsError, match="is not a folder"):
        export_merged(lora_dir, file_out, model_cache_dir=model_cache)

    empty = tmp_path / "empty"
    empty.mkdir()
    export_merged(lora_dir, empty, model_cache_dir=model_cache)  # an empty folder is fine
    assert (empty / "model.safetensors").is_file()


def test_corrupt_adapter_weights_leave_nothing(lora_dir, model_cache, tmp_path):
    (lora_dir / PEFT_WEIGHTS_FILE).write_bytes(b"not a safetensors file " * 8)
    out = tmp_path / "out" / "merged"
    with pytest.raises(InvalidAdapterDir, match=f"{lora_dir}: PEFT could not load the LoRA"):
        export_merged(lora_dir, out, model_cache_dir=model_cache)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_failure_while_writing_removes_the_staging_folder(lora_dir, model_cache, tmp_path, monkeypatch):
    def broken_copy(src, dst):
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(export_module.shutil, "copyfile", broken_copy)
    out = tmp_path / "merged"
    with pytest.raises(OSError, match="No space left"):
        export_merged(lora_dir, out, model_cache_dir=model_cache)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # neither OUT_DIR nor `.merged.*.export`


def test_heads_for_another_base_are_refused_before_writing(turbo_dir, model_cache, tmp_path):
    config = json.loads((turbo_dir / TURBO_CONFIG_FILE).read_text())
    (turbo_dir / TURBO_CONFIG_FILE).write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 1}))
    out = tmp_path / "merged"
    with pytest.raises(ValueError, match="vocab_size"):
        export_merged(turbo_dir, out, model_cache_dir=model_cache)
    assert not out.exists()


@pytest.fixture
def cli_env(tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A private LORAFLEET_HOME for in-process CliRunner calls (as in tests/test_cli.py)."""
    import mlflow

    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LORAFLEET_MODEL_CACHE", str(model_cache))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def test_cli_export_end_to_end(turbo_dir, model_cache, tmp_path, cli_env):
    from lorafleet.flows.cli import app

    out = tmp_path / "exported"
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(turbo_dir), "--merged", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])  # stderr has the progress bars
    assert summary["out_dir"] == str(out) and summary["model"] == str(turbo_dir.resolve())
    assert summary["heads"] is True and summary["parameters"] > 0
    model, _ = load_stock(out)
    assert summary["parameters"] == sum(p.numel() for p in model.parameters())

    again = runner.invoke(app, ["export", str(turbo_dir), "--merged", str(out)])
    assert again.exit_code == 2 and "Traceback" not in again.output
    assert again.stdout.startswith("error: ") and "already exists and is not empty" in again.stdout

    missing = runner.invoke(app, ["export", str(turbo_dir)])
    assert missing.exit_code == 2 and "--merged" in missing.output

    nothing = runner.invoke(app, ["export", "no-such-adapter", "--merged", str(tmp_path / "x")])
    assert nothing.exit_code == 2 and "no-such-adapter" in nothing.output and not (tmp_path / "x").exists()


def test_cli_export_of_a_registered_alias_pins_the_version(lora_dir, model_cache, tmp_path, cli_env):
    """`NAME@champion` is resolved through the registry and reported as the version it pointed at."""
    from lorafleet.flows.cli import app
    from lorafleet.settings import Settings
    from lorafleet.tasks import registry, tracking

    settings = Settings.from_env().ensure()
    client = tracking.mlflow_client(settings)
    experiment = tracking.ensure_experiment(client, "exported", settings)
    run_id = tracking.start_run(client, experiment, run_name="exported", tags={})
    tracking.RunLogger(client, run_id).log_artifacts(lora_dir, registry.ADAPTER_ARTIFACT_PATH)
    version = registry.register_adapter(client, name="exported", run_id=run_id, tags={})
    registry.set_champion(client, "exported", version.version, reason="test")

    out = tmp_path / "exported-model"
    result = CliRunner().invoke(app, ["export", "exported@champion", "--merged", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["model"] == f"models:/exported/{version.version}" and summary["heads"] is False
    model, tokenizer = load_stock(out)
    ids = batch_ids(tokenizer)
    for got, want in zip(logits_of(model, ids), reference_logits(lora_dir, model_cache, ids), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
