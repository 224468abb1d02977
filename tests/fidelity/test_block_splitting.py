"""CUDA's caching allocator splits cached blocks (docs/semantics.md, "The caching allocator and host
transfers"): a smaller request on the stream takes the front of a bigger freed block of its pool
(small: <= 1 MiB, large: the rest), inheriting the history of those bytes; the remainder stays
cached when it is worth it (small pool: >= 512 bytes; large pool: > 1 MiB)."""

from __future__ import annotations

import torch

import streamkit as sk
from _support import marker_line
from _programs import assert_matches_cpu, races_of
from streamkit._backends.fake import _blocks

KIB, MIB = 1024, 1 << 20


# CUDA: round_size (multiples of kMinBlockSize = 512), get_pool (<= kSmallSize = 1 MiB: small), get_free_block (best fit: lower_bound by stream and size), should_split (small: remaining >= kMinBlockSize; large: remaining > kSmallSize), get_allocation_size (2 MiB / 20 MiB / rounded to 2 MiB segments) (c10/cuda/CUDACachingAllocator.cpp)
def test_the_size_rules_are_cudas():
    assert [_blocks.round_size(n) for n in (1, 512, 513, 4000)] == [512, 512, 1024, 4096]
    assert _blocks.is_small(MIB) and not _blocks.is_small(MIB + 1)
    assert [_blocks.segment_size(n) for n in (KIB, 3 * MIB, 11 * MIB)] == [2 * MIB, 20 * MIB, 12 * MIB]
    assert _blocks.fits(4 * KIB, KIB) and not _blocks.fits(KIB, 4 * KIB) and not _blocks.fits(4 * MIB, KIB)
    assert _blocks.should_split(4 * KIB, KIB) and not _blocks.should_split(KIB + 512, KIB + 1)
    assert not _blocks.should_split(3 * MIB, 2 * MIB + 512 * KIB) and _blocks.should_split(6 * MIB, 2 * MIB)
    assert _blocks.best_fit([8 * KIB, 2 * KIB, 4 * KIB, 2 * KIB], KIB) == 1  # smallest fitting, first among equals
    assert _blocks.best_fit([4 * MIB, 512], 2 * KIB) is None
    assert _blocks.handed_over(4 * KIB, KIB) == KIB and _blocks.handed_over(3 * MIB, 2 * MIB + 1) == 3 * MIB


def _reuse(device, old_numel, new_numel, ordered, keep=None):
    side = sk.Stream()
    x = torch.ones(old_numel, device=device)
    x.add_(1)  # <old-use>
    del x
    y = torch.empty(new_numel, device=device)  # the front of the freed block (same stream)
    if ordered:
        side.wait_stream(sk.current_stream())
    with sk.switch(side):
        y.fill_(3.0)  # <new-use>
        total = y.sum()
    sk.current_stream().wait_stream(side)
    return total


# CUDA: a 1 KiB request on the stream takes the front of a freed 4 KiB block (small pool, split: the 3 KiB remainder stays cached) with no sync: another stream's use of it races with the old tensor's last use (CUDACachingAllocator.cpp get_free_block, should_split)
def test_a_smaller_allocation_takes_the_front_of_a_freed_block():
    total = assert_matches_cpu(lambda d: _reuse(d, KIB, 256, ordered=True))
    assert total.item() == 3.0 * 256
    races = races_of(lambda d: _reuse(d, KIB, 256, ordered=False))  # 4 KiB freed, 1 KiB taken
    assert [(r.first.lineno, r.second.lineno) for r in races] == [(marker_line(__file__, "old-use"), marker_line(__file__, "new-use"))]
    assert "recycled" in str(races[0])


# CUDA: small and large pools never share blocks (get_pool: size <= kSmallSize), so a 1 KiB request never gets a freed 4 MiB block
def test_a_small_request_never_takes_a_large_block():
    assert races_of(lambda d: _reuse(d, MIB, 256, ordered=False)) == []


# CUDA: in the large pool a block is split only if more than 1 MiB remains (should_split): a 2.5 MiB request takes a whole freed 3 MiB block; a 2 MiB request takes the front of a freed 6 MiB block and the 4 MiB remainder serves the next request, history and all
def test_large_blocks_split_only_with_more_than_a_mib_left():
    assert len(races_of(lambda d: _reuse(d, 3 * MIB // 4, 5 * MIB // 8, ordered=False))) == 1

    def remainder(device, ordered):
        side = sk.Stream()
        x = torch.ones(6 * MIB // 4, device=device)
        x.add_(1)  # <big-use>
        del x
        front = torch.empty(2 * MIB // 4, device=device)  # the front 2 MiB
        back = torch.empty(4 * MIB // 4, device=device)  # the 4 MiB remainder
        if ordered:
            side.wait_stream(sk.current_stream())
        with sk.switch(side):
            back.fill_(1.0)  # <back-use>
        sk.current_stream().wait_stream(side)
        return back.sum(), front.numel()

    assert assert_matches_cpu(lambda d: remainder(d, True), seeds=(0,))[0].item() == float(MIB)
    races = races_of(lambda d: remainder(d, False))
    assert [(r.first.lineno, r.second.lineno) for r in races] == [(marker_line(__file__, "big-use"), marker_line(__file__, "back-use"))]
