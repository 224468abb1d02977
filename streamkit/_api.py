"""Backend-neutral public API: :class:`Stream`, :class:`Event`, :func:`switch` and friends.

Everything here is a thin wrapper over the active :class:`~streamkit._backend.Backend`; the
semantics stated in the docstrings are those of CUDA streams, which every backend follows.
"""

from __future__ import annotations

from typing import Any

import torch

from . import _backend as _backend_module
from ._backend import Backend, get_backend
from ._errors import BackendMismatchError


def device() -> torch.device:
    """The active backend's device."""
    return get_backend().device()


def synchronize() -> None:
    """Block the host until all work issued to every stream of the active device has completed;
    everything the host issues afterwards is ordered after that work."""
    get_backend().synchronize()


# Where to get a value of each public handle type, for the error a wrong argument raises.
_HOW_TO_GET = {
    "Stream": "create it with streamkit.Stream(...) or take it from streamkit.current_stream()",
    "Event": "create it with streamkit.Event(...) or take it from stream.record_event()",
}


def _expect(value: Any, cls: type, where: str) -> None:
    if not isinstance(value, cls):
        how = _HOW_TO_GET.get(cls.__name__, f"create it with streamkit.{cls.__name__}(...)")
        raise TypeError(
            f"{where}: expected a streamkit.{cls.__name__}, got {type(value).__module__}.{type(value).__qualname__} ({how})"
        )


def _same_backend(a: Any, b: Any, where: str) -> None:
    if a._backend is not b._backend:
        raise BackendMismatchError(
            f"{where}: {a!r} and {b!r} belong to different backends ({a._backend!r} vs {b._backend!r});"
            " streams and events can only be combined within one backend (and one fake session)"
        )


class _Wrapper:
    """A backend's handle together with the backend that made it."""

    __slots__ = ("_backend", "_handle", "__weakref__")

    @classmethod
    def from_handle(cls, backend: Backend, handle: Any) -> Any:
        """The stream or event for ``handle``, a handle of ``backend`` (for backend implementations)."""
        self = object.__new__(cls)
        self._backend = backend
        self._handle = handle
        return self


class Stream(_Wrapper):
    """A device stream: work issued to it runs in issue order (FIFO).

    ``Stream(priority=0)`` creates a new stream on the active backend. Like ``torch.cuda.Stream`` it is
    non-blocking: it has no implicit ordering with the default stream or any other stream; only
    :meth:`wait_stream`, :meth:`wait_event` and host synchronization order work across streams.
    Lower numbers are higher priorities, as on CUDA.
    """

    __slots__ = ()

    def __new__(cls, priority: int = 0) -> "Stream":
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise TypeError(f"Stream(priority): expected an int, got {type(priority).__name__}")
        backend = get_backend()
        return cls.from_handle(backend, backend.new_stream(priority))

    def wait_stream(self, other: "Stream") -> None:
        """Order all work issued to this stream after this call behind all work issued to ``other``
        before it (``self.wait_event(other.record_event())``). The host does not block."""
        if type(other) is not Stream:  # (the checks are inlined for the common case: this is called per layer)
            _expect(other, Stream, "Stream.wait_stream(other)")
        if other._backend is not self._backend:
            _same_backend(self, other, "Stream.wait_stream(other)")
        self._backend.stream_wait_stream(self._handle, other._handle)

    def wait_event(self, event: "Event") -> None:
        """Order all work issued to this stream after this call behind the work that ``event``
        captured when it was last recorded. Waiting on a never-recorded event does nothing
        (streamkit warns). The host does not block."""
        if type(event) is not Event:
            _expect(event, Event, "Stream.wait_event(event)")
        if event._backend is not self._backend:
            _same_backend(self, event, "Stream.wait_event(event)")
        self._backend.stream_wait_event(self._handle, event._handle)

    def record_event(self, event: "Event | None" = None) -> "Event":
        """Record ``event`` (a new one if ``None``) on this stream: it captures all work issued to
        this stream so far. Returns the event."""
        if event is None:
            event = Event.from_handle(self._backend, self._backend.new_event(False))
        else:
            _expect(event, Event, "Stream.record_event(event)")
            _same_backend(self, event, "Stream.record_event(event)")
        self._backend.event_record(event._handle, self._handle)
        return event

    def synchronize(self) -> None:
        """Block the host until all work issued to this stream has completed; the host, and so all
        work it issues afterwards, is then ordered after that work."""
        self._backend.stream_synchronize(self._handle)

    def query(self) -> bool:
        """``True`` if all work issued to this stream has completed (the host may then rely on it)."""
        return self._backend.stream_query(self._handle)

    @property
    def priority(self) -> int:
        return self._backend.stream_priority(self._handle)

    @property
    def backend(self) -> str:
        """Name of the backend this stream belongs to."""
        return self._backend.name

    @property
    def native(self) -> Any:
        """The framework's stream (``torch.cuda.Stream``, ``torch_npu.npu.Stream``); ``None`` on fake."""
        return self._backend.native_stream(self._handle)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Stream):
            return NotImplemented
        return self._backend is other._backend and self._backend.stream_key(
            self._handle
        ) == other._backend.stream_key(other._handle)

    def __hash__(self) -> int:
        return hash((id(self._backend), self._backend.stream_key(self._handle)))

    def __repr__(self) -> str:
        return f"<streamkit.Stream {self._backend.stream_label(self._handle)} backend={self._backend.name}>"


class Event(_Wrapper):
    """A marker in a stream's work. ``Event(enable_timing=False)`` creates one on the active backend.

    :meth:`record` captures the work issued to a stream so far; a later :meth:`wait` or
    :meth:`synchronize` orders a stream or the host after that captured work. Re-recording changes
    what *later* waits see, never what earlier waits already ordered.
    """

    __slots__ = ()

    def __new__(cls, enable_timing: bool = False) -> "Event":
        if not isinstance(enable_timing, bool):
            raise TypeError(f"Event(enable_timing): expected a bool, got {type(enable_timing).__name__}")
        backend = get_backend()
        return cls.from_handle(backend, backend.new_event(enable_timing))

    def _stream_or_current(self, stream: "Stream | None", where: str) -> Any:
        if stream is None:
            return self._backend.current_stream()
        _expect(stream, Stream, where)
        _same_backend(self, stream, where)
        return stream._handle

    def record(self, stream: "Stream | None" = None) -> None:
        """Capture all work issued so far to ``stream`` (default: the current stream)."""
        handle = self._stream_or_current(stream, "Event.record(stream)")
        self._backend.event_record(self._handle, handle)

    def wait(self, stream: "Stream | None" = None) -> None:
        """Order all later work on ``stream`` (default: the current stream) after the captured work."""
        handle = self._stream_or_current(stream, "Event.wait(stream)")
        self._backend.stream_wait_event(handle, self._handle)

    def synchronize(self) -> None:
        """Block the host until the captured work has completed (returns at once if never recorded)."""
        self._backend.event_synchronize(self._handle)

    def query(self) -> bool:
        """``True`` if the captured work has completed (or the event was never recorded)."""
        return self._backend.event_query(self._handle)

    def elapsed_time(self, end_event: "Event") -> float:
        """Milliseconds between this event's and ``end_event``'s records; both need
        ``enable_timing=True`` and must have completed."""
        _expect(end_event, Event, "Event.elapsed_time(end_event)")
        _same_backend(self, end_event, "Event.elapsed_time(end_event)")
        return self._backend.event_elapsed_time(self._handle, end_event._handle)

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def native(self) -> Any:
        """The framework's event (``torch.cuda.Event``...); ``None`` on fake."""
        return self._backend.native_event(self._handle)

    def __repr__(self) -> str:
        return f"<streamkit.Event {self._handle!r} backend={self._backend.name}>"


def current_stream() -> Stream:
    """The calling thread's current stream on the active backend."""
    backend = get_backend()
    return Stream.from_handle(backend, backend.current_stream())


def default_stream() -> Stream:
    """The active device's default stream."""
    backend = get_backend()
    return Stream.from_handle(backend, backend.default_stream())


def _not_active(stream: "Stream") -> None:
    active = _backend_module.active_backend()
    raise BackendMismatchError(
        f"switch(stream): {stream!r} belongs to the {stream._backend.name} backend, but the active backend is"
        f" {active.name} (a fake session or use_backend() block is open), so work inside the block would not run on"
        f" that stream. A stream keeps the backend that was active when it was made: make it inside the block, or,"
        f" for streams made at import time, choose the backend first (STREAMKIT_BACKEND={active.name} in the"
        f" environment, or sk.set_backend({active.name!r}) before the module that makes them is imported)"
    )


class switch:
    """Make ``stream`` the calling thread's current stream inside the block and restore the previous
    one on exit; blocks nest. Neither entering nor leaving synchronizes anything. ``switch(None)``
    and ``enabled=False`` do nothing.

    ``with sk.switch(side) as s:`` binds ``s`` to ``side``.
    """

    # _depth: how many times the object is entered now; _reentries: the contexts of re-entries (a
    # backend's stream context remembers one previous stream, so each nested entry needs its own:
    # torch's StreamContext entered twice restores the wrong stream)
    __slots__ = ("_stream", "_context", "_depth", "_reentries")

    def __init__(self, stream: Stream | None, enabled: bool = True) -> None:
        if stream is not None and enabled:
            if type(stream) is not Stream:
                _expect(stream, Stream, "switch(stream)")
            active = _backend_module.active_backend()
            if active is not None and active is not stream._backend:
                _not_active(stream)
            self._stream = stream
            self._context: Any = stream._backend.stream_context(stream._handle)
        else:
            self._stream = stream
            self._context = None
        self._depth = 0
        self._reentries: list | None = None

    def __enter__(self) -> Stream | None:
        context = self._context
        if context is not None:
            if self._depth:  # entered again inside its own block: a context of its own
                stream = self._stream
                assert stream is not None
                context = stream._backend.stream_context(stream._handle)
                if self._reentries is None:
                    self._reentries = []
                self._reentries.append(context)
            context.__enter__()
            self._depth += 1
        return self._stream

    def __exit__(self, *exc: Any) -> None:
        context = self._context
        if context is not None:
            self._depth -= 1
            if self._depth:
                assert self._reentries is not None
                context = self._reentries.pop()
            context.__exit__(*exc)


def record_stream(tensor: torch.Tensor, stream: Stream) -> None:
    """Tell the allocator that ``tensor``'s memory is in use by work on ``stream``: the memory is not
    reused for new allocations until the work issued to ``stream`` so far has completed, even if
    the tensor is freed earlier (``Tensor.record_stream``)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"record_stream(tensor): expected a torch.Tensor, got {type(tensor).__name__}")
    if type(stream) is not Stream:
        _expect(stream, Stream, "record_stream(stream)")
    stream._backend.record_stream(tensor, stream._handle)
