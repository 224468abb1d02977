"""The emulated device modules: ``torch.cuda`` (its names replaced in place), ``torch.npu`` and
``torch_npu`` (module objects put in place), ``torch.accelerator``, the ``Tensor`` methods that name
the device, and the ``torch.distributed`` entry points that name NCCL/HCCL.

Every function here works on the fake backend directly (the active fake session: an explicit
``fake.session()``, else the process's default session), never through streamkit's active backend,
so streamkit's own ``cuda``/``npu`` backends can run over these modules (the conformance columns
``cuda (emulated)`` and ``npu (emulated)``).

Each name's fake semantics and its source are in docs/emulation.md (the coverage table).
"""

from __future__ import annotations

import gc
import importlib
import sys
import types
import weakref
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from . import _blocks, _emulate, _handles, _report, _tensor
from ._fake_backend import BACKEND
from ._handles import DEFAULT_STREAM

# What the emulated device says about itself (plausible, documented in docs/emulation.md).
TOTAL_MEMORY = 80 * 1024**3
_PROPERTIES = {
    "cuda": dict(name="streamkit emulated CUDA device (fake, CPU)", major=9, minor=0, multi_processor_count=132),
    "npu": dict(name="streamkit emulated Ascend NPU (fake, CPU)", major=0, minor=0, multi_processor_count=24),
}
_GRAPH_CLASS = {"cuda": "CUDAGraph", "npu": "NPUGraph"}


def _backend() -> Any:
    return BACKEND


def _session() -> Any:
    return BACKEND.current or BACKEND.get()


class _Properties:
    """``get_device_properties()``: what engines read (name, capability, memory, SM count)."""

    def __init__(self, kind: str) -> None:
        values = _PROPERTIES[kind]
        self.name: str = values["name"]
        self.major: int = values["major"]
        self.minor: int = values["minor"]
        self.total_memory: int = TOTAL_MEMORY
        self.multi_processor_count: int = values["multi_processor_count"]
        self.is_integrated = False
        self.is_multi_gpu_board = False
        self.warp_size = 32

    def __repr__(self) -> str:
        return (
            f"_DeviceProperties(name='{self.name}', major={self.major}, minor={self.minor},"
            f" total_memory={self.total_memory // 1024**2}MB, multi_processor_count={self.multi_processor_count})"
        )


def make_module(kind: str) -> dict[str, Any]:
    """The names of the emulated ``torch.<kind>`` module: ``{name: value}``."""
    where = f"torch.{kind}"
    device = torch.device(kind, 0)
    wrappers: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()

    def check(value: Any, what: str) -> None:
        if value is not None:
            _emulate.check_index(kind, value, f"{where}.{what}")

    class Stream:
        """An emulated device stream: a fake stream (CUDA semantics: non-blocking, FIFO)."""

        __slots__ = ("_handle", "__weakref__")

        def __new__(cls, device: Any = None, priority: int = 0, **kwargs: Any) -> "Stream":
            check(device, "Stream(device)")
            if kwargs.get("stream_ptr") is not None or kwargs.get("stream_id") is not None:
                raise ValueError(f"{where}.Stream: wrapping an external stream (stream_ptr/stream_id) can't be emulated")
            if not isinstance(priority, int) or isinstance(priority, bool):
                raise TypeError(f"{where}.Stream(priority): expected an int, got {type(priority).__name__}")
            backend = _backend()
            return cls._wrap(backend.new_stream(priority))

        @classmethod
        def _wrap(cls, handle: Any) -> "Stream":
            if handle is DEFAULT_STREAM:
                return default_wrapper
            self = wrappers.get(handle)
            if self is None:
                self = object.__new__(cls)
                self._handle = handle
                wrappers[handle] = self
            return self

        def wait_event(self, event: "Event") -> None:
            _backend().stream_wait_event(self._handle, _event_handle(event, "Stream.wait_event(event)"))

        def wait_stream(self, stream: "Stream") -> None:
            _backend().stream_wait_stream(self._handle, _stream_handle(stream, "Stream.wait_stream(stream)"))

        def record_event(self, event: "Event | None" = None) -> "Event":
            if event is None:
                event = Event()
            _backend().event_record(_event_handle(event, "Stream.record_event(event)"), self._handle)
            return event

        def query(self) -> bool:
            return _backend().stream_query(self._handle)

        def synchronize(self) -> None:
            _backend().stream_synchronize(self._handle)

        @property
        def priority(self) -> int:
            return self._handle.priority

        @property
        def device(self) -> torch.device:
            return device

        @property
        def device_index(self) -> int:
            return 0

        @property
        def device_type(self) -> int:
            return 1

        @property
        def stream_id(self) -> int:
            return 0 if self._handle is DEFAULT_STREAM else id(self._handle)

        @property
        def _as_parameter_(self) -> int:
            return self.stream_id

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Stream) and other._handle is self._handle

        def __hash__(self) -> int:
            return hash((kind, id(self._handle)))

        def __enter__(self) -> "Stream":
            context = _backend().stream_context(self._handle)
            context.__enter__()
            _contexts.setdefault(id(self), []).append(context)
            return self

        def __exit__(self, *exc: Any) -> None:
            _contexts[id(self)].pop().__exit__(*exc)

        def __repr__(self) -> str:
            return f"<{where}.Stream device={kind}:0 {kind}_stream={self.stream_id:#x} (fake stream {self._handle!r})>"

    setattr(Stream, f"{kind}_stream", property(lambda self: self.stream_id))
    default_wrapper = object.__new__(Stream)
    default_wrapper._handle = DEFAULT_STREAM
    Stream.__module__ = where
    _contexts: dict[int, list] = {}

    class Event:
        """An emulated device event: a fake event."""

        __slots__ = ("_handle", "__weakref__")

        def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False, **kwargs: Any) -> None:
            if interprocess:
                raise NotImplementedError(
                    f"{where}.Event(interprocess=True): inter-process events can't be emulated (the fake device"
                    " lives in one process); share results through torch.distributed instead"
                )
            self._handle = _backend().new_event(bool(enable_timing))

        def record(self, stream: "Stream | None" = None) -> None:
            handle = _backend().current_stream() if stream is None else _stream_handle(stream, "Event.record(stream)")
            _backend().event_record(self._handle, handle)

        def wait(self, stream: "Stream | None" = None) -> None:
            handle = _backend().current_stream() if stream is None else _stream_handle(stream, "Event.wait(stream)")
            _backend().stream_wait_event(handle, self._handle)

        def query(self) -> bool:
            return _backend().event_query(self._handle)

        def synchronize(self) -> None:
            _backend().event_synchronize(self._handle)

        def elapsed_time(self, end_event: "Event") -> float:
            return _backend().event_elapsed_time(self._handle, _event_handle(end_event, "Event.elapsed_time(end_event)"))

        def ipc_handle(self) -> Any:
            raise NotImplementedError(f"{where}.Event.ipc_handle(): inter-process events can't be emulated")

        @classmethod
        def from_ipc_handle(cls, device: Any, handle: Any) -> Any:
            raise NotImplementedError(f"{where}.Event.from_ipc_handle(): inter-process events can't be emulated")

        @property
        def device(self) -> torch.device:
            return device

        def __repr__(self) -> str:
            return f"<{where}.Event (fake event {self._handle!r})>"

    Event.__module__ = where

    def _stream_handle(stream: Any, what: str) -> Any:
        if not isinstance(stream, Stream):
            raise TypeError(f"{where}.{what}: expected a {where}.Stream, got {type(stream).__module__}.{type(stream).__qualname__}")
        return stream._handle

    def _event_handle(event: Any, what: str) -> Any:
        if not isinstance(event, Event):
            raise TypeError(f"{where}.{what}: expected a {where}.Event, got {type(event).__module__}.{type(event).__qualname__}")
        return event._handle

    def current_stream(device: Any = None) -> Stream:
        check(device, "current_stream(device)")
        return Stream._wrap(_backend().current_stream())

    def default_stream(device: Any = None) -> Stream:
        check(device, "default_stream(device)")
        return Stream._wrap(DEFAULT_STREAM)

    def set_stream(stream: Stream) -> None:
        """The calling thread's current stream becomes ``stream`` (until set again; CUDA: torch.cuda.set_stream)."""
        if stream is None:
            return
        handle = _stream_handle(stream, "set_stream(stream)")
        s = _session()
        s.set_current_stream(None if handle is DEFAULT_STREAM else _handles.resolve(handle, s))

    class StreamContext:
        """``with torch.<kind>.stream(s):`` ``s`` is current inside; ``None`` does nothing."""

        def __init__(self, stream: "Stream | None") -> None:
            if stream is not None:
                _stream_handle(stream, "stream(stream)")
            self.stream = stream
            self._context: Any = None

        def __enter__(self) -> "Stream | None":
            if self.stream is not None:
                self._context = _backend().stream_context(self.stream._handle)
                self._context.__enter__()
            return self.stream

        def __exit__(self, *exc: Any) -> None:
            context, self._context = self._context, None
            if context is not None:
                context.__exit__(*exc)

    StreamContext.__module__ = where

    def stream(stream: "Stream | None") -> StreamContext:
        return StreamContext(stream)

    def synchronize(device: Any = None) -> None:
        check(device, "synchronize(device)")
        _backend().synchronize()

    class device_ctx:
        """``with torch.<kind>.device(0):`` (one device: index 0 only)."""

        def __init__(self, device: Any) -> None:
            check(device, "device(device)")
            self.idx = 0

        def __enter__(self) -> None:
            return None

        def __exit__(self, *exc: Any) -> None:
            return None

    device_ctx.__name__ = device_ctx.__qualname__ = "device"
    device_ctx.__module__ = where

    def set_device(device: Any) -> None:
        check(device, "set_device(device)")

    def current_device() -> int:
        return 0

    def device_count() -> int:
        return 1

    def is_available() -> bool:
        return True

    def is_initialized() -> bool:
        return True

    def init() -> None:
        return None

    def get_device_name(device: Any = None) -> str:
        check(device, "get_device_name(device)")
        return _PROPERTIES[kind]["name"]

    def get_device_properties(device: Any = None) -> _Properties:
        check(device, "get_device_properties(device)")
        return _Properties(kind)

    def get_device_capability(device: Any = None) -> tuple[int, int]:
        check(device, "get_device_capability(device)")
        p = _PROPERTIES[kind]
        return (p["major"], p["minor"])

    # graphs: the fake's capture rules
    pool_graphs: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()

    class _PoolHandle:
        """``graph_pool_handle()``: a pool shared by the captures given it (the first capture's pool)."""

        token: Any = None

        def __repr__(self) -> str:
            return f"<{where} graph pool handle>"

    def _pool_token(pool: Any) -> Any:
        if isinstance(pool, _PoolHandle):
            return pool.token
        return pool

    class Graph:
        """An emulated device graph: a fake graph (capture records, replay re-runs; CUDA's rules)."""

        def __init__(self, keep_graph: bool = False) -> None:
            self._handle = _backend().new_graph()
            self.capture: Any = None
            self._pool: Any = None

        def capture_begin(self, pool: Any = None, capture_error_mode: str = "global") -> None:
            self._pool = pool
            self.capture = _backend().graph_capture(self._handle, None, _pool_token(pool))
            self.capture.__enter__()

        def capture_end(self) -> None:
            capture, self.capture = self.capture, None
            capture.__exit__(None, None, None)
            if isinstance(self._pool, _PoolHandle) and self._pool.token is None:
                self._pool.token = self.pool()

        def replay(self) -> None:
            _backend().graph_replay(self._handle)

        def reset(self) -> None:
            _backend().graph_reset(self._handle)

        def pool(self) -> Any:
            return _backend().graph_pool(self._handle)

        def enable_debug_mode(self) -> None:
            return None

        def debug_dump(self, path: str) -> None:
            raise NotImplementedError(f"{where}.{_GRAPH_CLASS[kind]}.debug_dump(): a fake graph has no graphviz dump")

    Graph.__name__ = Graph.__qualname__ = _GRAPH_CLASS[kind]
    Graph.__module__ = where

    class graph:
        """``with torch.<kind>.graph(g, pool=None, stream=None):`` capture into ``g`` (fake's rules)."""

        def __init__(self, graph_obj: Graph, pool: Any = None, stream: "Stream | None" = None, capture_error_mode: str = "global") -> None:
            if not isinstance(graph_obj, Graph):
                raise TypeError(f"{where}.graph(cuda_graph): expected a {where}.{_GRAPH_CLASS[kind]}, got {type(graph_obj).__qualname__}")
            self.graph_obj = graph_obj
            self.pool = pool
            self.stream = None if stream is None else _stream_handle(stream, "graph(stream)")
            self._context: Any = None

        def __enter__(self) -> None:
            self._context = _backend().graph_capture(self.graph_obj._handle, self.stream, _pool_token(self.pool))
            self._context.__enter__()

        def __exit__(self, *exc: Any) -> Any:
            context, self._context = self._context, None
            result = context.__exit__(*exc)
            if exc[0] is None and isinstance(self.pool, _PoolHandle) and self.pool.token is None:
                self.pool.token = self.graph_obj.pool()
            return result

    graph.__module__ = where

    def graph_pool_handle() -> _PoolHandle:
        return _PoolHandle()

    def is_current_stream_capturing() -> bool:
        return _session().capture is not None  # engine hook: the capture underway

    # memory: the fake device's live allocations (what is still referenced), in the caching
    # allocator's block sizes (_blocks.round_size), reserved in whole 2 MiB segments
    peak = {"allocated": 0, "reserved": 0}

    def _allocated() -> int:
        s = _session()
        seen: set[int] = set()
        total = 0
        for obj in gc.get_objects():
            if type(obj) is _tensor.FakeDeviceTensor:
                state = obj.sk_state
                if state.session is s and id(state) not in seen:
                    seen.add(id(state))
                    total += _blocks.round_size(state.nbytes) if state.nbytes else 0
        peak["allocated"] = max(peak["allocated"], total)
        return total

    def _reserved() -> int:
        block = _blocks.K_SMALL_BUFFER
        value = -(-_allocated() // block) * block
        peak["reserved"] = max(peak["reserved"], value)
        return value

    def memory_allocated(device: Any = None) -> int:
        check(device, "memory_allocated(device)")
        return _allocated()

    def max_memory_allocated(device: Any = None) -> int:
        check(device, "max_memory_allocated(device)")
        _allocated()
        return peak["allocated"]

    def memory_reserved(device: Any = None) -> int:
        check(device, "memory_reserved(device)")
        return _reserved()

    def max_memory_reserved(device: Any = None) -> int:
        check(device, "max_memory_reserved(device)")
        _reserved()
        return peak["reserved"]

    def mem_get_info(device: Any = None) -> tuple[int, int]:
        check(device, "mem_get_info(device)")
        return (TOTAL_MEMORY - _reserved(), TOTAL_MEMORY)

    def reset_peak_memory_stats(device: Any = None) -> None:
        check(device, "reset_peak_memory_stats(device)")
        peak["allocated"] = peak["reserved"] = 0

    def empty_cache() -> None:
        return None

    def memory_stats(device: Any = None) -> dict[str, int]:
        check(device, "memory_stats(device)")
        return {
            "allocated_bytes.all.current": _allocated(), "allocated_bytes.all.peak": peak["allocated"],
            "reserved_bytes.all.current": _reserved(), "reserved_bytes.all.peak": peak["reserved"],
        }

    # random numbers: fake kernels run on the CPU generator, so seeding the device seeds it. (The
    # generator itself, not torch.manual_seed / torch.seed: those seed every available device's
    # generators, this one's too, and would call back here without end.)
    def manual_seed(seed: int) -> None:
        torch.default_generator.manual_seed(int(seed))

    def seed() -> None:
        torch.default_generator.seed()

    def initial_seed() -> int:
        return torch.default_generator.initial_seed()

    def _sleep(cycles: int) -> None:
        """A kernel that holds the current stream (its length is not modelled: streams are ordered, not timed)."""
        torch.empty(1, device=_tensor.DEVICE).zero_()

    nvtx = types.SimpleNamespace(
        range_push=lambda msg: 0, range_pop=lambda: 0, mark=lambda msg: None,
        range_start=lambda msg: 0, range_end=lambda range_id: None, range=_nvtx_range,
    )

    return {
        "Stream": Stream, "Event": Event, "StreamContext": StreamContext, "stream": stream, "current_stream": current_stream,
        "default_stream": default_stream, "set_stream": set_stream, "synchronize": synchronize, "device": device_ctx,
        "set_device": set_device, "current_device": current_device, "device_count": device_count,
        "is_available": is_available, "is_initialized": is_initialized, "init": init, "_lazy_init": init,
        "get_device_name": get_device_name, "get_device_properties": get_device_properties,
        "get_device_capability": get_device_capability, _GRAPH_CLASS[kind]: Graph, "graph": graph,
        "graph_pool_handle": graph_pool_handle, "is_current_stream_capturing": is_current_stream_capturing,
        "memory_allocated": memory_allocated, "max_memory_allocated": max_memory_allocated,
        "memory_reserved": memory_reserved, "max_memory_reserved": max_memory_reserved, "mem_get_info": mem_get_info,
        "reset_peak_memory_stats": reset_peak_memory_stats, "empty_cache": empty_cache, "memory_stats": memory_stats,
        "manual_seed": manual_seed, "manual_seed_all": manual_seed, "seed": seed, "seed_all": seed,
        "initial_seed": initial_seed, "_sleep": _sleep, "nvtx": nvtx,
    }


@contextmanager
def _nvtx_range(msg: str, *args: Any, **kwargs: Any) -> Iterator[None]:
    yield


# -- the torch_npu namespace ------------------------------------------------------------------------

class _TorchNpu(types.ModuleType):
    """``import torch_npu`` inside npu emulation: ``torch_npu.npu`` is the emulated module; a
    torch_npu custom op (``torch_npu.npu_*``, an Ascend kernel) raises, when called, saying how to
    stub it; any other missing name is an ``AttributeError`` (so ``hasattr`` works)."""

    __streamkit_emulated__ = True

    def __getattr__(self, name: str) -> Any:
        if name.startswith("npu_"):
            def custom_op(*args: Any, **kwargs: Any) -> Any:
                raise NotImplementedError(
                    f"torch_npu.{name}: a torch_npu custom op (an Ascend kernel), which the npu emulation can't run."
                    f" Stub it with a reference implementation in the test, e.g."
                    f" monkeypatch.setattr(torch_npu, {name!r}, my_{name}, raising=False)"
                )

            custom_op.__name__ = custom_op.__qualname__ = name
            return custom_op
        raise AttributeError(
            f"module 'torch_npu' (streamkit's npu emulation) has no attribute {name!r}: it provides torch_npu.npu"
            " (the emulated torch.npu) and stubs that raise for the torch_npu.npu_* custom ops"
        )


# -- installing ---------------------------------------------------------------------------------------

_MODULES: dict[str, dict[str, Any]] = {}


def install(current: Any) -> None:
    """Install ``current.kind``'s emulation, recording every replaced name in ``current.patches``."""
    kind = current.kind
    patches = current.patches
    names = _MODULES.get(kind)
    if names is None:  # (made once per process: streams made under one install stay usable under the next)
        names = _MODULES[kind] = make_module(kind)
    if kind == "cuda":
        for name, value in names.items():
            patches.set(torch.cuda, name, value)
        _install_cuda_device(current)
    else:
        module = types.ModuleType("torch.npu", "The emulated torch.npu (streamkit fake device, npu emulation).")
        module.__dict__.update(names)
        module.__streamkit_emulated__ = True
        module.utils = module
        pkg = _TorchNpu("torch_npu", "The emulated torch_npu namespace (streamkit fake device, npu emulation).")
        pkg.npu = module
        pkg.__path__ = []
        pkg.__version__ = "0.0+streamkit.emulated"
        patches.set(torch, "npu", module)
        for name, value in (("torch.npu", module), ("torch_npu", pkg), ("torch_npu.npu", module)):
            _set_module(current, name, value)
        patches.set(torch.Tensor, "npu", _to_method(kind))
        patches.set(torch.Tensor, "is_npu", property(lambda self: type(self) is _tensor.FakeDeviceTensor))
    _install_accelerator(current, names)
    patches.set(_tensor.FakeDeviceTensor, "record_stream", _record_stream_method(names["Stream"]))
    _report.name_api(f"torch.{kind}")  # (fixes in race reports name the API the user's code calls)
    current.undo.append(lambda: _report.name_api(None))
    from . import _emulate_dist

    _emulate_dist.install(current)


def _set_module(current: Any, name: str, value: Any) -> None:
    old = sys.modules.get(name)
    sys.modules[name] = value

    def undo() -> None:
        if old is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = old

    current.undo.append(undo)


def _record_stream_method(stream_class: type) -> Any:
    original = _tensor.FakeDeviceTensor.record_stream

    def record_stream(self: Any, stream: Any) -> None:
        """``Tensor.record_stream(stream)``: an emulated stream, or a streamkit one."""
        if isinstance(stream, stream_class):
            _backend().record_stream(self, stream._handle)
            return
        original(self, stream)

    return record_stream


def _install_accelerator(current: Any, names: dict[str, Any]) -> None:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is None:
        return
    kind = current.kind
    values = {
        "current_accelerator": lambda check_available=False: torch.device(kind),
        "is_available": lambda: True,
        "device_count": lambda: 1,
        "current_device_index": lambda: 0,
        "current_device_idx": lambda: 0,
        "set_device_index": names["set_device"],
        "set_device_idx": names["set_device"],
        "current_stream": names["current_stream"],
        "set_stream": names["set_stream"],
        "synchronize": names["synchronize"],
        "memory_allocated": names["memory_allocated"],
        "max_memory_allocated": names["max_memory_allocated"],
        "memory_reserved": names["memory_reserved"],
        "empty_cache": names["empty_cache"],
    }
    for name, value in values.items():
        if hasattr(accelerator, name):
            current.patches.set(accelerator, name, value)


def _to_method(kind: str) -> Any:
    def to_device(self: torch.Tensor, device: Any = None, non_blocking: bool = False, memory_format: Any = torch.preserve_format) -> torch.Tensor:
        _emulate.check_index(kind, device, f"Tensor.{kind}(device)")
        return _ORIGINAL_TO(self, _tensor.DEVICE, non_blocking=non_blocking, memory_format=memory_format)

    to_device.__name__ = kind
    return to_device


_ORIGINAL_TO = torch.Tensor.to
_ORIGINAL_TENSOR = torch.tensor
_ORIGINAL_AS_TENSOR = torch.as_tensor


def _map_device(value: Any, where: str) -> Any:
    """A ``cuda`` device argument as the fake device (PrivateUse1) it is under cuda emulation."""
    if type(value) is str:
        if value.startswith("cuda"):
            _emulate.check_index("cuda", value, where)
            return _tensor.DEVICE
    elif type(value) is torch.device:
        if value.type == "cuda":
            _emulate.check_index("cuda", value, where)
            return _tensor.DEVICE
    return value


def _install_cuda_device(current: Any) -> None:
    """Make ``cuda`` mean the fake device: tensors report ``cuda:0``; factories, conversions map it."""
    patches = current.patches
    fake = _tensor.FakeDeviceTensor
    cuda0 = torch.device("cuda", 0)
    # engine hook: fake tensors keep their PrivateUse1 device in C++ (autograd needs its guard)
    patches.set(fake, "device", property(lambda self: cuda0, doc="cuda:0 (the emulated device)"))
    patches.set(fake, "is_cuda", property(lambda self: True))

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args and (type(args[0]) is str or type(args[0]) is torch.device):
            args = (_map_device(args[0], "Tensor.to(device)"), *args[1:])
        if "device" in kwargs:
            kwargs["device"] = _map_device(kwargs["device"], "Tensor.to(device)")
        return _ORIGINAL_TO(self, *args, **kwargs)

    def tensor(data: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if "device" in kwargs:
            kwargs["device"] = _map_device(kwargs["device"], "torch.tensor(device)")
        return _ORIGINAL_TENSOR(data, *args, **kwargs)

    def as_tensor(data: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if len(args) > 1:
            args = (args[0], _map_device(args[1], "torch.as_tensor(device)"), *args[2:])
        if "device" in kwargs:
            kwargs["device"] = _map_device(kwargs["device"], "torch.as_tensor(device)")
        return _ORIGINAL_AS_TENSOR(data, *args, **kwargs)

    patches.set(torch.Tensor, "to", to)
    patches.set(torch.Tensor, "cuda", _to_method("cuda"))
    patches.set(torch, "tensor", tensor)
    patches.set(torch, "as_tensor", as_tensor)
    # factories with device="cuda" carry no fake tensor: a Python fallback on the CUDA key takes them
    library = torch.library.Library("_", "IMPL", "CUDA")
    library.fallback(_cuda_factory)
    current.undo.append(library._destroy)


def _cuda_factory(op: Any, *args: Any, **kwargs: Any) -> Any:
    """A factory given ``device="cuda"`` under cuda emulation: the fake device's factory."""
    if kwargs.get("device") is not None:
        _emulate.check_index("cuda", kwargs["device"], str(op))
        kwargs["device"] = _tensor.DEVICE
    return _tensor.factory_fallback(op, *args, **kwargs)
