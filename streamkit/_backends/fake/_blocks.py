"""Which freed block CUDA's caching allocator hands to a new allocation, and how it splits it
(``c10/cuda/CUDACachingAllocator.cpp``, default configuration: ``expandable_segments`` off, no
``max_split_size``, no ``roundup_power2_divisions``).

- Sizes are rounded up to multiples of 512 bytes (``round_size``, ``kMinBlockSize``).
- Two pools per stream: small (rounded size <= 1 MiB, ``kSmallSize``; carved from 2 MiB
  segments, ``kSmallBuffer``) and large (the rest; segments of 20 MiB, ``kLargeBuffer``, below
  10 MiB, ``kMinLargeAlloc``, else rounded up to 2 MiB, ``kRoundLarge``: ``get_allocation_size``).
  A request is served from its own pool only (``get_pool``).
- Best fit: the smallest cached block of the request's pool and stream at least as large
  (``get_free_block``: ``pool.blocks.lower_bound(&p.search_key)``, blocks ordered by stream, size,
  address).
- Split: the request takes the front of the block; the rest stays cached as a block of its own if
  it is large enough to be worth it: in the small pool a remainder of >= 512 bytes, in the large
  pool one of > 1 MiB (``should_split``); otherwise the request gets the whole block.

Pure functions of sizes; the fake's allocator (``Session._recycle``) uses them, with the pooled
blocks' access histories: the request inherits the history of the bytes it is handed.
"""

from __future__ import annotations

from typing import Any, Sequence

K_MIN_BLOCK_SIZE = 512
K_SMALL_SIZE = 1 << 20  # 1 MiB: largest "small" allocation
K_SMALL_BUFFER = 2 << 20  # 2 MiB: small-pool segment
K_LARGE_BUFFER = 20 << 20  # 20 MiB: large-pool segment below kMinLargeAlloc
K_MIN_LARGE_ALLOC = 10 << 20
K_ROUND_LARGE = 2 << 20


def round_size(nbytes: int) -> int:
    """``round_size``: the block size a request of ``nbytes`` needs."""
    if nbytes < K_MIN_BLOCK_SIZE:
        return K_MIN_BLOCK_SIZE
    return K_MIN_BLOCK_SIZE * ((nbytes + K_MIN_BLOCK_SIZE - 1) // K_MIN_BLOCK_SIZE)


def is_small(nbytes: int) -> bool:
    """Whether a request (or block) of ``nbytes`` belongs to the small pool (``get_pool``)."""
    return round_size(nbytes) <= K_SMALL_SIZE


def segment_size(nbytes: int) -> int:
    """``get_allocation_size``: the segment ``cudaMalloc`` gets when no cached block fits."""
    size = round_size(nbytes)
    if size <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if size < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return K_ROUND_LARGE * ((size + K_ROUND_LARGE - 1) // K_ROUND_LARGE)


def fits(block_nbytes: int, nbytes: int) -> bool:
    """Whether a cached block of ``block_nbytes`` can serve a request of ``nbytes`` (same pool, big enough)."""
    return is_small(block_nbytes) == is_small(nbytes) and round_size(block_nbytes) >= round_size(nbytes)


def should_split(block_nbytes: int, nbytes: int) -> bool:
    """``should_split``: whether the block's remainder after the request stays cached on its own."""
    remaining = round_size(block_nbytes) - round_size(nbytes)
    if is_small(block_nbytes):
        return remaining >= K_MIN_BLOCK_SIZE
    return remaining > K_SMALL_SIZE


def best_fit(block_sizes: Sequence[int], nbytes: int) -> int | None:
    """The index of the block ``get_free_block`` picks among cached blocks of these sizes (one
    stream), or ``None``. Among blocks of one rounded size CUDA takes the lowest address; the fake
    has none and takes the first listed."""
    best = None
    for i, size in enumerate(block_sizes):
        if fits(size, nbytes) and (best is None or round_size(size) < round_size(block_sizes[best])):
            best = i
    return best


def handed_over(block_nbytes: int, nbytes: int) -> int:
    """How many bytes of the block the request gets: its rounded size when the block is split,
    else the whole block."""
    return round_size(nbytes) if should_split(block_nbytes, nbytes) else round_size(block_nbytes)


def split_records(records: list, cut: int, new_record: Any) -> tuple[list, list, list]:
    """The access records of a block split at byte ``cut``: ``(front, back, originals)``: the
    front's records, the back's with their ranges shifted to start at 0 (a record across the cut is
    in both), and the original record of each of the back's."""
    front = [r for r in records if r.start < cut]
    originals = [r for r in records if r.end > cut]
    back = [new_record((max(r.start, cut) - cut, r.end - cut, r.stream, r.seq, r.kernel)) for r in originals]
    return front, back, originals
