"""The collector's device operations, each one ``torch.library`` custom op with a mutation schema.

One op is one dispatcher call, so on streamkit's fake backend it is one kernel whose reads and
writes the race detector takes from the schema (``Tensor(a!)`` is written, the others are read).
They are defined with ``torch.library.Library`` and a ``CompositeExplicitAutograd`` kernel (every
device) plus an empty ``Meta`` kernel (for tracing), not with ``torch.library.custom_op``, whose
first call imports torch._dynamo and sympy (about 0.8 s of a demo rank's start-up here).
The implementations are composed of aten ops that never synchronize the host and never read a
device value on the host, so they run unchanged on CPU, CUDA and PrivateUse1 (NPU) and can be
captured in a CUDA/ACL graph. On a real device each op still launches several aten kernels and
allocates small temporaries (the routed-id arithmetic). On CUDA, ``record`` is one Triton launch
instead when Triton is importable (:mod:`._triton`, :func:`cuda_record_kernel`); on NPU an
AscendC kernel would do the same (not done: the library is pure Python).

Buffers (allocated by :class:`~streamkit_eplb.HeatCollector` at construction):

* ``acc``: ``(window, num_layers, num_experts + 1)`` counters (int32 by default); column
  ``num_experts`` counts invalid ids.
* ``ctrl``: int64 ``(2,)``: ``[enabled (0 or 1), current pass index]``.
"""

from __future__ import annotations

import os

import torch

_LIB = torch.library.Library("streamkit_eplb", "DEF")
_LIB.define(
    "record(Tensor(a!) acc, Tensor ctrl, Tensor values, Tensor num_tokens, Tensor log2phy, Tensor logcnt,"
    " int layer, int mode) -> ()"
)
# record + the physical id of every routed id written to `out` (vLLM's map-and-record in one kernel)
_LIB.define(
    "record_map(Tensor(a!) acc, Tensor ctrl, Tensor values, Tensor num_tokens, Tensor log2phy, Tensor logcnt,"
    " Tensor(b!) out, int layer, int mode) -> ()"
)
# record into the layer's own ring position ctrl[2 + layer] and advance it (vllm-ascend's per-layer ring)
_LIB.define(
    "record_layer(Tensor(a!) acc, Tensor(b!) ctrl, Tensor values, Tensor num_tokens, Tensor log2phy,"
    " Tensor logcnt, int layer, int mode) -> ()"
)
_LIB.define("take(Tensor acc, Tensor ctrl, Tensor(a!) staging, bool passes, bool rotate) -> ()")
_LIB.define("step(Tensor(a!) acc, Tensor(b!) ctrl) -> ()")

from ._modes import (  # noqa: E402,F401  (re-exported)
    KNUTH,
    MAPPED_MODES,
    MODE_COUNTS,
    MODE_CUMULATIVE,
    MODE_IDS,
    MODE_IDS_HASHED,
    MODE_IDS_MAPPED,
)


def physical_ids(values: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor, layer: int, mode: int) -> torch.Tensor:
    """The physical slot of every routed logical id of ``values`` (flattened, int64); ``-1`` for
    padding (``-1``), ids outside ``[0, num_logical)`` and experts without a replica. The replica is
    vLLM's choice: ``MODE_IDS_HASHED`` hashes the token index (vLLM's current kernel),
    ``MODE_IDS_MAPPED`` takes the flat position modulo the replica count (vLLM v0.11)."""
    ids = values.reshape(-1).to(torch.int64)
    n = ids.numel()
    rows = values.shape[0] if values.dim() > 0 else 1
    per_row = max(n // max(rows, 1), 1)
    position = torch.arange(n, device=ids.device)
    num_logical = logcnt.shape[1]
    known = (ids >= 0) & (ids < num_logical)
    logical = ids.clamp(0, num_logical - 1)
    replicas = logcnt[layer].index_select(0, logical)
    if mode == MODE_IDS_HASHED:
        token = position // per_row
        replica = torch.bitwise_and(token * KNUTH, 0xFFFFFFFF) % replicas.clamp(min=1)
    else:
        replica = position % replicas.clamp(min=1)
    physical = log2phy[layer].index_select(0, logical).gather(1, replica.unsqueeze(1)).squeeze(1)
    return torch.where(known & (replicas > 0), physical, torch.full_like(physical, -1))


def _add(acc: torch.Tensor, pass_index: torch.Tensor, enabled: torch.Tensor, values: torch.Tensor,
         num_tokens: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor, layer: int, mode: int) -> torch.Tensor | None:
    """Add one layer's load into ``acc[pass_index, layer]`` times ``enabled`` (0-dim device tensors);
    returns the physical ids for the mapped modes."""
    _window, num_layers, cols = acc.shape
    experts = cols - 1
    flat_acc = acc.view(-1)
    base = (pass_index * num_layers + layer) * cols  # 0-dim device tensor: no host read
    enabled = enabled.to(acc.dtype)
    if mode in (MODE_COUNTS, MODE_CUMULATIVE):
        counts = values.to(torch.int64)
        if mode == MODE_CUMULATIVE:
            counts = torch.diff(counts, prepend=counts.new_zeros(1))
        index = base + torch.arange(experts, device=acc.device)
        flat_acc.index_add_(0, index, counts.to(acc.dtype) * enabled)
        return None
    ids = values.reshape(-1).to(torch.int64)
    n = ids.numel()
    if n == 0:
        return ids
    rows = values.shape[0] if values.dim() > 0 else 1
    per_row = n // rows
    position = torch.arange(n, device=acc.device)
    keep = (ids != -1) & (position // per_row < num_tokens)  # -1 and padded rows are not counted
    physical = None
    if mode in MAPPED_MODES:
        physical = physical_ids(values, log2phy, logcnt, layer, mode)
        # a known logical id without a replica, or an unknown id: the invalid column
        ids = torch.where(physical >= 0, physical, torch.where(ids == -1, ids, torch.full_like(ids, -2)))
    column = torch.where((ids >= 0) & (ids < experts), ids, torch.full_like(ids, experts))
    flat_acc.index_add_(0, base + column, keep.to(acc.dtype) * enabled)
    return physical


def record_op(
    acc: torch.Tensor,
    ctrl: torch.Tensor,
    values: torch.Tensor,
    num_tokens: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    layer: int,
    mode: int,
) -> None:
    """Add one layer's load into ``acc[ctrl[1], layer]``, multiplied by ``ctrl[0]`` (the enable flag)."""
    _add(acc, ctrl[1], ctrl[0], values, num_tokens, log2phy, logcnt, layer, mode)


def record_map_op(
    acc: torch.Tensor,
    ctrl: torch.Tensor,
    values: torch.Tensor,
    num_tokens: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    out: torch.Tensor,
    layer: int,
    mode: int,
) -> None:
    """:func:`record_op` for logical ids, also writing every id's physical slot into ``out``
    (``-1`` for padding and invalid ids), as vLLM's ``eplb_map_to_physical_and_record`` returns them."""
    physical = _add(acc, ctrl[1], ctrl[0], values, num_tokens, log2phy, logcnt, layer, mode)
    out.view(-1).copy_(physical)


def record_layer_op(
    acc: torch.Tensor,
    ctrl: torch.Tensor,
    values: torch.Tensor,
    num_tokens: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    layer: int,
    mode: int,
) -> None:
    """Add into ``acc[ctrl[2 + layer] % window, layer]`` and advance that position by the enable
    flag: every layer has its own ring (vllm-ascend's ``load_counter``; a wrapped row keeps adding)."""
    window = acc.shape[0]
    position = ctrl[2 + layer]
    _add(acc, torch.remainder(position, window), ctrl[0], values, num_tokens, log2phy, logcnt, layer, mode)
    position.add_(ctrl[0])


def take_op(acc: torch.Tensor, ctrl: torch.Tensor, staging: torch.Tensor, passes: bool, rotate: bool = True) -> None:
    """Copy the counters into ``staging``: the whole ring (``passes=True``), oldest pass first
    (``rotate=True``) or in storage order (per-layer rings), or the sum over the ring (``passes=False``)."""
    window = acc.shape[0]
    if passes and not rotate:
        staging[: acc.numel()].view(acc.shape).copy_(acc)
    elif passes:
        order = torch.remainder(torch.arange(window, device=acc.device) + ctrl[1] + 1, window)
        staging[: acc.numel()].view(acc.shape).copy_(acc.index_select(0, order))
    else:
        staging[: acc[0].numel()].view(acc.shape[1:]).copy_(acc.sum(0))


def step_op(acc: torch.Tensor, ctrl: torch.Tensor) -> None:
    """Advance the pass index modulo the window and clear the pass it now points at."""
    window = acc.shape[0]
    index = ctrl[1:2]
    index.add_(1).remainder_(window)
    acc.index_fill_(0, index, 0)



def _no_op(*args: object) -> None:
    return None


_KERNEL_ENV = "STREAMKIT_EPLB_KERNEL"
_triton_module: object = None  # streamkit_eplb._triton once imported, False when Triton is missing


def cuda_record_kernel() -> str:
    """Which implementation ``record`` uses on CUDA devices: ``"triton"`` (one launch; when Triton
    is importable and ``STREAMKIT_EPLB_KERNEL`` is not ``aten``) or ``"aten"`` (the composition
    above, about 25 launches for routed ids). Int64 counters always use ``"aten"``. Public as
    :func:`streamkit_eplb.cuda_record_kernel`."""
    global _triton_module
    if os.environ.get(_KERNEL_ENV, "").lower() == "aten":
        return "aten"
    if _triton_module is None:
        try:
            from . import _triton
        except ImportError:
            _triton_module = False
        else:
            _triton_module = _triton
    return "triton" if _triton_module else "aten"


def _record_cuda(acc: torch.Tensor, ctrl: torch.Tensor, values: torch.Tensor, *rest: object) -> None:
    """``record`` on CUDA tensors (the op's arguments, as :func:`record_op` takes them)."""
    if cuda_record_kernel() == "triton" and _triton_module.supports(acc, values):  # type: ignore[union-attr]
        _triton_module.record(acc, ctrl, values, *rest)  # type: ignore[union-attr]
    else:
        record_op(acc, ctrl, values, *rest)  # type: ignore[arg-type]


def _record_map_cuda(acc: torch.Tensor, ctrl: torch.Tensor, values: torch.Tensor, num_tokens: torch.Tensor,
                     log2phy: torch.Tensor, logcnt: torch.Tensor, out: torch.Tensor, layer: int, mode: int) -> None:
    """``record_map`` on CUDA tensors: one Triton launch maps, records and writes ``out``."""
    if cuda_record_kernel() == "triton" and _triton_module.supports(acc, values, out):  # type: ignore[union-attr]
        _triton_module.record(acc, ctrl, values, num_tokens, log2phy, logcnt, layer, mode, out)  # type: ignore[union-attr]
    else:
        record_map_op(acc, ctrl, values, num_tokens, log2phy, logcnt, out, layer, mode)


for _name, _fn in (("record", record_op), ("record_map", record_map_op), ("record_layer", record_layer_op),
                   ("take", take_op), ("step", step_op)):
    _LIB.impl(_name, _fn, "CompositeExplicitAutograd")
    _LIB.impl(_name, _no_op, "Meta")  # shapes never change: tracing (torch.compile, meta tensors) needs no work
_LIB.impl("record", _record_cuda, "CUDA")  # one Triton launch where Triton is importable
_LIB.impl("record_map", _record_map_cuda, "CUDA")
