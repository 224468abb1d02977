"""The happens-before check run on every access, and the allocator's free check."""

from __future__ import annotations

from functools import partial
from typing import Any

from ._accel import native
from ._clocks import StreamState, ordered_before
from ._tracking import WRITE, Kernel, StorageState


class Detector:
    """Checks each access against a storage's access table, then records it.

    ``report(record, kernel, kind, tensor, state)`` is called for every race found; it raises in
    ``detect="raise"`` mode before the kernel runs. ``host`` is the session's host clock (the same
    list, merged in place): an earlier access the host has seen complete is ordered before every
    later kernel.

    ``check(accesses, stream, kernel)`` runs on every kernel: it is the C port in ``_native`` (bound
    to this detector's ``report`` and ``host``), or with ``STREAMKIT_NATIVE=0`` :meth:`check_python`,
    the reference implementation it was ported from.
    """

    __slots__ = ("report", "host", "check")

    def __init__(self, report: Any, host: list[int]) -> None:
        self.report = report
        self.host = host
        self.check = partial(native.check, report, host) if native is not None else self.check_python

    def check_python(self, accesses: list, stream: StreamState, kernel: Kernel) -> None:
        """Check and record every ``(tensor, READ | WRITE)`` access of ``kernel``."""
        clock = stream.clock
        n = len(clock)
        idx = stream.idx
        for tensor, kind in accesses:
            lo = tensor._lo
            hi = tensor._hi
            if hi <= lo:
                continue
            state = tensor._st
            if kind == WRITE:
                self.write(state, lo, hi, stream, kernel, tensor)
                continue
            # a read, inline (the most frequent access; torch.stack reads one per list element)
            for r in state.writes:
                if r[0] < hi and lo < r[1]:
                    i = r[2]
                    if not (i < n and clock[i] >= r[3]) and not (i < len(self.host) and self.host[i] >= r[3]):
                        self.report(r, kernel, "read", tensor, state)
            reads = state.reads
            record = (lo, hi, idx, kernel.seq, kernel)
            if not reads:
                state.reads = [record]
            elif len(reads) == 1:
                r = reads[0]
                if r[0] >= lo and r[1] <= hi and r[2] < n and clock[r[2]] >= r[3]:
                    reads[0] = record  # the steady state: the same reader again
                else:
                    reads.append(record)
            else:
                self._add_read(state, record, clock, self.host)

    def write(self, state: StorageState, start: int, end: int, stream: StreamState, kernel: Kernel, tensor: Any) -> None:
        clock = stream.clock
        n = len(clock)
        host = self.host
        for records in (state.writes, state.reads):
            for r in records:
                if r[0] < end and start < r[1]:
                    i = r[2]
                    if not (i < n and clock[i] >= r[3]) and not (i < len(host) and host[i] >= r[3]):
                        self.report(r, kernel, "write", tensor, state)
        record = (start, end, stream.idx, kernel.seq, kernel)
        if start == 0 and end == state.nbytes:
            state.writes = [record]
            state.reads = []
            return
        if state.writes:
            state.writes = [r for r in state.writes if r[0] < start or r[1] > end]
        if state.reads:
            state.reads = [r for r in state.reads if r[0] < start or r[1] > end]
        state.writes.append(record)

    @staticmethod
    def _add_read(state: StorageState, record: tuple, clock: list[int], host: list[int]) -> None:
        # an earlier read covered by this one and ordered before it adds nothing
        start, end = record[0], record[1]
        state.reads = [
            r for r in state.reads
            if r[0] < start or r[1] > end or not (ordered_before(r[2], r[3], clock) or ordered_before(r[2], r[3], host))
        ]
        state.reads.append(record)

    @staticmethod
    def unordered_at_free(state: StorageState, reuse_clock: list[int]) -> list[tuple]:
        """Records of other streams that the allocation stream's future work is not ordered after
        (and that no record_stream covers): reusing the memory would race with them."""
        alloc = state.alloc_stream.idx
        pending = []
        for records in (state.writes, state.reads):
            for r in records:
                i = r[2]
                if i == alloc or i in state.record_streams:
                    continue
                if not ordered_before(i, r[3], reuse_clock):
                    pending.append(r)
        return pending
