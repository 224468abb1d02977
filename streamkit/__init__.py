"""streamkit: one Stream/Event/switch() API over CUDA, Ascend NPU and a fake CPU backend that
detects stream races.

>>> import streamkit as sk
>>> side = sk.Stream()
>>> with sk.switch(side):
...     ...
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._api import Event, Stream, current_stream, default_stream, device, record_stream, switch, synchronize
from ._graphs import Graph, graph
from ._backend import (
    Backend,
    available_backends,
    backend_names,
    get_backend,
    register_backend,
    set_backend,
    unavailable_reason,
    use_backend,
)
from ._errors import (
    BackendMismatchError,
    BackendUnavailableError,
    DeviceIndexError,
    EventTimingError,
    GraphCaptureError,
    GraphError,
    GraphUnsupportedError,
    InternalError,
    RaceError,
    SessionClosedError,
    StreamkitError,
    StreamkitWarning,
    UnrecordedEventWarning,
)

if TYPE_CHECKING:  # pragma: no cover
    from ._backends.fake import Race

# The fake backend's report type, imported on first use so that `import streamkit` loads no backend.
_LAZY = {"Race": "streamkit._backends.fake"}


def __getattr__(name: str) -> Any:
    home = _LAZY.get(name)
    if home is None:
        raise AttributeError(f"module 'streamkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendMismatchError",
    "BackendUnavailableError",
    "DeviceIndexError",
    "Event",
    "EventTimingError",
    "Graph",
    "GraphCaptureError",
    "GraphError",
    "GraphUnsupportedError",
    "InternalError",
    "Race",
    "RaceError",
    "SessionClosedError",
    "Stream",
    "StreamkitError",
    "StreamkitWarning",
    "UnrecordedEventWarning",
    "available_backends",
    "backend_names",
    "current_stream",
    "default_stream",
    "device",
    "get_backend",
    "graph",
    "record_stream",
    "register_backend",
    "set_backend",
    "switch",
    "synchronize",
    "unavailable_reason",
    "use_backend",
]
