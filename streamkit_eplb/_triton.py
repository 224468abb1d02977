"""``record`` as one Triton kernel on CUDA devices (used when Triton is importable).

The aten composition in :mod:`._ops` launches about 25 small kernels per call for routed ids
(measured on an H200: about 55 us of device time per record + step in a CUDA graph), which at 58
layers is a visible share of a decode step. This kernel does the same arithmetic in one launch:
each program takes ``BLOCK`` routed ids, maps them (padding, ``num_tokens``, ``log2phy`` replica
choice, invalid ids to the last column) and adds them to the counters with atomics. Nothing is
read on the host: the enable flag, the pass index and ``num_tokens`` are loaded by the kernel, so
it is capturable in a CUDA graph.

Triton is plain Python (its compiler ships in the wheel), so this needs no C compiler at install;
it compiles on first use per (mode, dtypes), so warm up before graph capture, as torch advises.
Int32 counters only (the default); int64 counters use the aten composition.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._modes import KNUTH, MAPPED_MODES, MODE_COUNTS, MODE_CUMULATIVE, MODE_IDS_HASHED

BLOCK = 1024
_KNUTH = tl.constexpr(KNUTH)  # a jit function reads module globals only as constexprs
_INTS = ("n", "per_row", "layer", "num_layers", "cols", "experts", "num_logical", "max_rep")


@triton.jit(do_not_specialize=list(_INTS))
def _record_ids(
    acc_ptr, ctrl_ptr, ids_ptr, limit_ptr, l2p_ptr, logcnt_ptr, out_ptr,
    n, per_row, layer, num_layers, cols, experts, num_logical, max_rep,
    MAPPED: tl.constexpr, HASH: tl.constexpr, WRITE_OUT: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    enabled = tl.load(ctrl_ptr)
    current = tl.load(ctrl_ptr + 1)
    limit = tl.load(limit_ptr)
    ids = tl.load(ids_ptr + offs, mask=inside, other=-1).to(tl.int64)
    # the scalars are broadcast to blocks first: Triton's CPU interpreter refuses a mask made with a scalar
    enabled = tl.zeros([BLOCK], tl.int64) + enabled
    limit = tl.zeros([BLOCK], tl.int64) + limit
    keep = inside & (ids != -1) & ((offs // per_row) < limit) & (enabled != 0)
    if MAPPED:
        known = (ids >= 0) & (ids < num_logical)
        logical = tl.where(known, ids, 0)
        replicas = tl.load(logcnt_ptr + layer * num_logical + logical, mask=inside, other=0)
        if HASH:  # vLLM's current choice: Knuth multiplicative hash of the token index
            replica = ((offs // per_row) * _KNUTH & 0xFFFFFFFF) % tl.maximum(replicas, 1)
        else:  # vLLM v0.11: flat position modulo replicas
            replica = offs % tl.maximum(replicas, 1)
        physical = tl.load(l2p_ptr + (layer * num_logical + logical) * max_rep + replica, mask=inside, other=-1)
        physical = tl.where(known & (replicas > 0), physical, -1)
        if WRITE_OUT:
            tl.store(out_ptr + offs, physical.to(out_ptr.dtype.element_ty), mask=inside)
        ids = tl.where(physical >= 0, physical, -2)
    column = tl.where((ids >= 0) & (ids < experts), ids, experts)
    base = (current * num_layers + layer) * cols
    ones = tl.full([BLOCK], 1, tl.int32)
    tl.atomic_add(acc_ptr + base + column, ones, mask=keep, sem="relaxed")


@triton.jit(do_not_specialize=["experts", "layer", "num_layers", "cols"])
def _record_counts(
    acc_ptr, ctrl_ptr, counts_ptr, experts, layer, num_layers, cols,
    CUMULATIVE: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < experts
    enabled = tl.load(ctrl_ptr)
    current = tl.load(ctrl_ptr + 1)
    counts = tl.load(counts_ptr + offs, mask=inside, other=0).to(tl.int64)
    if CUMULATIVE:
        previous = tl.load(counts_ptr + offs - 1, mask=inside & (offs > 0), other=0).to(tl.int64)
        counts = counts - previous
    base = (current * num_layers + layer) * cols
    # one writer per counter: a plain read-modify-write, ordered on the stream like the aten version
    old = tl.load(acc_ptr + base + offs, mask=inside, other=0)
    tl.store(acc_ptr + base + offs, old + (counts * enabled).to(tl.int32), mask=inside)


def supports(acc: torch.Tensor, values: torch.Tensor, out: torch.Tensor | None = None) -> bool:
    """Whether :func:`record` handles these buffers (int32 counters, contiguous inputs and output)."""
    return acc.dtype == torch.int32 and acc.is_contiguous() and values.is_contiguous() and (out is None or out.is_contiguous())


def record(
    acc: torch.Tensor,
    ctrl: torch.Tensor,
    values: torch.Tensor,
    num_tokens: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    layer: int,
    mode: int,
    out: torch.Tensor | None = None,
) -> None:
    """:func:`._ops.record_op` in one launch (see the module docstring); same arguments, plus
    ``out`` for :func:`._ops.record_map_op` (the physical id of every routed id)."""
    _window, num_layers, cols = acc.shape
    experts = cols - 1
    if mode in (MODE_COUNTS, MODE_CUMULATIVE):
        grid = (triton.cdiv(experts, BLOCK),)
        _record_counts[grid](acc, ctrl, values, experts, layer, num_layers, cols, CUMULATIVE=mode == MODE_CUMULATIVE, BLOCK=BLOCK)
        return
    n = values.numel()
    if n == 0:
        return
    rows = values.shape[0] if values.dim() > 0 else 1
    mapped = mode in MAPPED_MODES
    if mapped and not log2phy.is_contiguous():
        log2phy = log2phy.contiguous()
    grid = (triton.cdiv(n, BLOCK),)
    _record_ids[grid](
        acc, ctrl, values, num_tokens, log2phy, logcnt, values if out is None else out,
        n, n // rows, layer, num_layers, cols, experts, logcnt.shape[1], log2phy.shape[2],
        MAPPED=mapped, HASH=mode == MODE_IDS_HASHED, WRITE_OUT=out is not None, BLOCK=BLOCK,
    )
