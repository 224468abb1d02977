"""Schedule exploration on two gloo ranks: how many of N schedules give wrong values per program,
and how long it takes.

Launches ``tests/deferred/_ranks_worker.py`` on 2 ranks (127.0.0.1) with ``fake.explore(fn,
schedules=N)`` over the default group for the PR-4214 variants (merged, early, no-join), the fixed
pattern and streamkit_eplb's HeatCollector, and prints per program and rank: the runs, the wrong
ones, the first failing run, and the seconds explore took (the eager run, N runs and the
agreement collectives between them).

usage: python benchmarks/explore_ranks.py [--schedules 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from _support import run_ranks  # noqa: E402

PROGRAMS = ("merged", "early", "no-join", "fixed", "collector")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", type=int, default=200)
    args = parser.parse_args()
    start = time.perf_counter()
    results = run_ranks([REPO / "tests/deferred/_ranks_worker.py", str(args.schedules), *PROGRAMS], timeout=3600)
    wall = time.perf_counter() - start
    print(f"fake.explore on 2 gloo ranks, {args.schedules} schedules per program (wall {wall:.1f} s, process start included)")
    print(f"{'program':<10} {'rank':>4} {'runs':>5} {'wrong':>6} {'first failure':>14} {'seconds':>8}")
    failed = False
    for r in results:
        lines = r.lines("RESULT ")
        if r.returncode != 0 or len(lines) != 1:
            print(r.describe())
            failed = True
            continue
        data = json.loads(lines[0])
        for name in PROGRAMS:
            entry = data[name]
            if "error" in entry:
                print(f"{name:<10} {r.rank:>4} error:\n{entry['error']}")
                failed = True
                continue
            first = "-" if entry["ok"] else f"run {entry['failure_index'] + 1}"
            print(f"{name:<10} {r.rank:>4} {entry['runs']:>5} {entry['wrong']:>6} {first:>14} {entry['seconds']:>8.2f}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
