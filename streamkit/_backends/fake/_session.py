"""Fake sessions: one fake device with its streams, events, stats and races, and the backend that
exposes them through the public API."""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Iterator

import torch

from ..._api import Stream
from ..._backend import Backend, activate, deactivate
from ..._errors import EventTimingError, SessionClosedError, StreamkitError, StreamkitWarning, UnrecordedEventWarning
from . import _active, _fastpath, _tensor  # noqa: F401  (importing _fastpath installs the fast path on FakeDeviceTensor)
from . import _emulate, _graph, _handles
from ._clocks import Clocks, StreamState, merge, ordered_before
from ._handles import DEFAULT_STREAM, FakeEvent, FakeStream, resolve
from ._deferred import PCT_DEPTH, SCHEDULES, DeferredScheduler, poison
from ._detector import Detector
from ._report import Race, RaceError, Reporter
from ._sites import capture_site
from ._tokens import Constraints, check_fingerprint, session_args
from ._tensor import FakeDeviceTensor
from ._tracking import AccessKind, AccessRecord, EagerScheduler, Kernel, StorageState, size_class

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

    ``schedule``: ``"eager"`` runs each kernel at issue (the default; ``None`` takes
    ``STREAMKIT_SCHEDULE`` from the environment, else ``"eager"``); ``"lazy"``, ``"adversarial"``,
    ``"random"`` (with ``seed``), ``"pct"`` (with ``seed`` and ``depth``) and ``"race"`` (with
    ``target``, two kernels as ``(stream, seq)``: the second runs first) defer kernels
    (:mod:`._deferred`, docs/exploration.md).

    Use it through :func:`session`. While open it is the active backend of every ``sk.*`` call and
    the home of every tensor created on :attr:`device`. Public: :attr:`detect`, :attr:`races`,
    :attr:`stats`, :attr:`closed`, :attr:`backend`, :attr:`device`; the rest is the engine.
    """

    def __init__(
        self, detect: str = "raise", schedule: str | None = None, seed: int = 0, depth: int = PCT_DEPTH, target: Any = None,
        emulate: str | None = None,
    ) -> None:
        # emulation hook (streamkit/_backends/fake/_emulate.py): the device type this session is
        emulate = _emulate.check_name(emulate) if emulate is not None else _emulate.default()
        if detect not in DETECT_MODES:
            raise ValueError(f"session(detect): expected one of {', '.join(map(repr, DETECT_MODES))}, got {detect!r}")
        if schedule is None:
            schedule = os.environ.get("STREAMKIT_SCHEDULE") or "eager"
        self._token_fingerprint = None
        #: schedule=TOKEN with a fingerprint: whether the kernel sequence still matched it (at exit)
        self.fingerprint_matched: bool | None = None
        if isinstance(schedule, str) and schedule not in SCHEDULES and (":" in schedule or "/" in schedule):
            self._token = schedule
            schedule, seed, depth, target, self._token_fingerprint = session_args(schedule)
        elif schedule == "constraints" and target is not None:
            if not isinstance(target, Constraints):
                target = Constraints(target)
        if schedule not in SCHEDULES:
            raise ValueError(f"session(schedule): expected one of {', '.join(map(repr, SCHEDULES))}, got {schedule!r}")
        if type(depth) is not int or depth < 1:
            raise ValueError(f"session(depth): expected an int >= 1, got {depth!r}")
        if (schedule in ("race", "constraints")) != (target is not None):
            raise ValueError(
                'session(target): schedule="race" takes target=((stream, seq), (stream, seq)), schedule="constraints"'
                " pairs of fake.KernelId (or use schedule=TOKEN), the others none"
            )
        if target is not None and schedule == "race":
            try:
                target = tuple((int(stream), int(seq)) for stream, seq in target)
                if len(target) != 2:
                    raise ValueError
            except (TypeError, ValueError):
                raise ValueError(f"session(target): expected ((stream, seq), (stream, seq)), got {target!r}") from None
        _emulate.claim(emulate)  # (names PrivateUse1 as this session needs, or says why it can't)
        #: the device type this session emulates (``"cuda"``, ``"npu"``), or ``None``: the fake device
        self.emulate = emulate
        self._device = _emulate.device_of(emulate)
        self.schedule = schedule
        self.seed = seed
        self.depth = depth
        self.detect = detect
        self.races: list[Race] = []
        self.stats = Stats()
        self.closed = False
        self.backend = BACKEND
        # a deferred schedule needs the clocks (they say what may run) even with detect="off"
        self._tracked = detect != "off" or schedule != "eager"
        self._lock = threading.RLock()
        self._clocks = Clocks()
        self._scheduler: Any = EagerScheduler() if schedule == "eager" else DeferredScheduler(self, schedule, seed, depth, target)
        self._eager = self._scheduler.runs_at_issue
        self._reporter = Reporter(self.races, self._wrap_stream)
        self._detector = Detector(self._on_race, self._clocks.host)
        self._check = self._detector.check  # (bound once: it runs for every kernel)
        self._tls = _ThreadState()
        self._pending: RaceError | None = None
        self._capture: Any = None  # the graph capture underway (_graph.Capture), if any
        self._default_stream = self._clocks.new_stream(0, (), DEFAULT_STREAM)

    # -- the public surface -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """The fake device: tensors created on it behave as device tensors (``cuda:0`` / ``npu:0`` in
        a session that emulates that device type)."""
        return self._device

    def __enter__(self) -> "Session":
        if self.emulate:
            _emulate.acquire(self.emulate)  # (emulation hook: install the device's names)
        try:
            _active.enter(self)
        except BaseException:
            if self.emulate:
                _emulate.release(self.emulate)
            raise
        _tensor.session_opened()
        activate(self.backend)
        # What exists now is not the session's: freeze it, so the collection at exit looks only at
        # objects made inside the session (a full collection with torch loaded takes ~0.3 s).
        # A process that froze objects itself keeps its freeze, and the exit collects everything.
        self._froze_heap = self._tracked and gc.get_freeze_count() == 0
        if self._froze_heap:
            gc.freeze()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self._eager:
            # the session ends when the device is idle: what is still queued runs now
            self._scheduler.drain_all()
            failed = self._scheduler.take_error()
            if failed is not None and exc_type is None and self._pending is None:
                self._pending = failed
            if self._token_fingerprint is not None and exc_type is None:
                self.fingerprint_matched = check_fingerprint(self._scheduler, self._token_fingerprint, self._token)
        try:
            if self._tracked and exc_type is None:
                # Tensors kept alive only by reference cycles (a caught exception's traceback, say)
                # would otherwise be freed at some later collection: free them now, inside the
                # session, so their free checks are deterministic.
                gc.collect()
        finally:
            if self._froze_heap:
                gc.unfreeze()
        deactivate(self.backend)
        self.closed = True
        for stream in self._clocks.streams:
            stream.freed.clear()  # (pooled blocks reference kernels, which reference their streams)
        _active.leave(self)
        _tensor.session_closed()
        if self.emulate:
            _emulate.release(self.emulate)  # (emulation hook: the last holder restores every replaced name)
        collectives = sys.modules.get(__package__ + "._collectives")
        if collectives is not None:  # (loaded only once a collective ran on the fake device)
            collectives.session_ended(self)
        pending, self._pending = self._pending, None
        if pending is not None and exc_type is None:
            raise pending

    def __repr__(self) -> str:
        return f"<fake session detect={self.detect!r} {'closed' if self.closed else 'open'}>"

    # -- the engine, used by the dispatch handlers and the fast path --------------------------
    def _current_stream(self) -> StreamState:
        """The calling thread's current stream."""
        return self._tls.stream or self._default_stream

    def _stream_context(self, stream: StreamState) -> "_StreamContext":
        return _StreamContext(self._tls, stream)

    def _issue(self, op: Any, call: Any, stream: StreamState, site: Any, args: Any, kwargs: Any, accesses: list) -> Kernel:
        """Issue one kernel on ``stream``: check and record its accesses (raising on a race in
        ``raise`` mode, before it runs)."""
        if self._pending is not None:
            self._raise_pending()
        self.stats.kernels += 1
        if not self._tracked:
            return Kernel(op, stream, 0, None).bind(call, args, kwargs)
        kernel = Kernel(op, stream, self._clocks.issue(stream), site).bind(call, args, kwargs)
        try:
            self._detector.check(accesses, stream, kernel)
        except RaceError:
            # The kernel never runs: it must leave no access behind (those checked before the racing one).
            self._forget(kernel, accesses)
            raise
        return kernel

    def _forget(self, kernel: Kernel, accesses: list) -> None:
        """Drop the records of a kernel that never ran."""
        for tensor, _ in accesses:
            state = tensor._st
            state.reads = [r for r in state.reads if r.kernel is not kernel]
            state.writes = [r for r in state.writes if r.kernel is not kernel]

    def _launch(
        self, op: Any, call: Any, stream: StreamState | None, site: Any, args: Any, kwargs: Any, accesses: list,
        sync: str | None = None,
    ) -> tuple[Kernel, Any]:
        """Issue a kernel on ``stream`` (``None``: the current stream; it is ``kernel.stream``) and
        hand it to the scheduler: ``(kernel, result)``. See :meth:`_issue`.

        ``sync`` names the host synchronization that follows the kernel (a ``Stats`` field), if any:
        bincount and friends wait for their output size, as on CUDA.
        """
        if stream is None:
            stream = self._tls.stream or self._default_stream
        if self._capture is not None:  # a graph capture records the kernels of captured streams
            captured = self._capture.launch(op, call, stream, site, args, kwargs, accesses, sync)
            if captured is not None:
                return captured
        lock = self._lock
        lock.acquire()
        try:
            # _issue, inline (this runs on every op)
            if self._pending is not None:
                self._raise_pending()
            self.stats.kernels += 1
            if self._tracked:
                clock = stream.clock  # Clocks.issue, inline
                idx = stream.idx
                seq = clock[idx] = clock[idx] + 1
                kernel = Kernel(op, stream, seq, site)
                try:
                    self._check(accesses, stream, kernel)
                except RaceError:
                    self._forget(kernel, accesses)
                    raise
            else:
                kernel = Kernel(op, stream, 0, None)
            try:
                if self._eager:  # the kernel runs right here and keeps no arguments
                    result = call(*args, **kwargs) if kwargs else call(*args)
                else:
                    result = self._scheduler.submit(kernel.bind(call, args, kwargs), sync)
            except BaseException:
                # The op refused its arguments (dtypes, shapes): as on a device, the host raised
                # before anything was launched, so the kernel leaves no trace.
                self.stats.kernels -= 1
                if self._tracked:
                    self._forget(kernel, accesses)
                raise
            if sync is not None:
                self._host_sync(stream.clock, sync)
            return kernel, result
        finally:
            lock.release()

    def _host_sync(self, clock: Any, kind: str) -> None:
        """The host waited for the work ordered by ``clock`` (``kind``: the ``Stats`` field to count
        it under); a free race reported meanwhile is raised now."""
        setattr(self.stats, kind, getattr(self.stats, kind) + 1)
        if not self._eager:
            self._drained(clock)
        if self._tracked:
            with self._lock:
                self._clocks.host_waits_for(clock)
        if self._pending is not None:
            self._raise_pending()

    def _host_sync_all(self) -> None:
        self.stats.device_syncs += 1
        if not self._eager:
            self._drained(None)
        if self._tracked:
            with self._lock:
                self._clocks.host_waits_for_all()
        if self._pending is not None:
            self._raise_pending()

    def _drained(self, clock: Any) -> None:
        """A deferred schedule: run what the host waits for (``None``: everything); a kernel that
        failed when it ran raises now."""
        if clock is None:
            self._scheduler.drain_all()
        else:
            self._scheduler.drain(clock)
        failed = self._scheduler.take_error()
        if failed is not None:
            raise failed

    def _query(self, clock: Any) -> bool:
        """``query()``: whether the work ordered by ``clock`` has run (a deferred schedule runs one
        kernel of it first, so polling makes progress); a True answer is a host sync in the clocks."""
        done = self._eager or self._scheduler.progress(clock)
        if done and self._tracked:
            with self._lock:
                self._clocks.host_waits_for(clock)
        if not self._eager:
            failed = self._scheduler.take_error()
            if failed is not None:
                raise failed
        return done

    def _raise_pending(self) -> None:
        pending, self._pending = self._pending, None
        raise pending

    def _wrap_stream(self, state: StreamState) -> Stream:
        return Stream.from_handle(self.backend, state.handle)

    def _on_race(self, earlier: AccessRecord, earlier_kind: AccessKind, kernel: Kernel, kind: AccessKind, tensor: Any, state: StorageState) -> None:
        if self.detect == "off":
            return  # (clocks kept for a deferred schedule only)
        race, _ = self._reporter.access_race(earlier, earlier_kind, kernel, kind, tensor, state)
        if self.detect == "raise":
            raise RaceError(race)

    def _on_free(self, state: StorageState) -> None:
        if self.closed or not self._tracked:
            return
        with self._lock:
            pending = Detector.unordered_at_free(state, self._clocks.reuse_clock(state.alloc_stream))
            if not pending:
                state.pool()  # other streams' uses are ordered before the allocation stream
                return
            if self.detect != "off":  # (clocks kept for a deferred schedule only)
                earlier, kind = max(pending, key=lambda found: found[0].seq)
                race, new = self._reporter.free_race(earlier, kind, state, capture_site(sys._getframe(2)))
                if new and self.detect == "raise" and self._pending is None:
                    self._pending = RaceError(race)
            if not self._eager:
                # CUDA's allocator doesn't know about the other streams' pending uses: the block
                # goes back to its stream's pool all the same, and a still-queued kernel of those
                # streams reaches whatever the next owner writes there (eager: nothing is queued, so
                # the free race report is all there is to show)
                state.pool()


    def _recycle(self, state: StorageState, stream: StreamState, out: Any = None) -> None:
        """``state`` is a new allocation on ``stream`` whose first writer is unknown (``empty``...):
        as CUDA's caching allocator, hand it the most recently freed block of its size class in
        ``stream``'s pool, whose access history it takes over. A block with ``record_stream`` users
        not ordered before ``stream`` yet is not available (CUDA: its events haven't completed).

        Under a deferred schedule ``out`` (the new tensor) also takes over the block's memory
        (:meth:`_reuse_memory`)."""
        wanted = size_class(state.nbytes)
        if not wanted:
            return
        with self._lock:
            freed = stream.freed
            clock = None
            for i in range(len(freed) - 1, -1, -1):
                old = freed[i]
                if size_class(old.nbytes) != wanted:
                    continue
                if old.record_streams:
                    if clock is None:
                        clock = self._clocks.reuse_clock(stream)
                    covered = old.record_streams
                    if any(
                        r.stream in covered and not ordered_before(r.stream, r.seq, clock)
                        for records in (old.writes, old.reads) for r in records
                    ):
                        continue
                try:
                    freed.remove(old)  # (by identity; a free on another thread may have trimmed the pool)
                except ValueError:
                    return
                state.reads = list(old.reads)
                state.writes = list(old.writes)
                # which earlier tensor each inherited access belongs to (for the report)
                before = getattr(old, "prior", None) or {}
                mine = (old.alloc_meta, old.alloc_site, old.alloc_stream)
                state.prior = {id(r): before.get(id(r)) or (r, *mine) for r in state.reads + state.writes}
                if out is not None and not self._eager:
                    self._reuse_memory(old, stream, out)
                return

    def _reuse_memory(self, old: StorageState, stream: StreamState, out: Any) -> None:
        """A deferred schedule: ``out`` (a new allocation on ``stream``) takes over the memory of the
        freed block ``old``, as the caching allocator hands it over. Every use of ``old`` that
        ``stream``'s future work is ordered after (its own stream's, and record_stream's users
        once they are) runs first, then the memory is poisoned: a legal schedule, and the poison is
        written at reuse, not at free, so a correct ``record_stream`` program never sees it. Uses
        of ``old`` on other streams that nothing orders before the reuse (a free race) stay queued
        and, when they run, read or overwrite the new owner's data, as on the device."""
        mem = getattr(old, "mem", None)
        inner = out._inner
        if mem is None or mem.nbytes() < inner.untyped_storage().nbytes():
            return  # (a block that had no memory of its own here, or a smaller one: fresh memory)
        clock = self._clocks.reuse_clock(stream)
        need: list[int] = []
        for records in (old.writes, old.reads):
            for r in records:
                if ordered_before(r.stream, r.seq, clock):
                    if len(need) <= r.stream:
                        need.extend([0] * (r.stream + 1 - len(need)))
                    need[r.stream] = max(need[r.stream], r.seq)
        if need:
            self._scheduler.drain(need)
        with torch.no_grad():
            shared = torch.empty(0, dtype=inner.dtype).set_(mem, inner.storage_offset(), inner.size(), inner.stride())
        poison(shared)
        out._inner = shared


class FakeBackend(Backend):
    """The ``fake`` backend: one object for the process. Each call works in the fake session active
    when it is made (the open ``fake.session()``, else the process-wide default session), on the
    state its stream and event handles have there (see :mod:`._handles`: a handle made outside that
    session is bound to it on first use; one of an ended session, used when no session is open,
    raises :class:`~streamkit.SessionClosedError`)."""

    name = "fake"

    @property
    def session(self) -> "Session":
        """The fake session calls work in now."""
        return _active.current or _active.get()

    @classmethod
    def load(cls) -> "FakeBackend":
        """The fake backend (it works in the open ``fake.session()``, else the default session).
        Registers the fake device (PyTorch's PrivateUse1), so ``sk.device()`` and
        ``device="fake"`` work before any session; raises
        :class:`~streamkit.BackendUnavailableError` saying why when it can't."""
        _emulate.claim(_emulate.default())
        return BACKEND

    @classmethod
    @contextmanager
    def test_context(cls) -> Iterator["FakeBackend"]:
        """A ``fake.session(detect="raise")`` for the test: a race fails it."""
        with session(detect="raise") as s:
            yield s.backend

    def __repr__(self) -> str:
        return "<streamkit backend 'fake'>"

    def device(self) -> torch.device:
        """The active session's device (``fake:0``; ``cuda:0``/``npu:0`` in an emulating session)."""
        s = _active.current
        if s is None:
            return _emulate.device_of(_emulate.default())
        return s.device

    def synchronize(self) -> None:
        s = _active.current or _active.get()
        if s._capture is not None:
            s._capture.host_sync("sk.synchronize()")
        s._host_sync_all()

    # streams
    def new_stream(self, priority: int) -> FakeStream:
        low, high = PRIORITY_RANGE
        s = _active.current or _active.get()
        return _handles.new_stream(s, min(max(priority, low), high), capture_site(sys._getframe(2)))

    def current_stream(self) -> FakeStream:
        return (_active.current or _active.get())._current_stream().handle

    def default_stream(self) -> FakeStream:
        return DEFAULT_STREAM

    def stream_context(self, stream: FakeStream) -> "_StreamContext":
        s = _active.current or _active.get()
        return s._stream_context(resolve(stream, s))

    def stream_wait_event(self, stream: FakeStream, event: FakeEvent) -> None:
        s = _active.current or _active.get()
        state = resolve(event, s)
        target = resolve(stream, s)
        if s._capture is not None and s._capture.wait_event(target, state, state.clock is not None):
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
        if s._tracked:
            with s._lock:
                s._clocks.wait(target, state)

    def stream_wait_stream(self, stream: FakeStream, other: FakeStream) -> None:
        s = _active.current or _active.get()
        target = resolve(stream, s)
        source = resolve(other, s)
        if s._capture is not None and s._capture.wait_stream(target, source):
            return
        s.stats.event_records += 1  # as on CUDA: an event recorded on `other`, then waited on
        s.stats.event_waits += 1
        if s._tracked:
            with s._lock:
                merge(target.clock, source.clock)  # (the host's part is in every stream's effective clock)

    def stream_synchronize(self, stream: FakeStream) -> None:
        s = _active.current or _active.get()
        state = resolve(stream, s)
        if s._capture is not None:
            s._capture.host_sync("Stream.synchronize()", stream=state)
        s._host_sync(state.clock, "stream_syncs")

    def stream_query(self, stream: FakeStream) -> bool:
        # Eager: all issued work has run. A True answer lets the host rely on that work.
        s = _active.current or _active.get()
        state = resolve(stream, s)
        if s._capture is not None:
            s._capture.host_sync("Stream.query()", stream=state)
        return s._query(state.clock)

    def stream_priority(self, stream: FakeStream) -> int:
        return stream.priority

    def stream_key(self, stream: FakeStream) -> Any:
        return stream

    def stream_label(self, stream: FakeStream) -> str:
        return repr(stream)

    # events
    def new_event(self, enable_timing: bool) -> FakeEvent:
        return _handles.new_event(_active.current or _active.get(), enable_timing)

    def event_record(self, event: FakeEvent, stream: FakeStream) -> None:
        s = _active.current or _active.get()
        state = resolve(event, s)
        target = resolve(stream, s)
        if s._capture is not None and s._capture.record(state, target):
            return
        s.stats.event_records += 1
        event.recorded = True
        with s._lock:
            s._clocks.record(state, target, time.perf_counter())

    def event_synchronize(self, event: FakeEvent) -> None:
        s = _active.current or _active.get()
        state = resolve(event, s)
        if s._capture is not None:
            s._capture.host_sync("Event.synchronize()", event=state)
        if state.clock is None:
            warnings.warn(
                UnrecordedEventWarning(
                    "synchronizing with an event that was never recorded waits for nothing (a silent no-op"
                    " on CUDA); record it on the producing stream first"
                ),
                stacklevel=3,
            )
            return
        s._host_sync(state.clock, "event_syncs")

    def event_query(self, event: FakeEvent) -> bool:
        s = _active.current or _active.get()
        state = resolve(event, s)
        if s._capture is not None:
            s._capture.host_sync("Event.query()", event=state)
        if state.clock is None:
            return True
        return s._query(state.clock)

    def event_elapsed_time(self, start: FakeEvent, end: FakeEvent) -> float:
        s = _active.current or _active.get()
        first, last = resolve(start, s), resolve(end, s)
        if not (first.enable_timing and last.enable_timing):
            raise EventTimingError("Both events must be created with argument 'enable_timing=True'.")
        if first.clock is None or last.clock is None:
            raise EventTimingError("Both events must be recorded before calculating elapsed time.")
        return (last.time - first.time) * 1000.0

    # memory
    def record_stream(self, tensor: torch.Tensor, stream: FakeStream) -> None:
        s = _active.current or _active.get()
        if type(tensor) is not FakeDeviceTensor:
            raise ValueError(
                f"record_stream(tensor): tensor is on {tensor.device}, not on the fake device;"
                " only device memory is managed by the stream-ordered allocator"
            )
        owner = tensor._st.session
        if owner is not None and owner is not s:
            _tensor._check_session(s, tensor)
        state = resolve(stream, s)
        st = tensor._st
        if type(st.record_streams) is tuple:
            st.record_streams = set(st.record_streams)
        st.record_streams.add(state.idx)

    # graphs (_graph)
    def new_graph(self) -> "_graph.FakeGraph":
        return _graph.new_graph(_active.current or _active.get())

    def graph_capture(self, graph: Any, stream: Any, pool: Any) -> Any:
        s = _active.current or _active.get()
        return _graph.capture(s, graph, stream, pool, capture_site(sys._getframe(2)))

    def graph_replay(self, graph: Any) -> None:
        s = _active.current or _active.get()
        _graph.replay(s, graph, s._current_stream())

    def graph_reset(self, graph: Any) -> None:
        capture = (_active.current or _active.get())._capture
        if capture is not None and graph is capture.graph:
            raise _graph.GraphCaptureError("Graph.reset() inside its own capture block; leave the block first")
        graph.reset()

    def graph_pool(self, graph: Any) -> Any:
        if not graph.captured:
            raise _graph.GraphError("Graph.pool() without a preceding successful capture")
        return _graph.PoolToken(graph)


#: the fake backend (``sk.get_backend("fake")``, ``session.backend``)
BACKEND = FakeBackend()

_active.set_default_factory(lambda: Session("raise"))


@contextmanager
def session(
    detect: str = "raise", schedule: str | None = None, seed: int = 0, depth: int = PCT_DEPTH, target: Any = None,
    emulate: str | None = None,
) -> Iterator[Session]:
    """Open a fake session: the fake backend becomes the active backend for every ``sk.*`` call
    (process-wide) until the block ends.

    ``detect="raise"`` raises :class:`~streamkit.RaceError` at the second access of a race,
    ``"record"`` appends it to ``session.races`` and goes on, ``"off"`` tracks nothing.

    ``emulate="cuda"`` / ``"npu"``: inside the block the fake device is that device type, and
    unmodified ``torch.cuda`` / ``torch.npu`` / ``torch_npu`` code runs on it (docs/emulation.md);
    ``None`` (default) takes ``STREAMKIT_EMULATE`` from the environment, else the ``fake`` device.

    Inside a checker run (``python -m streamkit check``), the block is a scope of the checker's
    session instead (see :class:`CheckedBlock`): the checker sees every race, and the block's
    ``detect`` still decides whether a race raises.
    """
    host = _active.explicit()
    if host is not None and getattr(host, "_checker_host", False) and not host.closed:
        if schedule not in (None, "eager"):
            warnings.warn(
                StreamkitWarning(
                    f"fake.session(schedule={schedule!r}) under `python -m streamkit check`: the checker runs"
                    " the script on its own eager session; run fake.explore() outside the checker to explore schedules"
                ),
                stacklevel=3,
            )
        block = CheckedBlock(host, detect)
        if emulate is not None and _emulate.check_name(emulate) != host.emulate:
            # (emulation hook: the block emulates on the checker's device; npu needs it from the start)
            with _emulate.emulating(emulate), block:
                yield block
            return
        with block:
            yield block
        return
    if emulate is not None:
        _emulate.check_name(emulate)
    s = Session(detect, schedule, seed, depth, target, emulate=emulate)
    if host is not None and getattr(host, "_yields_to_sessions", False) and not host.closed:
        # (emulation hook: the per-test session of `pytest --streamkit-emulate` steps aside for the
        # test's own sessions, and is the active one again after them)
        _active.leave(host)
        deactivate(host.backend)
        try:
            with s:
                yield s
        finally:
            _active.enter(host)
            activate(host.backend)
        return
    with s:
        yield s


class CheckedBlock(Session):
    """What ``fake.session(detect)`` gives a script that runs under the checker: a scope of the
    checker's open session (one device: same streams, tensors and race detector), not a session
    of its own.

    - ``detect="raise"``: a race inside the block raises :class:`~streamkit.RaceError` as in a
      session of its own (and the checker reports it too); ``"record"`` and ``"off"`` don't raise
      (under the checker, an ``"off"`` block is checked like ``"record"``).
    - :attr:`races`: the races found while the block was open (a list made on each read; the
      checker's report has them all); :attr:`stats`: what the device did while it was open.
    - Blocks don't nest, as sessions don't; streams made inside stay usable after the block (they
      belong to the checker's session, which closes when the script ends).
    """

    def __init__(self, host: Session, detect: str = "raise") -> None:  # no Session.__init__: no device of its own
        if detect not in DETECT_MODES:
            raise ValueError(f"session(detect): expected one of {', '.join(map(repr, DETECT_MODES))}, got {detect!r}")
        self._host = host
        self._detect = detect
        self.closed = False
        self._start = len(host.races)
        self._end: int | None = None
        self._stats_start = host.stats.copy()
        self._stats_end: Stats | None = None
        self._saved_detect = host.detect

    @property
    def detect(self) -> str:  # type: ignore[override]
        return self._detect

    @property
    def races(self) -> list[Race]:  # type: ignore[override]
        return list(self._host.races[self._start:self._end])

    @property
    def stats(self) -> Stats:  # type: ignore[override]
        return (self._stats_end or self._host.stats) - self._stats_start

    @property
    def backend(self) -> "FakeBackend":  # type: ignore[override]
        return self._host.backend

    @property
    def host(self) -> Session:
        """The checker's session this block is a scope of."""
        return self._host

    def __getattr__(self, name: str) -> Any:  # the engine is the host's
        return getattr(self._host, name)

    def __enter__(self) -> "CheckedBlock":
        host = self._host
        if self.closed:
            raise SessionClosedError(f"{self!r} has ended; open a new fake.session()")
        if host._checker_block is not None:
            raise StreamkitError(
                f"a fake session is already open ({host._checker_block!r}); fake sessions don't nest: close it first"
            )
        host._checker_block = self
        self._saved_detect = host.detect
        if self._detect == "raise":
            host.detect = "raise"  # the host still records every race; now it raises them too
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        host = self._host
        try:
            if exc_type is None:
                gc.collect()  # as a session's exit: free what only cycles keep alive, inside the block
        finally:
            host.detect = self._saved_detect
            host._checker_block = None
            self.closed = True
            self._end = len(host.races)
            self._stats_end = host.stats.copy()
        pending, host._pending = host._pending, None  # set only while detect was "raise": this block's
        if pending is not None and exc_type is None:
            raise pending

    def __repr__(self) -> str:
        return f"<fake session detect={self._detect!r} {'closed' if self.closed else 'open'}, inside the checker's session>"


class _RaceLog(list):
    """``session.races`` of a checker session: calls ``on_race(race)`` for each race appended."""

    def __init__(self, on_race: Any) -> None:
        super().__init__()
        self._on_race = on_race

    def append(self, race: Race) -> None:
        super().append(race)
        try:
            self._on_race(race)
        except Exception:  # a report that can't be written must not break the checked program
            pass


@contextmanager
def checker_session(on_race: Any = None, emulate: str | None = None) -> Iterator[Session]:
    """The checker's session (``detect="record"``): a ``fake.session()`` the checked script opens
    inside it becomes a :class:`CheckedBlock` of it. ``on_race(race)`` is called for every new race
    as it is found (a spawned child streams its report this way, so a crash loses nothing)."""
    s = Session("record", emulate=emulate)
    s._checker_host = True  # type: ignore[attr-defined]
    s._checker_block = None  # type: ignore[attr-defined]
    if on_race is not None:
        s.races = _RaceLog(on_race)
        s._reporter.races = s.races
    with s:
        yield s
