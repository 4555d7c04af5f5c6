"""`lorafleet schedule`: the prefect.yaml deployments served from one process with `flow.serve`.

For a laptop without a Prefect server or worker: the nightly retrain runs on its cron, and finetune /
promote / rollback can be triggered from the Prefect UI or `prefect deployment run`.
"""

from __future__ import annotations

from pathlib import Path

from prefect import serve

from lorafleet.flows.finetune import finetune
from lorafleet.flows.promote import promote, rollback
from lorafleet.flows.retrain import retrain

NIGHTLY = "0 2 * * *"


def serve_schedules(retrain_config: Path, finetune_config: Path, cron: str = NIGHTLY) -> None:
    serve(
        retrain.to_deployment(name="nightly-retrain", cron=cron,
                              parameters={"config": str(retrain_config.resolve()), "force": False}),
        finetune.to_deployment(name="finetune", parameters={"config": str(finetune_config.resolve())}),
        promote.to_deployment(name="promote-challenger"),
        rollback.to_deployment(name="rollback"),
    )
