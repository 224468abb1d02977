"""One rank of a 2-rank gloo job on the fake backend (run by tests/fidelity/test_c10d.py).

Usage: python _c10d_worker.py   (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE in the environment)

For each of five collectives and each scenario, one ``fake.session(detect="record")``; prints one
line ``RESULT <json>``: per ``<collective>/<scenario>``, the output values, the values plain CPU
torch computes for them, and the races (op, kind, stream, line of both accesses). Lines that the
parent test looks for end with ``# <name>``.
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
COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "all_to_all_single")


def rank_input(rank: int, world: int, kind: str) -> torch.Tensor:
    """Rank ``rank``'s input on the host (plain CPU torch)."""
    n = N * world if kind in ("reduce_scatter_tensor", "all_to_all_single") else N
    return torch.arange(n, dtype=torch.float32) + 100.0 * (rank + 1)


def expected(rank: int, world: int, kind: str) -> list[float]:
    """What the collective leaves in rank ``rank``'s output, computed with plain CPU torch."""
    inputs = [rank_input(r, world, kind) for r in range(world)]
    if kind == "all_reduce":
        out = torch.stack(inputs).sum(0)
    elif kind == "all_gather_into_tensor":
        out = torch.cat(inputs)
    elif kind == "reduce_scatter_tensor":
        out = torch.stack(inputs).sum(0).chunk(world)[rank]
    elif kind == "broadcast":
        out = inputs[0]
    else:  # all_to_all_single: chunk `rank` of every rank's input, in rank order
        out = torch.cat([x.chunk(world)[rank] for x in inputs])
    return out.tolist()


def buffers(device, rank: int, world: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input, output)`` on the fake device (the same tensor for in-place collectives); the
    input's values are written by a kernel on the current stream."""
    host = rank_input(rank, world, kind)
    x = torch.empty(host.shape, device=device)
    x.copy_(host.to(device))
    if kind in ("all_reduce", "broadcast"):
        return x, x
    n = {"all_gather_into_tensor": N * world, "reduce_scatter_tensor": N, "all_to_all_single": N * world}[kind]
    return x, torch.empty(n, device=device)


def issue(kind: str, x: torch.Tensor, out: torch.Tensor, async_op: bool):
    if kind == "all_reduce":
        return dist.all_reduce(x, async_op=async_op)  # <call-all_reduce>
    if kind == "all_gather_into_tensor":
        return dist.all_gather_into_tensor(out, x, async_op=async_op)  # <call-all_gather_into_tensor>
    if kind == "reduce_scatter_tensor":
        return dist.reduce_scatter_tensor(out, x, async_op=async_op)  # <call-reduce_scatter_tensor>
    if kind == "broadcast":
        return dist.broadcast(x, src=0, async_op=async_op)  # <call-broadcast>
    return dist.all_to_all_single(out, x, async_op=async_op)  # <call-all_to_all_single>


# -- scenarios: each returns the output values; races are read from the session -------------------


def sync_clean(s, kind, rank, world, streams):
    """async_op=False on the compute stream, output consumed there: ordered (the collective runs
    on the issuing stream)."""
    x, out = buffers(s.device, rank, world, kind)
    issue(kind, x, out, False)
    return (out * 1).cpu().tolist()


def sync_racy(s, kind, rank, world, streams):
    """async_op=False inside switch(side) (side waited for the input), output read on the default
    stream without waiting for side."""
    default, side = streams["default"], streams["side"]
    x, out = buffers(s.device, rank, world, kind)
    side.wait_stream(default)
    with sk.switch(side):
        issue(kind, x, out, False)
    y = out * 1  # <sync-read>
    default.wait_stream(side)
    return y.cpu().tolist()


def async_racy(s, kind, rank, world, streams):
    """async_op=True, then the output read and the input overwritten before work.wait()."""
    x, out = buffers(s.device, rank, world, kind)
    work = issue(kind, x, out, True)
    y = out * 1  # <async-read>
    x.fill_(-1.0)  # <async-write>
    work.wait()
    return y.cpu().tolist()


def async_wait_elsewhere(s, kind, rank, world, streams):
    """async_op=True, work.wait() with side current: only side waits; reading on default races."""
    x, out = buffers(s.device, rank, world, kind)
    work = issue(kind, x, out, True)
    with sk.switch(streams["side"]):
        work.wait()
    y = out * 1  # <elsewhere-read>
    streams["default"].wait_stream(streams["side"])
    return y.cpu().tolist()


def async_clean(s, kind, rank, world, streams):
    """The fix pattern: issue inside switch(side) (side waited for the input), drop the input,
    then work.wait() on the compute stream before using the output."""
    default, side = streams["default"], streams["side"]
    x, out = buffers(s.device, rank, world, kind)
    side.wait_stream(default)
    with sk.switch(side):
        work = issue(kind, x, out, True)
    if x is not out:
        del x  # the collective holds it until wait(): not a free race
    work.wait()
    work.wait()  # a second wait is harmless
    return (out * 1).cpu().tolist()


SCENARIOS = {
    "sync_clean": sync_clean,
    "sync_racy": sync_racy,
    "async_racy": async_racy,
    "async_wait_elsewhere": async_wait_elsewhere,
    "async_clean": async_clean,
}


# -- single scenarios (all_reduce) ----------------------------------------------------------


def two_groups(rank, world, group):
    """Each process group has its own stream: waiting for one group's work orders nothing of the
    other's."""
    with fake.session(detect="record") as s:
        x = torch.full((N,), float(rank + 1), device=s.device)
        y = torch.full((N,), float(rank + 1), device=s.device)
        wx = dist.all_reduce(x, async_op=True)  # <two-groups-x>
        wy = dist.all_reduce(y, async_op=True, group=group)  # <two-groups-y>
        wy.wait()
        vy = y.cpu().tolist()
        vx = x.cpu().tolist()  # <two-groups-read-x>
        wx.wait()
        races = [{"first": _describe(r.first, {}), "second": _describe(r.second, {})} for r in s.races]
        del x, y
    return {"values": vx + vy, "races": races}


def input_from_other_stream(rank, world):
    """The process group's stream waits only for the issuing stream: an input written on side,
    which the issuing default stream never waited for, races with the collective."""
    with fake.session(detect="record") as s:
        side = sk.Stream()
        x = torch.empty(N, device=s.device)
        side.wait_stream(sk.current_stream())
        with sk.switch(side):
            x.fill_(float(rank + 1))  # <other-stream-produce>
        work = dist.all_reduce(x, async_op=True)  # <other-stream-collective>
        work.wait()
        sk.current_stream().wait_stream(side)
        values = x.cpu().tolist()
        races = [{"first": _describe(r.first, {"side": side}), "second": _describe(r.second, {}), "fix": r.fix} for r in s.races]
        del x
    return {"values": values, "races": races}


def raise_mode(rank, world):
    """detect="raise": the touch before wait() raises RaceError before its kernel runs."""
    with fake.session(detect="raise") as s:
        x = torch.full((N,), float(rank + 1), device=s.device)
        work = dist.all_reduce(x, async_op=True)
        try:
            x.add_(1.0)  # <raise-touch>
            error = None
        except sk.RaceError as e:
            error = {"first": _describe(e.race.first, {}), "second": _describe(e.race.second, {})}
        work.wait()
        values = x.cpu().tolist()
        del x
    return {"values": values, "error_race": error}


def host_work(rank, world):
    """A collective on CPU tensors (no fake tensor): its Work passes straight through the patched
    Work.wait (patched: an async collective on fake tensors ran in this session). When the session
    ends, Work.wait and Work.synchronize are the originals again."""
    with fake.session(detect="record") as s:
        x = torch.ones(N, device=s.device)
        dist.all_reduce(x, async_op=True).wait()
        t = torch.full((N,), float(rank + 1))
        work = dist.all_reduce(t, async_op=True)
        work.wait()
        patched = [hasattr(getattr(type(work), name), "__streamkit_original__") for name in ("wait", "synchronize")]
        del x
    restored = [not hasattr(getattr(type(work), name), "__streamkit_original__") for name in ("wait", "synchronize")]
    return {"values": t.tolist(), "patched": all(patched), "restored": all(restored)}


def _describe(access, names):
    name = next((label for label, stream in names.items() if stream == access.stream), None)
    if name is None:
        name = access.stream_label
    return {"op": access.op, "kind": access.kind, "stream": name, "lineno": access.lineno}


def run_scenario(fn, kind, rank, world):
    with fake.session(detect="record") as s:
        streams = {"default": sk.current_stream(), "side": sk.Stream()}
        values = fn(s, kind, rank, world, streams)
        races = [
            {"first": _describe(r.first, streams), "second": _describe(r.second, streams), "fix": r.fix, "text": str(r)}
            for r in s.races
        ]
    return {"values": values, "expected": expected(rank, world, kind), "races": races}


def main() -> int:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    warnings.simplefilter("ignore", FutureWarning)  # all_gather_into_tensor & co. are deprecated in new torch
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))
    result = {"rank": rank}
    try:
        for kind in COLLECTIVES:
            for name, fn in SCENARIOS.items():
                key = f"{kind}/{name}"
                try:
                    result[key] = run_scenario(fn, kind, rank, world)
                except Exception:  # report it; the other rank is in the same scenario
                    result[key] = {"error": traceback.format_exc()}
                dist.barrier()
        group = dist.new_group(list(range(world)))
        for key, fn in (("two_groups", lambda: two_groups(rank, world, group)), ("raise_mode", lambda: raise_mode(rank, world)),
                        ("input_from_other_stream", lambda: input_from_other_stream(rank, world)),
                        ("host_work", lambda: host_work(rank, world))):
            try:
                result[key] = fn()
            except Exception:
                result[key] = {"error": traceback.format_exc()}
            dist.barrier()
    finally:
        print("RESULT " + json.dumps(result), flush=True)
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
