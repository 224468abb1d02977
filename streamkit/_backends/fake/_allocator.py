"""The fake device's caching allocator: the per-storage block record (:class:`StorageState`) and
the whole pool policy, as CUDA's caching allocator applies it (CUDACachingAllocator.cpp):

- free: the last reference to a block is dropped; if every use is ordered before its allocation
  stream (or covered by ``record_stream``), the block goes back to that stream's pool, else the
  free is a race (:func:`free`);
- recycle / reuse: a new allocation of the same size class on that stream takes over the most
  recently freed block, history and all (:func:`recycle`; under a deferred schedule its memory
  too, :func:`reuse_memory`);
- resize / reallocate: a storage that grows gets a new block on the current stream and frees the
  old one (:func:`reallocate`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..._errors import RaceError
from . import _blocks
from ._clocks import StreamState, ordered_before
from ._deferred import poison
from ._detector import Detector
from ._sites import site_here
from ._tracking import AccessRecord, new_record

if TYPE_CHECKING:
    from ._interface import Engine

#: the caching allocator rounds sizes up to multiples of this (CUDACachingAllocator ``kMinBlockSize``)
BLOCK_ROUND = 512


def size_class(nbytes: int) -> int:
    """The allocator's size class of an allocation of ``nbytes``: blocks of one class are interchangeable."""
    return (nbytes + BLOCK_ROUND - 1) // BLOCK_ROUND


class StorageState:
    """The access table of one storage: accesses not yet superseded, and allocator facts.

    Records are :class:`AccessRecord`. A write drops the records it covers (any later access that
    conflicts with them conflicts with the write too); a read drops earlier reads it covers that
    happen before it.
    """

    # ``prior`` (set only on a block the allocator recycled): the freed StorageState whose access
    # history this one took over, and those records (reports name the old tensor for them).
    # ``mem`` (set only under a deferred schedule): the CPU storage holding the values, which a
    # recycled allocation shares (so a still-queued kernel of the old owner reaches the new one's data)
    __slots__ = (
        "reads", "writes", "nbytes", "alloc_stream", "alloc_site", "alloc_meta", "record_streams", "session", "prior",
        "mem", "__weakref__",
    )

    def __init__(self, session: "Engine", nbytes: int, alloc_stream: StreamState, alloc_site: Any, alloc_meta: Any = None) -> None:
        self.reads: list[AccessRecord] = []
        self.writes: list[AccessRecord] = []
        self.nbytes = nbytes
        self.alloc_stream = alloc_stream
        self.alloc_site = alloc_site
        self.alloc_meta = alloc_meta  # (shape, dtype) of the tensor that allocated it
        self.record_streams: set[int] | tuple = ()  # a set once record_stream is called
        self.session = session

    def __reduce_ex__(self, protocol: int) -> Any:
        raise TypeError("a fake storage's access table can't be copied or pickled (deepcopy the tensor instead)")

    def __del__(self) -> None:
        # The last tensor on this storage is gone: the caching allocator may hand the memory to a
        # new allocation on the allocation stream right away. (Never raises nor prints: a state
        # half-made by copy/pickle, as torch.compile's tracing may make, has no session.)
        try:
            session = self.session
        except AttributeError:
            return
        if session is None:
            return
        alloc = self.alloc_stream.idx
        covered = self.record_streams
        # The common case: only the allocation stream, or streams record_stream covers, touched it.
        for records in (self.writes, self.reads):
            for r in records:
                if r.stream != alloc and r.stream not in covered:
                    try:
                        free(session, self)
                    except Exception:  # never raise from a finalizer
                        pass
                    return
        if (self.writes or self.reads) and not session.closed:
            self.pool()

    def pool(self) -> None:
        """Into the allocation stream's pool, history and all: the next allocation there of this
        size takes it over (this object outlives its finalizer; it is not called again). Dropping
        the session reference keeps the pool from holding the session alive."""
        self.session = None
        self.alloc_stream.freed.append(self)


def free(session: "Engine", state: StorageState) -> None:
    """The last reference to ``state``'s block was dropped while other streams used it: pool it if
    their uses are ordered before its allocation stream, else report the free race."""
    if session.closed or not session.tracked:
        return
    with session.lock:
        pending = Detector.unordered_at_free(state, session.clocks.reuse_clock(state.alloc_stream))
        if not pending:
            state.pool()  # other streams' uses are ordered before the allocation stream
            return
        if session.detect != "off":  # (clocks kept for a deferred schedule only)
            if session.on_raced is not None:
                session.on_raced(state, tuple(r.kernel for r, _ in pending))
            earlier, kind = max(pending, key=lambda found: found[0].seq)
            # (where the last reference was dropped: the user frames above the finalizer)
            race, new = session.reporter.free_race(earlier, kind, state, site_here())
            if new and session.detect == "raise" and session.pending is None:
                session.pending = RaceError(race)
        if not session.eager:
            # CUDA's allocator doesn't know about the other streams' pending uses: the block
            # goes back to its stream's pool all the same, and a still-queued kernel of those
            # streams reaches whatever the next owner writes there (eager: nothing is queued, so
            # the free race report is all there is to show)
            state.pool()


def recycle(session: "Engine", state: StorageState, stream: StreamState, out: Any = None) -> None:
    """``state`` is a new allocation on ``stream`` whose first writer is unknown (``empty``...):
    as CUDA's caching allocator, hand it the freed block of ``stream``'s pool that
    ``get_free_block`` picks (:mod:`._blocks`: same pool, best fit, split when the remainder is
    worth it), whose access history (of the bytes handed over) it takes over; a split-off
    remainder stays in the pool. A block with ``record_stream`` users not ordered before
    ``stream`` yet is not available (CUDA: its events haven't completed).

    Under a deferred schedule ``out`` (the new tensor) also takes over the block's memory
    (:func:`reuse_memory`)."""
    if not size_class(state.nbytes):
        return
    with session.lock:
        freed = stream.freed
        clock = None
        available = []  # most recently freed first
        for i in range(len(freed) - 1, -1, -1):
            old = freed[i]
            if not _blocks.fits(old.nbytes, state.nbytes):
                continue
            if old.record_streams:
                if clock is None:
                    clock = session.clocks.reuse_clock(stream)
                covered = old.record_streams
                if any(
                    r.stream in covered and not ordered_before(r.stream, r.seq, clock)
                    for records in (old.writes, old.reads) for r in records
                ):
                    continue
            available.append(old)
        chosen = _blocks.best_fit([old.nbytes for old in available], state.nbytes)
        if chosen is None:
            return
        old = available[chosen]
        try:
            freed.remove(old)  # (by identity; a free on another thread may have trimmed the pool)
        except ValueError:
            return
        before = getattr(old, "prior", None) or {}
        mine = (old.alloc_meta, old.alloc_site, old.alloc_stream)
        if _blocks.should_split(old.nbytes, state.nbytes):
            cut = _blocks.round_size(state.nbytes)
            rest = StorageState(None, _blocks.round_size(old.nbytes) - cut, old.alloc_stream, old.alloc_site, old.alloc_meta)
            state.reads, rest.reads, read_origins = _blocks.split_records(old.reads, cut, new_record)
            state.writes, rest.writes, write_origins = _blocks.split_records(old.writes, cut, new_record)
            rest.record_streams = old.record_streams
            # which earlier tensor each of the remainder's accesses belongs to (for the report)
            rest.prior = {
                id(r): before.get(id(o)) or (o, *mine)
                for r, o in zip(rest.reads + rest.writes, read_origins + write_origins)
            }
            if rest.reads or rest.writes:
                freed.append(rest)
        else:
            state.reads = list(old.reads)
            state.writes = list(old.writes)
        # which earlier tensor each inherited access belongs to (for the report)
        state.prior = {id(r): before.get(id(r)) or (r, *mine) for r in state.reads + state.writes}
        if out is not None and not session.eager:
            reuse_memory(session, old, stream, out)


def reuse_memory(session: "Engine", old: StorageState, stream: StreamState, out: Any) -> None:
    """A deferred schedule: ``out`` (a new allocation on ``stream``) takes over the memory of the
    freed block ``old``, as the caching allocator hands it over. Every use of ``old`` that
    ``stream``'s future work is ordered after (its own stream's, and record_stream's users
    once they are) runs first, then the memory is poisoned: a legal schedule, and the poison is
    written at reuse, not at free, so a correct ``record_stream`` program never sees it. Uses
    of ``old`` on other streams that nothing orders before the reuse (a free race) stay queued
    and, when they run, read or overwrite the new owner's data, as on the device."""
    mem = getattr(old, "mem", None)
    inner = out.sk_inner
    if mem is None or mem.nbytes() < inner.untyped_storage().nbytes():
        return  # (a block that had no memory of its own here, or a smaller one: fresh memory)
    clock = session.clocks.reuse_clock(stream)
    need: list[int] = []
    for records in (old.writes, old.reads):
        for r in records:
            if ordered_before(r.stream, r.seq, clock):
                if len(need) <= r.stream:
                    need.extend([0] * (r.stream + 1 - len(need)))
                need[r.stream] = max(need[r.stream], r.seq)
    if need:
        session.scheduler.drain(need)
    with torch.no_grad():
        shared = torch.empty(0, dtype=inner.dtype).set_(mem, inner.storage_offset(), inner.size(), inner.stride())
    poison(shared)
    out.sk_inner = shared
    busy = session.scheduler.busy
    if busy is not None:
        # (fake.explore's focus: the old owner's queued kernels use this memory: the new owner's
        # kernels conflict with them, whatever storage they name)
        counts = busy.get(id(old))
        if counts is not None:
            busy[id(out.sk_state)] = counts


def reallocate(
    session: "Engine", state: StorageState, old_nbytes: int, stream: Any, kernel: Any, site: Any, meta: Any,
    lo: int, hi: int, copied: bool,
) -> None:
    """``state``'s storage got a new block, allocated on ``stream`` (``resize_`` growth, a resized
    ``out=``), which ``kernel`` writes over ``[lo, hi)``. The old block is freed now, as CUDA frees it
    (free check and pool of its own allocation stream); ``copied``: ``kernel`` read the old block
    (``resize_`` copies it), else the kernel never touched it."""
    old = StorageState(session, old_nbytes, state.alloc_stream, state.alloc_site, state.alloc_meta)
    if copied:
        old.reads, old.writes = state.reads, state.writes
    else:
        old.reads = [r for r in state.reads if r.kernel is not kernel]
        old.writes = [r for r in state.writes if r.kernel is not kernel]
    old.record_streams = state.record_streams
    old.prior = getattr(state, "prior", None)
    state.reads = []
    state.writes = [new_record((lo, hi, stream.idx, kernel.seq, kernel))] if hi > lo else []
    state.alloc_stream, state.alloc_site, state.alloc_meta = stream, site, meta
    state.record_streams = ()
    state.prior = None
    state.nbytes = max(state.nbytes, hi)
    if not old_nbytes:
        old.session = None  # no memory was there: nothing to free
    del old  # the free check runs here
