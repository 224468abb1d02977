"""Collectives on the fake backend: 2 gloo ranks in subprocesses (``_dist_worker.py``).

A collective with async_op=False (the default; async_op=True is in tests/fidelity/test_c10d.py)
is a kernel on the current stream that reads its input and writes its output, so
issuing it on a side stream that didn't wait for the default-stream producer is a race, and the
fixed program (``side.wait_stream(default)``) is clean and numerically right on both ranks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _support import marker_line, rank_entries, rank_results

WORKER = Path(__file__).with_name("_dist_worker.py")
WORLD = 2
N = 4  # _dist_worker.N
TIMEOUT_S = 90


def worker_line(marker: str) -> int:
    return marker_line(WORKER, marker)


@pytest.fixture(scope="module")
def results():
    return rank_results(WORKER, world=WORLD, timeout=TIMEOUT_S)


def _check(access, *, op_contains, kind, stream, marker):
    assert op_contains in access["op"], access
    assert access["kind"] == kind, access
    assert access["stream"] == stream, access
    line = worker_line(marker)
    assert access["lineno"] == line, access
    assert access["location"] == f"{WORKER.name}:{line}", access


def test_all_gather_on_side_stream_without_wait_is_reported(results):
    for rank, entry in enumerate(rank_entries(results, "all_gather/racy")):
        races = entry["races"]
        assert len(races) == 1, f"rank {rank}: " + "\n\n".join(r["text"] for r in races)
        _check(races[0]["first"], op_contains="fill_", kind="write", stream="default", marker="ag-produce")
        _check(races[0]["second"], op_contains="allgather", kind="read", stream="side", marker="ag-collective")
        assert "wait_stream" in races[0]["text"]


def test_all_gather_fixed_is_clean_and_correct(results):
    for rank, entry in enumerate(rank_entries(results, "all_gather/fixed")):
        assert entry["races"] == [], f"rank {rank}: " + "\n\n".join(r["text"] for r in entry["races"])
        assert entry["values"] == [1.0] * N + [2.0] * N
        assert entry["kernels"] >= 1  # the collective is a kernel on the side stream


def test_all_reduce_on_side_stream_without_wait_is_reported(results):
    for rank, entry in enumerate(rank_entries(results, "all_reduce/racy")):
        races = entry["races"]
        assert len(races) == 1, f"rank {rank}: " + "\n\n".join(r["text"] for r in races)
        _check(races[0]["first"], op_contains="fill_", kind="write", stream="default", marker="ar-produce")
        # all_reduce works in place: its access to x is a write (which conflicts with reads too)
        _check(races[0]["second"], op_contains="allreduce", kind="write", stream="side", marker="ar-collective")


def test_all_reduce_fixed_is_clean_and_correct(results):
    for rank, entry in enumerate(rank_entries(results, "all_reduce/fixed")):
        assert entry["races"] == [], f"rank {rank}: " + "\n\n".join(r["text"] for r in entry["races"])
        assert entry["values"] == [3.0] * N
        assert entry["kernels"] >= 1


def test_reading_all_reduce_output_without_wait_is_reported(results):
    for rank, entry in enumerate(rank_entries(results, "all_reduce_consumer/racy")):
        races = entry["races"]
        assert len(races) == 1, f"rank {rank}: " + "\n\n".join(r["text"] for r in races)
        _check(races[0]["first"], op_contains="allreduce", kind="write", stream="side", marker="arc-collective")
        _check(races[0]["second"], op_contains="sum", kind="read", stream="default", marker="arc-consume")


def test_reading_all_reduce_output_after_wait_is_clean(results):
    for rank, entry in enumerate(rank_entries(results, "all_reduce_consumer/fixed")):
        assert entry["races"] == [], f"rank {rank}: " + "\n\n".join(r["text"] for r in entry["races"])
        assert entry["values"] == [3.0 * N]
