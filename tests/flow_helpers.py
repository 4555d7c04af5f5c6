"""A small learnable task, a config builder and the fixtures (a temporary Prefect API, a private
LORAFLEET_HOME) for flow-level tests on the tiny random Llama; registered as a plugin in conftest.py."""

from __future__ import annotations

import json
import random
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
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LORAFLEET_MODEL_CACHE", str(model_cache))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    yield Settings.from_env()
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    assert not (tmp_path / "mlruns").exists(), "MLflow fell back to ./mlruns"
