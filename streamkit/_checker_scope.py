"""The checker's scope: the session ``python -m streamkit check`` runs a script in, and what a
``fake.session()`` opened by that script is (a :class:`CheckedBlock`, a scope of the checker's
session). While the checker's session is open it installs its own session factory on the fake
backend, so ``fake.session()`` itself knows nothing of the checker."""

from __future__ import annotations

import gc
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from ._backends.fake import _emulate
from ._backends.fake._engine import DETECT_MODES, Session
from ._backends.fake._fake_backend import BACKEND, FakeBackend
from ._backends.fake._interface import engine_members
from ._backends.fake._report import Race
from ._backends.fake._stats import Stats
from ._errors import SessionClosedError, StreamkitError, StreamkitWarning


class CheckedBlock:
    """What ``fake.session(detect)`` gives a script that runs under the checker: a scope of the
    checker's open session (one device: same streams, tensors and race detector), not a session
    of its own.

    It has a session's public surface (:attr:`device`, :attr:`detect`, :attr:`races`,
    :attr:`stats`, :attr:`closed`, :attr:`backend`; it is a context manager) and the fake engine's
    interface, forwarded to :attr:`host` (the device is the host's).

    - ``detect="raise"``: a race inside the block raises :class:`~streamkit.RaceError` as in a
      session of its own (and the checker reports it too); ``"record"`` and ``"off"`` don't raise
      (under the checker, an ``"off"`` block is checked like ``"record"``).
    - :attr:`races`: the races found while the block was open (a list made on each read; the
      checker's report has them all); :attr:`stats`: what the device did while it was open.
    - Blocks don't nest, as sessions don't; streams made inside stay usable after the block (they
      belong to the checker's session, which closes when the script ends).
    """

    closed: bool = False  #: the block has ended (the host's session goes on)

    def __init__(self, host: Session, detect: str = "raise") -> None:
        if detect not in DETECT_MODES:
            raise ValueError(f"session(detect): expected one of {', '.join(map(repr, DETECT_MODES))}, got {detect!r}")
        self._host = host
        self._detect = detect
        self.closed = False
        self._start = len(host.races)
        self._end: int | None = None
        self._stats_start = host.stats.copy()
        self._stats_end: Stats | None = None
        self._saved_detect = host.detect

    @property
    def detect(self) -> str:
        """The block's detection mode (``"raise"``, ``"record"`` or ``"off"``): whether a race raises in the script."""
        return self._detect

    @property
    def races(self) -> list[Race]:
        """The races found while the block was open (a new list on each read)."""
        return list(self._host.races[self._start:self._end])

    @property
    def stats(self) -> Stats:
        """What the device did while the block was open."""
        return (self._stats_end or self._host.stats) - self._stats_start

    @property
    def backend(self) -> "FakeBackend":
        """The fake backend (the host's)."""
        return self._host.backend

    @property
    def device(self) -> torch.device:
        """The fake device (the host's): tensors created on it behave as device tensors."""
        return self._host.device

    @property
    def host(self) -> Session:
        """The checker's session this block is a scope of."""
        return self._host

    def __enter__(self) -> "CheckedBlock":
        host = self._host
        if self.closed:
            raise SessionClosedError(f"{self!r} has ended; open a new fake.session()")
        if host.checker_block is not None:
            raise StreamkitError(
                f"a fake session is already open ({host.checker_block!r}); fake sessions don't nest: close it first"
            )
        host.checker_block = self
        self._saved_detect = host.detect
        if self._detect == "raise":
            host.detect = "raise"  # the host still records every race; now it raises them too
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        host = self._host
        try:
            if exc_type is None:
                gc.collect()  # as a session's exit: free what only cycles keep alive, inside the block
        finally:
            host.detect = self._saved_detect
            host.checker_block = None
            self.closed = True
            self._end = len(host.races)
            self._stats_end = host.stats.copy()
        pending, host.pending = host.pending, None  # set only while detect was "raise": this block's
        if pending is not None and exc_type is None:
            raise pending

    def __repr__(self) -> str:
        return f"<fake session detect={self._detect!r} {'closed' if self.closed else 'open'}, inside the checker's session>"


CheckedBlock.__module__ = "streamkit.check"  # its public name: streamkit.check.CheckedBlock


def _forwarded(name: str) -> property:
    def get(self: CheckedBlock) -> Any:
        return getattr(self._host, name)

    def put(self: CheckedBlock, value: Any) -> None:
        setattr(self._host, name, value)

    return property(get, put, doc=f"The host session's ``{name}`` (the engine is the host's).")


# The engine's interface and a session's other public attributes: the host's. (Explicit, so a
# name neither has is an AttributeError of the block.)
for _name in sorted(engine_members() | {"schedule", "seed", "depth", "fingerprint_matched"}):
    if _name not in vars(CheckedBlock):
        setattr(CheckedBlock, _name, _forwarded(_name))
del _name


@contextmanager
def _emulating_block(emulate: str, block: CheckedBlock) -> Iterator[CheckedBlock]:
    with _emulate.emulating(emulate), block:
        yield block


class _RaceLog(list):
    """``session.races`` of a checker session: calls ``on_race(race)`` for each race appended."""

    def __init__(self, on_race: Any) -> None:
        super().__init__()
        self._on_race = on_race

    def append(self, race: Race) -> None:
        super().append(race)
        try:
            self._on_race(race)
        except Exception:  # a report that can't be written must not break the checked program
            pass


@contextmanager
def checker_session(on_race: Any = None, emulate: str | None = None) -> Iterator[Session]:
    """The checker's session (``detect="record"``): a ``fake.session()`` the checked script opens
    inside it becomes a :class:`CheckedBlock` of it. ``on_race(race)`` is called for every new race
    as it is found (a spawned child streams its report this way, so a crash loses nothing)."""
    s = Session("record", emulate=emulate)
    s.checker_block = None  # type: ignore[attr-defined]
    if on_race is not None:
        s.races = _RaceLog(on_race)
        s.reporter.races = s.races

    def open_block(
        detect: str = "raise", schedule: str | None = None, seed: int = 0, depth: int = 0, target: Any = None,
        emulate: str | None = None,
    ) -> Any:
        if schedule not in (None, "eager"):
            warnings.warn(
                StreamkitWarning(
                    f"fake.session(schedule={schedule!r}) under `python -m streamkit check`: the checker runs"
                    " the script on its own eager session; run fake.explore() outside the checker to explore schedules"
                ),
                stacklevel=4,
            )
        block = CheckedBlock(s, detect)
        if emulate is not None and _emulate.check_name(emulate) != s.emulate:
            # (emulation hook: the block emulates on the checker's device; npu needs it from the start)
            return _emulating_block(emulate, block)
        return block

    saved = BACKEND.new_session
    with s:
        BACKEND.new_session = open_block
        try:
            yield s
        finally:
            BACKEND.new_session = saved
