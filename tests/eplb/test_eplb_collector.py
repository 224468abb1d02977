"""HeatCollector on one process: the functional suite runs on every backend (``streamkit_backend``);
the stream-protocol checks (host syncs, kernels, races) run on the fake backend."""

from __future__ import annotations

import pytest
import torch

import streamkit as sk
from streamkit_eplb import CollectError, Heat, HeatCollector, HeatHandle, Placement

from streamkit_eplb._buggy import RevertedCollector, marker_lines
from eplb_reference import vllm_map_and_record


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


def test_int32_counters_by_default_int64_on_request(streamkit_backend):
    c = HeatCollector(1, 2)  # int32 on the device: 2**31-1 per pass, layer and slot between collects
    c.record(0, dev_tensor([2**31 - 1, 1], dtype=torch.int32))
    heat = c.collect().wait()
    assert rank0(heat) == [[2**31 - 1, 1]] and heat.load.dtype == torch.int64
    wide = HeatCollector(1, 2, dtype=torch.int64)  # v1's int64 counters
    big = dev_tensor([2**31 - 1, 1], dtype=torch.int32)
    for _ in range(5):
        wide.record(0, big)
    assert rank0(wide.collect().wait()) == [[5 * (2**31 - 1), 5]]


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
        c.record(0, counts)  # runs on `other`, where counts were made
    sk.current_stream().wait_stream(other)  # collector calls must be ordered among themselves
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


def test_every_collector_call_is_one_kernel_on_the_current_stream_without_host_sync(fake_session):
    s = fake_session
    placement = Placement.from_phy2log([0, 1, 2, 3, 0, 1, 2, 3], 4)
    c = HeatCollector(4, 8, window=3)
    mapped = HeatCollector(4, 8, log2phy=placement)
    counts = dev_tensor(list(range(8)))
    ids = dev_tensor([[0, 1], [7, -1]])
    logical = dev_tensor([[0, 1], [3, -1]])
    cum = dev_tensor(list(range(8))).cumsum(0)
    n = dev_tensor(1)

    def cost(fn):
        before = s.stats.copy()
        fn()
        return s.stats - before

    calls = {
        "counts": lambda: c.record(0, counts),
        "topk": lambda: c.record(1, topk_ids=ids),
        "cumulative": lambda: c.record(2, cum, cumulative=True),
        "num_tokens": lambda: c.record(3, topk_ids=ids, num_tokens=n),
        "mapped": lambda: mapped.record(0, topk_ids=logical),
        "step": c.step,
        "reset": mapped.reset,
        "disable": lambda: setattr(c, "enabled", False),
        "enable": lambda: setattr(c, "enabled", True),
    }
    for name, fn in calls.items():
        delta = cost(fn)
        assert delta.kernels == 1, (name, delta)
        assert delta.host_syncs == 0, (name, delta)
        assert (delta.event_records, delta.event_waits) == (0, 0), (name, delta)  # no fork, no join
    holder = []
    col = cost(lambda: holder.append(c.collect()))
    assert col.host_syncs == 0
    assert col.kernels == 3  # take (current), D2H copy (side), clear (current); + gather with a group
    assert col.event_waits == 1  # the side stream waits for the current one; nothing waits for the side
    second = cost(lambda: holder.append(c.collect()))
    assert second.event_waits == 2  # ... and the next collect waits for this one's copy before reusing staging
    heat = holder[0].wait()
    assert heat.load[:, 0, :].sum().item() == sum(range(8)) * 2 + 3 + 2  # num_tokens=1: one row of two ids
    assert s.races == []


def test_record_reads_its_input_on_the_current_stream():
    """The input may be rewritten right after record(): it was read on the stream that made it."""
    from streamkit import fake

    with fake.session(detect="raise"):
        c = HeatCollector(1, 2)
        counts = dev_tensor([1, 1])
        c.record(0, counts)
        counts.add_(1)  # no wait needed: same stream
        c.record(0, counts)
        assert rank0(c.collect().wait()) == [[3, 3]]


def test_unordered_records_from_two_streams_are_reported():
    from streamkit import fake

    with fake.session(detect="record") as s:
        c = HeatCollector(1, 2)
        c.record(0, dev_tensor([1, 1]))
        other = sk.Stream()
        with sk.switch(other):
            c.record(0, torch.ones(2, dtype=torch.int64, device=sk.device()))
        assert s.races and s.races[0].second.stream == other


def test_collect_does_not_join_back():
    """The current stream is not made to wait for the side stream's gather and copy: writing the
    staging buffer from the current stream right after collect() is a reported race."""
    from streamkit import fake

    with fake.session(detect="record") as s:
        c = HeatCollector(1, 2)
        c.record(0, dev_tensor([1, 1]))
        c.collect()
        c._staging.fill_(0)
        assert len(s.races) == 1 and s.races[0].first.stream == c.stream


def test_record_never_needs_record_stream(monkeypatch):
    from streamkit import fake

    calls = []
    real = sk.record_stream
    monkeypatch.setattr(sk, "record_stream", lambda tensor, stream: calls.append(tensor.shape) or real(tensor, stream))
    with fake.session(detect="raise"):
        c = HeatCollector(2, 4)
        c.record(0, dev_tensor([1, 2, 3, 4]))  # a temporary, freed right after this line
        c.record(1, topk_ids=dev_tensor([[0, 1]]))
        assert calls == []
        assert rank0(c.collect().wait()) == [[1, 2, 3, 4], [1, 1, 0, 0]]
        assert calls  # collect() does hand its side-stream buffers over


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
    handle = HeatHandle(5, None, None, None, c_err)
    assert handle.done()
    with pytest.raises(CollectError, match="window 5.*peer 1 is gone") as info:
        handle.wait()
    assert info.value.__cause__ is c_err


# -- v2: enable flag, reset, passes, padding, placement --------------------------------------


def test_disabled_records_count_nothing_and_reenabling_counts_again(streamkit_backend):
    c = HeatCollector(1, 3)
    assert c.enabled
    c.record(0, dev_tensor([1, 1, 1]))
    c.enabled = False
    assert not c.enabled
    c.record(0, dev_tensor([5, 5, 5]))
    c.record(0, topk_ids=dev_tensor([[0, 1]]))
    c.enabled = True
    c.record(0, topk_ids=dev_tensor([[2, 2]]))
    assert rank0(c.collect().wait()) == [[1, 1, 3]]
    with pytest.raises(TypeError, match="enabled"):
        c.enabled = 1


def test_reset_discards_the_counts_so_far(streamkit_backend):
    c = HeatCollector(2, 2, window=2)
    c.record(0, dev_tensor([3, 4]))
    c.step()
    c.record(1, dev_tensor([1, 0]))
    c.reset()
    c.record(1, dev_tensor([0, 2]))
    heat = c.collect().wait()
    assert rank0(heat) == [[0, 0], [0, 2]]


def test_the_ring_keeps_the_last_window_passes_oldest_first(streamkit_backend):
    c = HeatCollector(1, 2, window=3)
    for p in range(5):  # passes 0..4; the ring keeps 2, 3, 4
        c.record(0, dev_tensor([p, 10 * p]))
        if p < 4:
            c.step()
    heat = c.collect(reset=False).wait()
    assert heat.passes.shape == (3, 1, 1, 2)
    assert heat.passes[:, 0, 0, :].tolist() == [[2, 20], [3, 30], [4, 40]]
    assert rank0(heat) == [[9, 90]]
    again = c.collect(passes=False).wait()  # reset=False left the counters: the same window sum
    assert again.passes is None and rank0(again) == [[9, 90]]
    assert c.collect().wait().load.sum().item() == 0  # the previous collect cleared them


def test_window_one_without_step_is_the_running_sum(streamkit_backend):
    c = HeatCollector(1, 2)
    for _ in range(4):
        c.record(0, dev_tensor([1, 2]))
    heat = c.collect().wait()
    assert rank0(heat) == [[4, 8]] and heat.passes.shape == (1, 1, 1, 2)


def test_rows_at_or_beyond_num_tokens_are_padding(streamkit_backend):
    c = HeatCollector(1, 4)
    ids = dev_tensor([[0, 1], [2, 3], [3, 3], [3, 3]])  # a graph-padded batch: 2 real rows
    c.record(0, topk_ids=ids, num_tokens=dev_tensor(2))
    c.record(0, topk_ids=ids, num_tokens=dev_tensor(0))
    c.record(0, topk_ids=ids, num_tokens=dev_tensor(9))
    assert rank0(c.collect().wait()) == [[2, 2, 2, 6]]


@pytest.mark.parametrize("replica", ["hash", "modulo"])
def test_log2phy_maps_logical_ids_to_slots_as_vllm_does(streamkit_backend, replica):
    """Per-slot load equals vLLM's map-and-record kernel, replica by its current hash (default) or
    by v0.11's flat-position modulo; with return_physical=True the ids it routes with, too."""
    placement = Placement.from_phy2log([0, 1, 2, 0, 1, 0, 3, 3], 4)  # 0 x3, 1 x2, 2 x1, 3 x2
    c = HeatCollector(2, 8, log2phy=placement, replica=replica)
    gen = torch.Generator().manual_seed(0)
    expected = torch.zeros(2, 8, dtype=torch.int64)
    for step, layer in enumerate((0, 1, 1)):
        ids = torch.randint(-1, 4, (13, 3), generator=gen)
        phys = vllm_map_and_record(ids, expected[layer], placement.log2phy[0], placement.logcnt[0], True, None, replica)
        if step == 2:
            got = c.record(layer, topk_ids=ids.to(sk.device()), return_physical=True)
            assert got.dtype == ids.dtype and torch.equal(got.cpu(), phys)
        else:
            assert c.record(layer, topk_ids=ids.to(sk.device())) is None
    heat = c.collect().wait()
    assert heat.load[:, 0, :].tolist() == expected.tolist()
    assert heat.phy2log.tolist() == placement.phy2log.tolist() * 2 and heat.placement_version == 0
    assert heat.logical().sum().item() == expected.sum().item()


def test_set_placement_bumps_the_version_clears_and_remaps(streamkit_backend):
    first = Placement.from_phy2log([0, 1, 0, 1], 2)
    c = HeatCollector(1, 4, log2phy=first, replica="modulo")
    c.record(0, topk_ids=dev_tensor([[0, 0]]))
    old = c.collect().wait()
    c.record(0, topk_ids=dev_tensor([[1, 1]]))  # discarded by set_placement
    assert c.set_placement([1, 1, 0, 0]) == 1
    c.record(0, topk_ids=dev_tensor([[0, 0, 1, 1]]))
    new = c.collect().wait()
    assert (old.placement_version, new.placement_version) == (0, 1)
    assert rank0(old) == [[1, 0, 1, 0]]
    assert rank0(new) == [[1, 1, 1, 1]]  # logical 0 now lives in slots 2 and 3
    assert new.phy2log.tolist() == [[1, 1, 0, 0]]
    c.set_placement([0, 0, 0, 1])  # 3 replicas of logical 0: the buffers hold any placement of 4 slots
    c.record(0, topk_ids=dev_tensor([[0, 0, 0, 1]]))
    assert rank0(c.collect().wait()) == [[1, 1, 1, 1]]
    with pytest.raises(ValueError, match="2 logical experts, the collector maps 3|logical experts"):
        c.set_placement(Placement.from_phy2log([0, 1, 2, 2], 3))
    with pytest.raises(ValueError, match="physical slots"):
        c.set_placement([0, 1, 0])
    plain = HeatCollector(1, 2)
    assert plain.placement is None and plain.collect().wait().phy2log is None
    plain.set_placement([1, 0])
    assert plain.collect().wait().phy2log.tolist() == [[1, 0]]


def test_v2_arguments_are_validated(streamkit_backend):
    with pytest.raises(ValueError, match="window"):
        HeatCollector(1, 2, window=0)
    with pytest.raises(ValueError, match="reduce.*'gather' or 'sum'"):
        HeatCollector(1, 2, reduce="mean")
    with pytest.raises(TypeError, match="dtype"):
        HeatCollector(1, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="logical expert 1 has no slot in layer 0"):
        HeatCollector(1, 2, log2phy=torch.tensor([[0], [-1]]))
    with pytest.raises(ValueError, match="names a physical slot twice"):
        HeatCollector(1, 2, log2phy=torch.tensor([[0], [0]]))
    c = HeatCollector(1, 4)
    with pytest.raises(ValueError, match="num_tokens.*0-dim"):
        c.record(0, topk_ids=dev_tensor([[0]]), num_tokens=dev_tensor([1]))
    with pytest.raises(TypeError, match="num_tokens.*only applies to topk_ids"):
        c.record(0, dev_tensor([1, 1, 1, 1]), num_tokens=dev_tensor(1))
    with pytest.raises(ValueError, match="num_tokens.*device"):
        c.record(0, topk_ids=dev_tensor([[0]]), num_tokens=torch.tensor(1))
    with pytest.raises(TypeError, match="passes, reset"):
        c.collect(passes=1)


@pytest.mark.streamkit_backends("fake")
def test_out_of_range_logical_ids_raise_on_fake(streamkit_backend):
    c = HeatCollector(1, 3, log2phy=Placement.from_phy2log([0, 1, 0], 2))
    with pytest.raises(ValueError, match=r"logical expert ids must lie in \[-1, 2\)"):
        c.record(0, topk_ids=dev_tensor([[2]]))
    c.record(0, topk_ids=dev_tensor([[0], [9]]), num_tokens=dev_tensor(1))  # the bad row is padding
    assert rank0(c.collect().wait()) == [[1, 0, 0]]


@pytest.mark.streamkit_backends("cuda", "fake")
def test_record_and_step_replay_in_a_graph_with_the_flag_toggled(streamkit_backend):
    """record() + step() captured with sk.graph (CUDAGraph on cuda, recorded kernels on fake), replayed
    with the device flag toggled between replays."""
    c = HeatCollector(2, 4, window=2)
    ids = dev_tensor([[0, 1], [3, 3], [2, -1]])
    n = dev_tensor(2)
    side = sk.Stream()
    side.wait_stream(sk.current_stream())
    with sk.switch(side):  # warm-up outside the capture, on a side stream, as torch.cuda.graphs advises
        c.record(1, topk_ids=ids, num_tokens=n)
    sk.current_stream().wait_stream(side)
    c.reset()
    graph = sk.Graph()
    with sk.graph(graph):
        c.record(1, topk_ids=ids, num_tokens=n)
        c.step()
    c.reset()
    for replay in range(4):
        c.enabled = replay != 3  # changed between replays: the captured kernel reads the device flag
        graph.replay()
    heat = c.collect().wait()
    # the ring of 2: replay 3's pass (disabled: nothing counted), then the empty pass its step opened
    assert heat.passes[:, 1, 0].tolist() == [[0, 0, 0, 0], [0, 0, 0, 0]]
    c.enabled = True
    graph.replay()
    graph.replay()
    heat = c.collect().wait()
    assert heat.passes[:, 1, 0].tolist() == [[1, 1, 0, 2], [0, 0, 0, 0]]  # the last replay's pass, then the new one


_HOST_READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
               "aten.bincount.default", "aten._unique2.default", "aten.unique_dim.default", "aten.item.default"}


def test_the_op_implementations_never_read_device_values_on_the_host():
    """The fake backend sees each op as one kernel and cannot look inside it; this runs the
    implementations on CPU tensors under a dispatch mode: no .item(), no data-dependent shapes (what
    would be a host sync on CUDA/NPU and break graph capture)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from streamkit_eplb import _ops

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func))
            return func(*args, **(kwargs or {}))

    placement = Placement.from_phy2log([0, 1, 2, 0, 1, 0], 3)
    acc = torch.zeros(2, 1, 7, dtype=torch.int32)
    ctrl = torch.tensor([1, 0])
    with Seen() as seen:
        for mode, values in ((_ops.MODE_COUNTS, torch.arange(6)), (_ops.MODE_CUMULATIVE, torch.arange(6).cumsum(0)),
                             (_ops.MODE_IDS, torch.tensor([[0, 5], [-1, 9]])), (_ops.MODE_IDS_MAPPED, torch.tensor([[0, 2], [1, -1]]))):
            log2phy = placement.log2phy if mode == _ops.MODE_IDS_MAPPED else torch.zeros(1, 1, 1, dtype=torch.int64)
            logcnt = placement.logcnt if mode == _ops.MODE_IDS_MAPPED else torch.zeros(1, 1, dtype=torch.int64)
            _ops.record_op(acc, ctrl, values, torch.tensor(1), log2phy, logcnt, 0, mode)
        _ops.step_op(acc, ctrl)
        _ops.take_op(acc, ctrl, torch.zeros(acc.numel(), dtype=torch.int32), True)
        _ops.take_op(acc, ctrl, torch.zeros(acc.numel(), dtype=torch.int32), False)
    assert seen.ops and not (seen.ops & _HOST_READS), seen.ops & _HOST_READS
    # counts + diffed running sum + ids row 0 (num_tokens=1: ids 0, 5) + mapped row 0 (logical 0 -> slot 0, 2 -> slot 2)
    assert acc[0, 0].tolist() == [0 + 0 + 1 + 1, 1 + 1, 2 + 2 + 1, 3 + 3, 4 + 4, 5 + 5 + 1, 0]
    # the ops also run on meta tensors (tracing): shapes never depend on values
    meta = torch.zeros(2, 1, 7, dtype=torch.int32, device="meta")
    torch.ops.streamkit_eplb.record(meta, ctrl.to("meta"), torch.zeros(3, 2, dtype=torch.int64, device="meta"),
                                    torch.zeros((), dtype=torch.int64, device="meta"), log2phy.to("meta"),
                                    logcnt.to("meta"), 0, _ops.MODE_IDS)
