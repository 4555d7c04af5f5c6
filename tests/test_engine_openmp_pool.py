"""Threads other than the engine's give their OpenMP workers back (see serving/engine/openmp_pool.py).

Why it matters is a speed fact (an idle team on another thread makes libgomp put the engine's
workers to sleep between ops); what is tested here is the mechanism, by counting the OS threads
of this process, which include OpenMP workers that Python cannot list.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from lorafleet.serving.engine.adapter_cache import AdapterCache, LoadedAdapter, ResolvedAdapter
from lorafleet.serving.engine.openmp_pool import release_thread_pool

T = TypeVar("T")
WAIT_S = 30.0


def os_threads() -> int:
    return len(list(Path("/proc/self/task").iterdir()))


def parallel_op() -> None:
    """An op large enough for ATen to open a parallel region (2 OpenMP threads asked for)."""
    torch.set_num_threads(2)  # per calling thread for OpenMP; the global default is restored below
    torch.ones(4_000_000).mul_(2.0)


def on_new_thread(fn: Callable[[], T]) -> T:
    """Run `fn` on a fresh thread (its OpenMP team, if any, ends with it) and return its result."""
    box: dict[str, T] = {}
    previous = torch.get_num_threads()

    def target() -> None:
        try:
            box["value"] = fn()
        finally:
            torch.set_num_threads(previous)

    # One-time threads (allocator, runtime) start here, not inside a measurement. The warm-up frees its
    # OpenMP worker itself, which joins it: a worker left to end with its thread exits asynchronously
    # and could vanish in the middle of the next count.
    warm_up = threading.Thread(target=lambda: (parallel_op(), release_thread_pool()))
    warm_up.start()
    warm_up.join(WAIT_S)
    thread = threading.Thread(target=target)
    thread.start()
    thread.join(WAIT_S)
    return box["value"]


def test_release_frees_the_calling_threads_openmp_workers() -> None:
    def run() -> tuple[int, int, int, bool]:
        before = os_threads()
        parallel_op()
        with_team = os_threads()
        released = release_thread_pool()
        return before, with_team, os_threads(), released

    before, with_team, after, released = on_new_thread(run)
    assert with_team > before, "the parallel op started no OpenMP worker: the test proves nothing"
    assert released
    assert after == before


class ParallelReader:
    """An adapter reader that runs a parallel tensor op, as reading safetensors and heads does."""

    def __init__(self) -> None:
        self.threads_during_read: int | None = None

    def __call__(self, path: Path, shape: object) -> LoadedAdapter:
        parallel_op()
        self.threads_during_read = os_threads()
        return LoadedAdapter(weights=None, heads=object())  # type: ignore[arg-type]


class NoSlots:
    num_slots, max_rank, device = 2, 8, "cpu"


def test_adapter_reader_thread_keeps_no_openmp_team() -> None:
    def run() -> tuple[int, int | None, int]:
        reader = ParallelReader()
        resolved = ResolvedAdapter(name="a", identity="1", path=Path("/adapters/a/1"))
        cache = AdapterCache(NoSlots(), None, lambda name: resolved, reader=reader)  # type: ignore[arg-type]
        try:
            before = os_threads()
            assert cache.request("a") is None
            assert cache.wait_loading(WAIT_S)
            assert cache.install_ready() == ["a"]
            return before, reader.threads_during_read, os_threads()
        finally:
            cache.close()

    before, during, after = on_new_thread(run)
    assert during is not None and during >= before + 2, "reader thread + its OpenMP worker while reading"
    assert after == before + 1, "only the idle reader thread stays; its OpenMP worker was freed"
