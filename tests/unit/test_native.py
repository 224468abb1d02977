"""The C accelerator against the Python reference it was ported from: the same sites, the same
races reported in the same order, the same access tables left behind, on random programs."""

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamkit.fake import _accel, _report
from streamkit.fake._clocks import Clocks, merge
from streamkit.fake._detector import Detector
from streamkit.fake._tracking import READ, WRITE, Kernel, StorageState

pytestmark = pytest.mark.skipif(
    _accel.native is None, reason="STREAMKIT_NATIVE=0: only the Python reference implementation is in use"
)
native = _accel.native


def _nested(depth: int, fn):
    """Call ``fn`` under ``depth`` frames of this (user) file."""
    if depth == 0:
        return fn()
    return _nested(depth - 1, fn)


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
@pytest.mark.parametrize("nesting", [0, 1, 4])
def test_capture_site_matches_the_reference(depth, nesting):
    def both():
        # the caller's frame stays at one instruction while both implementations read it
        frame = sys._getframe(1)
        return native.capture_site(frame, depth), _report.capture_site_python(frame, depth)

    c_site, py_site = _nested(nesting, lambda: both())
    assert c_site == py_site
    assert 1 <= len(c_site) <= depth
    # the frames of this file come first (the lambda, _nested's, this test's); pytest's are internal
    ours = min(depth, nesting + 2)
    assert [code.co_filename for code, _ in c_site[:ours]] == [__file__] * ours


def test_capture_site_keeps_the_innermost_frame_when_all_are_internal():
    # a thread's stack is this function under threading.py; mark this file internal too
    import threading

    sites = []

    def grab():
        caller = sys._getframe(1)
        return caller.f_code, native.capture_site(caller, 3), _report.capture_site_python(caller, 3)

    def target():
        sites.append(grab())

    _report._internal_codes[__file__] = True
    try:
        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
    finally:
        del _report._internal_codes[__file__]
    code, c_site, py_site = sites[0]
    assert c_site == py_site
    assert len(c_site) == 1 and c_site[0][0] is code


def test_capture_site_rejects_non_frames():
    with pytest.raises(TypeError, match="frame"):
        native.capture_site(42)
    assert native.capture_site(None) == []


class _Tensor:
    """What the check reads of a fake tensor: its storage's table and its byte range."""

    def __init__(self, state: StorageState, lo: int, hi: int) -> None:
        self._st, self._lo, self._hi = state, lo, hi


# a program: a list of steps over 2 storages of 64 bytes and 3 streams
_range = st.tuples(st.integers(0, 64), st.integers(0, 64)).map(sorted)
_access = st.tuples(st.integers(0, 1), _range, st.sampled_from([READ, WRITE]))
_step = st.one_of(
    st.tuples(st.just("kernel"), st.integers(0, 2), st.lists(_access, min_size=1, max_size=3)),
    st.tuples(st.just("wait"), st.integers(0, 2), st.integers(0, 2)),
    st.tuples(st.just("host"), st.integers(0, 2)),
)


def _run(program: list, check_of) -> tuple[list, list]:
    """Run ``program`` with the check that ``check_of(detector)`` picks; returns (races, tables)."""
    clocks = Clocks()
    streams = [clocks.new_stream(0, ()) for _ in range(3)]
    states = [StorageState(None, 64, streams[0], ()) for _ in range(2)]
    races: list = []

    def report(record, kernel, kind, tensor, state):
        races.append((record[:4], record[4].seq, kernel.seq, kernel.stream.idx, kind, states.index(state), tensor._lo, tensor._hi))

    detector = Detector(report, clocks.host)
    check = check_of(detector)
    for step in program:
        if step[0] == "kernel":
            stream = streams[step[1]]
            kernel = Kernel("op", None, stream, clocks.issue(stream), None, None, None)
            accesses = [(_Tensor(states[s], lo, hi), kind) for s, (lo, hi), kind in step[2]]
            check(accesses, stream, kernel)
        elif step[0] == "wait":
            merge(streams[step[1]].clock, streams[step[2]].clock)
        else:
            clocks.host_waits_for(streams[step[1]].clock)

    def table(records):
        return [(r[:4], r[4].seq) for r in records]

    return races, [(table(s.writes), table(s.reads)) for s in states]


@settings(max_examples=300, deadline=None)
@given(st.lists(_step, max_size=25))
def test_check_matches_the_reference_on_random_programs(program):
    native_run = _run(program, lambda d: d.check)
    reference_run = _run(program, lambda d: d.check_python)
    assert native_run == reference_run


def test_check_propagates_a_raising_report():
    clocks = Clocks()
    a, b = clocks.new_stream(0, ()), clocks.new_stream(0, ())
    state = StorageState(None, 16, a, ())

    class Boom(Exception):
        pass

    def report(*_):
        raise Boom

    detector = Detector(report, clocks.host)
    t = _Tensor(state, 0, 16)
    detector.check([(t, WRITE)], a, Kernel("w", None, a, clocks.issue(a), None, None, None))
    with pytest.raises(Boom):
        detector.check([(t, READ)], b, Kernel("r", None, b, clocks.issue(b), None, None, None))


def test_check_rejects_malformed_accesses():
    clocks = Clocks()
    a = clocks.new_stream(0, ())
    detector = Detector(lambda *_: None, clocks.host)
    with pytest.raises(TypeError, match="pairs"):
        detector.check([("not a pair",)], a, Kernel("w", None, a, clocks.issue(a), None, None, None))


def test_method_stand_ins_bind_and_describe_the_c_method(fake_session):
    import torch

    from streamkit.fake._tensor import FakeDeviceTensor

    stand_in = FakeDeviceTensor.__dict__["add_"]
    assert type(stand_in) is native.FastMethod
    assert stand_in.__wrapped__ is torch.Tensor.add_
    assert stand_in.__name__ == "add_" and stand_in.__doc__ == torch.Tensor.add_.__doc__
    x = torch.zeros(4, device=fake_session.device)
    bound = x.add_  # a bound method, as for a Python method
    assert bound(1).cpu().tolist() == [1.0] * 4
    assert FakeDeviceTensor.add_(x, torch.ones(4, device=fake_session.device), alpha=2) is x
    assert x.cpu().tolist() == [3.0] * 4
    before = fake_session.stats.kernels
    x.mul_(2)
    assert fake_session.stats.kernels == before + 1


def test_fast_path_in_c_names_the_users_line(fake_session):
    import torch

    import streamkit as sk
    from streamkit import RaceError

    x = torch.zeros(8, device=fake_session.device)
    side = sk.Stream()
    x.add_(1)
    with pytest.raises(RaceError) as err, sk.switch(side):
        torch.sum(x)  # a torch function (not a method): __torch_function__ in C
    assert err.value.race.second.op.startswith("aten.sum")
    assert f"{__name__.split('.')[-1]}.py:" in err.value.race.second.location
    side.synchronize()
    sk.current_stream().wait_stream(side)


def test_configure_fast_path_checks_its_arguments():
    with pytest.raises(TypeError):
        native.configure_fast_path(plans=[])


def test_the_reference_implementation_passes_the_fast_path_and_detector_tests():
    """STREAMKIT_NATIVE=0 runs the Python reference the C code was ported from: keep it green too."""
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "STREAMKIT_NATIVE": "0"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
         "tests/unit/test_fastpath.py", "tests/unit/test_report.py", "tests/detector/test_scenarios.py"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
