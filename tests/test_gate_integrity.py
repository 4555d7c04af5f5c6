"""The promotion gate cannot promote a worse adapter: same rows, metric direction, locks, compare-and-set,
idempotent registration and logging, and retries only of transient errors (issue 13, B1-B5 and A9).

Everything runs against a real MLflow SQLite store in tmp_path; concurrency is real (separate
processes). Adapters are stand-in folders with a valid manifest: the registry only moves folders.
Flow-level checks with the tiny model are in test_gate_integrity_flows.py.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from lorafleet.config import ConfigError, parse_config
from lorafleet.models.adapter_dir import AdapterManifest, BaseModelRef, TaskInfo, write_manifest
from lorafleet.sections.promotion import PromotionSettings
from lorafleet.settings import Settings
from lorafleet.tasks import eval_split, locks, registry
from lorafleet.tasks.eval_split import EvalSplit
from lorafleet.tasks.promotion import gate_and_promote
from lorafleet.tasks.tracking import RunLogger, ensure_experiment, resume_or_start_run, start_run
from lorafleet.tasks.transient import is_transient

pytestmark = pytest.mark.usefixtures("empty_cwd")  # conftest: MLflow must write nothing to ./

NAME = "viggo"
M = "field_f1"
SPLIT_A = EvalSplit(data_fingerprint="a" * 64, rows=8, settings_hash="s" * 16)
SPLIT_B = EvalSplit(data_fingerprint="b" * 64, rows=16, settings_hash="s" * 16)
DEADLINE_S = 180  # for waits on other processes; generous for a loaded 2-core machine, never a measurement


def register(client: MlflowClient, settings: Settings, *, f1: float, split: EvalSplit, base: float = 0.1,
             champion: bool = False) -> str:
    """A version whose adapter scored `f1` (and the base `base`) on `split`, as the finetune flow registers it."""
    run_id = start_run(client, ensure_experiment(client, NAME, settings), run_name="finetune", tags={})
    folder = settings.home / "src" / run_id
    folder.mkdir(parents=True)
    write_manifest(folder, AdapterManifest(
        name=NAME, method="lora", base_model=BaseModelRef(id="tiny-random-llama", revision="r"), tokenizer_hash="t",
        task=TaskInfo(name=NAME, output_format="json"), data_fingerprint=split.data_fingerprint, metrics={M: f1}))
    (folder / "adapter_model.safetensors").write_text("w")
    RunLogger(client, run_id).log_artifacts(folder, "adapter")
    version = str(registry.register_adapter(client, name=NAME, run_id=run_id, tags={
        f"base_metric.{M}": repr(base), eval_split.SPLIT_TAG: split.to_tag()}).version)
    if champion:
        registry.set_champion(client, NAME, version, reason="test setup")
    return version


def champion_version(client: MlflowClient) -> str | None:
    champion = registry.get_champion(client, NAME)
    return None if champion is None else str(champion.version)


def gate(client: MlflowClient, version: str, numbers: eval_split.ChampionNumbersFn, **settings):
    target, promotion = registry.get_version(client, NAME, version), PromotionSettings(metric=M, **settings)
    return gate_and_promote(client, NAME, version, settings=promotion, challenger=registry.version_metrics(target),
                            base=registry.version_metrics(target, prefix="base_metric."),
                            champion_numbers=numbers, provenance={"challenger": "test"},
                            auto_promote=promotion.auto_promote)


def run_python(code: str, *args: str, tmp_path: Path, **popen) -> subprocess.Popen:
    script = tmp_path / f"script-{time.monotonic_ns()}.py"
    script.write_text(code)
    return subprocess.Popen([sys.executable, str(script), *args], text=True, **popen)


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


# --- B2: metrics declare their direction ------------------------------------------------------------------


def test_unknown_promotion_metric_is_a_config_error_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"x.yaml: promotion.metric: .*unknown metric 'latency_p5'.*latency_p50_ms"):
        parse_config({"name": "x", "data": {"preset": "viggo"}, "promotion": {"metric": "latency_p5"}},
                     source="x.yaml")


# --- B1: champion and challenger on the same rows ---------------------------------------------------------


@pytest.mark.parametrize("stored, on_b, challenger, promoted", [
    (0.50, 0.95, 0.80, False),  # the champion's old number is low, but on these rows it is better: hold
    (0.90, 0.70, 0.80, True),   # the champion's old number is high, but on these rows it is worse: promote
])
def test_champion_is_reevaluated_on_the_challengers_rows_once(client, settings, monkeypatch, stored, on_b,
                                                              challenger, promoted) -> None:
    register(client, settings, f1=stored, split=SPLIT_A, champion=True)
    v2 = register(client, settings, f1=challenger, split=SPLIT_B)
    evaluated: list[Path] = []

    def fake_evaluate(config, prepared, adapter_dir, settings_, progress=True):  # the generation, not MLflow
        evaluated.append(Path(adapter_dir))
        return {M: on_b}

    monkeypatch.setattr(eval_split, "evaluate_on_rows", fake_evaluate)
    numbers = eval_split.champion_numbers_on(client, settings, config=None, prepared=None, split=SPLIT_B)
    result = gate(client, v2, numbers, auto_promote=False)
    assert result.decision.promote is promoted and result.decision.reference_value == on_b
    assert not result.promoted and champion_version(client) == "1"
    assert len(evaluated) == 1 and (evaluated[0] / "lorafleet.json").is_file()  # the champion's own folder
    assert "re-evaluated now on the same rows" in result.decision.provenance["champion v1"]
    assert SPLIT_B.key in result.decision.provenance["champion v1"]
    cached = json.loads(registry.get_version(client, NAME, "1").tags[eval_split.CACHE_TAG_PREFIX + SPLIT_B.key])
    assert cached["metrics"] == {M: on_b} and cached["split"]["rows"] == 16

    again = gate(client, v2, numbers)  # a second gate on the same rows reads the cache
    assert len(evaluated) == 1 and "(cached)" in again.decision.provenance["champion v1"]
    assert again.promoted is promoted and champion_version(client) == (v2 if promoted else "1")


def test_champion_measured_on_the_same_rows_is_not_reevaluated(client, settings, monkeypatch) -> None:
    register(client, settings, f1=0.7, split=SPLIT_B, champion=True)
    v2 = register(client, settings, f1=0.6, split=SPLIT_B)
    monkeypatch.setattr(eval_split, "evaluate_on_rows", lambda *a, **k: pytest.fail("re-evaluated"))
    result = gate(client, v2, eval_split.champion_numbers_on(client, settings, None, None, SPLIT_B))
    assert not result.promoted and "recorded at its registration" in result.decision.provenance["champion v1"]


# --- B4: promotion is a compare-and-set under a per-name lock ------------------------------------------------

RACER = """
import json, sys, time
from pathlib import Path
from lorafleet.settings import Settings
from lorafleet.tasks import eval_split, registry, tracking
from lorafleet.sections.promotion import PromotionSettings
from lorafleet.tasks.promotion import gate_and_promote

home, version, other, first = sys.argv[1:5]
barrier = Path(home) / "barrier"
client = tracking.mlflow_client(Settings.for_home(Path(home)))

def wait(path):
    deadline = time.monotonic() + 180
    while not path.exists():
        if time.monotonic() > deadline:
            sys.exit(f"no {path}")
        time.sleep(0.02)

real_move, attempts = registry.move_champion_if, []
def move_once_both_decided(*args, **kwargs):
    # First attempt only: both processes have read the same champion and decided before either moves it,
    # and `first` moves first.
    if not attempts:
        (barrier / f"decided-{version}").touch()
        wait(barrier / f"decided-{other}")
        if version != first:
            wait(barrier / f"done-{first}")
    attempts.append(kwargs["expected"])
    return real_move(*args, **kwargs)
registry.move_champion_if = move_once_both_decided

target = registry.get_version(client, "viggo", version)
split = eval_split.version_split(target)
result = gate_and_promote(client, "viggo", version, settings=PromotionSettings(metric="field_f1"),
                          challenger=registry.version_metrics(target),
                          base=registry.version_metrics(target, prefix="base_metric."),
                          champion_numbers=lambda champion: eval_split.recorded_numbers(champion, split),
                          provenance={})
(barrier / f"done-{version}").touch()
print(json.dumps({"promoted": result.promoted, "attempts": attempts, "reasons": result.decision.reasons}))
"""


@pytest.mark.parametrize("first", ["better", "worse"])
def test_two_concurrent_promotions_end_with_the_better_champion(client, settings, tmp_path, first) -> None:
    register(client, settings, f1=0.70, split=SPLIT_A, champion=True)
    better = register(client, settings, f1=0.95, split=SPLIT_A)
    worse = register(client, settings, f1=0.71, split=SPLIT_A)
    (settings.home / "barrier").mkdir()
    leader = better if first == "better" else worse
    racers = {v: run_python(RACER, str(settings.home), v, other, leader, tmp_path=tmp_path, stdout=subprocess.PIPE)
              for v, other in ((better, worse), (worse, better))}
    results = {}
    for version, process in racers.items():
        out, _ = process.communicate(timeout=DEADLINE_S)
        assert process.returncode == 0, out
        results[version] = json.loads(out.splitlines()[-1])
    assert champion_version(client) == better  # whichever order the two moves were attempted in
    # The second mover's compare-and-set against v1 was refused; it judged again against the new champion:
    # the worse one then holds, the better one moves again (expecting the worse one).
    trailer = worse if first == "better" else better
    assert results[trailer]["attempts"] == (["1"] if first == "better" else ["1", worse])
    assert results[better]["promoted"] and results[worse]["promoted"] is (first == "worse")
    assert registry.champion_history(client, NAME) == (["1", better] if first == "better" else ["1", worse, better])


def _flock_waiter_on(path: Path) -> bool:
    """True when some process is blocked in flock() on `path` (Linux /proc/locks marks waiters with '->')."""
    inode = os.stat(path).st_ino
    return any("->" in line and f":{inode} " in line for line in Path("/proc/locks").read_text().splitlines())


@pytest.mark.parametrize("move", ["promote", "rollback"])
def test_hand_promote_and_rollback_wait_for_the_promotion_lock(client, settings, move) -> None:
    register(client, settings, f1=0.5, split=SPLIT_A, champion=True)
    v2 = register(client, settings, f1=0.6, split=SPLIT_A, champion=True)
    action = {"promote": lambda: registry.promote(client, NAME, "1", reason="by hand"),
              "rollback": lambda: registry.rollback(client, NAME)}[move]
    lock_file = locks.store_lock_dir(client.tracking_uri) / f"promote-{NAME}.lock"
    with locks.promotion_lock(client.tracking_uri, NAME):
        worker = threading.Thread(target=action)
        worker.start()
        wait_for(lambda: _flock_waiter_on(lock_file) or not worker.is_alive(), "the move to block or finish")
        assert worker.is_alive() and champion_version(client) == v2  # nothing moved while the lock was held
    worker.join(DEADLINE_S)
    assert champion_version(client) == "1"


def test_first_version_gate_needs_no_champion_and_moves_with_compare_and_set(client, settings) -> None:
    v1 = register(client, settings, f1=0.5, split=SPLIT_A, base=0.2)
    assert not registry.move_champion_if(client, NAME, v1, expected="7", reason="stale expectation")
    result = gate(client, v1, lambda champion: pytest.fail("no champion to measure"))
    assert result.promoted and champion_version(client) == v1
    rerun = gate(client, v1, lambda champion: pytest.fail("already champion"), margin=0.5)
    assert rerun.promoted and "already the champion" in rerun.decision.reasons[0]


# --- B3: one finetune per name; safe first use of a fresh store ----------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from lorafleet.tasks import locks
with locks.finetune_lock(Path(sys.argv[1]), "copy"):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_finetune_lock_names_a_live_holder_and_takes_over_from_a_dead_one(tmp_path) -> None:
    home = tmp_path / "home"
    holder = run_python(HOLDER, str(home), tmp_path=tmp_path, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "locked"
        expected = f"already running \\(pid {holder.pid} on host {socket.gethostname()}"
        with pytest.raises(locks.AlreadyRunning, match=expected), locks.finetune_lock(home, "copy"):
            pass
        assert locks.finetune_holder(home, "copy").pid == holder.pid
        with locks.finetune_lock(home, "other"):  # other names are independent
            pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # dies holding the lock; its file still names it
        holder.wait()
    assert json.loads(locks.finetune_lock_path(home, "copy").read_text())["pid"] == holder.pid
    assert locks.finetune_holder(home, "copy") is None
    with locks.finetune_lock(home, "copy") as mine:  # a dead holder's lock is taken over
        assert mine.pid == os.getpid()
        assert locks.finetune_holder(home, "copy").pid == os.getpid()
    with pytest.raises(ValueError, match="not valid"), locks.finetune_lock(home, "../escape"):
        pass


FIRST_USE = """
import sys, time
from pathlib import Path
from lorafleet.settings import Settings
from lorafleet.tasks import registry, tracking
home = Path(sys.argv[1])
(home.parent / f"ready-{sys.argv[2]}").touch()
while not (home.parent / "go").exists():
    time.sleep(0.01)
settings = Settings.for_home(home)
client = tracking.mlflow_client(settings)
tracking.ensure_experiment(client, "viggo", settings)
print(len(registry.list_adapters(client)))
"""


def test_concurrent_first_use_of_a_fresh_store_does_not_crash(tmp_path) -> None:
    """Three processes open one fresh home at once: MLflow's unlocked migration made all but one fail."""
    home = tmp_path / "fresh" / "home"
    home.mkdir(parents=True)
    racers = [run_python(FIRST_USE, str(home), str(i), tmp_path=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT) for i in range(3)]
    wait_for(lambda: len(list(home.parent.glob("ready-*"))) == 3, "the processes to import MLflow")
    (home.parent / "go").touch()  # all three open the store at once
    for process in racers:
        out, _ = process.communicate(timeout=DEADLINE_S)
        assert process.returncode == 0, out[-3000:]
        assert out.splitlines()[-1] == "0"


# --- B5: a rerun registers no second version and logs each step once ----------------------------------------


def test_a_run_registers_one_version(client, settings) -> None:
    v1 = register(client, settings, f1=0.5, split=SPLIT_A)
    run_id = registry.get_version(client, NAME, v1).run_id
    again = registry.register_adapter(client, name=NAME, run_id=run_id, tags={})
    assert str(again.version) == v1 and str(registry.version_for_run(client, NAME, run_id).version) == v1
    assert [str(v.version) for v in client.search_model_versions(f"name='{NAME}'")] == [v1]
    assert registry.version_for_run(client, NAME, "0" * 32) is None


def test_resumed_logging_skips_steps_already_logged(client, settings) -> None:
    run_id = start_run(client, ensure_experiment(client, NAME, settings), run_name="r", tags={})
    first = RunLogger(client, run_id)
    for step in range(1, 31):
        first.on_train_step(step, {"train/loss": 1.0})
    first.log_metrics({"train/steps": 30.0})  # the summary, at step 0
    resumed = RunLogger(client, run_id)  # a rerun resumed from the checkpoint at step 20
    for step in range(21, 41):
        resumed.on_train_step(step, {"train/loss": 2.0})
    resumed.log_metrics({"train/steps": 40.0})
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))
    assert history == [(s, 1.0) for s in range(1, 31)] + [(s, 2.0) for s in range(31, 41)]
    assert [m.value for m in client.get_metric_history(run_id, "train/steps")] == [30.0]


def test_a_run_with_another_config_is_not_resumed(client, settings) -> None:
    experiment_id = ensure_experiment(client, NAME, settings)
    params = {"config": {"promotion": {"metric": "field_f1"}}}
    failed = start_run(client, experiment_id, run_name="r", tags={})
    RunLogger(client, failed).log_params(params)
    RunLogger(client, failed).finish("FAILED")
    same = resume_or_start_run(client, experiment_id, run_name="r", resume_run_id=failed, params=params)
    assert same == failed
    RunLogger(client, same).finish("FAILED")
    changed = {"config": {"promotion": {"metric": "rouge_l"}}}
    fresh = resume_or_start_run(client, experiment_id, run_name="r", resume_run_id=failed, params=changed)
    assert fresh != failed
    RunLogger(client, fresh).log_params(changed)  # MLflow would refuse to change the old run's param


# --- A9: only transient errors are retried ------------------------------------------------------------------


def _wrapped(cause: BaseException) -> MlflowException:
    try:
        raise MlflowException("store call failed") from cause
    except MlflowException as error:
        return error


@pytest.mark.parametrize("error, transient", [
    (OSError(errno.ENOSPC, "No space left on device"), False),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), False),
    (OSError(errno.EROFS, "Read-only file system"), False),
    (PermissionError(errno.EACCES, "Permission denied"), False),
    (FileNotFoundError(errno.ENOENT, "No such file"), False),
    (OSError("no errno"), False),
    (ValueError("bad input"), False),
    (ConnectionResetError(errno.ECONNRESET, "reset"), True),
    (OSError(errno.EAGAIN, "try again"), True),
    (TimeoutError(), True),
    (_wrapped(OSError(errno.ENOSPC, "No space left on device")), False),
    (_wrapped(sqlite3.OperationalError("database is locked")), True),
    (_wrapped(ConnectionRefusedError(errno.ECONNREFUSED, "refused")), True),
    (MlflowException("RESOURCE_DOES_NOT_EXIST"), False),
], ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value))
def test_transient_errors(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient
