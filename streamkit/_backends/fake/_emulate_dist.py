"""``torch.distributed`` under device emulation: NCCL (cuda) and HCCL (npu) process groups run on
gloo, with the process-group streams and ``Work.wait`` semantics the fake already models for
collectives on fake tensors, and NCCL-shaped outputs accepted.

# NCCL: all_gather_into_tensor takes its output as (world * N, ...) or (world, N, ...) (the "stacked"
# form; torch/distributed/distributed_c10d.py all_gather_into_tensor docstring); gloo's
# _allgather_base wants the concatenated form, so a stacked output is gathered through its
# (world * N, ...) view: the same bytes, so the accesses the fake tracks are the same.
"""

from __future__ import annotations

from typing import Any

import torch

_DEVICE_BACKENDS = {"cuda": "nccl", "npu": "hccl"}


def _gloo(backend: Any, kind: str) -> Any:
    """``backend`` with the emulated device's collective library replaced by gloo."""
    if backend is None:
        return "gloo"
    text = str(backend).lower()
    if _DEVICE_BACKENDS[kind] not in text:
        return backend
    return "gloo"


def _flat(out: Any, inp: Any) -> Any:
    if isinstance(out, torch.Tensor) and isinstance(inp, torch.Tensor) and out.dim() == inp.dim() + 1 and inp.dim() > 0:
        return out.flatten(0, 1)
    return out


def install(current: Any) -> None:
    if not torch.distributed.is_available():
        return
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    kind = current.kind
    patches = current.patches
    init_process_group = c10d.init_process_group
    new_group = c10d.new_group
    all_gather_into_tensor = c10d.all_gather_into_tensor
    reduce_scatter_tensor = c10d.reduce_scatter_tensor

    def init(backend: Any = None, *args: Any, **kwargs: Any) -> Any:
        if "device_id" in kwargs:  # (a CUDA device to bind the NCCL communicator to: gloo binds none)
            kwargs.pop("device_id")
        return init_process_group(_gloo(backend, kind), *args, **kwargs)

    def group(ranks: Any = None, timeout: Any = None, backend: Any = None, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("device_id", None)
        return new_group(ranks, timeout, _gloo(backend, kind) if backend is not None else None, *args, **kwargs)

    def gather_into(output_tensor: Any, input_tensor: Any, *args: Any, **kwargs: Any) -> Any:
        return all_gather_into_tensor(_flat(output_tensor, input_tensor), input_tensor, *args, **kwargs)

    def scatter_from(output: Any, input: Any, *args: Any, **kwargs: Any) -> Any:
        return reduce_scatter_tensor(output, _flat(input, output), *args, **kwargs)

    init.__doc__ = init_process_group.__doc__
    for owner in (dist, c10d):
        patches.set(owner, "init_process_group", init)
        patches.set(owner, "new_group", group)
        patches.set(owner, "all_gather_into_tensor", gather_into)
        patches.set(owner, "reduce_scatter_tensor", scatter_from)
    if kind == "cuda":
        patches.set(dist, "is_nccl_available", lambda: True)
        patches.set(c10d, "is_nccl_available", lambda: True)
