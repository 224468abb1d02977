"""Fake tensors that change which memory they hold: ``x.data = y``, ``x.set_(...)``, and
``x.untyped_storage()`` with its ``resize_`` (FSDP frees parameter memory with ``resize_(0)`` and
gets it back with ``resize_(nbytes)``).

None of them is a kernel on CUDA except a growing ``resize_`` of a storage that held bytes (it
copies them). The wrapper's tracking follows the memory: ``_inner`` (the CPU tensor with the values),
``_st`` (the storage's access table) and the byte range.

CUDA sources: ``torch/csrc/autograd/variable.cpp`` (``VariableHooks::set_data``:
``self.unsafeGetTensorImpl()->shallow_copy_from(new_data.getIntrusivePtr())``: the tensor takes
the new data's storage and metadata, nothing is copied), ``aten/src/ATen/native/TensorShape.cpp``
(``set_``, ``set_storage_cpu_``/``set_storage_meta__symint``: metadata only),
``aten/src/ATen/native/cuda/Resize.cpp`` (``resize_bytes_cuda``: to 0 bytes the block is freed and
the storage holds a null pointer; otherwise a new block on the current stream, ``cudaMemcpyAsync``
of the old bytes on the current stream, the old block freed).
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

import torch

from ..._errors import GraphCaptureError
from ._fake_backend import BACKEND
from . import _allocator
from . import _tensor as _t
from ._pipeline import OpCall
from ._sites import site_here
from ._tracking import READ, MemoryRange
from ._allocator import StorageState

_DATA = torch._C.TensorBase.__dict__["data"]
_C_SET = torch._C.TensorBase.set_
_C_UNTYPED_STORAGE = torch._C.TensorBase.untyped_storage
_RESIZE = torch.ops.aten.resize_.default  # names the copy kernel of a growing storage resize


def _alias(inner: torch.Tensor) -> torch.Tensor:
    """A new CPU tensor over ``inner``'s storage with its metadata (not ``inner`` itself: a later
    metadata change of one tensor must not reach the other)."""
    with torch.no_grad():
        return torch.empty(0, dtype=inner.dtype).set_(
            inner.untyped_storage(), inner.storage_offset(), inner.size(), inner.stride()
        )


def _rebind(tensor: Any, inner: torch.Tensor, state: StorageState) -> None:
    """``tensor`` now holds ``inner`` in the storage ``state`` tracks (its old storage is dropped:
    the last reference going is the allocator's free, checked as usual)."""
    tensor.sk_inner = inner
    tensor.sk_state = state
    tensor.sk_lo, tensor.sk_hi = _t.byte_range(inner)
    tensor.sk_layout = _t.layout_of(inner)


def _data_get(self: Any) -> torch.Tensor:
    return _DATA.__get__(self, type(self))


def _data_set(self: Any, new: Any) -> None:
    """``x.data = y``: x takes y's storage and metadata (PyTorch's ``set_data``; no kernel, no
    access). Model code does it everywhere: ``Module._apply`` (``.double()``, ``.to()``),
    ``vector_to_parameters``, weight loading and sharing."""
    if type(new) is _t.FakeDeviceTensor:
        session = BACKEND.current or BACKEND.get()
        if new.sk_state.session is not session:
            _t.check_session(session, new)
    _DATA.__set__(self, new)  # PyTorch's checks (compatible type) and the wrapper's own metadata
    if type(new) is _t.FakeDeviceTensor and new.sk_inner is not self.sk_inner:
        _rebind(self, _alias(new.sk_inner), new.sk_state)


def set_(self: Any, source: Any = None, storage_offset: Any = None, size: Any = None, stride: Any = None) -> Any:
    """``Tensor.set_`` on a fake tensor: ``set_()`` (an empty storage), ``set_(tensor)`` (its storage
    and metadata), ``set_(storage[, storage_offset, size, stride])`` with a storage from
    ``untyped_storage()`` of a fake tensor. Metadata only, as on CUDA."""
    if type(self) is not _t.FakeDeviceTensor:
        return _C_SET(self, *(a for a in (source, storage_offset, size, stride) if a is not None))
    session = BACKEND.current or BACKEND.get()
    if self.sk_state.session is not session:
        _t.check_session(session, self)
    if source is None:
        inner = torch.empty(0, dtype=self.dtype)
        state = StorageState(session, 0, session.current_stream(), None, ((0,), self.dtype))
        state.session = None  # no memory: nothing to free
    elif type(source) is _t.FakeDeviceTensor:
        if source.sk_state.session is not session:
            _t.check_session(session, source)
        with torch.no_grad():  # (the CPU op makes PyTorch's checks: same dtype, sizes in bounds)
            if storage_offset is None:
                inner = torch.empty(0, dtype=self.dtype).set_(source.sk_inner)
            else:
                inner = torch.empty(0, dtype=self.dtype).set_(
                    source.sk_inner.untyped_storage(), storage_offset, size, () if stride is None else stride
                )
        state = source.sk_state
    elif isinstance(source, FakeStorage):
        owner = source._tensor
        if owner.sk_state.session is not session:
            _t.check_session(session, owner)
        cpu = owner.sk_inner.untyped_storage()
        if storage_offset is None:
            nbytes = logical_nbytes(owner)
            storage_offset, size, stride = 0, (nbytes // self.element_size(),), (1,)
        inner = torch.empty(0, dtype=self.dtype).set_(cpu, storage_offset, size, () if stride is None else stride)
        state = owner.sk_state
    else:
        raise TypeError(
            f"Tensor.set_(source): a fake-device tensor takes a fake-device tensor or the storage of one"
            f" (x.untyped_storage()), got {type(source).__module__}.{type(source).__qualname__}"
        )
    with torch.no_grad():
        _DATA.__set__(self, _t.new_wrapper(inner, state))  # the wrapper's own sizes, strides, offset
    _rebind(self, inner, state)
    return self


class FakeStorage(torch.UntypedStorage):
    """``x.untyped_storage()`` of a fake tensor: the storage x's memory is tracked as.

    ``nbytes()``/``size()``, ``data_ptr()`` (the address of the CPU memory holding the values:
    equal for views of one storage), ``device``, ``resize_(nbytes)`` (CUDA's ``resize_bytes_cuda``),
    and a source for ``Tensor.set_``. (The C storage underneath is an empty CPU one: every call
    that needs the bytes goes through the fake tensor.)"""

    @property
    def _tensor(self) -> Any:
        return self.__dict__["tensor"]

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return _t.DEVICE

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return False

    def nbytes(self) -> int:
        return logical_nbytes(self._tensor)

    def size(self) -> int:  # type: ignore[override]
        return self.nbytes()

    def __len__(self) -> int:
        return self.nbytes()

    def data_ptr(self) -> int:
        return self._tensor.sk_inner.untyped_storage().data_ptr()

    def resize_(self, size: int) -> "FakeStorage":  # type: ignore[override]
        if type(size) is not int or size < 0:
            raise ValueError(f"UntypedStorage.resize_(size): expected a number of bytes >= 0, got {size!r}")
        resize_storage(self._tensor, size, site_here())
        return self

    def __repr__(self) -> str:
        return f"<fake storage of {self.nbytes()} bytes on {_t.DEVICE}>"


def untyped_storage(self: Any) -> torch.UntypedStorage:
    """``x.untyped_storage()``: a :class:`FakeStorage` for a fake tensor."""
    if type(self) is not _t.FakeDeviceTensor:
        return _C_UNTYPED_STORAGE(self)
    storage = FakeStorage(0)
    storage.__dict__["tensor"] = self
    return storage


def logical_nbytes(tensor: Any) -> int:
    """The size of ``tensor``'s storage as the program sees it (0 after ``resize_(0)``)."""
    nbytes = _LOGICAL.get(tensor.sk_state)
    return tensor.sk_inner.untyped_storage().nbytes() if nbytes is None else nbytes


#: storages whose size the program set with ``resize_`` below what their CPU memory holds. The
#: CPU memory never shrinks: a CPU kernel on a tensor past its storage's end would crash the process
#: (on CUDA it is an illegal address, a sticky error); the bytes freed hold poison instead.
_LOGICAL: "weakref.WeakKeyDictionary[StorageState, int]" = weakref.WeakKeyDictionary()


def resize_storage(tensor: Any, nbytes: int, site: Any) -> None:
    """``tensor.untyped_storage().resize_(nbytes)``, as ``resize_bytes_cuda``: to 0 the block is freed
    (no kernel); to any other size a new block is allocated on the current stream, and when the
    old block held bytes one copy kernel on the current stream reads them and writes the new block;
    the old block is freed at once (its free check and its allocation stream's pool, as
    ``resize_``)."""
    session = BACKEND.current or BACKEND.get()
    if tensor.sk_state.session is not session:
        _t.check_session(session, tensor)
    state = tensor.sk_state
    cpu = tensor.sk_inner.untyped_storage()
    old_nbytes = logical_nbytes(tensor)
    if nbytes == old_nbytes:
        return
    if session.capture is not None:
        raise _capture_error()
    if not session.eager:
        # Memory changes on the host at issue: what is queued on this storage runs first.
        _drain_users(session, state)
    stream = session.current_stream()
    meta = ((nbytes // tensor.element_size(),), tensor.dtype)
    grow = (lambda: cpu.resize_(nbytes)) if nbytes > cpu.nbytes() else (lambda: None)
    if nbytes == 0 or old_nbytes == 0 or not session.tracked:
        if nbytes == 0:
            _poison_bytes(cpu, old_nbytes)  # freed memory: a later read of it shows
        grow()
        if session.tracked:
            _allocator.reallocate(session, state, old_nbytes, stream, None, site, meta, 0, 0, False)
    else:
        block = MemoryRange(0, old_nbytes, state, tensor.shape, tensor.dtype)
        call = OpCall(session, _RESIZE, grow, site=site, stream=stream)
        call.accesses = [(block, READ)]
        call.launch()
        kernel = call.kernel
        _allocator.reallocate(session, state, old_nbytes, stream, kernel, site, meta, 0, nbytes, True)
        if nbytes < old_nbytes:
            _poison_bytes(cpu, old_nbytes, nbytes)
    state.nbytes = nbytes
    if nbytes == cpu.nbytes():
        _LOGICAL.pop(state, None)
    else:
        _LOGICAL[state] = nbytes


def _poison_bytes(cpu: torch.UntypedStorage, end: int, start: int = 0) -> None:
    if end > start:
        with torch.no_grad():
            torch.empty(0, dtype=torch.uint8).set_(cpu, start, (end - start,), (1,)).fill_(255)


def _drain_users(session: Any, state: StorageState) -> None:
    need: list[int] = []
    for records in (state.writes, state.reads):
        for r in records:
            if len(need) <= r.stream:
                need.extend([0] * (r.stream + 1 - len(need)))
            need[r.stream] = max(need[r.stream], r.seq)
    if need:
        session.drained(need)


def _capture_error() -> Exception:
    return GraphCaptureError(
        "UntypedStorage.resize_() while a graph is capturing: it allocates or frees device memory"
        " (cudaErrorStreamCaptureUnsupported for the copy's cudaMemcpyAsync from the free block)"
    )


def install(cls: type) -> None:
    """Give the fake tensor class its ``data`` property, ``set_`` and ``untyped_storage``."""
    cls.data = property(_data_get, _data_set, doc=_DATA.__doc__)
    cls.set_ = set_
    cls.untyped_storage = untyped_storage
    _t.SET = set_


install(_t.FakeDeviceTensor)
