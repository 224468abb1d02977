"""Stream-semantics conformance suite, written once against the ``streamkit_backend`` fixture.

Every test runs on each available backend (``cuda`` on a GPU box, ``npu`` on Ascend, ``fake``
everywhere). Only behaviour that real CUDA streams have is asserted here: anything the fake backend
does beyond that (race detection, stats) is tested in ``tests/detector``.

On ``fake`` the fixture opens ``fake.session(detect="raise")``, so every test here is also a check
that correctly synchronized code raises no race. Tensors that cross streams are therefore either
allocated on the stream that frees them, or freed after a host synchronization.
"""

from __future__ import annotations

import threading
import warnings

import pytest
import torch

import streamkit as sk


def _run_in_thread(fn):
    """Run ``fn`` in a new thread; return its result or re-raise its exception here."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive(), "worker thread hung"
    if "error" in box:
        raise box["error"]
    return box["result"]


# --------------------------------------------------------------------------------------------------
# backend / device
# --------------------------------------------------------------------------------------------------


def test_fixture_yields_the_active_backend(streamkit_backend):
    assert isinstance(streamkit_backend, sk.Backend)
    assert streamkit_backend.name in ("cuda", "npu", "fake")
    assert sk.get_backend() is streamkit_backend
    assert sk.device() == streamkit_backend.device()
    assert isinstance(sk.device(), torch.device)
    assert sk.device().type == streamkit_backend.name


def test_tensor_on_device(streamkit_backend):
    x = torch.ones(2, 3, device=sk.device())
    assert x.device.type == streamkit_backend.name
    assert x.shape == (2, 3)
    assert (x * 2).sum().item() == 12.0


@pytest.mark.parametrize(
    "factory",
    [
        pytest.param(lambda dev: torch.arange(6, dtype=torch.float32, device=dev), id="arange"),
        pytest.param(lambda dev: torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0], device=dev), id="tensor"),
        pytest.param(lambda dev: torch.linspace(0, 5, 6, device=dev), id="linspace"),
        pytest.param(lambda dev: torch.arange(6, dtype=torch.float32).to(dev), id="to"),
        pytest.param(lambda dev: torch.as_tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0], device=dev), id="as_tensor"),
    ],
)
def test_factories_on_device(streamkit_backend, factory):
    x = factory(sk.device())
    assert x.device.type == streamkit_backend.name
    assert x.shape == (6,)
    assert x.dtype == torch.float32
    assert x.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_available_backends_lists_the_running_one(streamkit_backend):
    names = sk.available_backends()
    assert streamkit_backend.name in names
    assert names == [n for n in ("npu", "cuda", "fake") if n in names]  # preference order
    assert sk.unavailable_reason(streamkit_backend.name) is None


# --------------------------------------------------------------------------------------------------
# Stream creation, identity, priority
# --------------------------------------------------------------------------------------------------


def test_stream_creation(streamkit_backend):
    s = sk.Stream()
    assert isinstance(s, sk.Stream)
    assert s.backend == streamkit_backend.name
    assert isinstance(repr(s), str)


def test_current_stream_is_default_at_start(streamkit_backend):
    assert sk.current_stream() == sk.default_stream()
    assert isinstance(sk.current_stream(), sk.Stream)


def test_current_stream_twice_compares_equal_and_hashes_equal(streamkit_backend):
    a = sk.current_stream()
    b = sk.current_stream()
    assert a == b
    assert not (a != b)
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert sk.default_stream() == sk.default_stream()
    assert hash(sk.default_stream()) == hash(sk.default_stream())


def test_different_streams_differ(streamkit_backend):
    s1 = sk.Stream()
    s2 = sk.Stream()
    assert s1 != s2
    assert s1 != sk.default_stream()
    assert s2 != sk.current_stream()
    assert s1 == s1
    assert len({s1, s2, sk.default_stream()}) == 3


def test_stream_not_equal_to_other_objects(streamkit_backend):
    s = sk.Stream()
    assert s != 0
    assert s != None  # noqa: E711 - exercising __eq__ with None
    assert s != "stream"
    if s.native is not None:
        # a streamkit.Stream is not its native stream (they are different types)
        assert (s == s.native) is False


def test_stream_usable_as_dict_key(streamkit_backend):
    s = sk.Stream()
    d = {s: "side", sk.default_stream(): "default"}
    with sk.switch(s):
        assert d[sk.current_stream()] == "side"
    assert d[sk.current_stream()] == "default"


def test_default_priority_is_zero(streamkit_backend):
    assert sk.Stream().priority == 0
    assert sk.Stream(priority=0).priority == 0
    assert sk.default_stream().priority == 0


def test_high_priority_stream(streamkit_backend):
    # CUDA: lower number = higher priority; -1 is within the range of every device that
    # supports priorities (cudaDeviceGetStreamPriorityRange gives [0, -N], N >= 1).
    s = sk.Stream(priority=-1)
    assert s.priority == -1
    assert isinstance(s.priority, int)


@pytest.mark.streamkit_backends("cuda", "fake")
def test_out_of_range_priority_is_clamped(streamkit_backend):
    # torch.cuda.Stream: a priority outside the device's range maps to the nearest valid one
    # (0 is the lowest priority on CUDA; the highest is negative).
    assert sk.Stream(priority=7).priority == 0
    highest = sk.Stream(priority=-1000).priority
    assert highest < 0
    assert sk.Stream(priority=-10**6).priority == highest
    assert sk.Stream(priority=highest).priority == highest


def test_priority_keyword_and_positional(streamkit_backend):
    assert sk.Stream(-1).priority == sk.Stream(priority=-1).priority


# --------------------------------------------------------------------------------------------------
# switch()
# --------------------------------------------------------------------------------------------------


def test_switch_sets_and_restores(streamkit_backend):
    s = sk.Stream()
    before = sk.current_stream()
    with sk.switch(s) as got:
        assert got is s
        assert sk.current_stream() == s
        assert sk.current_stream() != before
    assert sk.current_stream() == before


def test_switch_nests(streamkit_backend):
    s1 = sk.Stream()
    s2 = sk.Stream()
    default = sk.default_stream()
    with sk.switch(s1):
        assert sk.current_stream() == s1
        with sk.switch(s2):
            assert sk.current_stream() == s2
            with sk.switch(s1):
                assert sk.current_stream() == s1
            assert sk.current_stream() == s2
        assert sk.current_stream() == s1
        with sk.switch(default):
            assert sk.current_stream() == default
        assert sk.current_stream() == s1
    assert sk.current_stream() == default


def test_switch_restores_on_exception(streamkit_backend):
    s = sk.Stream()
    with pytest.raises(ZeroDivisionError):
        with sk.switch(s):
            assert sk.current_stream() == s
            1 / 0  # noqa: B018
    assert sk.current_stream() == sk.default_stream()


def test_switch_none_does_nothing(streamkit_backend):
    s = sk.Stream()
    with sk.switch(s):
        with sk.switch(None) as got:
            assert got is None
            assert sk.current_stream() == s
        assert sk.current_stream() == s
    with sk.switch(None):
        assert sk.current_stream() == sk.default_stream()


def test_switch_disabled_does_nothing(streamkit_backend):
    s = sk.Stream()
    with sk.switch(s, enabled=False):
        assert sk.current_stream() == sk.default_stream()
    with sk.switch(s, False):
        assert sk.current_stream() == sk.default_stream()
    assert sk.current_stream() == sk.default_stream()


def test_switch_to_current_stream(streamkit_backend):
    cur = sk.current_stream()
    with sk.switch(cur):
        assert sk.current_stream() == cur
    assert sk.current_stream() == cur


def test_work_inside_switch_runs_on_that_stream(streamkit_backend):
    side = sk.Stream()
    x = torch.zeros(8, device=sk.device())
    side.wait_stream(sk.current_stream())
    with sk.switch(side):
        x.add_(3)
    sk.current_stream().wait_stream(side)
    assert x.sum().item() == 24.0


# --------------------------------------------------------------------------------------------------
# threads
# --------------------------------------------------------------------------------------------------


def test_new_thread_starts_on_default_stream(streamkit_backend):
    side = sk.Stream()
    default = sk.default_stream()
    with sk.switch(side):
        in_thread = _run_in_thread(sk.current_stream)
        assert sk.current_stream() == side
    assert in_thread == default
    assert in_thread != side


def test_switch_in_thread_does_not_affect_other_threads(streamkit_backend):
    side = sk.Stream()
    entered = threading.Event()
    release = threading.Event()
    seen = {}

    def worker():
        with sk.switch(side):
            seen["inside"] = sk.current_stream()
            entered.set()
            assert release.wait(timeout=30)
        seen["after"] = sk.current_stream()

    t = threading.Thread(target=worker)
    t.start()
    try:
        assert entered.wait(timeout=30)
        # the worker thread is inside switch(side); this thread is not
        assert sk.current_stream() == sk.default_stream()
    finally:
        release.set()
        t.join(timeout=30)
    assert not t.is_alive()
    assert seen["inside"] == side
    assert seen["after"] == sk.default_stream()


def test_each_thread_has_its_own_current_stream(streamkit_backend):
    streams = [sk.Stream() for _ in range(3)]
    barrier = threading.Barrier(len(streams))
    seen: dict[int, sk.Stream] = {}
    errors: list[BaseException] = []

    def worker(i):
        try:
            with sk.switch(streams[i]):
                barrier.wait(timeout=30)  # all threads are inside their switch at once
                seen[i] = sk.current_stream()
                barrier.wait(timeout=30)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert [seen[i] for i in range(len(streams))] == streams


# --------------------------------------------------------------------------------------------------
# wait_stream / wait_event / record_event
# --------------------------------------------------------------------------------------------------


def test_wait_and_record_return_types(streamkit_backend):
    side = sk.Stream()
    default = sk.current_stream()
    assert side.wait_stream(default) is None
    ev = default.record_event()
    assert isinstance(ev, sk.Event)
    assert ev.backend == streamkit_backend.name
    assert side.wait_event(ev) is None
    given = sk.Event()
    assert default.record_event(given) is given
    assert given.record() is None
    assert given.record(side) is None
    assert given.wait() is None
    assert given.wait(side) is None
    sk.synchronize()


def test_record_event_then_query_and_synchronize(streamkit_backend):
    x = torch.ones(16, device=sk.device())
    x.mul_(2)
    ev = sk.current_stream().record_event()
    assert ev.synchronize() is None
    assert ev.query() is True
    assert x.sum().item() == 32.0


def test_unrecorded_event_query_and_synchronize(streamkit_backend):
    # CUDA: an event that was never recorded has "completed": query() is True and
    # synchronize() returns at once.
    ev = sk.Event()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sk.StreamkitWarning)
        assert ev.synchronize() is None
        assert ev.query() is True


def test_stream_query_and_synchronize(streamkit_backend):
    side = sk.Stream()
    x = torch.ones(8, device=sk.device())
    side.wait_stream(sk.current_stream())
    with sk.switch(side):
        x.add_(1)
    assert side.synchronize() is None
    assert side.query() is True
    assert isinstance(sk.current_stream().query(), bool)
    assert x.sum().item() == 16.0


def test_fresh_stream_query_is_true(streamkit_backend):
    assert sk.Stream().query() is True


def test_device_synchronize(streamkit_backend):
    side = sk.Stream()
    x = torch.ones(8, device=sk.device())
    side.wait_stream(sk.current_stream())
    with sk.switch(side):
        x.mul_(5)
    assert sk.synchronize() is None
    assert side.query() is True
    assert sk.current_stream().query() is True
    assert x.sum().item() == 40.0


# --------------------------------------------------------------------------------------------------
# events: timing
# --------------------------------------------------------------------------------------------------


def test_elapsed_time_with_timing(streamkit_backend):
    start = sk.Event(enable_timing=True)
    end = sk.Event(enable_timing=True)
    x = torch.ones(64, device=sk.device())
    start.record()
    for _ in range(3):
        x.mul_(1.5)
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end)
    assert isinstance(ms, float)
    assert ms >= 0.0


def test_elapsed_time_on_side_stream(streamkit_backend):
    side = sk.Stream()
    start = sk.Event(enable_timing=True)
    end = sk.Event(enable_timing=True)
    start.record(side)
    end.record(side)
    side.synchronize()
    assert start.elapsed_time(end) >= 0.0


# torch >= 2.5 raises ValueError here (c10/cuda/CUDAEvent.h: TORCH_CHECK_VALUE), older torch
# RuntimeError; a backend may raise either.
_TIMING_ERRORS = (RuntimeError, ValueError)


def test_elapsed_time_without_enable_timing_raises(streamkit_backend):
    a = sk.Event()
    b = sk.Event()
    a.record()
    b.record()
    b.synchronize()
    with pytest.raises(_TIMING_ERRORS, match="enable_timing"):
        a.elapsed_time(b)


def test_elapsed_time_needs_timing_on_both_events(streamkit_backend):
    a = sk.Event(enable_timing=True)
    b = sk.Event()
    a.record()
    b.record()
    b.synchronize()
    with pytest.raises(_TIMING_ERRORS, match="enable_timing"):
        a.elapsed_time(b)
    with pytest.raises(_TIMING_ERRORS, match="enable_timing"):
        b.elapsed_time(a)


def test_elapsed_time_of_unrecorded_events_raises(streamkit_backend):
    a = sk.Event(enable_timing=True)
    b = sk.Event(enable_timing=True)
    with pytest.raises(_TIMING_ERRORS):
        a.elapsed_time(b)


# --------------------------------------------------------------------------------------------------
# values computed across streams
# --------------------------------------------------------------------------------------------------


def test_producer_on_side_consumer_on_default_wait_stream(streamkit_backend):
    dev = sk.device()
    default = sk.current_stream()
    side = sk.Stream()
    a = torch.arange(1000, dtype=torch.float32).to(dev)
    out = torch.empty(1000, device=dev)  # allocated on the default stream: freed there
    side.wait_stream(default)
    with sk.switch(side):
        out.copy_(a * 2 + 1)
    default.wait_stream(side)
    total = (out - 1).sum().item()
    assert total == 2 * sum(range(1000))
    assert out[10].item() == 21.0


def test_producer_on_side_consumer_on_default_wait_event(streamkit_backend):
    dev = sk.device()
    default = sk.current_stream()
    side = sk.Stream()
    a = torch.full((32, 32), 3.0, device=dev)
    b = torch.empty(32, 32, device=dev)
    ready = default.record_event()
    side.wait_event(ready)
    with sk.switch(side):
        torch.mm(a, a, out=b)
        done = sk.current_stream().record_event()
    default.wait_event(done)
    assert torch.all(b == 9.0 * 32).item()


def test_chain_of_three_streams(streamkit_backend):
    dev = sk.device()
    default = sk.current_stream()
    s1, s2 = sk.Stream(), sk.Stream()
    x = torch.ones(100, device=dev)
    s1.wait_stream(default)
    with sk.switch(s1):
        x.mul_(2)
    s2.wait_stream(s1)
    with sk.switch(s2):
        x.add_(3)
    default.wait_stream(s2)
    assert x.tolist() == [5.0] * 100


def test_side_allocated_result_with_record_stream(streamkit_backend):
    dev = sk.device()
    default = sk.current_stream()
    side = sk.Stream()
    x = torch.arange(10, dtype=torch.float32).to(dev)
    side.wait_stream(default)
    with sk.switch(side):
        y = x * 10  # allocated on side
    default.wait_stream(side)
    sk.record_stream(y, default)  # y is used on default: keep its memory until that use is done
    assert y.sum().item() == 450.0
    del y


def test_event_wait_method_orders(streamkit_backend):
    dev = sk.device()
    side = sk.Stream()
    x = torch.zeros(4, device=dev)
    ev = sk.Event()
    ev.record()  # current (default) stream
    ev.wait(side)
    with sk.switch(side):
        x.add_(7)
        ev2 = sk.Event()
        ev2.record()  # current stream is side
    ev2.wait()  # current (default) stream waits
    assert x.tolist() == [7.0] * 4


def test_host_copy_of_cross_stream_result(streamkit_backend):
    dev = sk.device()
    side = sk.Stream()
    x = torch.full((3,), 3.0, device=dev)
    x[0] = 1.0
    x[1] = 2.0
    side.wait_stream(sk.current_stream())
    with sk.switch(side):
        x.pow_(2)
        host = x.cpu()  # a blocking copy on side: the host has the result
    assert host.tolist() == [1.0, 4.0, 9.0]
    sk.current_stream().wait_stream(side)
    assert x.tolist() == [1.0, 4.0, 9.0]


# --------------------------------------------------------------------------------------------------
# record_stream, native
# --------------------------------------------------------------------------------------------------


def test_record_stream_accepts_device_tensor(streamkit_backend):
    side = sk.Stream()
    x = torch.ones(8, device=sk.device())
    side.wait_stream(sk.current_stream())
    with sk.switch(side):
        y = x + 1
    assert sk.record_stream(x, side) is None
    assert sk.record_stream(y, sk.current_stream()) is None
    sk.current_stream().wait_stream(side)
    assert y.sum().item() == 16.0
    del x, y


def test_record_stream_rejects_a_host_tensor(streamkit_backend):
    with pytest.raises(ValueError, match="record_stream"):
        sk.record_stream(torch.ones(2), sk.Stream())


def test_native(streamkit_backend):
    s = sk.Stream()
    ev = sk.Event()
    name = streamkit_backend.name
    if name == "fake":
        assert s.native is None
        assert sk.current_stream().native is None
        assert ev.native is None
    else:
        mod = getattr(torch, name)
        assert isinstance(s.native, mod.Stream)
        assert isinstance(sk.current_stream().native, mod.Stream)
        assert isinstance(ev.native, mod.Event)
        assert sk.current_stream().native == mod.current_stream()
        with sk.switch(s):
            assert mod.current_stream() == s.native


# --------------------------------------------------------------------------------------------------
# argument errors
# --------------------------------------------------------------------------------------------------


class _NotAStream:
    pass


@pytest.mark.parametrize("bad", ["1", 1.0, None, True])
def test_stream_priority_type(streamkit_backend, bad):
    with pytest.raises(TypeError, match="priority"):
        sk.Stream(priority=bad)


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_event_enable_timing_type(streamkit_backend, bad):
    with pytest.raises(TypeError, match="enable_timing"):
        sk.Event(enable_timing=bad)


def test_stream_method_argument_types(streamkit_backend):
    s = sk.Stream()
    with pytest.raises(TypeError, match="other"):
        s.wait_stream(_NotAStream())
    with pytest.raises(TypeError, match="other"):
        s.wait_stream(sk.Event())
    with pytest.raises(TypeError, match="event"):
        s.wait_event(s)
    with pytest.raises(TypeError, match="event"):
        s.wait_event(None)
    with pytest.raises(TypeError, match="event"):
        s.record_event("event")


def test_event_method_argument_types(streamkit_backend):
    ev = sk.Event(enable_timing=True)
    with pytest.raises(TypeError, match="stream"):
        ev.record(ev)
    with pytest.raises(TypeError, match="stream"):
        ev.wait(42)
    with pytest.raises(TypeError, match="end_event"):
        ev.elapsed_time(sk.Stream())


@pytest.mark.streamkit_backends("cuda", "npu")  # the fake backend has no native streams
def test_native_objects_are_rejected(streamkit_backend):
    """A torch stream/event is not a streamkit one: it must be wrapped explicitly."""
    name = streamkit_backend.name
    mod = getattr(torch, name)
    s = sk.Stream()
    with pytest.raises(TypeError, match="other"):
        s.wait_stream(mod.current_stream())
    with pytest.raises(TypeError, match="stream"):
        with sk.switch(mod.Stream()):
            pass


def test_switch_argument_type(streamkit_backend):
    with pytest.raises(TypeError, match="stream"):
        with sk.switch("side"):
            pass
    with pytest.raises(TypeError, match="stream"):
        with sk.switch(sk.Event()):
            pass
    assert sk.current_stream() == sk.default_stream()


def test_record_stream_argument_types(streamkit_backend):
    s = sk.Stream()
    x = torch.ones(2, device=sk.device())
    with pytest.raises(TypeError, match="tensor"):
        sk.record_stream([1, 2], s)
    with pytest.raises(TypeError, match="stream"):
        sk.record_stream(x, "side")
    with pytest.raises(TypeError, match="stream"):
        sk.record_stream(x, None)


def test_get_backend_argument_type(streamkit_backend):
    with pytest.raises(TypeError, match="name"):
        sk.get_backend(3)
    with pytest.raises(ValueError, match="tpu"):
        sk.get_backend("tpu")
