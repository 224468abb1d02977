"""What the expert-heat collector costs.

1. Fake backend (always): kernels, stream events and host syncs per ``record`` and per ``collect``,
   from ``session.stats`` deltas, on one process and on ``--ranks`` gloo ranks; next to the
   synchronous pattern it replaces (``moe_load += counts`` on the current stream, then gather and
   ``.cpu()`` on the current stream).
2. CUDA (when ``"cuda" in sk.available_backends()``): the step time of an MoE-like step (``--layers``
   layers of matmul + top-k routing) with no collection, with synchronous collection on the current
   stream, and with the collector. Target: the collector adds at most 1% to the step.

usage: python benchmarks/collector.py [--ranks 2] [--calls 200] [--layers 16] [--steps 200] [--interval 10]
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import streamkit as sk  # noqa: E402
from streamkit_eplb import HeatCollector  # noqa: E402

# -- 1. fake backend: kernels and host syncs per call --------------------------------------------


def _fake_costs(calls: int, group=None, layers: int = 16, experts: int = 64) -> dict[str, tuple[float, float, float]]:
    """{call: (kernels, event waits, host syncs) per call} measured in the current fake session."""
    session = _current_session()
    dev = sk.device()
    c = HeatCollector(layers, experts, group=group)
    counts = torch.randint(0, 100, (experts,)).to(dev)
    cumulative = counts.cumsum(0)
    topk_ids = torch.randint(-1, experts, (512, 8)).to(dev)
    world = c.world_size

    def per_call(fn) -> tuple[float, float, float]:
        before = session.stats.copy()
        for i in range(calls):
            fn(i)
        d = session.stats - before
        return d.kernels / calls, d.event_waits / calls, d.host_syncs / calls

    out = {
        "record(counts)": per_call(lambda i: c.record(i % layers, counts)),
        "record(counts, cumulative=True)": per_call(lambda i: c.record(i % layers, cumulative, cumulative=True)),
        "record(topk_ids=(512, 8))": per_call(lambda i: c.record(i % layers, topk_ids=topk_ids)),
    }
    handles = []
    out["collect()"] = per_call(lambda i: handles.append(c.collect()))
    for h in handles:
        h.wait()

    # the synchronous pattern the collector replaces (vllm-ascend before the side-stream attempt)
    from streamkit_eplb._collector import _all_gather  # all_gather_into_tensor / all_gather_single

    moe_load = torch.zeros(layers, experts, dtype=torch.int64, device=dev)
    gathered = torch.empty(world * layers, experts, dtype=torch.int64, device=dev)

    def sync_record(i: int) -> None:
        moe_load[i % layers] += counts

    def sync_collect(i: int) -> None:
        if group is not None:
            _all_gather(gathered, moe_load, group=group)
            gathered.cpu()
        else:
            moe_load.cpu()
        moe_load.zero_()

    out["sync baseline: moe_load[l] += counts"] = per_call(sync_record)
    out["sync baseline: gather + .cpu() + zero_()"] = per_call(sync_collect)
    assert not session.races, session.races
    return out


_SESSION = []


def _current_session():
    return _SESSION[-1]


def _print_fake_table(title: str, costs: dict[str, tuple[float, float, float]]) -> None:
    print(f"\n{title}")
    print(f"  {'call':<42} {'kernels':>8} {'waits':>6} {'host syncs':>10}")
    for name, (k, w, h) in costs.items():
        print(f"  {name:<42} {k:>8.2f} {w:>6.2f} {h:>10.2f}")


def _fake_rank(rank: int, world: int, port: int, calls: int) -> None:
    import torch.distributed as dist

    from streamkit import fake

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    with fake.session(detect="raise") as s:
        _SESSION.append(s)
        costs = _fake_costs(calls, group=dist.group.WORLD)
    if rank == 0:
        _print_fake_table(f"fake backend, {world} gloo ranks, detect='raise' (per call, rank 0)", costs)
        sys.stdout.flush()
    dist.barrier()
    dist.destroy_process_group()


def bench_fake(calls: int, ranks: int) -> None:
    from streamkit import fake

    with fake.session(detect="raise") as s:
        _SESSION.append(s)
        costs = _fake_costs(calls)
        _SESSION.pop()
    _print_fake_table("fake backend, 1 process (no group: no collective), detect='raise' (per call)", costs)
    sys.stdout.flush()
    if ranks > 1:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_fake_rank, args=(r, ranks, port, max(10, calls // 4))) for r in range(ranks)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
            if p.is_alive():
                p.kill()
                print("  (multi-rank fake run timed out)")


# -- 2. CUDA: step time of an MoE-like step -------------------------------------------------------


def bench_device(name: str, layers: int, steps: int, interval: int, tokens: int, hidden: int, experts: int, top_k: int) -> None:
    reason = sk.unavailable_reason(name)
    if reason is not None:
        print(f"\n{name}: skipped: no {name.upper()} device ({reason})")
        return
    with sk.use_backend(name):
        dev = sk.device()
        torch.manual_seed(0)
        dtype = torch.bfloat16
        ws = [torch.randn(hidden, hidden, device=dev, dtype=dtype) / hidden**0.5 for _ in range(layers)]
        rs = [torch.randn(hidden, experts, device=dev, dtype=dtype) / hidden**0.5 for _ in range(layers)]
        x0 = torch.randn(tokens, hidden, device=dev, dtype=dtype)
        one = torch.ones(1, dtype=torch.int64, device=dev)
        moe_load = torch.zeros(layers, experts, dtype=torch.int64, device=dev)
        collector = HeatCollector(layers, experts)

        def step(mode: str, i: int) -> None:
            x = x0
            for layer in range(layers):
                x = torch.tanh(x @ ws[layer])
                topk_ids = (x @ rs[layer]).topk(top_k, dim=-1).indices
                if mode == "sync":  # on the current stream, as SGLang does it (scatter_add_, no sync)
                    flat = topk_ids.reshape(-1)
                    moe_load[layer].scatter_add_(0, flat, one.expand(flat.numel()))
                elif mode == "collector":
                    collector.record(layer, topk_ids=topk_ids)
            if (i + 1) % interval == 0:
                if mode == "sync":
                    moe_load.cpu()  # blocks the host on the whole step
                    moe_load.zero_()
                elif mode == "collector":
                    pending.append(collector.collect())
                    while pending and pending[0].done():
                        pending.pop(0).wait()

        pending: list = []
        results = {}
        for mode in ("none", "sync", "collector"):
            for i in range(interval * 2):  # warm-up
                step(mode, i)
            sk.synchronize()
            samples = []
            for rep in range(5):
                start, end = sk.Event(enable_timing=True), sk.Event(enable_timing=True)
                start.record()
                t0 = time.perf_counter()
                for i in range(steps):
                    step(mode, i)
                end.record()
                end.synchronize()
                wall = (time.perf_counter() - t0) * 1e3 / steps
                samples.append((start.elapsed_time(end) / steps, wall))
            for h in pending:
                h.wait()
            pending.clear()
            results[mode] = (statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples))
        base = results["none"][0]
        print(
            f"\n{name}: MoE-like step, {layers} layers x (matmul {tokens}x{hidden}x{hidden} + router {hidden}x{experts}"
            f" + top-{top_k}), collect every {interval} steps, median of 5 x {steps} steps"
        )
        print(f"  {'mode':<34} {'step ms (device)':>16} {'step ms (host)':>15} {'vs none':>8}")
        labels = {
            "none": "no collection",
            "sync": "synchronous, current stream",
            "collector": "HeatCollector (side stream)",
        }
        for mode, (dev_ms, host_ms) in results.items():
            print(f"  {labels[mode]:<34} {dev_ms:>16.3f} {host_ms:>15.3f} {100 * (dev_ms / base - 1):>+7.2f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2, help="gloo ranks for the multi-rank fake run (1: skip it)")
    parser.add_argument("--calls", type=int, default=200, help="calls measured per row on the fake backend")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--top-k", dest="top_k", type=int, default=8)
    args = parser.parse_args()
    print(f"streamkit {sk.__version__}, torch {torch.__version__}, backends available: {sk.available_backends()}")
    bench_fake(args.calls, args.ranks)
    for name in ("cuda", "npu"):
        bench_device(name, args.layers, args.steps, args.interval, args.tokens, args.hidden, args.experts, args.top_k)


if __name__ == "__main__":
    main()
