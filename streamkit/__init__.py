"""streamkit: one Stream/Event/switch() API over CUDA, Ascend NPU and a fake CPU backend that
detects stream races.

>>> import streamkit as sk
>>> side = sk.Stream()
>>> with sk.switch(side):
...     ...
"""

from __future__ import annotations

from ._backend import Backend
from ._core import (
    Event,
    Stream,
    available_backends,
    current_stream,
    default_stream,
    device,
    get_backend,
    record_stream,
    set_backend,
    switch,
    synchronize,
    unavailable_reason,
    use_backend,
)
from ._errors import (
    BackendMismatchError,
    BackendUnavailableError,
    EventTimingError,
    RaceError,
    SessionClosedError,
    StreamkitError,
    StreamkitWarning,
    UnrecordedEventWarning,
)

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendMismatchError",
    "BackendUnavailableError",
    "Event",
    "EventTimingError",
    "RaceError",
    "SessionClosedError",
    "Stream",
    "StreamkitError",
    "StreamkitWarning",
    "UnrecordedEventWarning",
    "available_backends",
    "current_stream",
    "default_stream",
    "device",
    "get_backend",
    "record_stream",
    "set_backend",
    "switch",
    "synchronize",
    "unavailable_reason",
    "use_backend",
]
