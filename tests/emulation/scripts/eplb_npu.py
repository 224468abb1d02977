"""A torch_npu-style script, unmodified: vllm-ascend PR 4214's updator path on HCCL ranks (one
process each: MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE), first as the reverted code, then with the
one-line wait_stream fix (the report's stacks name which call raced)."""

import os
import sys

import torch
import torch.distributed as dist
import torch_npu

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import _eplb_updator  # noqa: E402

torch.npu.set_device(0)
dist.init_process_group("hccl")
rank = dist.get_rank()
updator = _eplb_updator.EplbUpdator()


def step():
    loads = [torch.full((8,), float(layer + rank), device="npu") for layer in range(4)]
    for load in loads:
        load.add_(1)
    return updator.compute_and_set_moe_load(loads)


_eplb_updator.FIXED = False
gathered = step()  # <racy-call>
print("heat", gathered.shape[0], gathered.sum().item(), torch_npu.npu.current_stream().device)
_eplb_updator.FIXED = True
gathered = step()  # <fixed-call>
print("heat", gathered.shape[0], gathered.sum().item(), torch_npu.npu.current_stream().device)
dist.destroy_process_group()
