"""Schedule exploration: run a program under deferred schedules and compare its values with the
eager run's. ``fake.explore(fn)`` finds schedules under which a racy program computes wrong values
and shrinks the first failure to the few ordering constraints that cause it;
``fake.replay(fn, token)`` reruns one of them bit for bit.

Tokens (docs/exploration.md, "Tokens"): ``SCHEDULE[/FINGERPRINT[/CONSTRAINTS]]``. ``SCHEDULE`` is
the short form, from the policy registry (:mod:`._policies`): ``"schedule:seed"``
(``"adversarial:0"``, ``"rates:7"``), ``"pct:seed:depth[:steps]"``, ``"race:S.N:S.N"``,
``"split:S.N:S.N"``, ``"order:S.N-S.N,..."`` or ``"constraints"``, then in explore's runs
``+focus=`` and the kernels the schedule ordered (the eager run's focus; the others ran at
issue): a schedule is a deterministic function of the program, the scheduler, its seed and its
focus, so it reproduces the run of the same program (one host thread, one process). ``FINGERPRINT`` is a CRC-32 of the run's kernel sequence (op, file, line, in issue
order); ``CONSTRAINTS`` the shrunk constraint form ("kernel A runs before kernel B", kernels named
by op, file, function, source line and occurrence), which replay runs instead of the seed when
the fingerprint no longer matches (the program was edited).
"""

from __future__ import annotations

import warnings  # noqa: I001
from dataclasses import dataclass, field
from typing import Any, Callable

import itertools

import torch

from ._deferred import PCT_DEPTH, TRACE_LIMIT
from ._policies import short_token
from ._planner import Observation, Slot, directed_slots, interleave, race_key, undirected_slots
from ._report import Race
from ._session import DETECT_MODES, session
from ._tensor import FakeDeviceTensor
from ._tokens import (  # noqa: F401  (TOKEN_FORMAT, Token, parse_token, read_token: the public token API)
    FOCUS_MARK, TOKEN_FORMAT, Constraints, decode_focus, encode_focus, KernelId, ReplayFallbackWarning, Token, encode_constraints, Namer, describe, explanation, fingerprint,
    occurrence_totals, parse_token, read_token,
)

#: ``explore(shrink=True)``: shrinking a failure takes at most this many extra runs (each one a run
#: of the program under the "constraints" schedule; ddmin needs about 2 log2(n) of them per
#: constraint kept), plus SHRINK_RUNS_PER_CONSTRAINT for each constraint kept beyond the first
SHRINK_RUNS = 50
SHRINK_RUNS_PER_CONSTRAINT = 25

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
    #: the policy's parameter: race/split ((stream, seq), (stream, seq)); order, pairs of those;
    #: pct its step count (None: the legacy 64)
    target: Any = None
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
    #: the kernels the schedule ordered (fake.explore's runs: the eager run's focus, in the token
    #: after ``+focus=``; :meth:`._deferred.DeferredScheduler.set_focus`); None: every kernel
    focus: frozenset | None = None
    #: read-modify-write kernels the run split around a racing one (kernel, partner)
    split_pairs: list = field(default_factory=list, repr=False, compare=False)
    _trace: Any = field(default=None, repr=False, compare=False)  # (kernels in issue order, in run order)

    @property
    def short_token(self) -> str:
        """The schedule alone: ``"rates:7"``, ``"pct:3:3:412"``, ``"race:0.2:1.1"``, ``"constraints"``
        (the formats come from the policy registry, :mod:`._policies`)."""
        short = short_token(self.schedule, self.seed, self.depth, self.target)
        return short if self.focus is None else short + FOCUS_MARK + encode_focus(self.focus)

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
        if f.explanation and f.constraints:
            n = len(f.constraints)
            lines.append(
                f"  shrunk to {n} constraint{'s' if n != 1 else ''} (of {f.deviations} deviations, {f.shrink_runs} runs):"
            )
            lines.extend("    " + line for line in f.explanation.splitlines())
        elif f.explanation:
            lines.extend("  " + line for line in f.explanation.splitlines())
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


#: what explore compares: tensors, numbers, strings, None, and lists, tuples and dicts of them
COMPARABLE = "tensors, numbers (int, float, complex, bool), strings, bytes, None, and lists, tuples and dicts of them"
_SCALARS = (int, float, complex, str, bytes, type(None))


def check_values(value: Any, where: str = "explore(fn)", path: str = "the result") -> None:
    """TypeError naming the type (and where in the result) unless ``value`` is made of what
    :func:`same_values` compares (:data:`COMPARABLE`)."""
    if isinstance(value, torch.Tensor) or type(value) in _SCALARS or isinstance(value, bool):
        return
    if type(value) in (list, tuple):
        for i, v in enumerate(value):
            check_values(v, where, f"{path}[{i}]")
        return
    if type(value) is dict:
        for k, v in value.items():
            check_values(v, where, f"{path}[{k!r}]")
        return
    kind = type(value)
    raise TypeError(
        f"{where}: fn returned {kind.__module__}.{kind.__qualname__} at {path}; explore compares {COMPARABLE}"
        " (convert it, e.g. a numpy array with torch.from_numpy)"
    )


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
    if isinstance(a, (float, complex)) and a != a:
        return b != b
    if not isinstance(a, _SCALARS):
        return False  # (refused up front, check_values: no value equality to trust)
    return bool(a == b)


def run_schedule(
    fn: Callable[[], Any], schedule: str, seed: int, detect: str, depth: int = PCT_DEPTH, target: Any = None,
    observe: Observation | None = None, known: dict | None = None, focus: frozenset | None = None,
    site_depth: int | None = None,
) -> Run:
    """One run of ``fn`` in a fresh session. ``observe``: the eager reference run's observation
    (:mod:`._planner`); ``known``: races of the reference by :func:`._planner.race_key` (with
    ``detect="record"``, their reports aren't built again: the reference's Race is listed);
    ``focus``: the reference's focus kernels, the only ones the schedule orders
    (:meth:`._deferred.DeferredScheduler.set_focus`); ``site_depth``: user frames per kernel site
    (explore's runs: 1, their kernels are named by their own line; None: the session's default)."""
    run = Run(schedule, seed, depth, None if schedule == "constraints" else target, focus=focus)
    hits: list = []
    try:
        with session(detect=detect, schedule=schedule, seed=seed, depth=depth, target=target) as s:
            if focus is not None:
                s.scheduler.set_focus(focus)
            if site_depth is not None:
                s.site_depth = site_depth
            if observe is not None:
                observe.install(s)
            elif known and detect == "record":
                seen: set = set()

                def skip(earlier: Any, earlier_kind: Any, kernel: Any, kind: Any) -> bool:
                    race = known.get(race_key(earlier, earlier_kind, kernel, kind))
                    if race is None:
                        return False
                    if id(race) not in seen:
                        seen.add(id(race))
                        hits.append(race)
                    return True

                s.race_hook = skip
            try:
                values = fn()
                if observe is not None:
                    observe.returned(values)
            finally:
                run.races = hits + s.races if hits else s.races
                scheduler = s.scheduler
                if not scheduler.runs_at_issue:
                    run.split_pairs = list(scheduler.split_pairs)
                    if scheduler.trace is not None:
                        run._trace = (scheduler.trace, scheduler.ran)
        run.values = _to_host(values)  # (the session drained at exit)
    except Exception as error:
        run.error = error
        run.ok = False
    if observe is not None:
        observe.release()
    return run


def failed_against(run: Run, reference: Run) -> bool:
    return run.error is not None or not same_values(reference.values, run.values)


def identify_kernels(run: Run) -> list[KernelId] | None:
    """The run's kernels named in issue order; None if it wasn't recorded (eager, or too long)."""
    if not run._trace:
        return None
    namer = Namer()
    return [namer(k) for k in run._trace[0]]


def deviations(run: Run, ids: list[KernelId], obs: Observation | None = None) -> list[tuple[KernelId, KernelId]]:
    """The run's order as constraints ``(a, b)``: ``a`` ran before ``b`` though ``b`` was issued
    first on another stream (the eager order reversed). Of the kernels of one stream that ran
    before ``b``, the last is kept (it implies the others: FIFO), and, where the reference run's
    observation says which kernels touch ``b``'s memory, also the last of those (so the
    explanation names the conflicting write rather than a kernel issued after it). Nearest in issue
    order first, conflicting ones before the others: ddmin keeps the first subset that still
    fails, and the nearest conflicting reordering is usually the one that explains the failure."""
    trace, ran = run._trace
    issue = {id(k): i for i, k in enumerate(trace)}
    streams: dict = {}
    ran_ids = {id(k) for k in ran}
    for k in trace:
        if id(k) in ran_ids:  # (a kernel a focus ran at issue isn't in ``ran``: no order of it matters)
            streams.setdefault(k.stream.idx, []).append(k)
    head = dict.fromkeys(streams, 0)
    done: set = set()
    found: dict = {}
    conflicting: dict = {}
    for a in ran:
        ia = issue.get(id(a))
        if ia is None:
            continue
        sa = a.stream.idx
        for s, queue in streams.items():
            if s == sa:
                continue
            for h in range(head[s], len(queue)):  # (the kernels of s still queued, oldest first)
                b = queue[h]
                ib = issue[id(b)]
                if ib > ia:
                    break
                found[(sa, ib)] = (ia, ib)
                if obs is not None and obs.conflict((sa, a.seq), (b.stream.idx, b.seq)):
                    conflicting[(sa, ib)] = (ia, ib)
        done.add(id(a))
        queue = streams[sa]
        while head[sa] < len(queue) and id(queue[head[sa]]) in done:
            head[sa] += 1
    pairs = set(found.values()) | set(conflicting.values())
    hot = set(conflicting.values())
    order = sorted(pairs, key=lambda p: (p not in hot, p[0] - p[1], p[0]))
    return [(ids[i], ids[j]) for i, j in order]


def ddmin(items: list, fails: Callable[[list], bool]) -> list:
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


def _split_explanation(run: Run, ids: list[KernelId] | None, totals: dict) -> str:
    if ids is None or not run._trace:
        return ""
    index = {id(k): i for i, k in enumerate(run._trace[0])}
    lines = []
    for k, partner in run.split_pairs:
        a, b = index.get(id(k)), index.get(id(partner))
        if a is not None and b is not None:
            lines.append(
                f"ran {describe(ids[a], totals)} split around {describe(ids[b], totals)}: both read the memory before"
                " either wrote it, so one update was lost (read-modify-write kernels aren't atomic on a GPU)"
            )
    return "\n".join(lines)


def _shrink(
    fn: Callable[[], Any], failure: Run, reference: Run, detect: str, budget: int | None, obs: Observation | None = None,
) -> None:
    """Give ``failure`` its fingerprint and constraint form: the deviations of its run, shrunk with
    ddmin under the "constraints" schedule (``budget`` runs at most; None: :data:`SHRINK_RUNS`
    plus :data:`SHRINK_RUNS_PER_CONSTRAINT` per constraint kept beyond the first, so a deeper
    failure gets more; 0: all deviations, unshrunk). Then ``explanation`` names the constraints
    kept (a kernel in a loop with its occurrence: "3rd of 10") and the reorderings of conflicting
    kernels the last failing run made (which may name more than the constraints: a stale read the
    constraints imply)."""
    ids = identify_kernels(failure)
    if ids is None:
        failure.explanation = f"(not shrunk: the run issued more than {TRACE_LIMIT} kernels, which aren't recorded)"
        return
    totals = occurrence_totals(ids)
    failure.fingerprint = fingerprint(ids)
    pairs = deviations(failure, ids, obs)
    failure.deviations = len(pairs)
    split = _split_explanation(failure, ids, totals)
    failure._trace = None
    if budget == 0:
        failure.constraints = tuple(pairs)
        return
    cache: dict = {}
    best = [list(range(len(pairs)))]
    last_run: dict = {}

    def allowed() -> int:
        if budget is not None:
            return budget
        return SHRINK_RUNS + SHRINK_RUNS_PER_CONSTRAINT * max(len(best[0]) - 1, 0) if len(best[0]) <= 4 else SHRINK_RUNS + 3 * SHRINK_RUNS_PER_CONSTRAINT

    def fails(subset: list) -> bool:
        key = tuple(subset)
        if key not in cache:
            if failure.shrink_runs >= allowed():
                return False
            failure.shrink_runs += 1
            run = run_schedule(fn, "constraints", 0, detect, target=Constraints([pairs[i] for i in key]), site_depth=EXPLORED_SITE_DEPTH)
            cache[key] = failed_against(run, reference)
            if cache[key]:
                if len(key) <= len(best[0]):
                    best[0] = list(key)
                last_run[key] = run
        return cache[key]

    if not pairs or not fails(list(range(len(pairs)))):
        if split:
            failure.explanation = split + "\n(no constraint form: a split kernel isn't an ordering; the token replays the seed)"
            return
        failure.explanation = (
            f"(no constraint form: the run's {len(pairs)} cross-stream deviations from the eager order don't"
            " reproduce the failure on their own; the token replays the seed only)"
        )
        return
    kept_index = ddmin(list(range(len(pairs))), fails)
    kept = tuple(pairs[i] for i in kept_index)
    failure.constraints = kept
    text = explanation(kept, totals)
    final = last_run.get(tuple(kept_index))
    if final is not None and obs is not None and final._trace:
        made = [p for p in deviations(final, identify_kernels(final), obs) if _conflicting(p, obs, final)]
        extra = [p for p in made if p not in kept]
        if extra:
            text += "\nthe run under them also made (implied, on conflicting memory):\n" + "\n".join(
                "  " + explanation([p], totals) for p in extra[:8]
            )
    failure.explanation = text


def _conflicting(pair: tuple, obs: Observation, run: Run) -> bool:
    """Whether the two kernels of a constraint touch common memory, one writing (the reference
    run's accesses; kernels found by name in ``run``)."""
    namer = Namer()
    where = {}
    wanted = {pair[0].key, pair[1].key}
    for k in run._trace[0]:
        key = namer(k).key
        if key in wanted:
            where[key] = (k.stream.idx, k.seq)
    a, b = where.get(pair[0].key), where.get(pair[1].key)
    return a is not None and b is not None and obs.conflict(a, b)


def constraint_token(token: str) -> str | None:
    """The constraint form of ``token`` as a token of its own (``"constraints/FP/..."``), None if
    it has none."""
    t = read_token(token)
    if not t.constraints:
        return None
    return Run("constraints", 0, fingerprint=t.fingerprint, constraints=t.constraints).token


def plan(schedules: int, seed: int, steps: int | None = None) -> list[Slot]:
    """The undirected runs explore() mixes with its directed ones, in order, as :class:`Slot`
    ``(schedule, seed, depth, target)``: PCT (depths 1, 2, 3, 4 in turn; ``target`` the step
    count ``steps`` its change points are drawn over, from the eager run; None: the legacy 64) and
    random runs with per-stream rates (``rates``) alternating, adversarial and lazy among the first
    six; seeds are hashes of ``(seed, kind, index)`` (docs/exploration.md, "The plan")."""
    _check_int(schedules, "plan(schedules)", 0)
    _check_int(seed, "plan(seed)")
    return list(itertools.islice(undirected_slots(seed, steps), schedules))


def directed(races: list[Race]) -> list[Slot]:
    """One race-directed run per race between two kernels on different streams (in report order,
    each pair once): ``Slot("race", 0, PCT_DEPTH, (first, second))``, under which the second
    kernel runs first. (explore plans more from its eager run: :func:`._planner.directed_slots`.)"""
    found: list[Slot] = []
    for race in races:
        if race.kernels is not None and race.kernels[0][0] != race.kernels[1][0]:
            entry = Slot("race", 0, PCT_DEPTH, race.kernels)
            if entry not in found:
                found.append(entry)
    return found


def _check_int(value: Any, where: str, least: int | None = None) -> int:
    if type(value) is not int and not isinstance(value, bool) and hasattr(value, "__index__"):
        value = value.__index__()  # (numpy integers)
    if type(value) is not int or (least is not None and value < least):
        accepted = "an int" + (f" >= {least}" if least is not None else "")
        raise (ValueError if type(value) is int else TypeError)(f"{where}: expected {accepted}, got {value!r} ({type(value).__name__})")
    return value


def check_explore_args(fn: Any, schedules: Any, seed: Any, detect: Any, where: str = "explore") -> None:
    """The arguments every exploration entry point takes, checked up front."""
    if not callable(fn):
        raise TypeError(f"{where}(fn): expected a callable that issues fake-device work and returns values, got {fn!r} ({type(fn).__name__})")
    _check_int(schedules, f"{where}(schedules)", 1)
    _check_int(seed, f"{where}(seed)")
    if detect not in DETECT_MODES:
        raise ValueError(f"{where}(detect): expected one of {', '.join(map(repr, DETECT_MODES))}, got {detect!r}")


class Explorer:
    """The one exploration runner: the eager reference run (observed, :class:`._planner.Observation`),
    the plan (:func:`._planner.interleave` of the directed and undirected runs), each run, its
    verdict and the shrinking of a failure. ``fake.explore`` (one process), the ranks version
    (:mod:`._ranks`) and the ``streamkit_explore`` marker (:mod:`streamkit.pytest_plugin`) use it."""

    def __init__(self, fn: Callable[[], Any], schedules: int, seed: int, detect: str = "record") -> None:
        self.fn = fn
        self.schedules = schedules
        self.seed = seed
        self.detect = detect
        self.observation = Observation()
        self.reference: Run | None = None
        self.known: dict = {}
        #: the reference's focus kernels (None: every kernel goes through the schedule)
        self.focus: frozenset | None = None

    def run_reference(self) -> Run:
        """The eager run (values, races, and what the plan needs); its races' reports are not
        built again in the explored runs."""
        ref = self.reference = run_schedule(self.fn, "eager", 0, self.detect, observe=self.observation)
        if ref.error is None:
            check_values(ref.values)
        self.focus = focus_of(self.observation, ref, self.detect)
        by_kernels = {race.kernels: race for race in ref.races if race.kernels is not None}
        for key, first, second, _, _ in self.observation.occurrences:
            race = by_kernels.get((first, second))
            if race is not None and key not in self.known:
                self.known[key] = race
        return ref

    def directed(self) -> list[Slot]:
        return directed_slots(self.observation) if self.detect == "record" else []

    def slots(self, directed: list | None = None) -> list[Slot]:
        """The plan: ``directed`` (default: this reference's directed runs) interleaved with the
        undirected ones, ``schedules`` in all."""
        if directed is None:
            directed = self.directed()
        return interleave(directed, self.seed, self.steps, self.schedules)

    @property
    def steps(self) -> int:
        """PCT's step count k: every kernel issued and run (:attr:`._planner.Observation.steps`);
        with a focus, the focus kernels' (the others take no step)."""
        if self.focus is None:
            return self.observation.steps
        return max(2 * len(self.focus), 2)

    def run(self, slot: Slot) -> Run:
        schedule, seed, depth, target = slot
        focus = self.focus if schedule in FOCUSED else None
        run = run_schedule(self.fn, schedule, seed, self.detect, depth, target, known=self.known, focus=focus, site_depth=EXPLORED_SITE_DEPTH)
        if run.error is None:
            run.ok = same_values(self.reference.values, run.values)
        return run

    def shrink(self, failure: Run, budget: int | None) -> None:
        _shrink(self.fn, failure, self.reference, self.detect, budget, self.observation)

    def explore(self, shrink: bool | int = True, stop: bool = False) -> Exploration:
        """Every planned run (``stop``: up to the first failure), the first failure shrunk."""
        reference = self.run_reference()
        if reference.error is not None:
            raise reference.error
        runs: list[Run] = []
        failure = None
        for slot in self.slots():
            run = self.run(slot)
            runs.append(run)
            if not run.ok and failure is None:
                failure = run
                if stop:
                    break
                continue
            run._trace = None  # (only the failure's kernels are needed)
        if failure is not None:
            self.shrink(failure, None if shrink is True else int(shrink))
        return Exploration(failure is None, runs, failure, reference)


def explore(
    fn: Callable[[], Any], schedules: int = 8, seed: int = 0, detect: str = "record", shrink: bool | int = True
) -> Exploration:
    """Run ``fn`` (which issues fake-device work and returns values) once eagerly, then under up
    to ``schedules`` deferred schedules, each in a fresh ``fake.session(detect=detect, ...)``, until
    one fails: it raises, or returns values that differ from the eager run's (tensors bit for bit,
    numbers, strings, and lists, tuples and dicts of them; anything else is a TypeError naming its
    type). If the eager run raises, that exception propagates.

    The plan (:class:`Explorer`; docs/exploration.md, "The plan"): runs directed at the races the
    eager run recorded (every race reversed at once, each race reversed at its first and last
    occurrence, racing read-modify-write kernels split, the racing access placed between each
    pair of the writes it races with), interleaved with PCT over the run's real length and random
    runs with per-stream rates.

    The failure is shrunk (``shrink=True``): its deviations from the eager order, as constraints,
    reduced by ddmin to a minimal set that still fails under the "constraints" schedule, in at
    most :data:`SHRINK_RUNS` extra runs plus :data:`SHRINK_RUNS_PER_CONSTRAINT` per constraint
    kept beyond the first (an int ``shrink`` sets a fixed bound; ``False`` or 0 keeps every
    deviation, unshrunk). The failure's ``token`` then carries the fingerprint and the
    constraints, and ``explanation`` names them."""
    check_explore_args(fn, schedules, seed, detect)
    schedules, seed = _check_int(schedules, "explore(schedules)", 1), _check_int(seed, "explore(seed)")
    if type(shrink) is not bool and (type(shrink) is not int or shrink < 0):
        raise ValueError(f"explore(shrink): expected True, False or a number of runs >= 0, got {shrink!r}")
    return Explorer(fn, schedules, seed, detect).explore(shrink)


#: user frames per kernel site in explore's runs (the eager run's reports have the full stacks; a
#: kernel is named by its own line: :class:`._tokens.KernelId`, :func:`._planner.race_key`)
EXPLORED_SITE_DEPTH = 1
#: the schedules explore runs with the eager run's focus (:meth:`._deferred.DeferredScheduler.set_focus`):
#: all but the constraint form (shrinking's runs and edit-proof replays: kernels named, not numbered)
FOCUSED = frozenset({"pct", "rates", "lazy", "adversarial", "random", "race", "order", "split"})


def focus_of(observation: Observation, reference: Run, detect: str) -> frozenset | None:
    """The focus of an observed eager run: known only when it recorded every race
    (``detect="record"``) and ran to the end."""
    if detect != "record" or reference.error is not None:
        return None
    return observation.focus()


def run_token(
    fn: Callable[[], Any], token: str, detect: str = "record", where: str = "fake.replay", keep_failure: bool = False
) -> Run:
    """``fn`` under ``token``'s schedule; when a full token's fingerprint no longer matches the
    kernel sequence, again under its constraint form (with a :class:`ReplayFallbackWarning`);
    ``keep_failure``: not when the schedule's run raised already (the pytest option)."""
    t = read_token(token)
    by = "constraints" if t.schedule == "constraints" else "schedule"
    if by == "schedule":
        run = run_schedule(fn, t.schedule, t.seed, detect, t.depth, t.target, focus=t.focus)
        ids = identify_kernels(run)
        if t.fingerprint is not None and ids is not None:
            now = fingerprint(ids)
            if now != t.fingerprint:
                if t.constraints and keep_failure and run.error is not None:
                    note = "its seed's schedule ran and still fails"
                elif t.constraints:
                    by = "constraints"
                    note = f"replaying its constraint form ({len(t.constraints)} constraints) instead of the seed"
                else:
                    note = "the token has no constraint form: its seed's schedule ran, which may not reproduce the failure"
                warnings.warn(
                    ReplayFallbackWarning(
                        f"{where}({str(token).split('/')[0]}/...): the program's kernel sequence changed since the token was made"
                        f" (fingerprint {t.fingerprint}, now {now}): {note}"
                    ),
                    stacklevel=3,
                )
    if by == "constraints":
        rule = Constraints(t.constraints)
        run = run_schedule(fn, "constraints", 0, detect, target=rule)
        lost = rule.unmatched()
        if lost:
            warnings.warn(
                ReplayFallbackWarning(
                    f"{where}: {len(lost)} of {len(t.constraints)} constraints name kernels this program no longer"
                    " issues (op, file, function and source line must match): " + explanation(lost).replace("\n", "; ")
                ),
                stacklevel=3,
            )
    run.schedule, run.seed, run.depth, run.target = t.schedule, t.seed, t.depth, t.target
    run.fingerprint, run.constraints, run.replayed_by = t.fingerprint, t.constraints, by
    run.focus = t.focus  # (the token's, also when its constraint form ran: the run names the token)
    run.explanation = explanation(t.constraints) if t.constraints else None
    run._trace = None
    return run


def replay(fn: Callable[[], Any], token: str, detect: str = "record") -> Run:
    """Rerun ``fn`` under the schedule ``token`` names (from :attr:`Run.token`): the same values,
    bit for bit. ``ok`` says whether they match an eager run of ``fn`` (made first).

    A full token's fingerprint is checked against the replayed run's kernel sequence; when it
    doesn't match (``fn`` was edited), ``fn`` runs again under the token's constraint form
    (``replayed_by == "constraints"``), with a :class:`ReplayFallbackWarning`; a ``"constraints/..."``
    token runs that form directly. TypeError if ``fn`` isn't callable, ValueError naming the format
    if ``token`` isn't a token."""
    if not callable(fn):
        raise TypeError(f"replay(fn): expected a callable (the program the token was made from), got {fn!r} ({type(fn).__name__})")
    if not isinstance(token, str):
        raise TypeError(f"replay(token): expected a token string ({TOKEN_FORMAT}), got {token!r} ({type(token).__name__})")
    if detect not in DETECT_MODES:
        raise ValueError(f"replay(detect): expected one of {', '.join(map(repr, DETECT_MODES))}, got {detect!r}")
    read_token(token)  # (a malformed token is refused before anything runs)
    reference = run_schedule(fn, "eager", 0, detect)
    run = run_token(fn, token, detect)
    if run.error is None:
        run.ok = reference.error is None and same_values(reference.values, run.values)
    return run
