"""The fake engine: one fake device's streams, events, clocks, scheduler, race detector and
stats (:class:`Session`). The dispatch handlers, the fast path, graphs, collectives and pinned
memory call it through the interface :class:`._interface.Engine` describes."""

from __future__ import annotations

import gc
import sys
import threading
from typing import Any

import torch

from ..._api import Stream
from ..._errors import RaceError
from . import _allocator, _emulate, _fastpath, _tensor  # noqa: F401  (importing _fastpath installs the fast path on FakeDeviceTensor)
from . import _p2p, _rebind  # noqa: F401  (_rebind: .data =, set_, untyped_storage)
from ._clocks import Clocks, StreamState
from ._deferred import PCT_DEPTH, DeferredScheduler
from ._detector import Detector
from ._fake_backend import BACKEND
from ._handles import DEFAULT_STREAM
from ._allocator import StorageState
from ._report import Race, Reporter
from ._sites import STACK_DEPTH
from ._stats import Stats
from ._tokens import check_fingerprint, resolve_schedule
from ._tensor import FakeDeviceTensor
from ._tracking import AccessKind, AccessRecord, EagerScheduler, Kernel

DETECT_MODES = ("raise", "record", "off")


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
    :attr:`stats`, :attr:`closed`, :attr:`backend`, :attr:`device`. The engine's interface (used by
    the fake backend's own modules, public by convention, not API): :class:`._interface.Engine`;
    names with a leading underscore are the engine's own.
    """

    # (Hooks a few sessions set, as class-level defaults: a session's instance attributes stay
    # within the 30 that CPython's shared-key instance dicts hold, past which every attribute
    # read of the session, several per op, gets slower.)
    #: fake.explore's hook (streamkit._backends.fake._planner): called first for every race the
    #: detector finds; True skips the report (a race the eager run already reported)
    race_hook: Any = None
    #: fake.explore's observation hook (streamkit._backends.fake._planner): called with
    #: ``(state, kernels)`` for every race found, access, free or host (``state``: the storage's
    #: access table, None for pinned host memory; ``kernels``: the device side's kernels)
    on_raced: Any = None
    #: with a focus (fake.explore's runs), the scheduler's :meth:`~._deferred.DeferredScheduler.inert`
    #: (bound once: launch asks it for every kernel), else None
    inert: Any = None
    #: ``pytest --streamkit-emulate``'s per-test session: a ``fake.session()`` the test opens
    #: itself steps this one aside while it is open (fake sessions don't nest)
    yields_to_sessions = False
    #: schedule=TOKEN with a fingerprint: whether the kernel sequence still matched it (at exit)
    fingerprint_matched: bool | None = None
    _token: str | None = None  # (schedule=TOKEN: the token, and its fingerprint)
    _token_fingerprint: str | None = None

    def __init__(
        self, detect: str = "raise", schedule: str | None = None, seed: int = 0, depth: int = PCT_DEPTH, target: Any = None,
        emulate: str | None = None,
    ) -> None:
        # emulation hook (streamkit/_backends/fake/_emulate.py): the device type this session is
        emulate = _emulate.check_name(emulate) if emulate is not None else _emulate.default()
        if detect not in DETECT_MODES:
            raise ValueError(f"session(detect): expected one of {', '.join(map(repr, DETECT_MODES))}, got {detect!r}")
        # (schedule checks: the policy registry, streamkit._backends.fake._policies)
        spec = resolve_schedule(schedule, seed, depth, target)
        schedule, seed, depth, target = spec.schedule, spec.seed, spec.depth, spec.target
        if spec.token is not None:
            self._token, self._token_fingerprint = spec.token, spec.fingerprint
        #: user frames captured per kernel (fake.explore's runs keep 1: the kernel's own line names it,
        #: and the reports of the races they meet again are the eager run's)
        self.site_depth = STACK_DEPTH
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
        self.tracked = detect != "off" or schedule != "eager"
        self.lock = threading.RLock()
        self.clocks = Clocks()
        self.scheduler: Any = EagerScheduler() if schedule == "eager" else DeferredScheduler(self, schedule, seed, depth, target)
        if spec.focus is not None:  # (a token of fake.explore's: the kernels its schedule orders)
            self.scheduler.set_focus(spec.focus)
        self.eager = self.scheduler.runs_at_issue
        self.reporter = Reporter(self.races, self._wrap_stream)
        self.detector = Detector(self._on_race, self.clocks.host)
        self._check = self.detector.check  # (bound once: it runs for every kernel)
        self._tls = _ThreadState()
        self.pending: RaceError | None = None
        self.capture: Any = None  # the graph capture underway (_graph.Capture), if any
        self.default_stream = self.clocks.new_stream(0, (), DEFAULT_STREAM)

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
            self.backend.enter(self)
            _p2p.install()  # ProcessGroup.barrier / _get_backend hooks (pass-through outside fake sessions)
        except BaseException:
            if self.emulate:
                _emulate.release(self.emulate)
            raise
        _tensor.session_opened()
        # What exists now is not the session's: freeze it, so the collection at exit looks only at
        # objects made inside the session (a full collection with torch loaded takes ~0.3 s).
        # A process that froze objects itself keeps its freeze, and the exit collects everything.
        self._froze_heap = self.tracked and gc.get_freeze_count() == 0
        if self._froze_heap:
            gc.freeze()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self.eager:
            # the session ends when the device is idle: what is still queued runs now
            self.scheduler.drain_all()
            failed = self.scheduler.take_error()
            if failed is not None and exc_type is None and self.pending is None:
                self.pending = failed
            if self._token_fingerprint is not None and exc_type is None:
                self.fingerprint_matched = check_fingerprint(self.scheduler, self._token_fingerprint, self._token)
        try:
            if self.tracked and exc_type is None:
                # Tensors kept alive only by reference cycles (a caught exception's traceback, say)
                # would otherwise be freed at some later collection: free them now, inside the
                # session, so their free checks are deterministic.
                gc.collect()
        finally:
            if self._froze_heap:
                gc.unfreeze()
        self.backend.leave(self)
        _tensor.session_closed()
        if self.emulate:
            _emulate.release(self.emulate)  # (emulation hook: the last holder restores every replaced name)
        self.closed = True
        for stream in self.clocks.streams:
            stream.freed.clear()  # (pooled blocks reference kernels, which reference their streams)
        collectives = sys.modules.get(__package__ + "._collectives")
        if collectives is not None:  # (loaded only once a collective ran on the fake device)
            collectives.session_ended(self)
        pending, self.pending = self.pending, None
        if pending is not None and exc_type is None:
            raise pending

    def __repr__(self) -> str:
        return f"<fake session detect={self.detect!r} {'closed' if self.closed else 'open'}>"

    # -- the engine, used by the dispatch handlers and the fast path --------------------------
    def current_stream(self) -> StreamState:
        """The calling thread's current stream."""
        return self._tls.stream or self.default_stream

    def set_current_stream(self, stream: StreamState | None) -> None:
        """The calling thread's current stream becomes ``stream`` (``None``: the default stream)
        until set again (``torch.cuda.set_stream``)."""
        self._tls.stream = stream

    def stream_context(self, stream: StreamState) -> "_StreamContext":
        return _StreamContext(self._tls, stream)

    def issue(self, op: Any, stream: StreamState, site: Any, accesses: list) -> Kernel:
        """Issue one kernel on ``stream`` (under the lock): check and record its accesses (raising
        on a race in ``raise`` mode, before it runs). The caller runs it (:meth:`launch`; a
        collective's ``run_now``)."""
        if self.pending is not None:
            self._raise_pending()
        self.stats.kernels += 1
        if not self.tracked:
            return Kernel(op, stream, 0, None)
        clock = stream.clock  # (Clocks.issue, inline: this runs on every op)
        idx = stream.idx
        seq = clock[idx] = clock[idx] + 1
        kernel = Kernel(op, stream, seq, site)
        try:
            self._check(accesses, stream, kernel)
        except RaceError:
            # The kernel never runs: it must leave no access behind (those checked before the racing one).
            self._forget(kernel, accesses)
            raise
        return kernel

    def _forget(self, kernel: Kernel, accesses: list) -> None:
        """Drop the records of a kernel that never ran."""
        for tensor, _ in accesses:
            state = tensor.sk_state
            state.reads = [r for r in state.reads if r.kernel is not kernel]
            state.writes = [r for r in state.writes if r.kernel is not kernel]

    def launch(
        self, op: Any, call: Any, stream: StreamState | None, site: Any, args: Any, kwargs: Any, accesses: list,
        sync: str | None = None, sync_before: str | None = None,
    ) -> tuple[Kernel, Any]:
        """Issue a kernel on ``stream`` (``None``: the current stream; it is ``kernel.stream``) and
        hand it to the scheduler: ``(kernel, result)``. See :meth:`issue`.

        ``sync`` names the host synchronization that follows the kernel (a ``Stats`` field), if any:
        ``.cpu()`` waits for its copy, as on CUDA. ``sync_before`` names one that precedes it: the
        host waits for ``stream``'s earlier work, then the kernel is issued (``_host_syncs``: an op
        whose reads before its internal sync are among its reads after it).
        """
        if stream is None:
            stream = self._tls.stream or self.default_stream
        if self.capture is not None:  # a graph capture records the kernels of captured streams
            captured = self.capture.launch(op, call, stream, site, args, kwargs, accesses, sync or sync_before)
            if captured is not None:
                return captured
        if sync_before is not None:
            self.host_sync(stream.clock, sync_before)
        lock = self.lock
        lock.acquire()
        try:
            kernel = self.issue(op, stream, site, accesses)
            try:
                if self.eager:  # the kernel runs right here and keeps no arguments
                    result = call(*args, **kwargs) if kwargs else call(*args)
                elif self.inert is not None and self.inert(kernel, accesses):
                    # (fake.explore: no race touches its memory and no queued kernel conflicts
                    # with it, so no schedule changes what it computes: it runs as eager runs it)
                    result = call(*args, **kwargs) if kwargs else call(*args)
                else:
                    result = self.scheduler.submit(kernel.bind(call, args, kwargs), sync, accesses)
            except BaseException:
                # The op refused its arguments (dtypes, shapes): as on a device, the host raised
                # before anything was launched, so the kernel leaves no trace.
                self.stats.kernels -= 1
                if self.tracked:
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
        if not self.eager:
            self.drained(clock)
        if self.tracked:
            with self.lock:
                self.clocks.host_waits_for(clock)
        if self.pending is not None:
            self._raise_pending()

    def host_sync_all(self) -> None:
        self.stats.device_syncs += 1
        if not self.eager:
            self.drained(None)
        if self.tracked:
            with self.lock:
                self.clocks.host_waits_for_all()
        if self.pending is not None:
            self._raise_pending()

    def drained(self, clock: Any) -> None:
        """A deferred schedule: run what the host waits for (``None``: everything); a kernel that
        failed when it ran raises now."""
        scheduler = self.scheduler
        if clock is None:
            scheduler.drain_all()
        else:
            scheduler.drain(clock)
        if scheduler.error is not None:
            raise scheduler.take_error()

    def query(self, clock: Any) -> bool:
        """``query()``: whether the work ordered by ``clock`` has run (a deferred schedule runs one
        kernel of it first, so polling makes progress); a True answer is a host sync in the clocks."""
        done = self.eager or self.scheduler.progress(clock)
        if done and self.tracked:
            with self.lock:
                self.clocks.host_waits_for(clock)
        if not self.eager:
            failed = self.scheduler.take_error()
            if failed is not None:
                raise failed
        return done

    def _raise_pending(self) -> None:
        pending, self.pending = self.pending, None
        raise pending

    def _wrap_stream(self, state: StreamState) -> Stream:
        return Stream.from_handle(self.backend, state.handle)

    def _on_race(self, earlier: AccessRecord, earlier_kind: AccessKind, kernel: Kernel, kind: AccessKind, tensor: Any, state: StorageState) -> None:
        if self.detect == "off":
            return  # (clocks kept for a deferred schedule only)
        if self.on_raced is not None:
            self.on_raced(state, (earlier.kernel, kernel))
        if self.race_hook is not None and self.race_hook(earlier, earlier_kind, kernel, kind):
            return
        race, _ = self.reporter.access_race(earlier, earlier_kind, kernel, kind, tensor, state)
        if self.detect == "raise":
            raise RaceError(race)

    def on_free(self, state: StorageState) -> None:
        """The allocator's free check of ``state`` (see :func:`._allocator.free`)."""
        _allocator.free(self, state)

    def record_stream(self, tensor: torch.Tensor, state: StreamState) -> None:
        """``record_stream(tensor, stream)``: the allocator keeps ``tensor``'s block until the work
        issued to ``state`` so far is done."""
        if type(tensor) is not FakeDeviceTensor:
            raise ValueError(
                f"record_stream(tensor): tensor is on {tensor.device}, not on the fake device;"
                " only device memory is managed by the stream-ordered allocator"
            )
        owner = tensor.sk_state.session
        if owner is not None and owner is not self:
            _tensor.check_session(self, tensor)
        st = tensor.sk_state
        if type(st.record_streams) is tuple:
            st.record_streams = set(st.record_streams)
        st.record_streams.add(state.idx)
