"""Vector clocks: the per-stream, per-event and host synchronization state of a fake session.

Each stream ``s`` has a clock ``c_s``: ``c_s[s]`` counts the kernels issued to ``s`` and ``c_s[t]``
is the last kernel of stream ``t`` that ``s`` is ordered after. A kernel ``(t, n)`` happens before
whatever stream ``s`` issues next iff ``c_s[t] >= n``. Events snapshot a clock, waits merge one
in, and host synchronizations merge into the host clock, which every later issue merges in (the
host can only issue work after it has returned from a sync).
"""

from __future__ import annotations

from typing import Any, Sequence


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
    """One fake stream: its index, its clock, and what the host clock was when it last merged."""

    __slots__ = ("idx", "clock", "priority", "host_version", "site", "__weakref__")

    def __init__(self, idx: int, clock: list[int], priority: int, host_version: int, site: Any) -> None:
        self.idx = idx
        self.clock = clock
        self.priority = priority
        self.host_version = host_version
        self.site = site  # frames where the stream was created (for naming it in reports)

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
        self.host: list[int] = []
        self.host_version = 0

    def new_stream(self, priority: int, site: Any) -> StreamState:
        idx = len(self.streams)
        # A new stream starts ordered after everything the host has synchronized with.
        clock = list(self.host) + [0] * (idx + 1 - len(self.host))
        state = StreamState(idx, clock, priority, self.host_version, site)
        self.streams.append(state)
        return state

    def _catch_up(self, stream: StreamState) -> None:
        if stream.host_version != self.host_version:
            merge(stream.clock, self.host)
            stream.host_version = self.host_version

    def issue(self, stream: StreamState) -> int:
        """A kernel is issued to ``stream``: returns its sequence number there."""
        if stream.host_version != self.host_version:
            self._catch_up(stream)
        clock = stream.clock
        seq = clock[stream.idx] + 1
        clock[stream.idx] = seq
        return seq

    def record(self, event: EventState, stream: StreamState, now: float) -> None:
        self._catch_up(stream)
        event.clock = list(stream.clock)
        event.stream = stream
        event.time = now

    def wait(self, stream: StreamState, event: EventState) -> None:
        assert event.clock is not None
        self._catch_up(stream)
        merge(stream.clock, event.clock)

    def host_waits_for(self, clock: Sequence[int]) -> None:
        """The host has observed that the work ordered by ``clock`` completed."""
        merge(self.host, clock)
        self.host_version += 1

    def host_waits_for_all(self) -> None:
        for stream in self.streams:
            merge(self.host, stream.clock)
        self.host_version += 1

    def reuse_clock(self, stream: StreamState) -> list[int]:
        """What work issued to ``stream`` from now on is ordered after (its clock joined with the host)."""
        clock = list(stream.clock)
        merge(clock, self.host)
        return clock
