"""A slice of benchmarks/planted_bugs.py: planted bugs of each kind are found within their depth's
budget, their race-free twins never fail, a lost update of two unordered ``add_`` appears, and
the explanation names a loop kernel's occurrence."""

from __future__ import annotations

import pytest
import torch

import streamkit as sk
from _planted import BUDGET, suite
from streamkit import fake
from streamkit._backends.fake._explore import Explorer

BUGS = {bug.name: bug for bug in suite()}
SLICE = ["fork-3s-pad", "lost-2s", "flood-20", "loop-10", "needle-8@1", "late-40@20", "conj-3", "conj-4b"]


@pytest.mark.parametrize("name", SLICE)
def test_a_planted_bug_is_found_within_its_depths_budget_and_its_twin_never_fails(name):
    bug = BUGS[name]
    for seed in (0, 1):
        found = Explorer(bug.make(False), BUDGET[bug.depth], seed).explore(shrink=False, stop=True)
        assert not found.ok, f"{name} seed {seed}: not found in {BUDGET[bug.depth]} schedules"
        assert len(found.runs) <= 2  # (the directed runs find these first)
        again = fake.replay(bug.make(False), found.failure.token)
        assert not again.ok
    twin = Explorer(bug.make(True), 12, 0).explore(shrink=False)
    assert twin.ok and len(twin.runs) == 12, twin.explain()


def test_the_needle_sweep_places_the_read_between_the_two_writes_that_matter():
    found = fake.explore(BUGS["late-40@20"].make(False), schedules=4)
    f = found.failure
    assert f.schedule == "order" and f.values is True
    (before, reader), (reader2, after) = f.target
    assert reader == reader2 and before[0] == after[0] != reader[0]  # after one write, before the next


def lost_update():
    side = sk.Stream()
    acc = torch.zeros(4, device=sk.device())
    side.wait_stream(sk.current_stream())
    acc.add_(1.0)
    with sk.switch(side):
        acc.add_(2.0)  # unordered with the add_ above: both may read 0 before either writes
    sk.current_stream().wait_stream(side)
    return acc.cpu()


def test_unordered_add_loses_an_update_and_the_explanation_says_so():
    found = fake.explore(lost_update, schedules=3)
    assert found.reference.values.tolist() == [3.0] * 4
    f = found.failure
    assert f.schedule == "split" and f.values.tolist() in ([1.0] * 4, [2.0] * 4)
    assert "split around" in f.explanation and "one update was lost" in f.explanation
    assert fake.replay(lost_update, f.token).values.tolist() == f.values.tolist()
    # reversing the two add_ alone gives the eager value: only the split shows the bug
    assert all(run.ok for run in found.runs if run.schedule == "race")


def test_rates_runs_split_racing_read_modify_write_kernels_too():
    values = {tuple(fake.replay(lost_update, f"rates:{seed}").values.tolist()) for seed in range(16)}
    assert (3.0,) * 4 in values and values & {(1.0,) * 4, (2.0,) * 4}


def looped():
    side = sk.Stream()
    buf = torch.zeros(4, device=sk.device())
    out = torch.zeros(4, device=sk.device())
    sk.synchronize()
    for it in range(5):
        done = sk.Event()
        done.record()  # (before the fill: the wrong place)
        buf.fill_(float(it + 1))  # <loop-write>
        side.wait_event(done)
        with sk.switch(side):
            out.copy_(buf)  # <loop-read>
        sk.current_stream().wait_stream(side)
    return out.cpu()


def test_a_race_in_a_loop_is_reversed_at_its_last_occurrence_and_explained_with_it():
    found = fake.explore(looped, schedules=4)
    f = found.failure
    assert not found.ok and f.values.tolist() == [4.0] * 4  # the last copy read the 4th fill's value
    assert "5th of 5" in f.explanation, f.explanation


def write_then_filler():
    side = sk.Stream()
    x = torch.ones(16, device=sk.device())
    pad = torch.zeros(16, device=sk.device())
    sk.synchronize()
    with sk.switch(side):
        total = x.sum()  # <filler-read>  (issued first; the fork wait is missing)
    x.mul_(2)  # <filler-write>
    for _ in range(6):
        pad.add_(1)  # no-op filler on the same stream, issued after the write
    sk.current_stream().wait_stream(side)
    return total.item()


def test_shrinking_names_the_conflicting_write_not_the_filler_after_it():
    from streamkit._backends.fake._planner import Slot

    explorer = Explorer(write_then_filler, 1, 0)
    assert explorer.run_reference().values == 16.0
    f = explorer.run(Slot("adversarial", 0))  # (the sync runs the write and all the filler before the sum)
    assert f.values == 32.0
    explorer.shrink(f, None)
    # (the filler touches no raced memory: it ran at issue, outside the schedule, and is no deviation)
    assert f.deviations >= 1 and len(f.constraints) == 1, f.explanation
    ((a, b),) = f.constraints
    assert (a.op, b.op) == ("aten.mul_", "aten.sum"), f.explanation  # the write, not pad.add_
