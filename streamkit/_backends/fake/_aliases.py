"""Ops whose schema doesn't say that their output aliases an input.

An op's reads, writes and views come from its schema's alias annotations (``Tensor(a)``). A few
ops return memory of an input without the annotation:

- :data:`UNANNOTATED_VIEWS` are views, always: ``unsafe_split`` and friends ("unsafe" because
  autograd doesn't track them as views, but their outputs are ``narrow``/``view`` of the input:
  ``aten/src/ATen/native/TensorShape.cpp``, ``unsafe_split``: "this is safe because ... the
  resulting tensors are views") and ``_unsafe_view`` (``aten/src/ATen/native/TensorShape.cpp``:
  "_unsafe_view() differs from view() in that the returned tensor isn't treated as a view for the
  purposes of automatic differentiation"). ``unsafe_chunk`` is composite: it decomposes into
  ``unsafe_split``.
- :data:`MAYBE_ALIASES` return their input itself when there is nothing to do, else new memory:
  ``dequantize`` of a float tensor (``aten/src/ATen/native/quantized/QTensor.cpp``,
  ``dequantize_cpu_or_cuda``: ``self.to(at::kFloat)``, which returns ``self`` for float32) and
  ``lift`` (``aten/src/ATen/native/TensorConversions.cpp``: ``lift`` returns ``self``).

``tests/fidelity/test_views.py`` walks the op registry for ops whose output shares an input's
memory without an annotation and checks that every one is in these tables (or decomposes).
"""

from __future__ import annotations

from typing import Any

#: op name -> the argument index whose memory the outputs view
UNANNOTATED_VIEWS: dict[str, int] = {"_unsafe_view": 0, "unsafe_split": 0, "unsafe_split_with_sizes": 0}
#: ops that return argument 0 itself when there is nothing to convert, else a fresh tensor
MAYBE_ALIASES = frozenset({"dequantize", "lift"})

_NONE = 0  # (_tracking.NONE: not accessed, a view output aliases it)


def fix_plan(plan: Any) -> None:
    """Correct an :class:`~._tracking.OpPlan` of a view whose schema lacks the alias annotation."""
    owner = UNANNOTATED_VIEWS.get(plan.name)
    if owner is not None and "out" not in plan.op._overloadname and plan.outputs:
        plan.outputs = [("view", owner)] * len(plan.outputs)
        plan.arg_kinds[owner] = _NONE
        plan.kw_kinds[plan.op._schema.arguments[owner].name] = _NONE
        plan.is_view = True
        plan.returns_self = False


def maybe_alias_handler(engine: Any) -> Any:
    """The dispatch handler of :data:`MAYBE_ALIASES` (``engine``: the ``_tensor`` module): when the
    op hands back its input itself (decided on the values' metadata, as on CUDA), the same tensor,
    no kernel; otherwise the ordinary kernel."""

    def maybe_alias(plan: Any, args: Any, kwargs: dict, frame: Any) -> Any:
        self = args[0] if args else None
        if type(self) is engine.FakeDeviceTensor:
            call = engine.DispatchCall(plan, None)  # (only to unwrap)
            call.unwrap(args, kwargs)
            if plan.op._op(*call.args, **call.kwargs) is self.sk_inner:
                return self
        return engine.run_kernel(plan, args, kwargs, frame)

    return maybe_alias
