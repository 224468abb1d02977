"""Two gloo ranks started with torch.multiprocessing.spawn (multiprocessing's spawn underneath):
rank 0 returns with a side stream's read unjoined; rank 1 races, then dies hard without finishing
anything. A child started with multiprocessing's fork races and then raises."""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
import multiprocessing as mp

import streamkit as sk


def rank_fn(rank, world, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    t = torch.full((4,), float(rank), device=sk.device())
    dist.all_reduce(t)
    assert t.tolist() == [1.0] * 4
    dist.destroy_process_group()
    side = sk.Stream()
    if rank == 0:
        x = torch.ones(4, device=sk.device())
        side.wait_stream(sk.current_stream())
        with sk.switch(side):
            x.sum()  # <rank0-read>
        # x is freed as rank_fn returns, with the side stream's read unjoined
        return  # <rank0-return>
    x = torch.ones(8, device=sk.device())
    x.add_(1)  # <child-write>
    with sk.switch(side):
        y = x * 2  # <child-read>
    side.synchronize()
    os._exit(0)  # a hard exit: no chance to finish a report


def fork_child():
    side = sk.Stream()
    x = torch.ones(2, device=sk.device())
    x.mul_(3)  # <fork-write>
    with sk.switch(side):
        x.add_(1)  # <fork-write-side>
    side.synchronize()
    raise RuntimeError("the fork child fails after its race")


if __name__ == "__main__":
    forked = mp.get_context("fork").Process(target=fork_child)
    forked.start()
    forked.join()
    tmp.spawn(rank_fn, args=(2, int(sys.argv[1])), nprocs=2)
    print("ranks done; fork child exit code", forked.exitcode)
