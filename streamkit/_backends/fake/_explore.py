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

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ._deferred import PCT_DEPTH, TRACE_LIMIT
from ._report import Race
from ._session import session
from ._tensor import FakeDeviceTensor
from ._tokens import (  # noqa: F401  (TOKEN_FORMAT, Token, parse_token, read_token: the public token API)
    TOKEN_FORMAT, Constraints, KernelId, ReplayFallbackWarning, Token, encode_constraints, Namer, explanation, fingerprint, parse_token,
    read_token,
)

#: ``explore(shrink=True)``: at most this many extra runs shrink a failure (each one a run of the
#: program under the "constraints" schedule; ddmin needs about 2 log2(n) of them per constraint kept)
SHRINK_RUNS = 50

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
        return f"{short}/{self.fingerprint or '-'}" + (f"/{encode_constraints(self.constraints)}" if self.constraints else "")

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
        return value.sk_inner.clone()  # (after the session drained: the device's final memory)
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


def run_schedule(fn: Callable[[], Any], schedule: str, seed: int, detect: str, depth: int = PCT_DEPTH, target: Any = None) -> Run:
    run = Run(schedule, seed, depth, None if schedule == "constraints" else target)
    try:
        with session(detect=detect, schedule=schedule, seed=seed, depth=depth, target=target) as s:
            try:
                values = fn()
            finally:
                run.races = s.races
                scheduler = s.scheduler
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
    namer = Namer()
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
            cache[key] = _failed(run_schedule(fn, "constraints", 0, detect, target=Constraints([pairs[i] for i in key])), reference)
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
    reference = run_schedule(fn, "eager", 0, detect)
    if reference.error is not None:
        raise reference.error
    runs: list[Run] = []
    failure = None
    runs_planned = directed(reference.races)[:schedules]
    runs_planned += plan(schedules - len(runs_planned), seed)
    for name, s, depth, target in runs_planned:
        run = run_schedule(fn, name, s, detect, depth, target)
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
    reference = run_schedule(fn, "eager", 0, detect)
    by = "constraints" if t.schedule == "constraints" else "schedule"
    if by == "schedule":
        run = run_schedule(fn, t.schedule, t.seed, detect, t.depth, t.target)
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
        run = run_schedule(fn, "constraints", 0, detect, target=rule)
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
