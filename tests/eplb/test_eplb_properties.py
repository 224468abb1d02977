"""Conservation, by property: for any sequence of records and collects, every token recorded lands in
exactly one window, per layer and expert, and the whole run is race-free and host-sync-free.

Runs on the fake backend (a fresh ``fake.session(detect="raise")`` per example). The multi-rank
version (per rank, over gloo) is in test_eplb_distributed.py.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streamkit as sk
from streamkit_eplb import HeatCollector


@st.composite
def programs(draw):
    layers = draw(st.integers(1, 4))
    experts = draw(st.integers(1, 6))
    record = st.one_of(
        st.tuples(
            st.just("counts"),
            st.integers(0, layers - 1),
            st.lists(st.integers(0, 2**20), min_size=experts, max_size=experts),
            st.sampled_from([torch.int32, torch.int64]),
            st.booleans(),  # cumulative
            st.booleans(),  # issued from a second user stream
        ),
        st.tuples(
            st.just("topk"),
            st.integers(0, layers - 1),
            st.lists(st.lists(st.integers(-1, experts - 1), min_size=1, max_size=3), max_size=6),
            st.sampled_from([torch.int32, torch.int64]),
            st.just(False),
            st.booleans(),
        ),
    )
    collect = st.tuples(st.just("collect"), st.booleans())  # wait now, or leave it pending
    ops = draw(st.lists(st.one_of(record, record, collect), max_size=25))
    return layers, experts, ops


def _tensor_for(op, experts):
    kind, _layer, values, dtype, cumulative, _other = op
    if kind == "counts":
        t = torch.tensor(values, dtype=torch.int64)
        if cumulative:
            t = t.cumsum(0)
        return t.to(dtype)
    width = max((len(row) for row in values), default=1)
    rows = [row + [-1] * (width - len(row)) for row in values]  # pad ragged rows with -1
    return torch.tensor(rows, dtype=dtype).reshape(len(rows), width)


def _expected_of(op, experts):
    kind, _layer, values, *_ = op
    out = torch.zeros(experts, dtype=torch.int64)
    if kind == "counts":
        out += torch.tensor(values, dtype=torch.int64)
    else:
        for row in values:
            for e in row:
                if e >= 0:
                    out[e] += 1
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs())
def test_every_token_lands_in_exactly_one_window(program):
    from streamkit import fake

    layers, experts, ops = program
    with fake.session(detect="raise") as s:
        dev = s.device
        c = HeatCollector(layers, experts)
        other = sk.Stream()
        expected_windows = []
        current = torch.zeros(layers, experts, dtype=torch.int64)
        grand_total = torch.zeros(layers, experts, dtype=torch.int64)
        handles = []
        syncs = 0
        for op in ops:
            if op[0] == "collect":
                before = s.stats.host_syncs
                handle = c.collect()
                syncs += s.stats.host_syncs - before
                expected_windows.append(current)
                current = torch.zeros(layers, experts, dtype=torch.int64)
                handles.append(handle.wait() if op[1] else handle)
                continue
            kind, layer, _values, _dtype, cumulative, from_other = op
            host = _tensor_for(op, experts)
            current[layer] += _expected_of(op, experts)
            grand_total[layer] += _expected_of(op, experts)
            if from_other:
                other.wait_stream(sk.current_stream())
            with sk.switch(other, enabled=from_other):
                arg = host.to(dev)
                before = s.stats.host_syncs
                if kind == "counts":
                    c.record(layer, arg, cumulative=cumulative)
                else:
                    c.record(layer, topk_ids=arg)
                syncs += s.stats.host_syncs - before
            del arg
        handles.append(c.collect())
        expected_windows.append(current)
        heats = [h.wait() if hasattr(h, "wait") else h for h in handles]
        assert syncs == 0
        assert [h.window for h in heats] == list(range(len(heats)))
        for heat, expected in zip(heats, expected_windows):
            assert heat.load.shape == (layers, 1, experts)
            assert torch.equal(heat.load[:, 0, :], expected)
            assert heat.invalid.sum().item() == 0
        assert torch.equal(torch.stack([h.load[:, 0, :] for h in heats]).sum(0), grand_total)
        assert s.races == []
