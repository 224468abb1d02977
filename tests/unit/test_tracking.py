"""Op plans from schemas and byte ranges: what counts as a read, a write, a view."""

import torch

from streamkit._backends.fake._tracking import NONE, READ, WRITE, OpPlan, byte_range

aten = torch.ops.aten


def test_inplace_writes_self_reads_other():
    plan = OpPlan(aten.add_.Tensor)
    assert plan.arg_kinds[:2] == [WRITE, READ]
    assert plan.outputs == [("arg", 0)] and plan.returns_self


def test_out_argument_is_a_write_and_returned():
    plan = OpPlan(aten.add.out)
    assert plan.kw_kinds["out"] == WRITE
    assert plan.outputs == [("arg", 3)] and not plan.returns_self


def test_views_are_not_accesses():
    for op in (aten.view.default, aten.slice.Tensor, aten.t.default, aten.select.int, aten.split.Tensor):
        plan = OpPlan(op)
        assert plan.is_view, op
        assert plan.arg_kinds[0] == NONE


def test_fresh_outputs_and_list_inputs():
    plan = OpPlan(aten.cat.default)
    assert plan.arg_kinds[0] == READ and plan.outputs == [("fresh", None)]
    plan = OpPlan(aten.index_put_.default)
    assert plan.arg_kinds[:3] == [WRITE, READ, READ] and plan.allows_cpu


def test_collective_writes_its_output_argument():
    import torch.distributed  # noqa: F401  (registers the c10d ops)

    plan = OpPlan(torch.ops.c10d._allgather_base_.default)
    assert plan.is_collective and plan.arg_kinds[:2] == [WRITE, READ]
    plan = OpPlan(torch.ops.c10d.allreduce_.default)
    assert plan.arg_kinds[0] == WRITE


def test_byte_ranges_of_views():
    base = torch.zeros(4, 8, dtype=torch.float32)
    assert byte_range(base) == (0, 128)
    assert byte_range(base[1]) == (32, 64)
    assert byte_range(base[:, 2]) == (8, 4 * (2 + 3 * 8 + 1))
    assert byte_range(base[2:2]) == (0, 0)


def test_wrappers_report_the_layout_of_their_values(fake_session):
    from streamkit.fake import peek

    d = fake_session.device
    base = torch.arange(24.0, device=d)
    tensors = [
        base, base[3:], base[::2], base.view(4, 6), base.view(4, 6).t(), base.view(4, 6)[:, 1],
        torch.ones(1, device=d), torch.ones(4, 1, device=d).expand(4, 3), base + 1, torch.stack([base, base]),
        torch.bincount(torch.tensor([1, 1, 3], device=d)),
    ]
    for t in tensors:
        inner = peek(t)
        assert (t.shape, t.stride(), t.storage_offset(), t.dtype) == (inner.shape, inner.stride(), inner.storage_offset(), inner.dtype)
        size = inner.element_size()
        assert t.sk_lo == inner.storage_offset() * size
        extent = 1 + sum((n - 1) * st for n, st in zip(inner.shape, inner.stride())) if inner.numel() else 0
        assert t.sk_hi - t.sk_lo == extent * size  # the bounding byte range of the elements
