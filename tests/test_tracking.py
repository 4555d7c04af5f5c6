"""MLflow tracking against a real SQLite store in tmp_path (no mocks). Runs in ~6 s."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import mlflow
import pytest
from matplotlib.figure import Figure
from mlflow import MlflowClient

from lorafleet.settings import Settings
from lorafleet.tasks.tracking import (
    FULL_PARAMS_ARTIFACT,
    PARAM_VALUE_LIMIT,
    RunLogger,
    ensure_experiment,
    flatten_params,
    resume_or_start_run,
    start_run,
    system_info,
)

pytestmark = pytest.mark.usefixtures("empty_cwd")  # conftest: MLflow must write nothing to ./


@pytest.fixture
def run_id(client: MlflowClient, settings: Settings) -> str:
    experiment_id = ensure_experiment(client, "viggo", settings)
    return start_run(client, experiment_id, run_name="r1", tags={"stage": "test"})


def test_client_uses_settings_store_and_sets_global_uris(client: MlflowClient, settings: Settings) -> None:
    assert client.tracking_uri == settings.tracking_uri
    assert mlflow.get_tracking_uri() == settings.tracking_uri
    assert mlflow.get_registry_uri() == settings.tracking_uri
    ensure_experiment(client, "viggo", settings)
    assert (settings.home / "mlflow.db").exists()


def test_experiment_per_adapter_with_artifacts_under_home(client: MlflowClient, settings: Settings) -> None:
    experiment_id = ensure_experiment(client, "viggo", settings)
    experiment = client.get_experiment(experiment_id)
    assert experiment.name == "lorafleet/viggo"
    assert experiment.artifact_location == (settings.mlflow_artifacts_dir / "viggo").as_uri()
    assert ensure_experiment(client, "viggo", settings) == experiment_id
    assert ensure_experiment(client, "conll", settings) != experiment_id


def test_deleted_experiment_is_restored(client: MlflowClient, settings: Settings) -> None:
    experiment_id = ensure_experiment(client, "viggo", settings)
    client.delete_experiment(experiment_id)
    assert ensure_experiment(client, "viggo", settings) == experiment_id
    assert client.get_experiment(experiment_id).lifecycle_stage == "active"


def test_invalid_adapter_name_is_refused(client: MlflowClient, settings: Settings) -> None:
    with pytest.raises(ValueError, match="Viggo/x"):
        ensure_experiment(client, "Viggo/x", settings)


def test_artifacts_land_under_mlflow_artifacts_dir(client: MlflowClient, settings: Settings, run_id: str,
                                                   tmp_path: Path) -> None:
    folder = tmp_path / "adapter-src"
    (folder / "sub").mkdir(parents=True)
    (folder / "lorafleet.json").write_text("{}")
    (folder / "sub" / "w.txt").write_text("weights")
    logger = RunLogger(client, run_id)
    logger.log_artifacts(folder, "adapter")
    logger.log_text("hello", "evaluation/notes.md")
    logger.log_dict({"a": 1}, "evaluation/metrics.json")
    fig = Figure()  # no pyplot: no global figure state, no display backend
    fig.subplots().plot([0, 1], [1, 0])
    logger.log_figure(fig, "plots/loss.png")

    root = settings.mlflow_artifacts_dir / "viggo" / run_id / "artifacts"
    assert (root / "adapter" / "sub" / "w.txt").read_text() == "weights"
    assert (root / "evaluation" / "notes.md").read_text() == "hello"
    assert json.loads((root / "evaluation" / "metrics.json").read_text()) == {"a": 1}
    assert (root / "plots" / "loss.png").stat().st_size > 0
    with pytest.raises(FileNotFoundError, match="not a directory"):
        logger.log_artifacts(tmp_path / "missing", "adapter")


def test_flatten_params() -> None:
    nested = {"lora": {"r": 16, "target_modules": ("q_proj", "v_proj"), "extra": {}},
              "training": {"lr": 1e-4, "resume": None, "bf16": False}, "name": "viggo", "path": Path("/x/y")}
    assert flatten_params(nested) == {
        "lora.r": "16", "lora.target_modules": '["q_proj", "v_proj"]', "lora.extra": "{}",
        "training.lr": "0.0001", "training.resume": "None", "training.bf16": "False", "name": "viggo",
        "path": "/x/y"}
    with pytest.raises(ValueError, match="'a.b' appears twice"):
        flatten_params({"a.b": 1, "a": {"b": 2}})


def test_log_params_batches_and_truncates_long_values(client: MlflowClient, run_id: str) -> None:
    long_prompt = "You extract fields. " * 60  # 1200 characters
    nested = {"data": {"system_prompt": long_prompt}, "grid": {f"p{i:03d}": i for i in range(250)}}
    logged = RunLogger(client, run_id).log_params(nested)

    params = client.get_run(run_id).data.params
    assert len(params) == 251  # more than one MLflow batch (100)
    assert params["grid.p249"] == "249"
    stored = params["data.system_prompt"]
    assert len(stored) <= PARAM_VALUE_LIMIT and stored.endswith("...[truncated]")
    assert long_prompt.startswith(stored.removesuffix("...[truncated]"))
    assert logged["data.system_prompt"] == stored
    full = mlflow.artifacts.load_dict(f"runs:/{run_id}/{FULL_PARAMS_ARTIFACT}")
    assert full["data.system_prompt"] == long_prompt


def test_short_params_write_no_full_copy(client: MlflowClient, run_id: str) -> None:
    RunLogger(client, run_id).log_params({"a": {"b": 1}})
    assert client.get_run(run_id).data.params == {"a.b": "1"}
    assert [f.path for f in client.list_artifacts(run_id)] == []


def test_log_metrics_batches_and_skips_non_finite(client: MlflowClient, run_id: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    logger = RunLogger(client, run_id)
    many = {f"m{i:04d}": float(i) for i in range(1500)}  # more than one MLflow batch (1000)
    with caplog.at_level(logging.WARNING, logger="lorafleet.tasks.tracking"):
        logger.log_metrics({**many, "nan": math.nan, "inf": math.inf}, step=7)
    metrics = client.get_run(run_id).data.metrics
    assert len(metrics) == 1500 and metrics["m1499"] == 1499.0
    assert "nan" not in metrics and "inf" not in metrics
    assert "'nan'" in caplog.text and "'inf'" in caplog.text
    assert client.get_metric_history(run_id, "m0001")[0].step == 7


def test_training_callbacks_log_curves_at_steps(client: MlflowClient, run_id: str) -> None:
    logger = RunLogger(client, run_id)
    for step in (1, 2, 3):
        logger.on_train_step(step, {"train/loss": 3.0 / step})
    logger.on_validation(3, {"val/loss": 0.9})
    history = client.get_metric_history(run_id, "train/loss")
    curve = [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)]
    assert curve == [(1, 3.0), (2, 1.5), (3, 1.0)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val/loss")] == [(3, 0.9)]


def test_tags_and_finish(client: MlflowClient, run_id: str) -> None:
    logger = RunLogger(client, run_id)
    logger.set_tags({"base_model": "tiny", "n": 3})
    logger.finish("KILLED")
    run = client.get_run(run_id)
    assert run.data.tags["base_model"] == "tiny" and run.data.tags["n"] == "3"
    assert run.data.tags["stage"] == "test"
    assert run.info.status == "KILLED"
    with pytest.raises(ValueError, match="FINISHED, FAILED or KILLED"):
        logger.finish("DONE")  # type: ignore[arg-type]


def test_context_manager_marks_failed_runs(client: MlflowClient, run_id: str) -> None:
    with pytest.raises(RuntimeError, match="boom"), RunLogger(client, run_id):
        raise RuntimeError("boom")
    assert client.get_run(run_id).info.status == "FAILED"


@pytest.mark.parametrize("status", ["RUNNING", "FAILED", "KILLED"])
def test_resume_continues_interrupted_run(client: MlflowClient, settings: Settings, status: str) -> None:
    experiment_id = ensure_experiment(client, "viggo", settings)
    first = start_run(client, experiment_id, run_name="r", tags={})
    params = {"config": {"lora": {"r": 8}, "prompt": "x" * 800}}
    RunLogger(client, first).log_params(params)
    RunLogger(client, first).on_train_step(5, {"train/loss": 2.0})
    if status != "RUNNING":
        RunLogger(client, first).finish(status)  # type: ignore[arg-type]
    resumed = resume_or_start_run(client, experiment_id, run_name="r", tags={"resumed": "yes"},
                                  resume_run_id=first)
    assert resumed == first
    run = client.get_run(first)
    assert run.info.status == "RUNNING" and run.data.tags["resumed"] == "yes"
    RunLogger(client, resumed).log_params(params)  # a resumed flow logs the same config again
    RunLogger(client, resumed).on_train_step(6, {"train/loss": 1.0})
    assert len(client.get_metric_history(first, "train/loss")) == 2


def test_resume_starts_new_run_when_it_cannot_continue(client: MlflowClient, settings: Settings) -> None:
    experiment_id = ensure_experiment(client, "viggo", settings)
    finished = start_run(client, experiment_id, run_name="done", tags={})
    RunLogger(client, finished).finish()
    elsewhere = start_run(client, ensure_experiment(client, "other", settings), run_name="x", tags={})
    ids = {finished, elsewhere}
    for stale in (finished, elsewhere, "0" * 32, None):
        new = resume_or_start_run(client, experiment_id, run_name="fresh", tags={}, resume_run_id=stale)
        assert new not in ids
        ids.add(new)
        run = client.get_run(new)
        assert run.info.experiment_id == experiment_id and run.info.run_name == "fresh"


def test_system_info() -> None:
    info = system_info()
    for key in ("python", "torch", "transformers", "peft", "mlflow", "cpu_count", "device", "ram_gb"):
        assert key in info
    assert info["mlflow"].startswith("3.") and info["cpu_count"] >= 1 and info["ram_gb"] > 0
    assert info["device"] in ("cpu", "cuda", "mps")
    assert ("cuda_name" in info) is (info["device"] == "cuda")
