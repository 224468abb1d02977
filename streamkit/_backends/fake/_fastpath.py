"""A fast path for hot, simple ops: tracked exactly like the dispatch path, minus PyTorch's
C++ dispatch round trip for wrapper tensors (about half the cost of a tiny op).

It covers a whitelist of ops whose memory behaviour never depends on values or shapes
(arithmetic, in-place updates, reductions: the output is the first argument, or fresh memory).
The first call with a given argument-type pattern runs through ``__torch_dispatch__`` while it is
observed; only if that call was exactly one kernel, whose tensor arguments are the caller's
tensors one for one, is the pattern cached. Later calls reuse the observed aten op name and
read/write sets, so races, reports and stats are the same on both paths.

Method calls (``x.add_(y)``, ``x + y``) don't even pay for PyTorch's ``__torch_function__``
handling: the whitelisted C methods are overridden on the fake tensor class by thin Python methods
that enter the same fast path (unless a ``TorchFunctionMode`` is active or torch functions are
disabled: then the C method runs, exactly as it would without the override).
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import torch

from . import _host_syncs, _tensor
from ._fake_backend import BACKEND
from ._sites import capture_site
from ._tracking import READ as _READ_KIND

if TYPE_CHECKING:
    from ._interface import Engine

_SCALARS = (int, float, bool)
_T = torch.Tensor
_INPLACE_NAMES = (
    "add_", "sub_", "mul_", "div_", "__iadd__", "__isub__", "__imul__", "__itruediv__", "zero_", "fill_",
    "clamp_", "clamp_min_", "clamp_max_", "index_add_", "scatter_add_", "scatter_", "index_copy_", "index_fill_",
    "masked_fill_", "addcmul_", "addcdiv_", "lerp_", "abs_", "neg_", "exp_", "sqrt_", "sigmoid_", "relu_",
    "copy_", "pow_", "floor_divide_", "remainder_",
)
# Never ops that may return an input itself (float()/contiguous()/to() when nothing changes).
_FRESH_NAMES = (
    "add", "sub", "mul", "div", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__",
    "__truediv__", "__rtruediv__", "__neg__", "__matmul__", "matmul", "mm", "sum", "mean", "amax", "amin",
    "argmax", "argmin", "exp", "sqrt", "abs", "neg", "clone", "pow", "__pow__", "cumsum", "softmax",
    "index_select", "gather", "where", "eq", "ne", "lt", "le", "gt", "ge", "__eq__", "__ne__", "__lt__",
    "__le__", "__gt__", "__ge__", "sigmoid", "relu", "floor_divide", "remainder",
    "__floordiv__", "__mod__", "prod", "norm", "square", "minimum", "maximum", "logical_and", "logical_or",
    "bincount", "stack", "cat",
)
FAST_FUNCS: frozenset = frozenset(
    [getattr(_T, n) for n in _INPLACE_NAMES + _FRESH_NAMES if hasattr(_T, n)]
    + [getattr(torch, n) for n in _FRESH_NAMES if hasattr(torch, n) and not n.startswith("__")]
)


class FastPlan:
    """What the observed call did: the aten op, which argument positions it read/wrote, the output."""

    __slots__ = ("op", "tensors", "lists", "returns_self", "host_sync", "pair", "single", "split", "sync_before")

    def __init__(self, op: Any, tensors: tuple, returns_self: bool, host_sync: str | None, lists: tuple = ()) -> None:
        self.op = op
        # an op that syncs the host partway with two kernels (_host_syncs, masked_select): ((positions
        # read before), (positions read after))
        self.split: tuple | None = None
        # the host sync before the kernel (nonzero, bincount: _host_syncs.SYNC_FIRST), if any
        self.sync_before: str | None = None
        # the commonest shape, x.add_(y) or x + y: two fake tensors, both accessed (kinds), no lists
        self.pair = (tensors[0][1], tensors[1][1]) if (
            len(tensors) == 2 and not lists and tensors[0][0] == 0 and tensors[1][0] == 1 and all(k for _, k in tensors)
        ) else None
        # the next commonest, torch.bincount(ids, ...) or x.sum(0): one fake tensor, first, no lists
        # (its access kind; None when it is not accessed)
        self.single = (tensors[0][1],) if len(tensors) == 1 and not lists and tensors[0][0] == 0 else None
        self.tensors = tensors  # ((position, kind), ...): fake tensor arguments
        self.lists = lists  # ((position, kind), ...): lists of fake tensors (torch.stack, torch.cat)
        self.returns_self = returns_self
        self.host_sync = host_sync  # the host waits after it (bincount sizes its output on the host)


_plans: dict[tuple, FastPlan | None] = {}
_learning_lock = threading.Lock()
_disabled = torch._C._disabled_torch_function_impl
_FAKE = _tensor.FakeDeviceTensor
_TYPES = (_FAKE,)


def _is_fake_list(value: Any) -> bool:
    return type(value) is list and bool(value) and all(type(v) is _FAKE for v in value)


def _analyse(args: tuple, observed: list) -> FastPlan | None:
    if len(observed) != 1:
        return None
    plan, aten_args, aten_kwargs, out = observed[0]
    if plan.is_collective or any(isinstance(v, (torch.Tensor, list, tuple)) for v in aten_kwargs.values()):
        return None
    positions, list_positions = [], []
    for p, a in enumerate(args):
        if type(a) is _FAKE:
            positions.append(p)
        elif _is_fake_list(a):
            list_positions.append(p)
        elif not isinstance(a, _SCALARS):
            return None
    wrappers_in_call = [i for i, a in enumerate(aten_args) if isinstance(a, torch.Tensor)]
    lists_in_call = [i for i, a in enumerate(aten_args) if isinstance(a, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in a)]
    if any(type(aten_args[i]) is not _FAKE for i in wrappers_in_call) or len(wrappers_in_call) != len(positions):
        return None
    if len(lists_in_call) != len(list_positions):
        return None
    tensors = []
    names = {}
    for p in positions:
        index = next((i for i in wrappers_in_call if aten_args[i] is args[p]), None)
        if index is None or index >= len(plan.arg_kinds):
            return None
        tensors.append((p, plan.arg_kinds[index]))
        names[p] = plan.op._schema.arguments[index].name
    lists = []
    for p in list_positions:
        # the aten op got exactly the caller's tensors, in order (no tensor added, dropped or copied)
        same = lambda i: len(aten_args[i]) == len(args[p]) and all(a is b for a, b in zip(aten_args[i], args[p]))  # noqa: E731
        index = next((i for i in lists_in_call if same(i)), None)
        if index is None or index >= len(plan.arg_kinds):
            return None
        lists.append((p, plan.arg_kinds[index]))
    inputs = [args[p] for p in positions] + [t for p in list_positions for t in args[p]]
    if plan.returns_self and out is args[0] and positions and positions[0] == 0 and not lists:
        return FastPlan(plan.op, tuple(tensors), True, plan.host_sync)
    if plan.outputs == [("fresh", None)] and type(out) is _FAKE:
        if all(out.sk_state is not t.sk_state for t in inputs):
            fast = FastPlan(plan.op, tuple(tensors), False, plan.host_sync, tuple(lists))
            fast.split = _host_syncs.fast_split_positions(plan, names)
            fast.sync_before = _host_syncs.fast_sync_first(plan)
            if fast.sync_before is not None:
                fast.host_sync = None  # (the sync comes first)
            return fast
    return None


def _learn(func: Any, types: Any, args: tuple, kwargs: dict, key: tuple) -> Any:
    if not _learning_lock.acquire(blocking=False):
        return _disabled(func, types, args, kwargs)
    observed: list = []
    try:
        with _tensor.observing(observed):
            result = _disabled(func, types, args, kwargs)
    finally:
        _learning_lock.release()
    fakes = [id(a) for a in args if type(a) is _FAKE]
    if len(set(fakes)) != len(fakes):
        return result  # x.add_(x): one tensor in two positions can't tell their kinds apart; learn later
    safe_kwargs = not any(isinstance(v, (torch.Tensor, list, tuple)) for v in kwargs.values())
    _plans[key] = _analyse(args, observed) if safe_kwargs else None
    return result


_BACKWARD = frozenset({torch.Tensor.backward, torch.autograd.backward, torch.autograd.grad})
_SETITEM = torch.Tensor.__setitem__


def torch_function(cls: Any, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
    """``FakeDeviceTensor.__torch_function__``: the fast path when it applies, else plain dispatch."""
    method = _fast_methods.get(func)
    if method is None:
        return not_fast(func, types, args, kwargs)
    return method(*args, **kwargs) if kwargs else method(*args)


def not_fast(func: Any, types: Any, args: tuple, kwargs: Any) -> Any:
    """A torch function off the fast path: plain dispatch (backward refused)."""
    if func in _BACKWARD:
        # PyTorch runs backward for a non-CPU device on a device thread that needs a C++ device
        # guard; with the Python one the process aborts. Refuse instead of taking it down.
        raise NotImplementedError(
            "autograd backward is not supported on the fake device (PyTorch's autograd engine needs a"
            " native device guard for it); forward passes are tracked, run backward checks on a real device"
        )
    if func is _SETITEM:  # x[idx] = 1.0: the number is a host tensor, as on CUDA (_host_syncs)
        args = _host_syncs.setitem_args(args, _FAKE)
    return _disabled(func, types, args, kwargs or {})


def _method(func: Any) -> Any:
    """The fast path for whitelisted ``func``, as a Python method standing in for the C method on
    the fake tensor class (and called by ``__torch_function__`` for the rest). One function per
    ``func``: a method call costs one Python frame, not two."""

    def method(*args: Any, **kwargs: Any) -> Any:
        if _mode_enabled() or not _function_enabled():
            return func(*args, **kwargs)  # as without the override: modes and disabled torch functions see the C method
        n = len(args)
        if kwargs:
            # keyword names and value types are part of the pattern: plans are only learned for
            # keywords that hold no tensors (minlength=..., dim=...)
            key = (func, *map(type, args), *kwargs, *map(type, kwargs.values()))
        elif n == 2:
            key = (func, type(args[0]), type(args[1]))
            kwargs = _NO_KWARGS
        elif n == 1:
            key = (func, type(args[0]))
            kwargs = _NO_KWARGS
        else:
            key = (func, *map(type, args))
            kwargs = _NO_KWARGS
        fast = _plans.get(key, _learning_lock)
        if fast is None:
            return _disabled(func, _TYPES, args, kwargs)
        if fast is _learning_lock:
            return _learn(func, _TYPES, args, kwargs, key)
        session = BACKEND.current or BACKEND.get()
        pair = fast.pair
        if pair is not None and n == 2:
            a, b = args
            if a.sk_state.session is not session or b.sk_state.session is not session:
                return _disabled(func, _TYPES, args, kwargs)  # the dispatch path raises the right error
            inner = [a.sk_inner, b.sk_inner]
            accesses = [(a, pair[0]), (b, pair[1])]
        elif fast.single is not None:
            a = args[0]
            if a.sk_state.session is not session:
                return _disabled(func, _TYPES, args, kwargs)  # the dispatch path raises the right error
            inner = [a.sk_inner, *args[1:]] if n > 1 else [a.sk_inner]
            kind = fast.single[0]
            accesses = [(a, kind)] if kind else []
        else:
            inner, accesses = _unwrap_general(fast, args, session)
            if inner is None:
                return _disabled(func, _TYPES, args, kwargs)  # the dispatch path raises the right error
        if _grad_enabled() and _any_requires_grad(*args):
            # Autograd must see ops on tensors that require grad: leave those to the dispatch path.
            # (_any_requires_grad reads the flag without a __torch_function__ round trip.)
            return _disabled(func, _TYPES, args, kwargs)
        # (from __torch_function__, frame 1 is streamkit's: the walk skips it)
        site = capture_site(_getframe(1), session.site_depth) if session.tracked else None
        if fast.split is not None:  # (masked_select: reads before its host sync and after it)
            return _host_syncs.fast_split(session, fast, func, args, inner, kwargs, accesses, site)
        kernel, result = session.launch(fast.op, func, None, site, inner, kwargs, accesses, fast.host_sync, fast.sync_before)
        if fast.returns_self:
            return args[0]
        for p, _ in fast.tensors:
            if result is inner[p]:  # defensive: an op that handed back its input is no new memory
                return args[p]
        return _tensor.wrap_fresh(session, result, kernel.stream, kernel, site)

    method.__name__ = method.__qualname__ = func.__name__
    method.__doc__ = func.__doc__
    return method


def _unwrap_general(fast: FastPlan, args: tuple, session: "Engine") -> tuple[Any, Any]:
    """``(inner arguments, accesses)`` for any learned plan; ``(None, None)`` when an argument
    belongs elsewhere (another session, a CPU tensor in a list) and dispatch must handle the call."""
    inner = list(args)
    accesses = []
    for p, kind in fast.tensors:
        t = args[p]
        if t.sk_state.session is not session:
            return None, None
        inner[p] = t.sk_inner
        if kind:
            accesses.append((t, kind))
    for p, kind in fast.lists:
        items = args[p]
        for t in items:
            if type(t) is not _FAKE or t.sk_state.session is not session:
                return None, None
        inner[p] = [t.sk_inner for t in items]
        if kind:
            accesses += [(t, kind) for t in items]
    return inner, accesses


_NO_KWARGS: dict = {}
_getframe = sys._getframe
_grad_enabled = torch.is_grad_enabled
_any_requires_grad = torch._C._any_requires_grad
_mode_enabled = torch._C._is_torch_function_mode_enabled
_function_enabled = torch._C._is_torch_function_enabled


_to_copy = torch.ops.aten._to_copy.default
_tensor_cpu = torch.Tensor.cpu
_clone = torch.Tensor.clone  # what aten._to_copy does for a same-device copy, at a third of its cost


def _cpu(self: Any, memory_format: torch.memory_format = torch.preserve_format) -> torch.Tensor:
    """``Tensor.cpu()``: a blocking D2H copy on the current stream, as the dispatch path issues it
    (same op, same read, same host sync), minus the dispatch round trip."""
    session = BACKEND.current or BACKEND.get()
    if (
        type(self) is not _FAKE or _mode_enabled() or not _function_enabled()
        or self.sk_state.session is not session or (_grad_enabled() and _any_requires_grad(self))
    ):
        return _tensor_cpu(self, memory_format=memory_format)
    site = capture_site(_getframe(1), session.site_depth) if session.tracked else None
    kwargs = {"memory_format": memory_format}
    _, result = session.launch(_to_copy, _clone, None, site, [self.sk_inner], kwargs, [(self, _READ_KIND)], "blocking_copies")
    return result


_installed: list[str] = []
_fast_methods: dict[Any, Any] = {func: _method(func) for func in FAST_FUNCS}


def install_methods(cls: type) -> None:
    """Override the whitelisted C methods of ``torch.Tensor`` on ``cls`` (Python-level ones, such as
    ``__rsub__``, keep PyTorch's own wrapper: it turns a TypeError into NotImplemented), and route
    ``__torch_function__`` through the fast path."""
    for func in FAST_FUNCS:
        name = getattr(func, "__name__", None)
        if name and getattr(torch.Tensor, name, None) is func and type(func).__name__ in ("method_descriptor", "wrapper_descriptor"):
            setattr(cls, name, _fast_methods[func])
            _installed.append(name)
    cls.__torch_function__ = classmethod(torch_function)
    cls.cpu = _cpu
    _installed.append("cpu")


def _dispatch_only_torch_function(cls: Any, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
    return not_fast(func, types, args, kwargs)


@contextmanager
def _dispatch_only(cls: type = _FAKE) -> Iterator[None]:
    """Test hook: inside the block every op on ``cls`` goes through ``__torch_dispatch__`` (the
    reference path the fast path must agree with). Not thread-safe; for tests only."""
    saved = {name: cls.__dict__[name] for name in _installed}
    saved["__torch_function__"] = cls.__dict__["__torch_function__"]
    for name in _installed:
        delattr(cls, name)
    cls.__torch_function__ = classmethod(_dispatch_only_torch_function)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(cls, name, value)


install_methods(_FAKE)
