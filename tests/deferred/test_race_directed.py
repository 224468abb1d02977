"""Race-directed exploration: each race between kernels that the eager run records gets one run
that executes the second kernel before the first; explore runs those first."""

from __future__ import annotations

import math

import pytest

from streamkit import fake

from test_deferred import readme_program
from test_pct import last_writer


def test_the_race_directed_run_comes_first_and_fails_the_racy_program():
    found = fake.explore(readme_program(wait=False), schedules=1)
    assert not found.ok
    (run,) = found.runs
    race = found.reference.races[0]
    (i, a), (j, b) = race.kernels
    assert run.schedule == "race" and run.short_token.startswith(f"race:{i}.{a}:{j}.{b}+focus=") and i != j
    assert run.focus == {(i, a), (j, b)} | {(0, 1)}  # (the racing kernels and x's fill: they touch x)
    assert run.token.startswith(run.short_token + "/")  # (with the fingerprint and the shrunk constraints)
    assert math.isnan(run.values) or run.values == 1024.0  # the sum ran before the doubling
    again = fake.replay(readme_program(wait=False), run.token)
    assert not again.ok and (again.values == run.values or math.isnan(again.values) and math.isnan(run.values))


def test_the_second_kernel_runs_first_where_eager_and_lazy_run_them_in_issue_order():
    with fake.session(detect="record", schedule="eager") as s:
        assert last_writer() == 2.0  # eager: the side stream's fill runs last
        (race,) = s.races
    with fake.session(detect="record", schedule="lazy"):
        assert last_writer() == 2.0  # (oldest first)
    with fake.session(detect="record", schedule="race", target=race.kernels):
        assert last_writer() == 1.0  # the side stream's fill ran first
    found = fake.explore(last_writer, schedules=3)
    assert [r.schedule for r in found.runs] == ["race", "pct", "rates"]  # (one race: its reversal, then the others)
    assert found.failure is found.runs[0] and found.runs[0].values == 1.0


def test_race_free_programs_get_no_race_directed_runs():
    found = fake.explore(readme_program(wait=True), schedules=3)
    assert found.ok and [r.schedule for r in found.runs] == ["pct", "rates", "adversarial"]


def test_bad_race_tokens_and_targets_are_refused():
    fn = readme_program(wait=True)
    for bad in ("race:0.1", "race:a.1:1.1", "race:0:1", "race:0.1:1.1:2"):
        with pytest.raises(ValueError):
            fake.replay(fn, bad)
    with pytest.raises(ValueError):
        fake.session(schedule="race").__enter__()
    with pytest.raises(ValueError):
        fake.session(schedule="lazy", target=((0, 1), (1, 1))).__enter__()
    with pytest.raises(ValueError):
        fake.session(schedule="race", target=((0, 1),)).__enter__()
    with fake.session(detect="record", schedule="race", target=[[0, 2], [1, 1]]) as s:
        assert s.scheduler.policy.target == ((0, 2), (1, 1))
    assert fake.parse_token("race:0.12:1.3") == ("race", 0, 3, ((0, 12), (1, 3)))
