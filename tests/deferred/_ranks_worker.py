"""One rank of a 2-rank gloo job exploring schedules (run by tests/deferred/test_ranks.py and
benchmarks/explore_ranks.py; not collected by pytest).

Usage: python _ranks_worker.py SCHEDULES [SCENARIO ...]   (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE set)

For each scenario, ``fake.explore(program, schedules=..., group=<default group>)`` on every rank,
then a replay of the first failure with this rank's own token. Prints one ``RESULT <json>`` line.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
import traceback
import warnings

import torch
import torch.distributed as dist

import streamkit as sk
from streamkit import fake
from streamkit_eplb import HeatCollector

RANK = int(os.environ["RANK"])
WORLD = int(os.environ["WORLD_SIZE"])
N = 8  # elements of heat per rank


def pr4214(variant: str):
    """The PR-4214 heat gather on a side stream, each rank contributing ``arange(N) + 100 * rank``
    written on the default stream. ``variant``:

    - ``"merged"``: the side stream never waits for the default stream that wrote the input;
    - ``"early"``: the side stream waits, but before the write is issued;
    - ``"no-join"``: the side stream waits after the write, but the default stream reads the
      side stream's result (the gathered heat, summed over ranks) without waiting for it;
    - ``"fixed"``: fork wait after the write, join wait before the read.
    """

    def fn():
        dev = sk.device()
        side = sk.Stream()
        heat = torch.zeros(N, device=dev)
        gathered = torch.zeros(WORLD * N, device=dev)
        if variant == "early":
            side.wait_stream(sk.current_stream())  # too early: the write below is not covered
        heat.add_(torch.arange(N, device=dev, dtype=torch.float32) + 100.0 * RANK)  # default stream writes
        if variant in ("no-join", "fixed"):
            side.wait_stream(sk.current_stream())
        with sk.switch(side):
            dist.all_gather_into_tensor(gathered, heat)  # on the side stream (async_op=False)
            total = gathered.view(WORLD, N).sum(0)
        if variant != "no-join":
            sk.current_stream().wait_stream(side)
        return (total * 1).cpu()  # read on the default stream

    return fn


def collector():
    """streamkit_eplb's HeatCollector over the default group: two layers recorded per pass, two
    passes (window 2), one collect."""

    def fn():
        dev = sk.device()
        c = HeatCollector(2, 4, group=dist.group.WORLD, window=2)
        for step in range(2):
            for layer in range(2):
                c.record(layer, torch.arange(4, device=dev, dtype=torch.int32) + (10 * RANK + layer + step))
            if step == 0:
                c.step()
        return c.collect().wait().load

    return fn


def lopsided():
    """The merged variant on rank 1 only (rank 0 waits): the race is reported on rank 1 alone, so
    the ranks' race-directed plans differ. Rank 1 raises when its own result is wrong (after every
    collective), rank 0 just returns wrong values (rank 1's stale input reaches it)."""

    def fn():
        dev = sk.device()
        side = sk.Stream()
        heat = torch.zeros(N, device=dev)
        gathered = torch.zeros(WORLD * N, device=dev)
        heat.add_(torch.arange(N, device=dev, dtype=torch.float32) + 100.0 * RANK)
        if RANK == 0:
            side.wait_stream(sk.current_stream())
        with sk.switch(side):
            dist.all_gather_into_tensor(gathered, heat)
            total = gathered.view(WORLD, N).sum(0)
        sk.current_stream().wait_stream(side)
        values = (total * 1).cpu()
        if RANK == 1 and not torch.equal(values, torch.arange(N, dtype=torch.float32) * 2 + 100.0):
            raise AssertionError(f"rank 1 gathered {values.tolist()}")
        return values

    return fn


def two_streams():
    """Two collectives on one group from two streams with nothing ordering them (an all_reduce on
    a side stream, then an all_gather on the default stream): they keep their issue order on every
    rank under every schedule, so the values are right and nothing hangs."""

    def fn():
        dev = sk.device()
        side = sk.Stream()
        x = torch.full((4,), float(RANK + 1), device=dev)
        y = torch.full((4,), float(10 * (RANK + 1)), device=dev)
        out = torch.zeros(WORLD * 4, device=dev)
        side.wait_stream(sk.current_stream())
        with sk.switch(side):
            dist.all_reduce(x)
        dist.all_gather_into_tensor(out, y)
        sk.current_stream().wait_stream(side)
        return [(x * 1).cpu(), (out * 1).cpu()]

    return fn


def needle(at: int = 3, writes: int = 8):
    """A needle on every rank: the default stream writes ``x`` ``writes`` times (7 at write
    ``at``, else 1), the side stream (forked before the writes) reads it with no wait and
    all_reduces whether it saw a 7: wrong only when the read falls between write ``at`` and the
    next (depth 2), which the race reversal alone doesn't reach."""

    def fn():
        dev = sk.device()
        side = sk.Stream()
        x = torch.zeros(N, device=dev)
        side.wait_stream(sk.current_stream())
        for i in range(writes):
            x.fill_(7.0 if i == at else 1.0)
        with sk.switch(side):
            seen = (x == 7.0).any().to(torch.float32).reshape(1)
            dist.all_reduce(seen)
        sk.current_stream().wait_stream(side)
        return (seen * 1).cpu()

    return fn


PROGRAMS = {
    "lopsided": lopsided,
    "two-streams": two_streams,
    "merged": lambda: pr4214("merged"),
    "early": lambda: pr4214("early"),
    "no-join": lambda: pr4214("no-join"),
    "fixed": lambda: pr4214("fixed"),
    "collector": collector,
    "needle": needle,
}


def _plain(values):
    if isinstance(values, torch.Tensor):
        return values.tolist()
    if isinstance(values, (list, tuple)):
        return [_plain(v) for v in values]
    return values


def bits(values) -> list:
    if isinstance(values, (list, tuple)):
        return [bits(v) for v in values]
    t = values
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int64).flatten().tolist()


def eager_raises() -> dict:
    """fn raises on rank 1 only (after its collective): explore raises on every rank, none hangs."""

    def fn():
        x = torch.ones(4, device=sk.device())
        dist.all_reduce(x)
        if RANK == 1:
            raise KeyError("rank 1 only")
        return x.cpu()

    try:
        fake.explore(fn, schedules=3)
    except Exception as error:
        return {"raised": type(error).__name__, "message": str(error)}
    return {"raised": None}


def group_param() -> dict:
    """group=False: this process alone (a plain Exploration); a bad group: TypeError."""

    def fn():
        return (torch.ones(4, device=sk.device()) * 2).cpu()

    alone = fake.explore(fn, schedules=2, group=False)
    try:
        fake.explore(fn, schedules=2, group="world")
        bad = None
    except TypeError as error:
        bad = str(error)
    explicit = fake.explore(fn, schedules=2, group=dist.group.WORLD)
    return {"alone": type(alone).__name__, "bad": bad, "explicit": type(explicit).__name__, "world": explicit.world}


def scenario(name: str, schedules: int) -> dict:
    fn = PROGRAMS[name]()
    start = time.perf_counter()
    found = fake.explore(fn, schedules=schedules, seed=0)
    seconds = time.perf_counter() - start
    out = {
        "ok": found.ok,
        "type": type(found).__name__,
        "runs": len(found.runs),
        "seconds": seconds,
            "eager": _plain(found.reference.values),
        "tokens": [run.token for run in found.runs],
        "wrong": sum(not run.ok for run in found.runs),
        "failed_everywhere": sum(len(run.failed_ranks) == WORLD for run in found.runs),
        "all_tokens": [{str(r): t for r, t in run.tokens.items()} for run in found.runs],
    }
    f = found.failure
    if f is not None:
        out["failure_index"] = found.runs.index(f)
        out["failure_token"] = f.token
        out["failure_tokens"] = {str(r): t for r, t in f.tokens.items()}
        out["failed_ranks"] = f.failed_ranks
        out["failure_ok_here"] = f.ok
        out["failure_values"] = _plain(f.values)
        out["failure_error"] = None if f.error is None else repr(f.error)
        out["shrink_runs"] = f.shrink_runs
        out["explain"] = found.explain()
        again = fake.replay(fn, f.tokens[RANK])  # this rank's own token
        out["replay_token"] = again.token
        out["replay_ok"] = again.ok
        out["replay_error"] = None if again.error is None else repr(again.error)
        out["replay_bits_equal"] = f.values is not None and again.values is not None and bits(again.values) == bits(f.values)
    return out


def main() -> None:
    schedules = int(sys.argv[1])
    names = sys.argv[2:] or [*PROGRAMS, "eager-raises", "group-param"]
    warnings.simplefilter("ignore", FutureWarning)
    dist.init_process_group("gloo", rank=RANK, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    result: dict = {"rank": RANK}
    try:
        for name in names:
            try:
                if name == "eager-raises":
                    result[name] = eager_raises()
                elif name == "group-param":
                    result[name] = group_param()
                else:
                    result[name] = scenario(name, schedules)
            except Exception:
                result[name] = {"error": traceback.format_exc()}
        print("RESULT " + json.dumps(result), flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
