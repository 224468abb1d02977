"""Which fake session is active: the one place that knows.

The open explicit session (``with fake.session():``) if any, else the process-wide default session
(``detect="raise"``), made on first use. Ops on fake tensors read :data:`current` on every call.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from ..._errors import SessionClosedError, StreamkitError

#: the session fake-device ops run in now (``None`` until a session exists); read with ``current or get()``
current: Any = None
_explicit: Any = None
_default: Any = None
_make_default: Callable[[], Any] | None = None  # set by _session (it owns the Session class)
_lock = threading.Lock()


def set_default_factory(factory: Callable[[], Any]) -> None:
    global _make_default
    _make_default = factory


def get() -> Any:
    """The active session (making the default one if there is none yet)."""
    global current, _default
    session = current
    if session is not None:
        return session
    with _lock:
        if _explicit is not None:
            return _explicit
        if _default is None:
            assert _make_default is not None, "the fake backend's _session module sets the factory on import"
            _default = _make_default()
        current = _default
        return _default


def explicit() -> Any:
    """The open explicit session, or ``None``."""
    return _explicit


def enter(session: Any) -> None:
    """``session`` becomes the active one (sessions don't nest)."""
    global current, _explicit
    with _lock:
        if session.closed:
            raise SessionClosedError(f"{session!r} has ended; open a new fake.session()")
        if _explicit is not None:
            raise StreamkitError(
                f"a fake session is already open ({_explicit!r}); fake sessions don't nest: close it first"
            )
        _explicit = current = session


def leave(session: Any) -> None:
    """``session`` has ended: the default session is active again."""
    global current, _explicit
    with _lock:
        if _explicit is session:
            _explicit = None
            current = _default
