"""A torch_npu-style script, unmodified: vllm-ascend PR 4214's updator path on HCCL ranks (one
process each: MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE). argv[1]: "racy" (the reverted code) or
"fixed" (the wait_stream fix)."""

import os
import sys

import torch
import torch.distributed as dist
import torch_npu

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import _eplb_updator  # noqa: E402

_eplb_updator.FIXED = sys.argv[1] == "fixed"
torch.npu.set_device(0)
dist.init_process_group("hccl")
rank = dist.get_rank()
updator = _eplb_updator.EplbUpdator()
loads = [torch.full((8,), float(layer + rank), device="npu") for layer in range(4)]
for load in loads:
    load.add_(1)
gathered = updator.compute_and_set_moe_load(loads)
print("heat", gathered.shape[0], gathered.sum().item(), torch_npu.npu.current_stream().device)
dist.destroy_process_group()
