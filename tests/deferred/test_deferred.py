"""Deferred schedules on the fake device: racy programs compute wrong values, fixed ones don't,
host syncs run what they need, and tokens replay runs bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

import streamkit as sk
from streamkit import fake

DEFERRED = ("lazy", "adversarial", "random", "rates", "pct")
EXPLORED = {"lazy", "adversarial", "rates", "pct"}  # (what explore runs on a race-free program)


def readme_program(wait: bool):
    """The README example, returning the side stream's sum (with or without the fork wait)."""

    def fn():
        side = sk.Stream()
        x = torch.ones(1024, device=sk.device())
        x.mul_(2)  # default stream writes x
        if wait:
            side.wait_stream(sk.current_stream())
        with sk.switch(side):
            total = x.sum()  # side stream reads x
        sk.current_stream().wait_stream(side)
        return total.item()

    return fn


def pr4214_program(fixed: bool):
    """The PR-4214 pattern in one process: a side stream gathers (copy_ stands in for the
    all-gather, group=None) a buffer the default stream just wrote."""

    def fn():
        side = sk.Stream()
        buf = torch.zeros(64, device=sk.device())
        out = torch.zeros(64, device=sk.device())
        buf.add_(torch.arange(64, device=sk.device(), dtype=torch.float32))
        if fixed:
            side.wait_stream(sk.current_stream())
        with sk.switch(side):
            out.copy_(buf)
        sk.current_stream().wait_stream(side)
        return out.cpu(), [buf.sum()]

    return fn


def test_racy_side_stream_read_is_wrong_within_two_schedules_and_the_fixed_one_never():
    racy = fake.explore(readme_program(wait=False), schedules=2)
    assert not racy.ok
    assert racy.failure in racy.runs[:2] and racy.failure.error is None
    value = racy.failure.values
    assert math.isnan(value) or value == 1024.0  # poison, or x before the default stream's write
    assert racy.reference.values == 2048.0
    assert racy.failure.races  # the detector saw the race too (detect="record")
    fixed = fake.explore(readme_program(wait=True), schedules=12)
    assert fixed.ok and len(fixed.runs) == 12 and fixed.failure is None
    assert all(run.values == 2048.0 for run in fixed.runs)
    assert {run.schedule for run in fixed.runs} == EXPLORED


def test_pr4214_pattern_wrong_within_two_schedules_and_fixed_right_under_fifty():
    racy = fake.explore(pr4214_program(fixed=False), schedules=2)
    assert not racy.ok and racy.failure in racy.runs[:2]
    gathered, _ = racy.failure.values
    assert not torch.equal(gathered, torch.arange(64, dtype=torch.float32))
    fixed = fake.explore(pr4214_program(fixed=True), schedules=50, seed=3)
    assert fixed.ok, fixed.explain()
    assert len(fixed.runs) == 50


def test_replay_reproduces_the_failing_values_bit_for_bit():
    fn = pr4214_program(fixed=False)
    found = fake.explore(fn, schedules=6)
    failing = [run for run in found.runs if not run.ok]
    assert failing
    for run in failing:
        again = fake.replay(fn, run.token)
        assert again.token == run.token
        for a, b in zip(again.values[0].view(torch.int32), run.values[0].view(torch.int32)):
            assert a == b  # the bits, NaN payloads included
    # every explored run replays to its own values, passing or failing
    for run in found.runs:
        assert torch.equal(fake.replay(fn, run.token).values[0].view(torch.int32), run.values[0].view(torch.int32))


def test_the_explanation_names_the_token_and_the_race():
    found = fake.explore(readme_program(wait=False), schedules=2)
    text = found.explain()
    assert found.failure.token in text and "2048.0" in text
    assert "wait_stream" in text  # the detector's fix
    assert found.failure.token in repr(found)


def test_tokens_are_schedule_colon_seed_and_bad_ones_are_refused():
    fn = readme_program(wait=True)
    assert fake.replay(fn, "random:5").values == 2048.0
    for bad in ("random", "nope:1", "random:x", ""):
        with pytest.raises(ValueError):
            fake.replay(fn, bad)
    with pytest.raises(ValueError):
        fake.session(schedule="nope").__enter__()


def test_a_racy_program_raises_in_explore_runs_when_detect_is_raise():
    found = fake.explore(readme_program(wait=True), schedules=2, detect="raise")
    assert found.ok
    with pytest.raises(sk.RaceError):
        fake.explore(readme_program(wait=False), schedules=2, detect="raise")  # the eager run raises


@pytest.mark.parametrize("schedule", DEFERRED)
def test_non_blocking_d2h_destination_holds_poison_until_the_copy_runs(schedule):
    with fake.session(detect="off", schedule=schedule, seed=1):
        x = torch.arange(8, device=sk.device(), dtype=torch.float32)
        host = x.to("cpu", non_blocking=True)
        early = host.clone()
        sk.synchronize()
        assert torch.equal(host, torch.arange(8, dtype=torch.float32))
    if schedule == "lazy":
        assert early.isnan().all()  # read before the sync: nothing ran yet


def test_non_blocking_d2h_under_eager_is_already_filled():
    with fake.session(detect="off", schedule="eager"):
        host = torch.arange(8, device=sk.device(), dtype=torch.float32).to("cpu", non_blocking=True)
        assert torch.equal(host.clone(), torch.arange(8, dtype=torch.float32))


def test_pageable_h2d_source_is_snapshotted_at_issue():
    with fake.session(schedule="lazy"):
        src = torch.ones(4)
        dst = torch.empty(4, device=sk.device())
        dst.copy_(src, non_blocking=True)
        src.fill_(5.0)
        assert dst.tolist() == [1.0] * 4


@pytest.mark.parametrize("schedule", DEFERRED)
def test_query_polling_terminates_and_then_the_values_are_there(schedule):
    with fake.session(schedule=schedule, seed=2) as s:
        side = sk.Stream()
        x = torch.ones(256, device=sk.device())
        side.wait_stream(sk.current_stream())
        with sk.switch(side):
            for _ in range(5):
                x.mul_(2)
            done = sk.Event()
            done.record()
        polls = 0
        while not side.query():
            polls += 1
            assert polls < 100
        assert done.query()
        assert fake.peek(x).eq(32).all()
        assert s.stats.kernels >= 6
    if schedule == "lazy":
        assert polls > 0  # nothing had run: query answered honestly


def test_query_under_lazy_answers_false_before_progress():
    with fake.session(schedule="lazy"):
        x = torch.ones(4, device=sk.device())
        x.add_(1)
        x.add_(1)
        answers = []
        while True:
            answers.append(sk.current_stream().query())
            if answers[-1]:
                break
        assert answers[0] is False and answers[-1] is True
        assert x.tolist() == [3.0] * 4


def test_a_kernel_failing_when_it_runs_raises_at_the_next_sync():
    with pytest.raises(IndexError, match="index out of range"):
        with fake.session(schedule="lazy"):
            x = torch.ones(4, device=sk.device())
            idx = torch.tensor([0, 99], device=sk.device())
            y = x.index_select(0, idx)  # the shape is known: deferred; the values are out of range
            assert y.shape == (2,)
            x.add_(1)  # issuing goes on: nothing has run
            sk.synchronize()


def test_argument_errors_still_raise_at_issue():
    with fake.session(schedule="lazy") as s:
        x = torch.ones(4, device=sk.device())
        with pytest.raises(RuntimeError):
            x.add_(torch.ones(3, device=sk.device()))
        with pytest.raises(RuntimeError):
            torch.mm(x, x)
        kernels = s.stats.kernels
        x.add_(1)
        assert s.stats.kernels == kernels + 1
        assert x.tolist() == [2.0] * 4


def test_session_exit_runs_everything_queued():
    with fake.session(schedule="lazy"):
        x = torch.zeros(4, device=sk.device())
        y = x + 3  # fresh output: a poisoned placeholder until it runs
        assert torch.isnan(y.sk_inner).all()
        x.add_(1)
    assert fake.peek(x).tolist() == [1.0] * 4
    assert fake.peek(y).tolist() == [3.0] * 4


# CUDA: a launched kernel keeps the sizes, strides and offset its arguments had at the launch;
# t_(), unsqueeze_(), as_strided_(), resize_() shrinking change the host-side metadata only
# (c10/core/TensorImpl.h). The scheduler checks the layouts when the kernel runs, instead of
# freezing a view of every argument at issue.
@pytest.mark.parametrize("schedule", ["lazy", "adversarial"])
def test_queued_kernels_use_their_arguments_layouts_of_issue_time(schedule):
    def program(device):
        a = torch.arange(16.0, device=device).view(4, 4)
        b = torch.arange(16.0, device=device).view(4, 4)
        c = torch.zeros(16, device=device)
        d = torch.arange(8.0, device=device)
        out1 = a * torch.arange(4.0, device=device)  # reads a (4, 4) as issued
        a.t_()
        b.add_(torch.arange(4.0, device=device))  # writes b (4, 4) as issued
        b.unsqueeze_(0)
        c[4:8].fill_(3.0)
        c.as_strided_((2, 2), (1, 4), 1)
        out2 = d + 1
        d.resize_(3)
        e = out2 * 1  # (a pending output as an argument)
        out2.t_()
        return out1, a.contiguous(), b.contiguous(), c.contiguous(), d, e

    with fake.session(schedule="eager"):
        expected = [fake.peek(t).clone() for t in program(sk.device())]
    with fake.session(schedule=schedule):
        got = program(sk.device())
    got = [fake.peek(t) for t in got]
    assert len(got) == len(expected) and all(torch.equal(g, e) for g, e in zip(got, expected))


def test_views_of_pending_outputs_see_the_values():
    with fake.session(schedule="lazy"):
        y = torch.arange(6, device=sk.device(), dtype=torch.float32) * 2
        v = y.view(2, 3)[1]
        assert v.tolist() == [6.0, 8.0, 10.0]


def test_item_tolist_and_implicit_syncs_run_what_they_need():
    with fake.session(schedule="adversarial") as s:
        x = torch.tensor([0.0, 1.0, 0.0, 2.0], device=sk.device())
        x.mul_(3)
        assert x.sum().item() == 9.0
        assert torch.nonzero(x).flatten().tolist() == [1, 3]
        assert torch.bincount(torch.tensor([1, 1, 3], device=sk.device())).tolist() == [0, 2, 0, 1]
        assert s.stats.implicit_syncs >= 2


def test_random_ops_keep_program_order():
    def fn():
        torch.manual_seed(0)
        a = torch.rand(16, device=sk.device())
        side = sk.Stream()
        with sk.switch(side):
            b = torch.randn(16, device=sk.device())
        sk.current_stream().wait_stream(side)
        return a * 1, b + 0

    found = fake.explore(fn, schedules=6)
    assert found.ok, found.explain()


def test_deferred_with_detect_off_still_orders_by_the_waits():
    assert fake.explore(pr4214_program(fixed=True), schedules=8, detect="off").ok
    racy = fake.explore(pr4214_program(fixed=False), schedules=2, detect="off")
    assert not racy.ok and racy.failure.races == []


def test_eager_is_the_default_and_stream_env_var_picks_another(monkeypatch):
    monkeypatch.delenv("STREAMKIT_SCHEDULE", raising=False)
    with fake.session() as s:
        assert s.schedule == "eager"
        y = torch.ones(3, device=sk.device()) + 1
        assert torch.equal(y.sk_inner, torch.full((3,), 2.0))  # ran at issue
    monkeypatch.setenv("STREAMKIT_SCHEDULE", "lazy")
    with fake.session() as s:
        assert s.schedule == "lazy"
        y = torch.ones(3, device=sk.device()) + 1
        assert torch.isnan(y.sk_inner).all()
    with fake.session(schedule="eager") as s:
        assert s.schedule == "eager"
    monkeypatch.setenv("STREAMKIT_SCHEDULE", "bogus")
    with pytest.raises(ValueError, match="schedule"):
        fake.Session()


def test_empty_memory_is_poisoned_under_deferred_schedules():
    with fake.session(schedule="random", seed=1):
        e = torch.empty(4, dtype=torch.int32, device=sk.device())
        assert (e.cpu() == -1).all()


def random_program(seed: int, ordered: bool):
    """A program of in-place updates and fresh results over three buffers on two streams; with
    ``ordered`` each stream switch waits for the other stream (race-free), else nothing waits."""

    def fn():
        gen = torch.Generator().manual_seed(seed)
        side = sk.Stream()
        streams = [sk.current_stream(), side]
        bufs = [torch.full((16,), float(i + 1), device=sk.device()) for i in range(3)]
        where = 0
        keep = []  # (a buffer freed on the other stream would be a free race: keep them to the end)
        for _ in range(12):
            nxt = int(torch.randint(0, 2, (1,), generator=gen))
            if nxt != where and ordered:
                streams[nxt].wait_stream(streams[where])
            where = nxt
            a, b = (int(i) for i in torch.randint(0, 3, (2,), generator=gen))
            with sk.switch(streams[where]):
                if a == b:
                    bufs[a].mul_(2)
                else:
                    keep.append(bufs[a])
                    bufs[a] = bufs[a] + bufs[b] * 0.5
        if ordered:
            streams[0].wait_stream(streams[where])
        values = [t.cpu() for t in bufs]
        sk.synchronize()
        return values

    return fn


@pytest.mark.parametrize("seed", range(4))
def test_ordered_random_programs_compute_the_eager_values_under_every_schedule(seed):
    found = fake.explore(random_program(seed, ordered=True), schedules=8, seed=seed)
    assert found.ok, found.explain()
    assert all(run.races == [] for run in found.runs)


def test_unordered_random_programs_are_caught():
    caught = sum(not fake.explore(random_program(seed, ordered=False), schedules=4).ok for seed in range(4))
    assert caught >= 3


def test_a_real_all_gather_on_a_side_stream_reads_the_buffer_before_its_write():
    """PR-4214 with the collective itself (one gloo rank, group=None): collectives run at once,
    after what their stream is ordered after, so without the fork wait the gather can't see the
    default stream's pending write."""
    import datetime
    import warnings

    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no default process group in this process")

    def program(fixed: bool):
        def fn():
            side = sk.Stream()
            buf = torch.zeros(8, device=sk.device())
            out = torch.zeros(8, device=sk.device())
            buf.add_(torch.arange(8, device=sk.device(), dtype=torch.float32))
            if fixed:
                side.wait_stream(sk.current_stream())
            with sk.switch(side):
                dist.all_gather_into_tensor(out, buf)
            sk.current_stream().wait_stream(side)
            return out.cpu()

        return fn

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=datetime.timedelta(seconds=30))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            racy = fake.explore(program(False), schedules=2)
            fixed = fake.explore(program(True), schedules=10)
    finally:
        dist.destroy_process_group()
    assert not racy.ok and racy.failure in racy.runs[:2]
    assert not torch.equal(racy.failure.values, torch.arange(8, dtype=torch.float32))
    assert fixed.ok, fixed.explain()
