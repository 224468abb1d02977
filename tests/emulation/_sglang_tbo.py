"""SGLang-style two-batch overlap (python/sglang/srt/two_batch_overlap.py): two micro-batches
alternate between a compute stream and a communication stream, so one's all-reduce overlaps the
other's compute. Written against torch.cuda + torch.distributed (NCCL); ``JOIN`` False drops the
compute stream's wait for the communication stream before the combine."""

import torch
import torch.distributed as dist

JOIN = True


def two_batch_overlap(x: torch.Tensor, weight: torch.Tensor, comm: "torch.cuda.Stream") -> torch.Tensor:
    halves = list(x.chunk(2))
    outs = []
    done = []
    for i, half in enumerate(halves):
        h = half @ weight  # compute stream (the current one)
        comm.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(comm):
            dist.all_reduce(h)  # <tbo-allreduce>
            event = torch.cuda.Event()
            event.record()
        h.record_stream(comm)
        done.append(event)
        outs.append(h)
    for event in done:
        if JOIN:
            torch.cuda.current_stream().wait_event(event)  # <tbo-join>
    return torch.cat(outs) * 2  # <tbo-combine>
