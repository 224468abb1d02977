"""Fake sessions: one fake device with its streams, events, stats and races, and the backend that
exposes them through the public API."""

from __future__ import annotations

import gc
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Iterator

import torch

from .. import _core
from .._backend import Backend
from .._errors import EventTimingError, RaceError, SessionClosedError, StreamkitError, UnrecordedEventWarning
from ._clocks import Clocks, EventState, StreamState, merge
from ._detector import Detector
from ._report import Race, TensorInfo, capture_site, make_access, short_location, stream_description, suggest_fix, user_stack
from . import _tensor
from ._tensor import FakeDeviceTensor, _state, ensure_registered
from ._tracking import EagerScheduler, Kernel, StorageState

DETECT_MODES = ("raise", "record", "off")
# CUDA maps priorities outside the device's range to the nearest valid one; fake uses [-5, 0].
PRIORITY_RANGE = (-5, 0)


@dataclass
class Stats:
    """What a session did: kernels, events, and host synchronizations by kind."""

    kernels: int = 0
    event_records: int = 0
    event_waits: int = 0
    blocking_copies: int = 0  # .cpu(), .item(), .tolist(), print, blocking H2D
    implicit_syncs: int = 0  # ops whose output size depends on data (nonzero, bincount, ...)
    stream_syncs: int = 0
    event_syncs: int = 0
    device_syncs: int = 0

    @property
    def host_syncs(self) -> int:
        """Every time the host waited for the device."""
        return self.blocking_copies + self.implicit_syncs + self.stream_syncs + self.event_syncs + self.device_syncs

    def copy(self) -> "Stats":
        return Stats(**{f.name: getattr(self, f.name) for f in fields(self)})

    def __sub__(self, other: "Stats") -> "Stats":
        return Stats(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})


class _ThreadState(threading.local):
    stream: StreamState | None = None  # the thread's current stream; None: the default stream


class _StreamContext:
    __slots__ = ("_tls", "_stream", "_prev")

    def __init__(self, tls: _ThreadState, stream: StreamState) -> None:
        self._tls = tls
        self._stream = stream

    def __enter__(self) -> None:
        self._prev = self._tls.stream
        self._tls.stream = self._stream

    def __exit__(self, *exc: Any) -> None:
        self._tls.stream = self._prev


class Session:
    """A fake device: streams with CUDA semantics, an eager scheduler and a race detector.

    Use it through :func:`session`. While open it is the active backend of every ``sk.*`` call and
    the home of every tensor created on :attr:`device`.
    """

    def __init__(self, detect: str = "raise") -> None:
        if detect not in DETECT_MODES:
            raise ValueError(f"session(detect): expected one of {', '.join(map(repr, DETECT_MODES))}, got {detect!r}")
        ensure_registered()
        self.detect = detect
        self.tracking = detect != "off"
        self.lock = threading.RLock()
        self.clocks = Clocks()
        self.scheduler = EagerScheduler()
        self.detector = Detector(self._report, self.clocks.host)
        self.races: list[Race] = []
        self.stats = Stats()
        self.closed = False
        self.backend = FakeBackend(self)
        self._tls = _ThreadState()
        self._seen: set[tuple] = set()
        self._pending: RaceError | None = None
        self._default_stream = self.clocks.new_stream(0, ())

    # -- the public surface -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """The fake device: tensors created on it behave as device tensors."""
        return _tensor.DEVICE

    def __enter__(self) -> "Session":
        _activate(self)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.tracking and exc_type is None:
            # Tensors kept alive only by reference cycles (a caught exception's traceback, say) would
            # otherwise be freed at some later collection: free them now, inside the session, so
            # their free checks are deterministic.
            gc.collect()
        _deactivate(self)
        pending, self._pending = self._pending, None
        if pending is not None and exc_type is None:
            raise pending

    def __repr__(self) -> str:
        return f"<fake session detect={self.detect!r} {'closed' if self.closed else 'open'}>"

    # -- used by the dispatch handlers -------------------------------------------------------
    def current_state(self) -> StreamState:
        return self._tls.stream or self._default_stream

    def issue(self, op: Any, call: Any, stream: StreamState, site: Any, args: Any, kwargs: Any, accesses: list) -> Kernel:
        """Issue one kernel on ``stream``: check and record its accesses (raising on a race in
        ``raise`` mode, before it runs)."""
        if self._pending is not None:
            self._raise_pending()
        self.stats.kernels += 1
        if not self.tracking:
            return Kernel(op, call, stream, 0, None, args, kwargs)
        kernel = Kernel(op, call, stream, self.clocks.issue(stream), site, args, kwargs)
        try:
            self.detector.check(accesses, stream, kernel)
        except RaceError:
            # The kernel never runs: it must leave no access behind (those checked before the racing one).
            self._forget(kernel, accesses)
            raise
        return kernel

    def _forget(self, kernel: Kernel, accesses: list) -> None:
        """Drop the records of a kernel that never ran."""
        for tensor, _ in accesses:
            state = tensor._st
            state.reads = [r for r in state.reads if r[4] is not kernel]
            state.writes = [r for r in state.writes if r[4] is not kernel]

    def launch(
        self, op: Any, call: Any, stream: StreamState, site: Any, args: Any, kwargs: Any, accesses: list,
        sync: str | None = None,
    ) -> tuple[Kernel, Any]:
        """Issue a kernel (see :meth:`issue`) and hand it to the scheduler: ``(kernel, result)``.

        ``sync`` names the host synchronization that follows the kernel (a ``Stats`` field), if any:
        bincount and friends wait for their output size, as on CUDA.
        """
        lock = self.lock
        lock.acquire()
        try:
            kernel = self.issue(op, call, stream, site, args, kwargs, accesses)
            try:
                if self.scheduler.runs_at_issue:
                    # The kernel would run inside submit() right away: run it here, without the round trip.
                    kernel.args = kernel.kwargs = None
                    result = call(*args, **kwargs)
                else:
                    result = self.scheduler.submit(kernel)
            except BaseException:
                # The op refused its arguments (dtypes, shapes): as on a device, the host raised
                # before anything was launched, so the kernel leaves no trace.
                self.stats.kernels -= 1
                if self.tracking:
                    self._forget(kernel, accesses)
                raise
            if sync is not None:
                self.host_sync(stream.clock, sync)
            return kernel, result
        finally:
            lock.release()

    def host_sync(self, clock: Any, kind: str) -> None:
        """The host waited for the work ordered by ``clock`` (``kind``: the ``Stats`` field to count
        it under); a free race reported meanwhile is raised now."""
        setattr(self.stats, kind, getattr(self.stats, kind) + 1)
        if self.tracking:
            with self.lock:
                self.clocks.host_waits_for(clock)
        if self._pending is not None:
            self._raise_pending()

    def _raise_pending(self) -> None:
        pending, self._pending = self._pending, None
        raise pending

    def _stream(self, state: StreamState) -> Any:
        return _core.Stream._wrap(self.backend, state)

    def _tensor_info(self, tensor: Any, state: StorageState) -> TensorInfo:
        alloc = user_stack(state.alloc_site) if state.alloc_site else []
        label, _ = stream_description(self._stream(state.alloc_stream))
        return TensorInfo(tuple(tensor.shape), tensor.dtype, short_location(alloc[-1] if alloc else None), label)

    def _add_race(self, race: Race) -> bool:
        key = (race.first.op, race.first.location, race.first.kind, race.second.op, race.second.location, race.second.kind)
        if key in self._seen:
            return False
        self._seen.add(key)
        self.races.append(race)
        return True

    def _report(self, record: tuple, kernel: Kernel, kind: str, tensor: Any, state: StorageState) -> None:
        earlier: Kernel = record[4]
        earlier_kind = "write" if record in state.writes else "read"
        first = make_access(earlier.op, self._stream(earlier.stream), earlier_kind, earlier.site)
        second = make_access(kernel.op, self._stream(kernel.stream), kind, kernel.site)
        race = Race(first, second, self._tensor_info(tensor, state), suggest_fix(first, second))
        self._add_race(race)
        if self.detect == "raise":
            raise RaceError(race)

    def _on_free(self, state: StorageState) -> None:
        if self.closed or not self.tracking:
            return
        with self.lock:
            pending = Detector.unordered_at_free(state, self.clocks.reuse_clock(state.alloc_stream))
            if not pending:
                return
            record = max(pending, key=lambda r: r[3])
            earlier: Kernel = record[4]
            earlier_kind = "write" if record in state.writes else "read"
            first = make_access(earlier.op, self._stream(earlier.stream), earlier_kind, earlier.site)
            second = make_access(
                "the caching allocator (last reference dropped)", self._stream(state.alloc_stream), "free",
                capture_site(sys._getframe(2)),
            )
            shape, dtype = state.alloc_meta or ((state.nbytes,), torch.uint8)
            alloc = user_stack(state.alloc_site) if state.alloc_site else []
            label, _ = stream_description(self._stream(state.alloc_stream))
            info = TensorInfo(shape, dtype, short_location(alloc[-1] if alloc else None), label)
            race = Race(first, second, info, suggest_fix(first, second))
            if self._add_race(race) and self.detect == "raise" and self._pending is None:
                self._pending = RaceError(race)


class FakeBackend(Backend):
    """The ``fake`` backend of one session."""

    name = "fake"

    def __init__(self, session: Session) -> None:
        self._session = session

    def __repr__(self) -> str:
        return f"<streamkit backend 'fake' of {self._session!r}>"

    def device(self) -> torch.device:
        return _tensor.DEVICE

    def check_usable(self) -> None:
        if self._session.closed:
            raise SessionClosedError(f"this stream or event belongs to a fake session that has ended ({self._session!r})")

    def synchronize(self) -> None:
        s = self._session
        s.stats.device_syncs += 1
        if s.tracking:
            with s.lock:
                s.clocks.host_waits_for_all()
        if s._pending is not None:
            s._raise_pending()

    # streams
    def new_stream(self, priority: int) -> StreamState:
        self.check_usable()
        low, high = PRIORITY_RANGE
        s = self._session
        with s.lock:
            return s.clocks.new_stream(min(max(priority, low), high), capture_site(sys._getframe(2)))

    def current_stream(self) -> StreamState:
        return self._session.current_state()

    def default_stream(self) -> StreamState:
        return self._session.clocks.streams[0]

    def stream_context(self, stream: StreamState) -> _StreamContext:
        return _StreamContext(self._session._tls, stream)

    def stream_wait_event(self, stream: StreamState, event: EventState) -> None:
        s = self._session
        if event.clock is None:
            warnings.warn(
                UnrecordedEventWarning(
                    "waiting on an event that was never recorded orders nothing (a silent no-op on CUDA);"
                    " record it on the producing stream first"
                ),
                stacklevel=3,
            )
            return
        s.stats.event_waits += 1
        if s.tracking:
            with s.lock:
                s.clocks.wait(stream, event)

    def stream_wait_stream(self, stream: StreamState, other: StreamState) -> None:
        s = self._session
        s.stats.event_records += 1  # as on CUDA: an event recorded on `other`, then waited on
        s.stats.event_waits += 1
        if s.tracking:
            with s.lock:
                merge(stream.clock, other.clock)  # (the host's part is in every stream's effective clock)

    def stream_synchronize(self, stream: StreamState) -> None:
        self._session.host_sync(stream.clock, "stream_syncs")

    def stream_query(self, stream: StreamState) -> bool:
        # Eager: all issued work has run. A True answer lets the host rely on that work.
        s = self._session
        if s.tracking:
            with s.lock:
                s.clocks.host_waits_for(stream.clock)
        return True

    def stream_priority(self, stream: StreamState) -> int:
        return stream.priority

    def stream_key(self, stream: StreamState) -> Any:
        return stream.idx

    def stream_label(self, stream: StreamState) -> str:
        return "default" if stream.idx == 0 else f"#{stream.idx}"

    # events
    def new_event(self, enable_timing: bool) -> EventState:
        self.check_usable()
        return EventState(enable_timing)

    def event_record(self, event: EventState, stream: StreamState) -> None:
        s = self._session
        s.stats.event_records += 1
        with s.lock:
            s.clocks.record(event, stream, time.perf_counter())

    def event_synchronize(self, event: EventState) -> None:
        if event.clock is None:
            warnings.warn(
                UnrecordedEventWarning(
                    "synchronizing with an event that was never recorded waits for nothing (a silent no-op"
                    " on CUDA); record it on the producing stream first"
                ),
                stacklevel=3,
            )
            return
        self._session.host_sync(event.clock, "event_syncs")

    def event_query(self, event: EventState) -> bool:
        s = self._session
        if event.clock is not None and s.tracking:
            with s.lock:
                s.clocks.host_waits_for(event.clock)
        return True

    def event_elapsed_time(self, start: EventState, end: EventState) -> float:
        if not (start.enable_timing and end.enable_timing):
            raise EventTimingError("Both events must be created with argument 'enable_timing=True'.")
        if start.clock is None or end.clock is None:
            raise EventTimingError("Both events must be recorded before calculating elapsed time.")
        return (end.time - start.time) * 1000.0

    # memory
    def record_stream(self, tensor: torch.Tensor, stream: StreamState) -> None:
        if type(tensor) is not FakeDeviceTensor:
            raise ValueError(
                f"record_stream(tensor): tensor is on {tensor.device}, not on the fake device;"
                " only device memory is managed by the stream-ordered allocator"
            )
        if tensor._st.session is not None and tensor._st.session is not self._session:
            raise SessionClosedError("record_stream(tensor): the tensor belongs to another fake session")
        state = tensor._st
        if type(state.record_streams) is tuple:
            state.record_streams = set(state.record_streams)
        state.record_streams.add(stream.idx)


# -- which session is active ------------------------------------------------------------------
_explicit: Session | None = None
_default: Session | None = None
_lock = threading.Lock()


def active_session() -> Session:
    """The open explicit session, else the process-wide default session (``detect="raise"``)."""
    global _default
    if _explicit is not None:
        return _explicit
    with _lock:
        if _default is None:
            _default = Session("raise")
        _state["session"] = _default
        return _default


def active_backend() -> FakeBackend:
    return active_session().backend


def _activate(session: Session) -> None:
    global _explicit
    with _lock:
        if session.closed:
            raise SessionClosedError(f"{session!r} has ended; open a new fake.session()")
        if _explicit is not None:
            raise StreamkitError(
                f"a fake session is already open ({_explicit!r}); fake sessions don't nest: close it first"
            )
        _explicit = session
        _state["session"] = session
    _core._push_backend(session.backend)


def _deactivate(session: Session) -> None:
    global _explicit
    _core._pop_backend(session.backend)
    with _lock:
        session.closed = True
        session.backend.closed = True
        if _explicit is session:
            _explicit = None
            _state["session"] = _default


@contextmanager
def session(detect: str = "raise") -> Iterator[Session]:
    """Open a fake session: the fake backend becomes the active backend for every ``sk.*`` call
    (process-wide) until the block ends.

    ``detect="raise"`` raises :class:`~streamkit.RaceError` at the second access of a race,
    ``"record"`` appends it to ``session.races`` and goes on, ``"off"`` tracks nothing.
    """
    s = Session(detect)
    with s:
        yield s
