"""Schedule exploration over several ranks: ``fake.explore(fn, group=...)`` on every rank of a
``torch.distributed`` process group (docs/exploration.md, "Several ranks"). :func:`explore` is
``fake.explore``: it resolves ``group`` and hands one process to :func:`._explore.explore`.

Every rank calls ``explore`` with the same arguments; ``fn`` may issue c10d collectives on the
fake device. The ranks must run the same number of runs (each run issues ``fn``'s collectives), so
they agree on everything that decides a run over the group, with host-side collectives between
runs (no fake session is open then, so none of ``fn``'s collectives is pending):

- whether the eager reference run raised anywhere (then every rank raises);
- the plan: each rank's directed runs (:func:`~._planner.directed_slots` of its own eager run,
  ``ranks=True``: race reversals and the needle sweep) are gathered, and every rank runs their union, in rank order then plan order, each once. A
  rank that didn't plan that run runs the slot under ``lazy:seed``, so the slot still exists
  there. They are interleaved with the undirected runs as in one process (the same kinds and
  seeds on every rank; PCT's step count is each rank's own);
- after each run, every rank's outcome and token (one ``all_gather_object``): the group's
  exploration fails at the first run that failed on any rank, on every rank.

Collectives themselves never reorder: a deferred schedule runs each collective at issue, after
what its stream is ordered after (:meth:`~._deferred.DeferredScheduler.run_now`), so every rank
issues them in program order under every schedule.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from . import _explore
from ._explore import (
    EXPLORED_SITE_DEPTH, SHRINK_RUNS, SHRINK_RUNS_PER_CONSTRAINT, Exploration, Explorer, Run, ddmin, deviations, failed_against, identify_kernels, run_schedule,
    check_explore_args,
)
from ._tokens import Constraints, explanation, fingerprint, occurrence_totals
from ._planner import Slot, directed_slots


@dataclass(repr=False)
class RankRun(Run):
    """One run on one rank of a group exploration: a :class:`~._explore.Run` (``ok``, ``token``,
    ``values``... are this rank's) plus ``rank`` (this rank in the group), ``tokens`` (every rank's
    token for this run, ``{rank: token}``; replay on rank r with ``tokens[r]``) and
    ``failed_ranks`` (the ranks whose run raised or gave values other than their eager run's)."""

    rank: int = 0
    tokens: dict = field(default_factory=dict)
    failed_ranks: list = field(default_factory=list)

    def __repr__(self) -> str:
        mine = super().__repr__()
        if not self.failed_ranks:
            return mine[:-1] + f" on rank {self.rank}; ok on every rank>"
        return mine[:-1] + f" on rank {self.rank}; failed on ranks {self.failed_ranks}>"


@dataclass(repr=False)
class RankExploration(Exploration):
    """What :func:`explore_group` found, on this rank: ``ok`` (every run gave the eager values on
    every rank; the same on every rank), ``runs`` (this rank's :class:`RankRun` s, the same slots on
    every rank), ``failure`` (this rank's run of the first slot that failed on any rank: its
    ``tokens`` are every rank's tokens for it, its ``failed_ranks`` where it failed), ``reference``
    (this rank's eager run), ``rank`` and ``world``."""

    rank: int = 0
    world: int = 1

    def __repr__(self) -> str:
        if self.ok:
            return f"<exploration ok on {self.world} ranks: {len(self.runs)} schedules gave the eager values on every rank>"
        f = self.failure
        return (
            f"<exploration failed at run {self.runs.index(f) + 1} on ranks {f.failed_ranks} ({len(self.runs)} runs);"
            f" rank {self.rank}: {Run.__repr__(f)}; replay on each rank r with fake.replay(fn, tokens[r]),"
            f" tokens {f.tokens!r}>"
        )

    def explain(self) -> str:
        if self.failure is None:
            return f"every explored schedule gave the eager values on all {self.world} ranks"
        f = self.failure
        head = (
            f"run {self.runs.index(f) + 1} failed on ranks {f.failed_ranks} of {self.world}; the tokens per rank:"
            f" {f.tokens!r} (replay on rank r with fake.replay(fn, tokens[r]))"
        )
        if f.ok:
            return head + f"\nrank {self.rank} ({f.token}): gave its eager values"
        return head + f"\nrank {self.rank}: " + Exploration.explain(self)


def resolve_group(group: Any) -> Any:
    """The process group ``explore(group=...)`` coordinates over, or None for one process.

    ``None``: the default group when ``torch.distributed`` is initialized, else one process (as
    ``torch.distributed`` reads ``group=None``); ``False``: one process even so; else a process group.
    """
    if group is False:
        return None
    try:
        import torch.distributed as dist
    except ImportError:  # (a torch without distributed)
        dist = None
    initialized = dist is not None and dist.is_available() and dist.is_initialized()
    if group is None:
        return dist.group.WORLD if initialized else None
    if not initialized:
        raise ValueError(
            f"explore(group): got {group!r} but torch.distributed is not initialized; call"
            " torch.distributed.init_process_group first, or pass group=None (one process)"
        )
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"explore(group): expected a torch.distributed ProcessGroup, None (the default group if"
            f" initialized) or False (this process alone), got {type(group).__name__}"
        )
    return group


def _gather(obj: Any, group: Any) -> list:
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _as_rank_run(run: Run, rank: int) -> RankRun:
    values = {f.name: getattr(run, f.name) for f in dataclasses.fields(Run) if f.init}
    return RankRun(**values, rank=rank)


def slots(own: list, plans: list, explorer: Explorer) -> list[Slot]:
    """This rank's schedules: a slot per directed run of any rank (``plans``: every rank's
    directed runs, in rank order; the union in order, each once), as itself where ``own`` (this
    rank's) has it, else ``lazy:seed``; interleaved with the undirected runs as in one process
    (:meth:`~._explore.Explorer.slots`), so every rank runs the same kinds in the same slots."""
    union: list = []
    for targets in plans:
        for target in targets:
            target = Slot(*target)
            if target not in union:
                union.append(target)
    mine = set(own)
    order = [t if t in mine else Slot("lazy", explorer.seed) for t in union]
    return explorer.slots(order)


def explore(
    fn: Callable[[], Any], schedules: int = 8, seed: int = 0, detect: str = "record", group: Any = None, **options: Any
) -> Exploration:
    """``fake.explore``: run ``fn`` eagerly, then under ``schedules`` deferred schedules, and report
    the runs whose values differ from the eager run's or that raise (:func:`._explore.explore`
    describes the runs, their order and the result; ``options`` are passed on to it).

    ``group``: the ``torch.distributed`` process group whose ranks all call ``explore`` with the
    same arguments (``fn`` may issue collectives on it): ``None`` (default) is the default group
    when ``torch.distributed`` is initialized, else this process alone; ``False`` is this process
    alone even so. Over a group the ranks agree on the plan and on each run's outcome, and the
    result is a :class:`RankExploration` whose runs hold every rank's token (this module's
    docstring; docs/exploration.md, "Several ranks")."""
    check_explore_args(fn, schedules, seed, detect)
    pg = resolve_group(group)
    if pg is None:
        return _explore.explore(fn, schedules, seed, detect, **options)
    if options:
        raise TypeError(f"explore(group=...): {sorted(options)} apply to one process only; pass group=False for that")
    return explore_group(fn, schedules, seed, detect, pg)


def explore_group(fn: Callable[[], Any], schedules: int, seed: int, detect: str, group: Any) -> RankExploration:
    """:func:`~._explore.explore` on every rank of ``group`` (see the module docstring)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    explorer = Explorer(fn, schedules, seed, detect)
    try:
        reference = explorer.run_reference()
    except TypeError as error:  # (values explore can't compare: refused on every rank)
        reference = Run("eager", 0, error=error, ok=False)
    errors = _gather(None if reference.error is None else f"{type(reference.error).__name__}: {reference.error}", group)
    if reference.error is not None:
        raise reference.error
    failed = {r: e for r, e in enumerate(errors) if e is not None}
    if failed:
        raise RuntimeError(f"explore: the eager run raised on rank(s) {sorted(failed)} (not on rank {rank}): {failed}")
    # (race reversals and the needle sweep: directed_slots(ranks=True), docs/exploration.md
    # "Several ranks")
    own = [tuple(slot) for slot in directed_slots(explorer.observation, ranks=True)] if detect == "record" else []
    runs: list[RankRun] = []
    failure = None
    for slot in slots([Slot(*t) for t in own], _gather(own, group), explorer):
        run = _as_rank_run(explorer.run(slot), rank)
        outcomes = _gather((run.ok, run.token), group)
        run.tokens = {r: token for r, (_, token) in enumerate(outcomes)}
        run.failed_ranks = [r for r, (ok, _) in enumerate(outcomes) if not ok]
        runs.append(run)
        if run.failed_ranks and failure is None:
            failure = run
        else:
            run._trace = None
    if failure is not None:
        shrink_group(explorer, failure, group)
    return RankExploration(failure is None, runs, failure, reference, rank=rank, world=world)


def shrink_group(explorer: Explorer, failure: RankRun, group: Any) -> None:
    """Shrink a failure over the ranks: one ddmin over every rank's deviations (concatenated in
    rank order); each trial runs, on every rank, its own part of the subset under the
    "constraints" schedule, and fails when the run fails on any rank (one ``all_gather_object``),
    so every rank makes the same choices and the same number of runs. Each rank's failure then
    has its own constraints, fingerprint, explanation and full token (``tokens`` updated)."""
    import torch.distributed as dist

    rank = dist.get_rank(group)
    ids = identify_kernels(failure)
    pairs = deviations(failure, ids, explorer.observation) if ids is not None else []
    failure._trace = None
    if ids is not None:
        failure.fingerprint = fingerprint(ids)
    failure.deviations = len(pairs)
    counts = _gather(len(pairs), group)
    offset, total = sum(counts[:rank]), sum(counts)
    cache: dict = {}
    best = [total]

    def fails(subset: list) -> bool:
        key = tuple(subset)
        if key not in cache:
            budget = SHRINK_RUNS + SHRINK_RUNS_PER_CONSTRAINT * min(max(best[0] - 1, 0), 3)
            if failure.shrink_runs >= budget:
                return False  # (the same on every rank: the budget follows shared outcomes)
            failure.shrink_runs += 1
            mine = [pairs[i - offset] for i in key if offset <= i < offset + len(pairs)]
            run = run_schedule(explorer.fn, "constraints", 0, explorer.detect, target=Constraints(mine), site_depth=EXPLORED_SITE_DEPTH)
            cache[key] = any(_gather(failed_against(run, explorer.reference), group))
            if cache[key]:
                best[0] = min(best[0], len(key))
        return cache[key]

    if total and fails(list(range(total))):
        kept = [pairs[i - offset] for i in ddmin(list(range(total)), fails) if offset <= i < offset + len(pairs)]
        failure.constraints = tuple(kept)
        failure.explanation = explanation(kept, occurrence_totals(ids)) if kept else (
            "(no constraint of this rank's: the orderings that matter are other ranks')"
        )
    else:
        failure.explanation = (
            f"(no constraint form: the {total} deviations of all ranks don't reproduce the failure on their own"
            " (collectives run at issue, outside what a constraint holds); the tokens replay their seeds)"
        )
    failure.tokens = dict(enumerate(_gather(failure.token, group)))
