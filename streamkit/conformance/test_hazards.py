"""Hazards: what the fake backend reports as a race is wrong on a real device.

On ``cuda`` the producing or consuming stream is held back with ``torch.cuda._sleep`` (a kernel that
spins for a number of clock cycles), so an unordered access runs in the wrong order and the test
observes the stale or overwritten data; the same program with the missing wait gets the right data.
On ``fake`` the unordered program raises :class:`~streamkit.RaceError` instead. ``npu`` has no
sleep kernel: the hazard rules are ``cuda``/``fake`` only, the ordered ones run everywhere.
"""

from __future__ import annotations

import pytest
import torch

import streamkit as sk

# ~0.1 s of spinning at 2 GHz: far longer than issuing the rest of a test's kernels
SLEEP_CYCLES = 200_000_000
N = 1 << 20


def _on_fake(backend: sk.Backend) -> bool:
    """The backend's device is the fake device (``fake``, or ``cuda``/``npu`` over the fake device's
    emulated modules): the race detector reports the hazard instead of letting it happen."""
    if backend.name == "fake":
        return True
    from streamkit._backends.fake import FakeDeviceTensor

    return type(torch.empty(0, device=sk.device())) is FakeDeviceTensor


def _hold(backend: sk.Backend) -> None:
    """Keep the current stream busy for a while (cuda); nothing elsewhere."""
    if backend.name == "cuda":
        torch.cuda._sleep(SLEEP_CYCLES)


@pytest.mark.streamkit_backends("cuda", "fake")
def test_unordered_read_sees_stale_data(streamkit_backend):
    side = sk.Stream()
    x = torch.zeros(N, device=sk.device())
    sk.synchronize()
    _hold(streamkit_backend)
    x.fill_(1.0)  # the default stream writes x, after the hold
    if _on_fake(streamkit_backend):
        with pytest.raises(sk.RaceError), sk.switch(side):
            x.clone()  # no wait: a race
        return
    with sk.switch(side):
        y = x.clone()  # no wait: on a real device this runs while the default stream still spins
    sk.synchronize()
    assert y.sum().item() == 0.0, "the side stream waited for the default stream without being told to"


def test_wait_stream_orders_after_a_slow_producer(streamkit_backend):
    side = sk.Stream()
    x = torch.zeros(N, device=sk.device())
    sk.synchronize()
    _hold(streamkit_backend)
    x.fill_(1.0)
    side.wait_stream(sk.current_stream())
    with sk.switch(side):
        y = x.clone()
    sk.synchronize()
    assert y.sum().item() == float(N)


@pytest.mark.streamkit_backends("cuda", "fake")
def test_free_without_record_stream_lets_the_allocator_reuse_memory(streamkit_backend):
    side = sk.Stream()
    x = torch.ones(N, device=sk.device())
    side.wait_stream(sk.current_stream())
    if _on_fake(streamkit_backend):
        with pytest.raises(sk.RaceError):
            with sk.switch(side):
                y = x * 1  # side reads x
            del x  # last reference dropped on the default stream: side's read is unordered with reuse
            torch.empty(N, device=sk.device()).fill_(7.0)
        return
    ptr = x.data_ptr()
    with sk.switch(side):
        # y is allocated before the hold: a cudaMalloc issued while the side stream spins would stop
        # the default stream's fill from running concurrently with it (CUDA C++ Programming Guide,
        # "Implicit Synchronization": a device memory allocation issued between two commands of
        # different streams keeps them from running concurrently), hiding the hazard.
        y = torch.empty(N, device=sk.device())
        _hold(streamkit_backend)
        torch.mul(x, 1, out=y)  # runs after the hold
    del x  # no record_stream: the block may go to the next allocation on the default stream at once
    z = torch.empty(N, device=sk.device())
    if z.data_ptr() != ptr:
        pytest.skip("the caching allocator gave the new tensor another block; the hazard did not arise")
    z.fill_(7.0)
    sk.synchronize()
    if y.max().item() == 1.0:
        # Seen on an H200 (torch 2.11, CUDA 13) in two runs, before and after moving y's allocation
        # out of the hold: the default stream's fill of the reused block ran after the side stream's
        # delayed read. The allocator did reuse the block (same pointer); what ordered the fill after
        # the hold was not established. The hazard is a possibility CUDA allows, not a certainty.
        pytest.xfail("the reused block's new data was written after the side stream's read on this device")
    assert y.max().item() == 7.0 and y.min().item() == 7.0, "the side stream read a mix of old and new data"


def test_record_stream_keeps_memory_until_the_side_stream_is_done(streamkit_backend):
    side = sk.Stream()
    x = torch.ones(N, device=sk.device())
    side.wait_stream(sk.current_stream())
    with sk.switch(side):
        _hold(streamkit_backend)
        y = x * 1
    sk.record_stream(x, side)
    del x
    z = torch.empty(N, device=sk.device())
    z.fill_(7.0)
    sk.synchronize()
    assert y.max().item() == 1.0 and y.min().item() == 1.0
