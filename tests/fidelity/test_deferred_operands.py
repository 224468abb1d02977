"""What a deferred schedule must keep of issue time (docs/exploration.md, docs/semantics.md): host
operands (a 0-dim CPU scalar tensor, a CPU index tensor) are read at the call, as CUDA reads them
at the launch or copies them; in-place metadata changes of an output still pending apply in issue
order. Each program equals plain CPU torch under the eager, lazy, adversarial and random
schedules."""

from __future__ import annotations

import torch

import streamkit as sk
from _support import marker_line
from _programs import assert_matches_cpu, races_of


# CUDA: a 0-dim CPU tensor operand is passed to the kernel as a scalar at the launch (aten/src/ATen/native/cuda/Loops.cuh gpu_kernel_with_scalars: iter.is_cpu_scalar(...) -> iter.scalar_value); a CPU index is copied at the call (TensorAdvancedIndexing.cpp make_info)
def test_host_operands_are_read_at_the_call():
    def program(device):
        x = torch.arange(8.0, device=device)
        k = torch.tensor(2.0)
        x.mul_(k)
        k.fill_(100.0)  # after the launch: the kernel has its own copy
        idx, value = torch.tensor([1, 3]), torch.tensor(-7.0)
        x.index_put_((idx,), value)
        picked = x[idx]
        idx.fill_(0)
        value.fill_(5.0)
        return x, picked

    x, picked = assert_matches_cpu(program)
    assert x.tolist() == [0.0, -7.0, 4.0, -7.0, 8.0, 10.0, 12.0, 14.0] and picked.tolist() == [-7.0, -7.0]


# CUDA: t_(), transpose_(), squeeze_(), unsqueeze_(), as_strided_(), resize_() shrinking and set_() change the tensor's metadata on the host at the call; a kernel already launched writes the memory in its own layout (c10/core/TensorImpl.h: sizes/strides are host-side; aten/src/ATen/native/TensorShape.cpp)
def test_metadata_changes_of_pending_outputs_apply_in_issue_order():
    def program(device):
        x = torch.arange(16.0, device=device)
        y = x.view(4, 4) * 1
        y.t_()
        z = x * 1
        z.resize_(4)
        w = x.view(1, 16) * 1
        w.squeeze_(0)
        u = x * 1
        u.as_strided_((2, 2), (1, 4))
        q = x.view(4, 4) * 1
        q.unsqueeze_(0)
        q.transpose_(1, 2)
        r = x * 2
        r.set_(z)
        return y, z, w, u, q, r

    y, z, w, u, q, r = assert_matches_cpu(program)
    assert torch.equal(y, torch.arange(16.0).view(4, 4).t()) and torch.equal(r, torch.arange(4.0))


# CUDA: a metadata change orders nothing: reading a pending output of another stream still needs a wait (CUDA stream semantics)
def test_a_metadata_change_of_another_streams_output_is_no_wait():
    def program(device, ordered=True):
        x = torch.arange(16.0, device=device)
        side = sk.Stream()
        side.wait_stream(sk.current_stream())
        with sk.switch(side):
            y = x.view(4, 4) * 1  # <pending-write>
        y.t_()
        if ordered:
            sk.current_stream().wait_stream(side)
        total = y[0].sum()  # <pending-read>
        sk.current_stream().wait_stream(side)
        return y, total

    y, total = assert_matches_cpu(program)
    assert total.item() == 0 + 4 + 8 + 12
    races = races_of(lambda d: program(d, ordered=False))
    # (then the free of y, read by the default stream, at the program's end: its allocation stream is side)
    assert [(r.first.lineno, r.second.lineno, r.second.kind) for r in races][0] == (
        marker_line(__file__, "pending-write"), marker_line(__file__, "pending-read"), "read"
    )
