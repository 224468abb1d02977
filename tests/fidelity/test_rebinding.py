"""Tensors that change which memory they hold (docs/semantics.md, "Rules of CUDA that real model
code relies on"): ``x.data = y``, ``Module._apply`` casts and moves, ``vector_to_parameters``,
``Tensor.set_`` and ``untyped_storage().resize_`` (FSDP's way to free parameter memory). Each
rule: a race-free program equal to CPU torch under every schedule, and a racy one reported."""

from __future__ import annotations

import pytest
import torch

import streamkit as sk
from _support import marker_line
from _programs import assert_matches_cpu, races_of
from streamkit import fake


def _side_writes(device: torch.device, t: torch.Tensor, value: float) -> sk.Stream:
    side = sk.Stream()
    side.wait_stream(sk.current_stream())
    with sk.switch(side):
        t.fill_(value)  # <side-write>
    return side


# ---------------------------------------------------------------------------------------------
# x.data = y


# CUDA: x.data = y makes x share y's storage and metadata, no copy (torch/csrc/autograd/variable.cpp VariableHooks::set_data: shallow_copy_from)
def test_data_assignment_shares_the_new_memory():
    def program(device, ordered=True):
        x = torch.zeros(4, device=device)
        y = torch.zeros(2, 3, device=device)
        side = _side_writes(device, y, 1.0)
        x.data = y
        if ordered:
            sk.current_stream().wait_stream(side)
        x.add_(1)  # <data-read>
        return x, y, x.shape

    x, y, shape = assert_matches_cpu(program)
    assert shape == (2, 3) and torch.equal(y, torch.full((2, 3), 2.0))
    races = races_of(lambda d: program(d, ordered=False))
    assert [(r.first.kind, r.first.lineno, r.second.kind, r.second.lineno) for r in races] == [
        ("write", marker_line(__file__, "side-write"), "write", marker_line(__file__, "data-read"))
    ]


# CUDA: x.data = y drops x's reference to its old storage: the caching allocator frees it then (c10/cuda/CUDACachingAllocator.cpp free; torch/csrc/autograd/variable.cpp set_data)
def test_data_assignment_frees_the_old_memory_and_checks_the_free():
    def program(device, ordered=True):
        x = torch.zeros(4, device=device)
        side = sk.Stream()
        side.wait_stream(sk.current_stream())
        with sk.switch(side):
            total = x.sum()
        if ordered:
            sk.current_stream().wait_stream(side)
        x.data = torch.ones(4, device=device)  # <data-free>
        return x, total

    assert_matches_cpu(program)
    races = races_of(lambda d: program(d, ordered=False))
    assert [(r.second.kind, r.second.lineno) for r in races] == [("free", marker_line(__file__, "data-free"))]


# CUDA: Module._apply assigns param.data = fn(param) for casts (.double(), .half()) of device parameters (torch/nn/modules/module.py _apply); the cast is a _to_copy kernel on the current stream
@pytest.mark.eager_only(
    "asserts the eager run's races; under a deferred schedule the recycled old bias block's next owner"
    " also reports the access (docs/exploration.md, Limits: detection and schedules)"
)
def test_module_casts_and_moves_assign_param_data():
    def program(device, ordered=True):
        torch.manual_seed(0)
        lin = torch.nn.Linear(4, 3).to(device)
        side = _side_writes(device, lin.bias.data, 0.5)
        if ordered:
            sk.current_stream().wait_stream(side)
        lin.double()  # <cast>
        with torch.no_grad():
            out = lin(torch.ones(2, 4, device=device, dtype=torch.float64))
        return out, lin.weight.dtype == torch.float64, lin.bias

    out, is_double, bias = assert_matches_cpu(program)
    assert is_double and torch.equal(bias, torch.full((3,), 0.5, dtype=torch.float64))
    races = races_of(lambda d: program(d, ordered=False))
    # the cast reads the bias the side stream writes, and drops the old bias block meanwhile
    assert [(r.first.kind, r.second.kind, r.second.lineno) for r in races] == [
        ("write", "read", marker_line(__file__, "cast")), ("write", "free", marker_line(__file__, "cast"))
    ]


# CUDA: vector_to_parameters sets param.data = vec[a:b].view_as(param).data: the parameters become views of vec (torch/nn/utils/convert_parameters.py)
def test_vector_to_parameters_makes_views_of_the_vector():
    def program(device, ordered=True):
        torch.manual_seed(0)
        lin = torch.nn.Linear(4, 3).to(device)
        vec = torch.zeros(15, device=device)
        side = _side_writes(device, vec, 2.0)
        torch.nn.utils.vector_to_parameters(vec, lin.parameters())
        if ordered:
            sk.current_stream().wait_stream(side)
        with torch.no_grad():
            out = lin(torch.ones(1, 4, device=device))  # <v2p-read>
            vec.mul_(3)  # through the parameters too  # <v2p-write>
        return out, lin.weight, lin.bias

    out, weight, bias = assert_matches_cpu(program)
    assert torch.equal(out, torch.full((1, 3), 10.0)) and torch.equal(bias, torch.full((3,), 6.0))
    races = races_of(lambda d: program(d, ordered=False))
    assert {(r.first.kind, r.second.kind, r.second.lineno) for r in races} == {
        ("write", "read", marker_line(__file__, "v2p-read")), ("write", "write", marker_line(__file__, "v2p-write"))
    }


# ---------------------------------------------------------------------------------------------
# Tensor.set_


# CUDA: x.set_(y) / x.set_(storage, offset, size, stride) point x at that storage, metadata only (aten/src/ATen/native/TensorShape.cpp set_, set_storage_cpu_)
def test_set_points_the_tensor_at_another_storage():
    def program(device, ordered=True):
        z = torch.zeros(6, device=device)
        side = _side_writes(device, z, 1.0)
        w = torch.empty(0, device=device)
        w.set_(z)
        window = torch.empty(0, device=device)
        window.set_(z.untyped_storage(), 2, (2,), (1,))
        if ordered:
            sk.current_stream().wait_stream(side)
        w.mul_(2)  # <set-write>
        window.add_(10)
        empty = torch.ones(3, device=device)
        empty.set_()
        return z, w.shape, window, empty.shape, window.untyped_storage().data_ptr() == z.untyped_storage().data_ptr()

    z, shape, window, empty_shape, same = assert_matches_cpu(program)
    assert torch.equal(z, torch.tensor([2.0, 2, 12, 12, 2, 2])) and same and empty_shape == (0,)
    races = races_of(lambda d: program(d, ordered=False))
    assert [(r.first.kind, r.second.kind, r.second.lineno) for r in races] == [
        ("write", "write", marker_line(__file__, "set-write"))
    ]


def test_set_refuses_a_host_tensor_and_a_dtype_change(fake_session):
    x = torch.zeros(2, device=fake_session.device)
    with pytest.raises(TypeError, match="Tensor.set_\\(source\\).*fake-device tensor"):
        x.set_(torch.zeros(2))
    with pytest.raises(RuntimeError):
        x.set_(torch.zeros(2, dtype=torch.int64, device=fake_session.device))


# ---------------------------------------------------------------------------------------------
# untyped_storage().resize_(0) and back: FSDP's parameter memory


# CUDA: storage.resize_(0) frees the block at once (no kernel); resize_(n) allocates a new one on the current stream, copying the old bytes when there were any (aten/src/ATen/native/cuda/Resize.cpp resize_bytes_cuda); FSDP frees unsharded parameters this way after their last use is ordered (torch/distributed/fsdp/_flat_param.py _free_storage)
def test_storage_resize_to_zero_and_back():
    def program(device, ordered=True):
        param = torch.arange(8.0, device=device)
        side = sk.Stream()
        side.wait_stream(sk.current_stream())
        with sk.switch(side):
            used = param * 2
        if ordered:
            sk.current_stream().wait_stream(side)
        storage = param.untyped_storage()
        storage.resize_(0)  # <resize-free>
        freed = param.untyped_storage().size()
        storage.resize_(8 * param.element_size())
        param.copy_(torch.arange(8.0, device=device) + 1)  # the all-gather writes it back
        grown = param.untyped_storage().nbytes()
        keep = torch.arange(4.0, device=device)
        keep.untyped_storage().resize_(32)  # grows: copies the 16 bytes it held
        return used, param, freed, grown, keep[:4] if device.type == "cpu" else keep[:4]

    used, param, freed, grown, keep = assert_matches_cpu(program)
    assert freed == 0 and grown == 32 and torch.equal(param, torch.arange(8.0) + 1)
    assert torch.equal(keep, torch.arange(4.0))
    races = races_of(lambda d: program(d, ordered=False))
    assert [(r.first.kind, r.second.kind, r.second.lineno) for r in races] == [
        ("read", "free", marker_line(__file__, "resize-free"))
    ]


def test_freed_storage_reads_as_poison_and_never_crashes(fake_session):
    x = torch.arange(4.0, device=fake_session.device)
    x.untyped_storage().resize_(0)
    assert x.untyped_storage().nbytes() == 0
    assert x.cpu().isnan().all()  # (CPU torch would crash reading past the storage; CUDA: illegal address)
    with pytest.raises(ValueError, match="resize_\\(size\\).*-1"):
        x.untyped_storage().resize_(-1)


def test_storage_resize_during_capture_is_refused(fake_session):
    x = torch.zeros(4, device=fake_session.device)
    g = sk.Graph()
    with pytest.raises(sk.GraphCaptureError, match="resize_"):
        with sk.graph(g):
            x.untyped_storage().resize_(0)


# CUDA: resize_as_(t) is resize_ to t's sizes: growing past the storage allocates a new block on the current stream, copies the old bytes and frees the old block (aten/src/ATen/native/Resize.cpp resize_as_, aten/src/ATen/native/cuda/Resize.cpp resize_bytes_cuda)
def test_resize_as_that_grows_reallocates_like_resize():
    def program(device, ordered=True):
        x = torch.arange(4.0, device=device)
        side = sk.Stream()
        side.wait_stream(sk.current_stream())
        with sk.switch(side):
            total = x.sum()
        if ordered:
            sk.current_stream().wait_stream(side)
        x.resize_as_(torch.zeros(3, 4, device=device))  # <resize-as>
        x[1:].fill_(1.0)
        shrunk = torch.arange(4.0, device=device).resize_as_(torch.zeros(2, device=device))
        return total, x.shape, x[0], shrunk

    total, shape, first_row, shrunk = assert_matches_cpu(program)
    assert shape == (3, 4) and torch.equal(first_row, torch.arange(4.0)) and torch.equal(shrunk, torch.arange(2.0))
    races = races_of(lambda d: program(d, ordered=False))
    assert [(r.first.kind, r.second.kind, r.second.lineno) for r in races] == [
        ("read", "free", marker_line(__file__, "resize-as"))
    ]
