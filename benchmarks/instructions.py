"""Machine instructions per call of the detector's hot paths, counted by valgrind's callgrind.

Wall-clock figures (``detector_overhead.py``) swing by up to 2x on a shared machine; instruction
counts don't (they repeat to within 0.1%), so this script is how two versions of the fast path are
compared on a busy machine. It is not a speed figure: Python code runs fewer instructions per
nanosecond than torch's kernels, so a ratio of instructions is lower than the ratio of times.

Each case runs ``--calls`` times in a child process under callgrind, with instrumentation switched
on only after the imports and a warm-up, and counted only inside the measured loop (an ``eval``).
Cases: the EPLB-shaped step of ``detector_overhead.py`` (tracked, and plain CPU tensors), and the
ops it is made of, tracked and plain.

Run: python benchmarks/instructions.py [--calls N] [case ...]   (needs ``valgrind`` on PATH)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

CASES = ("step", "plain_step", "bincount", "plain_bincount", "add_", "plain_add_", "plus", "plain_plus", "streams", "switch")


def child(case: str, calls: int) -> None:
    import time

    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import detector_overhead as d

    import streamkit as sk
    from streamkit import fake

    torch.manual_seed(0)
    torch.set_num_threads(1)
    host_ids = [torch.randint(0, d.EXPERTS, (d.TOKENS * d.TOPK,)) for _ in range(d.LAYERS)]
    with fake.session(detect="raise") as s:
        ids = [t.to(s.device) for t in host_ids]
        side = sk.Stream()
        counters = [torch.zeros(d.EXPERTS, dtype=torch.long, device=s.device) for _ in range(d.LAYERS)]
        plain_counters = [torch.zeros(d.EXPERTS, dtype=torch.long) for _ in range(d.LAYERS)]
        x, y = torch.zeros(16, device=s.device), torch.ones(16, device=s.device)
        small = torch.randint(0, d.EXPERTS, (16,), device=s.device)
        px, py, psmall = fake.peek(x), fake.peek(y), fake.peek(small)  # (their CPU tensors)

        def switch() -> None:
            with sk.switch(side):
                pass

        cases = {
            "step": lambda: d.tracked_step(ids, counters, side),
            "plain_step": lambda: d.plain_step(host_ids, plain_counters),
            "bincount": lambda: torch.bincount(small, minlength=d.EXPERTS),
            "plain_bincount": lambda: torch.bincount(psmall, minlength=d.EXPERTS),
            "add_": lambda: x.add_(y),
            "plain_add_": lambda: px.add_(py),
            "plus": lambda: x + y,
            "plain_plus": lambda: px + py,
            "streams": lambda: (side.wait_stream(sk.current_stream()), sk.record_stream(x, side)),
            "switch": switch,
        }
        fn = cases[case]
        for _ in range(20):
            fn()
        subprocess.run(["callgrind_control", "-i", "on", str(os.getpid())], capture_output=True, check=False)
        time.sleep(0.5)  # (the request is served at the next scheduling point: let it land)
        for _ in range(50):
            fn()

        def loop() -> None:
            for _ in range(calls):
                fn()

        eval(compile("loop()", "measured", "eval"))  # (callgrind counts inside builtin_eval only)


def measure(case: str, calls: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [
                "valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no",
                "--toggle-collect=builtin_eval", f"--callgrind-out-file={tmp}/cg.out",
                sys.executable, os.path.abspath(__file__), "--child", case, "--calls", str(calls),
            ],
            capture_output=True, text=True, check=False,
        )
    found = re.search(r"Collected : (\d+)", out.stderr)
    if out.returncode != 0 or found is None:
        raise SystemExit(f"{case}: valgrind failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    return int(found.group(1)) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", help=f"which to count (default: all of {', '.join(CASES)})")
    parser.add_argument("--calls", type=int, default=None, help="calls per case (default 50 steps, 2000 ops)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.calls)
        return
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f"cases: unknown {', '.join(map(repr, unknown))}; expected any of {', '.join(CASES)}")
    if args.calls is not None and args.calls < 1:
        parser.error(f"--calls: expected a positive number of calls, got {args.calls}")
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not on PATH: this benchmark counts instructions with callgrind")
    counts = {}
    for case in args.cases or CASES:
        calls = args.calls or (50 if case.endswith("step") else 2000)
        counts[case] = measure(case, calls)
        print(f"  {case:16s} {counts[case]:12,.0f} instructions/call", flush=True)
    print("tracked / plain (instructions):")
    for case in CASES:
        if not case.startswith("plain_") and case in counts and "plain_" + case in counts:
            print(f"  {case:16s} {counts[case] / counts['plain_' + case]:.2f}x")


if __name__ == "__main__":
    main()
