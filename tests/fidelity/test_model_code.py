"""What real model code does to device tensors, on the fake device as on CUDA
(docs/semantics.md, "Rules of CUDA that real model code relies on"): views under
``torch.inference_mode()``, ``copy.deepcopy`` of tensors and modules, ``data_ptr()``, device
indices, ``Tensor.record_stream(sk.Stream)``, and finalizers that never print."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

import streamkit as sk
from _support import marker_line
from streamkit import fake

# ---------------------------------------------------------------------------------------------
# torch.inference_mode() with views of fake tensors made before it


# CUDA: a view of a normal tensor made under inference_mode is a normal tensor sharing its storage (c10/core/InferenceMode.h)
def test_views_of_normal_tensors_under_inference_mode_match_cpu(fake_session):
    results = {}
    for device in (torch.device("cpu"), fake_session.device):
        x = torch.arange(12.0, device=device).reshape(3, 4)  # made at start-up, a normal tensor
        with torch.inference_mode():
            row, col = x[1], x[:, 2]
            parts = x.split(2, dim=1)
            window = x.narrow(1, 1, 2)
            window.add_(1)  # in place through a view of a normal tensor
            fresh = x.t() @ x
            results[device.type] = (
                row.cpu(), col.cpu(), [p.cpu() for p in parts], fresh.cpu(), x.view(-1).cpu(),
                (row.is_inference(), fresh.is_inference(), fresh[0].is_inference()),
            )
    cpu, dev = results["cpu"], results["fake"]
    for a, b in zip(cpu[:5], dev[:5]):
        torch.testing.assert_close(b, a)
    assert dev[5] == cpu[5] == (False, True, True)


# CUDA: a view reads the same device memory as its base, so a view read on another stream races with the base's writer (torch/cuda/streams.py; CUDA stream semantics)
def test_racy_read_through_a_view_under_inference_mode_is_reported(fake_session):
    side = sk.Stream()
    cache = torch.zeros(4, 8, device=fake_session.device)
    sk.synchronize()
    with torch.inference_mode():
        cache[1].fill_(2.0)  # <inf-write>
        with sk.switch(side):
            with pytest.raises(sk.RaceError) as info:
                cache[1:3].sum()  # <inf-read>
    race = info.value.race
    assert (race.first.kind, race.first.lineno) == ("write", marker_line(__file__, "inf-write"))
    assert (race.second.kind, race.second.lineno, race.second.stream) == ("read", marker_line(__file__, "inf-read"), side)


# ---------------------------------------------------------------------------------------------
# copy.deepcopy


# CUDA: copy.deepcopy of a device tensor clones its storage with a device copy on the current stream (torch/_tensor.py __deepcopy__, torch/storage.py)
def test_deepcopy_of_a_tensor_is_a_new_storage_with_the_same_values(fake_session):
    x = torch.arange(6.0, device=fake_session.device)
    x.tag = "weights"
    x.requires_grad_()
    view = x.detach()[2:5]
    x_copy, view_copy = copy.deepcopy([x, view])  # one deepcopy: the view shares the copied storage
    assert type(x_copy) is type(x) and x_copy.device == fake_session.device
    assert x_copy.requires_grad and x_copy.is_leaf and x_copy.tag == "weights"
    assert x_copy.data_ptr() != x.data_ptr()
    assert view_copy.data_ptr() == x_copy.data_ptr() + 2 * x.element_size()
    assert x_copy.tolist() == x.tolist() and view_copy.tolist() == [2.0, 3.0, 4.0]
    with torch.no_grad():
        x_copy.mul_(10)
    assert x.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # independent of the source
    assert view_copy.tolist() == [20.0, 30.0, 40.0]  # one storage with x_copy
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(x * 2)


# CUDA: deepcopy of a module deep-copies every parameter and buffer as above (torch/nn/modules/module.py, torch/_tensor.py)
def test_deepcopy_of_a_module_matches_cpu(fake_session):
    torch.manual_seed(0)
    cpu_model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).eval()
    model = copy.deepcopy(cpu_model).to(fake_session.device)
    clone = copy.deepcopy(model)
    assert isinstance(clone[0].weight, torch.nn.Parameter) and clone[0].weight.device == fake_session.device
    assert clone[0].weight.data_ptr() != model[0].weight.data_ptr()
    assert clone[1].running_mean.device == fake_session.device
    x = torch.arange(8.0).reshape(2, 4)
    with torch.no_grad():
        model[0].bias.add_(1)  # the clone doesn't see it
        torch.testing.assert_close(clone(x.to(fake_session.device)).cpu(), cpu_model(x))


# CUDA: the deepcopy's copy kernel runs on the current stream and reads the source there (torch/_tensor.py __deepcopy__: clone)
@pytest.mark.eager_only("the deepcopy races the side stream's add_; the value asserted is the eager order's")
def test_deepcopy_reads_the_source_on_the_current_stream():
    with fake.session(detect="record") as s:
        side = sk.Stream()
        x = torch.zeros(8, device=s.device)
        side.wait_stream(sk.current_stream())
        with sk.switch(side):
            x.add_(1)  # <dc-write>
        y = copy.deepcopy(x)  # <dc-copy>
        sk.synchronize()
        assert y.tolist() == [1.0] * 8
    [race] = s.races
    assert (race.first.kind, race.first.stream, race.first.lineno) == ("write", side, marker_line(__file__, "dc-write"))
    assert (race.second.kind, race.second.stream) == ("read", sk.default_stream())
    assert race.second.lineno == marker_line(__file__, "dc-copy") and "clone" in race.second.op

    with fake.session(detect="raise") as s:  # ordered: no race, same values
        side = sk.Stream()
        x = torch.zeros(8, device=s.device)
        side.wait_stream(sk.current_stream())
        with sk.switch(side):
            x.add_(1)
        sk.current_stream().wait_stream(side)
        assert copy.deepcopy(x).tolist() == [1.0] * 8


# ---------------------------------------------------------------------------------------------
# data_ptr, device index, Tensor.record_stream


# CUDA: data_ptr() is the storage address plus the view's offset times the element size (c10/core/TensorImpl.h data())
def test_data_ptr_is_distinct_per_storage_stable_and_offset_by_the_view(fake_session):
    a = torch.zeros(16, device=fake_session.device)
    b = torch.zeros(16, device=fake_session.device)
    assert a.data_ptr() != 0 and a.data_ptr() != b.data_ptr()
    assert a.data_ptr() == a.data_ptr() == a.view(4, 4).data_ptr()
    assert a[3:].data_ptr() == a.data_ptr() + 3 * a.element_size()
    assert a.view(4, 4)[1, 2:].data_ptr() == a.data_ptr() + 6 * a.element_size()
    assert torch.empty(0, device=fake_session.device).data_ptr() == 0  # as on CPU and CUDA


# CUDA: a device ordinal that doesn't exist is an error ("invalid device ordinal", c10/cuda/CUDAFunctions.cpp)
@pytest.mark.parametrize(
    "make",
    {
        "factory": lambda x: torch.ones(2, device="fake:1"),
        "torch.device": lambda x: torch.zeros(2, device=torch.device("fake", 1)),
        "host to device": lambda x: torch.ones(2).to("fake:1"),
        "device to device": lambda x: x.to("fake:1"),
        "empty_like": lambda x: torch.empty_like(x, device="fake:2"),
        "new_empty": lambda x: x.new_empty(2, device="fake:1"),
    }.items(),
    ids=lambda item: item[0],
)
def test_a_device_index_other_than_0_is_refused(fake_session, make):
    x = torch.ones(2, device=fake_session.device)
    with pytest.raises(sk.DeviceIndexError, match=r"device='fake:\d'.*one device, fake:0.*device='fake'"):
        make[1](x)
    assert torch.ones(2, device="fake:0").device == torch.ones(2).to("fake").device == fake_session.device


# CUDA: Tensor.record_stream(s) marks the block in use by s until s's work is done (torch/_tensor_docs.py record_stream; CUDACachingAllocator.cpp)
def test_tensor_record_stream_is_sk_record_stream():
    for covered in (False, True):
        with fake.session(detect="record") as s:
            side = sk.Stream()
            x = torch.ones(4, device=s.device)
            side.wait_stream(sk.current_stream())
            with sk.switch(side):
                y = x * 2
            if covered:
                x.record_stream(side)
            del x  # <rs-free>
            sk.synchronize()
            assert y.tolist() == [2.0] * 4
        if covered:
            assert not s.races
        else:
            [race] = s.races
            assert race.second.kind == "free" and race.second.lineno == marker_line(__file__, "rs-free")
    with fake.session() as s:
        with pytest.raises(TypeError, match=r"record_stream\(stream\).*streamkit.Stream"):
            torch.ones(2, device=s.device).record_stream("side")


# ---------------------------------------------------------------------------------------------
# finalizers never print (torch.compile's tracing used to print 16 "Exception ignored in
# StorageState.__del__" tracebacks; compiling costs ~9 s, so this checks the two cheaper ways such
# half-made objects arose: copying a fake tensor's slots, and a state made without __init__)


# CUDA: freeing device memory never prints (CUDACachingAllocator.cpp free paths report through errors, not finalizer output)
def test_copies_and_half_made_storage_states_print_nothing(fake_session, monkeypatch):
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    x = torch.ones(4, device=fake_session.device)
    module = torch.nn.Linear(2, 2).to(fake_session.device)
    copies = [copy.deepcopy(x), copy.deepcopy(module), copy.copy(module)]
    state_type = type(x.sk_state)  # (private: the access table torch's generic copy used to half-copy)
    with pytest.raises(TypeError, match="deepcopy the tensor"):
        copy.copy(x.sk_state)
    half_made = state_type.__new__(state_type)
    del half_made, copies
    assert unraisable == []


# CUDA: without autograd keys (inference tensors) composite ops such as Tensor.to, reshape and flatten still run their decomposition: .to("cpu") is a device-to-host copy, never an alias of the device tensor (aten/src/ATen/native/native_functions.yaml: CompositeImplicitAutograd)
@pytest.mark.eager_only("the side stream's sum races the default stream's write; its value is the eager order's")
def test_composite_ops_on_inference_tensors_run_their_decomposition():
    with fake.session(detect="record") as s:
        side = sk.Stream()
        with torch.inference_mode():
            y = torch.arange(6.0, device=s.device) * 3  # <comp-write>
            with sk.switch(side):
                total = y.reshape(3, 2).sum()  # <comp-read>
            moved = y.to("cpu")
            pinned = y.to("cpu", non_blocking=True)
            as_double = y.to(torch.float64)
            flat = y.reshape(2, 3).contiguous().flatten()
        sk.synchronize()
        expected = torch.arange(6.0) * 3
        assert type(moved) is torch.Tensor and moved.device.type == "cpu"
        torch.testing.assert_close(moved, expected)
        assert pinned.device.type == "cpu" and pinned.is_pinned()
        torch.testing.assert_close(torch.Tensor(pinned.clone()), expected)
        assert as_double.device == s.device and as_double.dtype == torch.float64
        torch.testing.assert_close(flat.cpu(), expected)
        assert total.item() == expected.sum().item()
    (race,) = s.races
    assert (race.first.kind, race.first.lineno) == ("write", marker_line(__file__, "comp-write"))
    assert (race.second.kind, race.second.stream, race.second.lineno) == ("read", side, marker_line(__file__, "comp-read"))
