"""PCT schedules (random stream priorities, depth - 1 priority change points): tokens
``pct:seed:depth`` replay bit for bit, both orders of an unordered pair are reached, ordered
programs keep the eager values, and explore alternates random and pct."""

from __future__ import annotations

import pytest
import torch

import streamkit as sk
from streamkit import fake

from test_deferred import pr4214_program, random_program, readme_program


def last_writer():
    """Two streams write the same buffer with nothing ordering them: the value left says which
    stream's kernel ran last."""
    side = sk.Stream()
    x = torch.zeros(4, device=sk.device())
    sk.synchronize()
    x.fill_(1.0)  # default stream
    with sk.switch(side):
        x.fill_(2.0)  # side stream, unordered with the write above
    sk.synchronize()
    return float(x.cpu()[0])


def test_pct_runs_replay_bit_for_bit_and_tokens_carry_the_depth():
    fn = pr4214_program(fixed=False)
    for seed, depth in ((0, 1), (3, 2), (5, 3)):
        first = fake.replay(fn, f"pct:{seed}:{depth}")
        again = fake.replay(fn, first.token)
        assert first.token == f"pct:{seed}:{depth}" and (first.schedule, first.seed, first.depth) == ("pct", seed, depth)
        out1, out2 = first.values[0], again.values[0]
        assert torch.equal(out1.isnan(), out2.isnan()) and torch.equal(out1.nan_to_num(0), out2.nan_to_num(0))


def test_pct_reaches_both_orders_of_an_unordered_pair_and_each_seed_is_deterministic():
    seen = {}
    for seed in range(12):
        with fake.session(detect="record", schedule="pct", seed=seed, depth=1):
            value = last_writer()
        with fake.session(detect="record", schedule="pct", seed=seed, depth=1):
            assert last_writer() == value  # same seed, same order
        seen.setdefault(value, seed)
    assert set(seen) == {1.0, 2.0}  # random priorities put either stream first
    with fake.session(detect="record", schedule="eager") as s:
        assert last_writer() == 2.0  # eager: program order
        assert s.races


def test_pct_runs_the_highest_priority_stream_so_depth_one_never_interleaves():
    """Depth 1 (no change points): a stream whose priority is above the host's runs its kernels as
    soon as they are issued, one below waits for a sync; the host's priority is drawn first."""
    orders = set()
    for seed in range(8):
        with fake.session(detect="record", schedule="pct", seed=seed, depth=1) as s:
            x = torch.zeros(4, device=sk.device())
            x.add_(1.0)
            pending = s.scheduler.pending
            host, stream0 = s.scheduler.policy.priority[-1], s.scheduler.policy.priority.get(0)
        assert stream0 is not None  # (drawn at the first issue, when its kernel was ready)
        orders.add(stream0 > host)
        assert pending == 0 if stream0 > host else pending == 2
    assert orders == {True, False}


@pytest.mark.parametrize("seed", range(2))
def test_ordered_random_programs_keep_the_eager_values_under_pct(seed):
    fn = random_program(seed, ordered=True)
    reference = fake.replay(fn, "eager:0").values
    for depth in (1, 2, 3):
        run = fake.replay(fn, f"pct:{seed}:{depth}")
        assert run.ok and not run.races and len(run.values) == len(reference)


def test_the_undirected_plan_cycles_pct_depths_over_the_real_length_with_hashed_seeds():
    plan = fake.plan(10, 4, steps=120)
    assert [(e.schedule, e.depth) for e in plan if e.schedule == "pct"] == [("pct", 1), ("pct", 2), ("pct", 3), ("pct", 4)]
    assert all(e.target == 120 for e in plan if e.schedule == "pct")  # change points over 120 steps
    assert {e.schedule for e in plan[:6]} == {"pct", "rates", "adversarial", "lazy"}
    seeds = {e.seed for e in plan if e.schedule in ("pct", "rates")}
    assert len(seeds) == 8 and not seeds & set(range(100))  # hashed: no run repeats explore seed 5's
    assert not seeds & {e.seed for e in fake.plan(10, 5, steps=120) if e.schedule in ("pct", "rates")}
    found = fake.explore(readme_program(wait=True), schedules=4)  # (race-free: no directed runs)
    assert [r.short_token for r in found.runs] == [fake.Run(*e, focus=frozenset()).short_token for e in fake.plan(4, 0, steps=2)]
    # race-free: no kernel is in the focus, so every kernel ran at issue and PCT has its least k
    assert found.runs[0].short_token.startswith("pct:") and found.runs[0].target == 2 and found.runs[0].focus == frozenset()
    racy = fake.explore(readme_program(wait=False), schedules=6)
    pct = [r for r in racy.runs if r.schedule == "pct"]
    assert pct and all(r.target == 2 * len(r.focus) >= 4 for r in pct)  # (k: twice the focus kernels)


def test_pct_change_points_reach_late_steps():
    """With k from the eager run, a change point can fall anywhere in the run (legacy tokens drew
    them among the first 64 steps only)."""
    from streamkit._backends.fake._policies import PCT

    late = [max(PCT(seed, 2, 400).changes) for seed in range(200)]
    assert max(late) > 300 and min(late) >= 1
    assert all(max(PCT(seed, 2).changes) <= 64 for seed in range(50))


def test_bad_pct_tokens_and_depths_are_refused():
    fn = readme_program(wait=True)
    for bad in ("pct:1", "pct:1:0", "pct:x:2", "pct:1:2:3:4", "pct:1:2:0", "random:1:3"):
        with pytest.raises(ValueError):
            fake.replay(fn, bad)
    for depth in (0, -1, 1.5):
        with pytest.raises(ValueError):
            fake.session(schedule="pct", depth=depth).__enter__()
    assert fake.parse_token("pct:-2:4") == ("pct", -2, 4, None)
    assert fake.parse_token("pct:7:2:300") == ("pct", 7, 2, 300)
    assert fake.parse_token("random:7") == ("random", 7, 3, None)


@pytest.mark.parametrize(
    "token, crc",
    [("random:1", 401692164), ("random:5", 2544462876), ("pct:1:2", 1753782183), ("pct:6:3", 2561688193),
     ("adversarial:2", 1713944575), ("lazy:4", 398163874)],
)
def test_tokens_of_the_previous_version_replay_the_values_it_gave(token, crc):
    """Pinned: these values are what the scheduler before the policy registry (one class, string
    branches) computed for these tokens; the policies must keep them bit for bit."""
    import zlib

    seed = int(token.split(":")[1])
    values = fake.replay(random_program(seed, ordered=False), token).values
    assert zlib.crc32(repr([t.tolist() if isinstance(t, torch.Tensor) else t for t in values]).encode()) == crc
