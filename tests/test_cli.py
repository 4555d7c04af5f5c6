"""The `lorafleet` command line: real subprocesses for finetune (kill + resume) and for error paths,
CliRunner for the rest."""

from __future__ import annotations

import contextlib
import os
import shutil
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
# The longest a finetune subprocess may take before the test calls it hung. Not a timing check: a rerun of
# ~180 steps took ~10 min on a 2-core machine with load ~10 (helpers, busy loops, another test run).
HANG_GUARD_S = 1800


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


# The kill comes at the first checkpoint (step 20); the 180 steps after it are the margin that keeps a
# slow-to-poll test from seeing the first attempt finish, and what the rerun has to train.
STEPS = 200


def test_killed_finetune_resumes_into_the_same_mlflow_run(tmp_path, cli_env):
    data = write_copy_task(tmp_path / "copy.jsonl")
    config = tmp_path / "copy.yaml"
    config.write_text(yaml.safe_dump(copy_task_config(data, name="resumable", steps=STEPS)))
    settings = Settings.from_env()
    checkpoints = settings.checkpoints_dir / "resumable"

    log_path = tmp_path / "first-attempt.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(LORAFLEET + ["finetune", str(config)], env=cli_env, start_new_session=True,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        # A hang guard, not a timing check: on a busy 2-core machine the Prefect server's first start
        # alone may take 120 s (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS), then the model loads.
        deadline = time.monotonic() + HANG_GUARD_S
        while not list(checkpoints.glob("*/step-*/state.json")):
            # An assert's message is evaluated only when it fails, so the log is read only then.
            assert process.poll() is None, f"finetune exited before its first checkpoint:\n{_tail(log_path)}"
            assert time.monotonic() < deadline, f"no checkpoint within {HANG_GUARD_S} s:\n{_tail(log_path)}"
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):  # already gone when it failed; the assertion says why
            os.killpg(process.pid, signal.SIGKILL)  # the whole group: CLI and its Prefect server
        process.wait()
    assert not list(checkpoints.glob("*/DONE"))

    result = run_cli(["finetune", str(config)], cli_env, timeout=HANG_GUARD_S)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from step" in result.stdout
    client = MlflowClient(settings.tracking_uri)
    experiment = client.get_experiment_by_name("lorafleet/resumable")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the interrupted run was continued
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss"))
    assert steps == list(range(1, STEPS + 1)), "every step logged exactly once, also the ones replayed after the kill"


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


# ----- an unusable LORAFLEET_HOME: one line naming the path and the variable, never a traceback ----------

WITHOUT_DAC = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
               "--bounding-set=-dac_override,-dac_read_search"]


def as_unprivileged(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run the CLI so that file modes apply to it: root ignores them, so as root drop the capabilities
    that let it (setpriv); skip when that cannot be done, since the precondition cannot be created."""
    if os.geteuid() != 0:
        return run_cli(args, env)
    if shutil.which("setpriv") is None or subprocess.run([*WITHOUT_DAC, "true"], check=False).returncode != 0:
        pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE (setpriv): modes do not apply to root")
    return subprocess.run(WITHOUT_DAC + LORAFLEET + args, check=False, env=env, capture_output=True,
                          text=True, timeout=300)


def assert_one_error_line(result: subprocess.CompletedProcess, *expected: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    for text in expected:
        assert text in lines[0], output


@pytest.mark.parametrize("command", [["models"], ["promote", "demo", "1"], ["rollback", "demo"]])
def test_home_that_is_a_file_is_one_error_line(tmp_path, cli_env, command):
    home = tmp_path / "home"
    home.write_text("not a folder")
    result = run_cli(command, {**cli_env, "LORAFLEET_HOME": str(home)})
    assert_one_error_line(result, f"LORAFLEET_HOME={home}", "is a file, not a folder")


def test_home_under_a_file_is_one_error_line(tmp_path, cli_env):
    (tmp_path / "file").write_text("not a folder")
    home = tmp_path / "file" / "home"
    result = run_cli(["models"], {**cli_env, "LORAFLEET_HOME": str(home)})
    assert_one_error_line(result, f"LORAFLEET_HOME={home}", f"{tmp_path / 'file'} is a file")


def test_read_only_home_is_one_error_line_not_a_sqlite_error(tmp_path, cli_env):
    """Every folder already there, the home itself read-only: SQLite used to fail with 'unable to open
    database file', which names neither the folder nor the variable."""
    home = tmp_path / "home"
    Settings.for_home(home, model_cache_dir=Path(cli_env["LORAFLEET_MODEL_CACHE"])).ensure()
    home.chmod(0o500)
    try:
        result = as_unprivileged(["models"], {**cli_env, "LORAFLEET_HOME": str(home)})
    finally:
        home.chmod(0o700)
    assert_one_error_line(result, f"LORAFLEET_HOME={home}", "is not writable")
    assert "database" not in result.stdout + result.stderr


def test_bad_model_cache_is_named_and_nothing_is_created(tmp_path, cli_env):
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    home = tmp_path / "fresh-home"
    env = {**cli_env, "LORAFLEET_HOME": str(home), "LORAFLEET_MODEL_CACHE": str(cache)}
    result = run_cli(["models"], env)
    assert_one_error_line(result, f"LORAFLEET_MODEL_CACHE={cache}")
    assert not home.exists(), "every folder is checked before the first is made"


def test_corrupt_tracking_database_is_one_error_line(tmp_path, cli_env):
    settings = Settings.for_home(tmp_path / "home", model_cache_dir=Path(cli_env["LORAFLEET_MODEL_CACHE"]))
    settings.ensure()
    (settings.home / "mlflow.db").write_text("not a SQLite database " * 10)
    result = run_cli(["models"], {**cli_env, "LORAFLEET_HOME": str(settings.home)})
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output, output
    assert f"error: MLflow store {settings.tracking_uri}: file is not a database" in result.stdout, output


def test_error_line_keeps_brackets_and_is_not_wrapped(tmp_path, cli_env):
    """Rich would read `[red]` in a path as markup and wrap a long line at 80 columns."""
    home = tmp_path / ("[red]" + "x" * 120)
    home.write_text("not a folder")
    result = run_cli(["models"], {**cli_env, "LORAFLEET_HOME": str(home), "COLUMNS": "80"})
    assert_one_error_line(result, f"LORAFLEET_HOME={home}")
