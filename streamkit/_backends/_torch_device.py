"""A backend over a torch device module (``torch.cuda``, ``torch.npu``): thin and exact.

Handles are the module's own ``Stream`` and ``Event`` objects, so the semantics are the device
runtime's: nothing here re-implements ordering.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import Any, Iterator

import sys

import torch

from .._backend import Backend, use_backend
from .._errors import BackendUnavailableError, GraphUnsupportedError


class TorchDeviceBackend(Backend):
    """Shared by ``cuda`` and ``npu``: a subclass names the backend and says how to find its module
    (``_find_module`` raises :class:`BackendUnavailableError` saying why it can't)."""

    #: the module's graph class (``torch.cuda.CUDAGraph``, ``torch.npu.NPUGraph``)
    _graph_class = "CUDAGraph"
    _instance: "TorchDeviceBackend | None" = None
    _unavailable: str | None = None  # why not, found once per process

    def __init__(self, module: Any) -> None:
        self._mod = module

    @classmethod
    def _find_module(cls) -> Any:
        raise NotImplementedError

    @classmethod
    def _emulated(cls) -> bool:
        """Whether the fake device emulates this backend's device type now (docs/emulation.md)."""
        emulate = sys.modules.get("streamkit._backends.fake._emulate")
        return emulate is not None and emulate.installed() == cls.name

    @classmethod
    def load(cls) -> "TorchDeviceBackend":
        if cls._emulated():
            # over the emulated torch.<name> (kept apart from the real availability, which is unchanged)
            module = getattr(torch, cls.name)
            held = cls.__dict__.get("_emulated_instance")
            if held is None or held._mod is not module:
                held = cls(module)
                cls._emulated_instance = held
            return held
        instance = cls.__dict__.get("_instance")
        if instance is None:
            if cls.__dict__.get("_unavailable") is not None:
                raise BackendUnavailableError(cls._unavailable)
            try:
                instance = cls(cls._find_module())
            except BackendUnavailableError as exc:
                cls._unavailable = str(exc)
                raise
            cls._instance = instance
        return instance

    @classmethod
    @contextmanager
    def test_context(cls) -> Iterator["TorchDeviceBackend"]:
        """The backend active for one test; under emulation, inside a ``fake.session(emulate=name,
        detect="raise")`` of the test's own (a race fails it)."""
        if not cls._emulated():
            with use_backend(cls.load().name) as backend:
                yield backend
                backend.synchronize()
            return
        from .fake import session

        with session(detect="raise", emulate=cls.name):
            with use_backend(cls.name) as backend:
                yield backend
                backend.synchronize()

    def device(self) -> torch.device:
        return torch.device(self.name, self._mod.current_device())

    def synchronize(self) -> None:
        self._mod.synchronize()

    # streams
    def new_stream(self, priority: int) -> Any:
        return self._mod.Stream(priority=priority)

    def current_stream(self) -> Any:
        return self._mod.current_stream()

    def default_stream(self) -> Any:
        return self._mod.default_stream()

    def stream_context(self, stream: Any) -> AbstractContextManager[None]:
        return self._mod.stream(stream)

    def stream_wait_event(self, stream: Any, event: Any) -> None:
        stream.wait_event(event)

    def stream_wait_stream(self, stream: Any, other: Any) -> None:
        stream.wait_stream(other)

    def stream_synchronize(self, stream: Any) -> None:
        stream.synchronize()

    def stream_query(self, stream: Any) -> bool:
        return bool(stream.query())

    def stream_priority(self, stream: Any) -> int:
        return int(stream.priority)

    def stream_key(self, stream: Any) -> Any:
        return (stream.device, stream.stream_id)

    def stream_label(self, stream: Any) -> str:
        return f"{stream.device} id={stream.stream_id}"

    def native_stream(self, stream: Any) -> Any:
        return stream

    # events
    def new_event(self, enable_timing: bool) -> Any:
        return self._mod.Event(enable_timing=enable_timing)

    def event_record(self, event: Any, stream: Any) -> None:
        event.record(stream)

    def event_synchronize(self, event: Any) -> None:
        event.synchronize()

    def event_query(self, event: Any) -> bool:
        return bool(event.query())

    def event_elapsed_time(self, start: Any, end: Any) -> float:
        return float(start.elapsed_time(end))

    def native_event(self, event: Any) -> Any:
        return event

    # memory
    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        if tensor.device.type != self.name:
            raise ValueError(
                f"record_stream(tensor): tensor is on {tensor.device}, not on a {self.name} device;"
                " only device memory is managed by the stream-ordered allocator"
            )
        tensor.record_stream(stream)

    # graphs: the module's own graph class and capture context (torch/cuda/graphs.py)
    def _graph_api(self) -> tuple[Any, Any]:
        cls = getattr(self._mod, self._graph_class, None)
        capture = getattr(self._mod, "graph", None)
        if cls is None or capture is None:
            raise GraphUnsupportedError(
                f"the {self.name} backend's torch module has no {self._graph_class} / graph (upgrade"
                f" {'torch_npu' if self.name == 'npu' else 'torch'} for graph capture)"
            )
        return cls, capture

    def new_graph(self) -> Any:
        return self._graph_api()[0]()

    def graph_capture(self, graph: Any, stream: Any, pool: Any) -> AbstractContextManager[None]:
        return self._graph_api()[1](graph, pool=pool, stream=stream)

    def graph_replay(self, graph: Any) -> None:
        graph.replay()

    def graph_reset(self, graph: Any) -> None:
        graph.reset()

    def graph_pool(self, graph: Any) -> Any:
        return graph.pool()
