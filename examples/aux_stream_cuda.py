"""An engine-shaped step written only against torch.cuda and torch.distributed (no streamkit): a
shared expert on an aux stream made at import time (as vLLM does), a forward under
torch.inference_mode(), module casts and a `param.data = ...`, and an async all_reduce.

    python -m streamkit check --emulate cuda examples/aux_stream_cuda.py          # exits 0
    python -m streamkit check --emulate cuda examples/aux_stream_cuda.py --racy   # the aux stream no
                                                                                 # longer waits: exits 1
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

AUX = torch.cuda.Stream()  # made at import time
READY = torch.cuda.Event()


class SharedExpertMoE(nn.Module):
    def __init__(self, hidden: int = 64, experts: int = 8) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.shared = nn.Linear(hidden, hidden, bias=False)
        self.experts = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor, racy: bool) -> torch.Tensor:
        if not racy:
            AUX.wait_stream(torch.cuda.current_stream())  # the input is ready for the aux stream
        with torch.cuda.stream(AUX):
            shared_out = self.shared(x)  # the shared expert, on the aux stream
            READY.record(AUX)
        routed = self.experts(x) * torch.softmax(self.gate(x), -1).max(-1, keepdim=True).values
        torch.cuda.current_stream().wait_event(READY)
        shared_out.record_stream(torch.cuda.current_stream())  # made on AUX, used and freed here
        return routed + shared_out


def main(racy: bool) -> None:
    port = os.environ.get("MASTER_PORT", "29531")
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = SharedExpertMoE().cuda().double().float()  # Module._apply assigns param.data
        weight = model.shared.weight
        weight.data = weight.data * 1.0
        x = torch.randn(16, 64, device="cuda")
        with torch.inference_mode():
            out = model(x, racy)
            heat = torch.zeros(8, dtype=torch.int64, device="cuda")
            heat.add_(1)
            dist.all_reduce(heat, async_op=True).wait()
            total = heat.sum().item()
        torch.cuda.synchronize()
        print(f"out {out.abs().sum().item():.3f} heat {total}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(racy="--racy" in sys.argv[1:])
