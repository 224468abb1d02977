"""Collectives inside a captured graph (a tensor-parallel decode step, as vLLM captures it), on
two gloo ranks: each replay runs the captured all_reduce again, on every rank, in captured order."""

from __future__ import annotations

from pathlib import Path

import pytest
from _support import rank_results

WORKER = str(Path(__file__).with_name("_collective_worker.py"))


SCHEDULES = ("eager", "random")


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return rank_results(WORKER, ",".join(SCHEDULES), world=2, timeout=120)  # (one pair of ranks for both)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_a_captured_all_reduce_replays_on_every_rank(results, schedule):
    for data in (ranked[schedule] for ranked in results):
        assert data["races"] == 0
        # x = i + 1 everywhere: x @ weight_r = 4 (i + 1)(r + 1); summed over ranks 1 and 2: 12 (i + 1)
        assert data["replayed"] == [[[13.0 * (i + 1)] * 4] * 2 for i in range(3)], data
        assert data["replayed"] == data["eager"]
        assert "async_op=True" in data["async_error"] and "during a graph capture" in data["async_error"]
