"""Turbo LoRA and Turbo (heads on a registered LoRA) through real Prefect flow runs and MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from prefect.testing.utilities import prefect_test_harness
from safetensors.torch import load_file
from typer.testing import CliRunner

from lorafleet.settings import Settings

from flow_helpers import copy_task_config, write_copy_task

BENCH_KEYS = {"tau", "per_head_acceptance", "tokens_per_s_plain", "tokens_per_s_speculative", "speedup",
              "tokens_per_s_hf_generate", "tokens_per_s_hf_prompt_lookup", "greedy_identical_fraction",
              "head_params", "medusa1_equivalent_params", "n_prompts", "device"}


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def home(tmp_path_factory, model_cache: Path):
    """One LORAFLEET_HOME for the module: the turbo adapter builds on the LoRA registered first."""
    root = tmp_path_factory.mktemp("turbo-home")
    patch = pytest.MonkeyPatch()
    patch.setenv("LORAFLEET_HOME", str(root / "home"))
    patch.setenv("LORAFLEET_MODEL_CACHE", str(model_cache))
    patch.delenv("MLFLOW_TRACKING_URI", raising=False)
    patch.chdir(root)
    yield Settings.from_env(), write_copy_task(root / "copy.jsonl")
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    patch.undo()


def turbo_config(data: Path, name: str, method: str, **turbo) -> dict:
    config = copy_task_config(data, name=name, method=method)
    config["turbo"] = {"num_heads": 3, "head_learning_rate": 0.01, **turbo}
    config["evaluation"].update(speculative_prompts=4, speculative_max_new_tokens=32)
    return config


def test_turbo_lora_flow_reports_speculative_metrics(home):
    from lorafleet.flows.finetune import finetune

    settings, data = home
    summary = finetune(config=turbo_config(data, "copy-turbo", "turbo_lora"))
    adapter = summary["metrics"]["adapter"]
    assert adapter["greedy_identical_fraction"] == 1.0
    assert adapter["tau"] >= 1.0 and adapter["speedup"] > 0
    assert adapter["head_params"] == 3 * 2 * 64 * 64
    client = MlflowClient(settings.tracking_uri)
    run_id = summary["run_id"]
    assert {f.path for f in client.list_artifacts(run_id, "plots")} >= {
        "plots/acceptance_histogram.png", "plots/throughput.png", "plots/loss_curve.png"}
    assert "adapter/turbo_heads.safetensors" in {f.path for f in client.list_artifacts(run_id, "adapter")}
    assert client.get_metric_history(run_id, "val/head1_acc")  # per-head top-1 accuracy on validation
    assert client.get_metric_history(run_id, "eval/adapter/tau")
    report = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="evaluation/speculative.json", tracking_uri=settings.tracking_uri)).read_text())
    assert BENCH_KEYS <= set(report)


def test_heads_on_a_registered_lora_keep_its_outputs(home):
    from lorafleet.flows.cli import app
    from lorafleet.flows.finetune import finetune

    settings, data = home
    lora = finetune(config=copy_task_config(data, name="copy-lora"))
    assert lora["promoted"]
    heads = finetune(config=turbo_config(data, "copy-heads", "turbo", base_adapter="models:/copy-lora@champion",
                                         distill_examples=120))
    manifest = json.loads((Path(heads["adapter_dir"]) / "lorafleet.json").read_text())
    assert manifest["method"] == "turbo" and manifest["base_adapter"] == "models:/copy-lora/1"
    base_weights = load_file(str(Path(lora["adapter_dir"]) / "adapter_model.safetensors"))
    copied = load_file(str(Path(heads["adapter_dir"]) / "adapter_model.safetensors"))
    assert base_weights.keys() == copied.keys()
    assert all((base_weights[k] == copied[k]).all() for k in base_weights)
    # same LoRA → same greedy outputs → identical quality; speculation changed nothing
    for metric in ("field_f1", "exact_match", "rouge_l"):
        assert heads["metrics"]["adapter"][metric] == lora["metrics"]["adapter"][metric]
    assert heads["metrics"]["adapter"]["greedy_identical_fraction"] == 1.0

    out = settings.home / "bench.json"
    result = CliRunner().invoke(app, ["bench", "speculative", "--model", "copy-heads", "--n", "3",
                                      "--max-new-tokens", "24", "--json", str(out)])
    assert result.exit_code == 0, result.output
    bench = json.loads(out.read_text())
    assert BENCH_KEYS <= set(bench) and bench["n_prompts"] == 3 and bench["greedy_identical_fraction"] == 1.0


def test_gate_holds_a_turbo_adapter_below_the_minimum_speedup(home):
    from lorafleet.flows.finetune import finetune

    _, data = home
    config = turbo_config(data, "copy-slow", "turbo_lora")
    config["training"]["max_steps"] = 40
    config["promotion"] = {"metric": "field_f1", "min_speedup": 50.0}
    summary = finetune(config=config)
    assert not summary["promoted"]
    assert any("below the required 50.00x" in reason for reason in summary["gate_reasons"])
