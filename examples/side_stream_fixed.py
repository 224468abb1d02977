"""The same heat collection, fixed: the side stream waits for the default stream before it reads.

    python -m streamkit check examples/side_stream_fixed.py    # no race, exits 0
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

side.wait_stream(sk.current_stream())  # FIX: order the side stream after the writes
with sk.switch(side):
    snapshot = load.clone()
side.synchronize()
print("expert load per layer:", snapshot.sum(dim=1).tolist())
