"""The `promote` flow: move `champion` by hand or through the gate, or roll it back.

Used by the `lorafleet promote` / `lorafleet rollback` commands and by the promotion deployment in
prefect.yaml (e.g. after a human looked at a challenger's evaluation in MLflow). Every move happens
under the same per-name promotion lock as the finetune gate (`tasks/registry.py`).
"""

from __future__ import annotations

from typing import Any

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import ValidationError

from lorafleet.names import NAME_PATTERN
from lorafleet.sections.promotion import PromotionSettings
from lorafleet.settings import Settings
from lorafleet.tasks import eval_split, registry, tracking
from lorafleet.tasks.promotion import gate_and_promote
from lorafleet.tasks.steps import artifact_key


@flow(name="promote")
def promote(name: str, version: str | None = None, force: bool = False, metric: str = "field_f1",
            margin: float = 0.0) -> dict[str, Any]:
    """Promote `version` (default: the `challenger` alias) to `champion`.

    Without `force`, the version must pass the same gate as in `finetune`: its recorded metrics against
    the champion's on the same rows (the champion is re-evaluated on the version's test rows when they
    are still on this machine, else the version is held); with `force` (the `lorafleet promote`
    command) it is moved as asked.
    """
    if not NAME_PATTERN.match(name):
        raise ValueError(f"name: {name!r} is not a valid adapter name")
    try:
        gate_settings = PromotionSettings(metric=metric, margin=margin)
    except ValidationError as error:
        raise ValueError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())) from None
    logger = get_run_logger()
    settings = Settings.from_env().ensure()
    client = tracking.mlflow_client(settings)
    target = registry.get_version(client, name, version or "challenger")
    if force:
        reasons = ["promoted by hand (force)"]
        registry.promote(client, name, target.version, reason=reasons[0])
        promoted = True
    else:
        split = eval_split.version_split(target)
        result = gate_and_promote(
            client, name, target.version, settings=gate_settings, challenger=registry.version_metrics(target),
            base=registry.version_metrics(target, prefix="base_metric."),
            champion_numbers=_champion_numbers(client, settings, target),
            provenance={f"challenger v{target.version}": "recorded at its registration: "
                        + (split.describe() if split else "rows it did not record")})
        reasons, promoted = result.decision.reasons, result.promoted
        reasons = reasons + [f"{who}: {where}" for who, where in result.decision.provenance.items()]
    create_markdown_artifact(markdown=f"# {name} v{target.version}: {'promoted' if promoted else 'held'}\n\n"
                             + "\n".join(f"- {r}" for r in reasons), key=artifact_key(name, "promotion"))
    logger.info("%s v%s %s: %s", name, target.version, "promoted" if promoted else "held", "; ".join(reasons))
    return {"name": name, "version": str(target.version), "promoted": promoted, "reasons": reasons}


def _champion_numbers(client: MlflowClient, settings: Settings, target: ModelVersion) -> eval_split.ChampionNumbersFn:
    """The champion's metrics on the target's rows: recorded, cached, or re-evaluated here if the rows are."""

    def numbers(champion: ModelVersion) -> eval_split.ChampionNumbers:
        split = eval_split.version_split(target)
        found = eval_split.recorded_numbers(champion, split) if split is not None else None
        if found is not None:
            return found
        rows = eval_split.rows_of_version(client, settings, target)
        if isinstance(rows, str):
            return eval_split.ChampionNumbers(str(champion.version), None,
                                              f"not measured on the rows of v{target.version}, and {rows}")
        config, prepared, split = rows
        return eval_split.champion_numbers_on(client, settings, config, prepared, split)(champion)

    return numbers


@flow(name="rollback")
def rollback(name: str) -> dict[str, Any]:
    """Move `champion` back to the previous champion version."""
    client = tracking.mlflow_client(Settings.from_env().ensure())
    before, after = registry.rollback(client, name)
    get_run_logger().info("%s: champion rolled back from v%s to v%s", name, before, after)
    return {"name": name, "from": before, "to": after}
