"""A small learnable task, a config builder and the fixtures (a temporary Prefect API, a private
LORAFLEET_HOME) for flow-level tests on the tiny random Llama; registered as a plugin in conftest.py."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
from prefect.testing.utilities import prefect_test_harness

from lorafleet.settings import Settings

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NAMES = ["Ana", "Bob", "Carla", "Dmitri", "Eve", "Femi"]
CITIES = ["Oslo", "Lima", "Pune", "Kyiv"]


def write_copy_task(path: Path, n: int = 400, seed: int = 0) -> Path:
    """`Ana is 44 and lives in Oslo.` → `{"name": "Ana", "age": 44, "city": "Oslo"}`.

    Every value is copied from the text, so the tiny random model learns it in ~100 steps.
    """
    rng = random.Random(seed)
    seen = set()
    with open(path, "w", encoding="utf-8") as handle:
        while len(seen) < n:
            name, age, city = rng.choice(NAMES), rng.randint(18, 90), rng.choice(CITIES)
            if (name, age, city) in seen:
                continue
            seen.add((name, age, city))
            handle.write(json.dumps({"prompt": f"{name} is {age} and lives in {city}.",
                                     "completion": json.dumps({"name": name, "age": age, "city": city})}) + "\n")
    return path


def copy_task_config(data_file: Path, *, name: str = "copy", steps: int = 120, learning_rate: float = 1e-2,
                     **overrides: Any) -> dict[str, Any]:
    config = {
        "name": name,
        "base_model": "tiny-random-llama",
        "method": "lora",
        "data": {"train_file": str(data_file), "output_format": "json", "system_prompt": "Extract JSON.",
                 "max_length": 256},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ALL_LINEAR},
        "training": {"max_steps": steps, "batch_size": 16, "learning_rate": learning_rate, "eval_every": 20,
                     "checkpoint_every": 20, "eval_examples": 16, "precision": "fp32"},
        "evaluation": {"max_examples": 16, "max_new_tokens": 48, "batch_size": 16, "speed_prompts": 2,
                       "speed_max_new_tokens": 8},
    }
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def prefect_api():
    """One temporary Prefect API for a test module's flow runs (a first start migrates its database).
    Modules that run flows ask for it: `pytestmark = pytest.mark.usefixtures("prefect_api")`."""
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_cache: Path) -> Settings:
    """Flows read settings from the environment (they are entry points): point it at tmp_path."""
    yield from private_home(tmp_path, monkeypatch, model_cache)


def private_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_cache: Path, *, folder: str = "home",
                 tracking_uri: str | None = None) -> Iterator[Settings]:
    """The body of a home fixture: `LORAFLEET_HOME` = tmp_path/folder, the shared model cache, and MLflow at
    `tracking_uri` (None: the home's own SQLite store); afterwards MLflow's globals are reset and nothing may
    have fallen back to ./mlruns."""
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / folder))
    monkeypatch.setenv("LORAFLEET_MODEL_CACHE", str(model_cache))
    if tracking_uri is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    yield Settings.from_env()
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    assert not (tmp_path / "mlruns").exists(), "MLflow fell back to ./mlruns"


# ----- a real `prefect server start` (tests/test_parallel_finetune.py) ------------------------------


def free_port() -> int:
    """A TCP port nobody listens on right now (the server binds it a moment later)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prefect_env(api_url: str, prefect_home: Path, **extra: str) -> dict[str, str]:
    """The environment of a process that talks to one private Prefect server (CLI, worker, deploy)."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "MLFLOW_"))}
    env.update(PREFECT_HOME=str(prefect_home), PREFECT_API_URL=api_url,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_UI_ENABLED="false",
               PYTHONUNBUFFERED="1", **extra)
    return env


def stop_process_group(process: Any, grace_s: float = 20) -> None:
    """SIGTERM the whole group (a server or worker starts children), then SIGKILL what is left."""
    from lorafleet.processes import stop_process_group as stop

    stop(process, grace=grace_s)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `prefect server start` on a free port with a private PREFECT_HOME (SQLite inside it).

    Yields `(api_url, prefect_home)`. The scheduler service is off: tests create their runs explicitly,
    and prefect.yaml's cron schedules must not start a real nightly retrain in the middle of a test.
    """
    import subprocess
    import sys
    import time

    import httpx

    root = tmp_path_factory.mktemp("prefect-server")
    prefect_home = root / "prefect-home"
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    log_path = root / "server.log"
    prefect_cli = Path(sys.executable).with_name("prefect")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(prefect_cli), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui",
             "--no-scheduler", "--no-late-runs", "--analytics-off"],
            env=prefect_env(api_url, prefect_home), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=root)
    try:
        deadline = time.monotonic() + 300  # the first start migrates the database; this machine is busy
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"prefect server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{api_url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"prefect server not healthy after 300 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield api_url, prefect_home
    finally:
        stop_process_group(process)
