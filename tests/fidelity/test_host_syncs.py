"""Ops that synchronize the host partway through (docs/semantics.md, "Ops that synchronize the
host"): the part after the sync reads its inputs again, unsynchronized; what the current stream
did before the sync is finished for everyone. Boolean-mask indexing and indexing with a CPU index
tensor are host syncs too."""

from __future__ import annotations

import torch

import streamkit as sk
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
