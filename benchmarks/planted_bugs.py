"""Planted bugs of known depth: how many schedules ``fake.explore`` needs to find each, per seed.

The programs are ``tests/deferred/_planted.py`` (31 bugs of depth 1 to 4, 2 to 4 streams, 10 to
~450 steps: missing fork/join waits, events recorded at the wrong place, lost updates of unordered
``add_``, needles early and late in long write sequences, conjunctions of 2 to 4 stale reads,
floods of 20 and 60 benign races, races repeated in loops) and their race-free twins.

For every bug and seed, explore runs with the budget issue 19 sets for its depth (20 schedules for
depth 1 and 2, 50 for 3, 200 for 4) and stops at the first failing schedule; the table gives the
schedules-to-find per seed ("-" = not found within the budget), beside the PCT bound
1 / (n k^(d-1)) (n threads: the streams plus the host; k steps: twice the focus kernels, those on
memory a race was on: the others run at issue and take no step) and
the same search without the directed runs (``detect="off"``: PCT and rates alone). Then every
failure's token is replayed (same values bit for bit), every twin is explored (no failure may
appear), and the cost of one explored schedule is compared with one eager tracked run.

Targets (issue 19): depth 1-2 within 20 for every seed, depth 3 within 50, depth 4 within 200;
median schedules-to-find <= 2; no false failure; an explored schedule <= 1.2x the eager tracked run.

Run: python benchmarks/planted_bugs.py [--seeds 10] [--twin-schedules 50] [--twin-seeds 3] [--no-undirected]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "deferred"))

from _planted import BUDGET, suite  # noqa: E402

from streamkit._backends.fake._explore import Explorer, replay, run_schedule, same_values  # noqa: E402
from streamkit._backends.fake._policies import pct_bound  # noqa: E402


def schedules_to_find(fn, budget: int, seed: int, detect: str = "record") -> tuple[int | None, object, Explorer]:
    explorer = Explorer(fn, budget, seed, detect)
    found = explorer.explore(shrink=False, stop=True)
    return (None if found.ok else len(found.runs)), found, explorer


def cost(fn, repeats: int = 5, schedules: int = 20) -> tuple[float, float]:
    """(seconds per eager tracked run, seconds per explored schedule), best of ``repeats``: the
    eager tracked run is ``fake.session(detect="record")`` around ``fn`` (reports built), without
    the observation explore adds to its reference run; the explored schedules are explore's plan."""
    explorer = Explorer(fn, schedules, 0)
    explorer.run_reference()
    slots = explorer.slots()
    eager = explored = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        run_schedule(fn, "eager", 0, "record")
        eager = min(eager, time.perf_counter() - t)
        t = time.perf_counter()
        for slot in slots:
            explorer.run(slot)
        explored = min(explored, (time.perf_counter() - t) / len(slots))
    return eager, explored


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--twin-schedules", type=int, default=50)
    parser.add_argument("--twin-seeds", type=int, default=3)
    parser.add_argument("--no-undirected", action="store_true", help="skip the PCT/rates-alone column")
    args = parser.parse_args()
    start = time.perf_counter()
    bugs = suite()
    print(f"{len(bugs)} planted bugs x {args.seeds} seeds; budget by depth {BUDGET}")
    print(f"| bug | d | n | k | PCT bound | schedules to find, seeds 0-{args.seeds - 1} | max | PCT/rates alone (found, median) |")
    print("|---|---|---|---|---|---|---|---|")
    all_counts: list[int] = []
    misses = 0
    replays = replay_ok = 0
    by_depth: dict = {}
    for bug in bugs:
        budget = BUDGET[bug.depth]
        counts: list = []
        steps = None
        for seed in range(args.seeds):
            n, found, explorer = schedules_to_find(bug.make(False), budget, seed)
            steps = explorer.steps
            counts.append(n)
            if n is None:
                misses += 1
                continue
            all_counts.append(n)
            by_depth.setdefault(bug.depth, []).append(n)
            if seed == 0:  # the failure's token replays its values bit for bit
                replays += 1
                again = replay(bug.make(False), found.failure.token)
                f = found.failure
                same = (f.error is not None and again.error is not None and type(f.error) is type(again.error)) or (
                    f.error is None and again.error is None and same_values(f.values, again.values)
                )
                replay_ok += same
        threads = bug.streams + 1
        bound = pct_bound(threads, steps, bug.depth)
        alone = "-"
        if not args.no_undirected:
            found_alone = [schedules_to_find(bug.make(False), budget, seed, detect="off")[0] for seed in range(args.seeds)]
            hits = [c for c in found_alone if c is not None]
            alone = f"{len(hits)}/{args.seeds}, {statistics.median(hits) if hits else '-'}"
        shown = " ".join("-" if c is None else str(c) for c in counts)
        worst = "-" if None in counts else max(counts)
        print(f"| {bug.name} | {bug.depth} | {threads} | {steps} | {bound:.2g} | {shown} | {worst} | {alone} |", flush=True)
    print()
    print(f"found within budget: {len(all_counts)} of {len(bugs) * args.seeds} (bug, seed) pairs; misses {misses}")
    print(f"median schedules to find: {statistics.median(all_counts) if all_counts else '-'}")
    for depth in sorted(by_depth):
        values = by_depth[depth]
        print(f"  depth {depth}: median {statistics.median(values)}, max {max(values)} (budget {BUDGET[depth]})")
    print(f"replay bit for bit: {replay_ok} of {replays}")
    false = 0
    twins = 0
    for bug in bugs:
        for seed in range(args.twin_seeds):
            twins += 1
            found = Explorer(bug.make(True), args.twin_schedules, seed).explore(shrink=False, stop=True)
            if not found.ok:
                false += 1
                print(f"FALSE FAILURE: twin of {bug.name}, seed {seed}: {found.failure.token}")
    print(f"race-free twins: {false} false failures in {twins} explorations x {args.twin_schedules} schedules")
    print()
    print("| program | eager tracked run | explored schedule | ratio |")
    print("|---|---|---|---|")
    ratios = []
    twin_ratios = []
    for bug in bugs:
        if bug.name not in ("fork-4s-pad", "join-pad", "flood-60", "late-60@45", "conj-4-pad", "lost-pad", "loop-30", "mixed-4"):
            continue
        for fixed in (False, True):
            eager, explored = cost(bug.make(fixed))
            (twin_ratios if fixed else ratios).append(explored / eager)
            name = f"{bug.name} (race-free twin)" if fixed else bug.name
            print(f"| {name} | {eager * 1e3:.2f} ms | {explored * 1e3:.2f} ms | {explored / eager:.2f}x |")
    print(f"explored schedule / eager tracked run: median {statistics.median(ratios):.2f}x on the bugs,"
          f" {statistics.median(twin_ratios):.2f}x on their race-free twins (target <= 1.2x)")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
