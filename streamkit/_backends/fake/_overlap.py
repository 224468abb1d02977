"""Exact overlap of strided views: two accesses conflict only if they share an element's bytes.

An access is tracked by its bounding byte range ``[lo, hi)``; that is exact for a view whose
elements fill it (contiguous, or any layout without gaps). A view with gaps (``x[::2]``,
``x[:, 1::2]``, a column of a matrix) carries its layout, and where the bounding ranges of two
accesses overlap, the detector asks :func:`disjoint` before it reports a race: interleaved slices,
disjoint column splits and disjoint transposed blocks don't conflict (CSAN, PyTorch's own CUDA
sanitizer, compares bounding ranges: ``torch/cuda/_sanitizer.py``; CUDA itself conflicts only on
shared bytes).

A gapped access drops no earlier records but those of the same layout (it doesn't cover the
bytes between its elements).
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any

import torch

from ._tracking import AccessRecord

_NoTorchFunction = torch._C.DisableTorchFunction

#: element counts above this are compared by bounding range only (conservative)
EXACT_LIMIT = 1 << 20

Layout = tuple  # (offset bytes, sizes, strides in bytes, element size)


class StridedRecord(AccessRecord):
    """An :class:`~._tracking.AccessRecord` of a gapped view, with its :data:`Layout` (a 6-tuple)."""

    __slots__ = ()
    layout = property(itemgetter(5))


def strided_record(start: int, end: int, stream: int, seq: int, kernel: Any, layout: Layout) -> StridedRecord:
    return tuple.__new__(StridedRecord, (start, end, stream, seq, kernel, layout))


def layout_of(inner: torch.Tensor) -> Layout | None:
    """The layout of a view with gaps between its elements, or ``None`` when its elements fill its
    bounding byte range."""
    n = inner.numel()
    if n <= 1 or inner.is_contiguous():
        return None
    size = inner.element_size()
    dims = [(d, s) for d, s in zip(inner.size(), inner.stride()) if d != 1]
    expected = 1
    for d, s in sorted(dims, key=itemgetter(1)):
        if s != expected:
            break
        expected *= d
    else:
        return None  # a permutation of a contiguous block (a transpose): no gap
    extent = 1 + sum((d - 1) * abs(s) for d, s in dims)
    if extent <= n:
        # as many element slots as elements or fewer: no gap unless the strides skip some; check
        # the few cases exactly (sorted unique offsets must be consecutive)
        offsets = _offsets((0, tuple(d for d, _ in dims), tuple(s * size for _, s in dims), size))
        if offsets is None or offsets.numel() == extent:
            return None
    return (inner.storage_offset() * size, tuple(d for d, _ in dims), tuple(s * size for _, s in dims), size)


def _offsets(layout: Layout) -> torch.Tensor | None:
    """The sorted unique byte offsets of a layout's elements (``None`` past :data:`EXACT_LIMIT`)."""
    offset, sizes, strides, _ = layout
    n = 1
    for d in sizes:
        n *= d
    if n > EXACT_LIMIT:
        return None
    with _NoTorchFunction():  # (bookkeeping on host tensors: no user mode sees it)
        out = torch.tensor([offset], dtype=torch.int64)
        for d, s in zip(sizes, strides):
            out = (out.unsqueeze(-1) + torch.arange(d, dtype=torch.int64) * s).flatten()
        return torch.unique(out)


def _starts(record_or_layout: Any, lo: int, hi: int) -> tuple[torch.Tensor | None, int]:
    """``(sorted element start offsets, element size)``; ``(None, 0)`` for a dense range."""
    if record_or_layout is None:
        return None, 0
    starts = _offsets(record_or_layout)
    if starts is None:
        return None, 0  # too large: compared as its bounding range
    return starts, record_or_layout[3]


def disjoint(record: Any, lo: int, hi: int, layout: Layout | None) -> bool:
    """Whether an earlier access ``record`` and an access of bounding range ``[lo, hi)`` with
    ``layout`` (``None``: dense) share no byte (their bounding ranges overlap)."""
    with _NoTorchFunction():
        return _disjoint(record, lo, hi, layout)


def _disjoint(record: Any, lo: int, hi: int, layout: Layout | None) -> bool:
    theirs = record.layout if type(record) is StridedRecord else None
    a, wa = _starts(theirs, record.start, record.end)
    b, wb = _starts(layout, lo, hi)
    if a is None and b is None:
        return False  # two dense ranges whose bounding ranges overlap
    if a is None:  # record dense: [record.start, record.end) against b's elements
        return not bool(((b < record.end) & (b + wb > record.start)).any())
    if b is None:
        return not bool(((a < hi) & (a + wa > lo)).any())
    # for each element of a, the first element of b that ends after it starts
    i = torch.searchsorted(b + wb, a, right=True)
    inside = i < b.numel()
    if not bool(inside.any()):
        return True
    return not bool((b[i[inside]] < a[inside] + wa).any())
