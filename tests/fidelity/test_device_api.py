"""The stream rules of test_stream_rules.py again, written against the device APIs engines use:
``torch.cuda`` (under ``emulate="cuda"``) and ``torch.npu`` / ``torch_npu`` (under
``emulate="npu"``), through one parametrized fixture, ``api_kind``. Each rule: a racy version (the race's
kinds, streams and lines) and an ordered one (no race; values equal plain CPU torch's).

npu emulation needs a process of its own (PyTorch names its PrivateUse1 device once per process):
in a ``fake`` process the ``torch.npu`` cases are skipped with that reason, and
tests/emulation/test_npu_emulation.py::test_pytest_option_runs_a_torch_npu_suite runs them in a
child process under ``pytest --streamkit-emulate=npu`` (where the plugin's per-test session steps
aside for the sessions these rules open)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from _support import marker_line
from streamkit import fake
from streamkit._backends.fake import _emulate

ORDER = pytest.mark.parametrize("ordered", [False, True], ids=["racy", "ordered"])
EXPECTED = (torch.arange(8.0) * 2 + 1).sum().item()


@pytest.fixture(params=["cuda", "npu"], ids=["torch.cuda API", "torch.npu API"])
def api_kind(request):
    kind = request.param
    if kind == "npu":
        try:
            _emulate.claim("npu")
        except _emulate.EmulationError:
            pytest.skip(
                "torch.npu API: npu emulation needs a process of its own (this one named PrivateUse1 'fake');"
                " tests/emulation/test_npu_emulation.py::test_pytest_option_runs_a_torch_npu_suite runs these cases"
            )
    return kind


def _session(kind: str, ordered: bool):
    return fake.session(detect="raise" if ordered else "record", emulate=kind)


def _mod(kind: str) -> Any:
    if kind == "npu":
        import torch_npu  # the emulated namespace: torch_npu.npu is torch.npu

        assert torch_npu.npu is torch.npu
    return getattr(torch, kind)


def _line(marker: str) -> int:
    return marker_line(__file__, marker)


def _check(s, ordered, total, first, second, first_stream, second_stream):
    if ordered:
        assert s.races == [] and total == EXPECTED
        return
    assert len(s.races) == 1, "\n\n".join(map(str, s.races))
    race = s.races[0]
    assert (race.first.kind, race.first.stream._handle, race.first.lineno) == ("write", first_stream._handle, _line(first))
    assert (race.second.kind, race.second.stream._handle, race.second.lineno) == ("read", second_stream._handle, _line(second))
    assert "_emulate" not in str(race).replace("test_device_api", "")


# CUDA: torch streams are created non-blocking (c10/cuda/CUDAStream.cpp: cudaStreamNonBlocking)
@ORDER
def test_a_new_stream_does_not_wait_for_the_default_stream(api_kind, ordered):
    with _session(api_kind, ordered) as s:
        mod = _mod(api_kind)
        default = mod.default_stream()
        side = mod.Stream()
        x = torch.arange(8.0, device=api_kind)
        x.mul_(2)  # <a1-write>
        if ordered:
            side.wait_stream(mod.current_stream())
        with mod.stream(side):
            y = (x + 1).sum()  # <a1-read>
        mod.current_stream().wait_stream(side)
        total = y.item()
    _check(s, ordered, total, "a1-write", "a1-read", default, side)


# CUDA: wait_stream orders only the work issued before it (torch/cuda/streams.py Stream.wait_stream)
@ORDER
def test_wait_stream_covers_only_work_issued_before_it(api_kind, ordered):
    with _session(api_kind, ordered) as s:
        mod = _mod(api_kind)
        default = mod.default_stream()
        side = mod.Stream()
        x = torch.arange(8.0, device=f"{api_kind}:0")
        mod.synchronize()
        if ordered:
            x.mul_(2)
            side.wait_stream(mod.current_stream())
        else:
            side.wait_stream(mod.current_stream())
            x.mul_(2)  # <a2-write>
        with mod.stream(side):
            y = (x + 1).sum()  # <a2-read>
        mod.current_stream().wait_stream(side)
        total = y.item()
    _check(s, ordered, total, "a2-write", "a2-read", default, side)


# CUDA: a wait covers what the event captured when waited on (cudaEventRecord / cudaStreamWaitEvent)
@ORDER
def test_a_wait_made_before_an_event_is_re_recorded_does_not_cover_the_new_work(api_kind, ordered):
    with _session(api_kind, ordered) as s:
        mod = _mod(api_kind)
        default = mod.default_stream()
        side = mod.Stream()
        event = mod.Event()
        x = torch.arange(8.0, device=torch.device(api_kind, 0))
        event.record()
        side.wait_event(event)
        x.mul_(2)  # <a3-write>
        event.record()
        if ordered:
            event.wait(side)
        with mod.stream(side):
            y = (x + 1).sum()  # <a3-read>
        mod.current_stream().wait_stream(side)
        total = y.item()
    _check(s, ordered, total, "a3-write", "a3-read", default, side)


# CUDA: Event.synchronize blocks the host until the event's work is done (cudaEventSynchronize)
@ORDER
def test_an_event_synchronize_orders_the_host_and_its_later_work(api_kind, ordered):
    with _session(api_kind, ordered) as s:
        mod = _mod(api_kind)
        default = mod.default_stream()
        side = mod.Stream()
        x = torch.arange(8.0).to(api_kind)
        side.wait_stream(mod.current_stream())
        with mod.stream(side):
            x.mul_(2)  # <a4-write>
            done = side.record_event()
        if ordered:
            done.synchronize()
        y = (x + 1).sum()  # <a4-read>
        total = y.item()
        mod.current_stream().wait_stream(side)
    _check(s, ordered, total, "a4-write", "a4-read", side, default)


# CUDA: torch.cuda.synchronize waits for every stream of the device (cudaDeviceSynchronize)
@ORDER
def test_a_device_synchronize_orders_every_stream(api_kind, ordered):
    with _session(api_kind, ordered) as s:
        mod = _mod(api_kind)
        default = mod.default_stream()
        side = mod.Stream()
        x = getattr(torch.arange(8.0), api_kind)()
        side.wait_stream(mod.current_stream())
        with mod.stream(side):
            x.mul_(2)  # <a5-write>
        if ordered:
            mod.synchronize()
        else:
            mod.current_stream().synchronize()  # the default stream only: side's write may still run
        y = (x + 1).sum()  # <a5-read>
        total = y.item()
        mod.current_stream().wait_stream(side)
    _check(s, ordered, total, "a5-write", "a5-read", side, default)


# CUDA: set_stream makes a stream current until set again (torch/cuda/__init__.py set_stream)
@ORDER
def test_set_stream_makes_the_stream_current(api_kind, ordered):
    with _session(api_kind, ordered) as s:
        mod = _mod(api_kind)
        default = mod.default_stream()
        side = mod.Stream()
        x = torch.arange(8.0, device=api_kind)
        x.mul_(2)  # <a6-write>
        if ordered:
            side.wait_stream(mod.current_stream())
        mod.set_stream(side)
        assert mod.current_stream() == side
        y = (x + 1).sum()  # <a6-read>
        mod.set_stream(mod.default_stream())
        mod.current_stream().wait_stream(side)
        total = y.item()
    _check(s, ordered, total, "a6-write", "a6-read", default, side)
