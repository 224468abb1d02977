"""The caching allocator on the fake device (docs/semantics.md, "The caching allocator and host
transfers"): per-stream pools, recycled blocks, record_stream, resize_ and out= growth, and stream
priorities. Each rule has a racy version (the race's kinds, streams, ops and lines) and an ordered
version (no race; values equal plain CPU torch's)."""

from __future__ import annotations

import pytest
import torch

import streamkit as sk
from _support import marker_line
from streamkit import fake

N = 256  # float32: 1024 bytes, size class 2 (of 512 bytes)
ORDER = pytest.mark.parametrize("ordered", [False, True], ids=["racy", "ordered"])


def _line(marker: str) -> int:
    return marker_line(__file__, marker)


def _only_race(s):
    assert len(s.races) == 1, "\n\n".join(map(str, s.races))
    return s.races[0]


def _is(access, kind, stream, marker, op=None):
    assert (access.kind, access.stream, access.lineno) == (kind, stream, _line(marker)), access
    if op is not None:
        assert access.op.startswith(op), access.op


def _session(ordered):
    return fake.session(detect="raise" if ordered else "record")


# CUDA: a freed block goes to the next allocation on its stream, with no sync (CUDACachingAllocator.cpp header: "Once freed, blocks can be re-allocated on the same stream")
@ORDER
def test_recycled_block_written_on_another_stream(ordered):
    with _session(ordered) as s:
        side = sk.Stream()
        x = torch.ones(N, device=s.device)  # <a1-old-alloc>
        x.mul_(2)  # <a1-old-use>
        del x
        y = torch.empty(N, device=s.device)  # <a1-new-alloc>
        if ordered:
            side.wait_stream(sk.current_stream())
        with sk.switch(side):
            y.fill_(3)  # <a1-new-use>
        sk.current_stream().wait_stream(side)
        out = (y + 1).cpu()
    if ordered:
        assert not s.races
        torch.testing.assert_close(out, torch.full((N,), 3.0) + 1)
        return
    race = _only_race(s)
    _is(race.first, "write", sk.default_stream(), "a1-old-use", "aten.mul_")
    _is(race.second, "write", side, "a1-new-use", "aten.fill_")
    text = str(race)
    # both tensors: the new one in the header, the old one on the "recycled" line
    assert f"allocated at test_allocator.py:{_line('a1-new-alloc')} on the default stream" in text
    assert f"a tensor of shape ({N},), dtype torch.float32 (allocated at test_allocator.py:{_line('a1-old-alloc')}" in text
    assert race.tensor.previous and "recycled" in text


# CUDA: frees and allocations are "usages" of the block on its stream, like kernel launches (CUDACachingAllocator.cpp header); a last read there still orders before reuse only on that stream
@ORDER
def test_empty_like_reuses_a_block_last_read_on_its_stream(ordered):
    with _session(ordered) as s:
        side = sk.Stream()
        template = torch.zeros(N, device=s.device)
        x = torch.arange(float(N), device=s.device)
        source = template + 5
        side.wait_stream(sk.current_stream())  # side is ordered after x's write, not after its read:
        total = x.sum()  # <a2-old-read>
        del x
        y = torch.empty_like(template)
        if ordered:
            side.wait_stream(sk.current_stream())
        with sk.switch(side):
            y.copy_(source)  # <a2-new-write>
        sk.current_stream().wait_stream(side)
        out = (y.cpu(), total.item())
    if ordered:
        assert not s.races
        torch.testing.assert_close(out[0], torch.zeros(N) + 5)
        assert out[1] == torch.arange(float(N)).sum().item()
        return
    race = _only_race(s)
    _is(race.first, "read", sk.default_stream(), "a2-old-read", "aten.sum")
    _is(race.second, "write", side, "a2-new-write", "aten.copy_")


# CUDA: a block freed on one stream is never re-allocated on another (CUDACachingAllocator.cpp header: "but not on any other stream")
@ORDER
def test_a_block_is_only_recycled_on_its_own_stream(ordered):
    with _session(ordered) as s:
        side = sk.Stream()
        one = torch.ones(1, device=s.device)  # (made before the free: a request after it would take the block's front)
        x = torch.ones(N, device=s.device)
        x.add_(1)  # <a3-old-use>
        del x
        if ordered:  # allocated on side: a new block, nothing to wait for
            with sk.switch(side):
                y = one.new_empty(N)
        else:
            y = one.new_empty(N)  # on the default stream: the freed block
        with sk.switch(side):
            y.fill_(7)  # <a3-new-use>
            out = y.cpu()
    if ordered:
        assert not s.races
        torch.testing.assert_close(out, torch.full((N,), 7.0))
        return
    race = _only_race(s)
    _is(race.first, "write", sk.default_stream(), "a3-old-use", "aten.add_")
    _is(race.second, "write", side, "a3-new-use", "aten.fill_")


# CUDA: sizes are rounded up to 512 bytes and a cached block serves a request of its size (CUDACachingAllocator.cpp, round_size / kMinBlockSize, get_free_block)
@ORDER
def test_only_a_block_of_the_same_size_class_is_recycled(ordered):
    with _session(ordered) as s:
        side = sk.Stream()
        x = torch.ones(100, device=s.device)  # 400 bytes: one 512-byte block
        x.neg_()  # <a4-old-use>
        del x
        y = torch.empty(1000 if ordered else 120, device=s.device)  # 4000 bytes: another class; 480: the same
        with sk.switch(side):
            y.fill_(2)  # <a4-new-use>
            out = y.sum().cpu()
    if ordered:
        assert not s.races
        assert out.item() == torch.full((1000,), 2.0).sum().item()
        return
    race = _only_race(s)
    _is(race.first, "write", sk.default_stream(), "a4-old-use", "aten.neg_")
    _is(race.second, "write", side, "a4-new-use", "aten.fill_")


# CUDA: recordStream "will ensure that the block is not reused before each recordStream call's stream completes its work" (CUDACachingAllocator.cpp header); without it the free is unsafe
@ORDER
def test_record_stream_keeps_a_block_used_on_another_stream(ordered):
    with _session(ordered) as s:
        side = sk.Stream()
        x = torch.arange(float(N), device=s.device)
        side.wait_stream(sk.current_stream())
        with sk.switch(side):
            doubled = x * 2  # <a5-side-read>
        if ordered:
            sk.record_stream(x, side)
        del x  # <a5-free>
        y = torch.empty(N, device=s.device)  # not the recorded block: side may still read it
        with sk.switch(side):
            y.fill_(1)
            out = (y + doubled).cpu()
    if ordered:
        assert not s.races
        torch.testing.assert_close(out, torch.arange(float(N)) * 2 + 1)
        return
    race = _only_race(s)
    _is(race.first, "read", side, "a5-side-read", "aten.mul")
    _is(race.second, "free", sk.default_stream(), "a5-free")


# CUDA: a record_stream'd block is reused once its streams' work is done; later users on other streams must still wait for the allocating stream (CUDACachingAllocator.cpp, insert_events / process_events)
@ORDER
def test_a_record_stream_block_reused_after_the_wait_keeps_its_history(ordered):
    with _session(ordered) as s:
        side, other = sk.Stream(), sk.Stream()
        x = torch.zeros(N, device=s.device)
        side.wait_stream(sk.current_stream())
        with sk.switch(side):
            x.add_(4)  # <a6-side-write>
        sk.record_stream(x, side)
        del x
        sk.current_stream().wait_stream(side)  # side's work is ordered before the next allocation
        y = torch.empty(N, device=s.device)  # recycled, with side's write in its history
        if ordered:
            other.wait_stream(sk.current_stream())
        with sk.switch(other):
            y.fill_(9)  # <a6-new-use>
        sk.current_stream().wait_stream(other)
        out = y.cpu()
    if ordered:
        assert not s.races
        torch.testing.assert_close(out, torch.full((N,), 9.0))
        return
    race = _only_race(s)
    _is(race.first, "write", side, "a6-side-write", "aten.add_")
    _is(race.second, "write", other, "a6-new-use", "aten.fill_")


# CUDA: x.resize_(bigger) allocates on the current stream and copies the old bytes there (aten/src/ATen/native/cuda/Resize.cpp, resize_bytes_cuda)
@ORDER
def test_resize_growth_is_a_copy_on_the_current_stream(ordered):
    with _session(ordered) as s:
        side = sk.Stream()
        x = torch.arange(4.0, device=s.device)
        x.resize_(8)  # <a8-resize>
        x[4:].fill_(0)
        if ordered:
            side.wait_stream(sk.current_stream())
        with sk.switch(side):
            head = x[:4].sum()  # <a8-side-read>
        sk.current_stream().wait_stream(side)
        out = (x.cpu(), head.item())
    if ordered:
        assert not s.races
        cpu = torch.arange(4.0)
        cpu.resize_(8)
        cpu[4:].fill_(0)
        torch.testing.assert_close(out[0], cpu)
        assert out[1] == cpu[:4].sum().item()
        return
    race = _only_race(s)
    _is(race.first, "write", sk.default_stream(), "a8-resize", "aten.resize_")
    _is(race.second, "read", side, "a8-side-read", "aten.sum")


# CUDA: resize_ frees the old block to its own stream's pool at once, while the copy on the current stream may still read it (Resize.cpp: set_data_ptr_noswap after cudaMemcpyAsync)
@ORDER
def test_resize_on_another_stream_frees_the_old_block_early(ordered):
    with _session(ordered) as s:
        side = sk.Stream()
        x = torch.arange(4.0, device=s.device)
        side.wait_stream(sk.current_stream())
        if ordered:
            sk.record_stream(x, side)  # the old block waits for side's copy
        with sk.switch(side):
            x.resize_(6)  # <a9-resize>
            x[4:].fill_(1)
            out = x.cpu()
    if ordered:
        assert not s.races
        torch.testing.assert_close(out, torch.tensor([0.0, 1.0, 2.0, 3.0, 1.0, 1.0]))
        return
    race = _only_race(s)
    _is(race.first, "read", side, "a9-resize", "aten.resize_")
    _is(race.second, "free", sk.default_stream(), "a9-resize")


# CUDA: an op that grows its out= tensor resizes it on the current stream, so the memory then belongs to that stream (aten/src/ATen/native/Resize.cpp, resize_output)
@ORDER
def test_out_resized_on_a_side_stream_belongs_to_it(ordered):
    with _session(ordered) as s:
        side = sk.Stream()
        a = torch.arange(6.0, device=s.device)
        out = torch.empty(0, device=s.device)
        side.wait_stream(sk.current_stream())
        with sk.switch(side):
            torch.mul(a, 3, out=out)
        sk.current_stream().wait_stream(side)
        total = out.sum()  # <a10-read>
        if ordered:
            sk.record_stream(out, sk.default_stream())
        del out  # <a10-free>
        value = total.item()
    if ordered:
        assert not s.races
        assert value == (torch.arange(6.0) * 3).sum().item()
        return
    race = _only_race(s)
    _is(race.first, "read", sk.default_stream(), "a10-read", "aten.sum")
    _is(race.second, "free", side, "a10-free")


# CUDA: a stream's priority only changes scheduling: a high-priority stream is as unordered with others as any stream (CUDA Runtime API, cudaStreamCreateWithPriority)
@ORDER
def test_a_high_priority_stream_is_not_ordered_with_the_default_stream(ordered):
    with _session(ordered) as s:
        urgent = sk.Stream(priority=-5)
        x = torch.ones(N, device=s.device)
        x.mul_(5)  # <a11-write>
        if ordered:
            urgent.wait_stream(sk.current_stream())
        with sk.switch(urgent):
            y = x + 1  # <a11-read>
        sk.current_stream().wait_stream(urgent)
        out = y.cpu()
    if ordered:
        assert not s.races
        torch.testing.assert_close(out, torch.ones(N) * 5 + 1)
        return
    race = _only_race(s)
    _is(race.first, "write", sk.default_stream(), "a11-write", "aten.mul_")
    _is(race.second, "read", urgent, "a11-read", "aten.add")


# CUDA: an event captures only the work issued before its record (cudaEventRecord / cudaStreamWaitEvent); a stale event doesn't order a recycled block's last use
@ORDER
def test_a_recycled_block_needs_an_event_recorded_after_its_last_use(ordered):
    with _session(ordered) as s:
        side = sk.Stream()
        x = torch.ones(N, device=s.device)
        stale = sk.current_stream().record_event()
        x.mul_(4)  # <a12-old-use>
        del x
        y = torch.empty(N, device=s.device)
        side.wait_event(sk.current_stream().record_event() if ordered else stale)
        with sk.switch(side):
            y.fill_(6)  # <a12-new-use>
        sk.current_stream().wait_stream(side)
        out = y.cpu()
    if ordered:
        assert not s.races
        torch.testing.assert_close(out, torch.full((N,), 6.0))
        return
    race = _only_race(s)
    _is(race.first, "write", sk.default_stream(), "a12-old-use", "aten.mul_")
    _is(race.second, "write", side, "a12-new-use", "aten.fill_")
