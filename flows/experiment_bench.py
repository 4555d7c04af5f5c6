"""`lorafleet bench experiment`: how exactly a running server splits traffic between champion and challenger.

Registers (once) two random-initialised versions of `bench-ab` on the chosen base (v1 champion, v2
challenger), starts `bentoml serve`, starts an experiment at `--share` through the admin API, sends
`--requests` one-token completions over HTTP (half without `user`, half from `--users` users in turn), and
counts the arm each answer names (`x-lorafleet-experiment-arm`). Reported: the observed share of each
half against the asked one with its binomial standard error, and how many users met more than one arm
(stickiness: 0 expected). `--url` measures a server already running (and an adapter already registered
with a champion and a challenger, `--name`).
"""

from __future__ import annotations

import concurrent.futures as cf
import math
from collections import Counter
from typing import Any

import httpx
from rich.console import Console
from rich.progress import Progress

from lorafleet.settings import Settings

AB_NAME = "bench-ab"


def ensure_ab_versions(settings: Settings, base_model: str) -> None:
    """`bench-ab` v1 (champion) and v2 (challenger), random r=8 adapters, registered like trained ones."""
    from lorafleet.flows.bench import write_random_adapters
    from lorafleet.flows.serving_bench import register_champion
    from lorafleet.models.base import load_base_model
    from lorafleet.tasks import registry, tracking

    client = tracking.mlflow_client(settings)
    versions = list(client.search_model_versions(f"name = '{AB_NAME}'"))
    if len(versions) >= 2:
        return
    loaded = load_base_model(base_model, settings.model_cache_dir)
    folder = settings.home / "bench" / "ab"
    dirs = write_random_adapters(loaded, folder, [f"{AB_NAME}-{i:03d}" for i in (1, 2)], rank=8)
    register_champion(client, settings, AB_NAME, dirs[f"{AB_NAME}-001"])
    run_id = tracking.start_run(client, tracking.ensure_experiment(client, AB_NAME, settings), run_name="ab-v2")
    client.log_artifacts(run_id, str(dirs[f"{AB_NAME}-002"]), registry.ADAPTER_ARTIFACT_PATH)
    client.set_terminated(run_id)
    registry.register_adapter(client, name=AB_NAME, run_id=run_id, tags={})  # alias challenger


def measure_split(url: str, name: str, *, share: float, requests: int, users: int, workers: int,
                  console: Console | None = None) -> dict[str, Any]:
    """Send the requests and count arms; the experiment is started here and ended afterwards."""
    with httpx.Client(base_url=url, timeout=120) as http:
        started = http.post("/admin/experiments", json={"model": name, "challenger_share": share})
        if started.status_code != 200:
            raise ValueError(f"starting the experiment failed: HTTP {started.status_code}: {started.text[:300]}")
        plan = [None if i % 2 == 0 else f"user-{(i // 2) % users}" for i in range(requests)]

        def one(user: str | None) -> tuple[str | None, str]:
            body = {"model": name, "prompt": "Hi", "max_tokens": 1, "temperature": 0}
            if user is not None:
                body["user"] = user
            response = http.post("/v1/completions", json=body)
            response.raise_for_status()
            return user, response.headers["x-lorafleet-experiment-arm"]

        results = []
        with cf.ThreadPoolExecutor(workers) as pool, Progress(console=console, disable=console is None) as progress:
            bar = progress.add_task("requests", total=requests)
            for result in pool.map(one, plan):
                results.append(result)
                progress.advance(bar)
        http.delete(f"/admin/experiments/{name}")
    anonymous = Counter(arm for user, arm in results if user is None)
    by_user: dict[str, set[str]] = {}
    for user, arm in results:
        if user is not None:
            by_user.setdefault(user, set()).add(arm)
    sticky_users = Counter(next(iter(arms)) for arms in by_user.values() if len(arms) == 1)
    n_anonymous = sum(anonymous.values())
    observed = anonymous["challenger"] / n_anonymous if n_anonymous else None
    return {
        "name": name, "share": share, "requests": requests, "users": users,
        "anonymous": {"requests": n_anonymous, "challenger": anonymous["challenger"], "observed_share": observed,
                      "standard_error": math.sqrt(share * (1 - share) / n_anonymous) if n_anonymous else None,
                      "error_in_standard_errors": ((observed - share) / math.sqrt(share * (1 - share) / n_anonymous)
                                                   if n_anonymous and 0 < share < 1 else None)},
        "sticky": {"users": len(by_user), "users_on_both_arms": sum(len(arms) > 1 for arms in by_user.values()),
                   "users_on_challenger": sticky_users["challenger"],
                   "observed_share": sticky_users["challenger"] / len(by_user) if by_user else None},
    }


def experiment_bench(settings: Settings, *, url: str | None, name: str, base_model: str, share: float,
                     requests: int, users: int, workers: int, console: Console | None = None) -> dict[str, Any]:
    if url is not None:
        return measure_split(url, name, share=share, requests=requests, users=users, workers=workers,
                             console=console)
    from lorafleet.serving.launcher import start_server

    ensure_ab_versions(settings, base_model)
    env = {"LORAFLEET_BASE_MODEL": base_model, "HF_HUB_OFFLINE": "1", "LORAFLEET_SERVE_REGISTRY_POLL_S": "0"}
    with start_server(settings, env=env, startup_timeout=900.0) as handle:
        return measure_split(handle.url, AB_NAME, share=share, requests=requests, users=users, workers=workers,
                             console=console)
