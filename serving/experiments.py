"""A/B experiments between an adapter's champion and challenger, and what each arm has earned.

An experiment is per registered adapter name: a request whose `model` is the bare `NAME` goes to the
challenger with probability `challenger_share`, else to the champion (`NAME@challenger` /
`NAME@champion`; an explicit alias or version is never re-routed). With the OpenAI `user` field the
choice is sticky: the arm is a hash of the experiment's id and the user, so one user always meets the
same arm for the life of the experiment (a new experiment, a new id, a new draw); without `user` each
request draws anew.

Per arm it keeps sufficient statistics, not samples: requests, errors, tokens, seconds, and for the
online metric (scores posted to `/v1/feedback` for a response id) n, sum and sum of squares, which is
what Welch's t-test needs (`tasks/experiment_decision.py`) and what adds up across replicas. Response
ids are remembered for feedback in a bounded LRU map; a score for an id it no longer knows is refused
(404), one per id.

State lives in this process (the service runs one worker); a replicated deployment sends its gate
flow to every replica and sums the arms (`flows/experiment_gate.py`). Everything here is thread-safe:
requests finish on the event loop, admin calls and metrics scrapes come from threads.
"""

from __future__ import annotations

import collections
import hashlib
import math
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from lorafleet.experiment_arms import ArmSums

Arm = Literal["champion", "challenger"]
ARMS: tuple[Arm, ...] = ("champion", "challenger")
MAX_TRACKED_RESPONSES = 100_000  # response ids kept for feedback (the oldest are forgotten first)
MAX_SCORE = 1e6  # |score| bound: a feedback score is a metric value, not an arbitrary float


class ExperimentError(ValueError):
    """A request to the experiment book that cannot be honoured; `status` is the HTTP answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Experiment:
    name: str
    challenger_share: float
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    started_at: float = field(default_factory=time.time)
    arms: dict[str, ArmSums] = field(default_factory=lambda: {arm: ArmSums() for arm in ARMS})

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.id, "challenger_share": self.challenger_share,
                "started_at": self.started_at, "arms": {arm: stats.as_dict() for arm, stats in self.arms.items()}}


@dataclass(frozen=True)
class Assignment:
    """Which arm a request of an experiment went to, kept until the response is scored or forgotten."""

    experiment: str  # adapter name
    experiment_id: str
    arm: Arm


def check_share(share: object) -> float:
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
        raise ExperimentError("challenger_share must be a number in [0, 1]")
    return float(share)


def sticky_fraction(experiment_id: str, user: str) -> float:
    """A uniform number in [0, 1) fixed by (experiment, user): the same user meets the same arm."""
    digest = hashlib.sha256(f"{experiment_id}\0{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class ExperimentBook:
    """The running experiments of one server, their per-arm statistics and the response ids to score."""

    def __init__(self, *, seed: int | None = None, max_tracked: int = MAX_TRACKED_RESPONSES) -> None:
        self._lock = threading.Lock()
        self._experiments: dict[str, Experiment] = {}
        self._responses: collections.OrderedDict[str, Assignment | None] = collections.OrderedDict()
        self._max_tracked = max_tracked
        self._rng = random.Random(seed)

    # ----- admin ---------------------------------------------------------------------------------
    def start(self, name: str, challenger_share: float) -> Experiment:
        """Start an experiment, or change the share of a running one (its id and statistics are kept)."""
        share = check_share(challenger_share)
        with self._lock:
            experiment = self._experiments.get(name)
            if experiment is None:
                experiment = self._experiments[name] = Experiment(name=name, challenger_share=share)
            else:
                experiment.challenger_share = share
            return Experiment(**{**experiment.__dict__, "arms": _copy_arms(experiment.arms)})

    def stop(self, name: str) -> Experiment:
        with self._lock:
            experiment = self._experiments.pop(name, None)
        if experiment is None:
            raise ExperimentError(f"no experiment is running for {name!r}", status=404)
        return experiment

    def get(self, name: str) -> Experiment | None:
        """A snapshot (copies of the arms), safe to read while requests keep counting."""
        with self._lock:
            experiment = self._experiments.get(name)
            if experiment is None:
                return None
            return Experiment(**{**experiment.__dict__, "arms": _copy_arms(experiment.arms)})

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._experiments)

    # ----- requests ------------------------------------------------------------------------------
    def assign(self, name: str, user: str | None) -> Assignment | None:
        """The arm for a request of `NAME`, or None when no experiment runs for it."""
        with self._lock:
            experiment = self._experiments.get(name)
            if experiment is None:
                return None
            draw = sticky_fraction(experiment.id, user) if user else self._rng.random()
            arm: Arm = "challenger" if draw < experiment.challenger_share else "champion"
            return Assignment(experiment=name, experiment_id=experiment.id, arm=arm)

    def record(self, assignment: Assignment, *, response_id: str, version: int | None, status: int, tokens: int,
               seconds: float) -> None:
        """Count a finished request in its arm and remember its id for feedback (successful ones only)."""
        with self._lock:
            stats = self._arm(assignment)
            if stats is None:  # the experiment ended (or restarted) while this request ran
                return
            stats.version = version if version is not None else stats.version
            stats.requests += 1
            if status >= 500:
                stats.errors += 1
            if status == 200:
                stats.tokens += tokens
                stats.seconds += seconds
                if tokens:
                    stats.latency_n += 1
                    stats.latency_sum += seconds / tokens
                    stats.latency_sumsq += (seconds / tokens) ** 2
                self._responses[response_id] = assignment
                self._responses.move_to_end(response_id)
                while len(self._responses) > self._max_tracked:
                    self._responses.popitem(last=False)

    def feedback(self, response_id: str, score: float) -> Assignment:
        """Add a score for a response to its arm; once per response."""
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score) \
                or abs(score) > MAX_SCORE:
            raise ExperimentError(f"score must be a finite number in [-{MAX_SCORE:g}, {MAX_SCORE:g}]")
        with self._lock:
            if response_id not in self._responses:
                raise ExperimentError("no response with this id was served in a running experiment (or it "
                                      "was too long ago to remember)", status=404)
            assignment = self._responses[response_id]
            if assignment is None:
                raise ExperimentError("this response was already scored", status=409)
            stats = self._arm(assignment)
            if stats is None:
                raise ExperimentError("the experiment this response belonged to has ended", status=404)
            stats.feedback_n += 1
            stats.feedback_sum += score
            stats.feedback_sumsq += score * score
            self._responses[response_id] = None  # scored: kept so a second score is a 409, not a 404
            return assignment

    def _arm(self, assignment: Assignment) -> ArmSums | None:
        experiment = self._experiments.get(assignment.experiment)
        if experiment is None or experiment.id != assignment.experiment_id:
            return None
        return experiment.arms[assignment.arm]


def _copy_arms(arms: dict[str, ArmSums]) -> dict[str, ArmSums]:
    return {arm: ArmSums.from_dict(stats.as_dict()) for arm, stats in arms.items()}
