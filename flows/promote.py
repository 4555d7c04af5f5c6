"""The `promote` flow: move `champion` by hand or through the gate, or roll it back.

Used by the `lorafleet promote` / `lorafleet rollback` commands and by the promotion deployment in
prefect.yaml (e.g. after a human looked at a challenger's evaluation in MLflow).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from lorafleet.config import NAME_PATTERN
from lorafleet.settings import Settings
from lorafleet.tasks import gate as gate_logic
from lorafleet.tasks import registry, tracking
from lorafleet.tasks.gate_settings import PromotionSettings
from lorafleet.tasks.steps import artifact_key


@flow(name="promote")
def promote(name: str, version: str | None = None, force: bool = False, metric: str = "field_f1",
            margin: float = 0.0) -> dict[str, Any]:
    """Promote `version` (default: the `challenger` alias) to `champion`.

    Without `force`, the version must pass the same gate as in `finetune`, using the metrics recorded
    on the registered versions; with `force` (the `lorafleet promote` command) it is moved as asked.
    """
    if not NAME_PATTERN.match(name):
        raise ValueError(f"name: {name!r} is not a valid adapter name")
    logger = get_run_logger()
    client = tracking.mlflow_client(Settings.from_env().ensure())
    target = registry.get_version(client, name, version or "challenger")
    if force:
        reasons = ["promoted by hand (force)"]
        registry.promote(client, name, target.version, reason=reasons[0])
        promoted = True
    else:
        champion = registry.get_champion(client, name)
        decision = gate_logic.decide(
            PromotionSettings(metric=metric, margin=margin),
            challenger=registry.version_metrics(target), base=registry.version_metrics(target, prefix="base_metric."),
            champion=registry.version_metrics(champion) if champion is not None else None,
            champion_version=champion.version if champion is not None else None)
        reasons, promoted = decision.reasons, decision.promote
        if promoted:
            registry.set_champion(client, name, target.version, reason="; ".join(reasons))
    create_markdown_artifact(markdown=f"# {name} v{target.version}: {'promoted' if promoted else 'held'}\n\n"
                             + "\n".join(f"- {r}" for r in reasons), key=artifact_key(name, "promotion"))
    logger.info("%s v%s %s: %s", name, target.version, "promoted" if promoted else "held", "; ".join(reasons))
    return {"name": name, "version": str(target.version), "promoted": promoted, "reasons": reasons}


@flow(name="rollback")
def rollback(name: str) -> dict[str, Any]:
    """Move `champion` back to the previous champion version."""
    client = tracking.mlflow_client(Settings.from_env().ensure())
    before, after = registry.rollback(client, name)
    get_run_logger().info("%s: champion rolled back from v%s to v%s", name, before, after)
    return {"name": name, "from": before, "to": after}
