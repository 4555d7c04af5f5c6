"""ThreadTuner (models/thread_tuning.py) on synthetic step times: it keeps all threads on a quiet
machine, moves to fewer when they measure faster (contention), and climbs back when it ends."""

from __future__ import annotations

import pytest

from lorafleet.models.thread_tuning import ThreadTuner


class FakeTorch:
    """Records the thread counts the tuner sets (a real `torch.set_num_threads` would change the test run)."""

    def __init__(self, threads: int) -> None:
        self.count, self.sets = threads, []

    def set(self, count: int) -> None:
        self.count = count
        self.sets.append(count)


def drive(tuner: ThreadTuner, steps: int, seconds_at: dict[int, float], kind: str = "decode") -> list[int]:
    used = []
    for _ in range(steps):
        count = tuner.threads(kind)
        used.append(count)
        tuner.observe(kind, seconds_at[count])
    return used


def make(threads: int = 2, explore_every: int = 4) -> tuple[ThreadTuner, FakeTorch]:
    fake = FakeTorch(threads)
    return ThreadTuner(explore_every=explore_every, set_threads=fake.set, get_threads=lambda: fake.count), fake


def test_quiet_machine_keeps_every_thread_with_one_trial_step_in_explore_every():
    tuner, fake = make()
    used = drive(tuner, 17, {2: 0.034, 1: 0.046})
    assert used.count(1) == 4 and used[3] == used[7] == 1  # the trials, every 4th step
    assert tuner.best("decode") == 2 and fake.count == 2


def test_contention_moves_to_fewer_threads_and_its_end_moves_back():
    tuner, _ = make()
    drive(tuner, 8, {2: 0.034, 1: 0.046})
    contended = drive(tuner, 12, {2: 0.105, 1: 0.050})  # a CPU-bound neighbour took a core
    assert tuner.best("decode") == 1 and contended[-4:].count(1) >= 3
    drive(tuner, 12, {2: 0.034, 1: 0.046})  # it left: the next trial of 2 threads wins
    assert tuner.best("decode") == 2


def test_noise_within_the_margin_does_not_flip_the_count_and_kinds_are_separate():
    tuner, _ = make()
    drive(tuner, 20, {2: 0.034, 1: 0.0335})  # 1.5% faster: within the 5% margin
    assert tuner.best("decode") == 2
    drive(tuner, 8, {2: 0.5, 1: 0.2}, kind="prefill")
    assert tuner.best("prefill") == 1 and tuner.best("decode") == 2


def test_one_thread_never_explores_and_bad_arguments_are_refused():
    tuner, fake = make(threads=1)
    assert set(drive(tuner, 10, {1: 0.05})) == {1} and fake.sets == []
    with pytest.raises(ValueError, match="explore_every"):
        ThreadTuner(explore_every=1)
    with pytest.raises(ValueError, match="max_threads"):
        ThreadTuner(max_threads=0)
