"""The `experiment-gate` flow: promote an A/B challenger that wins on live feedback, or end the experiment.

Reads the experiment's per-arm statistics from every serving replica (their admin API), logs them to the
challenger's MLflow run (each reading is one step: run it on a schedule for a time series), decides by
the stated rule (`tasks/experiment_decision.py`: Welch's t-test on feedback scores with a minimum sample
size, and a latency margin), and then
* `promote`: moves `champion` to the challenger by compare-and-set, the same atomic move the offline
  gate makes (`registry.move_champion_if`, under the per-name promotion lock): if someone moved the
  champion meanwhile, nothing moves; then ends the experiment on every replica and reloads NAME there;
* `end`: ends the experiment on every replica (the champion keeps serving alone);
* `continue`: changes nothing.
A Prefect markdown artifact states the numbers and the decision.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from lorafleet.names import NAME_PATTERN
from lorafleet.settings import Settings
from lorafleet.tasks import registry, tracking
from lorafleet.tasks.experiment import end_experiment, log_online_summary, read_arms
from lorafleet.tasks.experiment_decision import OnlineGateSettings, decide
from lorafleet.tasks.steps import artifact_key


@flow(name="experiment-gate")
def experiment_gate(name: str, servers: list[str], min_samples: int = 100, alpha: float = 0.05,
                    latency_margin: float = 0.10, max_samples: int | None = 5000) -> dict[str, Any]:
    """Judge NAME's running experiment on `servers` (base URLs, e.g. http://host:3000) and act on it."""
    if not NAME_PATTERN.match(name):
        raise ValueError(f"name: {name!r} is not a valid adapter name")
    if not servers:
        raise ValueError("servers: give at least one server URL")
    gate = OnlineGateSettings(min_samples=min_samples, alpha=alpha, latency_margin=latency_margin,
                              max_samples=max_samples)
    logger = get_run_logger()
    settings = Settings.from_env().ensure()
    client = tracking.mlflow_client(settings)
    arms = read_arms(servers, name)
    champion, challenger = arms["champion"], arms["challenger"]
    decision = decide(champion, challenger, gate)
    if challenger.version is not None:
        run_id = client.get_model_version(name, str(challenger.version)).run_id
        if run_id:
            log_online_summary(client, run_id, arms, decision)
    action, reasons = decision.action, list(decision.reasons)
    promoted = False
    if action == "promote":
        promoted = registry.move_champion_if(
            client, name, challenger.version, expected=champion.version,
            reason=f"online A/B experiment: {reasons[1]}")
        if not promoted:
            action = "end"
            reasons.append(f"the champion moved away from v{champion.version} during the experiment: nothing "
                           "promoted")
    problems = end_experiment(servers, name, reload=promoted) if action != "continue" else []
    reasons += [f"could not end the experiment on a server: {problem}" for problem in problems]
    table = "\n".join(f"| {arm} | v{numbers.version} | {numbers.requests} | {numbers.errors} | {numbers.feedback_n} | "
                      f"{_fmt(numbers.feedback_mean)} | {_fmt(numbers.seconds_per_token)} |"
                      for arm, numbers in arms.items())
    create_markdown_artifact(
        markdown=f"# {name}: online experiment, {action}{' (promoted)' if promoted else ''}\n\n"
                 "| arm | version | requests | errors | scores | mean score | s/token |\n|---|---|---|---|---|---|---|\n"
                 f"{table}\n\n" + "\n".join(f"- {reason}" for reason in reasons),
        key=artifact_key(name, "experiment-gate"), description="online A/B decision")
    logger.info("experiment %s: %s; %s", name, action, "; ".join(reasons))
    return {"name": name, "action": action, "promoted": promoted, "reasons": reasons,
            "p_value": decision.p_value, "latency_ratio": decision.latency_ratio,
            "arms": {arm: numbers.as_dict() for arm, numbers in arms.items()}}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
