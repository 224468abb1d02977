"""Race-detector scenarios on the fake backend.

Each scenario is a small stream program: it asserts either that no race is reported, or exactly
which race is (both accesses' op, kind, stream and source line). Expected lines come from marker
comments (``# <name>``) found in this file by :func:`line_of`, never from hard-coded numbers.

Most scenarios share one of two shapes and are written as tables: a program function registered
with ``@races(first, second)`` (run in raise mode: the second access raises, and the race names
both accesses) or with ``@ordered(expect)`` (no race; the program's result equals what plain CPU
torch computes). The runners, ``test_race_is_reported`` and ``test_ordered_program_has_no_race``,
are at the end of the file; the test ids are the program names. Scenarios of any other shape are
ordinary tests.

Tensors that cross streams are freed only once nothing unordered touches them any more (or the
test is about exactly that), so that the allocator's free check stays quiet where it should.
"""

from __future__ import annotations

import inspect
import os
import sys
import threading
import warnings
from types import SimpleNamespace

import pytest
import torch

import streamkit as sk
from _support import marker_line
from streamkit import fake

HERE = os.path.realpath(__file__)
BASENAME = os.path.basename(__file__)


def line_of(marker: str) -> int:
    """The line number of the unique line of this file that ends with the comment ``# <marker>``."""
    return marker_line(__file__, marker)


def check_access(access, *, kind, stream, marker, op=None):
    """Assert one side of a race: kind, stream, op (when given) and the user source line."""
    assert access.kind == kind, f"kind: expected {kind!r}, got {access.kind!r} ({access})"
    assert access.stream == stream, f"stream: expected {stream!r}, got {access.stream!r}"
    if op is not None:
        assert access.op == op, f"op: expected {op!r}, got {access.op!r}"
    assert isinstance(access.op, str) and access.op
    line = line_of(marker)
    assert access.lineno == line, f"line: expected {BASENAME}:{line} ({marker}), got {access.location}"
    assert access.filename is not None and os.path.realpath(access.filename) == HERE
    assert access.location == f"{BASENAME}:{line}"


def check_race(race, *, first, second, shape=None, dtype=None):
    """``first``/``second``: dicts of check_access keyword arguments."""
    assert isinstance(race, fake.Race)
    check_access(race.first, **first)
    check_access(race.second, **second)
    if shape is not None:
        assert tuple(race.tensor.shape) == tuple(shape)
    if dtype is not None:
        assert race.tensor.dtype == dtype


def one_race(session):
    assert len(session.races) == 1, "expected exactly one race, got:\n" + "\n\n".join(map(str, session.races))
    return session.races[0]


def no_races(session):
    assert session.races == [], "expected no race, got:\n" + "\n\n".join(map(str, session.races))


def setup(session, *shape):
    """default stream, a new side stream, and a ones() tensor whose initialization the side
    stream is ordered after (so only what the test does next can race)."""
    default = sk.current_stream()
    side = sk.Stream()
    x = torch.ones(*(shape or (16,)), device=session.device)
    side.wait_stream(default)
    return default, side, x


# =================================================================================================
# the two tables: programs that race, programs that are ordered
# =================================================================================================

RACES = []  # pytest.param(program, first, second, x_shape, detect, checks)
ORDERED = []  # pytest.param(program, x_shape, detect, expect)


def races(first, second, *, x_shape=(16,), detect="raise", **checks):
    """Register ``program(t)`` for :func:`test_race_is_reported`. It runs on ``t`` (``t.s`` a fake
    session in ``detect`` mode; ``t.default``, ``t.side`` and ``t.x``, of ``x_shape``, as
    :func:`setup` makes them) and makes exactly one race, whose ``first`` and ``second`` accesses
    are ``(kind, stream, marker)`` or ``(kind, stream, marker, op)``, ``stream`` the name of an
    attribute of ``t`` (a program stores there the streams it makes). In raise mode the program's
    last access raises it. ``checks``: the raced tensor's ``shape``/``dtype``; ``fix``, a text the
    suggested fix contains; ``returns``, what the program returns (record mode)."""

    def register(program):
        RACES.append(pytest.param(program, first, second, x_shape, detect, checks, id=program.__name__))
        return program

    return register


def ordered(expect, *, x_shape=(16,), detect="raise"):
    """Register ``program(t)`` for :func:`test_ordered_program_has_no_race`: run on ``t`` as for
    :func:`races`, it returns ``expect`` (what plain CPU torch computes; ``None``: nothing to
    compare) and no race is reported, neither while it runs nor when it is done."""

    def register(program):
        ORDERED.append(pytest.param(program, x_shape, detect, expect, id=program.__name__))
        return program

    return register


# =================================================================================================
# basic orderings between the default stream and a side stream
# =================================================================================================


@races(
    ("write", "default", "nowait-write", "aten.add_.Tensor"),
    ("read", "side", "nowait-read", "aten.sum.default"),
    shape=(16,),  # the raced tensor's
    dtype=torch.float32,
)
def side_reads_default_write_without_wait(t):
    t.x.add_(1)  # <nowait-write>
    with sk.switch(t.side):
        t.x.sum()  # <nowait-read>


@ordered(32.0)
def side_reads_default_write_with_wait_stream(t):
    t.x.add_(1)
    t.side.wait_stream(t.default)
    with sk.switch(t.side):
        total = t.x.sum()
    t.default.wait_stream(t.side)
    return total.item()


@ordered(32.0)
def side_reads_default_write_with_wait_event(t):
    t.x.add_(1)
    ready = sk.Event()
    ready.record()
    t.side.wait_event(ready)
    with sk.switch(t.side):
        total = t.x.sum()
    t.default.wait_stream(t.side)  # before x is freed on default at the end (else: a "free" race)
    return total.item()


@ordered(48.0)
def side_reads_with_event_wait_method(t):
    t.x.mul_(3)
    ev = t.default.record_event()
    ev.wait(t.side)
    with sk.switch(t.side):
        total = t.x.sum()
    t.default.wait_stream(t.side)
    return total.item()


@races(("write", "default", "wrongdir-write"), ("read", "side", "wrongdir-read"))
def wait_in_wrong_direction(t):
    """default.wait_stream(side) orders default after side, not side after default."""
    t.x.add_(1)  # <wrongdir-write>
    t.default.wait_stream(t.side)
    with sk.switch(t.side):
        t.x.sum()  # <wrongdir-read>


@races(("write", "default", "late-write", "aten.add_.Tensor"), ("read", "side", "late-read"))
def wait_stream_only_covers_work_issued_before_it(t):
    t.side.wait_stream(t.default)
    t.x.add_(1)  # <late-write>
    with sk.switch(t.side):
        t.x.sum()  # <late-read>


@ordered([3.0] * 16)
def ordering_is_transitive(t):
    s1, s2 = t.side, sk.Stream()
    t.x.add_(1)
    s1.wait_stream(t.default)
    with sk.switch(s1):
        t.x.mul_(2)
    s2.wait_stream(s1)  # s2 after s1 after default
    with sk.switch(s2):
        t.x.sub_(1)
    t.default.wait_stream(s2)
    return t.x.tolist()


@races(("write", "side", "rev-write"), ("read", "default", "rev-read"))
def default_reads_side_write_without_wait(t):
    with sk.switch(t.side):
        t.x.add_(5)  # <rev-write>
    t.x.sum()  # <rev-read>


# =================================================================================================
# events
# =================================================================================================


@races(("write", "default", "early-write"), ("read", "side", "early-read"))
def event_recorded_before_the_write(t):
    ev = sk.Event()
    ev.record()  # captures the work *before* the write below
    t.x.add_(1)  # <early-write>
    t.side.wait_event(ev)
    with sk.switch(t.side):
        t.x.sum()  # <early-read>


@races(("write", "default", "rerec-write"), ("read", "side", "rerec-read"))
def rerecord_after_wait_does_not_order_retroactively(t):
    ev = sk.Event()
    ev.record()
    t.side.wait_event(ev)
    t.x.add_(1)  # <rerec-write>
    ev.record()  # too late: the wait above already took the old capture
    with sk.switch(t.side):
        t.x.sum()  # <rerec-read>


@ordered(32.0)
def rerecord_before_a_new_wait_orders(t):
    ev = sk.Event()
    ev.record()
    t.side.wait_event(ev)
    t.x.add_(1)
    ev.record()
    t.side.wait_event(ev)  # a new wait sees the new capture
    with sk.switch(t.side):
        total = t.x.sum()
    t.default.wait_stream(t.side)
    return total.item()


@races(("write", "default", "otherev-write"), ("read", "side", "otherev-read"))
def event_recorded_on_another_stream_does_not_order(t):
    other = sk.Stream()
    t.x.add_(1)  # <otherev-write>
    ev = other.record_event()  # captures `other`, which never saw the write
    t.side.wait_event(ev)
    with sk.switch(t.side):
        t.x.sum()  # <otherev-read>


@races(("write", "default", "unrec-write"), ("read", "side", "unrec-read"))
def wait_on_never_recorded_event_warns_and_orders_nothing(t):
    t.x.add_(1)  # <unrec-write>
    never = sk.Event()
    with pytest.warns(sk.UnrecordedEventWarning):
        t.side.wait_event(never)
    with pytest.warns(sk.UnrecordedEventWarning):
        never.wait(t.side)
    with sk.switch(t.side):
        t.x.sum()  # <unrec-read>


def test_unrecorded_event_warning_points_at_the_caller(fake_session):
    side = sk.Stream()
    never = sk.Event()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        side.wait_event(never)  # <unrec-warn-1>
        never.wait(side)  # <unrec-warn-2>
    got = [(os.path.basename(w.filename), w.lineno) for w in caught if issubclass(w.category, sk.UnrecordedEventWarning)]
    assert got == [(BASENAME, line_of("unrec-warn-1")), (BASENAME, line_of("unrec-warn-2"))]


def test_unrecorded_event_is_a_streamkit_warning():
    assert issubclass(sk.UnrecordedEventWarning, sk.StreamkitWarning)
    assert issubclass(sk.StreamkitWarning, UserWarning)


def test_host_sync_on_never_recorded_event_warns(fake_session):
    """UnrecordedEventWarning's docstring: also when the host synchronizes with such an event."""
    with pytest.warns(sk.UnrecordedEventWarning):
        sk.Event().synchronize()


# =================================================================================================
# host synchronization
# =================================================================================================

def _poll(query) -> bool:
    """Poll until ``query()`` is True (eager: at once; a deferred schedule runs one kernel per
    False answer) and return that True."""
    for _ in range(100):
        if query():
            return True
    raise AssertionError("query() never answered True")


# How the host waits for the default stream's work; what each returns ("query": True, the host may
# rely on the work having completed).
HOST_SYNCS = {
    "stream": (lambda default: default.synchronize(), None),
    "event": (lambda default: default.record_event().synchronize(), None),
    "device": (lambda default: sk.synchronize(), None),
    "query_stream": (lambda default: _poll(default.query), True),
    "query_event": (lambda default: _poll(default.record_event().query), True),
}


@pytest.mark.parametrize("how", list(HOST_SYNCS))
def test_host_sync_orders_later_work_on_other_streams(fake_session, how):
    default, side, x = setup(fake_session)
    x.add_(1)
    sync, returns = HOST_SYNCS[how]
    assert sync(default) is returns
    with sk.switch(side):
        x.mul_(2)
    sk.synchronize()
    assert x.tolist() == [4.0] * 16
    no_races(fake_session)


@races(("write", "default", "wrongsync-write"), ("read", "side", "wrongsync-read"))
def synchronizing_the_wrong_stream_does_not_order(t):
    other = sk.Stream()
    t.x.add_(1)  # <wrongsync-write>
    other.synchronize()
    with sk.switch(t.side):
        t.x.sum()  # <wrongsync-read>


@ordered([6.0] * 8, x_shape=(8,))
def stream_created_after_host_sync_is_ordered_after_it(t):
    t.x.add_(1)
    sk.synchronize()
    late = sk.Stream()
    with sk.switch(late):
        t.x.mul_(3)
    sk.synchronize()
    return t.x.tolist()


@races(("write", "default", "newstream-write"), ("read", "late", "newstream-read"), x_shape=(8,))
def stream_created_after_the_write_without_sync_is_not_ordered(t):
    t.x.add_(1)  # <newstream-write>
    t.late = sk.Stream()  # creating a stream synchronizes nothing
    with sk.switch(t.late):
        t.x.sum()  # <newstream-read>


# =================================================================================================
# kinds of access
# =================================================================================================


@races(("write", "default", "ww-first", "aten.fill_.Scalar"), ("write", "side", "ww-second", "aten.fill_.Scalar"))
def write_write_race(t):
    t.x.fill_(1.0)  # <ww-first>
    with sk.switch(t.side):
        t.x.fill_(2.0)  # <ww-second>


@ordered((16.0, 16.0, 1.0))
def read_read_is_never_a_race(t):
    a = t.x.sum()
    with sk.switch(t.side):
        b = t.x.sum()
        c = t.x * 2
    d = t.x.max()
    t.default.wait_stream(t.side)
    del c
    return a.item(), b.item(), d.item()


@races(("read", "default", "inplace-read", "aten.sum.default"), ("write", "side", "inplace-write", "aten.mul_.Tensor"))
def in_place_op_is_a_write(t):
    t.x.sum()  # <inplace-read>
    with sk.switch(t.side):
        t.x.mul_(2)  # <inplace-write>


@races(("read", "default", "out-read"), ("write", "side", "out-write", "aten.add.out"))
def out_argument_is_a_write(t):
    a = torch.ones(16, device=t.s.device)
    t.side.wait_stream(t.default)
    t.x.sum()  # <out-read>
    with sk.switch(t.side):
        torch.add(a, a, out=t.x)  # <out-write>


@races(("write", "default", "copy-src-write"), ("read", "side", "copy-read", "aten.copy_.default"))
def copy_source_is_a_read(t):
    src = torch.zeros(16, device=t.s.device)
    t.side.wait_stream(t.default)
    src.add_(2)  # <copy-src-write>
    with sk.switch(t.side):
        t.x.copy_(src)  # <copy-read>


@races(("read", "default", "copy-dst-read"), ("write", "side", "copy-write", "aten.copy_.default"))
def copy_destination_is_a_write(t):
    src = torch.zeros(16, device=t.s.device)
    t.side.wait_stream(t.default)
    t.x.sum()  # <copy-dst-read>
    with sk.switch(t.side):
        t.x.copy_(src)  # <copy-write>


@races(("write", "default", "oop-write"), ("read", "side", "oop-read", "aten.add.Tensor"))
def out_of_place_op_reads_its_inputs(t):
    t.x.add_(1)  # <oop-write>
    with sk.switch(t.side):
        _ = t.x + 1  # <oop-read>


@races(("write", "default", "cat-write", "aten.mul_.Tensor"), ("read", "side", "cat-read", "aten.cat.default"))
def tensor_list_arguments_are_read(t):
    b = torch.ones(16, device=t.s.device)
    t.side.wait_stream(t.default)
    b.mul_(3)  # <cat-write>
    with sk.switch(t.side):
        torch.cat([t.x, b])  # <cat-read>


@races(("read", "default", "setitem-read"), ("write", "side", "setitem-write"))
def setitem_is_a_write(t):
    t.x.sum()  # <setitem-read>
    with sk.switch(t.side):
        t.x[0] = 5.0  # <setitem-write>


@races(("write", "default", "clone-write"), ("read", "side", "clone-read", "aten.clone.default"))
def clone_on_side_reads_the_source(t):
    t.x.add_(1)  # <clone-write>
    with sk.switch(t.side):
        t.x.clone()  # <clone-read>


@races(("write", "side", "output-write", "aten.mul.Tensor"), ("read", "default", "output-read", "aten.sum.default"))
def output_is_written_on_the_stream_that_computed_it(t):
    with sk.switch(t.side):
        y = t.x * 2  # <output-write>
    y.sum()  # <output-read>


@ordered(([2.0] * 16, [2.0] * 16))
def different_tensors_do_not_race(t):
    y = torch.ones(16, device=t.s.device)
    t.side.wait_stream(t.default)
    t.x.add_(1)
    with sk.switch(t.side):
        y.add_(1)
    sk.synchronize()
    return t.x.tolist(), y.tolist()


# =================================================================================================
# views
# =================================================================================================


@ordered([2.0] * 8 + [3.0] * 8)
def disjoint_slices_do_not_race(t):
    t.x[:8].add_(1)
    with sk.switch(t.side):
        t.x[8:].add_(2)
    sk.synchronize()
    return t.x.tolist()


@ordered(5.0 * 16, x_shape=(4, 8))
def disjoint_rows_do_not_race(t):
    t.x[0:2].zero_()
    with sk.switch(t.side):
        t.x[2:4].fill_(5.0)
    sk.synchronize()
    return t.x.sum().item()


@races(("write", "default", "overlap-write", "aten.add_.Tensor"), ("read", "side", "overlap-read", "aten.sum.default"))
def overlapping_views_race(t):
    t.x[:10].add_(1)  # <overlap-write>
    with sk.switch(t.side):
        t.x[6:].sum()  # <overlap-read>


@races(("write", "default", "viewbase-write"), ("read", "side", "viewbase-read"))
def view_and_base_race(t):
    t.x[3:5].zero_()  # <viewbase-write>
    with sk.switch(t.side):
        t.x.sum()  # <viewbase-read>


@races(("write", "default", "reshape-write"), ("read", "side", "reshape-read"), x_shape=(4, 4))
def base_and_reshaped_view_race(t):
    flat = t.x.view(16)
    t.x.mul_(2)  # <reshape-write>
    with sk.switch(t.side):
        flat[5].item()  # <reshape-read>


@ordered(None)
def interleaved_strided_views_do_not_overlap(t):
    """x[::2] and x[1::2] share no element: no race (exact strided overlap; more in
    tests/fidelity/test_strided_overlap.py)."""
    t.x[::2].add_(1)
    with sk.switch(t.side):
        t.x[1::2].add_(1)
    sk.current_stream().wait_stream(t.side)


@races(("write", "default", "stride-write"), ("write", "side", "stride-write2"))
def strided_views_sharing_an_element_overlap(t):
    """x[::2] and x[2::4] share elements: a race."""
    t.x[::2].add_(1)  # <stride-write>
    with sk.switch(t.side):
        t.x[2::4].add_(1)  # <stride-write2>


# =================================================================================================
# host reads and copies
# =================================================================================================

# Host reads of a tensor of 4: each is a device read on the current stream.
HOST_READS = {
    "cpu": lambda x: x.cpu(),  # <hostread-cpu>
    "item": lambda x: x[0].item(),  # <hostread-item>
    "tolist": lambda x: x.tolist(),  # <hostread-tolist>
    "print": lambda x: print(x),  # <hostread-print>
    "repr": lambda x: repr(x),  # <hostread-repr>
    "to_cpu": lambda x: x.to("cpu"),  # <hostread-to_cpu>
    "float": lambda x: float(x[1]),  # <hostread-float>
    "bool": lambda x: bool(x.any()),  # <hostread-bool>
}


@pytest.mark.parametrize("how", list(HOST_READS))
def test_host_read_on_stream_that_did_not_wait(fake_session, how, capsys):
    default, side, x = setup(fake_session, 4)
    x.add_(1)  # <hostread-write>
    with pytest.raises(sk.RaceError) as info:
        with sk.switch(side):
            HOST_READS[how](x)
    check_race(
        info.value.race,
        first=dict(kind="write", stream=default, marker="hostread-write"),
        second=dict(kind="read", stream=side, marker=f"hostread-{how}"),
    )


@ordered(([2.0] * 16, 64.0))
def blocking_cpu_counts_a_host_sync_and_orders_the_host(t):
    before = t.s.stats.copy()
    with sk.switch(t.side):
        t.x.add_(1)
        host = t.x.cpu()
    delta = t.s.stats - before
    assert delta.blocking_copies == 1
    assert delta.host_syncs == 1
    assert host.device.type == "cpu"
    # the host waited for side: work it issues now on any stream is ordered after side's add_
    t.x.mul_(2)
    return host.tolist(), t.x.sum().item()


@races(("read", "side", "nb-read"), ("write", "default", "nb-write", "aten.add_.Tensor"))
def non_blocking_copy_to_host_does_not_sync(t):
    before = t.s.stats.copy()
    with sk.switch(t.side):
        t.staged = t.x.to("cpu", non_blocking=True)  # <nb-read>
    delta = t.s.stats - before
    assert delta.blocking_copies == 0
    assert delta.host_syncs == 0
    t.x.add_(1)  # <nb-write>


def test_host_to_device_copy(fake_session):
    host = torch.arange(6, dtype=torch.float32)
    before = fake_session.stats.copy()
    x = host.to(fake_session.device)
    assert (fake_session.stats - before).blocking_copies == 1
    assert x.device == fake_session.device
    assert x.device.type == "fake"
    assert x.shape == (6,)
    assert torch.equal(fake.peek(x), host)
    host.add_(100)  # the copy is a copy: later host writes don't reach it
    assert x.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    no_races(fake_session)


@ordered(15.0, x_shape=(6,))
def blocking_host_to_device_copy_on_side_orders_the_host(t):
    with sk.switch(t.side):
        t.x.copy_(torch.arange(6, dtype=torch.float32))  # blocking H2D on side: host waits for it
    return t.x.sum().item()  # default stream, after the host sync


@races(("write", "side", "h2d-nb-write"), ("read", "default", "h2d-nb-read"), x_shape=(6,))
def non_blocking_host_to_device_copy_on_side_races(t):
    before = t.s.stats.copy()
    with sk.switch(t.side):
        t.x.copy_(torch.ones(6), non_blocking=True)  # <h2d-nb-write>
    assert (t.s.stats - before).host_syncs == 0
    t.x.sum()  # <h2d-nb-read>


@ordered(6.0)
def to_device_on_side_stream_blocking_orders_the_host(t):
    with sk.switch(t.side):
        y = torch.arange(4, dtype=torch.float32).to(t.s.device)  # blocking H2D on side
    total = y.sum().item()  # default stream: ordered by the host sync
    sk.synchronize()  # y was allocated on side and used on default: sync before it is freed
    del y
    return total


@races(("write", "side", "tonb-write"), ("read", "default", "tonb-read"), detect="record")
def to_device_non_blocking_on_side_stream_races(t):
    before = t.s.stats.copy()
    with sk.switch(t.side):
        y = torch.arange(4, dtype=torch.float32).to(t.s.device, non_blocking=True)  # <tonb-write>
    assert (t.s.stats - before).host_syncs == 0
    y.sum()  # <tonb-read>
    sk.synchronize()
    del y


@ordered((16, 1))
def data_dependent_output_size_is_a_host_sync(t):
    """nonzero() must learn its output size on the host: on CUDA it synchronizes."""
    with sk.switch(t.side):
        t.x.add_(1)
        before = t.s.stats.copy()
        idx = torch.nonzero(t.x)
        assert (t.s.stats - before).host_syncs == 1
    t.x.sum()  # the host waited for side: add_ is ordered before this read (nonzero's own second
    # read of x, after its sync, is not: a write here would race with it, tests/fidelity/test_host_syncs.py)
    sk.synchronize()
    return tuple(idx.shape)


def test_fake_tensor_with_non_scalar_cpu_tensor_raises(fake_session):
    x = torch.ones(4, device=fake_session.device)
    with pytest.raises(RuntimeError, match="same device"):
        x + torch.ones(4)
    with pytest.raises(RuntimeError, match="same device"):
        torch.ones(4) * x
    with pytest.raises(RuntimeError, match="same device"):
        x.add_(torch.ones(4))
    # a 0-dim CPU tensor is a scalar: allowed, as on CUDA
    assert (x + torch.tensor(2.0)).tolist() == [3.0] * 4


def test_numpy_raises_type_error(fake_session):
    x = torch.ones(4, device=fake_session.device)
    with pytest.raises(TypeError, match="cpu"):
        x.numpy()
    assert x.cpu().numpy().tolist() == [1.0] * 4


@ordered([2.0] * 16)
def peek_is_untracked(t):
    t.x.add_(1)
    before = t.s.stats.copy()
    with sk.switch(t.side):
        values = fake.peek(t.x)  # no access, no race, no sync
    assert values.device.type == "cpu"
    delta = t.s.stats - before
    assert delta.kernels == 0 and delta.host_syncs == 0
    return values.tolist()


# =================================================================================================
# detect modes and the report
# =================================================================================================


@pytest.mark.eager_only("asserts the values of the eager order of a racy program (record mode goes on)")
def test_record_mode_collects_races_and_goes_on():
    with fake.session(detect="record") as s:
        default = sk.current_stream()
        side = sk.Stream()
        a = torch.ones(8, device=s.device)
        b = torch.ones(8, device=s.device)
        side.wait_stream(default)
        a.add_(1)  # <rec-a-write>
        b.add_(1)  # <rec-b-write>
        with sk.switch(side):
            a.mul_(10)  # <rec-a-write2>
            total = b.sum()  # <rec-b-read>
        default.wait_stream(side)
        values = a.tolist()  # execution went on: the eager scheduler ran everything
        got_total = total.item()
        del total
        races = list(s.races)
    assert values == [20.0] * 8
    assert got_total == 16.0
    assert len(races) == 2, "\n\n".join(map(str, races))
    check_race(
        races[0],
        first=dict(kind="write", stream=default, marker="rec-a-write"),
        second=dict(kind="write", stream=side, marker="rec-a-write2", op="aten.mul_.Tensor"),
    )
    check_race(
        races[1],
        first=dict(kind="write", stream=default, marker="rec-b-write"),
        second=dict(kind="read", stream=side, marker="rec-b-read", op="aten.sum.default"),
    )


def test_record_mode_reports_a_repeated_race_once_per_site():
    with fake.session(detect="record") as s:
        default = sk.current_stream()
        side = sk.Stream()
        x = torch.ones(8, device=s.device)
        side.wait_stream(default)
        for _ in range(3):
            x.add_(1)
            with sk.switch(side):
                x.sum()
            default.wait_stream(side)
        sk.synchronize()
        n = len(s.races)
    assert n == 1


@pytest.mark.eager_only("asserts the eager value of an unchecked race (mul_ on side after add_ on default)")
def test_detect_off_records_nothing():
    with fake.session(detect="off") as s:
        side = sk.Stream()
        x = torch.ones(8, device=s.device)
        x.add_(1)
        with sk.switch(side):
            x.mul_(2)  # a race, unchecked
            y = x.sum()
        assert s.races == []
        assert y.item() == 32.0
        assert s.stats.kernels > 0  # stats still count
    assert s.races == []


def test_invalid_detect_mode():
    with pytest.raises(ValueError, match="detect"):
        with fake.session(detect="warn"):
            pass


def test_race_error_report(fake_session):
    default = sk.current_stream()
    side = sk.Stream()
    x = torch.zeros(3, 7, device=fake_session.device)  # <report-alloc>
    side.wait_stream(default)
    x.add_(1)  # <report-write>
    with pytest.raises(sk.RaceError) as info:
        with sk.switch(side):
            x.sum()  # <report-read>
    err = info.value
    assert isinstance(err, RuntimeError)
    assert isinstance(err, sk.StreamkitError)
    race = err.race
    assert str(err) == str(race)
    text = str(race)
    w, r = line_of("report-write"), line_of("report-read")
    assert f"{BASENAME}:{w}" in text
    assert f"{BASENAME}:{r}" in text
    assert "read" in text and "write" in text
    assert "aten.add_.Tensor" in text and "aten.sum.default" in text
    # both streams are described: the default stream, and the side stream by its name
    assert "default" in text
    assert "side" in text
    # the tensor
    assert "3, 7" in text
    assert "float32" in text
    assert tuple(race.tensor.shape) == (3, 7)
    assert race.tensor.dtype == torch.float32
    assert str(line_of("report-alloc")) in str(race.tensor.allocated_at)
    # a fix line
    fix_lines = [line for line in text.splitlines() if "wait_stream" in line]
    assert fix_lines, text
    assert "wait_stream" in race.fix
    assert race.fix in text


def test_access_stack_is_user_code_innermost_last(fake_session):
    default, side, x = setup(fake_session)

    def produce():
        x.add_(1)  # <stack-write>

    produce()  # <stack-write-caller>
    with pytest.raises(sk.RaceError) as info:
        with sk.switch(side):
            x.sum()  # <stack-read>
    race = info.value.race
    stack = race.first.stack
    assert all(hasattr(f, "filename") and hasattr(f, "lineno") for f in stack)
    assert stack[-1].lineno == line_of("stack-write")
    assert stack[-1].name == "produce"
    assert [f.lineno for f in stack[-2:]] == [line_of("stack-write-caller"), line_of("stack-write")]
    torch_dir = os.path.dirname(os.path.realpath(torch.__file__)) + os.sep
    sk_dir = os.path.dirname(os.path.realpath(sk.__file__)) + os.sep
    for access in (race.first, race.second):
        for frame in access.stack:
            path = os.path.realpath(frame.filename)
            assert not path.startswith(torch_dir), frame
            assert not path.startswith(sk_dir), frame
    assert race.second.stack[-1].lineno == line_of("stack-read")


def test_race_is_raised_at_the_second_access_only(fake_session):
    default, side, x = setup(fake_session)
    x.add_(1)  # the first access raises nothing
    with sk.switch(side):
        ok = torch.ones(3, device=fake_session.device).sum()  # unrelated work: no race
        with pytest.raises(sk.RaceError):
            x.sum()
    del ok


def test_deep_call_stack_still_finds_the_user_line(fake_session):
    default, side, x = setup(fake_session)
    x.add_(1)  # <deep-write>

    def nest(n):
        if n == 0:
            with sk.switch(side):
                return x.sum()  # <deep-read>
        return nest(n - 1)

    with pytest.raises(sk.RaceError) as info:
        nest(12)
    check_access(info.value.race.second, kind="read", stream=side, marker="deep-read")


def test_race_inside_nested_torch_modules_points_at_the_user_call():
    """The op runs ~10 Python frames below the user's line (Module.__call__ chains): the report
    must still name the user's line, not a torch.nn frame."""
    with fake.session(detect="record") as s:
        default = sk.current_stream()
        side = sk.Stream()
        model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(4, 4)), torch.nn.ReLU()).to(s.device)
        x = torch.ones(2, 4, device=s.device)
        side.wait_stream(default)
        x.add_(1)  # <module-write>
        with sk.switch(side):
            y = model(x)  # <module-read>
        sk.synchronize()
        races = list(s.races)
        del y
    assert len(races) == 1, "\n\n".join(map(str, races))
    check_race(
        races[0],
        first=dict(kind="write", stream=default, marker="module-write"),
        second=dict(kind="read", stream=side, marker="module-read"),
    )
    assert f"{BASENAME}:{line_of('module-read')}" in str(races[0])


# =================================================================================================
# threads
# =================================================================================================


def _run_thread(fn):
    errors = []

    def target():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=target)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive()
    return errors


@races(("write", "sa", "thr-write"), ("read", "sb", "thr-read"), x_shape=(32,), detect="record")
def threads_with_own_streams_race(t):
    t.sa, t.sb = sk.Stream(), sk.Stream()
    t.sa.wait_stream(t.default)
    t.sb.wait_stream(t.default)

    def writer():
        with sk.switch(t.sa):
            t.x.add_(1)  # <thr-write>

    def reader():
        assert sk.current_stream() == t.default  # a new thread starts on the default stream
        with sk.switch(t.sb):
            t.x.sum()  # <thr-read>

    assert _run_thread(writer) == []
    assert _run_thread(reader) == []  # thread join orders the host threads, not the streams
    sk.synchronize()


@ordered(64.0, x_shape=(32,), detect="record")
def threads_with_own_streams_and_an_event_do_not_race(t):
    sa, sb = t.side, sk.Stream()  # sa waited for x's initialization, sb did not
    box = {}

    def writer():
        with sk.switch(sa):
            t.x.add_(1)
            box["done"] = sk.current_stream().record_event()

    def reader():
        with sk.switch(sb):
            sb.wait_event(box["done"])
            box["sum"] = t.x.sum()

    assert _run_thread(writer) == []
    assert _run_thread(reader) == []
    sk.synchronize()
    return box.pop("sum").item()


@races(("write", "side", "thrdef-write"), ("read", "default", "thrdef-read"), x_shape=(8,), detect="record")
def thread_without_switch_runs_on_the_default_stream(t):
    """Main thread writes inside switch(side); a new thread's op runs on the default stream."""
    with sk.switch(t.side):
        t.x.add_(1)  # <thrdef-write>

        def reader():
            t.x.sum()  # <thrdef-read>

        assert _run_thread(reader) == []
    sk.synchronize()


@ordered({i: 800.0 for i in range(4)}, detect="record")
def concurrent_threads_on_their_own_streams_and_tensors(t):
    shared = torch.full((8,), 2.0, device=t.s.device)
    streams = [sk.Stream() for _ in range(4)]
    for st in streams:
        st.wait_stream(t.default)
    barrier = threading.Barrier(len(streams))
    results = {}

    def worker(i):
        with sk.switch(streams[i]):
            own = torch.zeros(8, device=t.s.device)
            barrier.wait(timeout=30)
            for _ in range(50):
                own.add_(shared)  # everyone reads `shared`: read-read, never a race
            results[i] = own.sum().item()  # a blocking copy on this thread's stream

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(streams))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    sk.synchronize()
    return results


def test_raise_mode_in_a_thread(fake_session):
    default, side, x = setup(fake_session)
    x.add_(1)

    def reader():
        with sk.switch(side):
            x.sum()

    errors = _run_thread(reader)
    assert len(errors) == 1 and isinstance(errors[0], sk.RaceError)
    assert errors[0].race.second.stream == side


# =================================================================================================
# freeing memory still in use by another stream
# =================================================================================================


@races(
    ("read", "side", "free-use", "aten.mul.Tensor"),
    ("free", "default", "free-free"),
    x_shape=(64,),
    detect="record",
    fix="record_stream",
)
def free_while_side_stream_still_reads(t):
    with sk.switch(t.side):
        t.y = t.x * 2  # <free-use>
    del t.x  # <free-free>


@races(("read", "side", "view-use"), ("free", "default", "view-free"), x_shape=(64,), detect="record")
def a_live_view_keeps_the_memory(t):
    v = t.x[8:]
    with sk.switch(t.side):
        v.sum()  # <view-use>
    del t.x  # the view still holds the memory: no free yet
    assert t.s.races == []
    del v  # <view-free>


@races(("read", "side", "ret-use"), ("free", "default", "ret-call"), detect="record")
def free_at_function_return_points_at_the_call(t):
    def work():
        x = torch.ones(8, device=t.s.device)
        t.side.wait_stream(t.default)
        with sk.switch(t.side):
            x.sum()  # <ret-use>
        # x is freed when work() returns

    work()  # <ret-call>


@ordered(None, x_shape=(64,), detect="record")
def free_with_record_stream_is_ok(t):
    with sk.switch(t.side):
        y = t.x * 2
    sk.record_stream(t.x, t.side)
    del t.x
    del y


@ordered(None, x_shape=(64,), detect="record")
def free_after_waiting_for_the_user_is_ok(t):
    with sk.switch(t.side):
        y = t.x * 2
    t.default.wait_stream(t.side)
    del t.x
    del y


@races(("read", "default", "free2-use"), ("free", "side", "free2-free"), x_shape=(64,), detect="record", returns=128.0)
def free_of_side_allocated_tensor_used_on_default(t):
    """The classic: allocated on side, consumed on default, freed without record_stream."""
    with sk.switch(t.side):
        y = t.x + 1  # allocated on side
    t.default.wait_stream(t.side)
    total = y.sum()  # <free2-use>
    del y  # <free2-free>
    return total.item()


@ordered(128.0, x_shape=(64,), detect="record")
def free_of_side_allocated_tensor_with_record_stream_is_ok(t):
    with sk.switch(t.side):
        y = t.x + 1
    t.default.wait_stream(t.side)
    total = y.sum()
    sk.record_stream(y, t.default)
    del y
    return total.item()


def test_free_race_in_raise_mode_is_raised():
    """A free can't raise from the finalizer: raise mode must still surface it (at the next
    stream operation or when the session ends), never drop it."""
    with pytest.raises(sk.RaceError) as info:
        with fake.session(detect="raise"):
            default = sk.current_stream()
            side = sk.Stream()
            x = torch.ones(64, device=sk.device())
            side.wait_stream(default)
            with sk.switch(side):
                y = x * 2
            del x
            sk.synchronize()
            del y
    assert info.value.race.second.kind == "free"


# =================================================================================================
# sessions and backends
# =================================================================================================


@pytest.fixture(params=["raise", "off"])
def closed(request):
    """A stream, an event recorded on it, and a tensor, of a fake session that has ended."""
    with fake.session(detect=request.param) as s:
        st = sk.Stream()
        ev = sk.Event()
        ev.record(st)
        x = torch.ones(2, device=s.device)
    assert sk.get_backend().session is not s
    return st, ev, x


def _in_new_session(fn):
    with fake.session():
        fn()


_CLOSED_USES = {
    "stream.synchronize": lambda st, ev, x: st.synchronize(),
    "stream.query": lambda st, ev, x: st.query(),
    "stream.record_event": lambda st, ev, x: st.record_event(),
    "stream.wait_stream": lambda st, ev, x: st.wait_stream(st),
    "stream.wait_event": lambda st, ev, x: st.wait_event(ev),
    "switch": lambda st, ev, x: sk.switch(st).__enter__(),
    "event.synchronize": lambda st, ev, x: ev.synchronize(),
    "event.query": lambda st, ev, x: ev.query(),
    "event.record": lambda st, ev, x: ev.record(),
    "event.record(stream)": lambda st, ev, x: ev.record(st),
    "event.wait": lambda st, ev, x: ev.wait(),
    "record_stream": lambda st, ev, x: sk.record_stream(x, st),
    "tensor.sum": lambda st, ev, x: x.sum(),
    "tensor.add_": lambda st, ev, x: x.add_(1),
    "tensor + 1": lambda st, ev, x: x + 1,
    "tensor * tensor": lambda st, ev, x: x * x,
    "tensor.cpu": lambda st, ev, x: x.cpu(),
    "tensor.sum in a new session": lambda st, ev, x: _in_new_session(x.sum),
    "tensor + 1 in a new session": lambda st, ev, x: _in_new_session(lambda: x + 1),
}
# (A stream or event of an ended session used inside a new session works there as its own:
# tests/fidelity/test_handles.py.)


@pytest.mark.parametrize("use", list(_CLOSED_USES))
def test_using_a_closed_session_raises_session_closed_error(closed, use):
    st, ev, x = closed
    with pytest.raises(sk.SessionClosedError):
        _CLOSED_USES[use](st, ev, x)


def test_session_closed_error_hierarchy():
    # (Whether BackendMismatchError is also a TypeError is not asserted: torch turns a TypeError
    # raised inside Tensor.__add__ & co. into NotImplemented, which would hide the real error of
    # `closed_tensor + 1`; the "tensor + 1" case above checks the error that surfaces.)
    assert issubclass(sk.SessionClosedError, sk.BackendMismatchError)
    assert issubclass(sk.BackendMismatchError, sk.StreamkitError)
    assert issubclass(sk.BackendMismatchError, RuntimeError)


def test_session_cannot_be_reopened_or_nested():
    with fake.session() as s:
        with pytest.raises(sk.StreamkitError):
            with fake.session():
                pass
        assert sk.get_backend() is s.backend
    with pytest.raises(sk.SessionClosedError):
        with s:
            pass


def test_explicit_session_and_default_session_share_one_fake_backend():
    """Streams are handles: one made in the default session binds to an explicit session on use
    (tests/fidelity/test_handles.py has the races)."""
    with sk.use_backend("fake") as default_session_backend:
        outside = sk.Stream()
    with fake.session() as s:
        assert s.backend is default_session_backend
        inside = sk.Stream()
        inside.wait_stream(outside)
        outside.wait_stream(inside)
        assert outside != inside


def test_default_session_detects_with_raise():
    """Outside any explicit session the fake backend is a process-wide session with detect="raise"."""
    with sk.use_backend("fake"):
        default = sk.current_stream()
        side = sk.Stream()
        x = torch.ones(4, device=sk.device())
        side.wait_stream(default)
        x.add_(1)  # <defsess-write>
        with pytest.raises(sk.RaceError) as info:
            with sk.switch(side):
                x.sum()  # <defsess-read>
        sk.synchronize()
    check_race(
        info.value.race,
        first=dict(kind="write", stream=default, marker="defsess-write"),
        second=dict(kind="read", stream=side, marker="defsess-read"),
    )


def _real_backends():
    return [name for name in ("cuda", "npu") if sk.unavailable_reason(name) is None]


def test_streams_of_two_backends_do_not_mix():
    real = _real_backends()
    if not real:
        pytest.skip(
            "needs a second backend besides fake: "
            + "; ".join(sk.unavailable_reason(name) or name for name in ("cuda", "npu"))
        )
    with sk.use_backend(real[0]):
        real_stream = sk.Stream()
        real_event = sk.Event()
    with fake.session():
        fake_stream = sk.Stream()
        with pytest.raises(sk.BackendMismatchError):
            fake_stream.wait_stream(real_stream)
        with pytest.raises(sk.BackendMismatchError):
            real_stream.wait_stream(fake_stream)
        with pytest.raises(sk.BackendMismatchError):
            fake_stream.wait_event(real_event)
        with pytest.raises(sk.BackendMismatchError):
            real_event.record(fake_stream)
        assert fake_stream != real_stream


# =================================================================================================
# stats
# =================================================================================================


def test_stats_counts(fake_session):
    s = fake_session
    default = sk.current_stream()
    side = sk.Stream()
    x = torch.zeros(8, device=s.device)
    side.wait_stream(default)

    before = s.stats.copy()
    x.add_(1)
    x.mul_(2)
    x.zero_()
    d = s.stats - before
    assert isinstance(d, fake.Stats)
    assert (d.kernels, d.event_records, d.event_waits, d.host_syncs) == (3, 0, 0, 0)
    assert before.kernels == (s.stats - d).kernels  # copy() is a snapshot

    before = s.stats.copy()
    ev = sk.Event()
    ev.record()
    side.record_event()
    side.wait_event(ev)
    d = s.stats - before
    assert (d.kernels, d.event_records, d.event_waits, d.host_syncs) == (0, 2, 1, 0)

    before = s.stats.copy()
    side.synchronize()
    d = s.stats - before
    assert (d.stream_syncs, d.event_syncs, d.device_syncs, d.blocking_copies, d.host_syncs) == (1, 0, 0, 0, 1)

    before = s.stats.copy()
    ev.synchronize()
    d = s.stats - before
    assert (d.stream_syncs, d.event_syncs, d.device_syncs, d.blocking_copies, d.host_syncs) == (0, 1, 0, 0, 1)

    before = s.stats.copy()
    sk.synchronize()
    d = s.stats - before
    assert (d.stream_syncs, d.event_syncs, d.device_syncs, d.blocking_copies, d.host_syncs) == (0, 0, 1, 0, 1)

    before = s.stats.copy()
    x.cpu()
    x[0].item()
    x.tolist()
    d = s.stats - before
    assert (d.stream_syncs, d.event_syncs, d.device_syncs, d.blocking_copies, d.host_syncs) == (0, 0, 0, 3, 3)

    total = s.stats
    assert total.host_syncs == (
        total.blocking_copies + total.stream_syncs + total.event_syncs + total.device_syncs
        + getattr(total, "implicit_syncs", 0)
    )
    no_races(s)


def test_stats_count_in_off_mode():
    with fake.session(detect="off") as s:
        x = torch.ones(4, device=s.device)
        before = s.stats.copy()
        x.add_(1)
        x.cpu()
        sk.synchronize()
        d = s.stats - before
    assert d.kernels >= 2
    assert d.blocking_copies == 1
    assert d.device_syncs == 1


def test_wait_stream_counts_a_wait(fake_session):
    side = sk.Stream()
    before = fake_session.stats.copy()
    side.wait_stream(sk.current_stream())
    d = fake_session.stats - before
    assert d.event_waits == 1
    assert d.host_syncs == 0
    assert d.kernels == 0


# =================================================================================================
# streams: fake-specific facts the conformance suite can't assert everywhere
# =================================================================================================


def test_fake_device(fake_session):
    assert fake_session.device == torch.device("fake:0")
    assert sk.device() == fake_session.device
    assert sk.get_backend() is fake_session.backend
    assert fake_session.backend.name == "fake"
    assert isinstance(fake_session.backend, sk.Backend)


def test_elapsed_time_errors_are_what_cuda_raises(fake_session):
    """torch.cuda.Event.elapsed_time raises ValueError for events without enable_timing on current
    torch (c10/cuda/CUDAEvent.h: TORCH_CHECK_VALUE), RuntimeError on older torch: code catching
    either must work on the fake backend too."""
    a, b = sk.Event(), sk.Event()
    a.record()
    b.record()
    with pytest.raises(RuntimeError):
        a.elapsed_time(b)
    with pytest.raises(ValueError):
        a.elapsed_time(b)


def test_elapsed_time_is_ordered(fake_session):
    a, b, c = (sk.Event(enable_timing=True) for _ in range(3))
    x = torch.ones(64, device=fake_session.device)
    a.record()
    x.add_(1)
    b.record()
    x.add_(1)
    c.record()
    c.synchronize()
    ab, bc, ac = a.elapsed_time(b), b.elapsed_time(c), a.elapsed_time(c)
    assert 0.0 <= ab <= ac and 0.0 <= bc <= ac


# =================================================================================================
# the tables' runners
# =================================================================================================


def _scene(session, x_shape):
    default, side, x = setup(session, *x_shape)
    return SimpleNamespace(s=session, default=default, side=side, x=x)


def _expected_access(t, kind, stream, marker, op=None):
    return dict(kind=kind, stream=getattr(t, stream), marker=marker, op=op)


@pytest.mark.parametrize("program, first, second, x_shape, detect, checks", RACES)
def test_race_is_reported(program, first, second, x_shape, detect, checks):
    checks = dict(checks)
    fix, returns = checks.pop("fix", None), checks.pop("returns", None)
    with fake.session(detect=detect) as s:
        t = _scene(s, x_shape)
        if detect == "raise":
            with pytest.raises(sk.RaceError) as info:
                program(t)
            assert s.races == [info.value.race]
        else:
            assert program(t) == returns
        first, second = _expected_access(t, *first), _expected_access(t, *second)
        if detect == "raise" and first["stream"] != t.default:
            # the first access did run: x may only be freed (on default, at the end) once default is after it
            t.default.wait_stream(first["stream"])
        race = one_race(s)
        check_race(race, first=first, second=second, **checks)
        if fix is not None:
            assert fix in race.fix
        del t


@pytest.mark.parametrize("program, x_shape, detect, expect", ORDERED)
def test_ordered_program_has_no_race(program, x_shape, detect, expect):
    with fake.session(detect=detect) as s:
        t = _scene(s, x_shape)
        assert program(t) == expect
        no_races(s)
    no_races(s)


def test_every_program_is_in_one_table():
    """A program function (one parameter, ``t``) that no decorator registered would never run."""
    tabled = [p.values[0] for p in RACES + ORDERED]
    programs = [f for f in globals().values() if inspect.isfunction(f) and list(inspect.signature(f).parameters) == ["t"]]
    assert sorted(f.__name__ for f in tabled) == sorted(f.__name__ for f in programs)
    assert len(set(tabled)) == len(tabled)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
