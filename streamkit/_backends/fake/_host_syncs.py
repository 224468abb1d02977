"""Ops that synchronize the host partway through, as their CUDA implementations do: a first part
(kernels that read some inputs), a host sync with the current stream (a size or a value copied to
the host and waited for), then a second part (kernels launched asynchronously after it, reading
inputs again). On the fake: kernel A (the reads before the sync), the host sync, kernel B (the
reads after it, the writes, the values).

So a read after the sync is an ordinary unsynchronized read: another stream's write issued later
races with it, while everything issued to the current stream before the sync (the inputs the
first part read included) is finished for everyone.

=================  =========================  ==============================  ===========================================
op                 read before the sync       read after it                   CUDA source
=================  =========================  ==============================  ===========================================
nonzero            self                       self                            ``aten/src/ATen/native/cuda/Nonzero.cu``: count (``cub::DeviceReduce::Sum``), ``memcpy_and_sync``, ``cub::DeviceSelect::Flagged`` reads ``self`` again
bincount           self                       self, weights                   ``aten/src/ATen/native/cuda/SummaryOps.cu`` (``_bincount_cuda_template``: ``self.min()``/``self.max().item()``, then the histogram kernel)
masked_select      mask                       self                            ``aten/src/ATen/native/cuda/IndexKernel.cu`` (``masked_select_out_cuda_impl`` -> ``index(self, {mask})``: ``nonzero(mask)`` then the index kernel)
index (x[m])       the bool/uint8 masks       self, the other indices         ``aten/src/ATen/native/IndexingUtils.h`` (``expandTensors``: ``index.nonzero()`` for a mask), ``TensorAdvancedIndexing.cpp`` (``index``)
index (x[cpu_i])   - (a blocking H2D copy)    self, the device indices        ``TensorAdvancedIndexing.cpp`` (``make_info``: ``indices[i].to(self.device())``: ``copy_`` from pageable memory, ``memcpy_and_sync``)
=================  =========================  ==============================  ===========================================

When the reads before the sync are among the reads after it (nonzero, bincount), kernel A checks
nothing that kernel B doesn't check again at a later point of the same stream, and the host sync
orders no access of A that B doesn't repeat: the fake then makes the host sync (with the stream's
earlier work) and issues B alone, one kernel instead of two (``SYNC_FIRST``).

Other syncing ops read their inputs only before the sync (``unique``: a sorted copy;
``repeat_interleave`` without ``output_size``: the cumulative sum) and stay one kernel followed by
the sync (``_tensor.SYNCING_OPS``).
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import torch

from ._pipeline import OpCall
from ._tracking import READ

#: op name -> (argument names read before the sync, argument names read after it)
SPLIT_OPS: dict[str, tuple[frozenset, frozenset]] = {
    "nonzero": (frozenset({"self"}), frozenset({"self"})),
    "bincount": (frozenset({"self"}), frozenset({"self", "weights"})),
    "masked_select": (frozenset({"mask"}), frozenset({"self"})),
}
#: the split ops whose reads before the sync are among those after it: the sync, then kernel B only
SYNC_FIRST = frozenset(name for name, (before, after) in SPLIT_OPS.items() if before <= after)
_MASK_DTYPES = (torch.bool, torch.uint8)


#: the ``_tensor`` module (set by :func:`handler_for`: this module imports no engine module)
_engine: Any = None


def handler_for(plan: Any, engine: Any) -> Any:
    """The dispatch handler of ``plan``'s op when it syncs the host partway (else ``None``);
    ``engine`` is the ``_tensor`` module."""
    global _engine
    _engine = engine
    if plan.name in SPLIT_OPS and "out" not in plan.op._overloadname:
        return split_kernel
    if plan.name == "index" and plan.op._overloadname in ("Tensor", "Tensor_hacked_twin"):
        return index_kernel
    if plan.name == "repeat_interleave" and plan.op._overloadname == "Tensor":
        return repeat_interleave_kernel
    return None


def repeat_interleave_kernel(plan: Any, args: Any, kwargs: dict, frame: Any) -> Any:
    """``repeat_interleave(repeats)``: the output size is ``repeats.sum()``, read on the host (a
    sync after the kernel), unless ``output_size`` gives it (``aten/src/ATen/native/Repeat.h``,
    ``repeat_interleave_common``: ``output_size.has_value() ? ... : cumsum[-1].item()``)."""
    call = _engine.DispatchCall(plan, frame)
    call.unwrap(args, kwargs)
    sync = None if kwargs.get("output_size") is not None else "implicit_syncs"
    return call.wrap(call.launch(sync), args, kwargs)


def _nothing() -> None:
    return None


def _fake_values(plan: Any, args: Any, kwargs: dict, fake: type) -> list:
    """``(argument name, fake tensor)`` for every fake tensor argument (lists flattened)."""
    out = []
    for i, arg in enumerate(plan.op._schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        for v in value if isinstance(value, (list, tuple)) else (value,):
            if type(v) is fake:
                out.append((arg.name, v))
    return out


def _run_split(plan: Any, args: Any, kwargs: dict, frame: Any, before: list, after: list, sync: str) -> Any:
    if all(any(t is u for u, _ in after) for t, _ in before):  # (SYNC_FIRST: B repeats A's reads)
        call = _engine.DispatchCall(plan, frame)
        call.unwrap(args, kwargs)
        call.accesses = after
        return call.wrap(call.launch(sync_before=sync), args, kwargs)
    first = _engine.DispatchCall(plan, frame)  # the part before the sync: its reads, then the sync
    first.call, first.accesses = _nothing, before
    first.launch(sync)
    call = _engine.DispatchCall(plan, None, first.session)  # the part after it, at the same site
    call.site, call.stream = first.site, first.stream
    call.unwrap(args, kwargs)
    call.accesses = after
    return call.wrap(call.launch(), args, kwargs)


def split_kernel(plan: Any, args: Any, kwargs: dict, frame: Any) -> Any:
    """nonzero, bincount, masked_select: reads before the sync, the sync, reads after it (table above)."""
    _tensor = _engine
    before_names, after_names = SPLIT_OPS[plan.name]
    named = _fake_values(plan, args, kwargs, _tensor.FakeDeviceTensor)
    before = [(t, READ) for name, t in named if name in before_names]
    after = [(t, READ) for name, t in named if name in after_names]
    out = _run_split(plan, args, kwargs, frame, before, after, "implicit_syncs")
    _tensor.observed(plan, args, kwargs, out)  # (the fast path learns it: fast_split)
    return out


def fast_sync_first(plan: Any) -> str | None:
    """For the fast path (``_fastpath``): the host sync that precedes ``plan``'s kernel when it is
    a ``SYNC_FIRST`` op (its accesses are then the reads after the sync: every tensor argument),
    else ``None``."""
    if plan.name in SYNC_FIRST and "out" not in plan.op._overloadname:
        return "implicit_syncs"
    return None


def fast_split_positions(plan: Any, names: dict) -> tuple | None:
    """For the fast path (``_fastpath``): ``(positions read before the sync, positions read after
    it)`` of a split op (not ``SYNC_FIRST``) whose fake tensor arguments at those call positions
    have these schema ``names``; ``None`` for any other op."""
    found = SPLIT_OPS.get(plan.name)
    if found is None or plan.name in SYNC_FIRST or "out" in plan.op._overloadname:
        return None
    before_names, after_names = found
    return (
        tuple(p for p, name in names.items() if name in before_names),
        tuple(p for p, name in names.items() if name in after_names),
    )


def fast_split(session: Any, fast: Any, func: Any, args: tuple, inner: list, kwargs: dict, accesses: list, site: Any) -> Any:
    """The fast path's run of a split op: kernel A (reads before the sync), the sync, kernel B."""
    before, after = fast.split
    first = OpCall(session, fast.op, _nothing, site=site)
    first.accesses = [(args[p], READ) for p in before]
    first.launch("implicit_syncs")
    call = OpCall(session, fast.op, func, site=site, stream=first.stream)
    call.args, call.kwargs, call.accesses = inner, kwargs, [(args[p], READ) for p in after]
    result = call.launch()
    return _engine.wrap_fresh(session, result, call.stream, call.kernel, site)


def index_kernel(plan: Any, args: Any, kwargs: dict, frame: Any) -> Any:
    """``x[indices]``: a bool/uint8 mask costs a ``nonzero`` (a host sync) before the index kernel;
    a CPU index tensor a blocking copy to the device (a host sync); else one ordinary kernel."""
    _tensor = _engine
    fake = _tensor.FakeDeviceTensor
    indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
    masks = [t for t in indices if type(t) is fake and t.dtype in _MASK_DTYPES]
    host = [t for t in indices if isinstance(t, torch.Tensor) and type(t) is not fake]
    if not masks and not host:
        return _tensor.run_kernel(plan, args, kwargs, frame)
    # (a host index is copied at the call, as CUDA's blocking copy to the device: _unwrap clones host
    # operands when a deferred schedule may run the kernel later)
    before = [(t, READ) for t in masks]
    after = [(args[0], READ)] + [(t, READ) for t in indices if type(t) is fake and t.dtype not in _MASK_DTYPES]
    return _run_split(plan, args, kwargs, frame, before, after, "implicit_syncs" if masks else "blocking_copies")

