"""HeatCollector on one process: the functional suite runs on every backend (``streamkit_backend``);
the stream-protocol checks (host syncs, kernels, races) run on the fake backend."""

from __future__ import annotations

import pytest
import torch

import streamkit as sk
from streamkit_eplb import CollectError, Heat, HeatCollector, HeatHandle

from streamkit_eplb._buggy import RevertedCollector, marker_lines


def dev_tensor(values, dtype=torch.int64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(sk.device())


def rank0(heat: Heat) -> list:
    return heat.load[:, 0, :].tolist()


# -- functional: every backend ----------------------------------------------------------------


def test_counts_land_in_their_layer_and_window(streamkit_backend):
    c = HeatCollector(3, 4)
    assert (c.world_size, c.rank) == (1, 0)
    c.record(0, dev_tensor([1, 2, 3, 4]))
    c.record(2, dev_tensor([0, 0, 5, 0]))
    c.record(0, dev_tensor([1, 1, 1, 1]))
    handle = c.collect()
    assert isinstance(handle, HeatHandle) and handle.window == 0
    heat = handle.wait()
    assert isinstance(heat, Heat)
    assert heat.load.device.type == "cpu" and heat.load.dtype == torch.int64
    assert tuple(heat.load.shape) == (3, 1, 4)
    assert rank0(heat) == [[2, 3, 4, 5], [0, 0, 0, 0], [0, 0, 5, 0]]
    assert heat.window == 0
    assert heat.total().tolist() == rank0(heat)
    assert heat.invalid.tolist() == [[0], [0], [0]]
    # the counters were cleared: the next window starts from zero
    c.record(1, dev_tensor([7, 0, 0, 0]))
    second = c.collect().wait()
    assert second.window == 1
    assert rank0(second) == [[0, 0, 0, 0], [7, 0, 0, 0], [0, 0, 0, 0]]


def test_topk_ids_exclude_padding(streamkit_backend):
    c = HeatCollector(2, 4)
    ids = dev_tensor([[0, 3], [3, -1], [-1, -1], [2, 3]])
    c.record(1, topk_ids=ids)
    c.record(1, topk_ids=dev_tensor([1, 1], dtype=torch.int32))  # int32, 1-D: fine too
    c.record(0, topk_ids=dev_tensor([], dtype=torch.int64).reshape(0, 2))  # no tokens
    heat = c.collect().wait()
    assert rank0(heat) == [[0, 0, 0, 0], [1, 2, 1, 3]]
    assert heat.invalid.sum().item() == 0


def test_cumulative_counts_are_diffed_back(streamkit_backend):
    c = HeatCollector(1, 4)
    c.record(0, dev_tensor([2, 2, 5, 9], dtype=torch.int32), cumulative=True)  # counts 2, 0, 3, 4
    c.record(0, dev_tensor([1, 2, 3, 4]))
    assert rank0(c.collect().wait()) == [[3, 2, 6, 8]]
    c1 = HeatCollector(1, 1)
    c1.record(0, dev_tensor([6]), cumulative=True)
    assert rank0(c1.collect().wait()) == [[6]]


def test_int64_counters_do_not_overflow(streamkit_backend):
    c = HeatCollector(1, 2)
    big = dev_tensor([2**31 - 1, 1], dtype=torch.int32)
    for _ in range(5):
        c.record(0, big)
    assert rank0(c.collect().wait()) == [[5 * (2**31 - 1), 5]]
    huge = dev_tensor([2**62, 0])
    c.record(0, huge)
    c.record(0, huge)
    c.record(0, huge)  # 3 * 2**62 > 2**63 - 1 would wrap; it is the caller's int64 range, not ours
    # we only promise int64 accumulation per window; check one window's worth of 2**62 is exact
    c2 = HeatCollector(1, 2)
    c2.record(0, huge)
    assert rank0(c2.collect().wait()) == [[2**62, 0]]


def test_a_returned_heat_is_never_overwritten(streamkit_backend):
    c = HeatCollector(2, 3)
    c.record(0, dev_tensor([1, 2, 3]))
    first = c.collect().wait()
    snapshot = first.load.clone()
    pending = []
    for i in range(4):
        c.record(0, dev_tensor([9, 9, 9]))
        c.record(1, dev_tensor([i, i, i]))
        pending.append(c.collect())
    heats = [h.wait() for h in pending]
    assert torch.equal(first.load, snapshot)
    assert [h.window for h in heats] == [1, 2, 3, 4]
    assert len({h.load.data_ptr() for h in [first, *heats]}) == 5
    assert [rank0(h)[1] for h in heats] == [[i, i, i] for i in range(4)]


def test_handle_done_and_wait_are_idempotent(streamkit_backend):
    c = HeatCollector(1, 2)
    c.record(0, dev_tensor([1, 1]))
    handle = c.collect()
    heat = handle.wait(timeout=30.0)
    assert handle.done()
    assert handle.wait() is heat
    assert "done" in repr(handle)
    empty = c.collect().wait()  # nothing recorded: an all-zero window
    assert empty.window == 1 and empty.load.sum().item() == 0


def test_records_from_another_stream_and_a_user_side_stream(streamkit_backend):
    mine = sk.Stream()
    c = HeatCollector(1, 3, stream=mine)
    assert c.stream == mine
    other = sk.Stream()
    other.wait_stream(sk.current_stream())
    with sk.switch(other):
        counts = dev_tensor([1, 2, 3])
        c.record(0, counts)  # the side stream waits for `other`, the stream counts were made on
    c.record(0, dev_tensor([1, 0, 0]))
    assert rank0(c.collect().wait()) == [[2, 2, 3]]


# -- bad input ----------------------------------------------------------------------------------


def test_constructor_validates(streamkit_backend):
    with pytest.raises(ValueError, match="num_layers"):
        HeatCollector(0, 4)
    with pytest.raises(TypeError, match="num_experts"):
        HeatCollector(2, 4.0)
    with pytest.raises(TypeError, match="num_layers"):
        HeatCollector(True, 4)
    with pytest.raises(TypeError, match="stream"):
        HeatCollector(2, 4, stream="side")


def test_group_without_distributed_is_a_clear_error(streamkit_backend):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # pragma: no cover
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="not initialized"):
        HeatCollector(2, 4, group=object())


def test_record_validates_its_arguments(streamkit_backend):
    c = HeatCollector(2, 4)
    good = dev_tensor([1, 1, 1, 1])
    with pytest.raises(IndexError, match="layer"):
        c.record(2, good)
    with pytest.raises(IndexError, match="layer"):
        c.record(-1, good)
    with pytest.raises(TypeError, match="layer"):
        c.record(1.0, good)
    with pytest.raises(TypeError, match="counts"):
        c.record(0, dev_tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float32))
    with pytest.raises(TypeError, match="counts"):
        c.record(0, dev_tensor([True, False, True, True], dtype=torch.bool))
    with pytest.raises(TypeError, match="counts"):
        c.record(0, [1, 1, 1, 1])
    with pytest.raises(ValueError, match="counts.*device"):
        c.record(0, torch.ones(4, dtype=torch.int64))  # on the CPU
    with pytest.raises(ValueError, match=r"counts.*shape \(4,\)"):
        c.record(0, dev_tensor([1, 1, 1]))
    with pytest.raises(ValueError, match=r"counts.*shape \(4,\)"):
        c.record(0, dev_tensor([[1, 1, 1, 1]]))
    with pytest.raises(TypeError, match="exactly one of counts.*both"):
        c.record(0, good, topk_ids=dev_tensor([0]))
    with pytest.raises(TypeError, match="exactly one of counts.*neither"):
        c.record(0)
    with pytest.raises(TypeError, match="topk_ids"):
        c.record(0, topk_ids=dev_tensor([0.5], dtype=torch.float32))
    with pytest.raises(TypeError, match="topk_ids.*int32 or int64"):
        c.record(0, topk_ids=dev_tensor([0], dtype=torch.uint8))
    with pytest.raises(TypeError, match="topk_ids.*int32 or int64"):
        c.record(0, topk_ids=dev_tensor([0], dtype=torch.int16))
    with pytest.raises(ValueError, match="topk_ids.*device"):
        c.record(0, topk_ids=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="cumulative"):
        c.record(0, topk_ids=dev_tensor([0]), cumulative=True)
    # nothing above was recorded
    assert c.collect().wait().load.sum().item() == 0


@pytest.mark.streamkit_backends("fake")
def test_out_of_range_topk_ids_raise_on_fake(streamkit_backend):
    c = HeatCollector(2, 4)
    for bad in ([0, 4], [-2, 1], [[1, 2], [7, -1]]):
        with pytest.raises(ValueError, match=r"topk_ids.*\[-1, 4\)"):
            c.record(1, topk_ids=dev_tensor(bad))
    with pytest.raises(ValueError, match="negative"):
        c.record(0, dev_tensor([1, -1, 0, 0]))
    with pytest.raises(ValueError, match="non-decreasing"):
        c.record(0, dev_tensor([1, 3, 2, 4]), cumulative=True)
    assert c.collect().wait().load.sum().item() == 0


@pytest.mark.streamkit_backends("cuda", "npu")
def test_out_of_range_topk_ids_are_counted_on_devices(streamkit_backend):
    c = HeatCollector(2, 4)
    c.record(1, topk_ids=dev_tensor([[0, 4], [-2, -1], [3, 100]]))
    heat = c.collect().wait()
    assert rank0(heat) == [[0, 0, 0, 0], [1, 0, 0, 1]]
    assert heat.invalid.tolist() == [[0], [3]]


# -- stream protocol on the fake backend ---------------------------------------------------------


def test_record_and_collect_never_sync_the_host_and_issue_few_kernels(fake_session):
    s = fake_session
    c = HeatCollector(4, 8)
    counts = dev_tensor(list(range(8)))
    ids = dev_tensor([[0, 1], [7, -1]])
    cum = dev_tensor(list(range(8))).cumsum(0)

    def cost(fn):
        before = s.stats.copy()
        fn()
        return s.stats - before

    r_counts = cost(lambda: c.record(0, counts))
    r_topk = cost(lambda: c.record(1, topk_ids=ids))
    r_cum = cost(lambda: c.record(2, cum, cumulative=True))
    holder = []
    col = cost(lambda: holder.append(c.collect()))
    for delta in (r_counts, r_topk, r_cum, col):
        assert delta.host_syncs == 0, delta
    assert r_counts.kernels == 1  # one add
    assert r_topk.kernels == 2  # one searchsorted (id -> column) + one scatter_add_
    assert r_cum.kernels == 2  # add + sub of the shifted running sum
    assert col.kernels <= 3  # (gather), D2H copy, clear
    # record: the side stream waits for the current stream; nothing waits for the side stream
    assert (r_counts.event_records, r_counts.event_waits) == (1, 1)
    assert (col.event_waits) == 1
    assert holder[0].wait().load[:, 0, :].sum().item() == sum(range(8)) * 2 + 3
    assert s.races == []


def test_record_does_not_join_back():
    """Proof by counter-example: rewriting the input on the current stream right after record() is a
    race, so the current stream was not made to wait for the side stream."""
    from streamkit import fake

    with fake.session(detect="record") as s:
        c = HeatCollector(1, 2)
        counts = dev_tensor([1, 1])
        c.record(0, counts)
        counts.add_(1)  # no wait on c.stream: unordered with the side stream's read
        assert len(s.races) == 1
        race = s.races[0]
        assert race.first.stream == c.stream and race.first.kind == "read"
        assert race.second.stream == sk.default_stream() and race.second.kind == "write"
        # ... and with the documented fix it is fine
        counts2 = dev_tensor([1, 1])
        c.record(0, counts2)
        sk.current_stream().wait_stream(c.stream)
        counts2.add_(1)
        assert len(s.races) == 1


def test_collect_does_not_join_back():
    from streamkit import fake

    with fake.session(detect="record") as s:
        c = HeatCollector(1, 2)
        c.record(0, dev_tensor([1, 1]))
        c.collect()
        # the clear of the counters ran on the side stream; reading them from the current stream
        # without a wait is a race, so collect() did not order the current stream after it
        c._acc.sum()
        assert len(s.races) == 1 and s.races[0].first.stream == c.stream


def test_inputs_stay_alive_until_the_side_stream_read_them(monkeypatch):
    """Temporaries passed to record() may be freed at once (record_stream keeps their memory);
    without the record_stream call the fake backend reports the free."""
    from streamkit import fake

    with fake.session(detect="raise"):
        c = HeatCollector(2, 4)
        c.record(0, dev_tensor([1, 2, 3, 4]))  # freed right after this line
        c.record(1, topk_ids=dev_tensor([[0, 1]]))
        assert rank0(c.collect().wait()) == [[1, 2, 3, 4], [1, 1, 0, 0]]

    monkeypatch.setattr(sk, "record_stream", lambda tensor, stream: None)
    with pytest.raises(sk.RaceError) as info:
        with fake.session(detect="raise"):
            c = HeatCollector(2, 4)
            c.record(0, dev_tensor([1, 2, 3, 4]))
    assert info.value.race.second.kind == "free"


def test_reverted_pattern_is_reported_naming_the_gather_and_the_clear():
    """The deliberately wrong collector (gather on the side stream without waiting for the default
    stream; clear on the default stream without waiting for the side stream) is caught."""
    from streamkit import fake

    import streamkit_eplb._buggy as buggy

    gather_lines, clear_lines, record_lines = marker_lines("gather"), marker_lines("clear"), marker_lines("record")
    assert gather_lines and clear_lines and record_lines
    with fake.session(detect="record") as s:
        bad = RevertedCollector(2, 4)
        bad.record(0, dev_tensor([1, 2, 3, 4]))
        bad.collect()
        default = sk.default_stream()

    def at(access, lines):
        return access.filename == buggy.__file__ and access.lineno in lines

    gather_vs_clear = [r for r in s.races if at(r.first, gather_lines) and at(r.second, clear_lines)]
    assert gather_vs_clear, "\n\n".join(map(str, s.races))
    race = gather_vs_clear[0]
    assert race.first.stream == bad.side and race.first.kind == "read"
    assert race.second.stream == default and race.second.kind == "write"
    report = str(race)
    assert f"_buggy.py:{race.first.lineno}" in report and f"_buggy.py:{race.second.lineno}" in report
    # and the missing wait before the gather: the record's write vs. the gather's read
    assert any(at(r.first, record_lines) and at(r.second, gather_lines) for r in s.races)

    with pytest.raises(sk.RaceError) as info:  # with detect="raise" it stops at the first one
        with fake.session(detect="raise"):
            bad = RevertedCollector(2, 4)
            bad.record(0, dev_tensor([1, 2, 3, 4]))
            bad.collect()
    assert info.value.race.second.lineno in gather_lines


def test_the_real_collector_is_race_free_under_the_same_sequence(fake_session):
    c = HeatCollector(2, 4)
    for _ in range(3):
        c.record(0, dev_tensor([1, 2, 3, 4]))
        c.collect()
        c.record(1, topk_ids=dev_tensor([0, 3]))
    heat = c.collect().wait()
    assert rank0(heat) == [[0, 0, 0, 0], [1, 0, 0, 1]]
    assert fake_session.races == []


def test_collect_error_is_raised_from_wait_only():
    c_err = ConnectionError("peer 1 is gone")
    handle = HeatHandle.__new__(HeatHandle)
    handle._shape, handle._window, handle._host, handle._event, handle._error, handle._heat = (1, 1, 1), 5, None, None, c_err, None
    assert handle.done()
    with pytest.raises(CollectError, match="window 5.*peer 1 is gone") as info:
        handle.wait()
    assert info.value.__cause__ is c_err
