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
_LIB.define("take(Tensor acc, Tensor ctrl, Tensor(a!) staging, bool passes) -> ()")
_LIB.define("step(Tensor(a!) acc, Tensor(b!) ctrl) -> ()")

from ._modes import MODE_COUNTS, MODE_CUMULATIVE, MODE_IDS, MODE_IDS_MAPPED  # noqa: E402,F401  (re-exported)


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
    _window, num_layers, cols = acc.shape
    experts = cols - 1
    flat_acc = acc.view(-1)
    base = (ctrl[1] * num_layers + layer) * cols  # 0-dim device tensor: no host read
    enabled = ctrl[0].to(acc.dtype)
    if mode in (MODE_COUNTS, MODE_CUMULATIVE):
        counts = values.to(torch.int64)
        if mode == MODE_CUMULATIVE:
            counts = torch.diff(counts, prepend=counts.new_zeros(1))
        index = base + torch.arange(experts, device=acc.device)
        flat_acc.index_add_(0, index, counts.to(acc.dtype) * enabled)
        return
    ids = values.reshape(-1).to(torch.int64)
    n = ids.numel()
    if n == 0:
        return
    rows = values.shape[0] if values.dim() > 0 else 1
    per_row = n // rows
    position = torch.arange(n, device=acc.device)
    keep = (ids != -1) & (position // per_row < num_tokens)  # -1 and padded rows are not counted
    if mode == MODE_IDS_MAPPED:
        num_logical = logcnt.shape[1]
        known = (ids >= 0) & (ids < num_logical)
        logical = ids.clamp(0, num_logical - 1)
        replicas = logcnt[layer].index_select(0, logical)
        # vLLM's choice: the flat position of the routed id modulo the replica count
        replica = position % replicas.clamp(min=1)
        physical = log2phy[layer].index_select(0, logical).gather(1, replica.unsqueeze(1)).squeeze(1)
        ids = torch.where(known & (replicas > 0), physical, torch.full_like(physical, -2))
    column = torch.where((ids >= 0) & (ids < experts), ids, torch.full_like(ids, experts))
    flat_acc.index_add_(0, base + column, keep.to(acc.dtype) * enabled)


def take_op(acc: torch.Tensor, ctrl: torch.Tensor, staging: torch.Tensor, passes: bool) -> None:
    """Copy the counters into ``staging``: the whole ring, oldest pass first (``passes=True``), or
    the sum over the ring (``passes=False``)."""
    window = acc.shape[0]
    if passes:
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
    above, about 25 launches for routed ids). Int64 counters always use ``"aten"``."""
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


for _name, _fn in (("record", record_op), ("take", take_op), ("step", step_op)):
    _LIB.impl(_name, _fn, "CompositeExplicitAutograd")
    _LIB.impl(_name, _no_op, "Meta")  # shapes never change: tracing (torch.compile, meta tensors) needs no work
_LIB.impl("record", _record_cuda, "CUDA")  # one Triton launch where Triton is importable
