"""MoE heat collection on a side stream, with the bug that shipped: the side stream gathers the
counters without waiting for the default stream that wrote them.

    python -m streamkit check examples/side_stream_racy.py     # reports the race, exits 1
"""

import torch

import streamkit as sk

LAYERS, EXPERTS = 4, 8

device = sk.device()
side = sk.Stream()
load = torch.zeros(LAYERS, EXPERTS, dtype=torch.long, device=device)

for step in range(3):
    topk_ids = torch.randint(0, EXPERTS, (LAYERS, 64), device=device)
    for layer in range(LAYERS):
        load[layer] += torch.bincount(topk_ids[layer], minlength=EXPERTS)  # default stream writes

with sk.switch(side):
    snapshot = load.clone()  # BUG: side never waited for the default stream
side.synchronize()
print("expert load per layer:", snapshot.sum(dim=1).tolist())
