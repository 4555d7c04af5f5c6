"""prefect.yaml: every deployment's entrypoint loads, its parameters fit the flow, configs exist."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENTS = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_deployment_entrypoint_and_parameters(deployment, monkeypatch):
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(ROOT)  # Prefect resolves entrypoints relative to the working directory
    flow = load_flow_from_entrypoint(deployment["entrypoint"])
    signature = inspect.signature(flow.fn)
    assert set(deployment.get("parameters", {})) <= set(signature.parameters)
    required = {n for n, p in signature.parameters.items() if p.default is inspect.Parameter.empty}
    assert required <= set(deployment.get("parameters", {}))
    config = deployment.get("parameters", {}).get("config")
    if config:
        assert (ROOT / config).exists()
    assert deployment["work_pool"]["name"] == "lorafleet-process"


def test_nightly_retrain_is_scheduled():
    from prefect.client.schemas.schedules import CronSchedule

    nightly = next(d for d in DEPLOYMENTS if d["name"] == "nightly-retrain")
    schedule = nightly["schedules"][0]
    CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # raises on a bad cron
    assert nightly["entrypoint"] == "flows/retrain.py:retrain"
