"""Expert placements and the rebalancer (DeepSeek's published EPLB algorithm, implemented here).

A placement says which logical expert every physical expert slot holds. Slots are numbered
rank-major: with ``P`` slots over ``R`` ranks, rank ``r`` hosts slots ``[r*P/R, (r+1)*P/R)``.

* ``phy2log``: int64 ``(L, P)``: the logical expert of every slot (vLLM's ``physical_to_logical_map``).
* ``log2phy``: int64 ``(L, N, max_replicas)``: the slots of every logical expert, in increasing
  slot order, padded with ``-1`` (vLLM's ``logical_to_physical_map``).
* ``logcnt``: int64 ``(L, N)``: the number of replicas of every logical expert
  (vLLM's ``logical_replica_count``).

:func:`rebalance` follows the algorithm DeepSeek published with EPLB: when the expert groups divide
evenly over the nodes (``num_groups % num_nodes == 0``) it is *hierarchical*: (1) pack the expert
groups onto nodes so that the nodes' loads are balanced, (2) inside every node, give replicas to the
logical experts one at a time, each time to the expert with the highest load per replica, (3) pack
the node's physical experts onto its ranks, balanced. Otherwise it is *global*: the same with one
node and one group. Every packing is the greedy "heaviest item first onto the lightest pack that
still has room" with an equal number of items per pack. One addition: per layer, the initial layout
(slot ``i`` holds expert ``i % num_logical``) is kept instead when it balances better (the greedy
packing occasionally does worse; with several nodes only without redundant slots, where that layout
keeps every group on one node).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Placement", "rebalance"]


def _int_arg(value: Any, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{where}({name}): expected an int > 0, got {value!r}")
    return value


@dataclass(frozen=True, eq=False)
class Placement:
    """One expert placement; see the module docstring for the three tensors. Build it with
    :meth:`from_phy2log`, :meth:`identity` or :func:`rebalance`."""

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor

    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_physical(self) -> int:
        return self.phy2log.shape[1]

    @property
    def num_logical(self) -> int:
        return self.logcnt.shape[1]

    @classmethod
    def from_phy2log(cls, phy2log: Any, num_logical: int | None = None, *, num_layers: int | None = None) -> "Placement":
        """The placement of ``phy2log`` (``(P,)`` for every layer, or ``(L, P)``); ``num_logical``
        defaults to the largest id + 1. Every logical expert in ``[0, num_logical)`` needs a slot."""
        where = "Placement.from_phy2log"
        mapping = torch.as_tensor(phy2log)
        if mapping.dtype.is_floating_point or mapping.dtype.is_complex or mapping.dtype == torch.bool:
            raise TypeError(f"{where}(phy2log): expected integer expert ids, got {mapping.dtype}")
        mapping = mapping.to("cpu", torch.int64)
        if mapping.dim() == 1:
            mapping = mapping.unsqueeze(0).expand(num_layers or 1, -1)
        if mapping.dim() != 2 or mapping.shape[1] == 0:
            raise ValueError(f"{where}(phy2log): expected shape (P,) or (num_layers, P), got {tuple(mapping.shape)}")
        if num_layers is not None and mapping.shape[0] != num_layers:
            raise ValueError(f"{where}(phy2log): {mapping.shape[0]} layers, expected num_layers={num_layers}")
        mapping = mapping.contiguous()
        if num_logical is None:
            num_logical = int(mapping.max()) + 1
        _int_arg(num_logical, "num_logical", where)
        if int(mapping.min()) < 0 or int(mapping.max()) >= num_logical:
            raise ValueError(
                f"{where}(phy2log): ids must lie in [0, num_logical={num_logical}), got values in"
                f" [{int(mapping.min())}, {int(mapping.max())}]"
            )
        layers, _slots = mapping.shape
        logcnt = torch.zeros(layers, num_logical, dtype=torch.int64)
        logcnt.scatter_add_(1, mapping, torch.ones_like(mapping))
        if bool((logcnt == 0).any()):
            layer, expert = (logcnt == 0).nonzero()[0].tolist()
            raise ValueError(
                f"{where}(phy2log): logical expert {expert} has no slot in layer {layer}; every logical"
                f" expert in [0, {num_logical}) needs at least one replica"
            )
        width = int(logcnt.max())
        log2phy = torch.full((layers, num_logical, width), -1, dtype=torch.int64)
        for layer in range(layers):
            order = torch.argsort(mapping[layer], stable=True)  # slots grouped by logical id, in slot order
            logical_sorted = mapping[layer][order]
            starts = torch.cumsum(logcnt[layer], 0) - logcnt[layer]
            replica = torch.arange(order.numel()) - starts[logical_sorted]
            log2phy[layer, logical_sorted, replica] = order
        return cls(mapping, log2phy, logcnt)

    @classmethod
    def identity(cls, num_layers: int, num_logical: int) -> "Placement":
        """No redundancy: slot ``i`` holds logical expert ``i`` in every layer."""
        _int_arg(num_layers, "num_layers", "Placement.identity")
        _int_arg(num_logical, "num_logical", "Placement.identity")
        return cls.from_phy2log(torch.arange(num_logical).expand(num_layers, -1), num_logical)

    def rank_of_slot(self, num_ranks: int) -> torch.Tensor:
        """``(P,)``: the rank hosting every slot (slots are rank-major, ``P / num_ranks`` per rank)."""
        _int_arg(num_ranks, "num_ranks", "Placement.rank_of_slot")
        if self.num_physical % num_ranks:
            raise ValueError(
                f"Placement.rank_of_slot(num_ranks): {self.num_physical} slots do not divide over {num_ranks} ranks"
            )
        return torch.arange(self.num_physical) // (self.num_physical // num_ranks)

    def rank_load(self, logical_load: torch.Tensor, num_ranks: int) -> torch.Tensor:
        """``(L, num_ranks)`` float64: the load every rank would get if each logical expert's load
        ``logical_load`` (``(L, N)``) were split evenly over its replicas (what a router that picks
        replicas uniformly, such as vLLM's position-modulo choice, does on average)."""
        load = torch.as_tensor(logical_load).to(torch.float64)
        if tuple(load.shape) != (self.num_layers, self.num_logical):
            raise ValueError(
                f"Placement.rank_load(logical_load): expected shape ({self.num_layers}, {self.num_logical}),"
                f" got {tuple(load.shape)}"
            )
        per_slot = (load / self.logcnt.to(torch.float64)).gather(1, self.phy2log)
        out = torch.zeros(self.num_layers, num_ranks, dtype=torch.float64)
        out.index_add_(1, self.rank_of_slot(num_ranks), per_slot)
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Placement):
            return NotImplemented
        return torch.equal(self.phy2log, other.phy2log) and self.num_logical == other.num_logical

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"Placement(num_layers={self.num_layers}, num_logical={self.num_logical},"
            f" num_physical={self.num_physical}, max_replicas={self.log2phy.shape[2]})"
        )


def _balanced_packing(weight: list[float], num_packs: int) -> list[int]:
    """Pack len(weight) items into ``num_packs`` packs of equal count: heaviest item first, onto the
    lightest pack with room left (ties: the lowest pack). Returns the pack of every item."""
    per_pack = len(weight) // num_packs
    load = [0.0] * num_packs
    count = [0] * num_packs
    pack_of = [0] * len(weight)
    for item in sorted(range(len(weight)), key=lambda i: (-weight[i], i)):
        pack = min((p for p in range(num_packs) if count[p] < per_pack), key=lambda p: (load[p], p))
        pack_of[item] = pack
        load[pack] += weight[item]
        count[pack] += 1
    return pack_of


def _replicate(weight: list[float], num_slots: int) -> list[int]:
    """Replica counts: one each, then every extra slot to the expert with the highest load per replica."""
    count = [1] * len(weight)
    for _ in range(num_slots - len(weight)):
        best = max(range(len(weight)), key=lambda e: (weight[e] / count[e], -e))
        count[best] += 1
    return count


def _place_layer(weight: list[float], num_slots: int, num_groups: int, num_nodes: int, num_ranks: int) -> list[int]:
    """phy2log of one layer (hierarchical algorithm; the global one is num_groups = num_nodes = 1)."""
    num_logical = len(weight)
    group_size = num_logical // num_groups
    groups = [list(range(g * group_size, (g + 1) * group_size)) for g in range(num_groups)]
    # (1) groups onto nodes
    node_of_group = _balanced_packing([sum(weight[e] for e in grp) for grp in groups], num_nodes)
    slots_per_node = num_slots // num_nodes
    ranks_per_node = num_ranks // num_nodes
    slots_per_rank = num_slots // num_ranks
    phy2log = [0] * num_slots
    for node in range(num_nodes):
        experts = [e for g, grp in enumerate(groups) if node_of_group[g] == node for e in grp]
        # (2) replicas inside the node
        counts = _replicate([weight[e] for e in experts], slots_per_node)
        replicas = [(weight[e] / c, e) for e, c in zip(experts, counts) for _ in range(c)]
        # (3) the node's physical experts onto its ranks
        rank_of = _balanced_packing([w for w, _ in replicas], ranks_per_node)
        filled = [0] * ranks_per_node
        for (_w, expert), rank in zip(replicas, rank_of):
            slot = (node * ranks_per_node + rank) * slots_per_rank + filled[rank]
            phy2log[slot] = expert
            filled[rank] += 1
    return phy2log


def rebalance(weight: Any, num_replicas: int, num_groups: int, num_nodes: int, num_ranks: int) -> Placement:
    """A new placement for the load ``weight`` (``(L, num_logical)``, e.g. :meth:`Heat.to_vllm`).

    ``num_replicas`` physical slots in all (``>= num_logical``, divisible by ``num_ranks``);
    ``num_groups`` expert groups (``num_logical`` divisible by it), ``num_nodes`` nodes and
    ``num_ranks`` ranks (divisible by ``num_nodes``). Hierarchical when ``num_groups % num_nodes == 0``
    (then the groups per node must also divide evenly), global otherwise; see the module docstring.
    Same arguments as vLLM's ``rebalance_experts`` and DeepSeek's ``eplb.rebalance_experts``.
    """
    where = "rebalance"
    load = torch.as_tensor(weight)
    if load.dtype == torch.bool or load.dtype.is_complex:
        raise TypeError(f"{where}(weight): expected a real tensor, got {load.dtype}")
    load = load.to("cpu", torch.float64)
    if load.dim() != 2 or load.shape[1] == 0:
        raise ValueError(f"{where}(weight): expected shape (num_layers, num_logical), got {tuple(load.shape)}")
    if not bool(torch.isfinite(load).all()) or bool((load < 0).any()):
        raise ValueError(f"{where}(weight): loads must be finite and >= 0")
    for name, value in (("num_replicas", num_replicas), ("num_groups", num_groups), ("num_nodes", num_nodes), ("num_ranks", num_ranks)):
        _int_arg(value, name, where)
    num_layers, num_logical = load.shape
    if num_replicas < num_logical:
        raise ValueError(f"{where}(num_replicas): {num_replicas} slots cannot hold {num_logical} logical experts")
    if num_replicas % num_ranks:
        raise ValueError(f"{where}(num_replicas): {num_replicas} slots do not divide over num_ranks={num_ranks}")
    if num_ranks % num_nodes:
        raise ValueError(f"{where}(num_nodes): num_ranks={num_ranks} is not divisible by num_nodes={num_nodes}")
    if num_logical % num_groups:
        raise ValueError(f"{where}(num_groups): num_logical={num_logical} is not divisible by num_groups={num_groups}")
    hierarchical = num_groups % num_nodes == 0
    if hierarchical and num_logical // num_nodes > num_replicas // num_nodes:
        raise ValueError(f"{where}: a node's {num_logical // num_nodes} experts need more than its {num_replicas // num_nodes} slots")
    groups, nodes = (num_groups, num_nodes) if hierarchical else (1, 1)
    # The greedy packing occasionally balances worse than the initial layout (slot i holds expert
    # i % num_logical, vLLM's start), e.g. 0.926 vs 0.947 on 8 Zipf-loaded experts over 2 ranks.
    # Per layer, keep whichever balances better; with several nodes only when that layout keeps
    # every group on one node (no redundant slots), so the hierarchical guarantee holds.
    guard = nodes == 1 or num_replicas == num_logical
    rows = []
    for layer in range(num_layers):
        weights = load[layer].tolist()
        packed = _place_layer(weights, num_replicas, groups, nodes, num_ranks)
        if guard:
            initial = [slot % num_logical for slot in range(num_replicas)]
            if _peak(weights, initial, num_ranks) < _peak(weights, packed, num_ranks):
                packed = initial
        rows.append(packed)
    return Placement.from_phy2log(torch.tensor(rows, dtype=torch.int64), num_logical)


def _peak(weight: list[float], phy2log: list[int], num_ranks: int) -> float:
    """The largest rank load of one layer's placement, each expert's load split over its replicas."""
    count = [0] * len(weight)
    for expert in phy2log:
        count[expert] += 1
    per_rank = len(phy2log) // num_ranks
    loads = [0.0] * num_ranks
    for slot, expert in enumerate(phy2log):
        loads[slot // per_rank] += weight[expert] / count[expert]
    return max(loads)
