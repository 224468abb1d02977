"""Stream and event ordering rules that engine code leans on, each as a racy version (the race's
kinds, streams and lines) and an ordered version (no race; values equal plain CPU torch's)."""

from __future__ import annotations

import pytest
import torch

import streamkit as sk
from _support import marker_line
from streamkit import fake

ORDER = pytest.mark.parametrize("ordered", [False, True], ids=["racy", "ordered"])
EXPECTED = (torch.arange(8.0) * 2 + 1).sum().item()


def _line(marker: str) -> int:
    return marker_line(__file__, marker)


def _session(ordered):
    return fake.session(detect="raise" if ordered else "record")


def _check(s, ordered, total, first, second, first_stream, second_stream):
    if ordered:
        assert s.races == [] and total == EXPECTED
        return
    assert len(s.races) == 1, "\n\n".join(map(str, s.races))
    race = s.races[0]
    assert (race.first.kind, race.first.stream, race.first.lineno) == ("write", first_stream, _line(first))
    assert (race.second.kind, race.second.stream, race.second.lineno) == ("read", second_stream, _line(second))


# CUDA: torch streams are created non-blocking, so a side stream never waits implicitly for the default stream (c10/cuda/CUDAStream.cpp: cudaStreamNonBlocking; torch/cuda/streams.py)
@ORDER
def test_a_new_stream_does_not_wait_for_the_default_stream(ordered):
    with _session(ordered) as s:
        side = sk.Stream()
        x = torch.arange(8.0, device=s.device)
        x.mul_(2)  # <r1-write>
        if ordered:
            side.wait_stream(sk.current_stream())
        with sk.switch(side):
            y = (x + 1).sum()  # <r1-read>
        sk.current_stream().wait_stream(side)
        total = y.item()
    _check(s, ordered, total, "r1-write", "r1-read", sk.default_stream(), side)


# CUDA: wait_stream orders only the work issued to the other stream before the call (torch/cuda/streams.py Stream.wait_stream: record_event + wait_event)
@ORDER
def test_wait_stream_covers_only_work_issued_before_it(ordered):
    with _session(ordered) as s:
        side = sk.Stream()
        x = torch.arange(8.0, device=s.device)
        sk.synchronize()
        if ordered:
            x.mul_(2)
            side.wait_stream(sk.current_stream())
        else:
            side.wait_stream(sk.current_stream())
            x.mul_(2)  # <r2-write>
        with sk.switch(side):
            y = (x + 1).sum()  # <r2-read>
        sk.current_stream().wait_stream(side)
        total = y.item()
    _check(s, ordered, total, "r2-write", "r2-read", sk.default_stream(), side)


# CUDA: re-recording an event changes what later waits see, never what an earlier wait ordered (torch/cuda/streams.py Event.record/wait; cudaEventRecord semantics)
@ORDER
def test_a_wait_made_before_an_event_is_re_recorded_does_not_cover_the_new_work(ordered):
    with _session(ordered) as s:
        side = sk.Stream()
        event = sk.Event()
        x = torch.arange(8.0, device=s.device)
        event.record()
        side.wait_event(event)
        x.mul_(2)  # <r3-write>
        event.record()  # re-recorded: covers the write only for waits made from now on
        if ordered:
            side.wait_event(event)
        with sk.switch(side):
            y = (x + 1).sum()  # <r3-read>
        sk.current_stream().wait_stream(side)
        total = y.item()
    _check(s, ordered, total, "r3-write", "r3-read", sk.default_stream(), side)


# CUDA: Event.synchronize blocks the host until the event's work is done, so everything the host issues afterwards is ordered after it (torch/cuda/streams.py Event.synchronize: cudaEventSynchronize)
@ORDER
def test_an_event_synchronize_orders_the_host_and_its_later_work(ordered):
    with _session(ordered) as s:
        side = sk.Stream()
        x = torch.arange(8.0, device=s.device)
        side.wait_stream(sk.current_stream())
        with sk.switch(side):
            x.mul_(2)  # <r4-write>
            done = side.record_event()
        if ordered:
            done.synchronize()
        y = (x + 1).sum()  # <r4-read>
        total = y.item()
        sk.current_stream().wait_stream(side)
    _check(s, ordered, total, "r4-write", "r4-read", side, sk.default_stream())


# CUDA: torch.cuda.synchronize waits for every stream of the device, not only the current one (torch/cuda/__init__.py synchronize: cudaDeviceSynchronize)
@ORDER
def test_a_device_synchronize_orders_every_stream(ordered):
    with _session(ordered) as s:
        side = sk.Stream()
        x = torch.arange(8.0, device=s.device)
        side.wait_stream(sk.current_stream())
        with sk.switch(side):
            x.mul_(2)  # <r5-write>
        if ordered:
            sk.synchronize()
        else:
            sk.current_stream().synchronize()  # the default stream only: side's write may still run
        y = (x + 1).sum()  # <r5-read>
        total = y.item()
        sk.current_stream().wait_stream(side)
    _check(s, ordered, total, "r5-write", "r5-read", side, sk.default_stream())
