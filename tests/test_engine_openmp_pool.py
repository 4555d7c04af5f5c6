"""Threads other than the engine's give their OpenMP workers back (see serving/engine/openmp_pool.py).

Why it matters is a speed fact (an idle team on another thread makes libgomp put the engine's
workers to sleep between ops); what is tested here is the mechanism, by watching the OS threads of
a process (/proc/self/task), which include OpenMP workers that Python cannot list.

The outcome must not depend on machine load, so each check runs in a fresh interpreter
(`python tests/test_engine_openmp_pool.py PROBE`) and follows thread ids, not thread counts:
- in the pytest process, threads of earlier tests (servers, engines and their OpenMP workers) start
  and end on their own schedule, and a count taken around a parallel op sees them; a child process
  holds only the threads this file starts;
- a Python thread's OS thread outlives `join()` for a moment, longer on a busy machine, so a thread
  that ends while we measure would cancel out a new worker in a count; a set of ids does not;
- the team size is forced (OMP_DYNAMIC=false, 2 threads asked for, no thread limit), so libgomp must
  start a worker whatever the load: with dynamic adjustment on, it may grant fewer threads than
  asked for when the CPUs are busy, and then there is nothing to release.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")
WAIT_S = 120.0  # a hang guard only: nothing here is timed
TASKS = Path("/proc/self/task")


def os_threads() -> set[int]:
    """Ids of this process's OS threads, OpenMP workers included."""
    return {int(entry.name) for entry in TASKS.iterdir()}


def parallel_op() -> None:
    """An op large enough for ATen to open a parallel region (2 OpenMP threads asked for)."""
    import torch

    torch.set_num_threads(2)  # per calling thread for OpenMP; the global default is restored below
    torch.ones(4_000_000).mul_(2.0)


def on_new_thread(fn: Callable[[], T]) -> T:
    """Run `fn` on a fresh thread (so it starts without an OpenMP team) and return its result."""
    import torch

    from lorafleet.serving.engine.openmp_pool import release_thread_pool

    box: dict[str, T] = {}
    previous = torch.get_num_threads()

    def target() -> None:
        try:
            box["value"] = fn()
        finally:
            torch.set_num_threads(previous)

    # One-time threads (allocator, runtime) start here, not inside a measurement. The warm-up frees
    # its OpenMP worker itself, which joins it, so no worker of it is left to exit asynchronously.
    warm_up = threading.Thread(target=lambda: (parallel_op(), release_thread_pool()))
    warm_up.start()
    warm_up.join(WAIT_S)
    thread = threading.Thread(target=target)
    thread.start()
    thread.join(WAIT_S)
    return box["value"]


# ----- probes: run in the child process, print one JSON object -----------------------------------


def missing_precondition() -> str | None:
    """Why the mechanism cannot be observed in this process, or None when it can."""
    import torch

    from lorafleet.serving.engine.openmp_pool import _runtime

    if not TASKS.is_dir():
        return "no /proc/self/task (not Linux): OpenMP worker threads cannot be observed"
    if "OpenMP" not in torch.__config__.parallel_info():
        return "this torch build does not run its parallel regions on OpenMP"
    if _runtime() is None:
        return "the process's OpenMP runtime has no omp_pause_resource_all (OpenMP 5.0)"
    return None


def probe_release() -> dict[str, Any]:
    from lorafleet.serving.engine.openmp_pool import release_thread_pool

    def run() -> dict[str, Any]:
        before = os_threads()
        parallel_op()
        workers = os_threads() - before
        released = release_thread_pool()
        return {"workers": sorted(workers), "released": released, "left": sorted(os_threads() - before)}

    return on_new_thread(run)


class ParallelReader:
    """An adapter reader that runs a parallel tensor op, as reading safetensors and heads does."""

    def __init__(self) -> None:
        self.reader_thread: int | None = None
        self.threads_during_read: set[int] = set()

    def __call__(self, path: Path, shape: object) -> Any:
        from lorafleet.serving.engine.adapter_cache import LoadedAdapter

        self.reader_thread = threading.get_native_id()
        parallel_op()
        self.threads_during_read = os_threads()
        return LoadedAdapter(weights=None, heads=object())  # type: ignore[arg-type]


class NoSlots:
    num_slots, max_rank, device = 2, 8, "cpu"


def probe_reader() -> dict[str, Any]:
    from lorafleet.serving.engine.adapter_cache import AdapterCache, ResolvedAdapter

    def run() -> dict[str, Any]:
        reader = ParallelReader()
        resolved = ResolvedAdapter(name="a", identity="1", path=Path("/adapters/a/1"))
        cache = AdapterCache(NoSlots(), None, lambda name: resolved, reader=reader)  # type: ignore[arg-type]
        try:
            before = os_threads()
            assert cache.request("a") is None
            assert cache.wait_loading(WAIT_S)
            installed = cache.install_ready()
            new_after = os_threads() - before
        finally:
            cache.close()
        workers = reader.threads_during_read - before - {reader.reader_thread}
        return {"installed": installed, "reader_thread": reader.reader_thread, "workers": sorted(workers),
                "left": sorted(new_after)}

    return on_new_thread(run)


PROBES: dict[str, Callable[[], dict[str, Any]]] = {"release": probe_release, "reader": probe_reader}


def run_probe(name: str) -> dict[str, Any]:
    """Run one probe in a fresh interpreter with the OpenMP team size forced; skip if it cannot be seen."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("OMP_", "GOMP_", "KMP_", "MKL_"))}  # libgomp's defaults, then ours:
    env.update(OMP_DYNAMIC="false", OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    result = subprocess.run([sys.executable, __file__, name], env=env, capture_output=True, text=True,
                            timeout=WAIT_S * 3, check=False)
    assert result.returncode == 0, f"probe {name} failed:\n{result.stdout}\n{result.stderr}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if report.get("skip"):
        pytest.skip(report["skip"])
    return report


def test_release_frees_the_calling_threads_openmp_workers() -> None:
    report = run_probe("release")
    assert report["workers"], "the parallel op started no OpenMP worker despite a forced team of 2"
    assert report["released"]
    assert report["left"] == [], "the calling thread's OpenMP workers are still running"


def test_adapter_reader_thread_keeps_no_openmp_team() -> None:
    report = run_probe("reader")
    assert report["installed"] == ["a"]
    assert report["workers"], "the reader's parallel op started no OpenMP worker despite a forced team of 2"
    assert report["left"] == [report["reader_thread"]], "only the idle reader thread stays, not its workers"


def main(name: str) -> None:
    """The child process: print the probe's report (or why it cannot run) as one JSON line."""
    reason = missing_precondition()
    print(json.dumps({"skip": reason} if reason else PROBES[name]()))


if __name__ == "__main__":
    main(sys.argv[1])
