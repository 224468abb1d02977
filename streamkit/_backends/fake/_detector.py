"""The happens-before check run on every access, and the allocator's free check."""

from __future__ import annotations

from typing import Any, Callable

from ._clocks import StreamState, ordered_before
from ._tracking import READ, WRITE, AccessKind, AccessRecord, Kernel, StorageState, new_record

#: ``report(earlier, earlier_kind, kernel, kind, tensor, state)``: an unordered pair was found
Report = Callable[[AccessRecord, AccessKind, Kernel, AccessKind, Any, StorageState], None]


class Detector:
    """Checks each access against a storage's access table, then records it.

    ``report`` is called for every race found; in ``detect="raise"`` mode it raises, before the
    kernel runs. ``host`` is the session's host clock (the same list, merged in place): an earlier
    access the host has seen complete is ordered before every later kernel.
    """

    __slots__ = ("report", "host")

    def __init__(self, report: Report, host: list[int]) -> None:
        self.report = report
        self.host = host

    def check(self, accesses: list, stream: StreamState, kernel: Kernel) -> None:
        """Check and record every ``(tensor, READ | WRITE)`` access of ``kernel``."""
        clock = stream.clock
        n = len(clock)
        host = self.host
        idx = stream.idx
        for tensor, kind in accesses:
            lo = tensor._lo
            hi = tensor._hi
            if hi <= lo:
                continue
            state = tensor._st
            if kind == WRITE:
                self._write(state, lo, hi, stream, kernel, tensor)
                continue
            # a read, inline (the most frequent access; torch.stack reads one per list element)
            for r in state.writes:
                if r.start < hi and lo < r.end:
                    i = r.stream
                    if not (i < n and clock[i] >= r.seq) and not (i < len(host) and host[i] >= r.seq):
                        self.report(r, WRITE, kernel, READ, tensor, state)
            reads = state.reads
            record = new_record((lo, hi, idx, kernel.seq, kernel))
            if not reads:
                state.reads = [record]
            elif len(reads) == 1:
                r = reads[0]
                if r.start >= lo and r.end <= hi and r.stream < n and clock[r.stream] >= r.seq:
                    reads[0] = record  # the steady state: the same reader again
                else:
                    reads.append(record)
            else:
                self._add_read(state, record, clock)

    def _write(self, state: StorageState, start: int, end: int, stream: StreamState, kernel: Kernel, tensor: Any) -> None:
        clock = stream.clock
        n = len(clock)
        host = self.host
        for records, earlier_kind in ((state.writes, WRITE), (state.reads, READ)):
            for r in records:
                if r.start < end and start < r.end:
                    i = r.stream
                    if not (i < n and clock[i] >= r.seq) and not (i < len(host) and host[i] >= r.seq):
                        self.report(r, earlier_kind, kernel, WRITE, tensor, state)
        record = new_record((start, end, stream.idx, kernel.seq, kernel))
        if start == 0 and end == state.nbytes:
            state.writes = [record]
            state.reads = []
            return
        if state.writes:
            state.writes = [r for r in state.writes if r.start < start or r.end > end]
        if state.reads:
            state.reads = [r for r in state.reads if r.start < start or r.end > end]
        state.writes.append(record)

    def _add_read(self, state: StorageState, record: AccessRecord, clock: list[int]) -> None:
        # an earlier read covered by this one and ordered before it adds nothing
        start, end, host = record.start, record.end, self.host
        state.reads = [
            r for r in state.reads
            if r.start < start or r.end > end
            or not (ordered_before(r.stream, r.seq, clock) or ordered_before(r.stream, r.seq, host))
        ]
        state.reads.append(record)

    @staticmethod
    def unordered_at_free(state: StorageState, reuse_clock: list[int]) -> list[tuple[AccessRecord, AccessKind]]:
        """Records of other streams that the allocation stream's future work is not ordered after
        (and that no record_stream covers), with their kinds: reusing the memory would race with them."""
        alloc = state.alloc_stream.idx
        pending = []
        for records, kind in ((state.writes, WRITE), (state.reads, READ)):
            for r in records:
                if r.stream == alloc or r.stream in state.record_streams:
                    continue
                if not ordered_before(r.stream, r.seq, reuse_clock):
                    pending.append((r, kind))
        return pending
