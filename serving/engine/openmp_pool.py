"""Give back a thread's OpenMP workers, so the engine's thread keeps its fast (spinning) team.

PyTorch's CPU ops run their parallel regions on GNU OpenMP (libgomp). Every thread that ever ran a
parallel op keeps its own team of worker threads for as long as it lives. When the process holds
more OpenMP threads than CPUs (on 2 cores: the main thread that loaded the model, the engine's
stepping thread, an adapter reader, each with one worker), libgomp stops letting idle workers spin
and puts them to sleep between parallel regions instead, so each of the ~250 ops of a decode step
pays a futex wake-up. Measured on the 2-core CPU: a batch-1 decode step of SmolLM2 costs 34 ms with
one team and 54 ms once a second thread has run one parallel op and stays alive (see
docs/performance.md). Freeing the other threads' teams (`omp_pause_resource_all`, OpenMP 5.0)
restores 34 ms; a team comes back if that thread runs a parallel op again, so threads that touch
tensors off the stepping thread call `release_thread_pool()` when they are done.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

log = logging.getLogger(__name__)

_OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: free the threads, keep the runtime initialised
_RUNTIMES = ("libgomp", "libiomp5", "libomp")


@functools.cache
def _runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime torch loaded (found in this process's mappings), or None."""
    import torch  # noqa: F401 - loads the runtime whose threads we manage

    maps = Path("/proc/self/maps")
    if not maps.is_file():  # not Linux: nothing to look up; releasing is then a no-op
        return None
    for line in maps.read_text().splitlines():
        fields = line.split()
        path = fields[-1] if fields else ""
        if any(Path(path).name.startswith(name) for name in _RUNTIMES):
            try:
                library = ctypes.CDLL(path)
                library.omp_pause_resource_all.argtypes = [ctypes.c_int]
                library.omp_pause_resource_all.restype = ctypes.c_int
                return library
            except (OSError, AttributeError) as error:  # an older runtime without OpenMP 5.0
                log.info("OpenMP runtime %s cannot release thread pools: %s", path, error)
                return None
    return None


def release_thread_pool() -> bool:
    """Free the calling thread's OpenMP worker threads; True if the runtime did.

    Call it on a thread that will not run tensor ops for a while (after loading a model, after
    reading an adapter), never inside a parallel region. Harmless when there is nothing to free."""
    runtime = _runtime()
    if runtime is None:
        return False
    return runtime.omp_pause_resource_all(_OMP_PAUSE_SOFT) == 0
