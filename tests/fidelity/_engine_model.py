"""A tiny engine shaped like vllm-ascend's: its side stream is created at import time and in the
``__init__`` of an object built at import time, before any test's fake session exists."""

from __future__ import annotations

import torch

import streamkit as sk

PREFETCH_STREAM = sk.Stream()  # made at import time, like vllm-ascend's module-level side stream


class StreamPool:
    def __init__(self) -> None:
        self.side = sk.Stream()  # made in __init__, before the test's session


STREAMS = StreamPool()


class TinyEngine(torch.nn.Module):
    """Buffers made at start-up; the forward pass (run under ``torch.inference_mode()``) copies the
    projection into a view of the KV cache on the side stream, then reads the cache."""

    def __init__(self, device: torch.device, ordered: bool) -> None:
        super().__init__()
        self.ordered = ordered
        self.proj = torch.nn.Linear(8, 8).to(device)
        self.register_buffer("cache", torch.zeros(4, 8, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        side = STREAMS.side
        if self.ordered:
            side.wait_stream(sk.current_stream())
        with sk.switch(side):
            self.cache[: h.shape[0]].copy_(h)  # <engine-side-copy>
        if self.ordered:
            sk.current_stream().wait_stream(side)
        with sk.switch(PREFETCH_STREAM):
            if self.ordered:
                PREFETCH_STREAM.wait_stream(sk.default_stream())
            total = self.cache.sum(dim=1)  # <engine-prefetch-read>
        if self.ordered:
            sk.current_stream().wait_stream(PREFETCH_STREAM)
            total.record_stream(sk.current_stream())  # made on the prefetch stream, used and freed here
        return total * 2
