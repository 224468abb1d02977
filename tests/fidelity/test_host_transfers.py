"""Host transfers on the fake device (docs/semantics.md, "The caching allocator and host transfers"
and "Host reads of pinned tensors"): non-blocking copies to pinned host memory, host reads and
writes of pinned buffers, pageable vs pinned memory, pin_memory()/is_pinned(). Each rule has a
racy version (kind "host read"/"host write", the copy's stream, op and line) and an ordered version
(no race; values equal plain CPU torch's)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import streamkit as sk
from _support import marker_line
from streamkit import fake

ORDER = pytest.mark.parametrize("ordered", [False, True], ids=["racy", "ordered"])
VALUES = torch.arange(8.0) * 3  # what the device computes, in plain CPU torch


def _line(marker: str) -> int:
    return marker_line(__file__, marker)


def _session(ordered):
    return fake.session(detect="raise" if ordered else "record")


def _device_values(s):
    x = torch.arange(8.0, device=s.device)
    x.mul_(3)
    return x


def _host_race(s, copy_marker, read_marker, op, stream=None, kind="host read", copy_kind="write"):
    assert len(s.races) == 1, "\n\n".join(map(str, s.races))
    race = s.races[0]
    assert (race.first.kind, race.first.lineno) == (copy_kind, _line(copy_marker)), race
    assert race.first.stream == (stream or sk.default_stream())
    assert race.first.op.startswith(("aten._to_copy", "aten.copy_")), race.first.op
    assert (race.second.kind, race.second.lineno, race.second.op) == (kind, _line(read_marker), op), race
    assert race.second.stream is None and f"{kind} by {op} on the host" in str(race)
    assert ".synchronize()" in race.fix
    return race


# CUDA: x.to("cpu", non_blocking=True) returns pinned memory that the copy fills later; read it only after a sync (TensorConversions.cpp _to_copy pin_out; CUDA semantics notes, "Use pinned memory buffers")
@ORDER
def test_reading_a_non_blocking_copy_before_a_stream_sync(ordered):
    with _session(ordered) as s:
        h = _device_values(s).to("cpu", non_blocking=True)  # <h1-copy>
        if ordered:
            sk.current_stream().synchronize()
        values = h.tolist()  # <h1-read>
    if ordered:
        assert not s.races and values == VALUES.tolist()
        return
    _host_race(s, "h1-copy", "h1-read", "Tensor.tolist")


# CUDA: an event recorded after the copy and event.synchronize() orders the host after it (CUDA Runtime API, cudaEventSynchronize)
@ORDER
def test_indexing_a_non_blocking_copy_before_its_event_is_synchronized(ordered):
    with _session(ordered) as s:
        h = _device_values(s).to("cpu", non_blocking=True)  # <h2-copy>
        done = sk.current_stream().record_event()
        if ordered:
            done.synchronize()
        first = h[1].item()  # <h2-read>
    if ordered:
        assert not s.races and first == VALUES[1].item()
        return
    _host_race(s, "h2-copy", "h2-read", "Tensor.__getitem__")


# CUDA: sk.synchronize() (cudaDeviceSynchronize) orders the host after every stream; printing reads the values
@ORDER
def test_printing_a_non_blocking_copy_before_a_device_sync(ordered):
    with _session(ordered) as s:
        h = _device_values(s).to("cpu", non_blocking=True)  # <h3-copy>
        if ordered:
            sk.synchronize()
        text = repr(h)  # <h3-read>
    if ordered:
        assert not s.races and text == repr(VALUES)
        return
    _host_race(s, "h3-copy", "h3-read", "Tensor.__repr__")


# CUDA: event.query() returning True means the captured work is done (cudaEventQuery); numpy() shares the buffer
@ORDER
def test_numpy_of_a_non_blocking_copy_before_its_event_is_done(ordered):
    with _session(ordered) as s:
        h = _device_values(s).to("cpu", non_blocking=True)  # <h4-copy>
        done = sk.current_stream().record_event()
        if ordered:
            while not done.query():
                pass
        array = h.numpy()  # <h4-read>
    if ordered:
        assert not s.races
        np.testing.assert_array_equal(array, VALUES.numpy())
        return
    _host_race(s, "h4-copy", "h4-read", "Tensor.numpy")


# CUDA: stream.synchronize() waits only for that stream: a copy issued on a side stream needs side.synchronize() (CUDA semantics notes, asynchronous execution)
@ORDER
def test_ops_on_a_copy_made_on_a_side_stream_need_that_stream_synchronized(ordered):
    with _session(ordered) as s:
        side = sk.Stream()
        x = _device_values(s)
        side.wait_stream(sk.current_stream())
        with sk.switch(side):
            h = x.to("cpu", non_blocking=True)  # <h5-copy>
        (side if ordered else sk.current_stream()).synchronize()
        total = h.sum()  # <h5-read>
    if ordered:
        assert not s.races and total.item() == VALUES.sum().item()
        return
    _host_race(s, "h5-copy", "h5-read", "Tensor.sum", stream=side)


# CUDA: a non_blocking copy into a pinned buffer is asynchronous (CUDA Runtime API, "API synchronization behavior": transfers involving pinned memory are fully asynchronous)
@ORDER
def test_a_pinned_buffer_filled_by_copy_non_blocking(ordered):
    with _session(ordered) as s:
        buffer = torch.empty(8).pin_memory()
        buffer.copy_(_device_values(s), non_blocking=True)  # <h6-copy>
        if ordered:
            sk.current_stream().synchronize()
        doubled = buffer * 2  # <h6-read>
    if ordered:
        assert not s.races
        torch.testing.assert_close(doubled, VALUES * 2)
        return
    _host_race(s, "h6-copy", "h6-read", "Tensor.mul")


# CUDA: device to pageable host memory, cudaMemcpyAsync "will return only once the copy has completed" (CUDA Runtime API, "API synchronization behavior"); pinned memory has no such guarantee
@ORDER
def test_a_non_blocking_copy_into_pageable_memory_is_synchronous(ordered):
    with _session(ordered) as s:
        destination = torch.empty(8) if ordered else torch.empty(8).pin_memory()
        before = s.stats.copy()
        destination.copy_(_device_values(s), non_blocking=True)  # <h7-copy>
        syncs = (s.stats - before).blocking_copies
        values = destination.tolist()  # <h7-read>
    if ordered:
        assert not s.races and syncs == 1 and values == VALUES.tolist()
        return
    assert syncs == 0
    _host_race(s, "h7-copy", "h7-read", "Tensor.tolist")


# CUDA: a non_blocking H2D copy from pinned memory DMAs it later: the host must not overwrite the source before the copy is done (CUDA semantics notes, "Use pinned memory buffers")
@ORDER
def test_writing_a_pinned_source_while_its_copy_may_run(ordered):
    with _session(ordered) as s:
        source = (torch.arange(8.0) * 3).pin_memory()
        x = source.to(s.device, non_blocking=True)  # <h8-copy>
        if ordered:
            sk.current_stream().synchronize()
        source.fill_(-1)  # <h8-write>
        values = x.cpu()
    if ordered:
        assert not s.races
        torch.testing.assert_close(values, VALUES)
        return
    _host_race(s, "h8-copy", "h8-write", "Tensor.fill_", kind="host write", copy_kind="read")


# CUDA: from pageable memory the source is staged before cudaMemcpyAsync returns, so the host may reuse it at once (CUDA Runtime API, "API synchronization behavior"); a pinned source may not be
@ORDER
def test_a_pageable_source_may_be_reused_at_once(ordered):
    with _session(ordered) as s:
        source = torch.arange(8.0) * 3
        if not ordered:
            source = source.pin_memory()
        x = torch.empty(8, device=s.device)
        x.copy_(source, non_blocking=True)  # <h9-copy>
        source[0] = 100.0  # <h9-write>
        values = x.cpu()
    if ordered:
        assert not s.races
        torch.testing.assert_close(values, VALUES)
        return
    _host_race(s, "h9-copy", "h9-write", "Tensor.__setitem__", kind="host write", copy_kind="read")


# CUDA: stream.wait_event(e) orders device work, not the host (cudaStreamWaitEvent); only e.synchronize() (cudaEventSynchronize) makes the host wait
@ORDER
def test_a_stream_wait_does_not_order_host_reads(ordered):
    with _session(ordered) as s:
        h = _device_values(s).to("cpu", non_blocking=True)  # <h11-copy>
        done = sk.current_stream().record_event()
        if ordered:
            done.synchronize()
        else:
            sk.Stream().wait_event(done)
        values = h.clone()  # <h11-read>
    if ordered:
        assert not s.races
        torch.testing.assert_close(values, VALUES)
        return
    _host_race(s, "h11-copy", "h11-read", "Tensor.clone")


def test_pin_memory_and_is_pinned_match_cuda():
    with fake.session() as s:
        x = _device_values(s)
        pinned = torch.arange(4.0).pin_memory()
        assert pinned.is_pinned() and not torch.arange(4.0).is_pinned()
        assert pinned.pin_memory() is pinned
        staged = x.to("cpu", non_blocking=True)
        assert staged.is_pinned() and staged.device.type == "cpu"
        assert not x.cpu().is_pinned() and not x.to("cpu").is_pinned()
        sk.synchronize()
        assert not (staged + 1).is_pinned()  # results of ops are ordinary host tensors
        assert staged.shape == (8,) and staged.dtype == torch.float32  # metadata: no host read
        torch.testing.assert_close(staged, VALUES)
        assert repr(staged) == repr(VALUES) and not s.races


def test_a_host_read_in_raise_mode_raises_before_it_reads():
    with fake.session(detect="raise") as s:
        h = _device_values(s).to("cpu", non_blocking=True)
        with pytest.raises(sk.RaceError) as info:
            h.add_(1)  # <h10-write>
        assert info.value.race.second.kind == "host write"
        assert info.value.race.second.lineno == _line("h10-write")
        sk.synchronize()
        assert h.tolist() == VALUES.tolist()  # the refused add_ never ran
