"""fake.explore's focus: its runs order only the kernels on memory the eager run found a race on;
every other kernel runs at issue, unless a queued kernel uses memory it writes or writes memory
it uses (docs/exploration.md, "The focus")."""

from __future__ import annotations

import math
import random

import pytest
import torch

import streamkit as sk
from streamkit import fake
from streamkit._backends.fake._explore import Explorer, run_schedule
from streamkit._backends.fake._tokens import decode_focus, encode_focus

from test_deferred import readme_program
from test_recycle import N, freed_while_side_reads
from test_shrink import tensors_program


def race_free(steps: int = 6):
    """Two streams, each updating its own buffer, joined by a wait: no race."""

    def fn():
        side = sk.Stream()
        a = torch.ones(64, device=sk.device())
        b = torch.ones(64, device=sk.device())
        side.wait_stream(sk.current_stream())
        for _ in range(steps):
            a.mul_(1.5)
            with sk.switch(side):
                b.add_(2.0)
        sk.current_stream().wait_stream(side)
        return (a + b).sum().item()

    return fn


def output_of_a_racing_kernel():
    """The side stream's ``o = x * 3`` races with the default stream's ``x.mul_(2)`` (no fork wait);
    ``o.sum()`` after it on the side stream touches no raced memory, but reads ``o``: it must not
    run before ``o`` is made. The only right values are 6N (eager) and 3N (the race reversed)."""

    def fn():
        side = sk.Stream()
        x = torch.ones(N, device=sk.device())
        sk.synchronize()
        x.mul_(2)
        with sk.switch(side):
            o = x * 3
            total = o.sum()
        sk.current_stream().wait_stream(side)
        return total.item()

    return fn


def test_the_focus_is_the_kernels_on_raced_memory():
    explorer = Explorer(readme_program(wait=False), 4, 0)
    explorer.run_reference()
    # x's fill (0.1), the doubling (0.2) and the side stream's sum (1.1); not the host read of the sum
    assert explorer.focus == {(0, 1), (0, 2), (1, 1)}
    assert explorer.steps == 6  # PCT's k: each focus kernel issued and run
    fixed = Explorer(readme_program(wait=True), 4, 0)
    fixed.run_reference()
    assert fixed.focus == frozenset() and fixed.steps == 2


def test_a_race_free_program_runs_every_kernel_at_issue():
    fn = race_free()
    found = fake.explore(fn, schedules=8)
    assert found.ok and all(run.focus == frozenset() for run in found.runs)
    for run in found.runs[:4]:
        with fake.session(detect="record", schedule=run.token) as s:
            assert fn() == found.reference.values
        # every kernel issued, none went through the queue (the policy saw none)
        assert len(s.scheduler.trace) == s.stats.kernels > 10 and s.scheduler.ran == []


def test_a_kernel_outside_the_focus_waits_for_the_queued_kernel_it_reads():
    fn = output_of_a_racing_kernel()
    found = fake.explore(fn, schedules=40, shrink=False)
    assert found.reference.values == 6.0 * N
    values = {run.values for run in found.runs}
    assert values <= {6.0 * N, 3.0 * N} and 3.0 * N in values  # never the poison of an unmade o
    explorer = Explorer(fn, 4, 0)
    explorer.run_reference()
    assert len(explorer.focus) == 3  # x's fill, the doubling and x * 3: not o.sum()
    run = run_schedule(fn, "lazy", 0, "record", focus=explorer.focus)
    assert run.values in (6.0 * N, 3.0 * N)
    issued, ran = run._trace
    # the sum went through the queue (it reads o, which the queued x * 3 writes)
    assert [str(k.op) for k in ran if k.stream.idx == 1] == ["aten.mul.Tensor", "aten.sum.default"]
    assert len(issued) == len(ran) == 5  # (.item() reads the queued sum's output: it went through run_now after it)


def test_a_free_race_puts_the_freed_block_in_focus_and_the_reference_reports_it():
    explorer = Explorer(freed_while_side_reads(record_stream=False), 12, 0)
    reference = explorer.run_reference()
    # (the observed reference run used to keep every storage alive: no free, no free race)
    assert any(race.second.kind == "free" for race in reference.races)
    assert {(0, 1), (1, 1)} <= explorer.focus  # x's fill and the side stream's read of it
    values = {run.values[0] for run in explorer.explore(shrink=False).runs}
    assert 7.0 * N in values and any(math.isnan(v) for v in values)  # the new owner's data, or the poison at reuse


def test_focus_round_trips_through_the_token():
    rng = random.Random(0)
    for _ in range(50):
        focus = frozenset((rng.randrange(4), rng.randrange(1, 500)) for _ in range(rng.randrange(0, 40)))
        assert decode_focus(encode_focus(focus)) == focus
    loop = frozenset((0, 3 * i + 2) for i in range(60))  # a write every third kernel: a few characters
    assert len(encode_focus(loop)) < 40
    t = fake.read_token("rates:7+focus=" + encode_focus(loop) + "/01234567")
    assert t.focus == loop and (t.schedule, t.seed, t.fingerprint) == ("rates", 7, "01234567")
    assert fake.read_token("rates:7").focus is None and fake.read_token("rates:7+focus=").focus == frozenset()
    for bad in ("rates:7+focus=!!", "rates:7+focus=eNqLjo4FAAEcAL0", "eager:0+focus=", "constraints+focus=/01234567/x",
                "rates:7+focus"):
        with pytest.raises(ValueError, match="schedule token"):
            fake.read_token(bad)
        with pytest.raises(ValueError, match=r"session\(schedule\)"):
            fake.session(schedule=bad).__enter__()


def test_a_session_given_an_explored_token_runs_that_schedule_bit_for_bit():
    fn = tensors_program
    for run in fake.explore(fn, schedules=6).runs:
        assert run.focus is not None and "+focus=" in run.token
        with fake.session(detect="record", schedule=run.token):
            values = [v.cpu() for v in fn()]
        assert all(torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) for a, b in zip(run.values, values))
        assert all(torch.equal(a.isnan(), b.isnan()) for a, b in zip(run.values, values))
