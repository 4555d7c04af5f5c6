"""The `retrain` flow: re-run `finetune` for each adapter whose prepared data changed.

Meant for a schedule (see prefect.yaml): nightly, every adapter spec is prepared (cheap, cached), and
only adapters whose data fingerprint differs from their newest registered version are retrained.

How the retrained adapters run:
- `finetune_deployment` given (prefect.yaml's nightly retrain names the `finetune` deployment): every
  adapter becomes its own flow run of that deployment, all created at once (`run_deployment` with
  `timeout=0`, as subflows of this run), then awaited together. The work pool's workers run them as
  separate processes, containers or pods, and the `gpu` global concurrency limit that each finetune holds
  (`tasks/device_slots.py`) decides how many train at once: N adapters share M devices. Nothing here
  caps N (no thread per adapter): the limit is the one bound, set in one place.
- no deployment (the CLI, `flow.serve`, tests; works on Prefect's ephemeral API): the finetunes run
  in this process one after another, still each in its slot. Training in threads of one process would
  share torch's global RNG and thread pool, so two concurrent trainings would neither be reproducible
  nor faster; parallel training is a process (or machine) per adapter, which is what a deployment is.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_client, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from lorafleet.config import FinetuneConfig, load_retrain_config
from lorafleet.flows.finetune import finetune
from lorafleet.settings import Settings
from lorafleet.tasks import locks, registry, steps, tracking


class RetrainFailed(RuntimeError):
    """One or more adapters failed to retrain; the others finished and are in the summary artifact."""


POLL_S = 5.0  # how often a fanned-out retrain looks at its finetune runs (fine-tunes take minutes)


@flow(name="retrain")
def retrain(config: str, force: bool = False, finetune_deployment: str | None = None) -> list[dict[str, Any]]:
    """Retrain the adapters listed in a retrain config (paths to finetune configs, or inline specs).

    `finetune_deployment` ("flow/deployment", e.g. `finetune/finetune-demo`) fans the adapters out as
    concurrent flow runs of that deployment instead of running them here one after another.
    """
    logger = get_run_logger()
    settings = Settings.from_env().ensure()
    specs = load_retrain_config(config).adapters
    client = tracking.mlflow_client(settings)
    results: list[dict[str, Any]] = []
    todo: list[tuple[FinetuneConfig, str, str]] = []  # (spec, reason, fingerprint)
    for spec in specs:
        prepared = steps.prepare_data(spec, settings)
        latest = registry.latest_version(client, spec.name)
        previous = latest.tags.get("data_fingerprint") if latest is not None else None
        if previous == prepared.fingerprint and not force:
            logger.info("%s: data unchanged (fingerprint %s, version %s): skipped", spec.name,
                        prepared.fingerprint[:16], latest.version)
            results.append({"name": spec.name, "action": "skipped", "version": latest.version,
                            "data_fingerprint": prepared.fingerprint})
            continue
        reason = "no registered version" if latest is None else (
            "forced" if previous == prepared.fingerprint else f"data changed since version {latest.version}")
        logger.info("%s: retraining (%s)", spec.name, reason)
        todo.append((spec, reason, prepared.fingerprint))

    if finetune_deployment:
        _check_deployment(finetune_deployment)
        started = [run_deployment(finetune_deployment, parameters={"config": spec.model_dump(mode="json"),
                                                                   "promote": True},
                                  timeout=0, as_subflow=True, flow_run_name=f"finetune-{spec.name}")
                   for spec, _, _ in todo]
        logger.info("started %d runs of %s; the global concurrency limit their fine-tunes hold decides how "
                    "many train at once", len(started), finetune_deployment)
        finished = _wait_for(started)
        outcomes = [_deployment_outcome(run, spec.name, settings) for (spec, _, _), run
                    in zip(todo, finished, strict=True)]
    else:
        outcomes = [_local_outcome(spec) for spec, _, _ in todo]
    for (spec, reason, fingerprint), outcome in zip(todo, outcomes, strict=True):
        results.append({"name": spec.name, **outcome, "data_fingerprint": fingerprint,
                        **({"reason": reason} if outcome["action"] == "retrained" else {})})

    create_table_artifact([{k: str(v) for k, v in row.items()} for row in results], key="retrain-summary",
                          description="what the retrain flow did for each adapter")
    failed = [row for row in results if row["action"] == "failed"]
    if failed:
        raise RetrainFailed("; ".join(f"{row['name']}: {row['reason']}" for row in failed))
    return results


def _local_outcome(spec: FinetuneConfig) -> dict[str, Any]:
    """Run the finetune as a subflow here; a name someone else is fine-tuning is skipped, not fatal."""
    try:
        summary = finetune(config=spec.model_dump(mode="json"))
    except locks.AlreadyRunning as error:  # someone is fine-tuning it now; the other adapters still run
        get_run_logger().warning("%s: skipped: %s", spec.name, error)
        return {"action": "skipped", "reason": str(error)}
    return {"action": "retrained", "version": summary["version"], "promoted": summary["promoted"]}


def _wait_for(runs: list[FlowRun]) -> list[FlowRun]:
    """Each run as it is once it reached a final state (completed, failed, crashed, cancelled)."""
    final: dict[Any, FlowRun] = {}
    with get_client(sync_client=True) as client:
        while len(final) < len(runs):
            for run in runs:
                if run.id not in final:
                    current = client.read_flow_run(run.id)
                    if current.state is not None and current.state.is_final():
                        final[run.id] = current
            if len(final) < len(runs):
                time.sleep(POLL_S)
    return [final[run.id] for run in runs]


def _check_deployment(name: str) -> None:
    """Fail before fanning out when the deployment is missing, naming it, instead of once per adapter."""
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise ValueError(f"finetune_deployment {name!r}: no such deployment on this Prefect API; deploy it "
                             "first (`prefect deploy` from the repo, see prefect.yaml)") from None


def _deployment_outcome(run: FlowRun, name: str, settings: Settings) -> dict[str, Any]:
    """What a finetune flow run did, read back from the registry: results of another process (maybe
    another machine) are not in this one, but the MLflow registry they wrote to is shared."""
    if not run.state.is_completed():
        message = f"flow run {run.name} ({run.id}) ended {run.state.name}"
        return {"action": "failed", "reason": f"{message}: {run.state.message}" if run.state.message else message,
                "flow_run_id": str(run.id)}
    client = tracking.mlflow_client(settings)
    latest = registry.latest_version(client, name)
    champion = registry.get_champion(client, name)
    return {"action": "retrained", "version": latest.version if latest else None,
            "promoted": bool(latest and champion and champion.version == latest.version),
            "flow_run_id": str(run.id)}
