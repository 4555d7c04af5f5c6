"""The online gate's hand-offs: read an A/B experiment from the serving replicas, log it, end it.

The servers are read over their admin API (`GET /admin/experiments/NAME`), the real HTTP interface an
operator uses too, never through the server's internals; each replica's arms are summed, which is valid
because they are sums (`tasks/experiment_decision.py`). The admin key comes from the environment
(`ADMIN_KEY_ENV`), never from a flow parameter, which Prefect would store and show.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import httpx
from mlflow import MlflowClient

from lorafleet.experiment_arms import ArmSums
from lorafleet.tasks.experiment_decision import OnlineDecision

ADMIN_KEY_ENV = "LORAFLEET_ADMIN_KEY"  # the gate's bearer token for the servers' /admin endpoints
ARMS = ("champion", "challenger")
TIMEOUT_S = 30.0


class ExperimentUnavailable(RuntimeError):
    """A server did not answer for the experiment (down, no such experiment, no admin rights)."""


def _headers() -> dict[str, str]:
    key = os.environ.get(ADMIN_KEY_ENV)
    return {"Authorization": f"Bearer {key}"} if key else {}


def read_arms(servers: Sequence[str], name: str) -> dict[str, ArmSums]:
    """Each arm summed over `servers`; raises ExperimentUnavailable naming the server that failed."""
    totals: dict[str, ArmSums] = {}
    versions: dict[str, set[int]] = {arm: set() for arm in ARMS}
    for server in servers:
        card = _call("GET", server, f"/admin/experiments/{name}")
        for arm in ARMS:
            numbers = ArmSums.from_dict(card["arms"][arm])
            if numbers.version is not None:
                versions[arm].add(numbers.version)
            totals[arm] = totals[arm] + numbers if arm in totals else numbers
    for arm, seen in versions.items():
        if len(seen) > 1:
            raise ExperimentUnavailable(f"the replicas served different {arm} versions {sorted(seen)}: an alias moved "
                                        "during the experiment; end it and start a new one")
    return totals


def end_experiment(servers: Sequence[str], name: str, *, reload: bool) -> list[str]:
    """End the experiment on every server (and reload NAME there after a promotion); returns problems."""
    problems = []
    for server in servers:
        try:
            _call("DELETE", server, f"/admin/experiments/{name}")
            if reload:
                _call("POST", server, "/admin/adapters/reload", json={"model": name})
        except ExperimentUnavailable as error:
            problems.append(str(error))
    return problems


def log_online_summary(client: MlflowClient, run_id: str, arms: dict[str, ArmSums],
                       decision: OnlineDecision) -> None:
    """Per-arm figures as metrics of the challenger's run, one step per gate reading (seconds since epoch)."""
    from lorafleet.tasks.tracking import RunLogger

    metrics: dict[str, float] = {}
    for arm, numbers in arms.items():
        for key, value in (("requests", numbers.requests), ("errors", numbers.errors),
                           ("feedback_n", numbers.feedback_n), ("feedback_mean", numbers.feedback_mean),
                           ("seconds_per_token", numbers.seconds_per_token)):
            if value is not None:
                metrics[f"online/{arm}/{key}"] = float(value)
    for key, value in (("p_value", decision.p_value), ("latency_ratio", decision.latency_ratio)):
        if value is not None:
            metrics[f"online/{key}"] = value
    RunLogger(client, run_id).log_metrics(metrics, step=int(time.time()))


def _call(method: str, server: str, path: str, json: dict[str, Any] | None = None) -> dict[str, Any]:
    url = server.rstrip("/") + path
    try:
        response = httpx.request(method, url, json=json, headers=_headers(), timeout=TIMEOUT_S)
    except httpx.HTTPError as error:
        raise ExperimentUnavailable(f"{url}: {type(error).__name__}: {error}") from None
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise ExperimentUnavailable(f"{method} {url}: HTTP {response.status_code}: {message}")
    return response.json()
