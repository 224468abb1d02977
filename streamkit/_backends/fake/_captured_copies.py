"""Host-to-device copies a CUDA graph can hold: ``dst.copy_(pinned, non_blocking=True)`` from
pinned host memory is a ``cudaMemcpyAsync`` node of the graph, which reads the pinned buffer at
every replay (the host may refill it between replays, once it has synchronized with the previous
replay's copy). Copies from pageable memory and device-to-host copies stay refused: a pageable
source is staged through a host-synchronous path (``cudaErrorStreamCaptureUnsupported``), and the
fake doesn't capture host transfers to the host.

CUDA: the Programming Guide, "Stream Capture" (memcpy nodes; "Prohibited and Unhandled
Operations": synchronous APIs), and the CUDA Runtime API's "API synchronization behavior" (for
transfers from pageable host memory the copy is staged, "the function will return once the
pageable buffer has been copied to the staging memory").
"""

from __future__ import annotations

import weakref
from typing import Any

from . import _pinned

# the replay runner of a captured copy -> the pinned buffer it reads at every replay
_sources: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def capturable_h2d(args: Any, accesses: list) -> bool:
    """Whether a captured ``copy_`` (unwrapped: ``[dst, src, non_blocking]``) is a non-blocking copy
    from a pinned host buffer into device memory."""
    return (
        len(args) > 2 and bool(args[2]) and type(args[1]) is _pinned.PinnedHostTensor
        and len(accesses) == 1 and int(accesses[0][1]) == 2  # the device destination, written
    )


def captured(runner: Any, args: Any) -> None:
    """The capture recorded the copy: its replays read ``args[1]`` (the pinned buffer)."""
    _sources[runner] = args[1]


def replayed(runner: Any, call: Any) -> None:
    """A replay launched ``call`` (an ``OpCall``) for ``runner``: if it copies from a pinned buffer,
    the host must not write that buffer until the copy is done (``_pinned.read_by``)."""
    source = _sources.get(runner)
    if source is not None:
        _pinned.read_by(source, call)
