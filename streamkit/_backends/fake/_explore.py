"""Schedule exploration: run a program under deferred schedules and compare its values with the
eager run's. ``fake.explore(fn)`` finds schedules under which a racy program computes wrong values
and shrinks the first failure to the few ordering constraints that cause it;
``fake.replay(fn, token)`` reruns one of them bit for bit.

Tokens (docs/exploration.md, "Tokens"): ``SCHEDULE[/FINGERPRINT[/CONSTRAINTS]]``. ``SCHEDULE`` is
the short form, ``"schedule:seed"`` (``"adversarial:0"``, ``"random:7"``), ``"pct:seed:depth"``,
``"race:S.N:S.N"`` or ``"constraints"``: a schedule is a deterministic function of the program,
the scheduler and its seed, so it reproduces the run of the same program (one host thread, one
process). ``FINGERPRINT`` is a CRC-32 of the run's kernel sequence (op, file, line, in issue
order); ``CONSTRAINTS`` the shrunk constraint form ("kernel A runs before kernel B", kernels named
by op, file, function, source line and occurrence), which replay runs instead of the seed when
the fingerprint no longer matches (the program was edited).
"""

from __future__ import annotations

import base64
import json
import linecache
import os
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import torch

from ..._errors import StreamkitWarning
from ._deferred import PCT_DEPTH, SCHEDULES, TRACE_LIMIT
from ._report import Race, stream_description
from ._session import session
from ._sites import line_of
from ._tensor import FakeDeviceTensor

#: ``explore(shrink=True)``: at most this many extra runs shrink a failure (each one a run of the
#: program under the "constraints" schedule; ddmin needs about 2 log2(n) of them per constraint kept)
SHRINK_RUNS = 50

TOKEN_FORMAT = (
    "'SCHEDULE[/FINGERPRINT[/CONSTRAINTS]]': SCHEDULE is 'name:seed' (name one of 'lazy', 'adversarial',"
    " 'random', 'eager'), 'pct:seed:depth', 'race:S.N:S.N' or 'constraints'; FINGERPRINT 8 hex digits"
    " (or '-'); CONSTRAINTS the encoded constraint list of a token fake.explore made"
)


class ReplayFallbackWarning(StreamkitWarning):
    """A token's fingerprint doesn't match the program's kernel sequence any more (the program was
    edited since the token was made): replay ran the token's constraint form instead of its seed
    (``Run.replayed_by == "constraints"``), or, for a token without one, the seed anyway."""


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


class _Namer:
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
        self._namer = _Namer()
        self._waiting: dict = {}  # b.key -> keys of the kernels it still waits for
        self._blocks: dict = {}  # a.key -> keys of the kernels waiting for it
        for a, b in self.pairs:
            self._waiting.setdefault(b.key, set()).add(a.key)
            self._blocks.setdefault(a.key, []).append(b.key)
        self._keys: dict = {}  # id(kernel) -> key, for the kernels a constraint names
        self._alive: list = []  # (those kernels: their ids stay unique)
        self._matched: set = set()
        self.dropped: list = []  # (a key, b key) pairs a host sync overrode

    def issued(self, kernel: Any) -> None:
        key = self._namer(kernel).key
        if key in self._waiting or key in self._blocks:
            self._keys[id(kernel)] = key
            self._alive.append(kernel)
            self._matched.add(key)

    def held(self, kernel: Any) -> bool:
        key = self._keys.get(id(kernel))
        return key is not None and bool(self._waiting.get(key))

    def ran(self, kernel: Any) -> None:
        key = self._keys.get(id(kernel))
        if key is None:
            return
        left = self._waiting.pop(key, None)
        if left:
            self.dropped.extend((a, key) for a in left)
        for b in self._blocks.pop(key, ()):
            waiting = self._waiting.get(b)
            if waiting is not None:
                waiting.discard(key)

    def unmatched(self) -> list[tuple[KernelId, KernelId]]:
        """The constraints one of whose kernels this run never issued."""
        return [(a, b) for a, b in self.pairs if a.key not in self._matched or b.key not in self._matched]


def _encode(pairs: Sequence[tuple[KernelId, KernelId]]) -> str:
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


def explanation(pairs: Sequence[tuple[KernelId, KernelId]]) -> str:
    """One line per constraint: ``ran aten.zero_ on default (a.py:12) before aten.sum on side (a.py:14)``."""
    return "\n".join(f"ran {a} before {b}" for a, b in pairs)


@dataclass
class Run:
    """One run of the program: its schedule, seed and token, the values it returned (tensors on the
    host) or the exception it raised, the races recorded, and whether it matched the eager run.

    A failure of :func:`explore`, and a run of :func:`replay`, also have ``fingerprint`` (of the
    kernel sequence), ``constraints`` (the shrunk constraint form, pairs ``(a, b)`` of
    :class:`KernelId`: ``a`` ran before ``b``, though ``b`` was issued first on another stream) and
    ``explanation`` (those constraints, one line each); a replay has ``replayed_by``: ``"schedule"``
    (the seed's schedule) or ``"constraints"`` (the constraint form)."""

    schedule: str
    seed: int
    depth: int = PCT_DEPTH  # (pct only)
    target: Any = None  # (race only: ((stream, seq), (stream, seq)), the second kernel runs first)
    values: Any = None
    error: BaseException | None = None
    races: list[Race] = field(default_factory=list)
    ok: bool = True
    fingerprint: str | None = None
    constraints: tuple = ()
    explanation: str | None = None
    replayed_by: str | None = None
    #: explore: the deviations the failing run made (before shrinking), and the runs shrinking took
    deviations: int = 0
    shrink_runs: int = 0
    _trace: Any = field(default=None, repr=False, compare=False)  # (kernels in issue order, in run order)

    @property
    def short_token(self) -> str:
        """The schedule alone: ``"random:7"``, ``"pct:3:3"``, ``"race:0.2:1.1"``, ``"constraints"``."""
        if self.schedule == "pct":
            return f"pct:{self.seed}:{self.depth}"
        if self.schedule == "race":
            (i, a), (j, b) = self.target
            return f"race:{i}.{a}:{j}.{b}"
        if self.schedule == "constraints":
            return "constraints"
        return f"{self.schedule}:{self.seed}"

    @property
    def token(self) -> str:
        """The full token: :attr:`short_token`, then ``/FINGERPRINT`` and ``/CONSTRAINTS`` where
        known (docs/exploration.md, "Tokens")."""
        short = self.short_token
        if self.fingerprint is None and not self.constraints:
            return short
        return f"{short}/{self.fingerprint or '-'}" + (f"/{_encode(self.constraints)}" if self.constraints else "")

    def __repr__(self) -> str:
        outcome = "ok" if self.ok else (f"raised {self.error!r}" if self.error is not None else "wrong values")
        return f"<run {self.short_token}: {outcome}>"


@dataclass
class Exploration:
    """What :func:`explore` found: ``ok`` (every schedule gave the eager values), ``runs`` (the
    explored runs, in order), ``failure`` (the first run that differed or raised, else None; with
    its shrunk ``explanation`` and full ``token``) and ``reference`` (the eager run)."""

    ok: bool
    runs: list[Run]
    failure: Run | None
    reference: Run

    def __repr__(self) -> str:
        if self.ok:
            return f"<exploration ok: {len(self.runs)} schedules gave the eager values>"
        f = self.failure
        return f"<exploration failed at {f.short_token} ({len(self.runs)} runs): {f!r}; replay with fake.replay(fn, {f.token!r})>"

    def explain(self) -> str:
        """A short explanation of the failure: the token, the eager and the failing values, the
        shrunk constraints and the races recorded."""
        if self.failure is None:
            return "every explored schedule gave the eager values"
        f = self.failure
        lines = [f"schedule {f.short_token} (fake.replay(fn, {f.token!r}) reproduces it):"]
        if f.error is not None:
            lines.append(f"  raised {type(f.error).__name__}: {f.error}")
        else:
            lines.append(f"  eager values: {self.reference.values!r}")
            lines.append(f"  its values:   {f.values!r}")
        if f.explanation:
            n = len(f.constraints)
            lines.append(
                f"  shrunk to {n} constraint{'s' if n != 1 else ''} (of {f.deviations} deviations, {f.shrink_runs} runs):"
            )
            lines.extend("    " + line for line in f.explanation.splitlines())
        for race in f.races[:3]:
            lines.append("  race recorded: " + next((line for line in str(race).splitlines() if "first:" in line), "").strip())
            lines.append("                 " + next((line for line in str(race).splitlines() if "second:" in line), "").strip())
            lines.append(f"    fix: {race.fix}")
        return "\n".join(lines)


def _to_host(value: Any) -> Any:
    """The host copy of returned values: fake tensors read once the device is idle."""
    if isinstance(value, FakeDeviceTensor):
        return value._inner.clone()  # (after the session drained: the device's final memory)
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [_to_host(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_host(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_host(v) for k, v in value.items()}
    return value


def same_values(a: Any, b: Any) -> bool:
    """Equal bit for bit (NaN equals NaN), through nested lists, tuples and dicts."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.dtype.is_floating_point or a.dtype.is_complex:
            return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
        return torch.equal(a, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_values(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_values(a[k], b[k]) for k in a)
    if isinstance(a, float) and a != a:
        return b != b
    return bool(a == b)


def _run(fn: Callable[[], Any], schedule: str, seed: int, detect: str, depth: int = PCT_DEPTH, target: Any = None) -> Run:
    run = Run(schedule, seed, depth, None if schedule == "constraints" else target)
    try:
        with session(detect=detect, schedule=schedule, seed=seed, depth=depth, target=target) as s:
            try:
                values = fn()
            finally:
                run.races = s.races
                scheduler = s._scheduler
                if not scheduler.runs_at_issue and scheduler.trace is not None:
                    run._trace = (scheduler.trace, scheduler.ran)
        run.values = _to_host(values)  # (the session drained at exit)
    except Exception as error:
        run.error = error
        run.ok = False
    return run


def _failed(run: Run, reference: Run) -> bool:
    return run.error is not None or not same_values(reference.values, run.values)


def _identify(run: Run) -> list[KernelId] | None:
    """The run's kernels named in issue order; None if it wasn't recorded (eager, or too long)."""
    if not run._trace:
        return None
    namer = _Namer()
    return [namer(k) for k in run._trace[0]]


def _deviations(run: Run, ids: list[KernelId]) -> list[tuple[KernelId, KernelId]]:
    """The run's order as constraints ``(a, b)``: ``a`` ran before ``b`` though ``b`` was issued
    first on another stream (the eager order reversed). Of the kernels of one stream that ran
    before ``b``, only the last is kept (it implies the others: FIFO), so there are at most
    (kernels x streams) of them. Nearest in issue order first: ddmin keeps the first subset that
    still fails, and the nearest reordering is usually the one that explains the failure."""
    trace, ran = run._trace
    issue = {id(k): i for i, k in enumerate(trace)}
    streams: dict = {}
    for k in trace:
        streams.setdefault(k.stream.idx, []).append(k)
    head = dict.fromkeys(streams, 0)
    done: set = set()
    found: dict = {}
    for a in ran:
        ia = issue.get(id(a))
        if ia is None:
            continue
        sa = a.stream.idx
        for s, queue in streams.items():
            if s == sa:
                continue
            for h in range(head[s], len(queue)):  # (the kernels of s still queued, oldest first)
                ib = issue[id(queue[h])]
                if ib > ia:
                    break
                found[(sa, ib)] = (ia, ib)
        done.add(id(a))
        queue = streams[sa]
        while head[sa] < len(queue) and id(queue[head[sa]]) in done:
            head[sa] += 1
    return [(ids[i], ids[j]) for i, j in sorted(found.values(), key=lambda p: (p[0] - p[1], p[0]))]


def _ddmin(items: list, fails: Callable[[list], bool]) -> list:
    """Zeller's ddmin: a 1-minimal sublist of ``items`` for which ``fails`` holds (it holds for
    ``items``), as far as ``fails`` answers (past its budget it says False)."""
    n = 2
    while len(items) >= 2:
        size = len(items)
        chunks = [items[i * size // n : (i + 1) * size // n] for i in range(n)]
        for chunk in chunks:
            if fails(chunk):
                items, n = chunk, 2
                break
        else:
            for i in range(n if n > 2 else 0):  # (with two chunks the complements are the chunks)
                rest = [x for j, chunk in enumerate(chunks) if j != i for x in chunk]
                if fails(rest):
                    items, n = rest, max(n - 1, 2)
                    break
            else:
                if n >= size:
                    break
                n = min(size, 2 * n)
    return items


def _shrink(fn: Callable[[], Any], failure: Run, reference: Run, detect: str, budget: int) -> None:
    """Give ``failure`` its fingerprint and constraint form: the deviations of its run, shrunk with
    ddmin (at most ``budget`` runs under the "constraints" schedule; 0: all deviations, unshrunk)."""
    ids = _identify(failure)
    if ids is None:
        failure.explanation = f"(not shrunk: the run issued more than {TRACE_LIMIT} kernels, which aren't recorded)"
        return
    failure.fingerprint = fingerprint(ids)
    pairs = _deviations(failure, ids)
    failure.deviations = len(pairs)
    failure._trace = None
    if budget <= 0:
        failure.constraints = tuple(pairs)
        return
    cache: dict = {}

    def fails(subset: list) -> bool:
        key = tuple(subset)
        if key not in cache:
            if failure.shrink_runs >= budget:
                return False
            failure.shrink_runs += 1
            cache[key] = _failed(_run(fn, "constraints", 0, detect, target=Constraints([pairs[i] for i in key])), reference)
        return cache[key]

    if not pairs or not fails(list(range(len(pairs)))):
        failure.explanation = (
            f"(no constraint form: the run's {len(pairs)} cross-stream deviations from the eager order don't"
            " reproduce the failure on their own; the token replays the seed only)"
        )
        return
    kept = tuple(pairs[i] for i in _ddmin(list(range(len(pairs))), fails))
    failure.constraints = kept
    failure.explanation = explanation(kept)


class Token(NamedTuple):
    """A parsed token (:func:`read_token`)."""

    schedule: str
    seed: int
    depth: int
    target: Any
    fingerprint: str | None
    constraints: tuple


def _kernel_id(text: str) -> tuple[int, int]:
    stream, sep, seq = text.partition(".")
    if not (sep and stream.isdigit() and seq.isdigit()):
        raise ValueError(text)
    return int(stream), int(seq)


def _parse_short(token: str) -> tuple[str, int, int, Any]:
    parts = token.split(":")
    name = parts[0]
    if name == "race" and len(parts) == 3:
        return name, 0, PCT_DEPTH, (_kernel_id(parts[1]), _kernel_id(parts[2]))
    if name == "constraints" and len(parts) == 1:
        return name, 0, PCT_DEPTH, None
    expected = 3 if name == "pct" else 2
    if name in SCHEDULES and name not in ("race", "constraints") and len(parts) == expected and parts[1].lstrip("-").isdigit():
        depth = int(parts[2]) if expected == 3 and parts[2].isdigit() else PCT_DEPTH if expected == 2 else 0
        if depth >= 1:
            return name, int(parts[1]), depth, None
    raise ValueError(token)


def read_token(token: str) -> Token:
    """A token (``Run.token``) as a :class:`Token`: ``SCHEDULE[/FINGERPRINT[/CONSTRAINTS]]``
    (:data:`TOKEN_FORMAT`); ValueError naming the format for anything else."""
    try:
        parts = str(token).split("/")
        if len(parts) > 3:
            raise ValueError(token)
        name, seed, depth, target = _parse_short(parts[0])
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
    return Token(name, seed, depth, target, fp, constraints)


def parse_token(token: str) -> tuple[str, int, int, Any]:
    """A token as ``(schedule, seed, depth, target)``: ``"schedule:seed"`` (depth
    :data:`PCT_DEPTH`, target None), ``"pct:seed:depth"``, or ``"race:S.N:S.N"`` (seed 0; target the
    two kernels as ``(stream, seq)`` pairs); a full token's fingerprint and constraints are read
    (and checked) but left out (:func:`read_token` has them). ValueError for anything else."""
    return tuple(read_token(token)[:4])  # type: ignore[return-value]


def session_args(token: str) -> tuple[str, int, int, Any, str | None]:
    """``fake.session(schedule=TOKEN)``: ``(schedule, seed, depth, target, fingerprint)``. A
    ``"constraints/..."`` token runs its constraint form; any other its seed's schedule (the
    session warns at exit when the fingerprint doesn't match)."""
    t = read_token(token)
    target = Constraints(t.constraints) if t.schedule == "constraints" else t.target
    # (the constraint form matches kernels by name, not by the sequence: nothing to check)
    return t.schedule, t.seed, t.depth, target, None if t.schedule == "constraints" else t.fingerprint


def check_fingerprint(scheduler: Any, expected: str, schedule: str) -> bool:
    """At the exit of ``fake.session(schedule=TOKEN)``: whether the kernel sequence still has the
    token's fingerprint; warns :class:`ReplayFallbackWarning` if not."""
    if scheduler.trace is None:
        return True  # (too long to record: unchecked)
    namer = _Namer()
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


def constraint_token(token: str) -> str | None:
    """The constraint form of ``token`` as a token of its own (``"constraints/FP/..."``), None if
    it has none."""
    t = read_token(token)
    if not t.constraints:
        return None
    return Run("constraints", 0, fingerprint=t.fingerprint, constraints=t.constraints).token


def plan(schedules: int, seed: int) -> list[tuple[str, int, int, Any]]:
    """The schedules explore() tries after the race-directed ones, in order, as ``(schedule, seed,
    depth, target)``: adversarial, lazy, then random and pct (depth :data:`PCT_DEPTH`)
    alternating, seeds counting up from ``seed``."""
    order: list[tuple[str, int, int, Any]] = [("adversarial", seed, PCT_DEPTH, None), ("lazy", seed, PCT_DEPTH, None)]
    i = 0
    while len(order) < schedules:
        order.append(("random", seed + i, PCT_DEPTH, None))
        order.append(("pct", seed + i, PCT_DEPTH, None))
        i += 1
    return order[: max(schedules, 0)]


def directed(races: list[Race]) -> list[tuple[str, int, int, Any]]:
    """One race-directed schedule per race between two kernels (in report order, each pair once):
    ``("race", 0, PCT_DEPTH, (first, second))``, under which the second kernel runs first."""
    found: list[tuple[str, int, int, Any]] = []
    for race in races:
        if race.kernels is not None and race.kernels[0][0] != race.kernels[1][0]:
            entry = ("race", 0, PCT_DEPTH, race.kernels)
            if entry not in found:
                found.append(entry)
    return found


def explore(
    fn: Callable[[], Any], schedules: int = 8, seed: int = 0, detect: str = "record", shrink: bool | int = True
) -> Exploration:
    """Run ``fn`` (which issues fake-device work and returns values) once eagerly, then under
    ``schedules`` deferred schedules (first one race-directed schedule per race between kernels the
    eager run recorded, :func:`directed`; then :func:`plan`: adversarial, lazy, then random and pct
    seeds from ``seed``, alternating), each in a
    fresh ``fake.session(detect=detect, ...)``. A run fails when it raises or returns values that
    differ from the eager run's. If the eager run raises, that exception propagates.

    The first failure is shrunk (``shrink=True``): its deviations from the eager order, as
    constraints, reduced by ddmin to a minimal set that still fails under the "constraints"
    schedule, in at most :data:`SHRINK_RUNS` extra runs (an int ``shrink`` sets that bound;
    ``False`` or 0 keeps every deviation, unshrunk). The failure's ``token`` then carries the
    fingerprint and the constraints, and ``explanation`` names them."""
    if schedules < 1:
        raise ValueError(f"explore(schedules): expected at least 1, got {schedules}")
    if type(shrink) is not bool and (type(shrink) is not int or shrink < 0):
        raise ValueError(f"explore(shrink): expected True, False or a number of runs >= 0, got {shrink!r}")
    budget = SHRINK_RUNS if shrink is True else int(shrink)
    reference = _run(fn, "eager", 0, detect)
    if reference.error is not None:
        raise reference.error
    runs: list[Run] = []
    failure = None
    runs_planned = directed(reference.races)[:schedules]
    runs_planned += plan(schedules - len(runs_planned), seed)
    for name, s, depth, target in runs_planned:
        run = _run(fn, name, s, detect, depth, target)
        if run.error is None:
            run.ok = same_values(reference.values, run.values)
        runs.append(run)
        if not run.ok and failure is None:
            failure = run
        else:
            run._trace = None  # (only the failure's kernels are needed)
    if failure is not None:
        _shrink(fn, failure, reference, detect, budget)
    return Exploration(failure is None, runs, failure, reference)


def replay(fn: Callable[[], Any], token: str, detect: str = "record") -> Run:
    """Rerun ``fn`` under the schedule ``token`` names (from :attr:`Run.token`): the same values,
    bit for bit. ``ok`` says whether they match an eager run of ``fn`` (made first).

    A full token's fingerprint is checked against the replayed run's kernel sequence; when it
    doesn't match (``fn`` was edited), ``fn`` runs again under the token's constraint form
    (``replayed_by == "constraints"``), with a :class:`ReplayFallbackWarning`; a ``"constraints/..."``
    token runs that form directly."""
    t = read_token(token)
    reference = _run(fn, "eager", 0, detect)
    by = "constraints" if t.schedule == "constraints" else "schedule"
    if by == "schedule":
        run = _run(fn, t.schedule, t.seed, detect, t.depth, t.target)
        ids = _identify(run)
        if t.fingerprint is not None and ids is not None:
            now = fingerprint(ids)
            if now != t.fingerprint:
                if t.constraints:
                    by = "constraints"
                    note = f"replaying its constraint form ({len(t.constraints)} constraints) instead of the seed"
                else:
                    note = "the token has no constraint form: its seed's schedule ran, which may not reproduce the failure"
                warnings.warn(
                    ReplayFallbackWarning(
                        f"fake.replay({str(token).split('/')[0]}/...): the program's kernel sequence changed since the token was made"
                        f" (fingerprint {t.fingerprint}, now {now}): {note}"
                    ),
                    stacklevel=2,
                )
    if by == "constraints":
        rule = Constraints(t.constraints)
        run = _run(fn, "constraints", 0, detect, target=rule)
        lost = rule.unmatched()
        if lost:
            warnings.warn(
                ReplayFallbackWarning(
                    f"fake.replay: {len(lost)} of {len(t.constraints)} constraints name kernels this program no longer"
                    " issues (op, file, function and source line must match): " + explanation(lost).replace("\n", "; ")
                ),
                stacklevel=2,
            )
    run.schedule, run.seed, run.depth, run.target = t.schedule, t.seed, t.depth, t.target
    run.fingerprint, run.constraints, run.replayed_by = t.fingerprint, t.constraints, by
    run.explanation = explanation(t.constraints) if t.constraints else None
    run._trace = None
    if run.error is None:
        run.ok = reference.error is None and same_values(reference.values, run.values)
    return run
