"""Fake device tensors: a wrapper subclass around a CPU tensor, the device registration, and the
dispatch handlers that turn every op into a tracked kernel on the current stream.

The fake device is PyTorch's PrivateUse1 device renamed ``fake``; a Python fallback on that key sees
factory calls (``torch.zeros(n, device="fake")``) from any thread.
"""

from __future__ import annotations

import copy
import sys
import threading
from typing import TYPE_CHECKING, Any

import torch

from ..._errors import BackendMismatchError, BackendUnavailableError, DeviceIndexError, SessionClosedError
from . import _aliases, _allocator, _host_syncs, _pinned
from ._allocator import StorageState
from ._deferred import poison
from ._fake_backend import BACKEND
from ._overlap import layout_of
from ._pipeline import OpCall
from ._tracking import METADATA_MUTATORS, READ, WRITE, MemoryRange, OpPlan, byte_range, new_record, plan_for

if TYPE_CHECKING:
    from ._interface import Engine

DEVICE_TYPE = "fake"  # the fake device's name: PrivateUse1's, "fake" (or "npu" in a process emulating npu)
DEVICE: torch.device = torch.device("cpu")  # torch.device(DEVICE_TYPE, 0) once ensure_registered() ran
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


def ensure_registered(name: str = "fake") -> None:
    """Claim PyTorch's PrivateUse1 device as the fake device, named ``name`` (``"fake"``, or ``"npu"``
    for npu emulation), once per process; raise :class:`BackendUnavailableError` saying why when
    PrivateUse1 has another name (another extension, or streamkit's other name) in this process."""
    global _registered, _library, DEVICE_TYPE
    if _registered and name == DEVICE_TYPE:
        return
    with _register_lock:
        if _registered and name == DEVICE_TYPE:
            return
        current = torch._C._get_privateuse1_backend_name()
        if _registered or current not in ("privateuseone", name):
            if _registered:
                why = f"this process named it {current!r} (streamkit's {current} device; PyTorch names it once per process)"
            else:
                why = f"{current!r} already uses it in this process (another extension renamed it)"
            raise BackendUnavailableError(
                f"fake backend unavailable as {name!r}: it needs PyTorch's PrivateUse1 device, but {why}; run"
                f" {'fake-backend checks' if name == 'fake' else 'npu-emulated code'} in a process of its own"
                + ("" if _registered else f" that doesn't import {current}'s extension")
            )
        if current == "privateuseone":
            torch.utils.backend_registration._setup_privateuseone_for_python_backend(rename=name)
        global DEVICE
        DEVICE_TYPE = _pinned.DEVICE_TYPE = name  # (pinned memory tells device-side copies by it)
        DEVICE = BACKEND.torch_device = torch.device(name, 0)
        _library = torch.library.Library("_", "IMPL", "PrivateUse1")
        _library.fallback(factory_fallback)
        # torch.tensor(data, device="fake") copies into a fake tensor with Python dispatch turned off:
        # only a kernel registered for copy_ itself is reached then (the fallback trips an assert).
        global _aten_library
        _aten_library = torch.library.Library("aten", "IMPL", "PrivateUse1")
        _aten_library.impl("copy_", _copy_kernel)
        _registered = True


_open_sessions = 0


def session_opened() -> None:
    """A fake session opened: pin_memory() of a host tensor makes a pinned copy the fake device
    models, while any session is open (PyTorch asks the PrivateUse1 hooks for a pinned allocator,
    which a Python backend can't provide). Outside sessions the CPU kernel is PyTorch's again."""
    global _open_sessions, _cpu_library
    with _register_lock:
        _open_sessions += 1
        if _cpu_library is None:
            _cpu_library = torch.library.Library("aten", "IMPL", "CPU")
            _cpu_library.impl("_pin_memory", _pin_memory_kernel)


def session_closed() -> None:
    """A fake session ended: the last one gives ``_pin_memory``'s CPU kernel back to PyTorch."""
    global _open_sessions, _cpu_library
    with _register_lock:
        _open_sessions = max(0, _open_sessions - 1)
        if _open_sessions == 0 and _cpu_library is not None:
            _cpu_library._destroy()
            _cpu_library = None


def _poison(result: Any) -> None:
    for t in result if isinstance(result, (list, tuple)) else (result,):
        if isinstance(t, torch.Tensor):
            poison(t)


def _pin_memory_kernel(tensor: torch.Tensor, device: Any = None) -> torch.Tensor:
    return _pinned.pinned_copy(tensor)


def _session() -> Any:
    return BACKEND.current or BACKEND.get()


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
    __slots__ = ("sk_inner", "sk_state", "sk_lo", "sk_hi")

    # __torch_function__ and the fast method stand-ins are installed by _fastpath (install_methods)

    #: a view with gaps between its elements: its layout (_overlap.layout_of), set per instance
    sk_layout = None

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        plan = plan_for(func)
        handler = plan.handler
        if handler is None:
            handler = plan.handler = _choose_handler(plan)
        return handler(plan, args, kwargs or {}, _getframe(1))  # (the issue site starts at the op's caller)

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
            copied = storages.get(id(self.sk_state))
            if copied is None:
                copied = storages[id(self.sk_state)] = _copy_storage(self)
                memo.setdefault("streamkit.fake.keep", []).append(self.sk_state)  # (ids stay unique while memo lives)
            inner = self.sk_inner
            view = torch.empty(0, dtype=inner.dtype).set_(
                copied.sk_inner.untyped_storage(), inner.storage_offset(), inner.size(), inner.stride()
            )
            new = new_wrapper(view, copied.sk_state)
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
        return self.sk_inner.data_ptr()

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
    inner = tensor.sk_inner
    nbytes = inner.untyped_storage().nbytes()
    whole = new_wrapper(torch.empty(0, dtype=torch.uint8).set_(inner.untyped_storage(), 0, (nbytes,), (1,)), tensor.sk_state)
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
            f"{where}: device={str(device)!r}: the fake backend has one device, {DEVICE_TYPE}:0 (CUDA would raise"
            f" 'invalid device ordinal'); use device='{DEVICE_TYPE}' or sk.device(), and one process per rank for"
            " multi-device tests"
        )


def new_wrapper(inner: torch.Tensor, state: StorageState) -> FakeDeviceTensor:
    if inner.dim() == 1 and inner.stride() == (1,) and not inner.storage_offset():
        # the common case, cheaper: passing strides and offset costs more than the rest of the call
        out = _make_wrapper(FakeDeviceTensor, inner.shape, dtype=inner.dtype, device=DEVICE)
        out.sk_lo = 0
        out.sk_hi = inner.nbytes
    else:
        out = _make_wrapper(
            FakeDeviceTensor, inner.size(), strides=inner.stride(), storage_offset=inner.storage_offset(),
            dtype=inner.dtype, device=DEVICE,
        )
        out.sk_lo, out.sk_hi = byte_range(inner)
        layout = layout_of(inner)
        if layout is not None:
            out.sk_layout = layout  # (exact overlap: _overlap)
    out.sk_inner = inner
    out.sk_state = state
    return out


def wrap_fresh(session: "Engine", inner: torch.Tensor, stream: Any, kernel: Any, site: Any) -> FakeDeviceTensor:
    """A tensor in new memory, allocated on ``stream``; ``kernel`` (if any) wrote it."""
    shape = inner.shape
    dtype = inner.dtype
    state = StorageState(session, inner.untyped_storage().nbytes(), stream, site, (shape, dtype))
    out = new_wrapper(inner, state)
    capture = session.capture
    if capture is not None and capture.owns(stream):  # memory of a graph's private pool
        capture.adopt(out, kernel)
        return out
    if kernel is not None:
        if session.tracked and out.sk_hi > out.sk_lo:
            state.writes.append(new_record((out.sk_lo, out.sk_hi, stream.idx, kernel.seq, kernel)))
    elif stream.freed and session.tracked:
        # no kernel writes it (empty, empty_like...): it may be a block its stream freed earlier
        _allocator.recycle(session, state, stream, out)
    if not session.eager:
        state.mem = out.sk_inner.untyped_storage()  # (a recycled block's memory, once this one is freed)
        scheduler = session.scheduler
        if scheduler.busy is not None and kernel is not None and getattr(kernel, "held", None) is not None:
            scheduler.hold_output(kernel, state)  # (the kernel is still queued: it writes this when it runs)
    return out


def peek(tensor: torch.Tensor) -> torch.Tensor:
    """The CPU tensor holding a fake-device tensor's values, read without a device operation.

    For validators that must not add host syncs; it bypasses race detection.
    """
    if type(tensor) is not FakeDeviceTensor:
        got = f"a tensor on {tensor.device}" if isinstance(tensor, torch.Tensor) else f"{type(tensor).__name__} {tensor!r:.80}"
        raise TypeError(f"peek(tensor): expected a fake-device tensor (a torch.Tensor on sk.device()), got {got}")
    session = tensor.sk_state.session or BACKEND.current
    if session is not None and not session.eager and not session.closed:
        session.scheduler.drain_all()  # (a deferred schedule: what is queued runs first)
    return tensor.sk_inner


# ---------------------------------------------------------------------------------------------
# argument unwrapping


def _mixed(plan: OpPlan, t: torch.Tensor) -> None:
    raise RuntimeError(
        f"Expected all tensors to be on the same device, but found at least two devices, {DEVICE} and {t.device}!"
        f" (in {plan.op}; move the CPU tensor with .to(sk.device()) first)"
    )


def check_session(session: "Engine", t: FakeDeviceTensor) -> None:
    owner = t.sk_state.session
    if owner is not None and owner is not session:
        if owner.closed:
            raise SessionClosedError(f"this tensor belongs to a fake session that has ended ({owner!r})")
        raise SessionClosedError(f"this tensor belongs to another fake session ({owner!r}), not the active {session!r}")


def _unwrap_value(plan: OpPlan, value: Any, kind: int, accesses: list, session: "Engine") -> Any:
    tp = type(value)
    if tp is FakeDeviceTensor:
        if value.sk_state.session is not session:
            check_session(session, value)
        if kind:
            accesses.append((value, kind))
        return value.sk_inner
    if tp is list or tp is tuple:
        if not value:
            return value
        out = [_unwrap_value(plan, v, kind, accesses, session) for v in value]
        return out if tp is list else tuple(out)
    if isinstance(value, torch.Tensor) and value.dim() != 0 and not plan.allows_cpu and not plan.is_collective:
        _mixed(plan, value)
    if not session.eager and isinstance(value, torch.Tensor) and not plan.is_collective:
        # a host operand (a 0-dim scalar, an index): CUDA reads it at the call (a scalar argument,
        # a blocking copy of the index); a deferred kernel must not see later host writes to it
        return value.clone()
    return value


def _unwrap(plan: OpPlan, args: Any, kwargs: dict, session: "Engine") -> tuple[list, dict, list]:
    accesses: list = []
    kinds = plan.arg_kinds
    nk = len(kinds)
    new_args = list(args)
    for i, a in enumerate(args):
        tp = type(a)
        if tp is FakeDeviceTensor:
            if a.sk_state.session is not session:
                check_session(session, a)
            k = kinds[i] if i < nk else READ
            if k:
                accesses.append((a, k))
            new_args[i] = a.sk_inner
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


class DispatchCall(OpCall):
    """An op call that reached dispatch (:class:`._pipeline.OpCall` with the steps that know fake
    tensors): ``plan``'s op in the active session (or ``session``), on the current stream, issued at
    the site captured from ``frame``. :meth:`unwrap` turns the caller's arguments into CPU tensors
    and accesses (as the schema says), :meth:`launch` issues the kernel, :meth:`wrap` turns the
    results into fake tensors (fresh memory allocated on the stream, views, ``out=`` arguments)."""

    __slots__ = ("plan",)

    def __init__(self, plan: OpPlan, frame: Any, session: "Engine | None" = None) -> None:
        OpCall.__init__(self, session or BACKEND.current or BACKEND.get(), plan.op, plan.call, frame)
        self.plan = plan

    def unwrap(self, args: Any, kwargs: dict) -> None:
        """The caller's arguments, unwrapped: :attr:`args`, :attr:`kwargs` and :attr:`accesses`."""
        self.args, self.kwargs, self.accesses = _unwrap(self.plan, args, kwargs, self.session)

    def wrap(self, result: Any, args: Any, kwargs: dict) -> Any:
        """The op's ``result`` as the caller gets it (``args``/``kwargs``: the caller's arguments)."""
        return _wrap_outputs(self.plan, result, args, kwargs, self.session, self.stream, self.kernel, self.site)


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


def _decomposed(plan: OpPlan, args: Any, kwargs: dict, frame: Any) -> Any:
    """A CompositeImplicitAutograd op: run its decomposition (its ops come back through dispatch)."""
    out = plan.op.decompose(*args, **kwargs)
    if out is NotImplemented:  # (no composite kernel after all: handle it directly from now on)
        plan.handler = _choose_direct_handler(plan)
        return plan.handler(plan, args, kwargs, frame)
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
    return run_kernel


def run_kernel(plan: OpPlan, args: Any, kwargs: dict, frame: Any) -> Any:
    """Any op: one kernel on the current stream reading and writing what its schema says."""
    call = DispatchCall(plan, frame)
    call.unwrap(args, kwargs)
    result = call.launch(plan.host_sync)
    out = args[0] if plan.returns_self else call.wrap(result, args, kwargs)
    observed(plan, args, kwargs, out)
    return out


def observed(plan: OpPlan, args: Any, kwargs: dict, out: Any) -> None:
    """A dispatch handler ran ``plan``'s op on ``args``/``kwargs`` giving ``out``: the fast path
    learns what the call does from it when it is watching this thread (:class:`observing`)."""
    observer = _observer
    if observer is not None and observer[0] == threading.get_ident():
        observer[1].append((plan, args, kwargs, out))


def _wrap_outputs(plan: OpPlan, result: Any, args: Any, kwargs: dict, session: "Engine", stream: Any, kernel: Any, site: Any) -> Any:
    outputs = plan.outputs
    if len(outputs) == 1:
        return _wrap_one(plan, outputs[0], result, args, kwargs, session, stream, kernel, site)
    if not outputs:
        return result
    return tuple(
        _wrap_one(plan, spec, value, args, kwargs, session, stream, kernel, site) for spec, value in zip(outputs, result)
    )


def _wrap_one(plan: OpPlan, spec: tuple, value: Any, args: Any, kwargs: dict, session: "Engine", stream: Any, kernel: Any, site: Any) -> Any:
    kind, index = spec
    if kind == "arg":
        original = _arg(plan, args, kwargs, index)
        if type(original) is FakeDeviceTensor and original.sk_inner.shape != original.shape:
            # an out= argument the op resized (factories such as arange fill an empty one)
            state = original.sk_state
            old_nbytes = state.nbytes
            _refresh(original)
            if kernel is not None and session.tracked and original.sk_hi > original.sk_lo:
                if original.sk_inner.untyped_storage().nbytes() > old_nbytes:
                    # it grew: resize_output allocated a new block on the current stream (and
                    # freed the old one) before the kernel ran
                    meta = (tuple(original.shape), original.dtype)
                    _allocator.reallocate(session, state, old_nbytes, stream, kernel, site, meta, original.sk_lo, original.sk_hi, False)
                else:
                    state.writes.append(new_record((original.sk_lo, original.sk_hi, stream.idx, kernel.seq, kernel)))
        return original
    if type(value) is torch.Tensor:
        if kind == "view":
            return new_wrapper(value, _arg(plan, args, kwargs, index).sk_state)
        return wrap_fresh(session, value, stream, kernel, site)
    if type(value) is list or type(value) is tuple:
        return type(value)(_wrap_one(plan, spec, v, args, kwargs, session, stream, kernel, site) for v in value)
    return value


def _view(plan: OpPlan, args: Any, kwargs: dict, frame: Any) -> Any:
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


_getframe = sys._getframe
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
    inner = tensor.sk_inner
    tensor.data = new_wrapper(inner, tensor.sk_state)
    tensor.sk_lo, tensor.sk_hi = byte_range(inner)
    tensor.sk_layout = layout_of(inner)
    tensor.sk_state.nbytes = max(tensor.sk_state.nbytes, inner.untyped_storage().nbytes())


def _resize(plan: OpPlan, self: FakeDeviceTensor, new_args: list, new_kwargs: dict, session: "Engine", frame: Any) -> FakeDeviceTensor:
    """``x.resize_(size)``: past the storage's size it allocates a new block on the current stream and
    copies the old bytes into it (one kernel that reads the old block and writes the new one, as
    CUDA's ``resize_bytes_cuda``); otherwise only metadata changes."""
    inner = self.sk_inner
    size = new_args[1] if len(new_args) > 1 else new_kwargs["size"]
    numel = 1
    for n in size:
        numel *= int(n)
    needed = (inner.storage_offset() + numel) * inner.element_size() if numel else 0
    state = self.sk_state
    old_nbytes = inner.untyped_storage().nbytes()
    if not session.tracked or needed <= old_nbytes:
        plan.op._op(*new_args, **new_kwargs)
        _refresh(self)
        return self
    call = DispatchCall(plan, frame, session)
    call.args, call.kwargs = new_args, new_kwargs
    call.accesses = [(MemoryRange(0, old_nbytes, state, self.shape, self.dtype), READ)] if old_nbytes else []
    call.launch()
    new_nbytes = inner.untyped_storage().nbytes()
    meta = (tuple(int(n) for n in size), self.dtype)
    _allocator.reallocate(session, state, old_nbytes, call.stream, call.kernel, call.site, meta, 0, new_nbytes, True)
    _refresh(self)
    return self


def _allocation(plan: OpPlan, args: Any, kwargs: dict, frame: Any) -> Any:
    """``empty_like(x)``, ``x.new_empty(...)``: new memory on the current stream. Not a kernel, and it
    reads nothing of ``x`` (only its metadata)."""
    call = DispatchCall(plan, frame)
    call.unwrap(args, kwargs)
    new_kwargs = call.kwargs
    if new_kwargs.get("device") is not None:
        _check_index(new_kwargs["device"], plan.op)
        new_kwargs["device"] = CPU
    result = plan.call(*call.args, **new_kwargs)  # (not a kernel: nothing is launched)
    if not call.session.eager:
        _poison(result)  # (a deferred schedule: memory nothing wrote holds poison)
    return call.wrap(result, args, kwargs)


def _metadata_mutator(plan: OpPlan, args: Any, kwargs: dict, frame: Any) -> Any:
    """``t_()``, ``unsqueeze_()``, ``resize_()``...: new metadata for the same tensor, not a kernel."""
    self = args[0]
    session = _session()
    if self.sk_state.session is not session:
        check_session(session, self)
    if plan.name == "set_":
        return SET(*args, **kwargs)  # (aten.set_ called directly; Tensor.set_ is _rebind's)
    new_args, new_kwargs, _ = _unwrap(plan, args, kwargs, session)
    if plan.name == "resize_as_":  # CUDA: resize_as_ is resize_ to the template's sizes (Resize.cpp)
        plan, new_args = _RESIZE_PLAN, [new_args[0], list(new_args[1].shape)]
    if plan.name == "resize_":
        return _resize(plan, self, new_args, new_kwargs, session, frame)
    plan.op._op(*new_args, **new_kwargs)
    _refresh(self)
    return self


def _to_copy(plan: OpPlan, args: Any, kwargs: dict, frame: Any) -> Any:
    """``.to(...)``/``.cpu()``: to the host it is a D2H copy on the current stream (blocking unless
    ``non_blocking=True``); otherwise an ordinary kernel."""
    device = kwargs.get("device")
    if device is not None:
        _check_index(device, plan.op)
    if device is None or torch.device(device).type != "cpu":
        return run_kernel(plan, args, kwargs, frame)
    call = DispatchCall(plan, frame)
    call.unwrap(args, kwargs)
    non_blocking = kwargs.get("non_blocking", False)
    result = call.launch(None if non_blocking else "blocking_copies")
    if non_blocking:
        # CUDA's _to_copy pins the destination of a non-blocking D2H copy: the copy fills it later
        return _pinned.written_by(result, call)
    return result


def _copy(plan: OpPlan, args: Any, kwargs: dict, frame: Any) -> Any:
    """``dst.copy_(src)``: H2D or D2H when one side is on the host (blocking unless
    ``non_blocking=True``), else a device kernel."""
    dst, src = args[0], args[1]
    non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
    dst_fake = type(dst) is FakeDeviceTensor
    src_fake = type(src) is FakeDeviceTensor
    if dst_fake and src_fake:
        return run_kernel(plan, args, kwargs, frame)
    call = DispatchCall(plan, frame)
    session = call.session
    device_side = dst if dst_fake else src
    if device_side.sk_state.session is not session:
        check_session(session, device_side)
    pinned = _pinned.PinnedHostTensor
    if dst_fake:  # host to device: the copy writes dst
        call.accesses = [(dst, WRITE)]
        if non_blocking and not session.eager and type(src) is not pinned:
            src = src.clone()  # pageable memory is staged at issue: later host writes don't reach the copy
        call.args = [dst.sk_inner, src, non_blocking]
        sync = None if non_blocking else "blocking_copies"
    else:  # device to host: the copy reads src
        call.accesses = [(src, READ)]
        call.args = [dst, src.sk_inner, non_blocking]
        # into pageable memory a non-blocking D2H copy is synchronous all the same (cudaMemcpyAsync)
        sync = None if non_blocking and type(dst) is pinned else "blocking_copies"
    call.launch(sync)
    if non_blocking:
        if not dst_fake and type(dst) is pinned:
            _pinned.written_by(dst, call)
        elif dst_fake and type(src) is pinned:
            _pinned.read_by(src, call)  # DMA from the pinned buffer, later
    return dst


def _copy_kernel(dst: Any, src: Any, non_blocking: bool = False) -> Any:
    """``copy_`` reached below Python dispatch (``torch.tensor(data, device="fake")``)."""
    return _copy(plan_for(torch.ops.aten.copy_.default), (dst, src, non_blocking), {}, _getframe(1))


def _collective(plan: OpPlan, args: Any, kwargs: dict, frame: Any) -> Any:
    """A c10d collective: a kernel reading its inputs and writing its output, on the current stream
    (``async_op=False``) or on its process group's stream (``async_op=True``; see _collectives).

    Under the eager scheduler it completes at issue (its work is waited for), so a failing peer
    raises here.
    """
    from . import _collectives  # (imported on first use: only collectives need it)

    call = DispatchCall(plan, frame)
    call.unwrap(args, kwargs)
    capture = call.session.capture
    result = None if capture is None else capture.collective(plan, args, kwargs, call.args, call.kwargs, call.accesses, call.site)
    if result is None:
        result = _collectives.run(call, plan, args, kwargs)
    if isinstance(result, tuple) and result and plan.arg_kinds and plan.arg_kinds[0] == WRITE:
        # The first result is the output argument itself: hand back the caller's fake tensors.
        return (args[0] if args else kwargs[plan.op._schema.arguments[0].name],) + tuple(result[1:])
    return result


def factory_fallback(op: Any, *args: Any, **kwargs: Any) -> Any:
    """Ops that reach the fake device with no fake tensor argument: factories (``torch.zeros(...,
    device="fake")``). An allocation on the current stream, plus a kernel if it fills memory."""
    session = _session()
    if kwargs.get("device") is not None:
        _check_index(kwargs["device"], op)
        kwargs["device"] = CPU
    for a in args:
        if isinstance(a, torch.Tensor) and a.device.type != "cpu":
            raise BackendMismatchError(
                f"{op}: argument on {a.device}: a factory on the fake device takes host (cpu) tensor arguments only;"
                " move it with .cpu() first"
            )
    plan = plan_for(op)
    call = DispatchCall(plan, _getframe(1), session)  # (an entry point: the site starts at its caller)
    if plan.name in _ALLOCATIONS:
        result = op._op(*args, **kwargs)
        if not session.eager:
            _poison(result)  # (a deferred schedule: memory nothing wrote holds poison)
        return call.wrap(result, args, kwargs)
    call.args, call.kwargs = list(args), kwargs  # (host arguments only: nothing to unwrap, nothing accessed)
    return call.wrap(call.launch(), args, kwargs)


#: ``Tensor.set_`` of a fake tensor (installed by _rebind with ``x.data = y`` and ``untyped_storage()``)
SET: Any = None
_RESIZE_PLAN = plan_for(torch.ops.aten.resize_.default)
