"""The fake engine's interface: what the dispatch handlers, the fast path, the allocator, graphs,
collectives, pinned memory and the backend facade may use of a session (:class:`Engine`).

:class:`._engine.Session` implements it; the checker's scope (``streamkit._checker_scope``)
forwards it to the checker's session. Anything of a session not named here is the engine's own.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, ContextManager, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from ._clocks import Clocks, StreamState
    from ._report import Race, Reporter
    from ._stats import Stats
    from ._tracking import Kernel


@runtime_checkable
class Engine(Protocol):
    """One fake device as its users see it: streams, the lock, the clocks, the scheduler, the
    capture underway, and the operations that launch kernels and synchronize the host.

    ``isinstance(obj, Engine)`` is how code asks "is this a fake session" (a
    :class:`._engine.Session`, or the checker's scope of one), not ``Session`` inheritance."""

    # -- what the session is -------------------------------------------------------------------
    detect: str  #: "raise" | "record" | "off"
    races: "list[Race]"
    stats: "Stats"
    closed: bool
    backend: Any  #: the FakeBackend

    @property
    def device(self) -> "torch.device": ...

    # -- the engine's state its users read -----------------------------------------------------
    tracked: bool  #: accesses are tracked (detection on, or a deferred schedule)
    eager: bool  #: the scheduler runs each kernel at issue
    lock: threading.RLock  #: guards the clocks, access tables and pools
    clocks: "Clocks"
    scheduler: Any  #: EagerScheduler or a deferred one (``submit``, ``run_now``, ``drain``...)
    reporter: "Reporter"
    capture: Any  #: the graph capture underway (``_graph.Capture``), or None
    pending: Any  #: a RaceError found meanwhile (a free race), raised at the next launch or sync
    default_stream: "StreamState"
    site_depth: int  #: user frames captured per kernel's issue site
    on_raced: Any  #: fake.explore's observation hook (``(state, kernels)`` per race found), or None

    # -- streams -------------------------------------------------------------------------------
    def current_stream(self) -> "StreamState":
        """The calling thread's current stream."""
        ...

    def set_current_stream(self, stream: "StreamState | None") -> None:
        """The calling thread's current stream becomes ``stream`` (``None``: the default stream)."""
        ...

    def stream_context(self, stream: "StreamState") -> ContextManager[None]:
        """Make ``stream`` the calling thread's current stream inside the block."""
        ...

    # -- kernels -------------------------------------------------------------------------------
    def launch(
        self, op: Any, call: Any, stream: "StreamState | None", site: Any, args: Any, kwargs: Any, accesses: list,
        sync: str | None = None, sync_before: str | None = None,
    ) -> "tuple[Kernel, Any]":
        """Issue a kernel and hand it to the scheduler: ``(kernel, result)``."""
        ...

    def issue(self, op: Any, stream: "StreamState", site: Any, accesses: list) -> "Kernel":
        """Issue a kernel without running it, under :attr:`lock` (the caller binds and runs it: collectives)."""
        ...

    # -- the host ------------------------------------------------------------------------------
    def host_sync(self, clock: Any, kind: str) -> None:
        """The host waited for the work ordered by ``clock`` (counted under ``Stats.<kind>``)."""
        ...

    def host_sync_all(self) -> None:
        """The host waited for the whole device."""
        ...

    def query(self, clock: Any) -> bool:
        """Whether the work ordered by ``clock`` has run (``True`` is a host sync)."""
        ...

    def drained(self, clock: Any) -> None:
        """A deferred schedule: run the queued work ordered by ``clock`` (``None``: everything) now."""
        ...

    # -- memory --------------------------------------------------------------------------------
    def record_stream(self, tensor: "torch.Tensor", state: "StreamState") -> None:
        """``record_stream(tensor, stream)``."""
        ...


def engine_members() -> frozenset[str]:
    """The names :class:`Engine` declares (attributes, properties and methods)."""
    names = set(Engine.__annotations__)
    names |= {n for n, v in vars(Engine).items() if callable(v) or isinstance(v, property)}
    return frozenset(n for n in names if not n.startswith("_"))
