"""Pinned host memory: what a ``non_blocking=True`` device-to-host copy returns, and what
``pin_memory()`` makes.

A :class:`PinnedHostTensor` is a CPU tensor (a plain subclass: its values are its own) that
remembers the unfinished copies touching it: device-to-host copies that write it, host-to-device
copies that read it. Every torch function and tensor method on it is a host access (except
metadata queries and device copies), checked against those copies' kernels with the session's host
clock: a host read before the host synchronized with a copy that writes it is a race of kind
``"host read"``, a host write while a copy that reads it may still run is a race of kind
``"host write"``. Results of ops on it are plain CPU tensors (as on CUDA, they are not pinned).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import torch

from ..._errors import RaceError
from ._clocks import ordered_before
from ._sites import capture_site
from ._tracking import AccessKind

if TYPE_CHECKING:
    from ._pipeline import OpCall

_T = torch.Tensor
DEVICE_TYPE = "fake"  # the fake device's name ("npu" in a process emulating npu: set by _tensor)
DEVICE_TENSOR: Any = None  # FakeDeviceTensor (set by _tensor, which imports this module)
_DisableSubclass = torch._C.DisableTorchFunctionSubclass

# Metadata: no host access to the values.
_QUIET = frozenset(
    [getattr(_T, name) for name in (
        "size", "dim", "ndimension", "numel", "nelement", "stride", "storage_offset", "element_size", "data_ptr",
        "is_contiguous", "get_device", "__len__", "is_floating_point", "is_complex", "is_signed", "__hash__",
    )]
    + [getattr(_T, name).__get__ for name in (
        "shape", "dtype", "device", "ndim", "layout", "requires_grad", "is_leaf", "grad_fn", "is_cuda", "is_cpu",
        "is_sparse", "is_quantized", "is_meta", "names", "itemsize", "nbytes", "grad", "_version",
    ) if hasattr(getattr(_T, name, None), "__get__")]
)
_INPLACE_DUNDERS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                              "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"})


def _writes_self(func: Any) -> bool:
    name = getattr(func, "__name__", "")
    return name in _INPLACE_DUNDERS or (name.endswith("_") and not name.endswith("__"))


def _device_side(func: Any, args: Any, kwargs: dict) -> bool:
    """A device copy that reads or writes the buffer (``.to(device)``, ``dev.copy_(h)``,
    ``h.copy_(dev)``): ordered by streams, not a host access."""
    for value in (*args, *kwargs.values()):
        if type(value) is DEVICE_TENSOR:
            return True
        if isinstance(value, torch.device) and value.type == DEVICE_TYPE:
            return True
        if isinstance(value, str) and value.split(":")[0] == DEVICE_TYPE:
            return True
    return False


class PinnedHostTensor(torch.Tensor):
    """A pinned (page-locked) host tensor: ``is_pinned()`` is True, and host accesses to it are
    checked against the asynchronous copies that use it (see the module docstring)."""

    _sk_writers: Any = ()  # [(session, kernel)]: device-to-host copies that write it
    _sk_readers: Any = ()  # [(session, kernel)]: host-to-device copies that read it

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is _T.is_pinned:
            return True
        if func is _T.pin_memory:
            return args[0]
        if func not in _QUIET and not _device_side(func, args, kwargs):
            writes = _writes_self(func)
            for i, value in enumerate(args):
                if type(value) is cls:
                    _check(value, writes and i == 0, func, sys._getframe(1))
            out = kwargs.get("out")
            if type(out) is cls:
                _check(out, True, func, sys._getframe(1))
        with _DisableSubclass():
            if func in _PRINTS:  # printed as the plain tensor it is (CUDA prints "tensor(...)")
                return func(args[0].as_subclass(_T), *args[1:], **kwargs)
            return func(*args, **kwargs)


_PRINTS = frozenset({_T.__repr__, _T.__format__})


def _copy_reduce(self: PinnedHostTensor, protocol: int) -> Any:
    """Pickling reads the values (a host read); it pickles a plain tensor (the pending copies are
    this process's, they don't travel)."""
    _check(self, False, _T.__reduce_ex__, sys._getframe(1))
    with _DisableSubclass():
        return self.as_subclass(_T).__reduce_ex__(protocol)


def _deepcopy(self: PinnedHostTensor, memo: dict) -> PinnedHostTensor:
    """``copy.deepcopy``: a host read, and a new pinned tensor with no copy pending."""
    _check(self, False, _T.__deepcopy__, sys._getframe(1))
    return pinned_copy(self)


PinnedHostTensor.__reduce_ex__ = _copy_reduce  # type: ignore[method-assign]
PinnedHostTensor.__deepcopy__ = _deepcopy  # type: ignore[method-assign]


def _name(func: Any) -> str:
    qualname = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or str(func)
    if qualname.startswith(("TensorBase.", "_TensorBase.")):
        qualname = "Tensor." + qualname.split(".", 1)[1]
    return qualname


def _unfinished(entries: Any) -> list:
    """The copies the host has not synchronized with (tracked, in an open session)."""
    left = []
    for session, kernel in entries:
        if session.closed or not session.tracked or session.detect == "off":
            continue  # (a deferred schedule keeps clocks with detect="off": still nothing to report)
        host = session.clocks.host
        idx = kernel.stream.idx
        if ordered_before(idx, kernel.seq, host):
            continue
        left.append((session, kernel))
    return left


def _check(tensor: PinnedHostTensor, write: bool, func: Any, frame: Any) -> None:
    """A host access to ``tensor`` by ``func``: report it if a copy that uses the buffer may still run."""
    conflicts = []
    if tensor._sk_writers:
        tensor._sk_writers = _unfinished(tensor._sk_writers)
        conflicts += [(entry, AccessKind.WRITE) for entry in tensor._sk_writers]
    if write and tensor._sk_readers:
        tensor._sk_readers = _unfinished(tensor._sk_readers)
        conflicts += [(entry, AccessKind.READ) for entry in tensor._sk_readers]
    if not conflicts:
        return
    (session, kernel), earlier = max(conflicts, key=lambda found: found[0][1].seq)
    site = capture_site(frame)
    if session.on_raced is not None:
        session.on_raced(None, tuple(k for (owner, k), _ in conflicts if owner is session))
    with session.lock:
        race, _ = session.reporter.host_race(
            kernel, earlier, AccessKind.HOST_WRITE if write else AccessKind.HOST_READ, _name(func), site, tensor.shape, tensor.dtype
        )
    if session.detect == "raise":
        raise RaceError(race)


def pinned_copy(tensor: torch.Tensor) -> PinnedHostTensor:
    """A pinned copy of a CPU tensor (``pin_memory()``)."""
    with _DisableSubclass():
        values = tensor.clone()
    return values.as_subclass(PinnedHostTensor)


def written_by(host: torch.Tensor, call: "OpCall") -> PinnedHostTensor:
    """``host`` (a CPU tensor) as a pinned tensor that ``call``'s kernel (an asynchronous D2H copy,
    launched) writes: the pipeline's last step for such a copy."""
    pinned = host if type(host) is PinnedHostTensor else host.as_subclass(PinnedHostTensor)
    if call.session.tracked:
        pinned._sk_writers = _unfinished(pinned._sk_writers) + [(call.session, call.kernel)]
    return pinned


def read_by(pinned: PinnedHostTensor, call: "OpCall") -> None:
    """``call``'s kernel (an asynchronous H2D copy, launched) reads ``pinned``: the host must not
    write it until it is done."""
    if call.session.tracked and call.kernel.seq:  # (seq 0: captured in a graph, never run; each replay reads it)
        pinned._sk_readers = _unfinished(pinned._sk_readers) + [(call.session, call.kernel)]
