"""Streams and events are handles that work in whichever fake session is active when used
(docs/semantics.md, "Streams and events across fake sessions").

- made outside any explicit session (at import time: the process-wide default session) or in an
  earlier explicit session: inside a new session it is a stream of its own, bound on first use,
  named by its creation line in reports;
- made in an explicit session that has ended, used while no session is open: SessionClosedError;
- events recorded in an earlier session are unrecorded in the new one (a wait warns, orders nothing).
"""

from __future__ import annotations

import pytest
import torch

import streamkit as sk
from _support import marker_line
from streamkit import fake

with sk.use_backend("fake"):  # import time, no session open: the default session
    IMPORT_SIDE = sk.Stream(priority=-1)  # <import-side>
    IMPORT_EVENT = sk.Event()


def _race_on(side, session_kwargs=None):
    """A producer on the default stream, a consumer on ``side`` with no wait: the race."""
    with fake.session(detect="record", **(session_kwargs or {})) as s:
        x = torch.ones(4, device=s.device)
        x.mul_(3)  # <producer>
        with sk.switch(side):
            assert sk.current_stream() == side != sk.default_stream()
            y = x + 1  # <consumer>
        sk.synchronize()
        del y
    return s.races


def _ordered_on(side):
    with fake.session(detect="raise") as s:
        x = torch.arange(8.0, device=s.device)
        x.mul_(3)
        side.wait_stream(sk.current_stream())
        with sk.switch(side):
            y = x + 1
        sk.current_stream().wait_stream(side)
        out = (y * 2).cpu()
        assert not s.races
    torch.testing.assert_close(out, (torch.arange(8.0) * 3 + 1) * 2)


def _check_race(races, side, created_marker):
    assert len(races) == 1, races
    race = races[0]
    assert race.first.kind == "write" and race.first.stream == sk.default_stream()
    assert race.first.lineno == marker_line(__file__, "producer")
    assert race.second.kind == "read" and race.second.stream == side
    assert race.second.lineno == marker_line(__file__, "consumer")
    text = str(race)
    assert f"(created at test_handles.py:{marker_line(__file__, created_marker)})" in text


# CUDA: a torch.cuda.Stream is a process-lifetime handle to one device stream, whenever it was created (torch/cuda/streams.py; c10/cuda/CUDAStream.cpp stream pools)
def test_stream_made_at_import_time_is_its_own_stream_in_a_session():
    _check_race(_race_on(IMPORT_SIDE), IMPORT_SIDE, "import-side")
    assert "'IMPORT_SIDE'" in str(_race_on(IMPORT_SIDE)[0])  # bound again in a second session
    _ordered_on(IMPORT_SIDE)
    assert IMPORT_SIDE.priority == -1


# CUDA: a stream stays the same stream across phases of a program; nothing moves its work onto the default stream (c10/cuda/CUDAStream.cpp)
def test_stream_made_in_an_earlier_session_is_its_own_stream_in_the_next():
    with fake.session():
        earlier = sk.Stream()  # <earlier-side>
        with sk.switch(earlier):
            torch.ones(2, device=sk.device()).add_(1)
    _check_race(_race_on(earlier), earlier, "earlier-side")
    _ordered_on(earlier)


# CUDA: (no device counterpart: a fake session is the device's lifetime) using a handle of an ended session is refused, never run elsewhere
def test_stream_of_an_ended_session_with_no_session_open_raises():
    with fake.session() as s:
        ended = sk.Stream()
        event = sk.Event()
        event.record(ended)
        x = torch.ones(2, device=s.device)
    uses = {
        "switch": lambda: sk.switch(ended).__enter__(),
        "wait_stream": lambda: ended.wait_stream(sk.current_stream()),
        "wait_stream(other)": lambda: sk.current_stream().wait_stream(ended),
        "record_event": lambda: ended.record_event(),
        "synchronize": lambda: ended.synchronize(),
        "query": lambda: ended.query(),
        "event.wait": lambda: event.wait(),
        "event.record": lambda: event.record(),
        "event.synchronize": lambda: event.synchronize(),
        "record_stream": lambda: sk.record_stream(torch.ones(2, device=sk.device()), ended),
    }
    with sk.use_backend("fake"):  # (so the test also holds where cuda is the default backend)
        for name, use in uses.items():
            with pytest.raises(sk.SessionClosedError, match="has ended.*fake.session"):
                use()
    # tensors are not handles: a tensor of an ended session is refused everywhere (unchanged)
    with fake.session():
        with pytest.raises(sk.SessionClosedError, match="ended"):
            x + 1
        ended.synchronize()  # ...while its stream works in the new session


# CUDA: a stream's queue order is its own for the whole process (torch/cuda/streams.py: "all work ... is ordered")
def test_default_session_stream_keeps_its_state_across_explicit_sessions():
    with sk.use_backend("fake"):
        outside = sk.Stream()
        y = torch.ones(4, device=sk.device())
        outside.wait_stream(sk.current_stream())
        with sk.switch(outside):
            y.add_(1)
    with fake.session():
        with sk.switch(outside):
            torch.ones(2, device=sk.device()).mul_(2)
    with sk.use_backend("fake"):  # back in the default session: the same stream as before
        with sk.switch(outside):
            y.add_(1)  # ordered after the first add_ (same stream)
        sk.current_stream().wait_stream(outside)
        assert y.cpu().tolist() == [3.0] * 4


# CUDA: waiting on an event that was never recorded is a no-op (aten/src/ATen/cuda/CUDAEvent.h: block() returns if !is_created_)
def test_event_recorded_in_an_earlier_session_is_unrecorded_in_the_next():
    with fake.session():
        IMPORT_EVENT.record()
        sk.synchronize()
    with fake.session(detect="record") as s:
        side = sk.Stream()
        x = torch.ones(4, device=s.device)
        x.mul_(3)  # <ev-producer>
        with pytest.warns(sk.UnrecordedEventWarning, match="earlier fake session"):
            side.wait_event(IMPORT_EVENT)
        with sk.switch(side):
            y = x + 1  # <ev-consumer>
        sk.synchronize()
        del y
    assert [r.second.lineno for r in s.races] == [marker_line(__file__, "ev-consumer")]
    # recorded in this session, the same handle orders as usual
    with fake.session(detect="raise"):
        side = sk.Stream()
        x = torch.arange(4.0, device=sk.device())
        x.mul_(3)
        IMPORT_EVENT.record()
        side.wait_event(IMPORT_EVENT)
        with sk.switch(side):
            y = x + 1
        IMPORT_EVENT.record(side)
        IMPORT_EVENT.wait()
        assert y.cpu().tolist() == [1.0, 4.0, 7.0, 10.0]


# CUDA: streams compare equal when they are the same device stream (torch/cuda/streams.py Stream.__eq__)
def test_streams_compare_by_handle_in_every_session():
    with fake.session() as first:
        a = sk.Stream()
        with sk.switch(a):
            assert sk.current_stream() == a
        assert sk.current_stream() == sk.default_stream()
    keys = {a, IMPORT_SIDE, sk.default_stream()}
    with fake.session() as second:
        assert first.backend is second.backend is sk.get_backend()
        with sk.switch(a):
            current = sk.current_stream()
            assert current == a and hash(current) == hash(a) and current in keys
        with sk.switch(IMPORT_SIDE):
            assert sk.current_stream() == IMPORT_SIDE != a
        b = sk.Stream()
        assert b not in keys and len({a, b, IMPORT_SIDE, sk.current_stream()}) == 4
        assert sk.current_stream() == sk.default_stream() in keys


# CUDA: record_stream keeps a block from reuse until the recorded stream's work is done (c10/cuda/CUDACachingAllocator.cpp, insert_events)
def test_record_stream_with_an_import_time_stream_covers_the_free():
    with fake.session(detect="raise") as s:
        IMPORT_SIDE.wait_stream(sk.current_stream())
        x = torch.ones(4, device=s.device)
        IMPORT_SIDE.wait_stream(sk.current_stream())
        with sk.switch(IMPORT_SIDE):
            y = x * 2
        x.record_stream(IMPORT_SIDE)  # Tensor.record_stream with a streamkit.Stream
        del x  # the allocator keeps the memory until IMPORT_SIDE's work is done: no free race
        sk.current_stream().wait_stream(IMPORT_SIDE)
        assert y.cpu().tolist() == [2.0] * 4
