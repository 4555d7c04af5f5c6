"""lorafleet against a real MLflow tracking server on PostgreSQL with proxied artifacts (a few minutes).

One private PostgreSQL cluster and one `mlflow server --backend-store-uri postgresql+psycopg2://...
--artifacts-destination ...` serve the whole module (tests/pg_mlflow_helpers.py). Every test uses its
own adapter names and its own LORAFLEET_HOME(s); the processes that train, promote and serve never share
a folder with each other or with the server, so adapters can only travel through the server's proxied
artifact store (`mlflow-artifacts:/`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from lorafleet.flows.cli import app
from lorafleet.settings import Settings
from lorafleet.tasks import registry, tracking

from flow_helpers import copy_task_config, private_home, write_copy_task
from serving_helpers import make_adapter

pytestmark = pytest.mark.usefixtures("prefect_api")  # flows run against one temporary Prefect API

LORAFLEET = [sys.executable, "-m", "lorafleet.flows.cli"]
HANG_GUARD_S = 900.0  # the longest a subprocess or a readiness wait may take before the test calls it hung


# ----- helpers ------------------------------------------------------------------------------------------


def remote_env(home: Path, model_cache: Path, server, **extra: str) -> dict[str, str]:
    """The environment of a lorafleet process on its own "machine": a private home, the shared server."""
    from prefect.settings import PREFECT_API_URL

    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env.update({"LORAFLEET_HOME": str(home), "LORAFLEET_MODEL_CACHE": str(model_cache),
                "MLFLOW_TRACKING_URI": server.url, "PREFECT_HOME": str(home.parent / f"{home.name}-prefect"),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1"})
    api = PREFECT_API_URL.value()  # the module's temporary Prefect API: no subprocess starts its own
    if api:
        env["PREFECT_API_URL"] = api
    env.update(extra)
    return env


@pytest.fixture
def remote_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_cache: Path,
                mlflow_server) -> Settings:
    """This process as a trainer: a private home, MLFLOW_TRACKING_URI = the server."""
    yield from private_home(tmp_path, monkeypatch, model_cache, folder="trainer", tracking_uri=mlflow_server.url)


def aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}


def register_random_adapter(client: MlflowClient, settings: Settings, model_cache: Path, *, name: str,
                            seed: int, champion: bool) -> str:
    """A real (random) tiny LoRA adapter, uploaded and registered the way the pipeline does it."""
    folder = make_adapter(model_cache, settings.home / "src" / f"{name}-{seed}", name=name, seed=seed)
    experiment = tracking.ensure_experiment(client, name, settings)
    run_id = tracking.start_run(client, experiment, run_name=name)
    tracking.RunLogger(client, run_id).log_artifacts(folder, registry.ADAPTER_ARTIFACT_PATH)
    tracking.RunLogger(client, run_id).finish()
    version = str(registry.register_adapter(client, name=name, run_id=run_id, tags={}).version)
    if champion:
        registry.set_champion(client, name, version, reason="fixture")
    return version


def register_manifest_only(client: MlflowClient, settings: Settings, name: str, count: int) -> list[str]:
    """`count` versions whose adapter is just a manifest: enough for registry moves, cheap to make."""
    from lorafleet.models.adapter_dir import AdapterManifest, BaseModelRef, TaskInfo, write_manifest

    experiment = tracking.ensure_experiment(client, name, settings)
    versions = []
    for index in range(count):
        folder = settings.home / "src" / f"{name}-{index}"
        folder.mkdir(parents=True)
        write_manifest(folder, AdapterManifest(name=name, method="lora", tokenizer_hash="t",
                                               base_model=BaseModelRef(id="tiny-random-llama", revision="r"),
                                               task=TaskInfo(name=name)))
        run_id = tracking.start_run(client, experiment, run_name=name)
        tracking.RunLogger(client, run_id).log_artifacts(folder, registry.ADAPTER_ARTIFACT_PATH)
        versions.append(str(registry.register_adapter(client, name=name, run_id=run_id, tags={}).version))
    return versions


def gated_runs(client: MlflowClient, name: str) -> list:
    """The finetune runs of `name` that reached the gate (the fixture runs above have no gate tag)."""
    experiment = client.get_experiment_by_name(f"lorafleet/{name}")
    return [run for run in client.search_runs([experiment.experiment_id]) if "lorafleet.gate" in run.data.tags]


@pytest.fixture
def mlflow_globals():
    """`tracking.mlflow_client` sets MLflow's global URIs (and MLFLOW_TRACKING_URI); undo that afterwards."""
    yield
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def assert_registry_consistent(client: MlflowClient, name: str) -> None:
    """Aliases name existing READY versions; the champion history ends at the champion; a run has one version."""
    model = client.get_registered_model(name)
    versions = {str(v.version): v for v in client.search_model_versions(f"name='{name}'")}
    for alias, number in model.aliases.items():
        assert str(number) in versions and versions[str(number)].status == "READY", (alias, number, versions)
    champion = model.aliases.get("champion")
    if champion is not None:
        history = json.loads(model.tags[registry.HISTORY_TAG])
        assert history[-1] == str(champion), (history, champion)
        assert set(history) <= set(versions), (history, versions)
    runs = [v.run_id for v in versions.values()]
    assert len(runs) == len(set(runs)), f"a run registered twice: {runs}"


def served_version(http: httpx.Client, name: str) -> int | None:
    listing = http.get("/admin/adapters")
    assert listing.status_code == 200, listing.text
    return next((card["version"] for card in listing.json()["served"] if card["name"] == name), None)


def wait_served(http: httpx.Client, name: str, version: int) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while served_version(http, name) != version:
        assert time.monotonic() < deadline, f"{name} v{version} was never served: {http.get('/admin/adapters').text}"
        time.sleep(0.5)


def chat(http: httpx.Client, model: str) -> dict:
    response = http.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": "Ana is 44 and lives in Oslo."}],
        "temperature": 0, "max_tokens": 8})
    assert response.status_code == 200, response.text
    return response.json()


def server_artifact_files(server, run_id: str) -> set[str]:
    return {path.name for path in server.artifacts_dir.glob(f"*/{run_id}/artifacts/adapter/*")}


# ----- the pipeline, the CLI and the service on the server -------------------------------------------------


def test_finetune_promote_rollback_and_serve_through_the_tracking_server(remote_home, mlflow_server, tmp_path,
                                                                         model_cache):
    from lorafleet.flows.finetune import finetune
    from lorafleet.serving.launcher import start_server

    data = write_copy_task(tmp_path / "copy.jsonl")
    first = finetune(config=copy_task_config(data, name="pg-copy"))
    assert first["promoted"], first["gate_reasons"]

    client = MlflowClient(mlflow_server.url)
    experiment = client.get_experiment_by_name("lorafleet/pg-copy")
    assert experiment.artifact_location.startswith("mlflow-artifacts:/"), experiment.artifact_location
    run = client.get_run(first["run_id"])
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/") and run.info.status == "FINISHED"
    assert run.data.tags["lorafleet.gate"] == "promoted" and run.data.tags["lorafleet.registered_version"] == "1"
    # The adapter went through the server into its --artifacts-destination; the trainer keeps no artifact folder.
    assert {"lorafleet.json", "adapter_model.safetensors"} <= server_artifact_files(mlflow_server, first["run_id"])
    assert not remote_home.mlflow_artifacts_dir.exists()
    assert aliases(client, "pg-copy") == {"champion": "1", "challenger": "1"}

    second = finetune(config=copy_task_config(data, name="pg-copy", learning_rate=1e-9, steps=20))
    assert second["version"] == "2" and not second["promoted"], second["gate_reasons"]
    assert client.get_run(second["run_id"]).data.tags["lorafleet.gate"] == "held"
    assert aliases(client, "pg-copy") == {"champion": "1", "challenger": "2"}

    runner = CliRunner()
    listed = runner.invoke(app, ["models", "--json"])
    assert listed.exit_code == 0, listed.output
    row = next(row for row in json.loads(listed.output) if row["name"] == "pg-copy")
    assert (row["champion"], row["challenger"]) == ("1", "2")
    assert [v["version"] for v in row["versions"]] == ["2", "1"]

    # The service runs as another machine would: its own home, only the server's URL in common.
    serving = Settings.from_env({"LORAFLEET_HOME": str(tmp_path / "server-home"),
                                 "MLFLOW_TRACKING_URI": mlflow_server.url,
                                 "LORAFLEET_MODEL_CACHE": str(model_cache)})
    with start_server(serving, env={"LORAFLEET_SERVE_REGISTRY_POLL_S": "1", "HF_HUB_OFFLINE": "1"},
                      startup_timeout=HANG_GUARD_S) as handle, httpx.Client(base_url=handle.url, timeout=120) as http:
        assert served_version(http, "pg-copy") == 1
        assert chat(http, "pg-copy")["model"].startswith("pg-copy")

        promoted = runner.invoke(app, ["promote", "pg-copy", "2"])
        assert promoted.exit_code == 0, promoted.output
        wait_served(http, "pg-copy", 2)  # hot reload: the poller saw the alias move on the server
        chat(http, "pg-copy")

        rolled = runner.invoke(app, ["rollback", "pg-copy"])
        assert rolled.exit_code == 0 and "from version 2 to version 1" in rolled.output, rolled.output
        wait_served(http, "pg-copy", 1)
        chat(http, "pg-copy")
    downloaded = serving.adapter_download_dir / "pg-copy"
    assert (downloaded / "v1" / "lorafleet.json").is_file() and (downloaded / "v2" / "lorafleet.json").is_file()
    assert not serving.mlflow_artifacts_dir.exists()
    assert_registry_consistent(client, "pg-copy")


# ----- concurrent writers -------------------------------------------------------------------------------

# A third writer, in its own process: once the finetune of `pg-a` has registered its version (the gate is
# about to judge or move `champion`), it promotes v2 by hand, racing the gate for the same alias.
PROMOTER = """
import sys, time
from mlflow import MlflowClient
from lorafleet.tasks import registry
client = MlflowClient(sys.argv[1], registry_uri=sys.argv[1])
deadline = time.monotonic() + float(sys.argv[2])
while client.get_registered_model("pg-a").aliases.get("challenger") in ("2", 2):
    if time.monotonic() > deadline:
        sys.exit("pg-a was never registered by the finetune")
    time.sleep(0.05)
registry.promote(client, "pg-a", "2", reason="promoted by hand while a finetune gates")
print("promoted v2 by hand")
"""


def test_two_finetunes_and_a_promotion_at_once_leave_the_registry_consistent(remote_home, mlflow_server, tmp_path,
                                                                             model_cache):
    client = tracking.mlflow_client(remote_home.ensure())
    # pg-a already has a champion (v1) and a challenger (v2): real adapters the gate must download from the
    # server and re-evaluate on the new run's rows.
    assert register_random_adapter(client, remote_home, model_cache, name="pg-a", seed=1, champion=True) == "1"
    assert register_random_adapter(client, remote_home, model_cache, name="pg-a", seed=2, champion=False) == "2"
    configs = {}
    for name in ("pg-a", "pg-b"):
        data = write_copy_task(tmp_path / f"{name}.jsonl", seed=len(name) + ord(name[-1]))
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(copy_task_config(data, name=name, steps=30)))

    logs = {name: tmp_path / f"{name}.log" for name in ("pg-a", "pg-b", "promoter")}
    processes = {}
    try:
        for name in ("pg-a", "pg-b"):  # two "machines": two homes, one tracking server
            env = remote_env(tmp_path / f"home-{name}", model_cache, mlflow_server)
            with logs[name].open("wb") as log:
                processes[name] = subprocess.Popen(LORAFLEET + ["finetune", str(configs[name])], env=env,
                                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        env = remote_env(tmp_path / "home-promoter", model_cache, mlflow_server)
        with logs["promoter"].open("wb") as log:
            processes["promoter"] = subprocess.Popen(
                [sys.executable, "-c", PROMOTER, mlflow_server.url, str(HANG_GUARD_S)], env=env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        for name, process in processes.items():
            code = process.wait(HANG_GUARD_S)
            assert code == 0, f"{name} exited {code}:\n{logs[name].read_text(errors='replace')[-4000:]}"
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, 9)
                process.wait()

    for name in ("pg-a", "pg-b"):
        assert_registry_consistent(client, name)
        runs = gated_runs(client, name)
        assert len(runs) == 1, f"{name}: one finetune run, gated once"
        run = runs[0]
        assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:/")
        registered = client.search_model_versions(f"run_id='{run.info.run_id}'")
        assert [(v.name, str(v.version)) for v in registered] == [(name, run.data.tags["lorafleet.registered_version"])]
        assert run.data.tags["lorafleet.gate"] in ("promoted", "held")
        assert "gate.md" in {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "evaluation")}
    # pg-a's champion is v2 (the hand promotion came last, or the gate held v3) or v3 (the gate judged v3
    # against v2 after the hand promotion, and won): never a version that was not decided on.
    run_a = gated_runs(client, "pg-a")[0]
    champion, history = aliases(client, "pg-a")["champion"], registry.champion_history(client, "pg-a")
    assert champion in ("2", "3") and "2" in history, (champion, history)
    assert (champion == "3") <= (run_a.data.tags["lorafleet.gate"] == "promoted")
    assert aliases(client, "pg-a")["challenger"] == "3"
    assert aliases(client, "pg-b").get("challenger") == "1"


# ----- a writer on another machine, which does not share this machine's promotion lock -----------------------


class AnotherHostWritesToo:
    """This machine's client, plus a second real client on the same server that moves `champion` to
    `to_version` right after our next alias write: a promotion on another host, which takes no lock here."""

    def __init__(self, client: MlflowClient, other: MlflowClient, to_version: str) -> None:
        self._client, self._other, self._to, self._pending = client, other, to_version, True

    def __getattr__(self, attribute: str):
        return getattr(self._client, attribute)

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        self._client.set_registered_model_alias(name, alias, version)
        if alias == registry.CHAMPION and self._pending:
            self._pending = False
            self._other.set_registered_model_alias(name, alias, self._to)


def test_a_champion_move_overtaken_by_another_host_is_reported_not_recorded(remote_home, mlflow_server):
    client = tracking.mlflow_client(remote_home.ensure())
    assert register_manifest_only(client, remote_home, "pg-race", 3) == ["1", "2", "3"]
    registry.set_champion(client, "pg-race", "1", reason="start")
    other = MlflowClient(mlflow_server.url, registry_uri=mlflow_server.url)

    racing = AnotherHostWritesToo(client, other, "3")
    assert not registry.move_champion_if(racing, "pg-race", "2", expected="1", reason="gate"), \
        "a compare-and-set that another host overtook must not count as won"
    assert aliases(client, "pg-race")["champion"] == "3"
    assert registry.champion_history(client, "pg-race") == ["1"], "our lost move is not in the history"

    with pytest.raises(registry.ChampionMovedElsewhere, match="another"):
        registry.promote(AnotherHostWritesToo(client, other, "1"), "pg-race", "2", reason="by hand")
    assert aliases(client, "pg-race")["champion"] == "1"
    # Without interference the same calls work, and the history ends at the champion.
    assert registry.move_champion_if(client, "pg-race", "2", expected="1", reason="gate")
    assert_registry_consistent(client, "pg-race")


# ----- MLFLOW_TRACKING_URI=postgresql://... (no server) ----------------------------------------------------


OPEN_STORE = """
import sys
from lorafleet.mlflow_store import store_client
store_client(sys.argv[1]).search_experiments(max_results=1)
print("opened")
"""


def test_a_bare_postgresql_uri_without_its_driver_is_one_error_line(postgres_cluster, tmp_path, model_cache,
                                                                    monkeypatch, mlflow_globals):
    import importlib.util

    postgres_cluster.createdb("lf_bare")
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LORAFLEET_MODEL_CACHE", str(model_cache))
    monkeypatch.chdir(tmp_path)
    # A bare postgresql:// means psycopg (3) to SQLAlchemy 2.1; psycopg2 is what `lorafleet[scale]` installs.
    bare = postgres_cluster.url("lf_bare", driver="postgresql").replace("postgres@", "postgres:s3cret@")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", bare)
    result = CliRunner().invoke(app, ["models"])
    if importlib.util.find_spec("psycopg") is not None:
        assert result.exit_code == 0, result.output  # the driver is there: the URI simply works
        return
    assert result.exit_code == 2, result.output
    assert "MLFLOW_TRACKING_URI=" in result.output and "postgresql+psycopg2://" in result.output
    assert "s3cret" not in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "home").exists(), "nothing is created for an unusable tracking URI"


def test_a_postgresql_database_without_a_server_is_migrated_once_and_used(postgres_cluster, tmp_path, model_cache,
                                                                          monkeypatch, mlflow_globals):
    uri = postgres_cluster.createdb("lf_direct")
    # The first users of an empty database migrate it one at a time: started together, every process
    # opens it (MLflow alone migrates without a lock, and all but one crash on each other's tables).
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    openers = [subprocess.Popen([sys.executable, "-c", OPEN_STORE, uri], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outputs = [opener.communicate(timeout=HANG_GUARD_S)[0] for opener in openers]
    assert [opener.returncode for opener in openers] == [0, 0, 0], "\n".join(out[-2000:] for out in outputs)

    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LORAFLEET_MODEL_CACHE", str(model_cache))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_env().ensure()
    client = tracking.mlflow_client(settings)
    assert register_manifest_only(client, settings, "pg-direct", 2) == ["1", "2"]
    runner = CliRunner()
    assert runner.invoke(app, ["promote", "pg-direct", "2"]).exit_code == 0
    listed = runner.invoke(app, ["models", "--json"])
    assert listed.exit_code == 0 and json.loads(listed.output)[0]["champion"] == "2", listed.output
    # No server to proxy artifacts: they stay in this home's artifact folder, not in ./mlruns.
    assert list(settings.mlflow_artifacts_dir.glob("pg-direct/*/artifacts/adapter/lorafleet.json"))


def test_remote_tracking_uses_no_local_artifact_folder_and_errors_hide_passwords(tmp_path):
    remote = Settings.from_env({"LORAFLEET_HOME": str(tmp_path / "remote"),
                                "MLFLOW_TRACKING_URI": "http://mlflow.example:5000"}).ensure()
    assert not remote.tracks_locally and not remote.mlflow_artifacts_dir.exists()
    assert remote.adapter_download_dir.is_dir()
    local = Settings.for_home(tmp_path / "local").ensure()
    assert local.mlflow_artifacts_dir.is_dir()

    from lorafleet.settings import SettingsError

    with pytest.raises(SettingsError, match=r"postgresql\+nodriver://me:\*\*\*@db/x") as error:
        Settings.from_env({"LORAFLEET_HOME": str(tmp_path / "bad"),
                           "MLFLOW_TRACKING_URI": "postgresql+nodriver://me:hunter2@db/x"}).ensure()
    assert "hunter2" not in str(error.value)
    assert not (tmp_path / "bad").exists(), "nothing is created for an unusable tracking URI"
    # One server, one set of promotion locks on this machine, however its URL is written.
    from lorafleet.mlflow_store import store_lock_dir

    assert store_lock_dir("http://127.0.0.1:5000/") == store_lock_dir("http://127.0.0.1:5000")
