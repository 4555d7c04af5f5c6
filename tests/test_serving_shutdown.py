"""Stopping a server stops all of it: BentoML runs each worker in a session of its own, so a signal to
the server's process group never reaches the workers. A replica stopped by a process manager, `docker
stop` or a test must not leave workers behind holding a model's memory (seen: eight orphaned workers,
650 MB each, after test runs whose stop escalated to SIGKILL).

Real `bentoml serve` processes on the tiny random Llama (base model only, no registry). Waits are hang
guards, not timing assertions.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from lorafleet.serving.launcher import free_port, server_env, start_server
from lorafleet.settings import Settings

from serving_helpers import BASE

GUARD_S = 180.0
BASE_ONLY = {"LORAFLEET_BASE_MODEL": BASE, "LORAFLEET_SERVE_LOAD_CHAMPIONS": "false", "HF_HUB_OFFLINE": "1"}


def _workers(root_pid: int) -> list[psutil.Process]:
    """BentoML's worker processes under `root_pid` (they serve the model, in sessions of their own)."""
    return [p for p in psutil.Process(root_pid).children(recursive=True)
            if "_bentoml_impl.worker" in " ".join(p.cmdline())]


def _wait_gone(processes: list[psutil.Process]) -> list[int]:
    """Pids of `processes` still alive after the hang guard (empty when all exited)."""
    _, alive = psutil.wait_procs(processes, timeout=GUARD_S)
    return [p.pid for p in alive]


def test_stop_kills_workers_even_when_the_arbiter_is_killed_first(tmp_path: Path, model_cache: Path):
    settings = Settings.for_home(tmp_path / "home", model_cache_dir=model_cache)
    handle = start_server(settings, env=BASE_ONLY, log_file=tmp_path / "server.log")
    try:
        workers = _workers(handle.process.pid)
        assert workers, "the server started no BentoML worker"
        assert all(os.getpgid(w.pid) != handle.process.pid for w in workers), \
            "precondition: workers live outside the server's process group"
    finally:
        # timeout=0: no grace, the arbiter is SIGKILLed at once and cannot stop its workers itself.
        handle.stop(timeout=0)
    alive = _wait_gone(workers)
    for pid in alive:  # do not leak them into the rest of the run when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived the stopped server"


def test_sigterm_to_lorafleet_serve_stops_the_server_and_its_workers(tmp_path: Path, model_cache: Path):
    """What `docker stop`, systemd and Kubernetes do to `lorafleet serve`: SIGTERM to that one process."""
    settings = Settings.for_home(tmp_path / "home", model_cache_dir=model_cache).ensure()
    port = free_port()
    env = server_env(settings, BASE_ONLY)
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "lorafleet.flows.cli", "serve", "--port", str(port)],
                                   env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + GUARD_S
        while True:
            assert process.poll() is None, f"lorafleet serve exited early:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready within {GUARD_S} s:\n{log_path.read_text()[-3000:]}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        tree = psutil.Process(process.pid).children(recursive=True)
        assert _workers(process.pid), "the server started no BentoML worker"

        process.send_signal(signal.SIGTERM)  # to lorafleet serve alone, not its group
        assert process.wait(GUARD_S) is not None
        alive = _wait_gone(tree)
        assert not alive, f"processes {alive} kept running after lorafleet serve got SIGTERM"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
    finally:
        for proc in [*tree, psutil.Process(process.pid) if process.poll() is None else None]:
            if proc is not None:
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
