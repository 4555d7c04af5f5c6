"""MLflow tracking I/O: one experiment per adapter, one run per finetune, batched logging.

Everything goes through an explicit `MlflowClient` built from `Settings`, so a test or a second
pipeline can point at its own store. With a store this process opens itself (SQLite, or PostgreSQL
named directly) the experiment's artifact location is fixed under `Settings.mlflow_artifacts_dir`;
MLflow would otherwise fall back to `./mlruns` in whatever folder the process happened to start in.
With a tracking server (`http://...`) the server chooses: started with `--artifacts-destination`, it
gives `mlflow-artifacts:/` locations, and adapters are uploaded and downloaded through it, so trainers,
promoters and replicas on different machines share nothing but its URL.

Reruns are idempotent: a run is resumed only by the process holding its adapter's finetune lock
(`tasks/locks.py`), so a RUNNING run found then was left by a process that died; and `RunLogger`
logs each (metric, step) once, so the steps a resumed training replays from its last checkpoint
do not appear twice in the loss curve.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST

from lorafleet.mlflow_store import is_mlflow_error, store_client
from lorafleet.names import NAME_PATTERN
from lorafleet.settings import Settings

log = logging.getLogger(__name__)

EXPERIMENT_PREFIX = "lorafleet/"
# MLflow 3.17 accepts 6000 characters, but older tracking servers (and some backends) cap param
# values at 500; staying under the smaller limit keeps a run loggable to any server. The full
# values are kept in the `params.json` artifact whenever one had to be shortened.
PARAM_VALUE_LIMIT = 500
FULL_PARAMS_ARTIFACT = "params.json"
_TRUNCATION_MARK = "...[truncated]"
_PARAMS_PER_BATCH = 100  # MLflow's MAX_PARAMS_TAGS_PER_BATCH (params and tags)
_METRICS_PER_BATCH = 1000  # MLflow's MAX_METRICS_PER_BATCH
_RESUMABLE = {"RUNNING", "KILLED", "FAILED"}
RunEndStatus = Literal["FINISHED", "FAILED", "KILLED"]


def mlflow_client(settings: Settings) -> MlflowClient:
    """A client for the settings' store; also sets MLflow's global URIs.

    The globals matter because `mlflow.artifacts.download_artifacts("models:/...")` resolves
    registry URIs through them, whatever client the caller holds.
    """
    if settings.tracks_locally and settings.tracking_uri.startswith("sqlite:"):
        settings.home.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    return store_client(settings.tracking_uri)


def experiment_name(adapter_name: str) -> str:
    return f"{EXPERIMENT_PREFIX}{adapter_name}"


def ensure_experiment(client: MlflowClient, adapter_name: str, settings: Settings) -> str:
    """Return the id of `lorafleet/<adapter_name>`, creating (or restoring) it when needed."""
    if not NAME_PATTERN.match(adapter_name):
        raise ValueError(f"adapter name {adapter_name!r} is not valid: use 1-64 lowercase letters, digits, "
                         "'.', '_' or '-', starting with a letter or digit")
    name = experiment_name(adapter_name)
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        if existing.lifecycle_stage == "deleted":
            client.restore_experiment(existing.experiment_id)
        return existing.experiment_id
    location = None
    if settings.tracks_locally:
        location = (settings.mlflow_artifacts_dir / adapter_name).resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as error:
        # Two flows for the same adapter may race to create it; the loser uses the winner's.
        if not is_mlflow_error(error, RESOURCE_ALREADY_EXISTS):
            raise
        again = client.get_experiment_by_name(name)
        if again is None:
            raise
        return again.experiment_id


def start_run(client: MlflowClient, experiment_id: str, *, run_name: str,
              tags: Mapping[str, str] | None = None) -> str:
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={key: str(value) for key, value in (tags or {}).items()})
    return run.info.run_id


def resume_or_start_run(client: MlflowClient, experiment_id: str, *, run_name: str,
                        tags: Mapping[str, str] | None = None, resume_run_id: str | None,
                        params: Mapping[str, Any] | None = None) -> str:
    """Continue an interrupted run (so its metrics stay one curve), or start a new one.

    A run is continued only if it exists, belongs to this experiment, did not finish and, when
    `params` (the nested config about to be logged) is given, logged no different value for any of
    them (MLflow refuses to change a param; a changed config is a new run). Any other case starts a
    new run and says why, because a stale id must never block training.
    Compare the returned id with `resume_run_id` to know which happened.
    """
    if resume_run_id:
        reason = _resume_refusal(client, experiment_id, resume_run_id, params)
        if reason is None:
            client.update_run(resume_run_id, status="RUNNING")
            if tags:
                RunLogger(client, resume_run_id).set_tags(tags)
            log.info("resuming MLflow run %s", resume_run_id)
            return resume_run_id
        log.warning("not resuming MLflow run %s: %s; starting a new run", resume_run_id, reason)
    return start_run(client, experiment_id, run_name=run_name, tags=tags)


def _resume_refusal(client: MlflowClient, experiment_id: str, run_id: str,
                    params: Mapping[str, Any] | None = None) -> str | None:
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        if is_mlflow_error(error, RESOURCE_DOES_NOT_EXIST):
            return "no such run"
        raise
    if run.info.lifecycle_stage == "deleted":
        return "the run was deleted"
    if run.info.experiment_id != experiment_id:
        return f"it belongs to experiment {run.info.experiment_id}, not {experiment_id}"
    if run.info.status not in _RESUMABLE:
        return f"its status is {run.info.status}"
    if params:
        logged = run.data.params
        changed = sorted(key for key, value in _loggable(params).items() if key in logged and logged[key] != value)
        if changed:
            return f"its config differs ({', '.join(changed[:5])})"
    return None


def _loggable(nested: Mapping[str, Any]) -> dict[str, str]:
    """The params exactly as `RunLogger.log_params` writes them."""
    return {key: _truncate(value) for key, value in flatten_params(nested).items()}


class RunLogger:
    """Logging into one existing run; also the training callback (`on_train_step`, `on_validation`).

    As a context manager it ends the run FINISHED, FAILED on an exception, KILLED on Ctrl-C, so a
    crashed flow never leaves a run marked RUNNING forever.
    """

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self._logged_steps: dict[str, set[int]] | None = None  # read from the run on the first log_metrics

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("KILLED")
        else:
            self.finish("FAILED")

    def log_params(self, nested: Mapping[str, Any]) -> dict[str, str]:
        """Log a nested config as dotted params; return what was logged (after truncation)."""
        flat = flatten_params(nested)
        logged = _loggable(nested)
        items = [Param(key, value) for key, value in logged.items()]
        for start in range(0, len(items), _PARAMS_PER_BATCH):
            batch = items[start:start + _PARAMS_PER_BATCH]
            self.client.log_batch(self.run_id, params=batch, synchronous=True)
        if logged != flat:
            self.log_dict(flat, FULL_PARAMS_ARTIFACT)
        return logged

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log at `step` (default 0); a (metric, step) the run already has is skipped, not logged twice."""
        timestamp = int(time.time() * 1000)
        step = step or 0
        logged = self._steps_already_logged()
        entries = []
        for key, value in metrics.items():
            number = float(value)
            if not math.isfinite(number):
                log.warning("not logging metric %r = %r to run %s: MLflow charts need finite values",
                            key, value, self.run_id)
                continue
            if step in logged.setdefault(key, set()):
                continue  # replayed after a resume, or a rerun of a finished step
            logged[key].add(step)
            entries.append(Metric(key, number, timestamp, step))
        for start in range(0, len(entries), _METRICS_PER_BATCH):
            batch = entries[start:start + _METRICS_PER_BATCH]
            self.client.log_batch(self.run_id, metrics=batch, synchronous=True)

    def _steps_already_logged(self) -> dict[str, set[int]]:
        """Steps per metric the run holds from earlier attempts (one query per metric, once per logger)."""
        if self._logged_steps is None:
            keys = self.client.get_run(self.run_id).data.metrics
            self._logged_steps = {key: {m.step for m in self.client.get_metric_history(self.run_id, key)}
                                  for key in keys}
        return self._logged_steps

    def on_train_step(self, step: int, metrics: Mapping[str, float]) -> None:
        self.log_metrics(metrics, step=step)

    def on_validation(self, step: int, metrics: Mapping[str, float]) -> None:
        self.log_metrics(metrics, step=step)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise FileNotFoundError(f"cannot log artifacts from {local_dir}: not a directory")
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_figure(self, fig: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, fig, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, d: Mapping[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, dict(d), artifact_file)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [RunTag(key, str(value)) for key, value in tags.items()]
        for start in range(0, len(items), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=items[start:start + _PARAMS_PER_BATCH], synchronous=True)

    def finish(self, status: RunEndStatus = "FINISHED") -> None:
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"finish(status={status!r}): use FINISHED, FAILED or KILLED")
        self.client.set_terminated(self.run_id, status=status)


def flatten_params(nested: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"lora": {"r": 16}}` -> `{"lora.r": "16"}`; lists become JSON, empty mappings `{}`."""
    flat: dict[str, str] = {}
    for key, value in nested.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            items = flatten_params(value, prefix=f"{dotted}.")
        else:
            items = {dotted: _stringify(value)}
        for item_key, item_value in items.items():
            if item_key in flat:
                raise ValueError(f"param {item_key!r} appears twice after flattening: a key contains a '.' "
                                 "that collides with a nested section")
            flat[item_key] = item_value
    return flat


def _stringify(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple, Mapping)):
        return json.dumps(value, default=str, ensure_ascii=False)
    return str(value)


def _truncate(value: str) -> str:
    if len(value) <= PARAM_VALUE_LIMIT:
        return value
    return value[:PARAM_VALUE_LIMIT - len(_TRUNCATION_MARK)] + _TRUNCATION_MARK


def system_info() -> dict[str, Any]:
    """What the run ran on, as a flat dict of strings and numbers (logged as `system.*` params)."""
    import psutil
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("torch", "transformers", "peft", "mlflow", "lorafleet"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = "not installed"
    info["cpu_count"] = os.cpu_count() or 0
    info["torch_threads"] = torch.get_num_threads()
    info["ram_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    if torch.cuda.is_available():
        info["device"] = "cuda"
        info["cuda_name"] = torch.cuda.get_device_name(0)
        info["cuda_count"] = torch.cuda.device_count()
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        info["device"] = "mps"
    else:
        info["device"] = "cpu"
    return info
