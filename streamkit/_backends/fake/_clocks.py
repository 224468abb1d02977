"""Vector clocks: the per-stream, per-event and host synchronization state of a fake session.

Each stream ``s`` has a clock ``c_s``: ``c_s[s]`` counts the kernels issued to ``s`` and ``c_s[t]``
is the last kernel of stream ``t`` that ``s`` is ordered after through waits. The host clock ``h``
is what the host has seen complete (host synchronizations merge into it). Everything the host
issues after a sync is ordered after what it saw, so a kernel ``(t, n)`` happens before whatever
stream ``s`` issues next iff ``c_s[t] >= n`` or ``h[t] >= n``: the stream's effective clock is
``max(c_s, h)``. (``h`` only grows, so taking it at check time is exact, and no stream clock has to
be brought up to date at every sync.)
"""

from __future__ import annotations

from collections import deque
from typing import Any, Sequence

#: blocks each stream's pool keeps (a bigger pool costs every free a little; 64 measured 0.15 us more per op)
POOL_SIZE = 16


def merge(into: list[int], other: Sequence[int]) -> None:
    """``into = max(into, other)`` element-wise, growing ``into`` as needed."""
    n = len(other)
    if len(into) < n:
        into.extend([0] * (n - len(into)))
    for i in range(n):
        if other[i] > into[i]:
            into[i] = other[i]


def ordered_before(stream_idx: int, seq: int, clock: Sequence[int]) -> bool:
    """Whether kernel ``seq`` of stream ``stream_idx`` happens before work ordered by ``clock``."""
    return stream_idx < len(clock) and clock[stream_idx] >= seq


class StreamState:
    """One fake stream of one session: its index and its clock (the ordering it got from waits).

    ``handle`` is the session-independent :class:`~._handles.FakeStream` it is the state of (what
    ``sk.Stream`` holds), ``None`` for streams made without one.
    """

    __slots__ = ("idx", "clock", "priority", "site", "handle", "freed", "__weakref__")

    def __init__(self, idx: int, clock: list[int], priority: int, site: Any, handle: Any = None) -> None:
        self.idx = idx
        self.clock = clock
        self.priority = priority
        self.site = site  # frames where the stream was created (for naming it in reports)
        self.handle = handle
        # the caching allocator's pool of this stream: StorageStates of blocks allocated on it and
        # the allocator's pool: blocks freed with access history, most recent last, the oldest
        # dropped past POOL_SIZE (see _tracking.StorageState.pool)
        self.freed: deque = deque(maxlen=POOL_SIZE)

    def __repr__(self) -> str:
        return "default" if self.idx == 0 else f"#{self.idx}"


class EventState:
    """One fake event: the clock snapshot taken at its last record (``None`` until recorded)."""

    __slots__ = ("clock", "stream", "enable_timing", "time", "__weakref__")

    def __init__(self, enable_timing: bool) -> None:
        self.clock: list[int] | None = None
        self.stream: StreamState | None = None
        self.enable_timing = enable_timing
        self.time = 0.0

    def __repr__(self) -> str:
        where = "never recorded" if self.stream is None else f"recorded on stream {self.stream!r}"
        return f"<fake event {where}>"


class Clocks:
    """All synchronization state of a session: streams, the host clock, and the operations of the
    stream/event API expressed on clocks."""

    def __init__(self) -> None:
        self.streams: list[StreamState] = []
        # Merged in place only: the detector keeps a reference to this list.
        self.host: list[int] = []

    def new_stream(self, priority: int, site: Any, handle: Any = None) -> StreamState:
        idx = len(self.streams)
        state = StreamState(idx, [0] * (idx + 1), priority, site, handle)
        self.streams.append(state)
        return state

    def effective(self, stream: StreamState) -> list[int]:
        """What work issued to ``stream`` from now on is ordered after: its clock joined with the
        host's (a new list)."""
        clock = list(stream.clock)
        merge(clock, self.host)
        return clock

    def issue(self, stream: StreamState) -> int:
        """A kernel is issued to ``stream``: returns its sequence number there."""
        clock = stream.clock
        seq = clock[stream.idx] + 1
        clock[stream.idx] = seq
        return seq

    def record(self, event: EventState, stream: StreamState, now: float) -> None:
        event.clock = self.effective(stream)
        event.stream = stream
        event.time = now

    def wait(self, stream: StreamState, event: EventState) -> None:
        assert event.clock is not None
        merge(stream.clock, event.clock)

    def host_waits_for(self, clock: Sequence[int]) -> None:
        """The host has observed that the work ordered by ``clock`` completed."""
        merge(self.host, clock)

    def host_waits_for_all(self) -> None:
        for stream in self.streams:
            merge(self.host, stream.clock)

    # the allocator's view: memory freed now may be reused by what its stream issues from now on
    reuse_clock = effective
