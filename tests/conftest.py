"""Shared fixtures: one model cache for the whole session, a fresh LORAFLEET_HOME per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing in the test suite may reach the network: every model and dataset is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

from lorafleet.settings import Settings

# Fixtures of the flow tests (`prefect_api`, `home`) and of the scale-out tests (`postgres_cluster`,
# `mlflow_server`); modules that define their own keep theirs.
pytest_plugins = ("flow_helpers", "pg_mlflow_helpers")


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """Converted base models are expensive (SmolLM2: ~20 s), so all tests share one cache."""
    cache = Settings.from_env().model_cache_dir
    cache.mkdir(parents=True, exist_ok=True)
    return cache


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Settings.from_env().data_root
    if not (root / "viggo" / "train.csv").exists():
        raise FileNotFoundError(f"the shared datasets are expected at {root} (set LORAFLEET_DATA)")
    return root


@pytest.fixture
def settings(tmp_path: Path, model_cache: Path) -> Settings:
    """A private LORAFLEET_HOME with its own SQLite MLflow store; only the model cache is shared."""
    return Settings.for_home(tmp_path / "home", model_cache_dir=model_cache,
                             data_root=Settings.from_env().data_root).ensure()


@pytest.fixture
def tiny_model(model_cache: Path):
    """A fresh tiny random Llama (fresh because tests wrap it in LoRA and train it)."""
    from lorafleet.models.base import load_base_model

    return load_base_model("tiny-random-llama", model_cache)


@pytest.fixture(scope="session")
def tiny_tokenizer(model_cache: Path):
    from lorafleet.models.base import load_tokenizer, resolve_base_model

    return load_tokenizer(resolve_base_model("tiny-random-llama", model_cache))


# ----- a real MLflow SQLite store (tests/test_registry.py, tests/test_tracking.py) -----------------


@pytest.fixture
def empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run a test in an empty folder and prove MLflow wrote nothing there (no ./mlruns, no mlflow.db).

    `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI; undo that so later tests see the
    environment they started with. Modules opt in with `pytestmark = pytest.mark.usefixtures("empty_cwd")`.
    """
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield cwd
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    assert sorted(p.name for p in cwd.iterdir()) == []


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, fully migrated MLflow SQLite file: creating one costs ~1 s of alembic per test."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def client(settings: Settings, migrated_db: Path):
    """An MlflowClient on this test's LORAFLEET_HOME store, copied from the migrated template."""
    import shutil

    from lorafleet.tasks.tracking import mlflow_client

    shutil.copyfile(migrated_db, settings.home / "mlflow.db")
    return mlflow_client(settings)
