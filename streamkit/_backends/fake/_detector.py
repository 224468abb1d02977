"""The happens-before check run on every access, and the allocator's free check."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from ._clocks import StreamState, ordered_before
from ._overlap import StridedRecord, disjoint, strided_record
from ._tracking import READ, WRITE, AccessKind, AccessRecord, Kernel, new_record

if TYPE_CHECKING:
    from ._allocator import StorageState

#: ``report(earlier, earlier_kind, kernel, kind, tensor, state)``: an unordered pair was found
Report = Callable[[AccessRecord, AccessKind, Kernel, AccessKind, Any, "StorageState"], None]


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
        """Check and record every ``(tensor, READ | WRITE)`` access of ``kernel``.

        An earlier access ``r`` is ordered before this kernel if it is on the same stream (FIFO),
        or the stream's clock or the host's clock covers it (:func:`._clocks.ordered_before`, asked
        only when the streams differ). (The rest is inline: this runs for every tensor argument of
        every kernel.)
        """
        clock = stream.clock
        host = self.host
        idx = stream.idx
        seq = kernel.seq
        for tensor, kind in accesses:
            lo = tensor.sk_lo
            hi = tensor.sk_hi
            if hi <= lo:
                continue
            state = tensor.sk_state
            writes = state.writes
            layout = tensor.sk_layout  # (a view with gaps between its elements: _overlap; else None)
            for r in writes:
                if r.start < hi and lo < r.end:
                    i = r.stream
                    if i != idx and not ordered_before(i, r.seq, clock) and not ordered_before(i, r.seq, host):
                        if (layout is not None or type(r) is StridedRecord) and disjoint(r, lo, hi, layout):
                            continue  # bounding ranges overlap, elements don't
                        self.report(r, WRITE, kernel, kind, tensor, state)
            reads = state.reads
            if layout is not None:
                self._add_strided(state, strided_record(lo, hi, idx, seq, kernel, layout), kind, clock, tensor)
                continue
            record = new_record((lo, hi, idx, seq, kernel))
            if kind is WRITE:
                for r in reads:
                    if r.start < hi and lo < r.end:
                        i = r.stream
                        if i != idx and not ordered_before(i, r.seq, clock) and not ordered_before(i, r.seq, host):
                            if type(r) is StridedRecord and disjoint(r, lo, hi, None):
                                continue
                            self.report(r, READ, kernel, WRITE, tensor, state)
                if lo == 0 and hi == state.nbytes:  # the whole storage: every earlier access is covered
                    if len(writes) == 1:
                        writes[0] = record
                    else:
                        state.writes = [record]
                    if reads:
                        state.reads = []
                    continue
                if writes:
                    writes = state.writes = [r for r in writes if r.start < lo or r.end > hi]
                if reads:
                    state.reads = [r for r in reads if r.start < lo or r.end > hi]
                writes.append(record)
            elif not reads:
                state.reads = [record]
            elif len(reads) == 1:
                r = reads[0]
                if r.start >= lo and r.end <= hi and (r.stream == idx or ordered_before(r.stream, r.seq, clock)):
                    reads[0] = record  # the steady state: the same reader again
                else:
                    reads.append(record)
            else:
                self._add_read(state, record, clock)

    def _add_strided(self, state: StorageState, record: Any, kind: AccessKind, clock: list[int], tensor: Any) -> None:
        """Check a gapped access's conflicts with earlier reads (a write) and record it. It covers
        only earlier records of its own layout (not the bytes between its elements)."""
        lo, hi, layout = record.start, record.end, record.layout
        idx, host, n = record.stream, self.host, len(clock)
        if kind is WRITE:
            for r in state.reads:
                if r.start < hi and lo < r.end:
                    i = r.stream
                    if i != idx and not (i < n and clock[i] >= r.seq) and not (i < len(host) and host[i] >= r.seq):
                        if not disjoint(r, lo, hi, layout):
                            self.report(r, READ, record.kernel, WRITE, tensor, state)
            same = [r for r in state.reads if type(r) is StridedRecord and r.layout == layout]
            if same:
                state.reads = [r for r in state.reads if r not in same]
            state.writes = [r for r in state.writes if not (type(r) is StridedRecord and r.layout == layout)]
            state.writes.append(record)
        else:
            state.reads = [
                r for r in state.reads
                if not (type(r) is StridedRecord and r.layout == layout
                        and (ordered_before(r.stream, r.seq, clock) or ordered_before(r.stream, r.seq, host)))
            ]
            state.reads.append(record)

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
