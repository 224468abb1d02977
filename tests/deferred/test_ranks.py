"""Schedule exploration on two gloo ranks (``fake.explore(fn, group=...)``): one launch of
``_ranks_worker.py`` explores every scenario with 24 schedules per rank (the 200-schedule run of
the fixed pattern and the collector is ``benchmarks/explore_ranks.py``).

The PR-4214 variants (merged, early, no-join) give wrong heat within the first 2 schedules on both
ranks, each rank's own token replays its run bit for bit; a needle (a read wrong between two of
eight writes) is found by the needle sweep on both ranks; the fixed pattern and streamkit_eplb's
HeatCollector give the eager values under every schedule; the ranks agree on the plan even when
their races differ, a run that raises on one rank doesn't hang the other, and an eager run that
raises on one rank raises on all.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist
from _support import rank_entries, rank_results

WORKER = Path(__file__).with_name("_ranks_worker.py")
WORLD = 2
SCHEDULES = 24
N = 8
RIGHT = [2.0 * i + 100.0 for i in range(N)]  # the heat summed over both ranks


@pytest.fixture(scope="module")
def results():
    """Every rank's ``RESULT`` (one launch, every scenario, ``SCHEDULES`` schedules)."""
    return rank_results(WORKER, str(SCHEDULES), world=WORLD, timeout=240)


@pytest.mark.parametrize("variant", ["merged", "early", "no-join"])
def test_pr4214_variants_give_wrong_heat_within_two_schedules_on_both_ranks(results, variant):
    entries = rank_entries(results, variant)
    for rank, entry in enumerate(entries):
        assert entry["type"] == "RankExploration" and entry["runs"] == SCHEDULES
        assert entry["eager"] == RIGHT
        assert not entry["ok"]
        assert entry["failure_index"] < 2, entry["tokens"]
        assert entry["failed_ranks"] == [0, 1]  # wrong on both ranks
        assert not entry["failure_ok_here"] and entry["failure_values"] != RIGHT
        assert entry["failure_token"] == entry["failure_tokens"][str(rank)]
        # this rank's own token reproduces this rank's values, bit for bit
        assert entry["replay_token"] == entry["failure_token"]
        assert entry["replay_bits_equal"] and entry["replay_ok"] is False
        assert f"failed on ranks [0, 1] of {WORLD}" in entry["explain"]
    # shrinking runs over both ranks together (the same runs on each); "no-join" shrinks to a
    # constraint form on the rank whose orderings matter (in "merged" and "early" the ordering that
    # matters is the collective's, which runs at issue, outside what a constraint holds)
    assert entries[0]["shrink_runs"] == entries[1]["shrink_runs"]
    if variant == "no-join":
        assert entries[0]["shrink_runs"] >= 1
        assert any(e["failure_token"].count("/") == 2 and "shrunk to" in e["explain"] for e in entries)
    # the ranks ran the same slots and agree on every outcome
    assert entries[0]["all_tokens"] == entries[1]["all_tokens"]
    assert entries[0]["tokens"] == [t["0"] for t in entries[0]["all_tokens"]]
    assert entries[1]["tokens"] == [t["1"] for t in entries[1]["all_tokens"]]


@pytest.mark.parametrize("name", ["fixed", "collector"])
def test_fixed_pattern_and_heat_collector_are_right_under_every_schedule_on_both_ranks(results, name):
    entries = rank_entries(results, name)
    for entry in entries:
        assert entry["ok"] and entry["runs"] == SCHEDULES and entry["wrong"] == 0
        assert entry["failed_everywhere"] == 0
        assert {t.split(":")[0] for t in entry["tokens"]} >= {"adversarial", "lazy", "rates", "pct"}
    if name == "fixed":
        assert all(entry["eager"] == RIGHT for entry in entries)
    else:  # (layer, rank, expert): both passes' counts summed, per rank
        # record(layer, arange(4) + 10 * rank + layer + step) for steps 0 and 1
        expected = [[[2 * e + 20 * r + 2 * layer + 1 for e in range(4)] for r in range(WORLD)] for layer in range(2)]
        assert all(entry["eager"] == expected for entry in entries)


def test_ranks_agree_on_the_plan_when_only_one_rank_has_the_race(results):
    # rank 1 alone misses the fork wait: it runs the directed slots, rank 0 runs lazy:0 there
    r0, r1 = rank_entries(results, "lopsided")
    assert r0["all_tokens"] == r1["all_tokens"]
    slots = [i for i, t in enumerate(r1["tokens"]) if t.split(":")[0] in ("race", "order", "split")]
    assert slots[:2] == [0, 1] and all(r1["tokens"][i].split(":")[0] in ("race", "order") for i in slots)  # (first, then interleaved)
    short = lambda t: t.split("/")[0].split("+")[0]  # noqa: E731  (the schedule alone: no focus, fingerprint, constraints)
    assert [short(r0["tokens"][i]) for i in slots] == ["lazy:0"] * len(slots)
    others = [i for i in range(len(r1["tokens"])) if i not in slots]
    kind = lambda t: ":".join(short(t).split(":")[:3])  # noqa: E731  (pct's step count and the focus are each rank's own)
    assert [kind(r0["tokens"][i]) for i in others] == [kind(r1["tokens"][i]) for i in others]  # the same plan elsewhere
    assert r0["failure_index"] == r1["failure_index"] == 0
    assert {r: short(t) for r, t in r0["failure_tokens"].items()} == {"0": "lazy:0", "1": short(r1["tokens"][0])}
    assert r0["failure_tokens"] == r1["failure_tokens"] and r1["failure_tokens"]["1"] == r1["failure_token"]
    # rank 1's run raised (after its collectives), rank 0's got rank 1's stale heat: nobody hung,
    # and every one of the 24 slots ran on both ranks
    assert r1["failure_error"].startswith("AssertionError") and r0["failure_error"] is None
    assert r0["failure_values"] != RIGHT
    assert r0["runs"] == r1["runs"] == SCHEDULES
    assert r1["replay_error"] == r1["failure_error"]  # rank 1's token reproduces its failure
    assert r0["replay_bits_equal"]


def test_the_needle_sweep_runs_over_ranks_and_each_ranks_token_replays_it(results):
    # a read that is wrong only between two of eight writes, on both ranks, all_reduced: the race
    # reversal (slot 0) misses it, the needle sweep's first position (slot 1) finds it everywhere
    entries = rank_entries(results, "needle")
    for rank, entry in enumerate(entries):
        assert entry["eager"] == [0.0] and entry["failure_values"] == [2.0]
        assert entry["tokens"][0].startswith("race:") and entry["failure_index"] == 1
        assert entry["failure_token"].startswith("order:") and entry["failed_ranks"] == [0, 1]
        assert entry["replay_bits_equal"] and entry["replay_ok"] is False
        assert entry["failure_token"] == entry["failure_tokens"][str(rank)]
    assert entries[0]["all_tokens"] == entries[1]["all_tokens"]


def test_unordered_collectives_on_one_group_keep_their_issue_order_under_every_schedule(results):
    # an all_reduce on a side stream and an all_gather on the default stream, nothing ordering
    # them: collectives run at issue under every schedule (NCCL serializes them the same way)
    for rank, entry in enumerate(rank_entries(results, "two-streams")):
        assert entry["ok"] and entry["runs"] == SCHEDULES, entry["tokens"]
        assert entry["eager"] == [[3.0] * 4, [10.0] * 4 + [20.0] * 4]


def test_an_eager_run_raising_on_one_rank_raises_on_every_rank(results):
    r0, r1 = (data["eager-raises"] for data in results)
    assert r1 == {"raised": "KeyError", "message": "'rank 1 only'"}
    assert r0["raised"] == "RuntimeError" and "rank(s) [1]" in r0["message"] and "rank 1 only" in r0["message"]


def test_group_parameter(results):
    for data in results:
        entry = data["group-param"]
        assert entry["alone"] == "Exploration"  # group=False: this process alone
        assert entry["explicit"] == "RankExploration" and entry["world"] == WORLD
        assert "explore(group)" in entry["bad"] and "ProcessGroup" in entry["bad"]


def test_group_without_torch_distributed_initialized_is_refused_and_none_is_one_process():
    import torch

    import streamkit as sk
    from streamkit import fake

    if dist.is_initialized():
        pytest.skip("this process has a default process group (another test left it initialized)")

    def fn():
        return (torch.ones(2, device=sk.device()) + 1).cpu()

    with pytest.raises(ValueError, match=r"explore\(group\).*init_process_group"):
        fake.explore(fn, schedules=1, group=object())
    with pytest.raises(ValueError, match=r"explore\(schedules\)"):
        fake.explore(fn, schedules=0)
    found = fake.explore(fn, schedules=2)  # group=None without a default group: one process
    assert type(found) is fake.Exploration and found.ok and len(found.runs) == 2
