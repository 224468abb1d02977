"""c10d collectives ordered as on NCCL/HCCL (docs/semantics.md, "Collectives"): 2 gloo ranks in
one launch of ``_c10d_worker.py``; five collectives, each in its async_op=False and async_op=True
forms, racy and correctly ordered.

- async_op=False runs on the issuing stream: reading the output on another stream without a wait
  is a race that names the collective on the issuing stream.
- async_op=True runs on the process group's stream: touching its tensors before ``work.wait()``,
  or after a ``wait()`` made with another stream current, is a race that names the collective on
  "process group ... stream"; issuing inside ``switch(side)`` and waiting on the compute stream is
  clean, and dropping the input before ``wait()`` is not a free race.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _support import marker_line, rank_entries, rank_results

WORKER = Path(__file__).with_name("_c10d_worker.py")
WORLD = 2
TIMEOUT_S = 90
COLLECTIVES = {  # dist function -> the c10d op it issues
    "all_reduce": "c10d.allreduce_",
    "all_gather_into_tensor": "c10d._allgather_base_",
    "reduce_scatter_tensor": "c10d._reduce_scatter_base_",
    "broadcast": "c10d.broadcast_",
    "all_to_all_single": "c10d.alltoall_base_",
}
PG_STREAM = "process group 'default_pg' stream"


@pytest.fixture(scope="module")
def results():
    return rank_results(WORKER, world=WORLD, timeout=TIMEOUT_S)


def _entries(results, kind, scenario):
    """Per rank: the scenario's result, with values checked against plain CPU torch."""
    out = []
    for data in results:
        entry = data[f"{kind}/{scenario}"]
        assert "error" not in entry, f"rank {data['rank']} {kind}/{scenario} failed:\n{entry['error']}"
        assert entry["values"] == entry["expected"], f"rank {data['rank']} {kind}/{scenario}"
        out.append(entry)
    return out


def _texts(races):
    return "\n\n".join(r["text"] for r in races)


def _is_collective(access, kind, stream):
    assert access["op"].startswith(COLLECTIVES[kind] + "."), access
    assert access["stream"].startswith(stream), access
    assert access["lineno"] == marker_line(WORKER, f"call-{kind}"), access


def _at(access, op, access_kind, marker):
    assert access["op"].startswith(op), access
    assert access["kind"] == access_kind, access
    assert access["stream"] == "default", access
    assert access["lineno"] == marker_line(WORKER, marker), access


# CUDA: async_op=False runs the collective on the current stream, ordered after earlier work there (ProcessGroupNCCL.cpp collective(): currentStream when !asyncOp)
@pytest.mark.parametrize("kind", COLLECTIVES)
def test_sync_collective_is_clean_and_correct(results, kind):
    for entry in _entries(results, kind, "sync_clean"):
        assert entry["races"] == [], _texts(entry["races"])


# CUDA: a sync collective issued inside a side-stream block runs on that stream; reading its output on another stream needs a wait (ProcessGroupNCCL.cpp collective())
@pytest.mark.parametrize("kind", COLLECTIVES)
def test_sync_collective_runs_on_the_issuing_stream(results, kind):
    # async_op=False inside switch(side): the output is written on side, and the default stream
    # reads it without waiting for side
    for entry in _entries(results, kind, "sync_racy"):
        races = entry["races"]
        assert len(races) == 1, _texts(races)
        _is_collective(races[0]["first"], kind, "side")
        assert races[0]["first"]["kind"] == "write"
        _at(races[0]["second"], "aten.mul", "read", "sync-read")


# CUDA: async_op=True runs on the group's NCCL stream; the tensors may be touched only after work.wait() (ProcessGroupNCCL.hpp: WorkNCCL, syncStream)
@pytest.mark.parametrize("kind", COLLECTIVES)
def test_touching_async_collective_tensors_before_wait_is_reported(results, kind):
    for entry in _entries(results, kind, "async_racy"):
        races = entry["races"]
        assert len(races) == 2, _texts(races)
        read, write = races
        _is_collective(read["first"], kind, PG_STREAM)
        assert read["first"]["kind"] == "write"  # the collective wrote the output
        _at(read["second"], "aten.mul", "read", "async-read")
        _is_collective(write["first"], kind, PG_STREAM)
        # in place (all_reduce, broadcast) the input is the output the collective wrote; else it read it
        assert write["first"]["kind"] == ("write" if kind in ("all_reduce", "broadcast") else "read")
        _at(write["second"], "aten.fill_", "write", "async-write")
        assert ".wait()" in read["fix"] and "async_op=True" in read["fix"]
        assert f"by {COLLECTIVES[kind]}." in read["text"] and f"on {PG_STREAM}" in read["text"]


# CUDA: work.wait() makes the stream current at wait time wait for the collective, no other (ProcessGroupNCCL.cpp WorkNCCL::synchronizeStream)
@pytest.mark.parametrize("kind", COLLECTIVES)
def test_wait_orders_only_the_stream_current_at_wait_time(results, kind):
    for entry in _entries(results, kind, "async_wait_elsewhere"):
        races = entry["races"]
        assert len(races) == 1, _texts(races)
        _is_collective(races[0]["first"], kind, PG_STREAM)
        _at(races[0]["second"], "aten.mul", "read", "elsewhere-read")


# CUDA: the NCCL stream first waits for the issuing stream, and wait() on the compute stream orders it after the collective (ProcessGroupNCCL.cpp syncStream, WorkNCCL::wait)
@pytest.mark.parametrize("kind", COLLECTIVES)
def test_async_issue_on_side_then_wait_on_compute_stream_is_clean(results, kind):
    # the common fix pattern, with the input dropped before wait() (the collective holds it)
    for entry in _entries(results, kind, "async_clean"):
        assert entry["races"] == [], _texts(entry["races"])


# CUDA: each process group keeps its own NCCL stream per device (ProcessGroupNCCL.hpp ncclStreams_)
def test_each_process_group_has_its_own_stream(results):
    # waiting for the second group's all_reduce orders nothing of the default group's
    for entry in rank_entries(results, "two_groups"):
        assert entry["values"] == [3.0] * 8
        races = entry["races"]
        assert len(races) == 1, races
        assert races[0]["first"]["stream"].startswith(PG_STREAM)
        assert races[0]["first"]["lineno"] == marker_line(WORKER, "two-groups-x")
        assert races[0]["second"]["lineno"] == marker_line(WORKER, "two-groups-read-x")


def test_raise_mode_raises_at_the_touch_before_it_runs(results):
    for entry in rank_entries(results, "raise_mode"):
        race = entry["error_race"]
        assert race is not None
        assert race["first"]["op"].startswith("c10d.allreduce_.") and race["first"]["stream"].startswith(PG_STREAM)
        assert race["second"]["lineno"] == marker_line(WORKER, "raise-touch")
        assert entry["values"] == [3.0] * 4  # the racing add_ never ran


def test_works_streamkit_did_not_issue_pass_through(results):
    for entry in rank_entries(results, "host_work"):
        assert entry["patched"] and entry["values"] == [3.0] * 4


def test_work_wait_is_restored_when_the_last_session_that_patched_it_ends(results):
    for entry in rank_entries(results, "host_work"):
        assert entry["restored"]


# CUDA: syncStream orders the NCCL stream after the issuing stream only (ProcessGroupNCCL.cpp syncStream)
@pytest.mark.eager_only("the collective races the side stream's write; the values asserted are the eager order's")
def test_process_group_stream_waits_only_for_the_issuing_stream(results):
    for entry in rank_entries(results, "input_from_other_stream"):
        assert entry["values"] == [3.0] * 4
        races = entry["races"]
        assert len(races) == 1, races
        first, second = races[0]["first"], races[0]["second"]
        assert first["stream"] == "side" and first["lineno"] == marker_line(WORKER, "other-stream-produce")
        assert second["op"].startswith("c10d.allreduce_.") and second["stream"].startswith(PG_STREAM)
        assert second["lineno"] == marker_line(WORKER, "other-stream-collective")
        assert "make the stream that issues the collective" in races[0]["fix"]
