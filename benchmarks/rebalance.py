"""What ``rebalance`` costs and how well it balances, at DeepSeek-V3 scale (58 MoE layers, 256
logical experts in 8 groups, 288 physical slots, 32 EP ranks), beside the engines' own algorithms.

The engines' algorithms are the reference implementations in ``tests/eplb/eplb_reference.py``,
written from DeepSeek's ``eplb.py`` and vLLM's ``DefaultEplbPolicy`` with their loop structure
(per-layer Python packing loops; vLLM's in numpy): they stand in for the real packages, which are
not installed here. Every configuration is timed on the same random Zipf-like loads, best of
``--repeat`` runs, single-threaded torch; it prints, per configuration: seconds per call of
``rebalance`` (``algorithm="default"``, ``"deepseek"``, ``"vllm"``, and ``old=`` the previous
placement), of the two references, the lowest per-layer balancedness (mean / max rank load) and the
layers where ``rebalance`` is worse than the references (must be 0), and the expert weights moved
with and without ``old=``.

usage: python benchmarks/rebalance.py [--repeat 9] [--layers 58]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "eplb"))

import torch  # noqa: E402
from eplb_reference import deepseek_rebalance, peak_rank_load, vllm_rebalance  # noqa: E402

from streamkit_eplb import rebalance  # noqa: E402

LOGICAL, GROUPS, SLOTS, RANKS = 256, 8, 288, 32
# (name, num_groups, num_nodes): hierarchical over 8 nodes; hierarchical with one node; global
# (the groups do not divide over the nodes, so every engine falls back to its global policy)
CONFIGS = [("8 nodes, 32 ranks (hierarchical)", GROUPS, 8), ("1 node, 32 ranks", GROUPS, 1), ("global (1 group, 4 nodes)", 1, 4)]
# the figures of issue 20, measured with the real packages on another machine (seconds)
ISSUE = {"8 nodes, 32 ranks (hierarchical)": (0.033, 0.032), "1 node, 32 ranks": (0.114, 0.034), "global (1 group, 4 nodes)": (0.114, 0.034)}


def best_of(repeat: int, fns: dict) -> dict:  # noqa: ANN001
    """The fastest of ``repeat`` runs of every function, run round-robin (so a busy moment of the
    machine hits them all alike)."""
    times: dict = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def zipf_loads(layers: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(LOGICAL, generator=gen) for _ in range(layers)])
    return (100_000.0 / (1.0 + order.double()) ** 1.1 * (0.5 + torch.rand(layers, LOGICAL, generator=gen))).round()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--layers", type=int, default=58)
    args = parser.parse_args()
    torch.set_num_threads(1)
    weight, previous = zipf_loads(args.layers, 1), zipf_loads(args.layers, 2)
    print(f"torch {torch.__version__}; {args.layers} layers x {LOGICAL} logical experts ({GROUPS} groups), {SLOTS} slots,"
          f" {RANKS} ranks; best of {args.repeat}, seconds per call")
    header = (f"{'configuration':<34} {'default':>8} {'deepseek':>9} {'vllm':>7} {'old=':>7} | {'DeepSeek ref':>12} {'vLLM ref':>9}"
              f" | {'issue: before':>13} {'issue: vLLM':>11}")
    print(header)
    notes = []
    for name, groups, nodes in CONFIGS:
        shape = (SLOTS, groups, nodes, RANKS)
        old = rebalance(previous, *shape)
        t = best_of(args.repeat, {
            "default": lambda: rebalance(weight, *shape),
            "deepseek": lambda: rebalance(weight, *shape, algorithm="deepseek"),
            "vllm": lambda: rebalance(weight, *shape, algorithm="vllm"),
            "old": lambda: rebalance(weight, *shape, old=old),
            "vllm_ref": lambda: vllm_rebalance(weight, *shape),
        })
        t.update(best_of(max(1, args.repeat // 3), {"ds_ref": lambda: deepseek_rebalance(weight, *shape)}))
        before, vllm_then = ISSUE[name]
        print(f"{name:<34} {t['default']:>8.4f} {t['deepseek']:>9.4f} {t['vllm']:>7.4f} {t['old']:>7.4f} |"
              f" {t['ds_ref']:>12.4f} {t['vllm_ref']:>9.4f} | {before:>13.3f} {vllm_then:>11.3f}")
        ours = rebalance(weight, *shape)
        peaks = {"default": peak_rank_load(weight, ours.phy2log, RANKS),
                 "DeepSeek": peak_rank_load(weight, deepseek_rebalance(weight, *shape), RANKS),
                 "vLLM": peak_rank_load(weight, vllm_rebalance(weight, *shape), RANKS)}
        mean = weight.sum(1) / RANKS
        worse = int((peaks["default"] > torch.minimum(peaks["DeepSeek"], peaks["vLLM"]) * (1 + 1e-12)).sum())
        kept = rebalance(weight, *shape, old=old)
        notes.append(
            f"  {name}: lowest per-layer balancedness default {float((mean / peaks['default']).min()):.4f},"
            f" DeepSeek {float((mean / peaks['DeepSeek']).min()):.4f}, vLLM {float((mean / peaks['vLLM']).min()):.4f};"
            f" mean default {float((mean / peaks['default']).mean()):.4f}, DeepSeek {float((mean / peaks['DeepSeek']).mean()):.4f},"
            f" vLLM {float((mean / peaks['vLLM']).mean()):.4f}; layers worse than either: {worse};"
            f" weights moved from the previous placement: {kept.moved} with old=, {ours.moved_from(old)} from scratch"
            f" (of {ours.phy2log.numel()})"
        )
    print("\n".join(notes))


if __name__ == "__main__":
    main()
