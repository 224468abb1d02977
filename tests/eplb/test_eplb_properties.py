"""Conservation, by property: for any sequence of record / step / reset / enable / collect calls, each
Heat equals a host model of the collector's ring of passes (so every token recorded while enabled lands
in exactly one window, unless a reset or the ring dropped it), with no host sync and no race.

Runs on the fake backend (one ``fake.session(detect="raise")`` for all examples; the number of
examples comes from the suite's Hypothesis profile). The multi-rank version (2 gloo ranks, gather
and sum) is in rank_worker.py.
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from streamkit_eplb import HeatCollector


@st.composite
def programs(draw):
    layers = draw(st.integers(1, 3))
    experts = draw(st.integers(1, 5))
    window = draw(st.integers(1, 3))
    record = st.one_of(
        st.tuples(
            st.just("counts"),
            st.integers(0, layers - 1),
            st.lists(st.integers(0, 2**20), min_size=experts, max_size=experts),
            st.booleans(),  # cumulative
        ),
        st.tuples(
            st.just("topk"),
            st.integers(0, layers - 1),
            st.lists(st.lists(st.integers(-1, experts - 1), min_size=2, max_size=2), max_size=5),
            st.one_of(st.none(), st.integers(0, 6)),  # num_tokens
        ),
    )
    other = st.one_of(
        st.tuples(st.just("step")),
        st.tuples(st.just("reset")),
        st.tuples(st.just("enable"), st.booleans()),
        st.tuples(st.just("collect"), st.booleans(), st.booleans(), st.booleans()),  # passes, reset, wait now
    )
    ops = draw(st.lists(st.one_of(record, record, other), max_size=20))
    return layers, experts, window, ops


def _contribution(op, experts):
    out = torch.zeros(experts, dtype=torch.int64)
    if op[0] == "counts":
        return out + torch.tensor(op[2], dtype=torch.int64)
    rows = op[2] if op[3] is None else op[2][: op[3]]
    for row in rows:
        for e in row:
            if e >= 0:
                out[e] += 1
    return out


def test_every_heat_equals_the_host_model_of_the_ring():
    from streamkit import fake

    # one session for all examples: closing a session runs a full gc.collect() (~0.2 s here)
    with fake.session(detect="raise") as s:
        _run_programs(s)


def _run_programs(s) -> None:
    @given(programs())
    def check(program):
        _check_program(s, program)

    check()


def _check_program(s, program) -> None:
    layers, experts, window, ops = program
    dev = s.device
    c = HeatCollector(layers, experts, window=window)
    ring = torch.zeros(window, layers, experts, dtype=torch.int64)
    index, enabled = 0, True
    pending, expected = [], []
    syncs = 0
    for op in ops:
        before = s.stats.host_syncs
        if op[0] == "step":
            c.step()
            index = (index + 1) % window
            ring[index] = 0
        elif op[0] == "reset":
            c.reset()
            ring.zero_()
        elif op[0] == "enable":
            c.enabled = enabled = op[1]
        elif op[0] == "collect":
            _, passes, reset, wait_now = op
            handle = c.collect(passes=passes, reset=reset)
            syncs += s.stats.host_syncs - before
            before = s.stats.host_syncs  # wait() below is the one host sync, by design
            order = (torch.arange(window) + index + 1) % window
            expected.append((ring[order].clone(), passes))
            if reset:
                ring.zero_()
            pending.append(handle.wait() if wait_now else handle)
            continue
        else:
            if enabled:
                ring[index, op[1]] += _contribution(op, experts)
            if op[0] == "counts":
                values = torch.tensor(op[2], dtype=torch.int64)
                arg = (values.cumsum(0) if op[3] else values).to(dev)
                before = s.stats.host_syncs
                c.record(op[1], arg, cumulative=op[3])
            else:
                ids = torch.tensor(op[2], dtype=torch.int64).reshape(len(op[2]), 2).to(dev)
                n = None if op[3] is None else torch.tensor(op[3]).to(dev)
                before = s.stats.host_syncs
                c.record(op[1], topk_ids=ids, num_tokens=n)
        syncs += s.stats.host_syncs - before
    heats = [h.wait() if hasattr(h, "wait") else h for h in pending]
    assert syncs == 0
    assert [h.window for h in heats] == list(range(len(heats)))
    for heat, (snapshot, passes) in zip(heats, expected):
        assert torch.equal(heat.load[:, 0, :], snapshot.sum(0))
        if passes:
            assert torch.equal(heat.passes[:, :, 0, :], snapshot)
        else:
            assert heat.passes is None
        assert heat.invalid.sum().item() == 0
    assert s.races == []
