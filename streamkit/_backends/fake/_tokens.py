"""Tokens and the constraint form of a schedule (docs/exploration.md, "Tokens"): kernels named
stably across runs and edits (:class:`KernelId`), the fingerprint of a run's kernel sequence, the
``"constraints"`` schedule's rule (:class:`Constraints`), and token parsing.

Apart from :mod:`._explore` because ``fake.session(schedule=TOKEN)`` (:mod:`._session`) reads
tokens too, and :mod:`._explore` imports the session.
"""

from __future__ import annotations

import base64
import json
import linecache
import os
import warnings
import zlib
from typing import Any, NamedTuple, Sequence

from ..._errors import ReplayFallbackWarning  # noqa: F401  (re-exported: fake.ReplayFallbackWarning)
from ._policies import PCT_DEPTH, SCHEDULES, PairHolds, ScheduleError, check_args, parse_short, token_format
from ._report import stream_description
from ._sites import line_of

TOKEN_FORMAT = (
    f"'SCHEDULE[/FINGERPRINT[/CONSTRAINTS]]': SCHEDULE one of {token_format()} (S.N: a kernel as stream"
    " index . sequence number), followed in fake.explore's tokens by '+focus=' and its encoded focus;"
    " FINGERPRINT 8 hex digits (or '-'); CONSTRAINTS the encoded constraint list of a token fake.explore made"
)


class KernelId(NamedTuple):
    """A kernel named stably across runs and unrelated edits: ``op`` (``"aten.mul_"``), ``file``
    (base name), ``func`` (the function it was issued from), ``text`` (that source line, stripped;
    ``"#LINE"`` when the source can't be read) and ``occurrence`` (1 for the first kernel of this
    (op, file, func, text) in the run, in issue order). ``line`` and ``stream`` are for display only:
    matching ignores them, so a kernel is found again after lines were inserted above it."""

    op: str
    file: str
    func: str
    text: str
    occurrence: int
    line: int
    stream: str

    @property
    def key(self) -> tuple:
        return (self.op, self.file, self.func, self.text, self.occurrence)

    def __str__(self) -> str:
        return f"{self.op} on {self.stream} ({self.file}:{self.line})"


_SITE_INFO: dict = {}  # (code, offset) -> (file base name, function, line text, line)
_OP_NAMES: dict = {}


def _op_name(op: Any) -> str:
    name = _OP_NAMES.get(op)
    if name is None:
        schema = getattr(op, "_schema", None)
        name = _OP_NAMES[op] = schema.name.replace("::", ".") if schema is not None else str(op)
    return name


class Namer:
    """Names the kernels of one run, in issue order (occurrences are counted per run)."""

    def __init__(self) -> None:
        self.counts: dict = {}
        self.files: set = set()  # files whose cached source was checked against the disk this run
        self.streams: dict = {}

    def __call__(self, kernel: Any) -> KernelId:
        site = kernel.site
        if site:
            code, offset = site[0]  # (the innermost user frame)
            where = _SITE_INFO.get((code, offset))
            if where is None:
                line = line_of(code, offset)
                filename = code.co_filename
                if filename not in self.files:
                    linecache.checkcache(filename)  # (the file may have been edited since it was read)
                    self.files.add(filename)
                text = linecache.getline(filename, line).strip() or f"#{line}"
                if len(_SITE_INFO) > 65536:
                    _SITE_INFO.clear()
                where = _SITE_INFO[(code, offset)] = (os.path.basename(filename), code.co_name, text, line)
        else:
            where = ("?", "?", "#0", 0)
        op = _op_name(kernel.op)
        base = (op,) + where[:3]
        n = self.counts[base] = self.counts.get(base, 0) + 1
        state = kernel.stream
        stream = self.streams.get(state.idx)
        if stream is None:
            stream = self.streams[state.idx] = "default" if state.idx == 0 else stream_description(state)[1]
        return KernelId(op, where[0], where[1], where[2], n, where[3], stream)


def fingerprint(ids: Sequence[KernelId]) -> str:
    """The run's kernel sequence as 8 hex digits: CRC-32 of (op, file, line) in issue order (so
    any added, removed or moved kernel, and any line shift, changes it)."""
    crc = 0
    for k in ids:
        crc = zlib.crc32(f"{k.op}|{k.file}|{k.line}\n".encode(), crc)
    return f"{crc:08x}"


class Constraints:
    """The ``"constraints"`` schedule's rule: for each pair ``(a, b)`` of :class:`KernelId`, the
    run's kernel matching ``b`` waits until the one matching ``a`` has run; every other kernel runs
    as early as eager would. Kernels are matched as they are issued by :attr:`KernelId.key` (op,
    file, function, source line text, occurrence). A host sync that needs a held kernel runs it
    anyway (its constraints are then in :attr:`dropped`); a constraint whose kernels the run never
    issued is in :meth:`unmatched`."""

    def __init__(self, pairs: Any) -> None:
        try:
            self.pairs = tuple((KernelId(*a), KernelId(*b)) for a, b in pairs)
        except (TypeError, ValueError):
            raise ValueError(
                f"session(target): schedule=\"constraints\" takes pairs (a, b) of fake.KernelId, got {pairs!r}"
            ) from None
        self._namer = Namer()
        self._holds = PairHolds((a.key, b.key) for a, b in self.pairs)
        #: (a key, b key) pairs a host sync overrode
        self.dropped = self._holds.dropped
        self._keys: dict = {}  # id(kernel) -> key, for the kernels a constraint names
        self._alive: list = []  # (those kernels: their ids stay unique)
        self._matched: set = set()

    def issued(self, kernel: Any) -> None:
        key = self._namer(kernel).key
        if self._holds.names(key):
            self._keys[id(kernel)] = key
            self._alive.append(kernel)
            self._matched.add(key)

    def held(self, kernel: Any) -> bool:
        return self._holds.held(self._keys.get(id(kernel)))

    def ran(self, kernel: Any) -> None:
        self._holds.ran(self._keys.get(id(kernel)))

    def unmatched(self) -> list[tuple[KernelId, KernelId]]:
        """The constraints one of whose kernels this run never issued."""
        return [(a, b) for a, b in self.pairs if a.key not in self._matched or b.key not in self._matched]


def encode_constraints(pairs: Sequence[tuple[KernelId, KernelId]]) -> str:
    data = json.dumps([[list(a), list(b)] for a, b in pairs], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(zlib.compress(data, 9)).decode().rstrip("=")


def _decode(text: str) -> tuple[tuple[KernelId, KernelId], ...]:
    data = json.loads(zlib.decompress(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))))
    pairs = []
    for a, b in data:
        ids = []
        for k in (a, b):
            op, file, func, line_text, occurrence, line, stream = k
            if not (all(isinstance(v, str) for v in (op, file, func, line_text, stream)) and type(occurrence) is int and type(line) is int):
                raise ValueError(k)
            ids.append(KernelId(op, file, func, line_text, occurrence, line, stream))
        pairs.append(tuple(ids))
    return tuple(pairs)


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def occurrence_totals(ids: Sequence[KernelId]) -> dict:
    """How many kernels of each (op, file, function, line text) a run issued."""
    totals: dict = {}
    for k in ids:
        base = k.key[:4]
        totals[base] = max(totals.get(base, 0), k.occurrence)
    return totals


def describe(k: KernelId, totals: dict | None = None) -> str:
    """``aten.add_ on side (a.py:12)``; a kernel issued more than once from that line (a loop) with
    its occurrence: ``aten.add_ on side (a.py:12, 10th of 10)`` (``totals``:
    :func:`occurrence_totals` of the run; without it, ``3rd`` alone past the first)."""
    total = totals.get(k.key[:4], 0) if totals else 0
    if total > 1:
        return f"{k.op} on {k.stream} ({k.file}:{k.line}, {_ordinal(k.occurrence)} of {total})"
    if k.occurrence > 1 and not totals:
        return f"{k.op} on {k.stream} ({k.file}:{k.line}, {_ordinal(k.occurrence)})"
    return str(k)


def explanation(pairs: Sequence[tuple[KernelId, KernelId]], totals: dict | None = None) -> str:
    """One line per constraint: ``ran aten.zero_ on default (a.py:12) before aten.sum on side (a.py:14)``."""
    return "\n".join(f"ran {describe(a, totals)} before {describe(b, totals)}" for a, b in pairs)


#: what joins a schedule's focus to its short token (``rates:7+focus=BLOB``; :func:`encode_focus`):
#: the kernels the run ordered, the rest ran at issue (fake.explore's runs)
FOCUS_MARK = "+focus="


def encode_focus(focus: frozenset) -> str:
    """The focus kernels ``(stream, seq)`` as text: per stream the gaps between sequence numbers,
    JSON, zlib, URL-safe base64 without padding (a loop's kernels compress to a few characters);
    empty for none."""
    if not focus:
        return ""
    streams: dict = {}
    for stream, seq in sorted(focus):
        streams.setdefault(stream, []).append(seq)
    data = [[stream, [b - a for a, b in zip([0, *seqs], seqs)]] for stream, seqs in streams.items()]
    return base64.urlsafe_b64encode(zlib.compress(json.dumps(data, separators=(",", ":")).encode(), 9)).decode().rstrip("=")


def decode_focus(text: str) -> frozenset:
    """:func:`encode_focus` read back; ValueError for anything else."""
    if not text:
        return frozenset()
    data = json.loads(zlib.decompress(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))))
    found = set()
    for stream, gaps in data:
        if type(stream) is not int or stream < 0 or not all(type(g) is int and g > 0 for g in gaps):
            raise ValueError(text)
        seq = 0
        for gap in gaps:
            seq += gap
            found.add((stream, seq))
    return frozenset(found)


class Token(NamedTuple):
    """A parsed token (:func:`read_token`)."""

    schedule: str
    seed: int
    depth: int
    target: Any
    fingerprint: str | None
    constraints: tuple
    #: the kernels the schedule ordered, the rest ran at issue (:data:`FOCUS_MARK`); None: all
    focus: frozenset | None = None


def _parse_short(token: str) -> tuple[str, int, int, Any]:
    return parse_short(token)


def read_token(token: str) -> Token:
    """A token (``Run.token``) as a :class:`Token`: ``SCHEDULE[/FINGERPRINT[/CONSTRAINTS]]``
    (:data:`TOKEN_FORMAT`); ValueError naming the format for anything else."""
    try:
        parts = str(token).split("/")
        if len(parts) > 3:
            raise ValueError(token)
        short, mark, blob = parts[0].partition(FOCUS_MARK)
        focus = decode_focus(blob) if mark else None
        name, seed, depth, target = _parse_short(short)
        if focus is not None and name in ("constraints", "eager"):
            raise ValueError(token)
        fp = None
        if len(parts) > 1:
            fp = parts[1]
            if fp == "-":
                fp = None
            elif len(fp) != 8 or any(c not in "0123456789abcdef" for c in fp):
                raise ValueError(fp)
        constraints = _decode(parts[2]) if len(parts) > 2 else ()
        if name == "constraints" and not constraints:
            raise ValueError(token)
    except Exception:  # (base64, zlib and json errors too)
        raise ValueError(f"schedule token: expected {TOKEN_FORMAT}; got {token!r}") from None
    return Token(name, seed, depth, target, fp, constraints, focus)


def parse_token(token: str) -> tuple[str, int, int, Any]:
    """A token as ``(schedule, seed, depth, target)``: ``"schedule:seed"`` (depth
    :data:`PCT_DEPTH`, target None), ``"pct:seed:depth"``, or ``"race:S.N:S.N"`` (seed 0; target the
    two kernels as ``(stream, seq)`` pairs); a full token's fingerprint and constraints are read
    (and checked) but left out (:func:`read_token` has them). ValueError for anything else."""
    return tuple(read_token(token)[:4])  # type: ignore[return-value]


def session_args(token: str, where: str = "session(schedule)") -> tuple[str, int, int, Any, str | None, frozenset | None]:
    """``fake.session(schedule=TOKEN)``: ``(schedule, seed, depth, target, fingerprint, focus)``. A
    ``"constraints/..."`` token runs its constraint form; any other its seed's schedule (the
    session warns at exit when the fingerprint doesn't match), over its focus if it has one."""
    try:
        t = read_token(token)
    except ValueError as error:
        raise ScheduleError(f"{where}: a schedule name in {SCHEDULES} or a {error}") from None
    target = Constraints(t.constraints) if t.schedule == "constraints" else t.target
    # (the constraint form matches kernels by name, not by the sequence: nothing to check)
    return t.schedule, t.seed, t.depth, target, None if t.schedule == "constraints" else t.fingerprint, t.focus


class ScheduleSpec(NamedTuple):
    """What ``fake.session(schedule, seed, depth, target)`` runs, checked (:func:`resolve_schedule`):
    ``token`` and ``fingerprint`` are set for ``schedule=TOKEN``."""

    schedule: str
    seed: int
    depth: int
    target: Any
    token: str | None = None
    fingerprint: str | None = None
    #: the token's focus (:data:`FOCUS_MARK`): the kernels the schedule orders; None: every kernel
    focus: frozenset | None = None


#: the environment variable a session that names no schedule reads
SCHEDULE_VARIABLE = "STREAMKIT_SCHEDULE"


def resolve_schedule(schedule: Any, seed: Any = 0, depth: Any = PCT_DEPTH, target: Any = None) -> ScheduleSpec:
    """``fake.session``'s schedule arguments checked through the policy registry
    (:mod:`._policies`): ``schedule=None`` reads :data:`SCHEDULE_VARIABLE` (else ``"eager"``), a
    name or a token (``"random:7"``, a full token). Every bad value is a ValueError
    (:class:`._policies.ScheduleError`) naming the argument (or the variable), the value and what
    is accepted."""
    where = "session(schedule)"
    if schedule is None:
        schedule = os.environ.get(SCHEDULE_VARIABLE) or "eager"
        where = f"the environment variable {SCHEDULE_VARIABLE}={schedule!r} (read because session(schedule) is None)"
    if not isinstance(schedule, str):
        raise ScheduleError(f"{where}: expected a schedule name in {SCHEDULES} or a token, got {schedule!r} ({type(schedule).__name__})")
    if schedule not in SCHEDULES and (":" in schedule or "/" in schedule):
        name, seed, depth, target, fp, focus = session_args(schedule, where)
        if name == "constraints":
            return ScheduleSpec(name, seed, depth, target, schedule, fp)
        return ScheduleSpec(*check_args(name, seed, depth, target), schedule, fp, focus)
    if schedule not in SCHEDULES:
        raise ScheduleError(f"{where}: expected one of {', '.join(map(repr, SCHEDULES))} or a token ({TOKEN_FORMAT}), got {schedule!r}")
    if schedule == "constraints" and target is not None and not isinstance(target, Constraints):
        target = Constraints(target)
    return ScheduleSpec(*check_args(schedule, seed, depth, target))


def check_fingerprint(scheduler: Any, expected: str, schedule: str) -> bool:
    """At the exit of ``fake.session(schedule=TOKEN)``: whether the kernel sequence still has the
    token's fingerprint; warns :class:`ReplayFallbackWarning` if not."""
    if scheduler.trace is None:
        return True  # (too long to record: unchecked)
    namer = Namer()
    now = fingerprint([namer(k) for k in scheduler.trace])
    if now == expected:
        return True
    warnings.warn(
        ReplayFallbackWarning(
            f"fake.session(schedule={schedule!r}...): the program's kernel sequence changed since the token was made"
            f" (fingerprint {expected}, now {now}): its seed's schedule may not reproduce the failure;"
            " fake.replay(fn, token) and --streamkit-replay=TOKEN fall back to its constraint form"
        ),
        stacklevel=4,
    )
    return False
