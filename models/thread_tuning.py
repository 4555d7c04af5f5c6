"""Torch's CPU thread count, chosen by measured step time: the fix for collapse under contention.

PyTorch runs each op's parallel region on an OpenMP team of `torch.get_num_threads()` threads, and a
region ends at a barrier that waits for its slowest thread. When another CPU-bound process takes a core,
one of our threads is descheduled for a whole time slice while the others spin at the barrier: measured
on 2 cores with one `python -c "while True: pass"` beside the engine, a batch-1 decode step went from
34 ms to 105 ms and 16-request throughput from 231 to 69 tokens/s (a 70% loss for losing half the
machine), while one thread on the core left did 50 ms and 134 tokens/s. Passive waiting
(OMP_WAIT_POLICY=PASSIVE) recovered half of it but cost 15% on a quiet machine and 30% beside a
`nice -n 19` neighbour (sleeping workers wake late); see docs/performance.md.

So the thread count follows the machine: the caller times each comparable step (same kind, same size
bucket) and reports it; the tuner keeps a moving average per thread count and, every `explore_every`
steps, runs one step with a neighbouring count (one fewer, or one more up to the start count), moving
there when it measures faster. A quiet machine keeps all threads (a trial costs one slower step in
`explore_every`); one competing process makes one thread fewer win within a few trials, and the count
climbs back when the neighbour leaves.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

_SMOOTHING = 0.3  # weight of a new sample in a thread count's moving average
_MARGIN = 0.05  # a neighbour must be this much faster to take over (noise must not flip the count)


class ThreadTuner:
    """Chooses torch's intra-op thread count per kind of step by measured time (see module docstring).

    `threads(kind)` before a step sets and returns the count to use; `observe(kind, seconds)` after it
    reports how long it took. Kinds group comparable steps (e.g. a decode batch-size bucket)."""

    def __init__(self, max_threads: int | None = None, *, explore_every: int = 64,
                 set_threads: Callable[[int], None] = torch.set_num_threads,
                 get_threads: Callable[[], int] = torch.get_num_threads) -> None:
        self.max_threads = get_threads() if max_threads is None else max_threads
        if self.max_threads < 1:
            raise ValueError(f"max_threads must be >= 1, got {self.max_threads}")
        if explore_every < 2:
            raise ValueError(f"explore_every must be >= 2, got {explore_every}")
        self.explore_every = explore_every
        self._set, self._get = set_threads, get_threads
        self._average: dict[tuple[Hashable, int], float] = {}
        self._best: dict[Hashable, int] = {}
        self._steps: dict[Hashable, int] = {}
        self._trial_up: dict[Hashable, bool] = {}  # alternate trials below and above the current count
        self._running: tuple[Hashable, int] | None = None

    def threads(self, kind: Hashable) -> int:
        """The count for the next step of `kind` (set on this thread's torch if it differs)."""
        best = self._best.setdefault(kind, self.max_threads)
        count = self._steps.get(kind, 0) + 1
        self._steps[kind] = count
        chosen = best
        if self.max_threads > 1 and count % self.explore_every == 0:
            chosen = self._neighbour(kind, best)
        if self._get() != chosen:
            self._set(chosen)
        self._running = (kind, chosen)
        return chosen

    def observe(self, kind: Hashable, seconds: float) -> None:
        """The step started by the last `threads(kind)` took `seconds`. The current count's figure is a
        moving average; a trial's replaces the figure of its count (taken trials ago, it is stale), and a
        trial faster than the current count's average by the margin becomes the count."""
        if self._running is None or self._running[0] != kind or seconds <= 0:
            return
        key = self._running
        self._running = None
        best = self._best[kind]
        previous = self._average.get(key)
        if previous is None or key[1] != best:  # a trial replaces its count's figure: the old one is stale
            self._average[key] = seconds
        else:
            self._average[key] = previous + _SMOOTHING * (seconds - previous)
        ours, theirs = self._average[key], self._average.get((kind, best))
        if key[1] != best and theirs is not None and ours < theirs * (1 - _MARGIN):
            self._best[kind] = best = key[1]
        if self._get() != best:  # between steps the thread runs with the chosen count, not a trial's
            self._set(best)

    def best(self, kind: Hashable) -> int:
        return self._best.get(kind, self.max_threads)

    def _neighbour(self, kind: Hashable, best: int) -> int:
        up = self._trial_up.get(kind, False)
        self._trial_up[kind] = not up
        if up and best < self.max_threads:
            return best + 1
        return best - 1 if best > 1 else min(best + 1, self.max_threads)
