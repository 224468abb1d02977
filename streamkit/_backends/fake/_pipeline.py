"""The launch pipeline: one op call on the fake device, as every entry point makes it.

An :class:`OpCall` is made once per entry point (a dispatch handler, a graph replay's kernel, a
collective): it resolves the session, the stream (the current one unless given) and the issue site
(captured once, from the frame the entry point passes: no frame depths are counted), holds the
unwrapped arguments and the accesses, and launches:

- :meth:`OpCall.launch`: an ordinary kernel (``Engine.launch``: the scheduler runs it, a graph
  capture records it, ``sync`` names the host synchronization after it);
- :meth:`OpCall.run_now`: a kernel issued under the session lock and run right away outside it
  (a collective: it blocks on its peers, and other threads must keep issuing).

The dispatch handlers use :class:`._tensor.DispatchCall`, which adds the steps that know fake
tensors (unwrap the arguments into CPU tensors and accesses; wrap the results); a non-blocking copy
hands its launched call to pinned memory (``_pinned.written_by``/``read_by``). Graph replay and
collectives fill an :class:`OpCall` themselves (captured arguments and memory ranges; a collective's
process-group stream).

Not through it: the fast path (:mod:`._fastpath`), the one specialised copy of these steps, for
speed; views and metadata changes (no kernel: they only unwrap and wrap); and pinned memory's host
accesses (a check against earlier copies, no kernel).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._clocks import merge
from ._sites import capture_site

if TYPE_CHECKING:
    from ._clocks import StreamState
    from ._interface import Engine
    from ._tracking import Kernel

class OpCall:
    """One op call through the pipeline: ``op`` (what the kernel is called in reports and stats),
    ``call`` (what runs it on the unwrapped arguments), in ``session``, on ``stream`` (``None``: the
    calling thread's current stream), issued at the site captured from ``frame`` (or ``site`` as
    given: a graph replay reuses its own).

    After the steps: :attr:`args`/:attr:`kwargs` (unwrapped), :attr:`accesses` (``(tensor or
    MemoryRange, kind)``), :attr:`kernel` (once launched).
    """

    __slots__ = ("session", "op", "call", "stream", "site", "args", "kwargs", "accesses", "kernel")

    def __init__(
        self, session: "Engine", op: Any, call: Any, frame: Any = None, *, site: Any = None,
        stream: "StreamState | None" = None,
    ) -> None:
        self.session = session
        self.op = op
        self.call = call
        self.stream = session.current_stream() if stream is None else stream
        # the site is captured once per entry point, and only when something may report it
        self.site = capture_site(frame, session.site_depth) if frame is not None and session.tracked else site
        self.args: Any = ()
        self.kwargs: dict = {}
        self.accesses: list = []
        self.kernel: "Kernel | None" = None

    def launch(self, sync: str | None = None, sync_before: str | None = None) -> Any:
        """Issue the kernel and hand it to the scheduler (see ``Engine.launch``): its result (a
        deferred schedule's placeholders, or what a graph capture hands back)."""
        self.kernel, result = self.session.launch(
            self.op, self.call, self.stream, self.site, self.args, self.kwargs, self.accesses, sync, sync_before
        )
        return result

    def run_now(self, after: "StreamState | None" = None, snapshot: bool = False) -> tuple[Any, list[int] | None]:
        """Issue the kernel under the session lock (first ordering :attr:`stream` after ``after``'s
        work, if given) and run it now, outside the lock, after what it is ordered after:
        ``(result, clock)``, ``clock`` being :attr:`stream`'s clock right after the issue when
        ``snapshot`` (and the session tracks), else ``None``."""
        session = self.session
        stream = self.stream
        with session.lock:
            if after is not None and session.tracked:
                merge(stream.clock, after.clock)
            kernel = self.kernel = session.issue(self.op, stream, self.site, self.accesses).bind(
                self.call, self.args, self.kwargs
            )
            clock = list(stream.clock) if snapshot and session.tracked else None
        return session.scheduler.run_now(kernel), clock
