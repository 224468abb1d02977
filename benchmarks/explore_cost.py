"""What one explored schedule costs against the eager tracked run of the same program.

Issue 19's target: an explored schedule costs at most 1.2x the eager tracked run. For each program
the script times, in one process, alternating:

- **eager tracked**: one run of ``fn`` in ``fake.session(detect="record")`` (what
  ``fake.explore``'s runs do, minus the schedule: a fresh session, the values copied to the host);
- **per explored schedule**: ``fake.explore(fn, schedules=N, shrink=False)`` divided by ``N``,
  minus nothing (the eager reference run, the plan, every run and its comparison are in it).

Each figure is the best of ``--repeats`` timings (this shared 2-core machine swings by up to 2x),
and the ratio is best over best. ``--kinds`` also prints the time of one run of each schedule kind
of the plan (best of the repeats), to show where the time goes.

Programs: the EPLB-like step of ``benchmarks/detector_overhead.py`` (16 layers: ``bincount``, a fork
wait, a side-stream ``add_`` into the layer's counter, ``record_stream``; a join, a stack, a host
copy), a loop of small elementwise ops over three streams joined by events, and two planted bugs
of ``tests/deferred/_planted.py`` (a late needle in 60 writes and its race-free twin).

Run: python benchmarks/explore_cost.py [--schedules 20] [--repeats 5] [--kinds]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "deferred"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import streamkit as sk  # noqa: E402
from streamkit import fake  # noqa: E402
from streamkit._backends.fake._explore import Explorer, run_schedule  # noqa: E402

from _planted import late  # noqa: E402
from detector_overhead import EXPERTS, LAYERS, TOKENS, TOPK, tracked_step  # noqa: E402


def eplb_step() -> Callable[[], Any]:
    torch.manual_seed(0)
    host_ids = [torch.randint(0, EXPERTS, (TOKENS * TOPK,)) for _ in range(LAYERS)]

    def program() -> torch.Tensor:
        dev = sk.device()
        ids = [t.to(dev) for t in host_ids]
        side = sk.Stream()
        counters = [torch.zeros(EXPERTS, dtype=torch.long, device=dev) for _ in range(LAYERS)]
        return tracked_step(ids, counters, side)  # (detector_overhead's step)

    return program


def elementwise(steps: int = 40) -> Callable[[], Any]:
    """Three streams, each a chain of small elementwise ops on its own buffers; every few steps a
    stream consumes another's result after waiting on its event (race-free)."""

    def program() -> list:
        dev = sk.device()
        streams = [sk.current_stream(), sk.Stream(), sk.Stream()]
        bufs = [torch.ones(64, device=dev) * (i + 1) for i in range(3)]
        sk.synchronize()
        for step in range(steps):
            for i, s in enumerate(streams):
                with sk.switch(s):
                    y = bufs[i] * 0.5
                    bufs[i].add_(y)
                    bufs[i].mul_(0.75)
            if step % 8 == 7:
                done = sk.Event()
                done.record(streams[1])
                streams[2].wait_event(done)
                with sk.switch(streams[2]):
                    bufs[2].add_(bufs[1])
                streams[1].wait_stream(streams[2])
        for s in streams[1:]:
            sk.current_stream().wait_stream(s)
        return [b.sum().item() for b in bufs]

    return program


PROGRAMS: dict[str, Callable[[], Callable[[], Any]]] = {
    "eplb-step": eplb_step,
    "elementwise-3s": elementwise,
    "late-60@45 (bug)": lambda: late()(False),
    "late-60@45 (twin)": lambda: late()(True),
}


def best(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(fn: Callable[[], Any], schedules: int, repeats: int) -> tuple[float, float]:
    """(seconds per eager tracked run, seconds per explored schedule), best of ``repeats``, each
    timing of one alternating with one of the other."""
    eager = explored = float("inf")
    run_schedule(fn, "eager", 0, "record")  # (warm-up: meta caches, first dispatches)
    fake.explore(fn, schedules=schedules, shrink=False)
    for _ in range(repeats):
        eager = min(eager, best(lambda: run_schedule(fn, "eager", 0, "record"), 3))
        t = time.perf_counter()
        fake.explore(fn, schedules=schedules, shrink=False)
        explored = min(explored, (time.perf_counter() - t) / schedules)
    return eager, explored


def kinds(fn: Callable[[], Any], schedules: int, repeats: int) -> dict[str, float]:
    """Seconds of one run per schedule kind of explore's plan (best over the runs of that kind and
    the repeats)."""
    explorer = Explorer(fn, schedules, 0)
    explorer.run_reference()
    out: dict[str, float] = {}
    for _ in range(repeats):
        for slot in explorer.slots():
            t = time.perf_counter()
            explorer.run(slot)
            out[slot.schedule] = min(out.get(slot.schedule, float("inf")), time.perf_counter() - t)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", type=int, default=20, help="schedules per explore call (default 20)")
    parser.add_argument("--repeats", type=int, default=5, help="timings per figure, best kept (default 5)")
    parser.add_argument("--kinds", action="store_true", help="also time one run of each schedule kind")
    parser.add_argument("--only", default=None, help="run the programs whose name contains this")
    args = parser.parse_args()
    for name in ("schedules", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected a positive number, got {getattr(args, name)}")
    if args.only is not None and not any(args.only in name for name in PROGRAMS):
        parser.error(f"--only: {args.only!r} names none of the programs ({', '.join(PROGRAMS)})")
    torch.set_num_threads(1)
    print(f"explore(fn, schedules={args.schedules}, shrink=False) / {args.schedules} against one eager tracked run;"
          f" best of {args.repeats}")
    print("| program | kernels | eager tracked | per explored schedule | ratio |")
    print("|---|---|---|---|---|")
    for name, make in PROGRAMS.items():
        if args.only and args.only not in name:
            continue
        fn = make()
        with fake.session(detect="record") as s:
            fn()
            kernels = s.stats.kernels
        eager, explored = measure(fn, args.schedules, args.repeats)
        print(f"| {name} | {kernels} | {eager * 1e3:.2f} ms | {explored * 1e3:.2f} ms | **{explored / eager:.2f}x** |", flush=True)
        if args.kinds:
            per_kind = kinds(fn, args.schedules, args.repeats)
            print("|  | by kind | " + ", ".join(f"{k} {v * 1e3:.2f} ms ({v / eager:.2f}x)" for k, v in per_kind.items()) + " | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
