"""One rank of a 2-rank gloo job on the fake backend (run by tests/fidelity/test_p2p.py):
point-to-point ops, ``dist.barrier()`` and ``Work.is_completed()``.

Usage: python _p2p_worker.py   (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE in the environment)

Every scenario runs in one ``fake.session(detect="record", schedule=...)`` per schedule (the clean
ones under eager, lazy, adversarial and random; the racy ones eagerly) and returns its host
values; the worker prints one line ``RESULT <json>``: per ``<scenario>/<schedule>``, the values,
the values plain CPU torch gives, and the races (op, kind, stream, line). Lines the parent test
looks for end with ``# <name>``.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

import streamkit as sk
from streamkit import fake

N = 4
CLEAN_SCHEDULES = ("eager", "lazy", "adversarial", "random")
GROUP = None  # a second process group over both ranks (made in main)


def filled(device, value: float) -> torch.Tensor:
    x = torch.empty(N, device=device)
    x.fill_(value)
    return x


# -- scenarios: fn(device, rank, peer) -> host values; the expected values are plain CPU torch's ---


def rank_ordered_send_recv(device, rank, peer):
    """rank 0 sends then receives, rank 1 receives then sends (dist.send/recv: blocking)."""
    x = filled(device, 10.0 + rank)
    y = torch.zeros(N, device=device)
    if rank == 0:
        dist.send(x, peer)
        dist.recv(y, peer)
    else:
        dist.recv(y, peer)
        dist.send(x, peer)
    return (y * 2).cpu().tolist()


def isend_irecv_clean(device, rank, peer):
    """isend/irecv issued inside switch(side) after side waited; both waited on the compute stream."""
    x = filled(device, 20.0 + rank)
    y = torch.empty(N, device=device)
    side = sk.Stream()
    side.wait_stream(sk.current_stream())
    with sk.switch(side):
        works = [dist.isend(x, peer), dist.irecv(y, peer)] if rank == 0 else [dist.irecv(y, peer), dist.isend(x, peer)]
    del x  # recordStream'd on the p2p stream: not a free race
    for work in works:
        work.wait()
        work.wait()  # a second wait is harmless
    return (y + 1).cpu().tolist()


def irecv_read_before_wait(device, rank, peer):
    """The received buffer read before wait(), and the sent buffer overwritten before wait()."""
    x = filled(device, 30.0 + rank)
    y = torch.zeros(N, device=device)
    if rank == 0:
        send = dist.isend(x, peer)  # <isend>
        recv = dist.irecv(y, peer)  # <irecv>
    else:
        recv = dist.irecv(y, peer)  # <irecv-1>
        send = dist.isend(x, peer)  # <isend-1>
    early = y * 1  # <early-read>
    x.fill_(-1.0)  # <early-write>
    recv.wait()
    send.wait()
    return (early * 0).cpu().tolist()


def batch_clean(device, rank, peer):
    """batch_isend_irecv of a ring exchange, every work waited before the result is used."""
    x = filled(device, 40.0 + rank)
    y = torch.empty(N, device=device)
    ops = [dist.P2POp(dist.isend, x, peer), dist.P2POp(dist.irecv, y, peer)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return (y * 3).cpu().tolist()


def batch_racy(device, rank, peer):
    """batch_isend_irecv, the received buffer read before its work is waited for."""
    x = filled(device, 50.0 + rank)
    y = torch.zeros(N, device=device)
    works = dist.batch_isend_irecv([dist.P2POp(dist.isend, x, peer), dist.P2POp(dist.irecv, y, peer)])  # <batch>
    early = y.sum()  # <batch-read>
    for work in works:
        work.wait()
    return [early.item() * 0]


def batch_after_async_collective(device, rank, peer):
    """An async all_reduce, then a batch sending its output without waiting for it: on NCCL the
    batch runs on the group's stream, after the all_reduce; waiting one work of the batch (NCCL
    returns one) orders the current stream after all of it."""
    x = filled(device, 1.0 + rank)
    y = torch.empty(N, device=device)
    reduced = dist.all_reduce(x, async_op=True)
    works = dist.batch_isend_irecv([dist.P2POp(dist.isend, x, peer), dist.P2POp(dist.irecv, y, peer)])
    works[0].wait()  # (the send's work: it ends with the batch's receive too)
    out = (y * 2).cpu().tolist()
    for work in works + [reduced]:
        work.wait()
    return out


def batch_then_single_send(device, rank, peer):
    """A batch receives into y; a single isend of y issued before the batch is waited for runs on
    the rank pair's stream, unordered with the batch on the group's stream."""
    x = filled(device, 80.0 + rank)
    y = torch.zeros(N, device=device)
    z = torch.zeros(N, device=device)
    works = dist.batch_isend_irecv([dist.P2POp(dist.isend, x, peer), dist.P2POp(dist.irecv, y, peer)])  # <batch-recv>
    works += [dist.isend(y, peer), dist.irecv(z, peer)]  # <single-send>
    for work in works:
        work.wait()
    return (z * 0).cpu().tolist()


def barrier_orders_the_current_stream(device, rank, peer):
    """Written on the current stream, then dist.barrier(): the host is synchronized with the
    current stream, so a side stream's later read is ordered after the write."""
    side = sk.Stream()
    x = filled(device, 60.0 + rank)
    dist.barrier()
    with sk.switch(side):
        y = x * 2
    sk.current_stream().wait_stream(side)
    return y.cpu().tolist()


def barrier_does_not_order_another_stream(device, rank, peer):
    """Written on a side stream, then dist.barrier() (which syncs only the current stream): the
    current stream's read races with the side stream's write."""
    side = sk.Stream()
    x = torch.empty(N, device=device)
    side.wait_stream(sk.current_stream())
    with sk.switch(side):
        x.fill_(70.0 + rank)  # <side-fill>
    dist.barrier()
    y = x * 2  # <after-barrier-read>
    sk.current_stream().wait_stream(side)
    return (y * 0).cpu().tolist()


def is_completed_polling(device, rank, peer):
    """async all_reduce, the host polls work.is_completed() until True, then a side stream created
    meanwhile reads the output: ordered (a True answer is a host sync with the collective)."""
    x = filled(device, 1.0 + rank)
    side = sk.Stream()
    work = dist.all_reduce(x, async_op=True)
    while not work.is_completed():
        pass
    with sk.switch(side):
        y = x * 2
    sk.current_stream().wait_stream(side)
    out = y.cpu().tolist()
    work.wait()
    return out


def is_completed_of_another_work(device, rank, peer):
    """Polling one work's is_completed() orders nothing of another's output."""
    x = filled(device, 1.0 + rank)
    z = filled(device, 5.0 + rank)
    wx = dist.all_reduce(x, async_op=True)  # <other-work>
    wz = dist.all_reduce(z, async_op=True, group=GROUP)
    while not wz.is_completed():
        pass
    y = x * 2  # <other-read>
    wx.wait()
    wz.wait()
    return (y * 0).cpu().tolist()


def expected(name, rank, peer):
    """Plain CPU torch's values for each scenario."""
    other = {"rank_ordered_send_recv": 10.0, "isend_irecv_clean": 20.0, "batch_clean": 40.0}
    if name == "rank_ordered_send_recv":
        return [2 * (other[name] + peer)] * N
    if name == "isend_irecv_clean":
        return [other[name] + peer + 1] * N
    if name == "batch_clean":
        return [3 * (other[name] + peer)] * N
    if name == "barrier_orders_the_current_stream":
        return [2 * (60.0 + rank)] * N
    if name == "is_completed_polling":
        return [2 * (1.0 + rank + 1.0 + peer)] * N
    if name == "batch_after_async_collective":
        return [2 * (1.0 + rank + 1.0 + peer)] * N
    if name == "batch_racy":
        return [0.0]
    return [0.0] * N  # racy scenarios return zeros (their values are a lucky order's)


CLEAN = (
    "rank_ordered_send_recv", "isend_irecv_clean", "batch_clean", "batch_after_async_collective",
    "barrier_orders_the_current_stream", "is_completed_polling",
)
RACY = (
    "irecv_read_before_wait", "batch_racy", "batch_then_single_send", "barrier_does_not_order_another_stream",
    "is_completed_of_another_work",
)


def _describe(access):
    return {"op": access.op, "kind": access.kind, "stream": access.stream_label, "lineno": access.lineno}


def run(name, schedule, rank, peer):
    with fake.session(detect="record", schedule=schedule, seed=rank) as s:
        values = globals()[name](s.device, rank, peer)
        stats = {"stream_syncs": s.stats.stream_syncs}
    races = [{"first": _describe(r.first), "second": _describe(r.second)} for r in s.races]
    return {"values": values, "expected": expected(name, rank, peer), "races": races, "stats": stats}


def main() -> int:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))
    peer = 1 - rank
    global GROUP
    GROUP = dist.new_group(list(range(world)))
    result = {"rank": rank}
    try:
        runs = [(name, schedule) for name in CLEAN for schedule in CLEAN_SCHEDULES] + [(name, "eager") for name in RACY]
        for name, schedule in runs:
            key = f"{name}/{schedule}"
            try:
                result[key] = run(name, schedule, rank, peer)
            except Exception:  # report it; the other rank is in the same scenario
                result[key] = {"error": traceback.format_exc()}
            dist.barrier()
    finally:
        print("RESULT " + json.dumps(result), flush=True)
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
