"""Stream and event handles: what ``sk.Stream`` and ``sk.Event`` hold on the fake backend.

A handle is not tied to one session. It resolves to its state (a :class:`~._clocks.StreamState` or
:class:`~._clocks.EventState`) in the session active when it is used:

- in the session it was created in (its *home*), to the state made there;
- in an explicit ``fake.session()`` it was not created in (it was created at import time, in the
  process-wide default session, or in an earlier explicit session), to a state of that session
  bound on first use: a new stream of its own (same priority, same creation site for reports), or a
  never-recorded event;
- in the process-wide default session, when it was created in an explicit session (which has
  ended, since sessions don't nest): :class:`~streamkit.SessionClosedError`.

The default stream is one handle for every session: it is each session's default stream.
Nothing ever runs silently on another stream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..._errors import SessionClosedError
from ._clocks import EventState, StreamState

if TYPE_CHECKING:
    from ._interface import Engine


class FakeStream:
    """A fake stream handle. ``home``/``home_state``: where it was created; ``session``/``state``:
    the binding used last (the fast check)."""

    __slots__ = ("priority", "site", "home", "home_state", "session", "state", "__weakref__")

    def __init__(self, priority: int, site: Any, home: Any) -> None:
        self.priority = priority
        self.site = site
        self.home = home
        self.home_state: StreamState | None = None
        self.session: "Engine | None" = None
        self.state: Any = None

    def _new_state(self, session: "Engine") -> StreamState:
        return session.clocks.new_stream(self.priority, self.site, self)

    def __repr__(self) -> str:
        if self is DEFAULT_STREAM:
            return "default"
        return f"#{self.state.idx}" if self.state is not None else "<unbound fake stream>"


class FakeEvent:
    """A fake event handle (see :class:`FakeStream`)."""

    __slots__ = ("enable_timing", "recorded", "home", "home_state", "session", "state", "__weakref__")

    def __init__(self, enable_timing: bool, home: Any) -> None:
        self.enable_timing = enable_timing
        self.recorded = False  # in any session (a wait in a session where it was not is still a no-op)
        self.home = home
        self.home_state: EventState | None = None
        self.session: "Engine | None" = None
        self.state: Any = None

    def _new_state(self, session: "Engine") -> EventState:
        return EventState(self.enable_timing)

    def __repr__(self) -> str:
        return repr(self.state)


#: every session's default stream
DEFAULT_STREAM = FakeStream(0, (), None)


def new_stream(session: "Engine", priority: int, site: Any) -> FakeStream:
    handle = FakeStream(priority, site, session)
    with session.lock:
        handle.home_state = handle.state = handle._new_state(session)
    handle.session = session
    return handle


def new_event(session: "Engine", enable_timing: bool) -> FakeEvent:
    handle = FakeEvent(enable_timing, session)
    handle.home_state = handle.state = handle._new_state(session)
    handle.session = session
    return handle


def resolve(handle: Any, session: "Engine") -> Any:
    """``handle``'s state in ``session`` (the active session), binding it on first use there."""
    if handle.session is session:
        return handle.state
    return _bind(handle, session)


def _bind(handle: Any, session: "Engine") -> Any:
    if handle is DEFAULT_STREAM:
        state = session.default_stream
    elif handle.home is session:
        state = handle.home_state
    elif session is not session.backend.explicit():
        # The process-wide default session is active and the handle is of an explicit session,
        # which has ended: refuse rather than run its work on a stream of the default session.
        kind = "stream" if type(handle) is FakeStream else "event"
        raise SessionClosedError(
            f"this {kind} was created in a fake session that has ended ({handle.home!r}) and no fake.session() is"
            f" open now; use it inside a new fake.session() (it then works as {'a stream' if kind == 'stream' else 'an event'} of that session)"
            f" or create a new streamkit.{kind.capitalize()}()"
        )
    else:
        with session.lock:
            if handle.session is session:
                return handle.state
            state = handle._new_state(session)
    handle.state = state
    handle.session = session
    return state
