"""Recycled blocks under deferred schedules: a freed block goes back to its stream's pool and the
next allocation there shares its memory, poisoned at reuse; a still-queued kernel of the old owner
reaches the new owner's data unless record_stream (and the wait it needs) keeps the block back."""

from __future__ import annotations

import math

import torch

import streamkit as sk
from streamkit import fake

N = 256


def freed_while_side_reads(record_stream: bool, join_before_free: bool = False):
    """The side stream sums ``x``; the default stream frees ``x`` and fills a new same-size
    allocation with 7. Without record_stream (and without the join) that's a free race."""

    def fn():
        side = sk.Stream()
        x = torch.full((N,), 1.0, device=sk.device())
        side.wait_stream(sk.current_stream())
        with sk.switch(side):
            total = x.sum()
        if record_stream:
            x.record_stream(side)
        if join_before_free:
            sk.current_stream().wait_stream(side)
        del x
        y = torch.empty(N, device=sk.device())
        y.fill_(7.0)
        sk.current_stream().wait_stream(side)
        return total.item(), y.sum().item()

    return fn


def test_without_record_stream_the_queued_read_sees_the_new_owners_data():
    found = fake.explore(freed_while_side_reads(record_stream=False), schedules=12)
    assert found.reference.values == (float(N), 7.0 * N)
    assert not found.ok
    totals = [run.values[0] for run in found.runs if run.error is None]
    assert 7.0 * N in totals  # the side stream's sum ran after the new owner's fill
    assert any(math.isnan(t) for t in totals)  # ... or after the poison written at reuse
    assert all(run.values[1] == 7.0 * N for run in found.runs)  # the new owner's own values are right


def test_with_record_stream_it_is_right_under_every_schedule():
    for join in (False, True):
        found = fake.explore(freed_while_side_reads(record_stream=True, join_before_free=join), schedules=20)
        assert found.ok, found.explain()
        assert all(run.values == (float(N), 7.0 * N) for run in found.runs)


def test_a_block_ordered_before_the_reuse_is_shared_and_poisoned_at_reuse():
    for schedule in ("lazy", "adversarial", "random"):
        with fake.session(schedule=schedule, seed=3):
            side = sk.Stream()
            x = torch.full((N,), 1.0, device=sk.device())
            side.wait_stream(sk.current_stream())
            with sk.switch(side):
                total = x.sum()  # queued (lazy): it must run before the reuse poisons the memory
            x.record_stream(side)
            sk.current_stream().wait_stream(side)
            ptr = x.sk_inner.untyped_storage().data_ptr()
            del x
            y = torch.empty(N, device=sk.device())
            assert y.sk_inner.untyped_storage().data_ptr() == ptr  # the same memory
            assert y.cpu().isnan().all()  # poisoned at reuse
            assert total.item() == float(N)  # the old owner's read ran first


def test_eager_recycling_keeps_fresh_memory():
    with fake.session(schedule="eager"):
        x = torch.full((N,), 1.0, device=sk.device())
        del x
        y = torch.empty(N, device=sk.device())
        assert y.sk_state.prior  # the allocator handed over the block's history
        assert getattr(y.sk_state, "mem", None) is None  # and no memory: eager has nothing queued to reach it
