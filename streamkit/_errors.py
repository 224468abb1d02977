"""Exceptions and warnings raised by streamkit."""

from __future__ import annotations

from typing import Any


class StreamkitError(RuntimeError):
    """Base class of streamkit's own errors."""


class RaceError(StreamkitError):
    """Two accesses to overlapping device memory, at least one a write, with no happens-before
    between them (the fake backend's race detector). ``str(err)`` is the full report; ``err.race``
    is the :class:`streamkit.fake.Race`."""

    def __init__(self, race: Any) -> None:
        super().__init__(str(race))
        self.race = race


class InternalError(StreamkitError):
    """A fault inside streamkit itself (a broken invariant), not in the program it runs: please
    report it with the program that triggered it."""


class BackendUnavailableError(StreamkitError):
    """The requested backend cannot be used on this machine; the message says why."""


class BackendMismatchError(StreamkitError):
    """A stream, event or tensor of one backend (or of a closed fake session) was used with another."""


class SessionClosedError(BackendMismatchError):
    """A stream, event or tensor of a fake session that has ended was used."""


class DeviceIndexError(StreamkitError, ValueError):
    """A device index the backend doesn't have (the fake backend has one device, ``fake:0``), as
    CUDA's "invalid device ordinal"."""


class EventTimingError(StreamkitError, ValueError):
    """``elapsed_time`` on events without ``enable_timing=True`` or not recorded.

    A ``ValueError`` as in current PyTorch (``TORCH_CHECK_VALUE``), and a ``RuntimeError`` as in
    older releases, so code written for either catches it.
    """


class StreamkitWarning(UserWarning):
    """Base class of streamkit's warnings."""


class UnrecordedEventWarning(StreamkitWarning):
    """A stream waited on (or the host synchronized with) an event that was never recorded.

    CUDA and NPU treat this as a silent no-op, which usually hides a missing ``record()``.
    """


class ReplayFallbackWarning(StreamkitWarning):
    """A schedule token's fingerprint doesn't match the program's kernel sequence any more (the
    program was edited since the token was made): ``fake.replay`` ran the token's constraint form
    instead of its seed (``Run.replayed_by == "constraints"``), or, for a token without one, the
    seed anyway."""


class GraphError(StreamkitError):
    """Misuse of a graph (:class:`streamkit.Graph`): replay before a successful capture, a second
    capture into one graph, a replay whose captured memory was freed (fake)."""


class GraphUnsupportedError(GraphError):
    """The active backend cannot capture graphs (a third-party backend that doesn't implement
    :meth:`Backend.new_graph`, or a torch_npu without ``torch.npu.NPUGraph``)."""


class GraphCaptureError(GraphError):
    """An operation that breaks a capture rule of CUDA graphs (docs/semantics.md, "Graph capture"):
    a host synchronization while a stream is capturing, a fork that never rejoins the capturing
    stream, a wait on an event recorded outside the capture, work on the default stream during a
    capture. The capture is invalidated, as on CUDA."""
