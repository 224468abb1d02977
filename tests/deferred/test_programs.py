"""A slice of benchmarks/deferred_programs.py: random race-free programs compute the eager values
under every deferred schedule, and the same programs with waits dropped are caught."""

from __future__ import annotations

import pytest

from _support.programs import random_race_free_program
from streamkit import fake


@pytest.mark.parametrize("chunk", range(4))
def test_race_free_programs_keep_the_eager_values_under_ten_schedules(chunk):
    for seed in range(chunk * 5, chunk * 5 + 5):  # 20 programs in all
        found = fake.explore(random_race_free_program(seed), schedules=10, seed=seed)
        assert found.ok, f"seed {seed}:\n{found.explain()}"
        assert len(found.runs) == 10
        assert found.reference.races == [] and all(run.races == [] for run in found.runs)  # (the generator orders every pair)


def test_the_same_programs_with_waits_dropped_are_caught():
    caught = sum(not fake.explore(random_race_free_program(seed, drop_waits=0.5), schedules=10, seed=seed).ok for seed in range(10))
    assert caught >= 7
