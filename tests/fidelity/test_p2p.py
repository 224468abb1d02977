"""Point-to-point ops, ``dist.barrier()`` and ``Work.is_completed()`` ordered as on NCCL
(docs/semantics.md, "Collectives"): 2 gloo ranks in one launch of ``_p2p_worker.py``; the clean
programs compute plain CPU torch's values under the eager, lazy, adversarial and random schedules
with no race, the racy ones report the race NCCL's ordering leaves."""

from __future__ import annotations

from pathlib import Path

import pytest
from _support import marker_line, rank_entries, rank_results

WORKER = Path(__file__).with_name("_p2p_worker.py")
P2P_STREAM = "process group 'default_pg' p2p stream 0:1"
GROUP_STREAM = "process group 'default_pg' stream"
SCHEDULES = ("eager", "lazy", "adversarial", "random")


@pytest.fixture(scope="module")
def results():
    return rank_results(WORKER, world=2, timeout=90)


def _entries(results, key):
    entries = rank_entries(results, key)
    for rank, entry in enumerate(entries):
        assert entry["values"] == entry["expected"], f"rank {rank} {key}"
    return entries


def _races(entry):
    return [(r["first"]["op"].split(".")[1], r["first"]["kind"], r["first"]["lineno"], r["second"]["kind"], r["second"]["lineno"]) for r in entry["races"]]


# CUDA: send/recv/isend/irecv and batch_isend_irecv run on the process group's NCCL stream, which first waits for the issuing stream; wait() makes the current stream wait for them (ProcessGroupNCCL::pointToPoint: syncStreams, recordStream; WorkNCCL::synchronizeStream); a batch runs on the group's own stream, after the group's async_op=True collectives, and its one work ends after ncclGroupEnd (pointToPoint: batchP2P -> getKeyFromDevice; endCoalescing)
@pytest.mark.parametrize("scenario", ["rank_ordered_send_recv", "isend_irecv_clean", "batch_clean", "batch_after_async_collective"])
def test_ordered_point_to_point_equals_cpu_under_every_schedule(results, scenario):
    for schedule in SCHEDULES:
        for entry in _entries(results, f"{scenario}/{schedule}"):
            assert entry["races"] == [], f"{scenario}/{schedule}"


# CUDA: the p2p kernels run on the p2p NCCL stream: touching their buffers before wait() is unordered with them (ProcessGroupNCCL::pointToPoint)
def test_buffers_touched_before_wait_race_with_the_p2p_kernels(results):
    line = lambda m: marker_line(WORKER, m)  # noqa: E731
    rank0, rank1 = _entries(results, "irecv_read_before_wait/eager")
    assert _races(rank0) == [
        ("recv_", "write", line("irecv"), "read", line("early-read")), ("send", "read", line("isend"), "write", line("early-write")),
    ]
    assert _races(rank1) == [
        ("recv_", "write", line("irecv-1"), "read", line("early-read")), ("send", "read", line("isend-1"), "write", line("early-write")),
    ]
    assert all(r["first"]["stream"].startswith(P2P_STREAM) for r in rank0["races"] + rank1["races"])
    for entry in _entries(results, "batch_racy/eager"):
        assert _races(entry) == [("recv_", "write", line("batch"), "read", line("batch-read"))]
        assert entry["races"][0]["first"]["stream"].startswith(GROUP_STREAM)


# CUDA: batch_isend_irecv's ops run on the group's stream (ProcessGroupNCCL::pointToPoint: "For batch P2P, we need to treat it like a collective when selecting communicator": key = getKeyFromDevice), a single isend on the rank pair's (key = getKeySendRecv): the single send of what the batch received, before the batch is waited for, races with the batch's receive
def test_a_single_send_after_a_batch_runs_on_another_stream(results):
    line = lambda m: marker_line(WORKER, m)  # noqa: E731
    for entry in _entries(results, "batch_then_single_send/eager"):
        assert _races(entry) == [("recv_", "write", line("batch-recv"), "read", line("single-send"))]
        race = entry["races"][0]
        assert race["first"]["stream"].startswith(GROUP_STREAM) and race["second"]["stream"].startswith(P2P_STREAM)


# CUDA: dist.barrier()'s work ends with cudaStreamSynchronize(currentStream) (WorkNCCL::synchronize: "if (barrierTensor_.defined()) ... sync the **current stream** back to host")
def test_barrier_synchronizes_the_host_with_the_current_stream_only(results):
    for schedule in SCHEDULES:
        for entry in _entries(results, f"barrier_orders_the_current_stream/{schedule}"):
            assert entry["races"] == [] and entry["stats"]["stream_syncs"] == 1
    for entry in _entries(results, "barrier_does_not_order_another_stream/eager"):
        assert _races(entry) == [
            ("fill_", "write", marker_line(WORKER, "side-fill"), "read", marker_line(WORKER, "after-barrier-read"))
        ]


# CUDA: Work.is_completed() queries the work's end event (WorkNCCL::isCompleted -> finishedGPUExecutionInternal: ncclEndEvents_->query()); True lets the host rely on the collective
def test_is_completed_polling_orders_the_host_after_that_work_only(results):
    for schedule in SCHEDULES:
        for entry in _entries(results, f"is_completed_polling/{schedule}"):
            assert entry["races"] == []
    for entry in _entries(results, "is_completed_of_another_work/eager"):
        assert _races(entry) == [("allreduce_", "write", marker_line(WORKER, "other-work"), "read", marker_line(WORKER, "other-read"))]
