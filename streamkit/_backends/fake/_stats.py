"""What a fake session did: kernels, events, and host synchronizations by kind."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(slots=True)
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
