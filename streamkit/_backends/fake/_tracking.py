"""Op tracking: what an op reads and writes (from its schema), the access records, the kernel
record, and the scheduler that runs kernels. (The per-storage access table is the allocator's
block record, :class:`._allocator.StorageState`.)

Identity of memory is a storage plus a byte range, so overlapping views conflict and disjoint
slices do not. A view with gaps between its elements also carries its layout (``_overlap``): where
bounding ranges overlap, the elements decide (``x[::2]`` and ``x[1::2]`` don't conflict).
"""

from __future__ import annotations

from enum import IntEnum
from functools import partial
from typing import Any, Callable, NamedTuple

import torch

from ._aliases import fix_plan
from ._clocks import StreamState


class AccessKind(IntEnum):
    """The one vocabulary of accesses: how an op touches a tensor argument (from its schema), how
    the allocator and the host touch memory, and the words race reports use for each
    (:attr:`label`, the ``kind`` of a :class:`~streamkit.fake.Access`)."""

    NONE = 0  # not at all: a view output aliases it
    READ = 1
    WRITE = 2
    FREE = 3  # the allocator taking the memory back (the last reference was dropped)
    HOST_READ = 4  # the host reading pinned memory an asynchronous copy may still write
    HOST_WRITE = 5  # the host writing pinned memory an asynchronous copy may still read

    @property
    def label(self) -> str:
        """The words race reports use: ``"read"``, ``"write"``, ``"free"``, ``"host read"``, ``"host write"``."""
        return _LABELS[self]


_LABELS = {kind: kind.name.lower().replace("_", " ") for kind in AccessKind}
#: every ``Access.kind`` a race report may carry
ACCESS_KINDS: tuple[str, ...] = tuple(_LABELS[kind] for kind in AccessKind if kind)


NONE, READ, WRITE = AccessKind.NONE, AccessKind.READ, AccessKind.WRITE


class AccessRecord(NamedTuple):
    """One access not yet superseded in a storage's access table: bytes ``[start, end)`` touched by
    ``kernel``, the ``seq``-th kernel of stream ``stream`` (an index)."""

    start: int
    end: int
    stream: int
    seq: int
    kernel: "Kernel"


#: ``new_record((start, end, stream, seq, kernel))``: an AccessRecord without NamedTuple's Python
#: ``__new__`` (half the cost; one is made per access)
new_record = partial(tuple.__new__, AccessRecord)

# In-place ops that change a tensor's shape/strides: a wrapper tensor's metadata can't follow them.
METADATA_MUTATORS = frozenset(
    {"t_", "transpose_", "squeeze_", "unsqueeze_", "as_strided_", "swapdims_", "swapaxes_", "set_", "resize_as_"}
)
# Ops whose CPU-tensor index arguments are allowed beside device tensors (CUDA accepts them too).
INDEX_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index", "_unsafe_index_put"})


class OpPlan:
    """How one op overload accesses its tensor arguments and what its outputs are, from its schema.

    ``arg_kinds[i]`` / ``kw_kinds[name]`` is NONE (aliased by a view output), READ or WRITE.
    ``outputs`` has one entry per return: ``("arg", i)`` (returns argument ``i`` itself: in-place or
    out=), ``("view", i)`` (a new view of argument ``i``) or ``("fresh", None)`` (new memory).
    """

    __slots__ = (
        "op", "name", "arg_kinds", "kw_kinds", "outputs", "is_view", "is_collective", "handler", "allows_cpu",
        "returns_self", "host_sync", "call",
    )

    def __init__(self, op: Any) -> None:
        self.op = op
        schema = op._schema
        self.name = schema.name.split("::")[-1]
        namespace = schema.name.split("::")[0]
        self.is_collective = namespace == "c10d"
        self.handler: Callable[..., Any] | None = None
        self.allows_cpu = self.name in INDEX_OPS
        self.arg_kinds: list[int] = []
        self.kw_kinds: dict[str, int] = {}
        alias_owner: dict[str, int] = {}
        first_tensor = None
        for i, arg in enumerate(schema.arguments):
            info = arg.alias_info
            if info is None:
                kind = READ
            elif info.is_write:
                kind = WRITE
            else:
                kind = NONE
            if self.is_collective:
                # c10d schemas carry no write annotation: a mutating collective ("..._") writes
                # its first tensor argument (the output) and returns it; the rest are inputs.
                is_tensor = "Tensor" in str(arg.type)
                if is_tensor and first_tensor is None:
                    first_tensor = i
                    kind = WRITE if self.name.endswith("_") else READ
                else:
                    kind = READ
            if info is not None:
                for name in info.before_set:
                    alias_owner.setdefault(name, i)
            self.arg_kinds.append(kind)
            self.kw_kinds[arg.name] = kind
        self.outputs: list[tuple[str, int | None]] = []
        for ret in schema.returns:
            info = ret.alias_info
            owner = None
            if info is not None:
                for name in info.before_set:
                    if name in alias_owner:
                        owner = alias_owner[name]
                        break
            if info is not None and info.is_write and owner is not None:
                self.outputs.append(("arg", owner))
            elif info is not None and owner is not None:
                self.outputs.append(("view", owner))
            elif info is not None and not info.is_write:
                # e.g. split(): "Tensor(a)[]" with the alias on the elements: views of the aliased arg
                owner = next((j for j, k in enumerate(self.arg_kinds) if k == NONE), 0)
                self.outputs.append(("view", owner))
            elif self.name == "_unsafe_view":
                self.outputs.append(("view", 0))  # shares memory despite a schema without aliasing
            else:
                self.outputs.append(("fresh", None))
        if self.name == "_unsafe_view":
            self.arg_kinds[0] = NONE
            self.kw_kinds["self"] = NONE
        self.is_view = bool(self.outputs) and all(kind == "view" for kind, _ in self.outputs)
        # An in-place op (not an out= overload) returns its first argument unchanged: fast path.
        self.returns_self = self.outputs == [("arg", 0)] and "out" not in op._overloadname
        self.call = op._op
        # After the op: does the host wait for it? (set by the dispatch layer, which knows the lists)
        self.host_sync: str | None = None
        fix_plan(self)  # ops whose schema lacks an alias annotation (unsafe_split, ...)


_PLANS: dict[Any, OpPlan] = {}


def plan_for(op: Any) -> OpPlan:
    plan = _PLANS.get(op)
    if plan is None:
        plan = _PLANS[op] = OpPlan(op)
    return plan


def byte_range(t: torch.Tensor) -> tuple[int, int]:
    """The bounding byte range ``[start, end)`` of ``t`` within its storage."""
    n = t.numel()
    if n == 0:
        return (0, 0)
    size = t.element_size()
    offset = t.storage_offset()
    if t.is_contiguous():
        return (offset * size, (offset + n) * size)
    extent = 1
    for dim, stride in zip(t.size(), t.stride()):
        extent += (dim - 1) * stride
    return (offset * size, (offset + extent) * size)


class MemoryRange:
    """Bytes ``[_lo, _hi)`` of a storage (``_st``), with the shape and dtype reports name: an access
    as the detector and the reporter see it, where no tensor makes it (a graph replay's captured
    accesses; ``resize_`` copying a whole block). Same fields as a fake tensor."""

    __slots__ = ("sk_lo", "sk_hi", "sk_state", "shape", "dtype")
    sk_layout = None  # (a bounding range: _overlap)

    def __init__(self, lo: int, hi: int, state: Any, shape: Any, dtype: torch.dtype) -> None:
        self.sk_lo, self.sk_hi, self.sk_state, self.shape, self.dtype = lo, hi, state, shape, dtype


class Kernel:
    """One unit of device work: the op, the stream and its sequence number there, the issue site;
    and, for a scheduler that runs it later, ``call`` with its (unwrapped) arguments (:meth:`bind`).

    ``op`` names the work (an aten overload); ``call`` runs it on the unwrapped arguments. A kernel
    run at issue is never bound (it keeps no arguments alive).
    """

    # (deps, fills, order, held: set by a deferred scheduler when it queues the kernel)
    __slots__ = ("op", "stream", "seq", "site", "call", "args", "kwargs", "deps", "fills", "order", "held")

    def __init__(self, op: Any, stream: StreamState, seq: int, site: Any) -> None:
        self.op = op
        self.stream = stream
        self.seq = seq
        self.site = site

    def bind(self, call: Any, args: Any, kwargs: Any) -> "Kernel":
        self.call = call
        self.args = args
        self.kwargs = kwargs
        return self

    def run(self) -> Any:
        args, kwargs = self.args, self.kwargs
        self.args = self.kwargs = None  # a finished kernel keeps no tensors alive
        return self.call(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<kernel {self.op} on stream {self.stream!r} #{self.seq}>"


class EagerScheduler:
    """Runs every kernel when it is issued: values are those of a fully synchronous device.

    Deferred schedules implement the same ``submit``.
    """

    runs_at_issue = True  # submit() runs the kernel before returning: launchers may run it inline

    def submit(self, kernel: Kernel, sync: Any = None, accesses: Any = None) -> Any:
        return kernel.run()

    run_now = submit
