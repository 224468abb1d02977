"""The contract every backend implements (the ``abc`` of streamkit).

A backend hands out opaque *handles* for streams and events; the public :class:`~streamkit.Stream`
and :class:`~streamkit.Event` wrap a handle together with the backend that made it, so every call is
checked to stay within one backend.
"""

from __future__ import annotations

import abc
from contextlib import AbstractContextManager
from typing import Any

import torch


class Backend(abc.ABC):
    """One device runtime: ``cuda``, ``npu`` or ``fake``."""

    #: short name used by :func:`streamkit.get_backend` and ``STREAMKIT_BACKEND``
    name: str
    #: True once this backend's handles may no longer be used (a closed fake session); the API then
    #: calls :meth:`check_usable`, which raises saying why. (An attribute: it is read on every call.)
    closed: bool = False

    # -- device -----------------------------------------------------------------------------
    @abc.abstractmethod
    def device(self) -> torch.device:
        """The device that tensors of this backend live on (the current one)."""

    @abc.abstractmethod
    def synchronize(self) -> None:
        """Block the host until all work on all streams of the device has completed."""

    @abc.abstractmethod
    def check_usable(self) -> None:
        """Raise if handles of this backend may no longer be used (a closed fake session)."""

    # -- streams ----------------------------------------------------------------------------
    @abc.abstractmethod
    def new_stream(self, priority: int) -> Any: ...

    @abc.abstractmethod
    def current_stream(self) -> Any: ...

    @abc.abstractmethod
    def default_stream(self) -> Any: ...

    @abc.abstractmethod
    def stream_context(self, stream: Any) -> AbstractContextManager[None]:
        """Make ``stream`` current for the calling thread; restore the previous one on exit."""

    @abc.abstractmethod
    def stream_wait_event(self, stream: Any, event: Any) -> None: ...

    def stream_wait_stream(self, stream: Any, other: Any) -> None:
        """``stream`` waits for all work issued to ``other`` so far (record on ``other``, then wait)."""
        event = self.new_event(False)
        self.event_record(event, other)
        self.stream_wait_event(stream, event)

    @abc.abstractmethod
    def stream_synchronize(self, stream: Any) -> None: ...

    @abc.abstractmethod
    def stream_query(self, stream: Any) -> bool: ...

    @abc.abstractmethod
    def stream_priority(self, stream: Any) -> int: ...

    @abc.abstractmethod
    def stream_key(self, stream: Any) -> Any:
        """A hashable identity: two handles of the same stream give equal keys."""

    def stream_label(self, stream: Any) -> str:
        return repr(stream)

    # -- events -----------------------------------------------------------------------------
    @abc.abstractmethod
    def new_event(self, enable_timing: bool) -> Any: ...

    @abc.abstractmethod
    def event_record(self, event: Any, stream: Any) -> None: ...

    @abc.abstractmethod
    def event_synchronize(self, event: Any) -> None: ...

    @abc.abstractmethod
    def event_query(self, event: Any) -> bool: ...

    @abc.abstractmethod
    def event_elapsed_time(self, start: Any, end: Any) -> float: ...

    # -- memory -----------------------------------------------------------------------------
    @abc.abstractmethod
    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None: ...

    def native_stream(self, stream: Any) -> Any:
        """The framework's own stream object (``torch.cuda.Stream``...), or ``None`` on fake."""
        return None

    def native_event(self, event: Any) -> Any:
        return None

    def __repr__(self) -> str:
        return f"<streamkit backend {self.name!r}>"
