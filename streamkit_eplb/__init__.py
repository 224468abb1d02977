"""streamkit_eplb: the MoE expert-heat collector for expert-parallel load balancing (EPLB).

One implementation on ``streamkit`` streams only, shared by NPU (vllm-ascend) and CUDA (vLLM-style)
engines, tested race-free on streamkit's fake backend. See docs/eplb.md.

>>> from streamkit_eplb import HeatCollector, HeatHistory
>>> c = HeatCollector(num_layers, num_experts, group=ep_group)       # doctest: +SKIP
>>> c.record(layer, expert_tokens)        # one kernel, current stream   # doctest: +SKIP
>>> heat = c.collect().wait()                                        # doctest: +SKIP
>>> heat.load.shape  # (num_layers, world_size, num_experts), int64 on the CPU   # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "CollectError", "Heat", "HeatCollector", "HeatHandle", "HeatHistory", "Placement", "balancedness_of",
    "collect_all", "cuda_record_kernel", "rebalance",
]

# Imported lazily, so `python -m streamkit_eplb demo` starts its ranks without importing torch first.
_HOMES = {
    "CollectError": "._collector",
    "HeatCollector": "._collector",
    "HeatHandle": "._collector",
    "collect_all": "._collector",
    "cuda_record_kernel": "._ops",
    "Heat": "._heat",
    "HeatHistory": "._heat",
    "balancedness_of": "._heat",
    "Placement": "._placement",
    "rebalance": "._placement",
}

if TYPE_CHECKING:  # pragma: no cover
    from ._collector import CollectError, HeatCollector, HeatHandle, collect_all
    from ._ops import cuda_record_kernel
    from ._heat import Heat, HeatHistory, balancedness_of
    from ._placement import Placement, rebalance


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'streamkit_eplb' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
