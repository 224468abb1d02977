"""Race reports: what a person reads."""

import pytest
import torch

import streamkit as sk
from streamkit import fake


def racy_program(s):
    side = sk.Stream()
    x = torch.zeros(8, device=s.device)
    x.add_(1)  # the write
    with sk.switch(side):
        y = x * 2  # the read
    return side, x, y


def test_report_names_both_accesses_the_tensor_and_the_fix():
    with fake.session(detect="record") as s:
        side, x, _ = racy_program(s)
        default = sk.default_stream()
        (race,) = s.races
    text = str(race)
    del x
    assert race.first.kind == "write" and race.first.op == "aten.add_.Tensor"
    assert race.second.kind == "read" and race.second.op == "aten.mul.Tensor"
    assert race.first.stream == default
    assert race.second.stream == side
    assert race.first.location.startswith("test_report.py:") and race.first.lineno != race.second.lineno
    assert race.first.location in text and race.second.location in text
    assert "x.add_(1)" in text and "y = x * 2" in text
    assert "shape (8,)" in text and "torch.float32" in text
    assert race.tensor.allocated_at.startswith("test_report.py:")
    assert "side.wait_stream(sk.default_stream())" in race.fix and "stream #1 'side'" in text


def test_raise_mode_raises_at_the_second_access_before_it_runs():
    with fake.session(detect="raise") as s:
        side = sk.Stream()
        x = torch.zeros(4, device=s.device)
        with sk.switch(side):
            with pytest.raises(sk.RaceError) as info:
                x.add_(5)
        assert info.value.race.second.op == "aten.add_.Tensor"
        assert str(info.value) == str(info.value.race)
        side.wait_stream(sk.default_stream())
        with sk.switch(side):
            assert x.sum().item() == 0  # the racing kernel never ran


def test_record_mode_reports_each_distinct_race_once():
    with fake.session(detect="record") as s:
        side = sk.Stream()
        x = torch.zeros(4, device=s.device)
        for _ in range(5):
            x.add_(1)
            with sk.switch(side):
                x.mul(2)
    # read-after-write (side reads the default stream's add_) and write-after-read (the next add_
    # overwrites what side may still be reading): two races, each reported once
    assert [(r.first.kind, r.second.kind) for r in s.races] == [("write", "read"), ("read", "write")]


@pytest.mark.eager_only("reads a side-stream result without a join wait: only eager has it computed")
def test_off_mode_tracks_nothing_but_still_computes():
    with fake.session(detect="off") as s:
        side = sk.Stream()
        x = torch.zeros(4, device=s.device)
        x.add_(1)
        with sk.switch(side):
            y = x * 2
        assert y.tolist() == [2.0] * 4
    assert s.races == [] and s.stats.kernels > 0


def test_freeing_memory_still_in_use_by_another_stream_is_reported():
    with fake.session(detect="record") as s:
        side, x, y = racy_program(s)
        del x  # the allocator may hand x's memory to the default stream while side may still read it
        kinds = [(r.first.kind, r.second.kind) for r in s.races]
        assert kinds == [("write", "read"), ("read", "free")]
        free = s.races[1]
        assert free.second.location.startswith("test_report.py:")
        assert "sk.record_stream(tensor, side)" in free.fix
        assert free.tensor.shape == (8,) and free.tensor.dtype == torch.float32


def test_record_stream_makes_the_free_safe():
    with fake.session(detect="raise") as s:
        side = sk.Stream()
        x = torch.zeros(8, device=s.device)
        side.wait_stream(sk.current_stream())
        with sk.switch(side):
            y = x * 2
        sk.record_stream(x, side)
        del x
        assert s.races == []
        side.synchronize()
        assert y.sum().item() == 0


def test_free_race_raises_at_the_next_operation_in_raise_mode():
    with pytest.raises(sk.RaceError, match="free"):
        with fake.session(detect="raise") as s:
            side = sk.Stream()
            x = torch.zeros(8, device=s.device)
            side.wait_stream(sk.current_stream())
            with sk.switch(side):
                x.mul(2)
            del x
            torch.ones(1, device=s.device)  # the pending race surfaces here


def test_a_kernel_that_raised_leaves_no_access_behind():
    with fake.session(detect="raise") as s:
        side = sk.Stream()
        a = torch.ones(4, device=s.device)
        b = torch.ones(4, device=s.device)
        side.wait_stream(sk.current_stream())
        b.mul_(3)
        with sk.switch(side):
            with pytest.raises(sk.RaceError):
                torch.cat([a, b])  # a is checked (fine), b races: the cat never runs
        assert a.sk_state.reads == [] or all(r[2] != side._handle.idx for r in a.sk_state.reads)
        del a  # no free race: side never touched a
    assert s.races[1:] == []


def test_allocations_like_another_tensor_read_nothing_of_it():
    with fake.session(detect="raise") as s:
        x = torch.zeros(4, dtype=torch.int64, device=s.device)
        x.add_(1)  # written on the default stream
        side = sk.Stream()
        before = s.stats.copy()
        with sk.switch(side):
            a = torch.empty_like(x)  # only x's metadata: no read, no kernel
            b = x.new_empty((2, 3))
        assert (s.stats - before).kernels == 0
        assert a.shape == x.shape and a.device == s.device and b.shape == (2, 3)
        assert s.races == []
        side.synchronize()


def test_captured_sites_resolve_to_the_lines_the_frames_were_on():
    import sys

    from streamkit._backends.fake._sites import capture_site, user_stack

    def inner():
        return (
            capture_site(sys._getframe(0)),
            sys._getframe(0).f_lineno,
        )

    site, expected_inner = inner(); expected_outer = sys._getframe(0).f_lineno
    stack = user_stack(site)
    assert [frame.lineno for frame in stack[-2:]] == [expected_outer, expected_inner - 1]
    assert stack[-1].name == "inner" and stack[-2].name == "test_captured_sites_resolve_to_the_lines_the_frames_were_on"
