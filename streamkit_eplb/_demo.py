"""``python -m streamkit_eplb demo``: N gloo ranks on the fake backend, skewed routing, heat collection.

Every rank routes synthetic tokens through ``layers`` MoE-like layers (a matmul, a router matmul and
a top-k over logits biased by a Zipf-like expert popularity), records the ``topk_ids`` of every
layer with a :class:`HeatCollector`, collects every ``interval`` steps and (rank 0) prints per-layer
balancedness and writes a heat map. The fake session runs with ``detect="raise"``, so finishing is
the proof that the collector is race-free here. ``--buggy`` runs the reverted pattern
(:mod:`streamkit_eplb._buggy`) under ``detect="record"`` and prints the races the backend found.
"""

from __future__ import annotations

import argparse
import datetime
import math
import multiprocessing as mp
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_OUT = "eplb_heatmap.png"


@dataclass
class DemoConfig:
    ranks: int = 2
    layers: int = 8
    experts: int = 16
    steps: int = 40
    interval: int = 10
    skew: float = 1.2
    tokens: int = 128
    top_k: int = 2
    hidden: int = 32
    out: str = DEFAULT_OUT
    buggy: bool = False
    seed: int = 0
    timeout: float = 120.0

    def validate(self) -> None:
        for name in ("ranks", "layers", "experts", "steps", "interval", "tokens", "top_k", "hidden"):
            if getattr(self, name) <= 0:
                raise SystemExit(f"demo: --{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.top_k > self.experts:
            raise SystemExit(f"demo: --top-k ({self.top_k}) cannot exceed --experts ({self.experts})")
        if self.skew < 0:
            raise SystemExit(f"demo: --skew must be >= 0, got {self.skew}")
        if self.experts % self.ranks:
            raise SystemExit(
                f"demo: --experts ({self.experts}) must be divisible by --ranks ({self.ranks}):"
                " the experts are spread evenly over the EP ranks"
            )


def _popularity_bias(cfg: DemoConfig, layer: int) -> Any:
    """Zipf-like log-popularity of every expert for ``layer`` (same on every rank: it is the model's)."""
    import torch

    g = torch.Generator().manual_seed(cfg.seed * 7919 + layer)
    order = torch.randperm(cfg.experts, generator=g)  # which expert is the k-th most popular
    popularity_rank = torch.empty(cfg.experts)
    popularity_rank[order] = torch.arange(cfg.experts, dtype=torch.float32)
    return -cfg.skew * torch.log1p(popularity_rank)


def _rank_main(rank: int, cfg_dict: dict, port: int) -> None:
    import torch
    import torch.distributed as dist

    from streamkit import fake

    from ._buggy import RevertedCollector, marker_lines
    from ._collector import HeatCollector
    from ._heat import HeatHistory

    cfg = DemoConfig(**cfg_dict)
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=cfg.ranks, timeout=datetime.timedelta(seconds=max(10.0, cfg.timeout / 2))
    )
    say = print if rank == 0 else (lambda *a, **k: None)
    L, E, T, K, D = cfg.layers, cfg.experts, cfg.tokens, cfg.top_k, cfg.hidden
    host_gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    with fake.session(detect="record" if cfg.buggy else "raise") as session:
        dev = session.device
        weights = [(torch.randn(D, D, generator=host_gen) / math.sqrt(D)).to(dev) for _ in range(L)]
        routers = [(torch.randn(D, E, generator=host_gen) / math.sqrt(D)).to(dev) for _ in range(L)]
        # the model's popularity plus a little rank-specific tilt (each rank serves different traffic)
        biases = [(_popularity_bias(cfg, l) + 0.25 * torch.randn(E, generator=host_gen)).to(dev) for l in range(L)]
        ones = torch.ones(T * K, dtype=torch.int64).to(dev)
        group = dist.group.WORLD
        collector = RevertedCollector(L, E, group=group) if cfg.buggy else HeatCollector(L, E, group=group)
        record_stats = session.stats.copy() - session.stats  # zero
        collect_stats = record_stats.copy()
        records = collects = 0
        handles, gathered = [], []
        start = time.perf_counter()
        for step in range(cfg.steps):
            x = torch.randn(T, D, generator=host_gen).to(dev, non_blocking=True)
            noise = torch.rand(L, T, E, generator=host_gen).clamp_(1e-6, 1 - 1e-6).to(dev, non_blocking=True)
            for layer in range(L):
                x = torch.tanh(x @ weights[layer])
                gumbel = -torch.log(-torch.log(noise[layer]))  # Gumbel-top-k = sampling w/o replacement
                logits = 0.5 * (x @ routers[layer]) + biases[layer] + gumbel
                topk_ids = logits.topk(K, dim=-1).indices
                if cfg.buggy:  # vllm-ascend style: per-expert counts, added on the current stream
                    counts = torch.zeros(E, dtype=torch.int64, device=dev).index_add_(0, topk_ids.reshape(-1), ones)
                    collector.record(layer, counts)
                else:
                    before = session.stats.copy()
                    collector.record(layer, topk_ids=topk_ids)
                    record_stats = _add(record_stats, session.stats - before)
                    records += 1
            if (step + 1) % cfg.interval == 0 or step + 1 == cfg.steps:
                before = session.stats.copy()
                result = collector.collect()
                collect_stats = _add(collect_stats, session.stats - before)
                collects += 1
                (gathered if cfg.buggy else handles).append(result)
        elapsed = time.perf_counter() - start

        if cfg.buggy:
            races = list(session.races)
            say(f"[--buggy] reverted side-stream collector, {cfg.ranks} ranks x {L} layers x {E} experts,"
                f" {cfg.steps} steps: the fake backend found {len(races)} race(s)"
                f" ({len({(r.first.location, r.second.location) for r in races})} distinct)")
            gather_lines, clear_lines = set(marker_lines("gather")), set(marker_lines("clear"))
            distinct: dict[tuple, Any] = {}
            for race in races:
                distinct.setdefault((race.first.location, race.second.location), race)
            main_race = None
            for n, ((first, second), race) in enumerate(distinct.items(), start=1):
                tag = ""
                if race.first.lineno in gather_lines and race.second.lineno in clear_lines:
                    tag, main_race = "   <- gather on the side stream vs. clear on the default stream", race
                say(f"  {n}. {race.first.kind} by {race.first.op} at {first} -> {race.second.kind} by"
                    f" {race.second.op} at {second}{tag}")
            if main_race is not None:
                say("\nthe race report for the reverted pattern (the gather vs. the clear):")
                say(str(main_race))
            say("\nfix: use streamkit_eplb.HeatCollector (python -m streamkit_eplb demo)")
            sys.stdout.flush()
            dist.barrier()
            dist.destroy_process_group()
            return

        heats = [h.wait() for h in handles]
        history = HeatHistory(len(heats))
        for heat in heats:
            history.add(heat)
        total = history.sum()
        say(f"streamkit_eplb demo: {cfg.ranks} gloo ranks on the fake backend (detect='raise'),"
            f" {L} layers x {E} experts, top-{K} of {T} tokens/step, skew {cfg.skew},"
            f" {cfg.steps} steps, collect every {cfg.interval}")
        say(f"collector cost per call on rank {rank}: record {_per(record_stats, records)};"
            f" collect {_per(collect_stats, collects)}")
        say(f"races: {len(session.races)}  (the whole run is race-free under detect='raise')")
        for heat in heats:
            b = heat.balancedness(ep_size=cfg.ranks)
            say(f"window {heat.window}: {int(heat.load.sum())} tokens, balancedness (EP={cfg.ranks})"
                f" min {float(b.min()):.3f} mean {float(b.mean()):.3f}")
        b_ep = total.balancedness(ep_size=cfg.ranks)
        tot = total.total()
        say(f"\nall {len(heats)} windows (HeatHistory.sum()):")
        say(f"{'layer':>5}  {'tokens':>7}  {'hottest':>7}  {'share':>6}  {'balancedness':>12}")
        for layer in range(L):
            row = tot[layer]
            hot = int(row.argmax())
            share = float(row[hot]) / max(int(row.sum()), 1)
            say(f"{layer:>5}  {int(row.sum()):>7}  {hot:>7}  {share:>6.1%}  {float(b_ep[layer]):>12.3f}")
        say(f"(balancedness = mean/max over the {cfg.ranks} EP ranks hosting experts"
            f" [r*{E // cfg.ranks}, (r+1)*{E // cfg.ranks}); 1.0 is perfect)")
        if rank == 0:
            try:
                total.heatmap(cfg.out, title=f"expert heat, {cfg.steps} steps, skew {cfg.skew} (tokens routed by each rank)")
                say(f"heat map: {os.path.abspath(cfg.out)}")
            except ImportError as exc:
                say(f"heat map skipped: {exc}")
        say(f"rank loop time {elapsed:.2f} s")
        sys.stdout.flush()
    dist.barrier()
    dist.destroy_process_group()


def _add(a: Any, b: Any) -> Any:
    from dataclasses import fields

    return type(a)(**{f.name: getattr(a, f.name) + getattr(b, f.name) for f in fields(a)})


def _per(stats: Any, calls: int) -> str:
    if not calls:
        return "n/a"
    return f"{stats.kernels / calls:.2f} kernels, {stats.host_syncs / calls:.2f} host syncs"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(cfg: DemoConfig) -> int:
    """Spawn the ranks, wait for them (never longer than ``cfg.timeout``); returns an exit code."""
    cfg.validate()
    start = time.perf_counter()
    port = _free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(rank, asdict(cfg), port), daemon=False) for rank in range(cfg.ranks)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + cfg.timeout
    failed = False
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive() or p.exitcode != 0:
            failed = True
            break
    if failed:  # one rank failed or we ran out of time: do not leave the others hanging
        for p in procs:
            p.join(timeout=2.0)  # give the healthy ones a moment to finish
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5.0)
                if p.is_alive():
                    p.kill()
        codes = [p.exitcode for p in procs]
        print(f"demo failed: rank exit codes {codes} (timeout {cfg.timeout} s)", file=sys.stderr)
        return 1
    print(f"demo wall time {time.perf_counter() - start:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m streamkit_eplb",
        description="streamkit_eplb: MoE expert-heat collection on a side stream, proved race-free on the fake backend.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    d = DemoConfig()
    demo = sub.add_parser(
        "demo",
        help="spawn gloo ranks on the fake backend, route skewed tokens, collect heat, write a heat map",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--ranks", type=int, default=d.ranks, help="number of gloo ranks (processes)")
    demo.add_argument("--layers", type=int, default=d.layers, help="MoE layers")
    demo.add_argument("--experts", type=int, default=d.experts, help="experts per layer (divisible by --ranks)")
    demo.add_argument("--steps", type=int, default=d.steps, help="forward steps per rank")
    demo.add_argument("--interval", type=int, default=d.interval, help="collect every this many steps")
    demo.add_argument("--skew", type=float, default=d.skew, help="Zipf exponent of expert popularity (0 = uniform)")
    demo.add_argument("--tokens", type=int, default=d.tokens, help="tokens per step per rank")
    demo.add_argument("--top-k", dest="top_k", type=int, default=d.top_k, help="experts per token")
    demo.add_argument("--hidden", type=int, default=d.hidden, help="hidden size of the synthetic layers")
    demo.add_argument("--out", default=d.out, help=f"heat-map PNG path (default {d.out})")
    demo.add_argument("--seed", type=int, default=d.seed)
    demo.add_argument("--timeout", type=float, default=d.timeout, help="kill the ranks after this many seconds")
    demo.add_argument("--buggy", action="store_true", help="run the reverted (racy) pattern and print the race report")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        fields = {k: v for k, v in vars(args).items() if k != "command"}
        return run_demo(DemoConfig(**fields))
    return 2  # pragma: no cover - argparse rejects unknown commands
