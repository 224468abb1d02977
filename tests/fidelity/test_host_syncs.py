"""Ops that synchronize the host partway through (docs/semantics.md, "Ops that synchronize the
host"): the part after the sync reads its inputs again, unsynchronized; what the current stream
did before the sync is finished for everyone. Boolean-mask indexing and indexing with a CPU index
tensor are host syncs too."""

from __future__ import annotations

import pytest
import torch

import streamkit as sk
from streamkit import fake
from _support import marker_line
from _programs import assert_matches_cpu, races_of


def _side(device):
    side = sk.Stream()
    side.wait_stream(sk.current_stream())
    return side


# CUDA: nonzero counts (cub::DeviceReduce::Sum), memcpy_and_sync, then cub::DeviceSelect::Flagged reads self again (aten/src/ATen/native/cuda/Nonzero.cu)
def test_nonzero_reads_its_input_again_after_its_sync():
    def program(device, ordered=True):
        m = torch.tensor([0, 1, 0, 1, 1], device=device)
        side = _side(device)
        with sk.switch(side):
            where = torch.nonzero(m)  # <nonzero>
        if ordered:
            sk.current_stream().wait_stream(side)
        m.fill_(0)  # <nonzero-overwrite>
        sk.current_stream().wait_stream(side)
        return where, m

    where, _ = assert_matches_cpu(program)
    assert where.flatten().tolist() == [1, 3, 4]
    races = races_of(lambda d: program(d, ordered=False))
    assert [(r.first.op, r.first.kind, r.first.lineno, r.second.kind, r.second.lineno) for r in races] == [
        ("aten.nonzero.default", "read", marker_line(__file__, "nonzero"), "write", marker_line(__file__, "nonzero-overwrite"))
    ]


# CUDA: the host sync orders everything the stream did before it: a write before nonzero, then a read by any stream after the call (Nonzero.cu memcpy_and_sync)
def test_work_before_the_sync_is_finished_for_every_stream():
    def program(device):
        m = torch.zeros(4, device=device)
        side = sk.Stream()  # made before: only the host orders it after the fill
        m[2:].fill_(1.0)
        count = torch.nonzero(m).shape[0]
        with sk.switch(side):
            total = m.sum()  # reads what the fill wrote: finished at the sync
        sk.current_stream().wait_stream(side)
        return count, total

    count, total = assert_matches_cpu(program)
    assert count == 2 and total.item() == 2.0


# CUDA: bincount syncs on self.max().item(), then the histogram kernel reads self and the weights (aten/src/ATen/native/cuda/SummaryOps.cu _bincount_cuda_template)
def test_bincount_reads_the_weights_after_its_sync():
    def program(device, ordered=True):
        idx = torch.tensor([1, 1, 3], device=device)
        w = torch.tensor([0.5, 1.0, 2.0], device=device)
        side = _side(device)
        with sk.switch(side):
            counts = torch.bincount(idx, weights=w)  # <bincount>
        if ordered:
            sk.current_stream().wait_stream(side)
        w.fill_(100.0)  # <weights-overwrite>
        sk.current_stream().wait_stream(side)
        return counts

    counts = assert_matches_cpu(program)
    assert counts.tolist() == [0.0, 1.5, 0.0, 2.0]
    races = races_of(lambda d: program(d, ordered=False))
    assert [(r.first.op, r.first.lineno, r.second.lineno) for r in races] == [
        ("aten.bincount.default", marker_line(__file__, "bincount"), marker_line(__file__, "weights-overwrite"))
    ]


# CUDA: x[mask] and masked_select call nonzero(mask) (a host sync with the current stream), then the index kernel reads x (aten/src/ATen/native/IndexingUtils.h expandTensors; cuda/IndexKernel.cu masked_select_out_cuda_impl)
def test_mask_indexing_finishes_the_mask_and_reads_the_source_after_the_sync():
    def program(device, ordered=True):
        x = torch.arange(6.0, device=device)
        mask = x > 2
        picked = x[mask]
        selected = torch.masked_select(x, mask)
        side = sk.Stream()  # made after: it needs no wait for what the syncs finished
        with sk.switch(side):
            mask.fill_(False)  # the mask reads finished at the syncs: ordered
        if not ordered:
            with sk.switch(side):
                again = x[mask]  # <mask-index>
            x.add_(1)  # <mask-source-write>
        sk.current_stream().wait_stream(side)
        return picked, selected, mask

    picked, selected, mask = assert_matches_cpu(program)
    assert picked.tolist() == selected.tolist() == [3.0, 4.0, 5.0] and not mask.any()
    races = races_of(lambda d: program(d, ordered=False))
    assert [(r.first.op, r.first.kind, r.first.lineno, r.second.lineno) for r in races] == [
        ("aten.index.Tensor", "read", marker_line(__file__, "mask-index"), marker_line(__file__, "mask-source-write"))
    ]


# CUDA: indexing with a CPU index tensor copies it to the device with a blocking copy (a host sync) at the call; later host writes to the index don't reach the kernel (aten/src/ATen/native/TensorAdvancedIndexing.cpp make_info: indices[i].to(self.device()))
def test_cpu_index_tensor_is_copied_with_a_host_sync_at_the_call():
    def program(device, ordered=True):
        x = torch.arange(6.0, device=device)
        idx = torch.tensor([4, 0])
        x.mul_(2)
        picked = x[idx]  # <cpu-index>
        idx.fill_(5)  # the device copy was made at the call
        side = sk.Stream()
        with sk.switch(side):
            if ordered:
                y = x * 1  # x.mul_ finished at the sync: ordered
            else:
                x.zero_()  # <cpu-index-write>
        sk.current_stream().wait_stream(side)
        return picked, idx

    picked, idx = assert_matches_cpu(program)
    assert picked.tolist() == [8.0, 0.0]
    races = races_of(lambda d: program(d, ordered=False))
    # the index kernel reads x after the sync, on the default stream: the side stream's write races with it
    assert [(r.first.op, r.first.lineno, r.second.lineno) for r in races] == [
        ("aten.index.Tensor", marker_line(__file__, "cpu-index"), marker_line(__file__, "cpu-index-write"))
    ]


# CUDA: repeat_interleave(repeats) reads the output size on the host (cumsum[-1].item()) unless output_size gives it (aten/src/ATen/native/Repeat.h repeat_interleave_common)
def test_repeat_interleave_syncs_only_without_output_size():
    def program(device, sized):
        repeats = torch.tensor([1, 2], device=device)
        side = sk.Stream()  # made before: only a host sync orders it after the default stream
        repeats.add_(1)
        out = torch.repeat_interleave(repeats, output_size=5) if sized else torch.repeat_interleave(repeats)
        with sk.switch(side):
            repeats.mul_(1)  # <after-repeat>
        sk.current_stream().wait_stream(side)
        return out

    assert assert_matches_cpu(lambda d: program(d, False)).tolist() == [0, 0, 1, 1, 1]
    races = races_of(lambda d: program(d, True))  # no sync: the side stream's write races with add_
    assert [(r.first.op, r.second.lineno) for r in races] == [
        ("aten.add_.Tensor", marker_line(__file__, "after-repeat")),
        ("aten.repeat_interleave.Tensor", marker_line(__file__, "after-repeat")),
    ]


def _syncs(setup, act):
    """``(kernels, blocking_copies, implicit_syncs)`` of ``act(*setup(device))`` in an eager fake
    session (what ``setup`` does not counted)."""
    with fake.session(detect="record") as s:
        state = setup(s.device)
        before = s.stats.copy()
        act(*state)
        d = s.stats - before
    return d.kernels, d.blocking_copies, d.implicit_syncs


# CUDA: in x[mask] = number the number is a 0-dim host tensor (torch/csrc/autograd/python_variable_indexing.cpp THPVariable_setitem: valueToTensor(..., at::Device(kCPU)) on CUDA) and _index_put_impl_ dispatches to masked_fill_(mask, value.item()) (TensorAdvancedIndexingUtils.h canDispatchToMaskedFill: one-element host value, one mask on the device): one kernel, no host sync
def test_mask_assignment_of_a_number_is_a_masked_fill_without_a_host_sync():
    def program(device, ordered=True):
        x = torch.arange(6.0, device=device)
        mask = x > 2
        side = _side(device)
        x[mask] = -1.0  # <mask-fill>
        if ordered:
            side.wait_stream(sk.current_stream())
        with sk.switch(side):
            mask.fill_(False)  # <mask-fill-overwrite>
        sk.current_stream().wait_stream(side)
        return x, mask

    x, mask = assert_matches_cpu(program)
    assert x.tolist() == [0.0, 1.0, 2.0, -1.0, -1.0, -1.0] and not mask.any()
    races = races_of(lambda d: program(d, ordered=False))  # no sync: the mask is still being read
    assert [(r.first.op, r.first.kind, r.first.lineno, r.second.lineno) for r in races] == [
        ("aten.index_put_.default", "read", marker_line(__file__, "mask-fill"), marker_line(__file__, "mask-fill-overwrite"))
    ]

    def setup(device):
        x = torch.arange(6.0, device=device)
        return x, x > 2, torch.tensor(-2.0)

    def fills(x, mask, minus_two):
        x[mask] = -1.0
        x.index_put_((mask,), minus_two)

    assert _syncs(setup, fills) == (2, 0, 0)


# CUDA: index_put_ with a mask and device values: expandTensors turns the mask into nonzero(mask) (IndexingUtils.h; a host sync, cuda/Nonzero.cu memcpy_and_sync), then the put kernel reads the values and writes self; with accumulate=True the same in index_put_with_sort_kernel (cuda/Indexing.cu makeLinearIndex -> expandTensors)
@pytest.mark.parametrize("accumulate", [False, True])
def test_mask_assignment_of_a_tensor_syncs_at_the_mask_and_reads_the_values_after(accumulate):
    def program(device, ordered=True):
        x = torch.arange(6.0, device=device)
        v = torch.tensor([7.0, 8.0, 9.0], device=device)
        mask = x > 2
        if accumulate:
            x.index_put_((mask,), v, accumulate=True)  # <mask-put-accumulate>
        else:
            x[mask] = v  # <mask-put>
        side = sk.Stream()  # made after the sync: it needs no wait for the mask's reads
        with sk.switch(side):
            mask.fill_(False)
            if not ordered:
                v.fill_(0.0)  # <mask-put-values-write>
        sk.current_stream().wait_stream(side)
        return x, mask

    x, _ = assert_matches_cpu(program)
    assert x.tolist() == ([0.0, 1.0, 2.0, 10.0, 12.0, 14.0] if accumulate else [0.0, 1.0, 2.0, 7.0, 8.0, 9.0])
    races = races_of(lambda d: program(d, ordered=False))
    assert [(r.first.op, r.first.kind, r.first.lineno, r.second.lineno) for r in races] == [
        ("aten.index_put_.default", "read", marker_line(__file__, "mask-put-accumulate" if accumulate else "mask-put"),
         marker_line(__file__, "mask-put-values-write"))
    ]


# CUDA: x[idx] = number with a device index: the 0-dim host value is not a masked fill, so _index_put_impl_ copies it with value.to(self.device()) (a blocking copy: memcpy_and_sync, cuda/Copy.cu) before the put kernel, which reads idx after it (TensorAdvancedIndexing.cpp _index_put_impl_; pytorch PR 186486 proposed removing this sync and was closed); x[idx] = device_tensor syncs nothing
def test_index_assignment_of_a_number_copies_the_value_with_a_host_sync():
    def program(device, number=True, ordered=True):
        x = torch.zeros(6, device=device)
        idx = torch.tensor([1, 4], device=device)
        five = torch.tensor(5.0, device=device)
        w = torch.ones(2, device=device)
        side = sk.Stream()  # made before: only a host sync orders it after w.mul_
        w.mul_(3.0)  # <index-put-earlier>
        if number:
            x[idx] = 5.0  # <index-put-number>
        else:
            x[idx] = five
        with sk.switch(side):
            total = w.sum()  # <index-put-side-read>
            if not ordered:
                idx.fill_(0)  # <index-put-index-write>
        sk.current_stream().wait_stream(side)
        return x, total

    x, total = assert_matches_cpu(program)
    assert x.tolist() == [0.0, 5.0, 0.0, 0.0, 5.0, 0.0] and total.item() == 6.0
    races = races_of(lambda d: program(d, ordered=False))  # the put reads idx after the sync
    assert [(r.first.op, r.first.kind, r.first.lineno, r.second.lineno) for r in races] == [
        ("aten.index_put_.default", "read", marker_line(__file__, "index-put-number"), marker_line(__file__, "index-put-index-write"))
    ]
    races = races_of(lambda d: program(d, number=False))  # no sync: the side stream's read of w races
    assert [(r.first.op, r.first.lineno, r.second.lineno) for r in races] == [
        ("aten.mul_.Tensor", marker_line(__file__, "index-put-earlier"), marker_line(__file__, "index-put-side-read"))
    ]


# CUDA: make_info (TensorAdvancedIndexingUtils.h) calls expandTensors(self, orig, /*ensure_same_device=*/true): a mask on the host becomes a host nonzero copied to the device from pinned memory with non_blocking (no sync; IndexingUtils.h), an index on the host index.to(self.device()) (blocking: a sync)
def test_a_host_mask_costs_no_sync_and_a_host_index_a_blocking_copy():
    def program(device, host_mask=True):
        x = torch.arange(6.0, device=device)
        v = torch.tensor([7.0, 8.0], device=device)
        keep = torch.tensor([False, True, False, False, True, False])
        where = keep if host_mask else torch.tensor([1, 4])
        w = torch.ones(2, device=device)
        side = sk.Stream()  # made before: only a host sync orders it after w.mul_
        w.mul_(3.0)  # <host-index-earlier>
        picked = x[where]
        x[where] = v
        keep.fill_(True)  # the host mask was read at the call
        with sk.switch(side):
            total = w.sum()  # <host-index-side-read>
        sk.current_stream().wait_stream(side)
        return picked, x, total

    picked, x, total = assert_matches_cpu(lambda d: program(d, host_mask=False))
    assert picked.tolist() == [1.0, 4.0] and x.tolist() == [0.0, 7.0, 2.0, 3.0, 8.0, 5.0] and total.item() == 6.0
    races = races_of(program)  # a host mask: no sync, so the side stream's read races with w.mul_
    assert [(r.first.op, r.first.lineno, r.second.lineno) for r in races] == [
        ("aten.mul_.Tensor", marker_line(__file__, "host-index-earlier"), marker_line(__file__, "host-index-side-read"))
    ]

    def setup(device):
        x = torch.arange(6.0, device=device)
        return x, torch.tensor([7.0, 8.0, 9.0], device=device)

    def host_mask(x, v):
        where = torch.tensor([False, True] * 3)
        x[where] = v  # (a host mask: no sync)

    def host_index(x, v):
        where = torch.tensor([1, 4])
        x[where] = v[:2]  # (a blocking copy of the host index)

    assert _syncs(setup, host_mask)[1:] == (0, 0)
    assert _syncs(setup, host_index)[1:] == (1, 0)


# CUDA: index_put_(accumulate=True) with a device index syncs nothing (cuda/Indexing.cu wrapIndexOnce: at::aminmax and at::_assert_async, no .item()); two unordered ones on the same memory are read-modify-writes that may lose an update
def test_accumulating_index_put_with_a_device_index_syncs_nothing_and_may_lose_an_update():
    def program():
        acc = torch.zeros(4, device=sk.device())
        idx = torch.tensor([0, 2], device=sk.device())
        ones = torch.ones(2, device=sk.device())
        side = _side(None)
        acc.index_put_((idx,), ones, accumulate=True)
        with sk.switch(side):
            acc.index_put_((idx,), ones * 2, accumulate=True)  # unordered with the one above
        sk.current_stream().wait_stream(side)
        return acc.cpu()

    def setup(device):
        return torch.zeros(4, device=device), torch.tensor([0, 2], device=device), torch.ones(2, device=device)

    assert _syncs(setup, lambda acc, idx, ones: acc.index_put_((idx,), ones, accumulate=True)) == (1, 0, 0)
    found = fake.explore(program, schedules=3)
    assert found.reference.values.tolist() == [3.0, 0.0, 3.0, 0.0]
    f = found.failure
    assert f.schedule == "split" and f.values.tolist() in ([1.0, 0.0, 1.0, 0.0], [2.0, 0.0, 2.0, 0.0])
