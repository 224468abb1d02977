"""The contract every backend implements (the ``abc`` of streamkit), and the registry that loads
backends by name and knows which one is active.

A backend hands out opaque *handles* for streams and events; the public :class:`~streamkit.Stream`
and :class:`~streamkit.Event` wrap a handle together with the backend that made it, so every call is
checked to stay within one backend. A backend whose handles can expire (a closed fake session)
raises :class:`~streamkit.SessionClosedError` from its own methods.

A module that provides a backend exports its class as ``backend_class``; the registry
(:func:`streamkit.register_backend`) imports the module by name when the backend is first asked for.
"""

from __future__ import annotations

import abc
import importlib
import os
import threading
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Iterator

import torch

from ._errors import BackendUnavailableError, GraphUnsupportedError


class Backend(abc.ABC):
    """One device runtime: ``cuda``, ``npu``, ``fake``, or a registered third-party one."""

    #: short name used by :func:`streamkit.get_backend` and ``STREAMKIT_BACKEND``
    name: str

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def load(cls) -> "Backend":
        """The instance to use now, or raise :class:`~streamkit.BackendUnavailableError` saying why
        this machine can't run the backend. Called on every lookup: cache what is costly."""

    @classmethod
    @contextmanager
    def test_context(cls) -> Iterator["Backend"]:
        """Make this backend the active one for one test (the pytest plugin's ``streamkit_backend``
        fixture); yields it, and waits for the device when the test is done."""
        with use_backend(cls.load().name) as backend:
            yield backend
            backend.synchronize()

    # -- device -----------------------------------------------------------------------------
    @abc.abstractmethod
    def device(self) -> torch.device:
        """The device that tensors of this backend live on (the current one)."""

    @abc.abstractmethod
    def synchronize(self) -> None:
        """Block the host until all work on all streams of the device has completed."""

    # -- streams ----------------------------------------------------------------------------
    @abc.abstractmethod
    def new_stream(self, priority: int) -> Any: ...

    @abc.abstractmethod
    def current_stream(self) -> Any: ...

    @abc.abstractmethod
    def default_stream(self) -> Any: ...

    @abc.abstractmethod
    def stream_context(self, stream: Any) -> AbstractContextManager[None]:
        """Make ``stream`` current for the calling thread; restore the previous one on exit."""

    @abc.abstractmethod
    def stream_wait_event(self, stream: Any, event: Any) -> None: ...

    def stream_wait_stream(self, stream: Any, other: Any) -> None:
        """``stream`` waits for all work issued to ``other`` so far (record on ``other``, then wait)."""
        event = self.new_event(False)
        self.event_record(event, other)
        self.stream_wait_event(stream, event)

    @abc.abstractmethod
    def stream_synchronize(self, stream: Any) -> None: ...

    @abc.abstractmethod
    def stream_query(self, stream: Any) -> bool: ...

    @abc.abstractmethod
    def stream_priority(self, stream: Any) -> int: ...

    @abc.abstractmethod
    def stream_key(self, stream: Any) -> Any:
        """A hashable identity: two handles of the same stream give equal keys."""

    def stream_label(self, stream: Any) -> str:
        return repr(stream)

    # -- events -----------------------------------------------------------------------------
    @abc.abstractmethod
    def new_event(self, enable_timing: bool) -> Any: ...

    @abc.abstractmethod
    def event_record(self, event: Any, stream: Any) -> None: ...

    @abc.abstractmethod
    def event_synchronize(self, event: Any) -> None: ...

    @abc.abstractmethod
    def event_query(self, event: Any) -> bool: ...

    @abc.abstractmethod
    def event_elapsed_time(self, start: Any, end: Any) -> float: ...

    # -- memory -----------------------------------------------------------------------------
    @abc.abstractmethod
    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None: ...

    # -- graphs (optional) -------------------------------------------------------------------
    # A backend that can capture graphs overrides all five; the defaults raise GraphUnsupportedError.
    def new_graph(self) -> Any:
        """A new, empty graph handle (``torch.cuda.CUDAGraph()`` on cuda)."""
        raise GraphUnsupportedError(
            f"the {self.name} backend does not support graph capture (it implements no Backend.new_graph);"
            " run this code without sk.graph, or on cuda, npu or fake"
        )

    def graph_capture(self, graph: Any, stream: Any, pool: Any) -> AbstractContextManager[None]:
        """Capture the work issued inside the block into ``graph``, with ``stream`` (``None``: the
        backend's own side stream) current; ``pool``: another graph's :meth:`graph_pool` token or ``None``."""
        raise GraphUnsupportedError(f"the {self.name} backend does not support graph capture")

    def graph_replay(self, graph: Any) -> None:
        """Launch the captured work on the current stream."""
        raise GraphUnsupportedError(f"the {self.name} backend does not support graph capture")

    def graph_reset(self, graph: Any) -> None:
        """Drop what ``graph`` captured and release its memory pool."""
        raise GraphUnsupportedError(f"the {self.name} backend does not support graph capture")

    def graph_pool(self, graph: Any) -> Any:
        """An opaque token for ``graph``'s memory pool, to share with another capture."""
        raise GraphUnsupportedError(f"the {self.name} backend does not support graph capture")

    def native_stream(self, stream: Any) -> Any:
        """The framework's own stream object (``torch.cuda.Stream``...), or ``None`` on fake."""
        return None

    def native_event(self, event: Any) -> Any:
        return None

    def __repr__(self) -> str:
        return f"<streamkit backend {self.name!r}>"


# -- the registry ---------------------------------------------------------------------------------
# name -> module exporting ``backend_class``, in preference order (used when no backend is named).
_MODULES: dict[str, str] = {
    "npu": "streamkit._backends.npu",
    "cuda": "streamkit._backends.cuda",
    "fake": "streamkit._backends.fake",
}
_lock = threading.RLock()
_classes: dict[str, type[Backend]] = {}
_import_errors: dict[str, str] = {}
#: the process-wide record of what is active: ``(backend, scope)`` entries, innermost last, pushed by
#: use_backend() blocks (scope ``None``) and by backends whose activity is scoped (an open fake
#: session is the fake backend's scope)
_active: list[tuple[Backend, Any]] = []
_selected: str | None = None  # set_backend()


def register_backend(name: str, target: "str | type[Backend]", *, preferred: bool = False) -> None:
    """Make a backend available as ``name``: ``target`` is a Backend subclass, or the dotted name of
    a module exporting one as ``backend_class`` (imported when the backend is first asked for).

    New names are tried last when no backend is named (first with ``preferred=True``). Registering
    an existing name replaces it.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"register_backend(name): expected a backend name such as 'mydev', got {name!r}")
    if isinstance(target, str):
        if not target:
            raise ValueError("register_backend(target): expected a module name such as 'mypkg.streamkit_backend'")
    elif not (isinstance(target, type) and issubclass(target, Backend)):
        raise TypeError(
            f"register_backend(target): expected a streamkit.Backend subclass or a module name, got {target!r}"
        )
    entry = target if isinstance(target, str) else ""
    with _lock:
        _classes.pop(name, None)
        _import_errors.pop(name, None)
        if not isinstance(target, str):
            _classes[name] = target
        others = [(k, v) for k, v in _MODULES.items() if k != name]
        items = [(name, entry), *others] if preferred else [*others, (name, entry)]
        _MODULES.clear()
        _MODULES.update(items)


def backend_names() -> tuple[str, ...]:
    """Every registered backend name, in preference order."""
    return tuple(_MODULES)


def backend_class(name: str) -> type[Backend]:
    """The class registered as ``name`` (importing its module on first use), or raise
    :class:`BackendUnavailableError` if the module can't be imported."""
    cls = _classes.get(name)
    if cls is not None:
        return cls
    with _lock:
        if name not in _MODULES:
            raise ValueError(f"unknown streamkit backend {name!r}: choose one of {', '.join(map(repr, _MODULES))}")
        if name in _import_errors:
            raise BackendUnavailableError(_import_errors[name])
        try:
            module = importlib.import_module(_MODULES[name])
            cls = module.backend_class
        except Exception as exc:  # an import that fails is a reason, reported, never a silent fallback
            _import_errors[name] = f"{name} backend unavailable: importing {_MODULES[name]} failed: {type(exc).__name__}: {exc}"
            raise BackendUnavailableError(_import_errors[name]) from exc
        _classes[name] = cls
        return cls


def load_backend(name: str) -> Backend:
    """The backend called ``name`` (``cls.load()``), or raise :class:`BackendUnavailableError` saying why."""
    return backend_class(name).load()


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot be used here, or ``None`` when it can."""
    try:
        load_backend(name)
    except BackendUnavailableError as exc:
        return str(exc)
    return None


def available_backends() -> list[str]:
    """Names of the backends usable in this process, in preference order (``npu``, ``cuda``, ``fake``,
    then registered ones)."""
    return [name for name in _MODULES if unavailable_reason(name) is None]


def get_backend(name: str | None = None) -> Backend:
    """The backend called ``name``; with ``None``, the active one.

    The active backend is the innermost :func:`use_backend` / open fake session, else the one given
    to :func:`set_backend`, else the ``STREAMKIT_BACKEND`` environment variable, else the first
    available of ``npu``, ``cuda``, ``fake`` (then registered backends).
    """
    if name is not None:
        if not isinstance(name, str):
            raise TypeError(f"get_backend(name): expected a backend name (str) or None, got {type(name).__name__}")
        return load_backend(name)
    if _active:
        return _active[-1][0]
    chosen = _selected or os.environ.get("STREAMKIT_BACKEND") or None
    if chosen:
        return load_backend(chosen)
    reasons = []
    for candidate in _MODULES:
        try:
            return load_backend(candidate)
        except BackendUnavailableError as exc:
            reasons.append(str(exc))
    raise BackendUnavailableError("no streamkit backend is available:\n  " + "\n  ".join(reasons))


def set_backend(name: str | None) -> None:
    """Select the backend used when no :func:`use_backend` block or fake session is active
    (``None`` restores the default choice). The selection is process-wide."""
    global _selected
    if name is not None and not isinstance(name, str):
        raise TypeError(
            f"set_backend(name): expected a backend name (str) such as {', '.join(map(repr, _MODULES))}, or None;"
            f" got {type(name).__name__} {name!r}"
        )
    if name is not None:
        load_backend(name)  # fail now, not at first use
    _selected = name


def activate(backend: Backend, scope: Any = None) -> None:
    """Make ``backend`` the active one (process-wide) until :func:`deactivate`: for backends whose
    activity is scoped, such as a fake session (``scope``: what is active within the backend, read
    back with :func:`active_scope`). Most code wants :func:`use_backend`."""
    with _lock:
        _active.append((backend, scope))


def deactivate(backend: Backend, scope: Any = None) -> None:
    """Undo the innermost :func:`activate` of ``backend`` with ``scope`` (scopes may end out of
    strict order when used from several threads)."""
    with _lock:
        for i in range(len(_active) - 1, -1, -1):
            if _active[i][0] is backend and _active[i][1] is scope:
                del _active[i]
                return


def active_backend() -> Backend | None:
    """The innermost active backend (a :func:`use_backend` block or an open scope), or ``None``."""
    stack = _active
    return stack[-1][0] if stack else None


def active_scope(backend: Backend) -> Any:
    """The innermost scope :func:`activate` pushed with ``backend`` (``None``: none is open)."""
    with _lock:
        for entry_backend, scope in reversed(_active):
            if entry_backend is backend and scope is not None:
                return scope
    return None


@contextmanager
def use_backend(name: str) -> Iterator[Backend]:
    """Make backend ``name`` the active backend (process-wide) inside the block; yields it."""
    backend = load_backend(name)
    activate(backend)
    try:
        yield backend
    finally:
        deactivate(backend)
