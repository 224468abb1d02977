"""vllm-ascend PR 4214's path (vllm_ascend/eplb/eplb_updator.py, ``compute_and_set_moe_load``):
the MoE load of every layer is stacked on the default stream and all-gathered over the HCCL group
on the updator's own stream, written against torch_npu only. ``FIXED`` False is the reverted code
(no wait for the default stream before the gather); True is the one-line ``wait_stream`` fix."""

import torch
import torch.distributed as dist
import torch_npu

FIXED = True


class EplbUpdator:
    def __init__(self) -> None:
        self.comm_stream = torch_npu.npu.Stream()  # <updator-stream>

    def compute_and_set_moe_load(self, moe_load_per_layer: list) -> torch.Tensor:
        moe_load = torch.stack(moe_load_per_layer)  # <stack>
        world = dist.get_world_size()
        gathered = torch.empty((world,) + tuple(moe_load.shape), dtype=moe_load.dtype, device=moe_load.device)
        if FIXED:
            self.comm_stream.wait_stream(torch.npu.current_stream())  # <fix>
        with torch.npu.stream(self.comm_stream):
            dist.all_gather_into_tensor(gathered, moe_load)  # <gather>
        torch.npu.current_stream().wait_stream(self.comm_stream)
        return gathered
