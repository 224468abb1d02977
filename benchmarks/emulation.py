"""Cost of device emulation (docs/emulation.md).

1. The EPLB step of benchmarks/detector_overhead.py (16 layers, 256 experts, 2048 tokens x top-8;
   a side stream accumulates the heat) in a ``fake.session(emulate="cuda")`` against the same
   step in a plain ``fake.session()``, both detect="raise": written against ``sk.*`` (the session's
   cost alone) and written against ``torch.cuda`` (what an engine runs). Target: at most 1.05x
   (median of paired ratios over alternating blocks).
2. An engine-sized MoE layer forward, written against ``torch.cuda``: batch 256, hidden 1024,
   8 of 64 experts per token, a shared expert on an aux stream made before the step (event
   hand-over, ``record_stream``); tracked (``emulate="cuda"``, detect="raise") against the same
   code on plain CPU tensors (the torch.cuda calls are then no-ops of a stand-in).

Run: python benchmarks/emulation.py [--blocks N] [--steps N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import streamkit as sk
from streamkit import fake

LAYERS, EXPERTS, TOKENS, TOPK = 16, 256, 2048, 8


def sk_step(ids, counters, side):
    for layer in range(LAYERS):
        counts = torch.bincount(ids[layer], minlength=EXPERTS)
        side.wait_stream(sk.current_stream())
        with sk.switch(side):
            counters[layer].add_(counts)
            sk.record_stream(counts, side)
    sk.current_stream().wait_stream(side)
    return torch.stack(counters).cpu()


def cuda_step(ids, counters, side):
    for layer in range(LAYERS):
        counts = torch.bincount(ids[layer], minlength=EXPERTS)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            counters[layer].add_(counts)
            counts.record_stream(side)
    torch.cuda.current_stream().wait_stream(side)
    return torch.stack(counters).cpu()


def _time_block(emulate, api, steps):
    with fake.session(detect="raise", emulate=emulate) as s:
        g = torch.Generator().manual_seed(0)
        ids = [torch.randint(0, EXPERTS, (TOKENS * TOPK,), generator=g).to(s.device) for _ in range(LAYERS)]
        counters = [torch.zeros(EXPERTS, dtype=torch.int64, device=s.device) for _ in range(LAYERS)]
        side = torch.cuda.Stream() if api == "cuda" else sk.Stream()
        step = cuda_step if api == "cuda" else sk_step
        step(ids, counters, side)  # warm-up (fast-path plans)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step(ids, counters, side)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def eplb(blocks, steps):
    ratios_sk, ratios_cuda, plain_all, emu_all = [], [], [], []
    for _ in range(blocks):
        plain = _time_block(None, "sk", steps)
        emulated = _time_block("cuda", "sk", steps)
        written = _time_block("cuda", "cuda", steps)
        plain_again = _time_block(None, "sk", steps)
        base = min(plain, plain_again)
        ratios_sk.append(emulated / base)
        ratios_cuda.append(written / base)
        plain_all.append(base)
        emu_all.append(written)
    print(f"EPLB step, plain fake session:            {statistics.median(plain_all) * 1e3:7.2f} ms")
    print(f"EPLB step, emulate='cuda', torch.cuda API: {statistics.median(emu_all) * 1e3:7.2f} ms")
    print(f"  emulated/plain, same sk.* code:   {statistics.median(ratios_sk):.3f}x (target <= 1.05x)")
    print(f"  emulated/plain, torch.cuda code:  {statistics.median(ratios_cuda):.3f}x (target <= 1.05x)")


BATCH, HIDDEN, N_EXPERTS, TOP = 256, 1024, 64, 8


class MoELayer:
    """Routed experts on the current stream, a shared expert on an aux stream (vLLM's pattern)."""

    def __init__(self, device, cuda, aux):
        g = torch.Generator().manual_seed(0)
        self.cuda, self.aux = cuda, aux
        self.gate = (torch.randn(HIDDEN, N_EXPERTS, generator=g) * 0.02).to(device)
        self.experts = (torch.randn(N_EXPERTS, HIDDEN, HIDDEN, generator=g) * 0.02).to(device)
        self.shared = (torch.randn(HIDDEN, HIDDEN, generator=g) * 0.02).to(device)

    def forward(self, x):
        cuda = self.cuda
        ready = cuda.Event()
        ready.record()
        self.aux.wait_event(ready)
        with cuda.stream(self.aux):
            shared_out = x @ self.shared
        x.record_stream(self.aux)
        weights, ids = torch.topk(torch.softmax(x @ self.gate, dim=-1), TOP)
        out = torch.zeros_like(x)
        flat_ids = ids.flatten()
        flat_w = weights.flatten()
        token = torch.arange(BATCH, device=x.device).repeat_interleave(TOP)
        order = torch.argsort(flat_ids)
        counts = torch.bincount(flat_ids, minlength=N_EXPERTS).tolist()  # (a host sync, as in grouped MoE)
        start = 0
        for e, n in enumerate(counts):
            if n:
                sel = order[start:start + n]
                rows = token[sel]
                out.index_add_(0, rows, (x[rows] @ self.experts[e]) * flat_w[sel].unsqueeze(1))
                start += n
        cuda.current_stream().wait_stream(self.aux)
        shared_out.record_stream(cuda.current_stream())
        return out + shared_out


class _NoCuda:
    """torch.cuda's stream calls as no-ops: the same layer code on plain CPU tensors."""

    class Event:
        def record(self, stream=None):
            pass

    class _Stream:
        def wait_event(self, event):
            pass

        def wait_stream(self, other):
            pass

    @staticmethod
    def stream(s):
        import contextlib

        return contextlib.nullcontext()

    @staticmethod
    def current_stream():
        return _NoCuda._Stream()


def moe(steps):
    x_cpu = torch.randn(BATCH, HIDDEN, generator=torch.Generator().manual_seed(1))
    plain_layer = MoELayer("cpu", _NoCuda, _NoCuda._Stream())
    original = torch.Tensor.record_stream  # (a plain CPU tensor refuses it: a no-op stands in)
    torch.Tensor.record_stream = lambda self, stream: None
    try:
        with torch.inference_mode():
            plain_layer.forward(x_cpu)
            plain = []
            for _ in range(steps):
                start = time.perf_counter()
                expected = plain_layer.forward(x_cpu)
                plain.append(time.perf_counter() - start)
    finally:
        torch.Tensor.record_stream = original
    with fake.session(detect="raise", emulate="cuda") as s:
        layer = MoELayer("cuda", torch.cuda, torch.cuda.Stream())
        x = x_cpu.cuda()
        with torch.inference_mode():
            layer.forward(x)
            tracked = []
            for _ in range(steps):
                start = time.perf_counter()
                out = layer.forward(x)
                tracked.append(time.perf_counter() - start)
            got = out.cpu()
        kernels = s.stats.kernels
    torch.testing.assert_close(got, expected)
    p, t = statistics.median(plain), statistics.median(tracked)
    print(f"MoE layer forward (batch {BATCH}, hidden {HIDDEN}, {TOP} of {N_EXPERTS} experts, shared expert on an aux stream):")
    print(f"  plain CPU {p * 1e3:.1f} ms, tracked (emulate='cuda') {t * 1e3:.1f} ms: tracked/plain {t / p:.3f}x"
          f" ({kernels // (steps + 1)} kernels a forward)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--moe-steps", type=int, default=5)
    ns = parser.parse_args()
    torch.set_num_threads(1)
    eplb(ns.blocks, ns.steps)
    moe(ns.moe_steps)


if __name__ == "__main__":
    main()
