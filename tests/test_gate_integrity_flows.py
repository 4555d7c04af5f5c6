"""The finetune flow on the tiny random Llama keeps the gate honest (issue 13, B1, B3, B5 and A9).

Real Prefect flow runs and real `lorafleet finetune` processes writing to a real MLflow SQLite store;
registry-level checks (compare-and-set, locks, caching) are in test_gate_integrity.py.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from prefect import task

from lorafleet.settings import Settings
from lorafleet.tasks import eval_split, locks, registry, steps

from flow_helpers import copy_task_config, write_copy_task

pytestmark = pytest.mark.usefixtures("prefect_api")  # `home` and `prefect_api` come from flow_helpers

QUALITY = ("field_f1", "exact_match", "rouge_l", "parse_rate")
# Short answers and a token of timing: these tests check what is compared and logged, not how well.
QUICK_EVAL = {"max_examples": 8, "max_new_tokens": 24, "batch_size": 16, "speed_prompts": 1, "speed_max_new_tokens": 4}
DEADLINE_S = 300  # waits on other processes; generous for a loaded 2-core machine, never a measurement


def client_for(settings: Settings) -> MlflowClient:
    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)


def versions(client: MlflowClient, name: str) -> list[str]:
    return sorted(str(v.version) for v in client.search_model_versions(f"name='{name}'"))


def test_the_champion_is_judged_on_the_challengers_rows(home, tmp_path):
    """B1: another `evaluation.max_examples` means other rows; the champion is re-evaluated on the new ones.

    Runs 2 and 3 reuse run 1's finished training (evaluation is not part of the training key), so the
    champion (run 1's weights) re-evaluated on their rows must score exactly what they score.
    """
    from lorafleet.flows.finetune import finetune
    from lorafleet.flows.promote import promote

    data = write_copy_task(tmp_path / "copy.jsonl", n=200)
    # ROUGE-L: a briefly trained tiny model rarely writes parsable JSON on 8 rows, but beats the base at once.
    config = copy_task_config(data, name="rows", steps=40, promotion={"metric": "rouge_l"}, evaluation=QUICK_EVAL)
    first = finetune(config=config)
    assert first["promoted"], first["gate_reasons"]
    more_rows = config | {"evaluation": QUICK_EVAL | {"max_examples": 16}}
    second = finetune(config=more_rows, promote=False)
    assert second["version"] == "2" and second["n_test_examples"] == 16

    client = client_for(home)
    champion, challenger = (registry.get_version(client, "rows", v) for v in ("1", "2"))
    split = eval_split.version_split(challenger)
    assert eval_split.version_split(champion).rows == 8 and split.rows == 16
    cached = json.loads(champion.tags[eval_split.CACHE_TAG_PREFIX + split.key])
    mine = registry.version_metrics(challenger)
    assert {k: cached["metrics"][k] for k in QUALITY} == {k: mine[k] for k in QUALITY}  # same weights, same rows
    assert "re-evaluated now on the same rows" in second["gate_provenance"]["champion v1"]
    assert split.key in second["gate_provenance"]["champion v1"]
    gate_md = Path(client.download_artifacts(second["run_id"], "evaluation/gate.md", str(tmp_path)))
    assert "measured on" in gate_md.read_text() and split.describe() in gate_md.read_text()

    third = finetune(config=more_rows, promote=False)  # same rows again: the cached numbers, no generation
    assert "(cached)" in third["gate_provenance"]["champion v1"]
    assert registry.get_version(client, "rows", "1").tags[eval_split.CACHE_TAG_PREFIX + split.key] == \
        champion.tags[eval_split.CACHE_TAG_PREFIX + split.key]

    # The `promote` flow runs the same gate on the same rows: v3 equals the champion there, so it may replace it.
    with pytest.raises(ValueError, match="metric.*unknown metric 'latency'"):
        promote(name="rows", metric="latency")
    moved = promote(name="rows", metric="rouge_l")
    assert moved["promoted"] and moved["version"] == "3", moved["reasons"]
    assert any("(cached)" in reason for reason in moved["reasons"])
    assert str(registry.get_champion(client, "rows").version) == "3"


def test_a_rerun_after_failures_reuses_its_run_and_version_and_logs_each_step_once(home, tmp_path, monkeypatch):
    """B5: a crash during training, then one past registration; the third attempt finishes the same run."""
    from lorafleet.flows.finetune import finetune

    config = copy_task_config(write_copy_task(tmp_path / "copy.jsonl", n=120), name="rerun", evaluation=QUICK_EVAL)
    config["training"] |= {"max_steps": 12, "checkpoint_every": 4, "eval_every": 4}
    progress = steps._PrefectProgress.on_train_step

    def crash_at_10(self, step, metrics):
        progress(self, step, metrics)
        if step == 10:  # after step 10 was logged; the last checkpoint is step 8
            raise RuntimeError("simulated crash during training")

    with monkeypatch.context() as patch:
        patch.setattr(steps._PrefectProgress, "on_train_step", crash_at_10)
        with pytest.raises(RuntimeError, match="during training"):
            finetune(config=config)
    with monkeypatch.context() as patch:
        patch.setattr(steps, "gate_and_promote", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("gate crash")))
        with pytest.raises(RuntimeError, match="gate crash"):
            finetune(config=config)
    client = client_for(home)
    assert versions(client, "rerun") == ["1"]  # registered before the gate crashed

    summary = finetune(config=config)
    assert summary["version"] == "1" and versions(client, "rerun") == ["1"]
    experiment = client.get_experiment_by_name("lorafleet/rerun")
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.run_id for run in runs] == [summary["run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["lorafleet.registered_version"] == "1"
    assert run.data.tags["lorafleet.gate"] == ("promoted" if summary["promoted"] else "held")
    assert summary["train"]["resumed_from_step"] is None  # the second attempt finished training
    logged = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert logged == list(range(1, 13))  # steps 9 and 10 were replayed after the crash, and logged once


HOLDER = """
import sys, time
from pathlib import Path
from lorafleet.tasks import locks
with locks.finetune_lock(Path(sys.argv[1]), sys.argv[2]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_the_flow_refuses_a_name_being_fine_tuned_elsewhere(home, tmp_path):
    from lorafleet.flows.finetune import finetune
    from lorafleet.flows.retrain import retrain

    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    holder = subprocess.Popen([sys.executable, str(script), str(home.home), "busy"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        config = copy_task_config(write_copy_task(tmp_path / "copy.jsonl", n=60), name="busy", steps=2,
                                  evaluation=QUICK_EVAL)
        with pytest.raises(locks.AlreadyRunning, match=f"pid {holder.pid} on host {socket.gethostname()}"):
            finetune(config=config)
        retrain_config = tmp_path / "retrain.yaml"
        retrain_config.write_text(yaml.safe_dump({"adapters": [config]}))
        [row] = retrain(config=str(retrain_config))  # the nightly retrain skips it and carries on
        assert row["action"] == "skipped" and f"pid {holder.pid}" in row["reason"]
    finally:
        holder.kill()
        holder.wait()
    assert client_for(home).get_experiment_by_name("lorafleet/busy") is None  # nothing was started


def test_two_concurrent_finetune_commands_of_one_config(tmp_path, model_cache, monkeypatch):
    """B3: the second `lorafleet finetune` of a config exits 2 naming the first; the first finishes alone.

    The first is paused (SIGSTOP) once it holds the lock, so the second is sure to start while it runs.
    Both start on a fresh home, where the second used to crash in MLflow's SQLite migration.
    """
    env = {**os.environ, "LORAFLEET_HOME": str(tmp_path / "home"), "LORAFLEET_MODEL_CACHE": str(model_cache),
           "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        env.pop(key, None)
    config = tmp_path / "twice.yaml"
    config.write_text(yaml.safe_dump(copy_task_config(write_copy_task(tmp_path / "copy.jsonl", n=80), name="twice",
                                                      steps=10, evaluation=QUICK_EVAL)))
    command = [sys.executable, "-m", "lorafleet.flows.cli", "finetune", str(config)]
    lock_file = locks.finetune_lock_path(tmp_path / "home", "twice")
    log_path = tmp_path / "first.log"
    with log_path.open("wb") as log:
        first = subprocess.Popen(command, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not (lock_file.is_file() and f'"pid": {first.pid},' in lock_file.read_text()):
            assert first.poll() is None, f"the first finetune exited early:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the first finetune never took the lock:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.1)
        os.kill(first.pid, signal.SIGSTOP)
        second = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=DEADLINE_S)
        os.kill(first.pid, signal.SIGCONT)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"already running (pid {first.pid} on host {socket.gethostname()}" in second.stdout
        assert "Traceback" not in second.stdout + second.stderr
        assert first.wait(timeout=DEADLINE_S) == 0, log_path.read_text()[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGCONT)
            os.killpg(first.pid, signal.SIGKILL)  # the CLI and its Prefect server, if still there
        first.wait()
    client = client_for(Settings.from_env(env))
    runs = client.search_runs([client.get_experiment_by_name("lorafleet/twice").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert versions(client, "twice") == ["1"]
    mlflow.set_tracking_uri(None)


def test_only_transient_errors_are_retried_by_io_tasks():
    """A9: a full disk fails the task at once; a reset connection is retried."""
    calls: list[int] = []

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=steps.retry_on_io_error)
    def write(code: int) -> None:
        calls.append(code)
        raise OSError(code, os.strerror(code))

    for code, attempts in ((errno.ENOSPC, 1), (errno.EROFS, 1), (errno.ECONNRESET, 3)):
        calls.clear()
        with pytest.raises(OSError):
            write(code)
        assert len(calls) == attempts, os.strerror(code)
