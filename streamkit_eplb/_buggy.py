"""DO NOT USE: the reverted side-stream collector, kept to show what streamkit's fake backend reports.

It reproduces the pattern of the reverted vllm-ascend attempt: counts are added on the current
(default) stream, then the side stream gathers them **without waiting for the default stream**, the
counters are cleared on the default stream **without waiting for the side stream**, and the gather
buffer is re-allocated on every collect. On a GPU/NPU this silently mixes tokens of two windows (or
drops them); on the fake backend every one of these is a reported race naming both lines.
``python -m streamkit_eplb demo --buggy`` runs it; the lines below carry ``# eplb-bug:`` markers the
tests and the demo use to point at them.
"""

from __future__ import annotations

from typing import Any

import torch

import streamkit as sk

from ._collector import _all_gather

__all__ = ["RevertedCollector", "marker_lines"]


class RevertedCollector:
    """The wrong collector: same shapes as :class:`~streamkit_eplb.HeatCollector`, none of its ordering."""

    def __init__(self, num_layers: int, num_experts: int, *, group: Any = None) -> None:
        import torch.distributed as dist

        self.num_layers, self.num_experts = num_layers, num_experts
        self.group = group
        self.world = dist.get_world_size(group) if group is not None else 1
        self.moe_load = torch.zeros((num_layers, num_experts), dtype=torch.int64, device=sk.device())
        self.side = sk.Stream()

    def record(self, layer: int, counts: torch.Tensor) -> None:
        self.moe_load[layer] += counts  # eplb-bug: record (on the current stream)

    def collect(self) -> torch.Tensor:
        """Returns the gathered ``(world * num_layers, num_experts)`` load, on the host."""
        with sk.switch(self.side):  # BUG: no self.side.wait_stream(sk.current_stream())
            # BUG: a new gather buffer on every collect
            gathered = torch.empty((self.world * self.num_layers, self.num_experts), dtype=torch.int64, device=sk.device())
            if self.group is None:
                gathered.copy_(self.moe_load)  # eplb-bug: gather
            else:
                _all_gather(gathered, self.moe_load, group=self.group)  # eplb-bug: gather
        self.moe_load.zero_()  # eplb-bug: clear (on the current stream, no wait for the side stream)
        with sk.switch(self.side):
            return gathered.cpu()


def marker_lines(kind: str) -> list[int]:
    """Line numbers in this file carrying ``# eplb-bug: <kind>``."""
    with open(__file__, encoding="utf-8") as f:
        return [n for n, line in enumerate(f, start=1) if f"# eplb-bug: {kind}" in line]
