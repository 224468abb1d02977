"""One rank of a 2-rank gloo job on the fake backend (run by tests/detector/test_collectives.py).

Usage: python _dist_worker.py   (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE in the environment)

Runs each scenario in its own ``fake.session(detect="record")`` and prints one line
``RESULT <json>``: per scenario, the values the collective produced and the races reported (op,
kind, stream name and line of both accesses). Lines are marked ``# <name>`` for the parent test.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback
import warnings

import torch
import torch.distributed as dist

import streamkit as sk
from streamkit import fake

N = 4


def _describe(access, names):
    name = next((label for label, stream in names.items() if stream == access.stream), repr(access.stream))
    return {"op": access.op, "kind": access.kind, "stream": name, "lineno": access.lineno, "location": access.location}


def _races(session, names):
    return [
        {"first": _describe(r.first, names), "second": _describe(r.second, names), "text": str(r)}
        for r in session.races
    ]


def all_gather(rank, world, fixed):
    with fake.session(detect="record") as s:
        default = sk.current_stream()
        side = sk.Stream()
        x = torch.empty(N, device=s.device)
        out = torch.empty(world * N, device=s.device)
        side.wait_stream(default)
        x.fill_(float(rank + 1))  # <ag-produce>
        if fixed:
            side.wait_stream(default)
        before = s.stats.copy()
        with sk.switch(side):
            dist.all_gather_into_tensor(out, x)  # <ag-collective>
        kernels = (s.stats - before).kernels
        default.wait_stream(side)
        values = out.cpu().tolist()
        del x, out
        return {"values": values, "kernels": kernels, "races": _races(s, {"default": default, "side": side})}


def all_reduce(rank, world, fixed):
    with fake.session(detect="record") as s:
        default = sk.current_stream()
        side = sk.Stream()
        x = torch.empty(N, device=s.device)
        side.wait_stream(default)
        x.fill_(float(rank + 1))  # <ar-produce>
        if fixed:
            side.wait_stream(default)
        before = s.stats.copy()
        with sk.switch(side):
            dist.all_reduce(x)  # <ar-collective>
        kernels = (s.stats - before).kernels
        default.wait_stream(side)
        values = x.cpu().tolist()
        del x
        return {"values": values, "kernels": kernels, "races": _races(s, {"default": default, "side": side})}


def all_reduce_read_on_default(rank, world, fixed):
    """The consumer side: the default stream reads the collective's output with/without a wait."""
    with fake.session(detect="record") as s:
        default = sk.current_stream()
        side = sk.Stream()
        x = torch.full((N,), float(rank + 1), device=s.device)
        side.wait_stream(default)
        with sk.switch(side):
            dist.all_reduce(x)  # <arc-collective>
        if fixed:
            default.wait_stream(side)
        total = x.sum()  # <arc-consume>
        sk.synchronize()
        value = total.item()
        del x, total
        return {"values": [value], "races": _races(s, {"default": default, "side": side})}


SCENARIOS = {
    "all_gather": all_gather,
    "all_reduce": all_reduce,
    "all_reduce_consumer": all_reduce_read_on_default,
}


def main() -> int:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    warnings.simplefilter("ignore", FutureWarning)  # all_gather_into_tensor is deprecated in new torch
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))
    result = {"rank": rank}
    try:
        for name, fn in SCENARIOS.items():
            for fixed in (False, True):
                key = f"{name}/{'fixed' if fixed else 'racy'}"
                try:
                    result[key] = fn(rank, world, fixed)
                except Exception:  # report it; the other rank is in the same scenario
                    result[key] = {"error": traceback.format_exc()}
                dist.barrier()
    finally:
        print("RESULT " + json.dumps(result), flush=True)
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
