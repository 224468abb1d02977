"""A torch_npu-style script, unmodified: vllm-ascend PR 4214's updator path on two HCCL ranks of
one process each... here world size 1 (the gather is still issued on the updator's stream).
argv[1]: "racy" (the reverted code) or "fixed" (the wait_stream fix)."""

import os
import sys

import torch
import torch.distributed as dist
import torch_npu

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import _eplb_updator  # noqa: E402

_eplb_updator.FIXED = sys.argv[1] == "fixed"
torch.npu.set_device(0)
dist.init_process_group("hccl", init_method=f"tcp://127.0.0.1:{sys.argv[2]}", rank=0, world_size=1)
updator = _eplb_updator.EplbUpdator()
loads = [torch.full((8,), float(layer), device="npu") for layer in range(4)]
for load in loads:
    load.add_(1)
gathered = updator.compute_and_set_moe_load(loads)
print("heat", gathered.sum().item(), torch_npu.npu.current_stream().device)
dist.destroy_process_group()
