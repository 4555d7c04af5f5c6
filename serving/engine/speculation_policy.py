"""Whether Turbo heads draft this step: decided by measured gain, not by a fixed batch-size threshold.

Drafting pays when the tokens a verification step emits per second beat a plain step's. Both sides
are measured while serving, per batch-size bucket (1, 2, 3-4, 5-8, ...):
  * plain:    B tokens per step, at `cost(bucket, plain)` seconds per step;
  * drafting: sum over rows of tau (1 + the adapter's running mean of accepted drafts; 1 for rows
              without heads) per step, at `cost(bucket, drafting)` seconds per step (the wider forward,
              the verification and the heads that draft the next step).
The engine drafts iff the drafting rate is higher. Costs and acceptance are exponential moving averages,
so the rule follows the machine's load and each adapter's data. A bucket with no measured cost for one
side tries that side first, and every so often the side not taken runs once, so an estimate taken in a
slow spell cannot lock the engine into a choice forever. That trial is not free: at batch 16 on this
CPU a drafting step costs ~3x a plain one, and one trial per 16 steps cost ~8% of throughput (measured
with `bench speculation`). So the interval backs off: it starts at `explore_every` decisions and
doubles (up to `max_explore_every`) each time a trial confirms the choice, back to the start when a
trial changes it; a side estimated at under half the other's rate (drafting at batch 64 here: 0.56x)
waits the longest interval at once. Acceptance is averaged over many more samples than costs (`acceptance_smoothing`):
it is sampled once per row per verification, and a short window made tau swing enough to flip
decisions by chance.

On a small CPU a 1+4-token verification costs ~1.1x a plain step at batch 1 (drafting wins for any
useful tau) and approaches (1+4)x once the batch is compute-bound (drafting loses): the old rule, "off
above 4 live requests", was a fixed guess at where that crossover lies; on a GPU it lies elsewhere.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from lorafleet.serving.engine.config import SpeculationMode

_PRIOR_ACCEPTED = 1.0  # drafts accepted per verification before an adapter has any: tries it
_FAR_BEHIND = 0.5  # a side whose estimated rate is below this fraction of the other's is tried rarely


@dataclass
class MovingAverage:
    """An exponential moving average that starts at its first sample."""

    weight: float
    value: float | None = None
    samples: int = 0

    def add(self, sample: float) -> None:
        self.value = sample if self.value is None else self.value + self.weight * (sample - self.value)
        self.samples += 1


def bucket(batch_size: int) -> int:
    """The power of two at or above `batch_size`: steps of similar width share a cost estimate."""
    return 1 << max(batch_size - 1, 0).bit_length()


class SpeculationPolicy:
    """Per-step draft/no-draft decisions and the measurements behind them (one per engine)."""

    def __init__(self, mode: SpeculationMode = "adaptive", *, smoothing: float = 0.2,
                 acceptance_smoothing: float = 0.02, explore_every: int = 16, max_explore_every: int = 256) -> None:
        for name, value in (("smoothing", smoothing), ("acceptance_smoothing", acceptance_smoothing)):
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if explore_every < 2:
            raise ValueError(f"explore_every must be >= 2, got {explore_every}")
        if max_explore_every < explore_every:
            raise ValueError(f"max_explore_every must be >= explore_every ({explore_every}), got {max_explore_every}")
        self.mode, self.smoothing, self.acceptance_smoothing = mode, smoothing, acceptance_smoothing
        self.explore_every, self.max_explore_every = explore_every, max_explore_every
        self._cost: dict[tuple[int, bool], MovingAverage] = {}  # forward + verification/sampling
        self._heads: dict[int, MovingAverage] = {}  # the heads drafting the next step
        self._accepted: dict[str | None, MovingAverage] = {}
        self._since_explore: collections.Counter[int] = collections.Counter()
        self._interval: dict[int, int] = {}  # per bucket: decisions between trials (backs off)
        self._trial_of: dict[int, bool] = {}  # per bucket: the choice a trial just overrode, until re-decided
        self.decisions: collections.Counter[str] = collections.Counter()  # "on" / "off", steps with heads

    # ----- measurements -------------------------------------------------------------------------
    def observe_step(self, batch_size: int, drafting: bool, seconds: float) -> None:
        """A decode step of `batch_size` rows (verifying drafts or not) took `seconds`."""
        if batch_size < 1 or seconds <= 0:
            return
        key = (bucket(batch_size), drafting)
        self._cost.setdefault(key, MovingAverage(self.smoothing)).add(seconds)

    def observe_drafting(self, batch_size: int, seconds: float) -> None:
        """The heads took `seconds` to draft for a step of `batch_size` rows."""
        if batch_size >= 1 and seconds > 0:
            self._heads.setdefault(bucket(batch_size), MovingAverage(self.smoothing)).add(seconds)

    def observe_acceptance(self, adapter: str | None, accepted: int) -> None:
        """One verification of `adapter`'s drafts accepted `accepted` of them."""
        self._accepted.setdefault(adapter, MovingAverage(self.acceptance_smoothing)).add(float(accepted))

    def tau(self, adapter: str | None) -> float:
        """Expected tokens per verification step of a row of `adapter` (1 + accepted drafts)."""
        average = self._accepted.get(adapter)
        return 1.0 + (average.value if average is not None and average.value is not None else _PRIOR_ACCEPTED)

    def step_cost(self, batch_size: int, drafting: bool) -> float | None:
        """Seconds per step at this size; a drafting step includes its heads. None: not measured yet."""
        size = bucket(batch_size)
        average = self._cost.get((size, drafting))
        if average is None or average.value is None:
            return None
        if not drafting:
            return average.value
        heads = self._heads.get(size)
        return None if heads is None or heads.value is None else average.value + heads.value

    def taus(self) -> dict[str | None, float]:
        return {adapter: self.tau(adapter) for adapter in self._accepted}

    # ----- the decision -------------------------------------------------------------------------
    def decide(self, batch_size: int, drafting_adapters: list[str | None]) -> bool:
        """Whether the rows whose adapters are `drafting_adapters` (those with heads) draft, in a step
        of `batch_size` rows in all."""
        if self.mode == "off" or not drafting_adapters or batch_size < 1:
            return False
        if self.mode == "on":
            return self._count(True)
        size = bucket(batch_size)
        plain, drafting = self.step_cost(batch_size, False), self.step_cost(batch_size, True)
        if drafting is None:
            return self._count(True)  # never measured here: try it
        if plain is None:
            return self._count(False)
        expected = sum(self.tau(adapter) for adapter in drafting_adapters) + batch_size - len(drafting_adapters)
        drafting_rate, plain_rate = expected / drafting, batch_size / plain
        choice = drafting_rate > plain_rate
        interval = self._interval.get(size, self.explore_every)
        # Judge a trial at the second decision after it: the first comes at the end of the trial step
        # itself, before that step's cost is observed.
        if size in self._trial_of and self._since_explore[size] >= 1:
            confirmed = self._trial_of.pop(size) == choice
            self._interval[size] = interval = min(2 * interval, self.max_explore_every) if confirmed \
                else self.explore_every
        if min(drafting_rate, plain_rate) < _FAR_BEHIND * max(drafting_rate, plain_rate):
            interval = self.max_explore_every  # for now: only a large change in load or acceptance could flip it
        self._since_explore[size] += 1
        if self._since_explore[size] >= interval:  # refresh the estimate of the side not taken
            self._since_explore[size] = 0
            self._trial_of[size] = choice
            choice = not choice
        return self._count(choice)

    def _count(self, choice: bool) -> bool:
        self.decisions["on" if choice else "off"] += 1
        return choice
