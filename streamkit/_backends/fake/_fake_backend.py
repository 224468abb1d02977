"""The ``fake`` backend object: the public API's calls, each made in the fake session active now,
and the backend's own state (which session is active, the default session, the session factory).

The process-wide record of what is active is :mod:`streamkit._backend`'s stack: an open
``fake.session()`` is pushed there with this backend; :attr:`FakeBackend.current` is the fast read
of it that every op makes.
"""

from __future__ import annotations

import importlib
import threading
import time
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from ..._backend import Backend, activate, active_scope, deactivate
from ..._errors import EventTimingError, InternalError, SessionClosedError, StreamkitError, UnrecordedEventWarning
from . import _graph, _handles
from ._clocks import merge
from ._handles import DEFAULT_STREAM, FakeEvent, FakeStream, resolve
from ._sites import site_here

if TYPE_CHECKING:
    from ._interface import Engine

# CUDA maps priorities outside the device's range to the nearest valid one; fake uses [-5, 0].
PRIORITY_RANGE = (-5, 0)


class FakeBackend(Backend):
    """The ``fake`` backend: one object for the process. Each call works in the fake session active
    when it is made (the open ``fake.session()``, else the process-wide default session), on the
    state its stream and event handles have there (see :mod:`._handles`: a handle made outside that
    session is bound to it on first use; one of an ended session, used when no session is open,
    raises :class:`~streamkit.SessionClosedError`)."""

    name = "fake"

    def __init__(self) -> None:
        #: the session fake-device ops run in now (``None`` until one exists); read ``current or get()``
        self.current: Any = None
        #: the process-wide default session (``detect="raise"``), made on first use
        self.default: Any = None
        #: ``default_factory()`` makes the default session (set by :mod:`._session`, which owns the class)
        self.default_factory: Callable[[], Any] | None = None
        #: ``new_session(detect, schedule, seed, depth, target)``: what ``fake.session()`` opens
        #: (a :class:`Session`; the checker installs one that opens a scope of its own session)
        self.new_session: Callable[..., Any] | None = None
        #: the torch device fake tensors live on (``fake:0`` once the device is registered)
        self.torch_device = torch.device("cpu")
        self._state_lock = threading.Lock()

    # -- which session is active (the registry's stack holds the open one) --------------------
    def get(self) -> Any:
        """The active session (making the default one if there is none yet)."""
        session = self.current
        if session is not None:
            return session
        with self._state_lock:
            explicit = active_scope(self)
            if explicit is not None:
                return explicit
            if self.default is None:
                if self.default_factory is None:
                    raise InternalError("the fake backend has no session factory: import streamkit.fake, not its modules")
                self.default = self.default_factory()
            self.current = self.default
            return self.default

    def explicit(self) -> Any:
        """The open explicit session (``with fake.session():``), or ``None``."""
        return active_scope(self)

    def enter(self, session: "Engine") -> None:
        """``session`` becomes the active one (sessions don't nest)."""
        with self._state_lock:
            if session.closed:
                raise SessionClosedError(f"{session!r} has ended; open a new fake.session()")
            explicit = active_scope(self)
            if explicit is not None:
                raise StreamkitError(
                    f"a fake session is already open ({explicit!r}); fake sessions don't nest: close it first"
                )
            activate(self, session)
            self.current = session

    def leave(self, session: "Engine") -> None:
        """``session`` has ended: the default session is active again."""
        with self._state_lock:
            deactivate(self, session)
            if self.current is session:
                self.current = active_scope(self) or self.default

    @property
    def session(self) -> "Engine":
        """The fake session calls work in now."""
        return self.current or self.get()

    @classmethod
    def load(cls) -> "FakeBackend":
        """The fake backend (it works in the open ``fake.session()``, else the default session).
        Registers the fake device (PyTorch's PrivateUse1), so ``sk.device()`` and
        ``device="fake"`` work before any session; raises
        :class:`~streamkit.BackendUnavailableError` saying why when it can't."""
        _emulate = importlib.import_module(__package__ + "._emulate")  # (it imports _tensor, which imports this module)
        _emulate.claim(_emulate.default())
        return BACKEND

    @classmethod
    @contextmanager
    def test_context(cls) -> Iterator["FakeBackend"]:
        """A ``fake.session(detect="raise")`` for the test: a race fails it."""
        assert BACKEND.new_session is not None
        with BACKEND.new_session("raise") as s:
            yield s.backend

    def __repr__(self) -> str:
        return "<streamkit backend 'fake'>"

    def device(self) -> torch.device:
        """The active session's device (``fake:0``; ``cuda:0``/``npu:0`` in an emulating session)."""
        s = self.current
        if s is None:
            _emulate = importlib.import_module(__package__ + "._emulate")
            return _emulate.device_of(_emulate.default())
        return s.device

    def synchronize(self) -> None:
        s = self.current or self.get()
        if s.capture is not None:
            s.capture.host_sync("sk.synchronize()")
        s.host_sync_all()

    # streams
    def new_stream(self, priority: int) -> FakeStream:
        low, high = PRIORITY_RANGE
        s = self.current or self.get()
        return _handles.new_stream(s, min(max(priority, low), high), site_here())

    def current_stream(self) -> FakeStream:
        return (self.current or self.get()).current_stream().handle

    def default_stream(self) -> FakeStream:
        return DEFAULT_STREAM

    def stream_context(self, stream: FakeStream) -> "_StreamContext":
        s = self.current or self.get()
        return s.stream_context(resolve(stream, s))

    def stream_wait_event(self, stream: FakeStream, event: FakeEvent) -> None:
        s = self.current or self.get()
        state = resolve(event, s)
        target = resolve(stream, s)
        if s.capture is not None and s.capture.wait_event(target, state, state.clock is not None):
            return
        if state.clock is None:
            warnings.warn(
                UnrecordedEventWarning(
                    "waiting on an event that was never recorded orders nothing (a silent no-op on CUDA);"
                    + (" it was recorded only in an earlier fake session, which orders nothing in this one;" if event.recorded else "")
                    + " record it on the producing stream first"
                ),
                stacklevel=3,
            )
            return
        s.stats.event_waits += 1
        if s.tracked:
            with s.lock:
                s.clocks.wait(target, state)

    def stream_wait_stream(self, stream: FakeStream, other: FakeStream) -> None:
        s = self.current or self.get()
        target = resolve(stream, s)
        source = resolve(other, s)
        if s.capture is not None and s.capture.wait_stream(target, source):
            return
        s.stats.event_records += 1  # as on CUDA: an event recorded on `other`, then waited on
        s.stats.event_waits += 1
        if s.tracked:
            with s.lock:
                merge(target.clock, source.clock)  # (the host's part is in every stream's effective clock)

    def stream_synchronize(self, stream: FakeStream) -> None:
        s = self.current or self.get()
        state = resolve(stream, s)
        if s.capture is not None:
            s.capture.host_sync("Stream.synchronize()", stream=state)
        s.host_sync(state.clock, "stream_syncs")

    def stream_query(self, stream: FakeStream) -> bool:
        # Eager: all issued work has run. A True answer lets the host rely on that work.
        s = self.current or self.get()
        state = resolve(stream, s)
        if s.capture is not None:
            s.capture.host_sync("Stream.query()", stream=state)
        return s.query(state.clock)

    def stream_priority(self, stream: FakeStream) -> int:
        return stream.priority

    def stream_key(self, stream: FakeStream) -> Any:
        return stream

    def stream_label(self, stream: FakeStream) -> str:
        return repr(stream)

    # events
    def new_event(self, enable_timing: bool) -> FakeEvent:
        return _handles.new_event(self.current or self.get(), enable_timing)

    def event_record(self, event: FakeEvent, stream: FakeStream) -> None:
        s = self.current or self.get()
        state = resolve(event, s)
        target = resolve(stream, s)
        if s.capture is not None and s.capture.record(state, target):
            return
        s.stats.event_records += 1
        event.recorded = True
        with s.lock:
            s.clocks.record(state, target, time.perf_counter())

    def event_synchronize(self, event: FakeEvent) -> None:
        s = self.current or self.get()
        state = resolve(event, s)
        if s.capture is not None:
            s.capture.host_sync("Event.synchronize()", event=state)
        if state.clock is None:
            warnings.warn(
                UnrecordedEventWarning(
                    "synchronizing with an event that was never recorded waits for nothing (a silent no-op"
                    " on CUDA); record it on the producing stream first"
                ),
                stacklevel=3,
            )
            return
        s.host_sync(state.clock, "event_syncs")

    def event_query(self, event: FakeEvent) -> bool:
        s = self.current or self.get()
        state = resolve(event, s)
        if s.capture is not None:
            s.capture.host_sync("Event.query()", event=state)
        if state.clock is None:
            return True
        return s.query(state.clock)

    def event_elapsed_time(self, start: FakeEvent, end: FakeEvent) -> float:
        s = self.current or self.get()
        first, last = resolve(start, s), resolve(end, s)
        if not (first.enable_timing and last.enable_timing):
            raise EventTimingError("Both events must be created with argument 'enable_timing=True'.")
        if first.clock is None or last.clock is None:
            raise EventTimingError("Both events must be recorded before calculating elapsed time.")
        return (last.time - first.time) * 1000.0

    # memory
    def record_stream(self, tensor: torch.Tensor, stream: FakeStream) -> None:
        s = self.current or self.get()
        s.record_stream(tensor, resolve(stream, s))

    # graphs (_graph)
    def new_graph(self) -> "_graph.FakeGraph":
        return _graph.new_graph(self.current or self.get())

    def graph_capture(self, graph: Any, stream: Any, pool: Any) -> Any:
        s = self.current or self.get()
        return _graph.capture(s, graph, stream, pool, site_here())

    def graph_replay(self, graph: Any) -> None:
        s = self.current or self.get()
        _graph.replay(s, graph, s.current_stream())

    def graph_reset(self, graph: Any) -> None:
        capture = (self.current or self.get()).capture
        if capture is not None and graph is capture.graph:
            raise _graph.GraphCaptureError("Graph.reset() inside its own capture block; leave the block first")
        graph.reset()

    def graph_pool(self, graph: Any) -> Any:
        if not graph.captured:
            raise _graph.GraphError("Graph.pool() without a preceding successful capture")
        return _graph.PoolToken(graph)


#: the fake backend (``sk.get_backend("fake")``, ``session.backend``)
BACKEND = FakeBackend()
