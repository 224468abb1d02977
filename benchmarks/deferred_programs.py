"""Random race-free programs under deferred schedules: no wrong values.

Draws ``--programs`` programs from ``tests/_support/programs.py`` (three streams, in-place and
out-of-place ops, views, recycled ``empty`` allocations, frees with ``record_stream``, events,
host reads, ``non_blocking`` copies with their syncs; every conflicting pair of accesses ordered)
and runs each under ``fake.explore(program, schedules=--schedules, seed=program)``: an eager
reference run, then adversarial, lazy, random and PCT schedules. A run is wrong when its values
differ from the eager run's (bit for bit, NaN equal to NaN) or it raises; the detector must also
see no race (a race means the generator, or the detector, is wrong). The control runs the same
generator with half the needed waits dropped, which the schedules should catch.

Target (issue 11): 0 wrong values on 1,000 programs x 10 schedules.
Run: python benchmarks/deferred_programs.py [--programs 1000] [--schedules 10] [--control 100]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from _support.programs import random_race_free_program  # noqa: E402

from streamkit import fake  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=1000)
    parser.add_argument("--schedules", type=int, default=10)
    parser.add_argument("--steps", type=int, default=24, help="operations per program")
    parser.add_argument("--control", type=int, default=100, help="programs with dropped waits (0: none)")
    args = parser.parse_args()

    start = time.perf_counter()
    wrong = races = runs = 0
    first = None
    for seed in range(args.programs):
        found = fake.explore(random_race_free_program(seed, args.steps), schedules=args.schedules, seed=seed)
        runs += len(found.runs)
        bad = [run for run in found.runs if not run.ok]
        wrong += len(bad)
        races += len(found.reference.races) + sum(len(run.races) for run in found.runs)
        if bad and first is None:
            first = (seed, found.explain())
    elapsed = time.perf_counter() - start
    print(f"race-free programs: {args.programs} x {args.schedules} schedules = {runs} runs ({args.steps} ops each)")
    print(f"  wrong values: {wrong} (target 0)   races reported: {races} (expected 0)")
    print(f"  time: {elapsed:.1f} s ({elapsed / max(runs, 1) * 1e3:.2f} ms per run, eager references included)")
    if first is not None:
        print(f"  first wrong program: seed {first[0]}\n{first[1]}")
    if args.control:
        start = time.perf_counter()
        caught = sum(
            not fake.explore(random_race_free_program(seed, args.steps, drop_waits=0.5), schedules=args.schedules, seed=seed).ok
            for seed in range(args.control)
        )
        print(f"control (half the waits dropped): {caught} of {args.control} programs caught ({time.perf_counter() - start:.1f} s)")
    return 0 if wrong == 0 and races == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
