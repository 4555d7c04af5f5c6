"""Stopping a process we started, and everything it started, whatever sessions its children opened.

Used by the service launcher (BentoML starts each worker in a session of its own, so a signal to the
server's process group misses them) and by the distributed-training launcher (`accelerate launch` /
`torchrun` and their ranks). Neutral ground: neither serving nor training owns process handling.
"""

from __future__ import annotations

import os
import signal
import subprocess

import psutil

# How long a SIGKILLed process may take to be reaped (the kernel frees its memory first).
KILL_REAP_S = 30.0


def stop_process_group(process: subprocess.Popen, first: int = signal.SIGTERM, grace: float = 20.0) -> None:
    """Stop a process started with `start_new_session=True` and everything it started: `first` to its
    group (the graceful signal of that program), SIGKILL to the group after `grace` seconds, then SIGKILL
    to whatever of its process tree is left (children in sessions of their own, as BentoML's workers)."""
    tree = process_tree(process.pid)
    if process.poll() is None:
        _signal_group(process, first)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait(KILL_REAP_S)
    if _group_alive(process):
        _signal_group(process, signal.SIGKILL)
    kill_survivors(tree)


def process_tree(pid: int) -> list[psutil.Process]:
    """`pid` and every descendant alive now (workers included, whatever their session)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_survivors(tree: list[psutil.Process], grace: float = 0.0) -> None:
    """Give the processes of `tree` up to `grace` seconds to exit, then SIGKILL the rest and reap them.

    psutil remembers each process's start time, so a pid reused by an unrelated process is never signalled."""
    _, alive = psutil.wait_procs(tree, timeout=grace) if grace > 0 else ([], tree)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=KILL_REAP_S)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    """`start_new_session=True` made the server its own group leader: its pid is the group id."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass  # already gone


def _group_alive(process: subprocess.Popen) -> bool:
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return False
    return True
