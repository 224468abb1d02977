"""``python -m streamkit_eplb demo``: N gloo ranks on the fake backend close the EPLB loop.

Every rank routes synthetic tokens through ``layers`` MoE-like layers (a matmul, a router matmul and
a top-k over logits biased by a Zipf-like expert popularity) and records the *logical* ``topk_ids``
of every layer with a :class:`HeatCollector` that maps them to physical slots (``log2phy``, vLLM's
replica choice) and keeps a ring of ``window`` passes (one ``step()`` per forward step),
``reduce="sum"``. After ``steps`` steps it collects, rebalances with :func:`rebalance` (every rank
computes the same placement from the same all-reduced heat), applies it with ``set_placement``
(one weight-update step runs with ``collector.enabled = False``, as vllm-ascend does), runs
``steps`` more steps and collects again. Rank 0 prints per-layer balancedness before and after
(measured, and the rebalancer's prediction) and writes both heat maps into one PNG. The fake session
runs with ``detect="raise"``, so finishing is the proof that the run is race-free. ``--buggy`` runs
the reverted pattern (:mod:`streamkit_eplb._buggy`) under ``detect="record"``, prints the races the
backend found, and exits 1.
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
MAX_SEED = 2**32 - 1  # seeds are combined with layer and rank numbers into torch.manual_seed (< 2**64)
MAX_SLOTS = 65_536
MAX_RANK_BYTES = 2 * 2**30
LIMITS = {"ranks": 64, "layers": 4_096, "experts": MAX_SLOTS, "top_k": 1_024, "steps": 1_000_000,
          "window": 1_000_000, "tokens": 1_000_000, "hidden": 65_536}
RACE_FOUND = 3  # a --buggy rank's exit code when the fake backend reported the race


@dataclass
class DemoConfig:
    ranks: int = 2
    layers: int = 8
    experts: int = 16
    redundant: int = 2
    steps: int = 20
    window: int = 20
    skew: float = 1.2
    tokens: int = 128
    top_k: int = 2
    hidden: int = 32
    out: str = DEFAULT_OUT
    buggy: bool = False
    seed: int = 0
    timeout: float = 120.0

    def validate(self) -> None:
        """Every argument, before any rank starts: a bad one is one line naming it, never a
        traceback per rank."""
        for name in ("ranks", "layers", "experts", "steps", "window", "tokens", "top_k", "hidden"):
            if getattr(self, name) <= 0:
                raise SystemExit(f"demo: --{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.redundant < 0:
            raise SystemExit(f"demo: --redundant must be >= 0, got {self.redundant}")
        if not 0 <= self.seed <= MAX_SEED:
            raise SystemExit(f"demo: --seed must lie in [0, {MAX_SEED}] (2**32 - 1), got {self.seed}")
        for name, limit in LIMITS.items():
            if getattr(self, name) > limit:
                raise SystemExit(
                    f"demo: --{name.replace('_', '-')} must be <= {limit:,} (this demo simulates every rank on the"
                    f" CPU), got {getattr(self, name):,}"
                )
        if self.experts + self.redundant > MAX_SLOTS:
            raise SystemExit(
                f"demo: --experts + --redundant must be <= {MAX_SLOTS:,} expert slots, got"
                f" {self.experts + self.redundant:,}"
            )
        need = self.rank_bytes()
        if need > MAX_RANK_BYTES:
            raise SystemExit(
                f"demo: these sizes need about {need / 2**30:.1f} GiB per rank (limit {MAX_RANK_BYTES / 2**30:.0f} GiB):"
                " lower --layers, --tokens, --experts, --window or --hidden"
            )
        if self.top_k > self.experts:
            raise SystemExit(f"demo: --top-k ({self.top_k}) cannot exceed --experts ({self.experts})")
        if not math.isfinite(self.skew) or self.skew < 0:
            raise SystemExit(f"demo: --skew must be a finite number >= 0, got {self.skew}")
        if not math.isfinite(self.timeout) or self.timeout <= 0:
            raise SystemExit(f"demo: --timeout must be a finite number of seconds > 0, got {self.timeout}")
        if (self.experts + self.redundant) % self.ranks:
            raise SystemExit(
                f"demo: --experts + --redundant ({self.experts} + {self.redundant}) must be divisible by"
                f" --ranks ({self.ranks}): every EP rank hosts the same number of expert slots"
            )
        if not self.buggy:
            self._check_out()

    def rank_bytes(self) -> int:
        """About how many bytes one rank allocates for these sizes (the largest tensors)."""
        slots = self.experts + self.redundant
        noise = 4 * self.layers * self.tokens * self.experts  # float32 routing noise per step
        model = 4 * self.layers * self.hidden * (self.hidden + 2 * self.experts)
        counters = 4 * self.window * self.layers * (slots + 1) * 3  # ring, staging, host copy
        logits = 4 * self.tokens * self.experts * 4
        return noise + model + counters + logits

    def _check_out(self) -> None:
        """Fail before the simulation, not after it, if the heat map cannot be written."""
        out = os.path.abspath(self.out)
        if os.path.isdir(out):
            raise SystemExit(f"demo: --out {self.out!r} is a directory; give a file name such as {DEFAULT_OUT}")
        parent = os.path.dirname(out)
        if not os.path.isdir(parent):
            raise SystemExit(f"demo: --out {self.out!r}: the directory {parent!r} does not exist")
        if not os.access(parent, os.W_OK) or (os.path.exists(out) and not os.access(out, os.W_OK)):
            raise SystemExit(f"demo: --out {self.out!r}: not writable")


def _popularity_bias(cfg: DemoConfig, layer: int) -> Any:
    """Zipf-like log-popularity of every logical expert for ``layer`` (the same on every rank)."""
    import torch

    g = torch.Generator().manual_seed(cfg.seed * 7919 + layer)
    order = torch.randperm(cfg.experts, generator=g)  # which expert is the k-th most popular
    popularity_rank = torch.empty(cfg.experts)
    popularity_rank[order] = torch.arange(cfg.experts, dtype=torch.float32)
    return -cfg.skew * torch.log1p(popularity_rank)


def _rank_main(rank: int, cfg_dict: dict, port: int, spawned_at: float) -> None:
    marks = {"start": time.time()}
    import torch
    import torch.distributed as dist

    from streamkit import fake  # noqa: F401 - imported here so the "imports" mark covers it

    marks["imports"] = time.time()
    cfg = DemoConfig(**cfg_dict)
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=cfg.ranks, timeout=datetime.timedelta(seconds=max(10.0, cfg.timeout / 2))
    )
    marks["process group"] = time.time()
    if cfg.buggy:
        code = _buggy_run(rank, cfg)
        dist.barrier()
        dist.destroy_process_group()
        sys.exit(code)
    _closed_loop(rank, cfg, marks, spawned_at)
    dist.barrier()
    dist.destroy_process_group()


def _model(cfg: DemoConfig, dev: Any, rank: int) -> tuple:
    import torch

    L, E, D = cfg.layers, cfg.experts, cfg.hidden
    host_gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    weights = [(torch.randn(D, D, generator=host_gen) / math.sqrt(D)).to(dev) for _ in range(L)]
    routers = [(torch.randn(D, E, generator=host_gen) / math.sqrt(D)).to(dev) for _ in range(L)]
    # the model's popularity plus a little rank-specific tilt (each rank serves different traffic)
    biases = [(_popularity_bias(cfg, l) + 0.25 * torch.randn(E, generator=host_gen)).to(dev) for l in range(L)]
    return host_gen, weights, routers, biases


def _forward(cfg: DemoConfig, dev: Any, model: tuple, record) -> None:  # noqa: ANN001
    """One step: route cfg.tokens tokens through every layer; ``record(layer, topk_ids)``."""
    import torch

    host_gen, weights, routers, biases = model
    x = torch.randn(cfg.tokens, cfg.hidden, generator=host_gen).to(dev, non_blocking=True)
    noise = torch.rand(cfg.layers, cfg.tokens, cfg.experts, generator=host_gen).clamp_(1e-6, 1 - 1e-6).to(dev, non_blocking=True)
    for layer in range(cfg.layers):
        x = torch.tanh(x @ weights[layer])
        gumbel = -torch.log(-torch.log(noise[layer]))  # Gumbel-top-k = sampling without replacement
        logits = 0.5 * (x @ routers[layer]) + biases[layer] + gumbel
        record(layer, logits.topk(cfg.top_k, dim=-1).indices)


def _closed_loop(rank: int, cfg: DemoConfig, marks: dict, spawned_at: float) -> None:
    import torch
    import torch.distributed as dist

    from streamkit import fake

    from ._collector import HeatCollector
    from ._placement import Placement, rebalance

    say = print if rank == 0 else (lambda *a, **k: None)
    L, E, R = cfg.layers, cfg.experts, cfg.ranks
    P = E + cfg.redundant
    with fake.session(detect="raise") as session:
        dev = session.device
        model = _model(cfg, dev, rank)
        initial = Placement.from_phy2log(torch.arange(P) % E, E, num_layers=L)  # vLLM's initial layout
        collector = HeatCollector(L, P, group=dist.group.WORLD, window=cfg.window, reduce="sum", log2phy=initial)
        costs = {"record": [0, 0, 0], "step": [0, 0, 0], "collect": [0, 0, 0]}

        def measured(name, fn, *args, **kwargs):  # noqa: ANN001, ANN202
            before = session.stats.copy()
            result = fn(*args, **kwargs)
            d = session.stats - before
            cost = costs[name]
            cost[0] += 1
            cost[1] += d.kernels
            cost[2] += d.host_syncs
            return result

        def phase():  # noqa: ANN202
            for step in range(cfg.steps):
                _forward(cfg, dev, model, lambda layer, ids: measured("record", collector.record, layer, topk_ids=ids))
                if step + 1 < cfg.steps:
                    measured("step", collector.step)
            # collect before step(): the ring then holds the last `window` passes, as vLLM's window
            heat = measured("collect", collector.collect).wait()
            collector.step()
            return heat

        marks["setup"] = time.time()
        before = phase()
        marks["phase 1 (before)"] = time.time()
        placement = rebalance(before.to_vllm(), P, 1, 1, R, old=initial)  # keeps experts in place where it can
        predicted = before.predicted_balancedness(placement, R)
        collector.set_placement(placement)
        collector.enabled = False  # the weight-update step: routed, not counted
        _forward(cfg, dev, model, lambda layer, ids: collector.record(layer, topk_ids=ids))
        collector.enabled = True
        marks["rebalance"] = time.time()
        after = phase()
        marks["phase 2 (after)"] = time.time()
        races = len(session.races)

    b0, b1 = before.balancedness(ep_size=R), after.balancedness(ep_size=R)
    say(f"streamkit_eplb demo: {R} gloo ranks on the fake backend (detect='raise'), {L} layers x {E} logical"
        f" experts in {P} slots ({P // R} per EP rank), top-{cfg.top_k} of {cfg.tokens} tokens/step, skew {cfg.skew}")
    say(f"collector: window={cfg.window} passes, reduce='sum', log2phy (vLLM replica choice); {cfg.steps} steps per phase")
    say(f"collector cost per call on rank {rank}: " + "; ".join(
        f"{name} {k / max(n, 1):.2f} kernels, {h / max(n, 1):.2f} host syncs" for name, (n, k, h) in costs.items()))
    say(f"races: {races}  (the whole run is race-free under detect='raise')")
    say(f"window {before.window}: placement v{before.placement_version}, {int(before.load.sum())} routed tokens;"
        f" window {after.window}: placement v{after.placement_version}, {int(after.load.sum())} routed tokens")
    say(f"\n{'layer':>5}  {'before':>7}  {'predicted':>9}  {'after':>7}")
    for layer in range(L):
        say(f"{layer:>5}  {float(b0[layer]):>7.3f}  {float(predicted[layer]):>9.3f}  {float(b1[layer]):>7.3f}")
    say(f"{'mean':>5}  {float(b0.mean()):>7.3f}  {float(predicted.mean()):>9.3f}  {float(b1.mean()):>7.3f}")
    say(f"rebalance: {placement.moved} of {placement.phy2log.numel()} expert slots change (weights to move;"
        f" {rebalance(before.to_vllm(), P, 1, 1, R).moved_from(initial)} without old=)")
    say(f"vLLM balancedness (sum of means / sum of maxes): before {float(before.balancedness(ep_size=R, kind='vllm')):.3f},"
        f" after {float(after.balancedness(ep_size=R, kind='vllm')):.3f}")
    say(f"(balancedness = mean/max over the {R} EP ranks of the tokens their slots serve; 1.0 is perfect)")
    if rank == 0:
        try:
            from ._plot import heatmap

            heatmap([(before, f"before: placement v{before.placement_version}"),
                     (after, f"after rebalance: placement v{after.placement_version}")], cfg.out, ep_size=R)
            say(f"heat map: {os.path.abspath(cfg.out)}")
        except ImportError as exc:
            say(f"heat map skipped: {exc}")
        marks["plot"] = time.time()
        spans, last = [], spawned_at
        for name, at in marks.items():
            spans.append(f"{name} {at - last:.2f} s" if name != "start" else f"spawn (python start) {at - last:.2f} s")
            last = at
        say("rank 0 time: " + ", ".join(spans))
    sys.stdout.flush()


def _buggy_run(rank: int, cfg: DemoConfig) -> int:
    import torch
    import torch.distributed as dist

    from streamkit import fake

    from ._buggy import RevertedCollector, marker_lines

    say = print if rank == 0 else (lambda *a, **k: None)
    L, E = cfg.layers, cfg.experts
    with fake.session(detect="record") as session:
        dev = session.device
        model = _model(cfg, dev, rank)
        ones = torch.ones(cfg.tokens * cfg.top_k, dtype=torch.int64).to(dev)
        collector = RevertedCollector(L, E, group=dist.group.WORLD)

        def record(layer, ids):  # noqa: ANN001, ANN202 - vllm-ascend style: counts on the current stream
            collector.record(layer, torch.zeros(E, dtype=torch.int64, device=dev).index_add_(0, ids.reshape(-1), ones))

        for _ in range(cfg.steps):
            _forward(cfg, dev, model, record)
            collector.collect()
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
    return RACE_FOUND if races else 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(cfg: DemoConfig) -> int:
    """Spawn the ranks, wait for them (never longer than ``cfg.timeout``); returns an exit code:
    0 on success, 1 on a failure, a timeout, or (``--buggy``) when the race was found."""
    cfg.validate()
    start = time.perf_counter()
    port = _free_port()
    ctx = mp.get_context("spawn")
    spawned_at = time.time()
    procs = [ctx.Process(target=_rank_main, args=(rank, asdict(cfg), port, spawned_at), daemon=False) for rank in range(cfg.ranks)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + cfg.timeout
    timed_out = False
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            timed_out = True
            break
        if p.exitcode not in (0, RACE_FOUND):
            break  # a real failure: don't wait for the others
    codes = [p.exitcode for p in procs]
    if cfg.buggy and codes and all(code == RACE_FOUND for code in codes):
        print(f"demo --buggy: the fake backend found the race on every rank (exit 1); {time.perf_counter() - start:.1f} s")
        return 1
    if timed_out or any(code != 0 for code in codes):
        # one rank failed or we ran out of time: do not leave the others hanging
        if not timed_out:
            for p in procs:
                p.join(timeout=2.0)  # a rank failed: give the healthy ones a moment to finish
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5.0)
                if p.is_alive():
                    p.kill()
        if timed_out:
            print(f"demo failed: timed out after {cfg.timeout:g} s; raise --timeout", file=sys.stderr)
        else:
            print(f"demo failed: rank exit codes {[p.exitcode for p in procs]}", file=sys.stderr)
        return 1
    print(f"demo wall time {time.perf_counter() - start:.1f} s (parent process: spawning {cfg.ranks} ranks and waiting)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m streamkit_eplb",
        description="streamkit_eplb: graph-safe MoE expert-heat collection, proved race-free on the fake backend.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    d = DemoConfig()
    demo = sub.add_parser(
        "demo",
        help="gloo ranks on the fake backend: collect heat, rebalance, apply, compare balancedness",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--ranks", type=int, default=d.ranks, help="number of gloo ranks (processes) = EP ranks")
    demo.add_argument("--layers", type=int, default=d.layers, help="MoE layers")
    demo.add_argument("--experts", type=int, default=d.experts, help="logical experts per layer")
    demo.add_argument("--redundant", type=int, default=d.redundant, help="redundant expert slots (experts + redundant divisible by ranks)")
    demo.add_argument("--steps", type=int, default=d.steps, help="forward steps before and again after the rebalance")
    demo.add_argument("--window", type=int, default=d.window, help="passes the collector keeps on the device")
    demo.add_argument("--skew", type=float, default=d.skew, help="Zipf exponent of expert popularity (finite, >= 0; 0 = uniform)")
    demo.add_argument("--tokens", type=int, default=d.tokens, help="tokens per step per rank")
    demo.add_argument("--top-k", dest="top_k", type=int, default=d.top_k, help="experts per token")
    demo.add_argument("--hidden", type=int, default=d.hidden, help="hidden size of the synthetic layers")
    demo.add_argument("--out", default=d.out, help=f"heat-map PNG path (default {d.out}), checked before the run")
    demo.add_argument("--seed", type=int, default=d.seed, help=f"random seed, 0 to {MAX_SEED}")
    demo.add_argument("--timeout", type=float, default=d.timeout, help="kill the ranks after this many seconds")
    demo.add_argument("--buggy", action="store_true", help="run the reverted (racy) pattern, print the race report, exit 1")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        fields = {k: v for k, v in vars(args).items() if k != "command"}
        return run_demo(DemoConfig(**fields))
    return 2  # pragma: no cover - argparse rejects unknown commands
