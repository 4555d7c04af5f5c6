"""Parallel fine-tunes on a real Prefect server with a real process worker, bounded by a global limit.

The repo's prefect.yaml deploys `finetune-demo` and `nightly-retrain` to a private `prefect server`;
a `prefect worker --type process` runs them. The retrain fans two adapters out as finetune flow runs;
each finetune holds one slot of the `gpu` global concurrency limit while it works. From the task runs'
start/end times read back from the Prefect API: with a limit of 1 the two fine-tunes' working intervals
do not intersect, with 2 they do. Both adapters are registered and gated in the shared MLflow store.

Also here, on the same server: the device claim and the limit that is created when missing.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient

from lorafleet.tasks import device_slots
from lorafleet.tasks.device_slots import SlotSettings, SlotSettingsError

from flow_helpers import copy_task_config, prefect_env, stop_process_group, write_copy_task

ROOT = Path(__file__).resolve().parent.parent
POOL = "lorafleet-process"  # prefect.yaml's process pool
LIMIT = "gpu"
FINETUNE = "finetune/finetune-demo"
RETRAIN = "retrain/nightly-retrain"
RUN_TIMEOUT_S = 1800  # a busy 2-core machine: generous, never asserted on


@dataclass(frozen=True)
class Fleet:
    api_url: str
    home: Path
    root: Path
    worker_log: Path


def _prefect_cli() -> str:
    return str(Path(sys.executable).with_name("prefect"))


def _run_cli(args: list[str], env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run([_prefect_cli(), *args], check=False, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def fleet(prefect_server, tmp_path_factory, model_cache):
    """The repo's deployments on the private server, and a process worker polling their pool."""
    api_url, prefect_home = prefect_server
    root = tmp_path_factory.mktemp("fleet")
    env = prefect_env(
        api_url, prefect_home,
        LORAFLEET_HOME=str(root / "home"), LORAFLEET_MODEL_CACHE=str(model_cache),
        LORAFLEET_DEVICES="cpu", LORAFLEET_DEVICE_LOCKS=str(root / "device-locks"),
        LORAFLEET_CONCURRENCY_LIMIT=LIMIT, LORAFLEET_REPO=str(ROOT),
        PREFECT_WORKER_QUERY_SECONDS="2", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
        HF_EVALUATE_OFFLINE="1", TOKENIZERS_PARALLELISM="false", MLFLOW_ENABLE_ASYNC_LOGGING="false")
    _run_cli(["work-pool", "create", POOL, "--type", "process"], env, root)
    _run_cli(["--no-prompt", "deploy", "--name", "finetune-demo", "--name", "nightly-retrain"], env, ROOT)
    worker_log = root / "worker.log"
    with open(worker_log, "wb") as log:
        worker = subprocess.Popen([_prefect_cli(), "worker", "start", "--pool", POOL, "--type", "process"],
                                  env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield Fleet(api_url=api_url, home=root / "home", root=root, worker_log=worker_log)
    finally:
        stop_process_group(worker)


@pytest.fixture
def api(prefect_server):
    """This test process's Prefect client talks to the private server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server[0]}):
        yield prefect_server[0]


def _retrain_config(folder: Path, names: list[str]) -> Path:
    specs = []
    for seed, name in enumerate(names):
        data = write_copy_task(folder / f"{name}.jsonl", n=80, seed=seed)
        specs.append(copy_task_config(data, name=name, steps=12,
                                      evaluation={"max_examples": 8, "max_new_tokens": 40, "batch_size": 8,
                                                  "speed_prompts": 1, "speed_max_new_tokens": 4}))
    path = folder / "retrain.yaml"
    path.write_text(yaml.safe_dump({"adapters": specs}))
    return path


def _working_interval(client: Any, flow_run_id: Any) -> tuple[datetime, datetime]:
    """From the first task's start to the last task's end: the span the finetune held its slot."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    timed = [run for run in runs if run.start_time is not None and run.end_time is not None]
    assert len(timed) >= 4, [(run.name, run.state_name) for run in runs]  # train, evaluate, register, gate
    return min(run.start_time for run in timed), max(run.end_time for run in timed)


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


@pytest.mark.parametrize("limit", [1, 2])
def test_gpu_limit_decides_whether_two_finetunes_overlap(fleet, api, tmp_path, limit):
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterName,
    )
    from prefect.deployments import run_deployment

    names = [f"par{limit}-a", f"par{limit}-b"]
    config = _retrain_config(tmp_path, names)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(LIMIT, limit)

    retrain = run_deployment(RETRAIN, parameters={"config": str(config), "force": False,
                                                  "finetune_deployment": FINETUNE},
                             timeout=RUN_TIMEOUT_S, poll_interval=3)
    assert retrain.state is not None and retrain.state.is_completed(), (
        f"retrain ended {retrain.state!r}\n--- worker log ---\n{_tail(fleet.worker_log)}")

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=[f"finetune-{name}" for name in names])))
        assert sorted(run.name for run in children) == sorted(f"finetune-{name}" for name in names)
        assert all(run.state.is_completed() for run in children), [(run.name, run.state) for run in children]
        assert all(run.parent_task_run_id is not None for run in children)  # subflows of the retrain
        (a_start, a_end), (b_start, b_end) = (_working_interval(client, run.id) for run in children)
        summary = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["retrain-summary"])),
                                        flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[retrain.name])))
    if limit == 1:
        assert a_end <= b_start or b_end <= a_start, f"limit 1 but the fine-tunes overlapped: {a_start}–{a_end}, " \
                                                     f"{b_start}–{b_end}"
    else:
        assert a_start < b_end and b_start < a_end, f"limit 2 but the fine-tunes ran one after the other: " \
                                                    f"{a_start}–{a_end}, {b_start}–{b_end}"

    # Both registered and gated in the shared store; the gate's decision and the aliases agree.
    mlflow = MlflowClient(tracking_uri=f"sqlite:///{fleet.home / 'mlflow.db'}",
                          registry_uri=f"sqlite:///{fleet.home / 'mlflow.db'}")
    assert len(summary) == 1, summary
    rows = {row["name"]: row for row in yaml.safe_load(summary[0].data)}
    for name in names:
        versions = mlflow.search_model_versions(f"name='{name}'")
        assert [str(v.version) for v in versions] == ["1"], name
        run = mlflow.get_run(versions[0].run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["config.device"] == "cpu"  # the device its slot claimed ("auto" in the config)
        gate = run.data.tags["lorafleet.gate"]
        assert gate in ("promoted", "held")
        aliases = {alias: str(v) for alias, v in mlflow.get_registered_model(name).aliases.items()}
        assert aliases.get("challenger") == "1"
        assert (aliases.get("champion") == "1") == (gate == "promoted"), (name, gate, aliases)
        # the retrain read each outcome back from the registry, not from the other process's memory
        assert rows[name]["action"] == "retrained" and rows[name]["version"] == "1"
        assert rows[name]["promoted"] == str(gate == "promoted")


def test_a_missing_finetune_deployment_is_named_before_anything_trains(api, home, tmp_path):
    from lorafleet.flows.retrain import retrain

    config = _retrain_config(tmp_path, ["solo"])
    with pytest.raises(ValueError, match="finetune_deployment 'finetune/nowhere': no such deployment"):
        retrain(config=str(config), finetune_deployment="finetune/nowhere")
    assert MlflowClient(tracking_uri=home.tracking_uri, registry_uri=home.tracking_uri).search_registered_models() == []
    assert not home.adapters_dir.exists() or list(home.adapters_dir.iterdir()) == []


# ----- the device claim and the limit, on the same server -----------------------------------------


def test_slot_settings_come_from_the_environment_with_named_errors(tmp_path):
    slots = SlotSettings.from_env({"LORAFLEET_DEVICES": "cuda:0, cuda:1", "LORAFLEET_CONCURRENCY_LIMIT": "gpus",
                                   "LORAFLEET_DEVICE_LOCKS": str(tmp_path)})
    assert slots == SlotSettings(limit_name="gpus", devices=("cuda:0", "cuda:1"), lock_dir=tmp_path)
    assert slots.default_limit == 2
    assert SlotSettings.from_env({"LORAFLEET_CONCURRENCY_LIMIT": "none"}).limit_name is None
    assert SlotSettings.from_env({}).limit_name == device_slots.DEFAULT_LIMIT_NAME
    assert SlotSettings.from_env({}).devices == device_slots.detect_devices()  # no GPU here: ("cpu",)
    with pytest.raises(SlotSettingsError, match="LORAFLEET_DEVICES: 'gpu0'"):
        SlotSettings.from_env({"LORAFLEET_DEVICES": "cuda:0,gpu0"})
    with pytest.raises(SlotSettingsError, match="twice"):
        SlotSettings.from_env({"LORAFLEET_DEVICES": "cuda:0,cuda:0"})
    with pytest.raises(SlotSettingsError, match="LORAFLEET_CONCURRENCY_LIMIT"):
        SlotSettings.from_env({"LORAFLEET_CONCURRENCY_LIMIT": "gpu slots"})


def test_each_holder_on_one_machine_gets_its_own_gpu_and_shares_the_cpu(tmp_path):
    slots = SlotSettings(limit_name=None, devices=("cuda:0", "cuda:1"), lock_dir=tmp_path)
    with device_slots.claim_device(slots) as first, device_slots.claim_device(slots) as second:
        assert {first, second} == {"cuda:0", "cuda:1"}
    with device_slots.claim_device(slots) as again:
        assert again == "cuda:0"  # released on exit
    cpu = SlotSettings(limit_name=None, devices=("cpu",), lock_dir=tmp_path)
    with device_slots.claim_device(cpu) as one, device_slots.claim_device(cpu) as two:
        assert one == two == "cpu"
    mixed = SlotSettings(limit_name=None, devices=("cuda:0", "cpu"), lock_dir=tmp_path)
    with device_slots.claim_device(mixed) as gpu, device_slots.claim_device(mixed) as spill:
        assert (gpu, spill) == ("cuda:0", "cpu")


def test_a_claim_waits_while_its_gpu_is_held(tmp_path, monkeypatch):
    monkeypatch.setattr(device_slots, "_POLL_S", 0.05)
    slots = SlotSettings(limit_name=None, devices=("cuda:0",), lock_dir=tmp_path)
    events: list[str] = []
    claimed = threading.Event()

    def second() -> None:
        with device_slots.claim_device(slots) as device:
            events.append(f"second got {device}")
        claimed.set()

    with device_slots.claim_device(slots):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)  # give it every chance to take the held device (it must not)
        events.append("first released")
    assert claimed.wait(30)
    thread.join()
    assert events == ["first released", "second got cuda:0"]


def test_a_run_on_several_processes_claims_that_many_gpus_together(tmp_path, monkeypatch):
    monkeypatch.setattr(device_slots, "_POLL_S", 0.05)
    slots = SlotSettings(limit_name=None, devices=("cuda:0", "cuda:1", "cuda:2"), lock_dir=tmp_path)
    events: list[str] = []
    claimed = threading.Event()

    def second_pair() -> None:
        with device_slots.device_slot(slots, count=2) as pair:
            events.append(f"second pair got {','.join(pair)}")
        claimed.set()

    with device_slots.device_slot(slots, count=2) as pair:
        assert pair == ("cuda:0", "cuda:1")
        thread = threading.Thread(target=second_pair)
        thread.start()
        time.sleep(0.3)  # it finds one free device, not two: it must wait, holding nothing
        with device_slots.claim_device(slots) as single:
            assert single == "cuda:2"
            events.append("single got cuda:2")
        events.append("first pair released")
    assert claimed.wait(30)
    thread.join()
    assert events == ["single got cuda:2", "first pair released", "second pair got cuda:0,cuda:1"]
    cpu = SlotSettings(limit_name=None, devices=("cpu",), lock_dir=tmp_path)
    with device_slots.device_slot(cpu, count=2) as shared:
        assert shared == ("cpu",)  # CPU ranks share the one device
    with pytest.raises(SlotSettingsError, match=r"num_processes is 4, but device 'auto' gives 3 exclusive"), \
            device_slots.device_slot(slots, count=4):
        pass


def test_a_run_on_several_gpus_holds_one_slot_per_gpu(api, tmp_path):
    import logging

    from prefect import get_client

    def active() -> int:
        with get_client(sync_client=True) as client:
            return client.read_global_concurrency_limit_by_name("pair-limit").active_slots

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name("pair-limit", 2)
    log = logging.getLogger("test")
    gpus = SlotSettings(limit_name="pair-limit", devices=("cuda:0", "cuda:1", "cuda:2"), lock_dir=tmp_path)
    with device_slots.device_slot(gpus, log=log, count=2) as devices:
        assert devices == ("cuda:0", "cuda:1") and active() == 2
    cpu = SlotSettings(limit_name="pair-limit", devices=("cpu",), lock_dir=tmp_path)
    with device_slots.device_slot(cpu, log=log, count=2) as devices:
        assert devices == ("cpu",) and active() == 1
    assert active() == 0
    with pytest.raises(SlotSettingsError, match=r"needs 3 slots of concurrency limit 'pair-limit', which has 2"), \
            device_slots.device_slot(gpus, log=log, count=3):
        pass
    assert active() == 0


def test_the_ranks_see_only_the_devices_claimed_for_them():
    from lorafleet.tasks.distributed import launch_environment

    assert launch_environment(("cuda:2", "cuda:5"), {"PATH": "/bin"})["CUDA_VISIBLE_DEVICES"] == "2,5"
    # an already narrowed machine: cuda:N is the N-th visible device
    assert launch_environment(("cuda:0", "cuda:2"), {"CUDA_VISIBLE_DEVICES": "4,5,6"})["CUDA_VISIBLE_DEVICES"] == "4,6"
    assert "CUDA_VISIBLE_DEVICES" not in launch_environment(("cpu",), {})


def test_without_a_server_the_global_limit_is_left_alone(monkeypatch, tmp_path):
    """The ephemeral API keeps leases in memory: a killed holder would leak its slot for good."""
    import logging

    from prefect.settings import PREFECT_API_URL, temporary_settings

    def refuse(*args: Any, **kwargs: Any) -> int:
        raise AssertionError("the global limit was used without a Prefect server")

    monkeypatch.setattr(device_slots, "ensure_limit", refuse)
    slots = SlotSettings(limit_name="gpu", devices=("cuda:0",), lock_dir=tmp_path)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert not PREFECT_API_URL.value()
        with device_slots.device_slot(slots, log=logging.getLogger("test")) as devices:
            assert devices == ("cuda:0",)


def test_a_missing_limit_is_created_for_this_machine_and_an_existing_one_is_kept(api):
    from prefect import get_client

    assert device_slots.ensure_limit("fresh-limit", 3) == 3
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("fresh-limit").limit == 3
        client.upsert_global_concurrency_limit_by_name("sized-limit", 5)
    assert device_slots.ensure_limit("sized-limit", 1) == 5  # an operator's size is never changed
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("sized-limit").limit == 5
