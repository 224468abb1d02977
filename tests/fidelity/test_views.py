"""Views whose schema lacks the alias annotation (docs/semantics.md, "What is a kernel, an access,
a host sync"): ``unsafe_chunk``, ``unsafe_split``, ``unsafe_split_with_sizes``, ``_unsafe_view``,
and the ops that hand back their input itself (``dequantize`` of a float tensor, ``lift``); and a
walk of the op registry that finds every such op."""

from __future__ import annotations

import gc
import warnings

import torch

import streamkit as sk
from _support import marker_line
from _programs import assert_matches_cpu, races_of
from streamkit._backends.fake import _aliases

# Test-only aten ops (no model calls them) that hand back their input.
_TEST_OPS = {"_foobar", "_test_parallel_materialize"}
_SKIP = ("_local_scalar_dense", "_print", "_assert", "sleep", "cudnn", "miopen", "mkldnn", "_nnpack", "_fused",
         "_foreach", "resize", "set_", "record_stream", "_cufft", "_use_", "_nested")
_FILL = {"int": 1, "SymInt": 1, "int[]": [1], "SymInt[]": [1], "bool": False, "float": 1.0, "Scalar": 1,
         "int[1]": [1], "SymInt[1]": [1]}


def _unannotated_overloads():
    """Every aten overload (not decomposed before reaching a device: no CompositeImplicitAutograd
    kernel) whose schema has no alias annotation at all and that returns tensors."""
    seen = set()
    for name in sorted(torch._C._dispatch_get_all_op_names()):
        if not name.startswith("aten::"):
            continue
        base = name[6:].split(".")[0]
        if base in seen or any(s in base for s in _SKIP):
            continue
        seen.add(base)
        packet = getattr(torch.ops.aten, base, None)
        if packet is None:
            continue
        for overload in packet.overloads():
            try:
                op = getattr(packet, overload)
                if torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd"):
                    continue
            except RuntimeError:
                continue
            schema = op._schema
            if not schema.returns or any(a.alias_info is not None for a in list(schema.arguments) + list(schema.returns)):
                continue
            if "Tensor" in str(schema.returns[0].type):
                yield base, op


def _call_on_a_tensor(op):
    """Call ``op`` with one float tensor as its first tensor argument and small values for the
    other required ones: ``(tensor, outputs)``, or None when it refuses them."""
    x = None
    args = []
    for a in op._schema.arguments:
        if a.kwarg_only:
            if a.has_default_value():
                continue
            return None
        kind = str(a.type)
        if kind == "Tensor" and x is None:
            x = torch.arange(1.0, 7.0).reshape(2, 3)
            args.append(x)
        elif a.has_default_value():
            break
        elif kind in _FILL:
            args.append(_FILL[kind])
        else:
            return None
    if x is None:
        return None
    try:
        out = op(*args)
    except Exception:
        return None
    return x, out if isinstance(out, (list, tuple)) else [out]


# CUDA: an op's output aliases an input only where its schema says Tensor(a), except unsafe_split/_unsafe_view (views autograd doesn't track: aten/src/ATen/native/TensorShape.cpp) and ops that return self when there is nothing to do (dequantize, lift)
def test_every_unannotated_alias_in_the_op_registry_is_in_the_alias_table():
    names = {base for base, _ in _unannotated_overloads()}
    # found by name: the unsafe_* family, whose split sizes a generic call can't guess
    assert {"unsafe_split", "unsafe_split_with_sizes", "_unsafe_view"} <= names
    found = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for base, op in _unannotated_overloads():
            called = _call_on_a_tensor(op)
            if called is None:
                continue
            x, outs = called
            ptr = x.untyped_storage().data_ptr()
            try:
                if any(isinstance(o, torch.Tensor) and o.numel() and o.untyped_storage().data_ptr() == ptr for o in outs):
                    found.add(base)
            except (RuntimeError, NotImplementedError):  # (functorch wrappers without storage)
                continue
    gc.collect()
    known = set(_aliases.UNANNOTATED_VIEWS) | set(_aliases.MAYBE_ALIASES) | _TEST_OPS
    assert found - known == set(), "ops returning an input's memory without an alias annotation"
    assert {"unsafe_split", "lift", "dequantize"} <= found  # (the walk does find them)
    # and the listed views really are views on CPU torch
    x = torch.arange(6.0)
    for outs in (x.unsafe_split(2), x.unsafe_split_with_sizes([2, 4]), x.unsafe_chunk(3), [torch.ops.aten._unsafe_view(x, [3, 2])]):
        assert all(o.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for o in outs)


# CUDA: unsafe_chunk/unsafe_split outputs are narrow() views of the input (aten/src/ATen/native/TensorShape.cpp unsafe_split: "the resulting tensors are views"): a side-stream write to a chunk writes the base
def test_unsafe_chunks_are_views_of_the_base():
    def program(device, ordered=True):
        base = torch.zeros(8, device=device)
        first, second = base.unsafe_chunk(2)
        a, b, c = base.unsafe_split_with_sizes([2, 2, 4])
        side = sk.Stream()
        side.wait_stream(sk.current_stream())
        with sk.switch(side):
            first.fill_(1.0)  # <chunk-write>
            c.add_(2.0)
        if ordered:
            sk.current_stream().wait_stream(side)
        total = base.sum()  # <base-read>
        del first, second, a, b, c  # the base lives on: no free  # <del-chunks>
        parts = base.unsafe_split(3)
        parts[2].mul_(5)
        return total, base, [p.shape for p in parts]

    total, base, shapes = assert_matches_cpu(program)
    assert total.item() == 4 * 1.0 + 4 * 2.0 and base[-1].item() == 10.0 and shapes == [(3,), (3,), (2,)]
    races = races_of(lambda d: program(d, ordered=False))
    found = {(r.first.kind, r.first.lineno, r.second.kind, r.second.lineno) for r in races}
    assert {
        ("write", marker_line(__file__, "chunk-write"), "read", marker_line(__file__, "base-read")),
        ("write", marker_line(__file__, "chunk-write") + 1, "read", marker_line(__file__, "base-read")),
    } <= found
    assert not [r for r in races if r.second.lineno == marker_line(__file__, "del-chunks")]


# CUDA: dequantize of a float tensor is self.to(kFloat), which returns self (aten/src/ATen/native/quantized/QTensor.cpp dequantize_cpu_or_cuda; TensorConversions.cpp to: "if nothing changes, return self")
def test_ops_that_return_their_input_alias_it():
    def program(device, ordered=True):
        x = torch.zeros(4, device=device)
        side = sk.Stream()
        side.wait_stream(sk.current_stream())
        with sk.switch(side):
            x.fill_(3.0)  # <deq-write>
        if ordered:
            sk.current_stream().wait_stream(side)
        y = x.dequantize()
        same = y is x
        y.add_(1)  # <deq-add>
        z = torch.arange(3, device=device).dequantize()  # an int tensor: a new float tensor
        return x, same, z

    x, same, z = assert_matches_cpu(program)
    assert same and torch.equal(x, torch.full((4,), 4.0)) and z.dtype == torch.float32
    races = races_of(lambda d: program(d, ordered=False))
    assert [(r.first.lineno, r.second.lineno) for r in races] == [
        (marker_line(__file__, "deq-write"), marker_line(__file__, "deq-add"))
    ]
