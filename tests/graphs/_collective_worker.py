"""One rank of a 2-rank gloo job capturing a tensor-parallel decode step (a matmul, an
``all_reduce``, a residual add) in an ``sk.graph`` on the fake backend and replaying it with new
inputs (run by tests/graphs/test_graph_collectives.py; not collected by pytest).

Usage: python _collective_worker.py SCHEDULE   (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE set)

Prints one ``RESULT <json>`` line: the replayed outputs, the values the same step computes
without a graph, and what a capture with ``async_op=True`` raised.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

import streamkit as sk
from streamkit import fake

RANK = int(os.environ["RANK"])
WORLD = int(os.environ["WORLD_SIZE"])


def main(schedules: str) -> dict:
    """One process group, one fake session per schedule (comma-separated): ``{schedule: result}``."""
    dist.init_process_group("gloo", rank=RANK, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    results: dict = {"rank": RANK}
    try:
        for schedule in schedules.split(","):
            results[schedule] = run(schedule)
    finally:
        dist.destroy_process_group()
    return results


def run(schedule: str) -> dict:
    out: dict = {}
    with fake.session(detect="raise", schedule=schedule) as s:
        dev = s.device
        weight = torch.full((4, 4), float(RANK + 1), device=dev)  # this rank's shard, made at start-up
        static_x = torch.zeros(2, 4, device=dev)  # the graph's static input

        def step(x: torch.Tensor) -> torch.Tensor:
            partial = x @ weight
            dist.all_reduce(partial)  # tensor parallel: the shards' partial sums
            return partial + x

        side = sk.Stream()
        side.wait_stream(sk.current_stream())
        with sk.switch(side):  # warm-up outside the capture, as torch advises
            step(static_x)
        sk.current_stream().wait_stream(side)
        g = sk.Graph()
        with sk.graph(g, stream=sk.Stream()):
            static_out = step(static_x)
        replayed, eager = [], []
        for i in range(3):
            static_x.copy_(torch.full((2, 4), float(i + 1), device=dev))
            g.replay()
            replayed.append(static_out.cpu().tolist())
            eager.append(step(torch.full((2, 4), float(i + 1), device=dev)).cpu().tolist())
        out["replayed"], out["eager"], out["races"] = replayed, eager, len(s.races)
        try:
            with sk.graph(sk.Graph(), stream=sk.Stream()):
                dist.all_reduce(static_x @ weight, async_op=True)
        except sk.GraphCaptureError as error:
            out["async_error"] = str(error)
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1])), flush=True)
