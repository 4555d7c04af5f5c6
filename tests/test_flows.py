"""Real Prefect flow runs of `finetune` and `retrain` writing to a real MLflow SQLite store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lorafleet.settings import Settings
from lorafleet.tasks import registry

from flow_helpers import copy_task_config, write_copy_task

pytestmark = pytest.mark.usefixtures("prefect_api")  # `home` and `prefect_api` come from flow_helpers


def client_for(settings: Settings) -> MlflowClient:
    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)


def aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}


def test_finetune_registers_promotes_then_holds_a_worse_challenger(home, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from lorafleet.flows.finetune import finetune

    data = write_copy_task(tmp_path / "copy.jsonl")
    first = finetune(config=copy_task_config(data))
    assert first["promoted"], first["gate_reasons"]
    assert first["metrics"]["adapter"]["field_f1"] > first["metrics"]["base"]["field_f1"]

    client = client_for(home)
    assert aliases(client, "copy") == {"champion": "1", "challenger": "1"}
    version = client.get_model_version("copy", "1")
    assert version.tags["base_model"] == "tiny-random-llama"
    assert version.tags["data_fingerprint"] == first["data_fingerprint"]
    assert float(version.tags["metric.field_f1"]) == pytest.approx(first["metrics"]["adapter"]["field_f1"], rel=1e-4)
    run = client.get_run(first["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["config.training.batch_size"] == "16"
    assert len(client.get_metric_history(first["run_id"], "train/loss")) == 120
    artifacts = {f.path for f in client.list_artifacts(first["run_id"])}
    assert {"adapter", "plots", "evaluation"} <= artifacts
    assert {f.path for f in client.list_artifacts(first["run_id"], "plots")} >= {"plots/loss_curve.png",
                                                                                  "plots/quality_comparison.png"}
    manifest = json.loads((Path(first["adapter_dir"]) / "lorafleet.json").read_text())
    assert manifest["metrics"]["field_f1"] == pytest.approx(first["metrics"]["adapter"]["field_f1"])

    with get_client(sync_client=True) as prefect:
        keys = {a.key for a in prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["copy-evaluation", "copy-gate"])))}
    assert keys == {"copy-evaluation", "copy-gate"}

    # A near-zero learning rate leaves the adapter ≈ base: registered as challenger, champion stays.
    second = finetune(config=copy_task_config(data, learning_rate=1e-9, steps=20))
    assert second["version"] == "2" and not second["promoted"]
    assert aliases(client, "copy") == {"champion": "1", "challenger": "2"}
    assert "champion" in " ".join(second["gate_reasons"])

    # Re-running the first config reuses its finished training: equal metrics reach champion + 0.
    third = finetune(config=copy_task_config(data))
    quality = ("field_f1", "exact_match", "rouge_l")
    assert [third["metrics"]["adapter"][k] for k in quality] == [first["metrics"]["adapter"][k] for k in quality]
    assert third["promoted"], third["gate_reasons"]
    assert aliases(client, "copy") == {"champion": "3", "challenger": "3"}


def test_bad_data_fails_before_training_and_registers_nothing(home, tmp_path):
    from lorafleet.flows.finetune import finetune
    from lorafleet.tasks.data.errors import DataError

    data = write_copy_task(tmp_path / "copy.jsonl", n=60)
    lines = data.read_text().splitlines()
    lines[7] = json.dumps({"prompt": "Eve is 30.", "completion": ""})
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"copy.jsonl line 8, field 'completion'"):
        finetune(config=copy_task_config(data, name="broken"))
    assert client_for(home).search_registered_models() == []
    assert not (home.adapters_dir / "broken").exists()
    assert list((home.prepared_data_dir).glob("broken/*")) == []


def test_retrain_only_retrains_adapters_whose_data_changed(home, tmp_path):
    import yaml
    from prefect import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    from lorafleet.flows.retrain import retrain

    files = {name: write_copy_task(tmp_path / f"{name}.jsonl", n=120, seed=i)
             for i, name in enumerate(["alpha", "beta"])}
    config = tmp_path / "retrain.yaml"
    config.write_text(yaml.safe_dump({"adapters": [
        copy_task_config(path, name=name, steps=10) for name, path in files.items()]}))

    first = {row["name"]: row for row in retrain(config=str(config))}
    assert {name: row["action"] for name, row in first.items()} == {"alpha": "retrained", "beta": "retrained"}
    second = {row["name"]: row for row in retrain(config=str(config))}
    assert {name: row["action"] for name, row in second.items()} == {"alpha": "skipped", "beta": "skipped"}

    files["beta"].write_text(files["beta"].read_text().replace("Oslo", "Bergen"))
    third = {row["name"]: row for row in retrain(config=str(config))}
    assert third["alpha"]["action"] == "skipped"
    assert third["beta"]["action"] == "retrained" and third["beta"]["version"] == "2"
    assert third["beta"]["data_fingerprint"] != first["beta"]["data_fingerprint"]
    client = client_for(home)
    assert registry.latest_version(client, "alpha").version in (1, "1")

    # data prep is a cached Prefect task: the finetune subflow reused retrain's prepared data
    with get_client(sync_client=True) as prefect:
        runs = prefect.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="prepare-data")))
    assert any(run.state.name == "Cached" for run in runs)


def test_each_lorafleet_home_gets_its_own_prepared_data(home, tmp_path, monkeypatch):
    """The data-prep cache is keyed on the output folder: a second home must not reuse the first's."""
    from lorafleet.flows.finetune import finetune

    config = copy_task_config(write_copy_task(tmp_path / "copy.jsonl", n=80), name="homed", steps=4)
    first = finetune(config=config)
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "other-home"))
    second = finetune(config=config)
    assert Path(first["prepared_dir"]).is_relative_to(home.home)
    assert Path(second["prepared_dir"]).is_relative_to(tmp_path / "other-home")
    assert first["data_fingerprint"] == second["data_fingerprint"]
