"""The `retrain` flow: re-run `finetune` for each adapter whose prepared data changed.

Meant for a schedule (see prefect.yaml): nightly, every adapter spec is prepared (cheap, cached), and
only adapters whose data fingerprint differs from their newest registered version are retrained.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from lorafleet.config import load_retrain_config
from lorafleet.flows.finetune import finetune
from lorafleet.settings import Settings
from lorafleet.tasks import locks, registry, steps, tracking


@flow(name="retrain")
def retrain(config: str, force: bool = False) -> list[dict[str, Any]]:
    """Retrain the adapters listed in a retrain config (paths to finetune configs, or inline specs)."""
    logger = get_run_logger()
    settings = Settings.from_env().ensure()
    specs = load_retrain_config(config).adapters
    client = tracking.mlflow_client(settings)
    results = []
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
        try:
            summary = finetune(config=spec.model_dump(mode="json"))
        except locks.AlreadyRunning as error:  # someone is fine-tuning it now; the other adapters still run
            logger.warning("%s: skipped: %s", spec.name, error)
            results.append({"name": spec.name, "action": "skipped", "reason": str(error),
                            "data_fingerprint": prepared.fingerprint})
            continue
        results.append({"name": spec.name, "action": "retrained", "reason": reason,
                        "version": summary["version"], "promoted": summary["promoted"],
                        "data_fingerprint": prepared.fingerprint})
    create_table_artifact([{k: str(v) for k, v in row.items()} for row in results], key="retrain-summary",
                          description="what the retrain flow did for each adapter")
    return results
