"""Fake device tensors: a wrapper subclass around a CPU tensor, the device registration, and the
dispatch handlers that turn every op into a tracked kernel on the current stream.

The fake device is PyTorch's PrivateUse1 device renamed ``fake``; a Python fallback on that key sees
factory calls (``torch.zeros(n, device="fake")``) from any thread.
"""

from __future__ import annotations

import copy
import sys
import threading
from typing import Any

import torch

from ..._errors import BackendUnavailableError, DeviceIndexError, SessionClosedError
from . import _active, _aliases, _host_syncs, _pinned
from ._overlap import layout_of
from ._sites import capture_site
from ._tracking import METADATA_MUTATORS, READ, WRITE, OpPlan, StorageState, byte_range, new_record, plan_for

DEVICE_TYPE = "fake"
DEVICE: torch.device = torch.device("cpu")  # torch.device("fake", 0) once ensure_registered() ran
CPU = torch.device("cpu")
_make_wrapper = torch.Tensor._make_wrapper_subclass
_registered = False
_register_lock = threading.Lock()
_library: Any = None
_aten_library: Any = None
_cpu_library: Any = None

# Ops whose output size depends on the data: on CUDA they copy a size to the host and wait for it.
SYNCING_OPS = frozenset(
    {"nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive", "bincount",
     "repeat_interleave", "nonzero_static_"}
)
_HOST_SCALAR_TYPES = ("bool", "Scalar", "int", "float", "number", "SymInt", "SymBool", "SymFloat")
# Ops that answer from metadata alone: no kernel, no host sync.
_METADATA_QUERIES = frozenset(
    {"_has_compatible_shallow_copy_type", "is_same_size", "is_coalesced", "is_complex", "is_floating_point",
     "is_conj", "is_neg", "is_set_to", "is_pinned", "_is_zerotensor", "is_signed", "is_inference",
     "is_contiguous", "is_strides_like_format", "is_non_overlapping_and_dense", "dim", "sym_numel",
     "sym_size", "sym_stride", "sym_storage_offset", "size", "stride", "numel"}
)
# Allocation-only factories: they write nothing (the memory holds garbage, as on a device).
_ALLOCATIONS = frozenset({"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like"})

# (thread id, list): the fast path is watching what one call of that thread dispatches (see observing())
_observer: tuple[int, list] | None = None


def ensure_registered() -> None:
    """Claim PyTorch's PrivateUse1 device as ``fake`` (once per process)."""
    global _registered, _library
    if _registered:
        return
    with _register_lock:
        if _registered:
            return
        name = torch._C._get_privateuse1_backend_name()
        if name not in ("privateuseone", DEVICE_TYPE):
            raise BackendUnavailableError(
                f"fake backend unavailable: it needs PyTorch's PrivateUse1 device, which {name!r} already"
                f" uses in this process (run fake-backend checks in a process that doesn't import {name}'s extension)"
            )
        if name == "privateuseone":
            torch.utils.backend_registration._setup_privateuseone_for_python_backend(rename=DEVICE_TYPE)
        global DEVICE
        DEVICE = torch.device(DEVICE_TYPE, 0)
        _library = torch.library.Library("_", "IMPL", "PrivateUse1")
        _library.fallback(_factory_fallback)
        # torch.tensor(data, device="fake") copies into a fake tensor with Python dispatch turned off:
        # only a kernel registered for copy_ itself is reached then (the fallback trips an assert).
        global _aten_library
        _aten_library = torch.library.Library("aten", "IMPL", "PrivateUse1")
        _aten_library.impl("copy_", _copy_kernel)
        # pin_memory() of a host tensor, for the fake device (PyTorch asks the PrivateUse1 hooks for a
        # pinned allocator, which a Python backend can't provide): a pinned copy
        global _cpu_library
        _cpu_library = torch.library.Library("aten", "IMPL", "CPU")
        _cpu_library.impl("_pin_memory", _pin_memory_kernel)
        _registered = True


def _poison(result: Any) -> None:
    from ._deferred import poison

    for t in result if isinstance(result, (list, tuple)) else (result,):
        if isinstance(t, torch.Tensor):
            poison(t)


def _pin_memory_kernel(tensor: torch.Tensor, device: Any = None) -> torch.Tensor:
    return _pinned.pinned_copy(tensor)


def _session() -> Any:
    return _active.current or _active.get()


class observing:
    """Inside the block, every kernel the calling thread issues through dispatch is appended to
    ``observed`` as ``(plan, args, kwargs, out)`` (how the fast path learns what a call does)."""

    def __init__(self, observed: list) -> None:
        self._observed = observed

    def __enter__(self) -> None:
        global _observer
        _observer = (threading.get_ident(), self._observed)

    def __exit__(self, *exc: Any) -> None:
        global _observer
        _observer = None


class FakeDeviceTensor(torch.Tensor):
    """A tensor on the fake device: metadata of its own, values in a CPU tensor (``_inner``).

    Every op on it is a kernel on the current stream of the session that made it.
    """

    # The CPU tensor with the values, the storage's access table, and the byte range in it.
    # (Slots: set on every new wrapper and read on every access; instances keep a __dict__ too.)
    __slots__ = ("_inner", "_st", "_lo", "_hi")

    # __torch_function__ and the fast method stand-ins are installed by _fastpath (install_methods)

    #: a view with gaps between its elements: its layout (_overlap.layout_of), set per instance
    _layout = None

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        plan = plan_for(func)
        handler = plan.handler
        if handler is None:
            handler = plan.handler = _choose_handler(plan)
        return handler(plan, args, kwargs or {})

    # host reads that don't go through an aten op on the wrapper
    def tolist(self) -> Any:
        return self.cpu().tolist()

    def numpy(self, *, force: bool = False) -> Any:
        raise TypeError(
            f"can't convert {self.device} device type tensor to numpy. Use Tensor.cpu() to copy the tensor"
            " to host memory first."
        )

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        text = repr(self.cpu())
        device = f"device='{self.device}'"
        if ", dtype=" in text:
            return text.replace(", dtype=", f", {device}, dtype=", 1)
        return text[:-1] + f", {device})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        if self.dim() == 0 and spec:
            return self.item().__format__(spec)
        return repr(self)

    def __reduce_ex__(self, protocol: int) -> Any:
        raise TypeError("fake-device tensors can't be pickled; call .cpu() first")

    def __deepcopy__(self, memo: dict) -> "FakeDeviceTensor":
        """``copy.deepcopy``: as on CUDA, a copy of the whole storage (memoized per storage, so views
        copied together share the copy) made by one device copy kernel on the current stream that
        reads the source; ``requires_grad``, ``.grad`` and ``__dict__`` are copied."""
        if not self.is_leaf:
            raise RuntimeError(
                "Only Tensors created explicitly by the user (graph leaves) support the deepcopy protocol at the moment."
            )
        if id(self) in memo:
            return memo[id(self)]
        with torch.no_grad():
            storages = memo.setdefault("streamkit.fake", {})
            copied = storages.get(id(self._st))
            if copied is None:
                copied = storages[id(self._st)] = _copy_storage(self)
                memo.setdefault("streamkit.fake.keep", []).append(self._st)  # (ids stay unique while memo lives)
            inner = self._inner
            view = torch.empty(0, dtype=inner.dtype).set_(
                copied._inner.untyped_storage(), inner.storage_offset(), inner.size(), inner.stride()
            )
            new = _new_wrapper(view, copied._st)
            if self.requires_grad:
                new.requires_grad_()
            if self.grad is not None:
                new.grad = copy.deepcopy(self.grad, memo)
            new.__dict__ = copy.deepcopy(self.__dict__, memo)
        memo[id(self)] = new
        return new

    def data_ptr(self) -> int:
        """The address of this tensor's first element: distinct per live storage, stable, offset by
        the view's storage offset (as on CUDA); 0 when empty. (It is the CPU memory holding the values.)"""
        return self._inner.data_ptr()

    def record_stream(self, stream: Any) -> None:
        """``Tensor.record_stream``: the same as ``streamkit.record_stream(self, stream)``."""
        from ..._api import Stream, record_stream

        if not isinstance(stream, Stream):
            raise TypeError(
                f"Tensor.record_stream(stream): a fake-device tensor takes a streamkit.Stream, got"
                f" {type(stream).__module__}.{type(stream).__qualname__} (use sk.Stream() / sk.current_stream())"
            )
        record_stream(self, stream)


_pinned.DEVICE_TENSOR = FakeDeviceTensor


def _copy_storage(tensor: FakeDeviceTensor) -> FakeDeviceTensor:
    """A copy of ``tensor``'s whole storage (as bytes): one clone kernel on the current stream."""
    inner = tensor._inner
    nbytes = inner.untyped_storage().nbytes()
    whole = _new_wrapper(torch.empty(0, dtype=torch.uint8).set_(inner.untyped_storage(), 0, (nbytes,), (1,)), tensor._st)
    return whole.clone()


def _check_index(device: Any, where: Any) -> None:
    """Refuse a fake device index other than 0 (CUDA: "invalid device ordinal")."""
    if type(device) is not torch.device:
        if isinstance(device, int) and not isinstance(device, bool):
            device = torch.device(DEVICE_TYPE, device)
        else:
            device = torch.device(device)
    if device.type == DEVICE_TYPE and device.index not in (None, 0):
        raise DeviceIndexError(
            f"{where}: device={str(device)!r}: the fake backend has one device, fake:0 (CUDA would raise"
            " 'invalid device ordinal'); use device='fake' or sk.device(), and one process per rank for"
            " multi-device tests"
        )


def _new_wrapper(inner: torch.Tensor, state: StorageState) -> FakeDeviceTensor:
    if inner.dim() == 1 and inner.stride() == (1,) and not inner.storage_offset():
        # the common case, cheaper: passing strides and offset costs more than the rest of the call
        out = _make_wrapper(FakeDeviceTensor, inner.shape, dtype=inner.dtype, device=DEVICE)
        out._lo = 0
        out._hi = inner.nbytes
    else:
        out = _make_wrapper(
            FakeDeviceTensor, inner.size(), strides=inner.stride(), storage_offset=inner.storage_offset(),
            dtype=inner.dtype, device=DEVICE,
        )
        out._lo, out._hi = byte_range(inner)
        layout = layout_of(inner)
        if layout is not None:
            out._layout = layout  # (exact overlap: _overlap)
    out._inner = inner
    out._st = state
    return out


def wrap_fresh(session: Any, inner: torch.Tensor, stream: Any, kernel: Any, site: Any) -> FakeDeviceTensor:
    """A tensor in new memory, allocated on ``stream``; ``kernel`` (if any) wrote it."""
    shape = inner.shape
    dtype = inner.dtype
    state = StorageState(session, inner.untyped_storage().nbytes(), stream, site, (shape, dtype))
    capture = session._capture
    if capture is not None and capture.owns(stream):  # memory of a graph's private pool
        out = _new_wrapper(inner, state)
        capture.adopt(out, kernel)
        return out
    if not inner.storage_offset() and inner.dim() == 1 and inner.stride() == (1,):
        # _new_wrapper's common case, inline (a fresh output of a hot op)
        out = _make_wrapper(FakeDeviceTensor, shape, dtype=dtype, device=DEVICE)
        out._lo = 0
        out._hi = inner.nbytes
        out._inner = inner
        out._st = state
    else:
        out = _new_wrapper(inner, state)
    if kernel is not None:
        if session._tracked and out._hi > out._lo:
            state.writes.append(new_record((out._lo, out._hi, stream.idx, kernel.seq, kernel)))
    elif stream.freed and session._tracked:
        # no kernel writes it (empty, empty_like...): it may be a block its stream freed earlier
        session._recycle(state, stream, out)
    if not session._eager:
        state.mem = out._inner.untyped_storage()  # (a recycled block's memory, once this one is freed)
    return out


def peek(tensor: torch.Tensor) -> torch.Tensor:
    """The CPU tensor holding a fake-device tensor's values, read without a device operation.

    For validators that must not add host syncs; it bypasses race detection.
    """
    if type(tensor) is not FakeDeviceTensor:
        raise TypeError(f"peek(tensor): expected a fake-device tensor, got a tensor on {getattr(tensor, 'device', None)}")
    session = tensor._st.session or _active.current
    if session is not None and not session._eager and not session.closed:
        session._scheduler.drain_all()  # (a deferred schedule: what is queued runs first)
    return tensor._inner


# ---------------------------------------------------------------------------------------------
# argument unwrapping


def _mixed(plan: OpPlan, t: torch.Tensor) -> None:
    raise RuntimeError(
        f"Expected all tensors to be on the same device, but found at least two devices, {DEVICE} and {t.device}!"
        f" (in {plan.op}; move the CPU tensor with .to(sk.device()) first)"
    )


def _check_session(session: Any, t: FakeDeviceTensor) -> None:
    owner = t._st.session
    if owner is not None and owner is not session:
        if owner.closed:
            raise SessionClosedError(f"this tensor belongs to a fake session that has ended ({owner!r})")
        raise SessionClosedError(f"this tensor belongs to another fake session ({owner!r}), not the active {session!r}")


def _unwrap_value(plan: OpPlan, value: Any, kind: int, accesses: list, session: Any) -> Any:
    tp = type(value)
    if tp is FakeDeviceTensor:
        if value._st.session is not session:
            _check_session(session, value)
        if kind:
            accesses.append((value, kind))
        return value._inner
    if tp is list or tp is tuple:
        if not value:
            return value
        out = [_unwrap_value(plan, v, kind, accesses, session) for v in value]
        return out if tp is list else tuple(out)
    if isinstance(value, torch.Tensor) and value.dim() != 0 and not plan.allows_cpu and not plan.is_collective:
        _mixed(plan, value)
    if not session._eager and isinstance(value, torch.Tensor) and not plan.is_collective:
        # a host operand (a 0-dim scalar, an index): CUDA reads it at the call (a scalar argument,
        # a blocking copy of the index); a deferred kernel must not see later host writes to it
        return value.clone()
    return value


def _unwrap(plan: OpPlan, args: Any, kwargs: dict, session: Any) -> tuple[list, dict, list]:
    accesses: list = []
    kinds = plan.arg_kinds
    nk = len(kinds)
    new_args = list(args)
    for i, a in enumerate(args):
        tp = type(a)
        if tp is FakeDeviceTensor:
            if a._st.session is not session:
                _check_session(session, a)
            k = kinds[i] if i < nk else READ
            if k:
                accesses.append((a, k))
            new_args[i] = a._inner
        elif tp is list or tp is tuple or isinstance(a, torch.Tensor):
            new_args[i] = _unwrap_value(plan, a, kinds[i] if i < nk else READ, accesses, session)
    if kwargs:
        kw_kinds = plan.kw_kinds
        kwargs = {k: _unwrap_value(plan, v, kw_kinds.get(k, READ), accesses, session) for k, v in kwargs.items()}
    return new_args, kwargs, accesses


def _arg(plan: OpPlan, args: Any, kwargs: dict, index: int) -> Any:
    if index < len(args):
        return args[index]
    return kwargs[plan.op._schema.arguments[index].name]


# ---------------------------------------------------------------------------------------------
# handlers


def _choose_handler(plan: OpPlan) -> Any:
    name = plan.name
    if name not in _METADATA_QUERIES and torch._C._dispatch_has_kernel_for_dispatch_key(
        plan.op.name(), "CompositeImplicitAutograd"
    ):
        # Only tensors without autograd keys (inference tensors) reach a composite op here: for the
        # rest PyTorch decomposes it before Python dispatch. Decompose it the same way, so that
        # x.to("cpu") under inference_mode is the _to_copy it is otherwise (not an alias of x).
        return _decomposed
    return _choose_direct_handler(plan)


def _decomposed(plan: OpPlan, args: Any, kwargs: dict) -> Any:
    """A CompositeImplicitAutograd op: run its decomposition (its ops come back through dispatch)."""
    out = plan.op.decompose(*args, **kwargs)
    if out is NotImplemented:  # (no composite kernel after all: handle it directly from now on)
        plan.handler = _choose_direct_handler(plan)
        return plan.handler(plan, args, kwargs)
    return out


def _choose_direct_handler(plan: OpPlan) -> Any:
    name = plan.name
    split = _host_syncs.handler_for(plan, sys.modules[__name__])  # ops that sync the host partway (nonzero, x[mask])
    if split is not None:
        return split
    if name in _aliases.MAYBE_ALIASES and plan.outputs == [("fresh", None)]:
        return _aliases.maybe_alias_handler(sys.modules[__name__])  # dequantize, lift: may return self
    if name in SYNCING_OPS:
        plan.host_sync = "implicit_syncs"
    elif plan.outputs and str(plan.op._schema.returns[0].type) in _HOST_SCALAR_TYPES:
        plan.host_sync = "blocking_copies"  # .item(), torch.equal(): the host reads the result
    if name in METADATA_MUTATORS or name in ("resize_", "set_"):
        return _metadata_mutator
    if plan.is_view or name in _METADATA_QUERIES:
        return _view
    if name in _ALLOCATIONS:
        return _allocation
    if name == "_to_copy":
        return _to_copy
    if name == "copy_":
        return _copy
    if plan.is_collective:
        return _collective
    return _kernel


def _kernel(plan: OpPlan, args: Any, kwargs: dict) -> Any:
    """Any op: one kernel on the current stream reading and writing what its schema says."""
    session = _active.current or _active.get()
    new_args, new_kwargs, accesses = _unwrap(plan, args, kwargs, session)
    stream = session._current_stream()
    site = capture_site(sys._getframe(2)) if session._tracked else None
    kernel, result = session._launch(plan.op, plan.call, stream, site, new_args, new_kwargs, accesses, plan.host_sync)
    out = args[0] if plan.returns_self else _wrap_outputs(plan, result, args, kwargs, session, stream, kernel, site)
    observer = _observer
    if observer is not None and observer[0] == threading.get_ident():
        observer[1].append((plan, args, kwargs, out))
    return out


def _wrap_outputs(plan: OpPlan, result: Any, args: Any, kwargs: dict, session: Any, stream: Any, kernel: Any, site: Any) -> Any:
    outputs = plan.outputs
    if len(outputs) == 1:
        return _wrap_one(plan, outputs[0], result, args, kwargs, session, stream, kernel, site)
    if not outputs:
        return result
    return tuple(
        _wrap_one(plan, spec, value, args, kwargs, session, stream, kernel, site) for spec, value in zip(outputs, result)
    )


def _wrap_one(plan: OpPlan, spec: tuple, value: Any, args: Any, kwargs: dict, session: Any, stream: Any, kernel: Any, site: Any) -> Any:
    kind, index = spec
    if kind == "arg":
        original = _arg(plan, args, kwargs, index)
        if type(original) is FakeDeviceTensor and original._inner.shape != original.shape:
            # an out= argument the op resized (factories such as arange fill an empty one)
            state = original._st
            old_nbytes = state.nbytes
            _refresh(original)
            if kernel is not None and session._tracked and original._hi > original._lo:
                if original._inner.untyped_storage().nbytes() > old_nbytes:
                    # it grew: resize_output allocated a new block on the current stream (and
                    # freed the old one) before the kernel ran
                    meta = (tuple(original.shape), original.dtype)
                    _reallocate(session, state, old_nbytes, stream, kernel, site, meta, original._lo, original._hi, False)
                else:
                    state.writes.append(new_record((original._lo, original._hi, stream.idx, kernel.seq, kernel)))
        return original
    if type(value) is torch.Tensor:
        if kind == "view":
            return _new_wrapper(value, _arg(plan, args, kwargs, index)._st)
        return wrap_fresh(session, value, stream, kernel, site)
    if type(value) is list or type(value) is tuple:
        return type(value)(_wrap_one(plan, spec, v, args, kwargs, session, stream, kernel, site) for v in value)
    return value


def _view(plan: OpPlan, args: Any, kwargs: dict) -> Any:
    """A view (new metadata over the same memory) or a metadata query: not a kernel, not an access."""
    session = _session()
    new_args, new_kwargs, _ = _unwrap(plan, args, kwargs, session)
    result = plan.op._op(*new_args, **new_kwargs)
    if _inference_enabled() and _normal_tensors(result):
        # A view of a normal tensor is a normal tensor even in inference mode (autograd gives it
        # the base's version counter): its wrapper must not be made as an inference tensor.
        with _InferenceMode(False):
            return _wrap_outputs(plan, result, args, kwargs, session, None, None, None)
    return _wrap_outputs(plan, result, args, kwargs, session, None, None, None)


_inference_enabled = torch.is_inference_mode_enabled
_InferenceMode = torch._C._InferenceMode


def _normal_tensors(result: Any) -> bool:
    if isinstance(result, torch.Tensor):
        return not result.is_inference()
    if type(result) is list or type(result) is tuple:
        return bool(result) and all(isinstance(r, torch.Tensor) and not r.is_inference() for r in result)
    return False


def _refresh(tensor: FakeDeviceTensor) -> None:
    """Make the wrapper's own sizes/strides follow its CPU tensor after an in-place change."""
    inner = tensor._inner
    tensor.data = _new_wrapper(inner, tensor._st)
    tensor._lo, tensor._hi = byte_range(inner)
    tensor._layout = layout_of(inner)
    tensor._st.nbytes = max(tensor._st.nbytes, inner.untyped_storage().nbytes())


class _Block:
    """Bytes ``[_lo, _hi)`` of a storage, as the detector sees an access (``resize_`` copies a whole block)."""

    __slots__ = ("_lo", "_hi", "_st", "shape", "dtype")
    _layout = None  # (dense)

    def __init__(self, lo: int, hi: int, state: StorageState, shape: Any, dtype: torch.dtype) -> None:
        self._lo, self._hi, self._st, self.shape, self.dtype = lo, hi, state, shape, dtype


def _reallocate(
    session: Any, state: StorageState, old_nbytes: int, stream: Any, kernel: Any, site: Any, meta: Any,
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


def _resize(plan: OpPlan, self: FakeDeviceTensor, new_args: list, new_kwargs: dict, session: Any) -> FakeDeviceTensor:
    """``x.resize_(size)``: past the storage's size it allocates a new block on the current stream and
    copies the old bytes into it (one kernel that reads the old block and writes the new one, as
    CUDA's ``resize_bytes_cuda``); otherwise only metadata changes."""
    inner = self._inner
    size = new_args[1] if len(new_args) > 1 else new_kwargs["size"]
    numel = 1
    for n in size:
        numel *= int(n)
    needed = (inner.storage_offset() + numel) * inner.element_size() if numel else 0
    state = self._st
    old_nbytes = inner.untyped_storage().nbytes()
    if not session._tracked or needed <= old_nbytes:
        plan.op._op(*new_args, **new_kwargs)
        _refresh(self)
        return self
    stream = session._current_stream()
    site = capture_site(sys._getframe(3))
    accesses = [(_Block(0, old_nbytes, state, self.shape, self.dtype), READ)] if old_nbytes else []
    kernel, _ = session._launch(plan.op, plan.call, stream, site, new_args, new_kwargs, accesses)
    new_nbytes = inner.untyped_storage().nbytes()
    _reallocate(session, state, old_nbytes, stream, kernel, site, (tuple(int(n) for n in size), self.dtype), 0, new_nbytes, True)
    _refresh(self)
    return self


def _allocation(plan: OpPlan, args: Any, kwargs: dict) -> Any:
    """``empty_like(x)``, ``x.new_empty(...)``: new memory on the current stream. Not a kernel, and it
    reads nothing of ``x`` (only its metadata)."""
    session = _session()
    new_args, new_kwargs, _ = _unwrap(plan, args, kwargs, session)
    if new_kwargs.get("device") is not None:
        _check_index(new_kwargs["device"], plan.op)
        new_kwargs["device"] = CPU
    stream = session._current_stream()
    site = capture_site(sys._getframe(2)) if session._tracked else None
    result = plan.call(*new_args, **new_kwargs)
    if not session._eager:
        _poison(result)  # (a deferred schedule: memory nothing wrote holds poison)
    return _wrap_outputs(plan, result, args, kwargs, session, stream, None, site)


def _metadata_mutator(plan: OpPlan, args: Any, kwargs: dict) -> Any:
    """``t_()``, ``unsqueeze_()``, ``resize_()``...: new metadata for the same tensor, not a kernel."""
    self = args[0]
    session = _session()
    if self._st.session is not session:
        _check_session(session, self)
    if plan.name == "set_":
        return SET(*args, **kwargs)  # (aten.set_ called directly; Tensor.set_ is _rebind's)
    new_args, new_kwargs, _ = _unwrap(plan, args, kwargs, session)
    if plan.name == "resize_as_":  # CUDA: resize_as_ is resize_ to the template's sizes (Resize.cpp)
        plan, new_args = _RESIZE_PLAN, [new_args[0], list(new_args[1].shape)]
    if plan.name == "resize_":
        return _resize(plan, self, new_args, new_kwargs, session)
    plan.op._op(*new_args, **new_kwargs)
    _refresh(self)
    return self


def _to_copy(plan: OpPlan, args: Any, kwargs: dict) -> Any:
    """``.to(...)``/``.cpu()``: to the host it is a D2H copy on the current stream (blocking unless
    ``non_blocking=True``); otherwise an ordinary kernel."""
    device = kwargs.get("device")
    if device is not None:
        _check_index(device, plan.op)
    if device is None or torch.device(device).type != "cpu":
        return _kernel(plan, args, kwargs)
    session = _session()
    new_args, new_kwargs, accesses = _unwrap(plan, args, kwargs, session)
    stream = session._current_stream()
    site = capture_site(sys._getframe(2)) if session._tracked else None
    non_blocking = kwargs.get("non_blocking", False)
    kernel, result = session._launch(plan.op, plan.call, stream, site, new_args, new_kwargs, accesses, None if non_blocking else "blocking_copies")
    if non_blocking:
        # CUDA's _to_copy pins the destination of a non-blocking D2H copy: the copy fills it later
        return _pinned.written_by(result, session, kernel)
    return result


def _copy(plan: OpPlan, args: Any, kwargs: dict) -> Any:
    """``dst.copy_(src)``: H2D or D2H when one side is on the host (blocking unless
    ``non_blocking=True``), else a device kernel."""
    dst, src = args[0], args[1]
    non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
    dst_fake = type(dst) is FakeDeviceTensor
    src_fake = type(src) is FakeDeviceTensor
    if dst_fake and src_fake:
        return _kernel(plan, args, kwargs)
    session = _session()
    stream = session._current_stream()
    site = capture_site(sys._getframe(2)) if session._tracked else None
    device_side = dst if dst_fake else src
    if device_side._st.session is not session:
        _check_session(session, device_side)
    pinned = _pinned.PinnedHostTensor
    if dst_fake:  # host to device: the copy writes dst
        accesses = [(dst, WRITE)]
        if non_blocking and not session._eager and type(src) is not pinned:
            src = src.clone()  # pageable memory is staged at issue: later host writes don't reach the copy
        new_args = [dst._inner, src, non_blocking]
        sync = None if non_blocking else "blocking_copies"
    else:  # device to host: the copy reads src
        accesses = [(src, READ)]
        new_args = [dst, src._inner, non_blocking]
        # into pageable memory a non-blocking D2H copy is synchronous all the same (cudaMemcpyAsync)
        sync = None if non_blocking and type(dst) is pinned else "blocking_copies"
    kernel, _ = session._launch(plan.op, plan.call, stream, site, new_args, {}, accesses, sync)
    if non_blocking:
        if not dst_fake and type(dst) is pinned:
            _pinned.written_by(dst, session, kernel)
        elif dst_fake and type(src) is pinned:
            _pinned.read_by(src, session, kernel)  # DMA from the pinned buffer, later
    return dst


def _copy_kernel(dst: Any, src: Any, non_blocking: bool = False) -> Any:
    """``copy_`` reached below Python dispatch (``torch.tensor(data, device="fake")``)."""
    return _copy(plan_for(torch.ops.aten.copy_.default), (dst, src, non_blocking), {})


def _collective(plan: OpPlan, args: Any, kwargs: dict) -> Any:
    """A c10d collective: a kernel reading its inputs and writing its output, on the current stream
    (``async_op=False``) or on its process group's stream (``async_op=True``; see _collectives).

    Under the eager scheduler it completes at issue (its work is waited for), so a failing peer
    raises here.
    """
    from . import _collectives  # (imported on first use: only collectives need it)

    session = _session()
    new_args, new_kwargs, accesses = _unwrap(plan, args, kwargs, session)
    site = capture_site(sys._getframe(2)) if session._tracked else None
    capture = session._capture
    result = None if capture is None else capture.collective(plan, args, kwargs, new_args, new_kwargs, accesses, site)
    if result is None:
        result = _collectives.run(session, plan, args, kwargs, new_args, new_kwargs, accesses, site)
    if isinstance(result, tuple) and result and plan.arg_kinds and plan.arg_kinds[0] == WRITE:
        # The first result is the output argument itself: hand back the caller's fake tensors.
        return (args[0] if args else kwargs[plan.op._schema.arguments[0].name],) + tuple(result[1:])
    return result


def _factory_fallback(op: Any, *args: Any, **kwargs: Any) -> Any:
    """Ops that reach the fake device with no fake tensor argument: factories (``torch.zeros(...,
    device="fake")``). An allocation on the current stream, plus a kernel if it fills memory."""
    session = _session()
    if kwargs.get("device") is not None:
        _check_index(kwargs["device"], op)
        kwargs["device"] = CPU
    for a in args:
        if isinstance(a, torch.Tensor) and a.device.type != "cpu":
            raise RuntimeError(f"{op}: unexpected argument on {a.device} for the fake device")
    plan = plan_for(op)
    stream = session._current_stream()
    site = capture_site(sys._getframe(1)) if session._tracked else None
    if plan.name in _ALLOCATIONS:
        result = op._op(*args, **kwargs)
        if not session._eager:
            _poison(result)  # (a deferred schedule: memory nothing wrote holds poison)
        return _wrap_outputs(plan, result, args, kwargs, session, stream, None, site)
    kernel, result = session._launch(op, op._op, stream, site, list(args), kwargs, [])
    return _wrap_outputs(plan, result, args, kwargs, session, stream, kernel, site)


#: ``Tensor.set_`` of a fake tensor (installed by _rebind with ``x.data = y`` and ``untyped_storage()``)
SET: Any = None
_RESIZE_PLAN = plan_for(torch.ops.aten.resize_.default)
