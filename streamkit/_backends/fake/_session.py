"""``fake.session()``: open a fake session (the session factory the backend holds makes it: a
:class:`Session` of its own, or under the checker a scope of the checker's session)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from ._deferred import PCT_DEPTH
from ._engine import DETECT_MODES, Session
from ._fake_backend import BACKEND, FakeBackend
from ._stats import Stats

__all__ = ["DETECT_MODES", "FakeBackend", "Session", "Stats", "session"]


def _default_session() -> Session:
    return Session("raise")


BACKEND.default_factory = _default_session
BACKEND.new_session = Session


@contextmanager
def session(
    detect: str = "raise", schedule: str | None = None, seed: int = 0, depth: int = PCT_DEPTH, target: Any = None
) -> Iterator[Session]:
    """Open a fake session: the fake backend becomes the active backend for every ``sk.*`` call
    (process-wide) until the block ends.

    ``detect="raise"`` raises :class:`~streamkit.RaceError` at the second access of a race,
    ``"record"`` appends it to ``session.races`` and goes on, ``"off"`` tracks nothing.

    Inside a checker run (``python -m streamkit check``), the block is a scope of the checker's
    session instead (see :class:`streamkit.check.CheckedBlock`): the checker sees every race, and the block's
    ``detect`` still decides whether a race raises.
    """
    s = BACKEND.new_session(detect, schedule, seed, depth, target)
    with s:
        yield s


