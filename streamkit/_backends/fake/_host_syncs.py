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
index (x[cpu_i])   - (a blocking H2D copy)    self, the device indices        ``IndexingUtils.h`` (``expandTensors(..., ensure_same_device=true)`` from ``make_info``: ``index.to(self.device())``: ``copy_`` from pageable memory, ``memcpy_and_sync``); a host mask: no sync (``nonzero`` on the host into pinned memory, copied ``non_blocking``)
index_put_         masks; a 0-dim host value  values, device indices          ``TensorAdvancedIndexing.cpp`` (``_index_put_impl_``: ``masked_fill_`` for one device mask and a one-element host value, no sync; else ``value.to(self.device())`` (blocking), ``make_info``); ``accumulate=True``: ``cuda/Indexing.cu`` (``index_put_with_sort_kernel``, ``makeLinearIndex``)
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
    if plan.name in ("index_put_", "_index_put_impl_", "index_put") and "out" not in plan.op._overloadname:
        return index_put_kernel
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


class _Nonzero:
    """The part before a mask's host sync: ``nonzero(mask)`` (CUDA's ``expandTensors``), kept for
    the kernel after the sync, which reads it instead of the mask (the mask itself is finished)."""

    __slots__ = ("mask", "value")

    def __init__(self, mask: Any) -> None:
        self.mask = mask  # (the unwrapped mask, at the call)
        self.value = None

    def __call__(self) -> None:
        self.value = self.mask.nonzero()


def _expand_masks(indices: Any, found: dict) -> Any:
    """``indices`` (unwrapped) with each mask that has a computed ``nonzero`` replaced by its columns
    (``IndexingUtils.h`` ``expandTensors``: ``nonzero.select(1, j)`` per mask dimension)."""
    out = []
    for t in indices:
        nonzero = found.get(id(t))
        if nonzero is None:
            out.append(t)
        else:
            out.extend(nonzero.value.select(1, j) for j in range(nonzero.value.shape[1]))
    return type(indices)(out) if type(indices) is tuple else out


def _run_steps(plan: Any, args: Any, kwargs: dict, frame: Any, steps: list, after: Any) -> Any:
    """Launch ``plan``'s op as CUDA runs it: for each ``(reads, sync)`` or ``(reads, sync, mask)``
    of ``steps`` a kernel with those reads (computing ``nonzero(mask)`` when a mask is given)
    followed by that host sync (``sync``: a ``Stats`` field), then the op's own kernel with the
    ``after`` accesses (a list, or a function of the unwrapped call's accesses), all at the call's
    site, on its stream; that kernel indexes with the masks' ``nonzero`` (computed before the sync:
    a later write to a mask doesn't change it). Returns that kernel's call, unlaunched."""
    session = stream = site = None
    found: dict = {}
    for step in steps:
        reads, sync = step[0], step[1]
        part = _engine.DispatchCall(plan, frame if stream is None else None, session)
        if stream is not None:
            part.site, part.stream = site, stream
        part.call, part.accesses = _nothing, reads
        mask = step[2] if len(step) > 2 else None
        if mask is not None and mask.dim() > 0:
            nonzero = part.call = _Nonzero(mask.sk_inner)
            found[id(mask.sk_inner)] = nonzero
        part.launch(sync)  # (the host waits for it: it has run when launch returns)
        session, stream, site = part.session, part.stream, part.site
    call = _engine.DispatchCall(plan, frame if stream is None else None, session)
    if stream is not None:
        call.site, call.stream = site, stream
    call.unwrap(args, kwargs)
    call.accesses = after(call.accesses) if callable(after) else after
    if found:
        if len(call.args) > 1:
            call.args[1] = _expand_masks(call.args[1], found)
        elif "indices" in call.kwargs:
            call.kwargs["indices"] = _expand_masks(call.kwargs["indices"], found)
    return call


def split_kernel(plan: Any, args: Any, kwargs: dict, frame: Any) -> Any:
    """nonzero, bincount, masked_select: reads before the sync, the sync, reads after it (table
    above); for ``SYNC_FIRST`` ops the sync, then the one kernel with the reads after it."""
    _tensor = _engine
    before_names, after_names = SPLIT_OPS[plan.name]
    named = _fake_values(plan, args, kwargs, _tensor.FakeDeviceTensor)
    after = [(t, READ) for name, t in named if name in after_names]
    if plan.name in SYNC_FIRST:
        call = _engine.DispatchCall(plan, frame)
        call.unwrap(args, kwargs)
        call.accesses = after
        out = call.wrap(call.launch(sync_before="implicit_syncs"), args, kwargs)
    else:
        before = [(t, READ) for name, t in named if name in before_names]
        call = _run_steps(plan, args, kwargs, frame, [(before, "implicit_syncs")], after)
        out = call.wrap(call.launch(), args, kwargs)
    _tensor.observed(plan, args, kwargs, out)  # (the fast path learns it: fast_sync_first, fast_split)
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


def _indexing_steps(indices: Any, fake: type, linear: bool, reads: list) -> tuple[list, list]:
    """CUDA's host syncs of advanced indexing with ``indices`` (``None`` or tensors), after
    ``reads`` (accesses made before them): ``(steps, reads left)``; ``steps`` as
    :func:`_run_steps` takes them, ``reads left`` the reads of the last kernel among those.

    ``linear=False``: ``make_info`` (``index``, ``index_put_`` without ``accumulate``):
    ``expandTensors(..., ensure_same_device=true)`` turns each mask on the device into
    ``nonzero(mask)`` (a host sync), a mask on the host into a host ``nonzero`` copied from pinned
    memory with ``non_blocking`` (no sync), an index on the host into ``index.to(device)`` (a
    blocking copy: a sync); the kernel then reads the device indices.
    ``linear=True``: CUDA's ``index_put_with_sort_kernel`` (``accumulate=True``):
    ``expandTensors(self, orig)`` (device masks: ``nonzero``), then ``computeLinearIndex`` reads each
    index in turn (``wrapIndexOnce``: ``aminmax`` and ``_assert_async``, no sync) and copies one on
    the host with ``.to(device)`` (blocking)."""
    steps: list = []
    pending = list(reads)
    late: list = []
    defined = [t for t in indices if isinstance(t, torch.Tensor)]
    for t in defined:
        if type(t) is fake and t.dtype in _MASK_DTYPES:  # nonzero(mask): its count is copied to the host
            pending.append((t, READ))
            steps.append((pending, "implicit_syncs", t))
            pending = []
        elif type(t) is fake:
            late.append((t, READ))
        elif not linear and t.dtype not in _MASK_DTYPES:  # index.to(self.device()): blocking
            steps.append((pending, "blocking_copies"))
            pending = []
    if linear:
        for t in defined:
            if type(t) is fake and t.dtype not in _MASK_DTYPES:
                pending.append((t, READ))
            elif type(t) is not fake:  # (a host mask became a host index by then)
                steps.append((pending, "blocking_copies"))
                pending = []
        late = []
    return steps, pending + late


def index_kernel(plan: Any, args: Any, kwargs: dict, frame: Any) -> Any:
    """``x[indices]``: a bool/uint8 mask on the device costs a ``nonzero`` (a host sync) before the
    index kernel, an index tensor on the host a blocking copy to the device (a host sync), a mask on
    the host neither (a host ``nonzero`` copied from pinned memory); else one ordinary kernel
    (:func:`_indexing_steps`)."""
    _tensor = _engine
    fake = _tensor.FakeDeviceTensor
    indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
    steps, late = _indexing_steps(indices, fake, False, [])
    if not steps:
        return _tensor.run_kernel(plan, args, kwargs, frame)
    # (a host index is copied at the call, as CUDA's blocking copy to the device: _unwrap clones host
    # operands when a deferred schedule may run the kernel later)
    call = _run_steps(plan, args, kwargs, frame, steps, [(args[0], READ)] + late)
    return call.wrap(call.launch(), args, kwargs)


def _schema_arg(plan: Any, args: Any, kwargs: dict, name: str, default: Any) -> Any:
    for i, arg in enumerate(plan.op._schema.arguments):
        if arg.name == name:
            return args[i] if i < len(args) else kwargs.get(name, default)
    return default


def index_put_kernel(plan: Any, args: Any, kwargs: dict, frame: Any) -> Any:
    """``index_put_``, ``_index_put_impl_``, ``index_put`` (``x[indices] = v``) as CUDA runs them
    (``TensorAdvancedIndexing.cpp`` ``_index_put_impl_``; ``index_put`` clones ``self`` first):

    - without ``accumulate``, a one-element host ``values`` and a single bool/uint8 mask on the
      device (``canDispatchToMaskedFill``): ``masked_fill_(mask, values.item())``, one kernel, no
      sync (``x[mask] = 1.0``: Python numbers are 0-dim host tensors on CUDA);
    - else a 0-dim host ``values`` is copied to the device first (``value.to(self.device())``,
      blocking: a host sync), then the indices as :func:`_indexing_steps` says (``accumulate``: CUDA's
      ``index_put_with_sort_kernel``), then the kernel that writes ``self`` (reading the values)."""
    _tensor = _engine
    fake = _tensor.FakeDeviceTensor
    self = args[0]
    indices = _schema_arg(plan, args, kwargs, "indices", ())
    values = _schema_arg(plan, args, kwargs, "values", None)
    accumulate = bool(_schema_arg(plan, args, kwargs, "accumulate", False))
    defined = [t for t in indices if isinstance(t, torch.Tensor)]
    host_values = isinstance(values, torch.Tensor) and type(values) is not fake
    if (
        not accumulate and host_values and values.numel() == 1 and len(defined) == 1
        and type(defined[0]) is fake and defined[0].dtype in _MASK_DTYPES
    ):
        return _tensor.run_kernel(plan, args, kwargs, frame)  # masked_fill_: reads the mask, writes self
    before = [(self, READ)] if plan.name == "index_put" else []  # (self.clone(), before anything)
    value_copy = host_values and values.dim() == 0  # value.to(self.device()): a blocking copy
    steps, reads = _indexing_steps(indices, fake, accumulate, [] if value_copy else before)
    if value_copy:
        steps.insert(0, (before, "blocking_copies"))
    if not steps:
        return _tensor.run_kernel(plan, args, kwargs, frame)
    if type(values) is fake:
        reads.append((values, READ))
    call = _run_steps(plan, args, kwargs, frame, steps, lambda accesses: [a for a in accesses if a[1] != READ] + reads)
    result = call.launch()
    return self if plan.returns_self else call.wrap(result, args, kwargs)


_HOST_NUMBERS = (bool, int, float, complex)


def _advanced(key: Any) -> bool:
    parts = key if type(key) is tuple else (key,)
    return any(isinstance(k, (torch.Tensor, list)) for k in parts)


def setitem_args(args: tuple, fake: type) -> tuple:
    """The arguments of ``Tensor.__setitem__`` as CUDA's Python binding uses them: in
    ``x[indices] = number`` with tensor indices on a device tensor, the number becomes a 0-dim tensor
    of ``x``'s dtype on the host (``torch/csrc/autograd/python_variable_indexing.cpp``
    ``THPVariable_setitem``: ``valueToTensor(self_.options(), py_value, at::Device(kCPU))`` when
    ``self_device.is_cuda()``), so ``index_put_`` sees a host value (:func:`index_put_kernel`).
    ``fake``: the fake tensor class."""
    if len(args) == 3 and type(args[2]) in _HOST_NUMBERS and type(args[0]) is fake:
        if _advanced(args[1]):
            try:
                return (args[0], args[1], torch.tensor(args[2], dtype=args[0].dtype, device="cpu"))
            except (TypeError, RuntimeError):
                return args  # (the binding raises its own error for it)
    return args
