"""The `lorafleet` command line: real subprocesses for finetune (kill + resume), CliRunner for the rest."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from lorafleet.flows.cli import app
from lorafleet.settings import Settings

from flow_helpers import copy_task_config, write_copy_task

LORAFLEET = [sys.executable, "-m", "lorafleet.flows.cli"]


@pytest.fixture
def cli_env(tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A private LORAFLEET_HOME and Prefect home, for subprocesses and for in-process CliRunner calls."""
    env = {"LORAFLEET_HOME": str(tmp_path / "home"), "LORAFLEET_MODEL_CACHE": str(model_cache),
           "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    yield {**os.environ, **env}
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def run_cli(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(LORAFLEET + args, check=False, env=env, capture_output=True, text=True, timeout=timeout)


def _tail(log_path: Path, chars: int = 4000) -> str:
    return log_path.read_text(errors="replace")[-chars:]


def test_killed_finetune_resumes_into_the_same_mlflow_run(tmp_path, cli_env):
    data = write_copy_task(tmp_path / "copy.jsonl")
    config = tmp_path / "copy.yaml"
    config.write_text(yaml.safe_dump(copy_task_config(data, name="resumable", steps=400)))
    settings = Settings.from_env()
    checkpoints = settings.checkpoints_dir / "resumable"

    log_path = tmp_path / "first-attempt.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(LORAFLEET + ["finetune", str(config)], env=cli_env, start_new_session=True,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not list(checkpoints.glob("*/step-*/state.json")):
            # An assert's message is evaluated only when it fails, so the log is read only then.
            assert process.poll() is None, f"finetune exited before its first checkpoint:\n{_tail(log_path)}"
            assert time.monotonic() < deadline, f"no checkpoint within 240 s:\n{_tail(log_path)}"
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):  # already gone when it failed; the assertion says why
            os.killpg(process.pid, signal.SIGKILL)  # the whole group: CLI and its Prefect server
        process.wait()
    assert not list(checkpoints.glob("*/DONE"))

    result = run_cli(["finetune", str(config)], cli_env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from step" in result.stdout
    client = MlflowClient(settings.tracking_uri)
    experiment = client.get_experiment_by_name("lorafleet/resumable")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the interrupted run was continued
    steps = {m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")}
    assert steps == set(range(1, 401))


def test_bad_config_exits_2_naming_the_field(tmp_path, cli_env):
    config = tmp_path / "bad.yaml"
    config.write_text("name: x\ndata: {preset: viggo}\ntraining: {batch_size: -1}\n")
    result = CliRunner().invoke(app, ["finetune", str(config)])
    assert result.exit_code == 2
    assert "training.batch_size" in result.output


def test_models_promote_and_rollback_commands(tmp_path, cli_env):
    """Registry commands against versions registered by the registry code itself."""
    from lorafleet.models.adapter_dir import AdapterManifest, BaseModelRef, TaskInfo, write_manifest
    from lorafleet.tasks import registry, tracking

    settings = Settings.from_env().ensure()
    client = tracking.mlflow_client(settings)
    experiment = tracking.ensure_experiment(client, "demo", settings)
    for f1 in (0.5, 0.7):
        run_id = tracking.start_run(client, experiment, run_name="demo", tags={})
        folder = tmp_path / f"adapter-{f1}"
        folder.mkdir()
        write_manifest(folder, AdapterManifest(name="demo", method="lora", tokenizer_hash="t",
                                               base_model=BaseModelRef(id="tiny-random-llama", revision="r"),
                                               task=TaskInfo(name="demo")))
        tracking.RunLogger(client, run_id).log_artifacts(folder, registry.ADAPTER_ARTIFACT_PATH)
        version = registry.register_adapter(client, name="demo", run_id=run_id, tags={"metric.field_f1": str(f1)})
        registry.set_champion(client, "demo", version.version, reason="test")

    runner = CliRunner()
    listed = runner.invoke(app, ["models", "--json"])
    assert listed.exit_code == 0, listed.output
    assert '"champion"' in listed.output and "0.7" in listed.output

    rolled = runner.invoke(app, ["rollback", "demo"])
    assert rolled.exit_code == 0 and "from version 2 to version 1" in rolled.output
    assert str(registry.get_champion(client, "demo").version) == "1"
    promoted = runner.invoke(app, ["promote", "demo", "2"])
    assert promoted.exit_code == 0 and str(registry.get_champion(client, "demo").version) == "2"
    missing = runner.invoke(app, ["promote", "demo", "9"])
    assert missing.exit_code == 2 and "9" in missing.output
