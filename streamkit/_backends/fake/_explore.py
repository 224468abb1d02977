"""Schedule exploration: run a program under deferred schedules and compare its values with the
eager run's. ``fake.explore(fn)`` finds schedules under which a racy program computes wrong values;
``fake.replay(fn, token)`` reruns one of them bit for bit.

A token is ``"schedule:seed"`` (``"adversarial:0"``, ``"random:7"``), or ``"pct:seed:depth"``
(``"pct:3:3"``) for PCT schedules: a schedule is a deterministic
function of the program, the scheduler and its seed, so the token reproduces the run of the same
program (one host thread, one process).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ._deferred import PCT_DEPTH, SCHEDULES
from ._report import Race
from ._session import session
from ._tensor import FakeDeviceTensor


@dataclass
class Run:
    """One run of the program: its schedule, seed and token, the values it returned (tensors on the
    host) or the exception it raised, the races recorded, and whether it matched the eager run."""

    schedule: str
    seed: int
    depth: int = PCT_DEPTH  # (pct only)
    target: Any = None  # (race only: ((stream, seq), (stream, seq)), the second kernel runs first)
    values: Any = None
    error: BaseException | None = None
    races: list[Race] = field(default_factory=list)
    ok: bool = True

    @property
    def token(self) -> str:
        if self.schedule == "pct":
            return f"pct:{self.seed}:{self.depth}"
        if self.schedule == "race":
            (i, a), (j, b) = self.target
            return f"race:{i}.{a}:{j}.{b}"
        return f"{self.schedule}:{self.seed}"

    def __repr__(self) -> str:
        outcome = "ok" if self.ok else (f"raised {self.error!r}" if self.error is not None else "wrong values")
        return f"<run {self.token}: {outcome}>"


@dataclass
class Exploration:
    """What :func:`explore` found: ``ok`` (every schedule gave the eager values), ``runs`` (the
    explored runs, in order), ``failure`` (the first run that differed or raised, else None) and
    ``reference`` (the eager run)."""

    ok: bool
    runs: list[Run]
    failure: Run | None
    reference: Run

    def __repr__(self) -> str:
        if self.ok:
            return f"<exploration ok: {len(self.runs)} schedules gave the eager values>"
        f = self.failure
        return f"<exploration failed at {f.token} ({len(self.runs)} runs): {f!r}; replay with fake.replay(fn, {f.token!r})>"

    def explain(self) -> str:
        """A short explanation of the failure (the eager and the failing values)."""
        if self.failure is None:
            return "every explored schedule gave the eager values"
        f = self.failure
        lines = [f"schedule {f.token} (fake.replay(fn, {f.token!r}) reproduces it):"]
        if f.error is not None:
            lines.append(f"  raised {type(f.error).__name__}: {f.error}")
        else:
            lines.append(f"  eager values: {self.reference.values!r}")
            lines.append(f"  its values:   {f.values!r}")
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
    run = Run(schedule, seed, depth, target)
    try:
        with session(detect=detect, schedule=schedule, seed=seed, depth=depth, target=target) as s:
            try:
                values = fn()
            finally:
                run.races = s.races
        run.values = _to_host(values)  # (the session drained at exit)
    except Exception as error:
        run.error = error
        run.ok = False
    return run


def _kernel_id(text: str) -> tuple[int, int]:
    stream, sep, seq = text.partition(".")
    if not (sep and stream.isdigit() and seq.isdigit()):
        raise ValueError(text)
    return int(stream), int(seq)


def parse_token(token: str) -> tuple[str, int, int, Any]:
    """A token as ``(schedule, seed, depth, target)``: ``"schedule:seed"`` (depth
    :data:`PCT_DEPTH`, target None), ``"pct:seed:depth"``, or ``"race:S.N:S.N"`` (seed 0; target the
    two kernels as ``(stream, seq)`` pairs); ValueError for anything else."""
    parts = str(token).split(":")
    name = parts[0]
    try:
        if name == "race" and len(parts) == 3:
            return name, 0, PCT_DEPTH, (_kernel_id(parts[1]), _kernel_id(parts[2]))
        expected = 3 if name == "pct" else 2
        if name in SCHEDULES and name != "race" and len(parts) == expected and parts[1].lstrip("-").isdigit():
            depth = int(parts[2]) if expected == 3 and parts[2].isdigit() else PCT_DEPTH if expected == 2 else 0
            if depth >= 1:
                return name, int(parts[1]), depth, None
    except ValueError:
        pass
    raise ValueError(
        f"schedule token: expected 'schedule:seed' with a schedule in {SCHEDULES[:-2]}, 'pct:seed:depth' or"
        f" 'race:S.N:S.N', got {token!r}"
    )


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


def explore(fn: Callable[[], Any], schedules: int = 8, seed: int = 0, detect: str = "record") -> Exploration:
    """Run ``fn`` (which issues fake-device work and returns values) once eagerly, then under
    ``schedules`` deferred schedules (first one race-directed schedule per race between kernels the
    eager run recorded, :func:`directed`; then :func:`plan`: adversarial, lazy, then random and pct
    seeds from ``seed``, alternating), each in a
    fresh ``fake.session(detect=detect, ...)``. A run fails when it raises or returns values that
    differ from the eager run's. If the eager run raises, that exception propagates."""
    if schedules < 1:
        raise ValueError(f"explore(schedules): expected at least 1, got {schedules}")
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
    return Exploration(failure is None, runs, failure, reference)


def replay(fn: Callable[[], Any], token: str, detect: str = "record") -> Run:
    """Rerun ``fn`` under the schedule ``token`` names (from :attr:`Run.token`): the same values,
    bit for bit. ``ok`` says whether they match an eager run of ``fn`` (made first)."""
    name, s, depth, target = parse_token(token)
    reference = _run(fn, "eager", 0, detect)
    run = _run(fn, name, s, detect, depth, target)
    if run.error is None:
        run.ok = reference.error is None and same_values(reference.values, run.values)
    return run
