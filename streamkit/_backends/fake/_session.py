"""``fake.session()``: open a fake session (the session factory the backend holds makes it: a
:class:`Session` of its own, or under the checker a scope of the checker's session)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from . import _emulate
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
    detect: str = "raise", schedule: str | None = None, seed: int = 0, depth: int = PCT_DEPTH, target: Any = None,
    emulate: str | None = None,
) -> Iterator[Session]:
    """Open a fake session: the fake backend becomes the active backend for every ``sk.*`` call
    (process-wide) until the block ends.

    ``detect="raise"`` raises :class:`~streamkit.RaceError` at the second access of a race,
    ``"record"`` appends it to ``session.races`` and goes on, ``"off"`` tracks nothing.

    ``emulate="cuda"`` / ``"npu"``: inside the block the fake device is that device type, and
    unmodified ``torch.cuda`` / ``torch.npu`` / ``torch_npu`` code runs on it (docs/emulation.md);
    ``None`` (default) takes ``STREAMKIT_EMULATE`` from the environment, else the ``fake`` device.

    Inside a checker run (``python -m streamkit check``), the block is a scope of the checker's
    session instead (see :class:`streamkit.check.CheckedBlock`): the checker sees every race, and the block's
    ``detect`` still decides whether a race raises.
    """
    if emulate is not None:
        _emulate.check_name(emulate)
    s = BACKEND.new_session(detect, schedule, seed, depth, target, emulate=emulate)
    host = BACKEND.explicit()
    if host is not None and host.yields_to_sessions and not host.closed:
        # (emulation hook: the per-test session of `pytest --streamkit-emulate` steps aside for the
        # test's own sessions, and is the active one again after them)
        BACKEND.leave(host)
        try:
            with s as opened:
                yield opened
        finally:
            BACKEND.enter(host)
        return
    with s as opened:
        yield opened


