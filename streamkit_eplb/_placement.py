"""Expert placements and the rebalancer (DeepSeek's published EPLB algorithm, implemented here).

A placement says which logical expert every physical expert slot holds. Slots are numbered
rank-major: with ``P`` slots over ``R`` ranks, rank ``r`` hosts slots ``[r*P/R, (r+1)*P/R)``.

* ``phy2log``: int64 ``(L, P)``: the logical expert of every slot (vLLM's ``physical_to_logical_map``);
  ``-1`` marks an empty slot (elastic expert parallelism: a slot whose weights are not loaded).
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
still has room" with an equal number of items per pack.

``algorithm="deepseek"`` reproduces DeepSeek's ``rebalance_experts`` bit for bit (float32 loads,
its sort and its tie-breaking); ``algorithm="vllm"`` reproduces vLLM's ``DefaultEplbPolicy``
(numpy's sort, float64 sums). ``algorithm="default"`` computes both, keeps per layer the one with the
lower peak rank load (also vLLM's initial layout where it keeps every group on its node), then
improves it by swapping experts between the most loaded rank and the other ranks of its node while
that lowers the peak: so its balancedness is never below either engine's on any layer.

With ``old=`` (the placement in use) the result keeps experts where they are whenever balance
allows: a layer whose old placement is no worse for the new load is kept as it is; otherwise the
new ranks' contents are assigned to the old ranks (and nodes) they share the most experts with, and
inside a rank every expert that was already there keeps its slot (vLLM's ``preserve_intragpu_slots``).
None of that changes a rank's load. ``Placement.moved`` is then the number of slots whose expert
changes (the expert weights to copy); never more than the from-scratch placement's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["Placement", "rebalance"]

EMPTY = -1  # phy2log value of an empty slot (elastic EP)
_ALGORITHMS = ("default", "deepseek", "vllm")


def _int_arg(value: Any, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{where}({name}): expected an int > 0, got {value!r}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _as_id_tensor(value: Any, name: str, where: str) -> torch.Tensor:
    """An int64 CPU tensor of expert ids from a tensor, array or (nested) list; errors name ``name``."""
    if isinstance(value, torch.Tensor):
        table = value
    else:
        if isinstance(value, (str, bytes)) or value is None:
            raise TypeError(f"{where}({name}): expected a tensor or a list of integer expert ids, got {type(value).__name__} {value!r}")
        try:
            table = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(
                f"{where}({name}): expected a (P,) or (num_layers, P) map of integer expert ids (rows of"
                f" equal length), got {_short(value)}"
            ) from None
    if table.numel() == 0:
        raise ValueError(f"{where}({name}): expected at least one slot (a non-empty map of integer expert ids), got {_short(value)} of shape {tuple(table.shape)}")
    if table.dtype.is_floating_point or table.dtype.is_complex or table.dtype == torch.bool:
        raise TypeError(f"{where}({name}): expected integer expert ids, got {table.dtype}")
    return table.to("cpu", torch.int64)


@dataclass(frozen=True, eq=False)
class Placement:
    """One expert placement; see the module docstring for the three tensors. Build it with
    :meth:`from_phy2log`, :meth:`identity` or :func:`rebalance`. ``moved``: set by
    ``rebalance(..., old=...)``: slots (over all layers) whose expert changed, else ``None``."""

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    moved: int | None = field(default=None, compare=False)

    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_physical(self) -> int:
        return self.phy2log.shape[1]

    @property
    def num_logical(self) -> int:
        return self.logcnt.shape[1]

    @property
    def num_empty(self) -> int:
        """Empty slots (``-1`` in ``phy2log``), over all layers."""
        return int((self.phy2log == EMPTY).sum())

    @classmethod
    def from_phy2log(cls, phy2log: Any, num_logical: int | None = None, *, num_layers: int | None = None) -> "Placement":
        """The placement of ``phy2log`` (``(P,)`` for every layer, or ``(L, P)``); ``num_logical``
        defaults to the largest id + 1. Every logical expert in ``[0, num_logical)`` needs a slot;
        ``-1`` marks an empty slot (elastic expert parallelism)."""
        where = "Placement.from_phy2log"
        mapping = _as_id_tensor(phy2log, "phy2log", where)
        if num_layers is not None:
            _int_arg(num_layers, "num_layers", where)
        if mapping.dim() == 1:
            mapping = mapping.unsqueeze(0).expand(num_layers or 1, -1)
        if mapping.dim() != 2:
            raise ValueError(f"{where}(phy2log): expected shape (P,) or (num_layers, P), got {tuple(mapping.shape)}")
        if num_layers is not None and mapping.shape[0] != num_layers:
            raise ValueError(f"{where}(phy2log): {mapping.shape[0]} layers, expected num_layers={num_layers}")
        mapping = mapping.contiguous()
        if num_logical is None:
            num_logical = int(mapping.max()) + 1
            if num_logical <= 0:
                raise ValueError(f"{where}(phy2log): every slot is empty (-1); at least one logical expert needs a slot")
        _int_arg(num_logical, "num_logical", where)
        if int(mapping.min()) < EMPTY or int(mapping.max()) >= num_logical:
            raise ValueError(
                f"{where}(phy2log): ids must lie in [0, num_logical={num_logical}) or be -1 (an empty slot),"
                f" got values in [{int(mapping.min())}, {int(mapping.max())}]"
            )
        layers, slots = mapping.shape
        filled = mapping >= 0
        logcnt = torch.zeros(layers, num_logical + 1, dtype=torch.int64)
        logcnt.scatter_add_(1, torch.where(filled, mapping, num_logical), torch.ones_like(mapping))
        logcnt = logcnt[:, :num_logical].contiguous()
        if bool((logcnt == 0).any()):
            layer, expert = (logcnt == 0).nonzero()[0].tolist()
            raise ValueError(
                f"{where}(phy2log): logical expert {expert} has no slot in layer {layer}; every logical"
                f" expert in [0, {num_logical}) needs at least one replica"
            )
        width = int(logcnt.max())
        # log2phy in one pass: sort the slots by (logical id, slot), the replica index is the
        # position inside its expert's run
        key = torch.where(filled, mapping, num_logical) * slots + torch.arange(slots)
        order = torch.argsort(key, dim=1)
        logical_sorted = mapping.gather(1, order)
        starts = torch.cumsum(logcnt, 1) - logcnt
        keep = logical_sorted >= 0
        safe = logical_sorted.clamp(min=0)
        replica = torch.arange(slots).expand(layers, -1) - starts.gather(1, safe)
        log2phy = torch.full((layers, num_logical * width + 1), EMPTY, dtype=torch.int64)
        flat = torch.where(keep, safe * width + replica, num_logical * width)
        log2phy.scatter_(1, flat, torch.where(keep, order, EMPTY))
        log2phy = log2phy[:, : num_logical * width].reshape(layers, num_logical, width)
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
        replicas uniformly, such as vLLM's, does on average). Empty slots carry no load."""
        load = torch.as_tensor(logical_load).to(torch.float64)
        if tuple(load.shape) != (self.num_layers, self.num_logical):
            raise ValueError(
                f"Placement.rank_load(logical_load): expected shape ({self.num_layers}, {self.num_logical}),"
                f" got {tuple(load.shape)}"
            )
        filled = self.phy2log >= 0
        per_slot = (load / self.logcnt.to(torch.float64)).gather(1, self.phy2log.clamp(min=0))
        per_slot = torch.where(filled, per_slot, torch.zeros_like(per_slot))
        out = torch.zeros(self.num_layers, num_ranks, dtype=torch.float64)
        out.index_add_(1, self.rank_of_slot(num_ranks), per_slot)
        return out

    def moved_from(self, old: "Placement | Any") -> int:
        """Slots (over all layers) whose expert differs from ``old`` (a Placement or a ``phy2log``
        of the same shape): the expert weights a switch from ``old`` to this placement copies."""
        before = old.phy2log if isinstance(old, Placement) else _as_id_tensor(old, "old", "Placement.moved_from")
        if before.dim() == 1:
            before = before.unsqueeze(0).expand(self.num_layers, -1)
        if tuple(before.shape) != tuple(self.phy2log.shape):
            raise ValueError(
                f"Placement.moved_from(old): shape {tuple(before.shape)}, this placement has {tuple(self.phy2log.shape)}"
            )
        return int(((self.phy2log != before) & (self.phy2log >= 0)).sum())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Placement):
            return NotImplemented
        return torch.equal(self.phy2log, other.phy2log) and self.num_logical == other.num_logical

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        moved = "" if self.moved is None else f", moved={self.moved}"
        return (
            f"Placement(num_layers={self.num_layers}, num_logical={self.num_logical},"
            f" num_physical={self.num_physical}, max_replicas={self.log2phy.shape[2]}{moved})"
        )


# -- the packing steps, vectorized over layers (rows) ---------------------------------------------
def _pack(weight: np.ndarray, order: np.ndarray, num_packs: int, acc_dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """Greedy balanced packing of every row: items in ``order`` (heaviest first), each onto the
    lightest pack with room left (ties: the lowest pack index), ``n / num_packs`` items per pack;
    pack loads accumulate in ``acc_dtype``. Returns ``(pack, position in pack)`` per item."""
    rows, n = weight.shape
    per_pack = n // num_packs
    if per_pack == 1:
        return np.tile(np.arange(n, dtype=np.int64), (rows, 1)), np.zeros((rows, n), dtype=np.int64)
    ordered = np.take_along_axis(weight, order, axis=1).astype(acc_dtype)
    # pack loads, a full pack set to inf (vLLM does the same; DeepSeek skips full packs: equivalent)
    load = np.zeros(rows * num_packs, dtype=acc_dtype)
    filled = np.zeros(rows * num_packs, dtype=np.int64)
    pack_sorted = np.empty((rows, n), dtype=np.int64)
    slot_sorted = np.empty((rows, n), dtype=np.int64)
    base = np.arange(rows) * num_packs
    view = load.reshape(rows, num_packs)
    for k in range(n):
        pack = view.argmin(axis=1)
        flat = base + pack
        position = filled[flat]
        pack_sorted[:, k] = pack
        slot_sorted[:, k] = position
        load[flat] += ordered[:, k]
        filled[flat] = position + 1
        if k + 1 >= per_pack:  # a pack can be full from here on
            load[flat[position + 1 == per_pack]] = np.inf
    pack_of = np.empty((rows, n), dtype=np.int64)
    slot_of = np.empty((rows, n), dtype=np.int64)
    np.put_along_axis(pack_of, order, pack_sorted, axis=1)
    np.put_along_axis(slot_of, order, slot_sorted, axis=1)
    return pack_of, slot_of


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1], dtype=np.int64), perm.shape), axis=1)
    return inv


def _hierarchical(weight32: np.ndarray, num_phy: int, groups: int, nodes: int, ranks: int, flavour: str) -> np.ndarray:
    """phy2log ``(L, num_phy)`` by the hierarchical algorithm, in DeepSeek's arithmetic
    (``flavour="deepseek"``: torch float32 and torch's sort) or vLLM's (``"vllm"``: numpy, float64)."""
    layers, num_log = weight32.shape
    group_size = num_log // groups
    groups_per_node = groups // nodes
    per_rank = num_phy // ranks
    deepseek = flavour == "deepseek"

    def order_of(w: np.ndarray) -> np.ndarray:
        if deepseek:  # DeepSeek: torch's descending sort of the float32 loads
            return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).sort(-1, descending=True).indices.numpy()
        return np.argsort(-w, axis=-1)  # vLLM: numpy's default sort

    acc = np.float32 if deepseek else np.float64
    # (1) groups onto nodes
    if deepseek:
        per_group = torch.from_numpy(weight32).unflatten(-1, (groups, group_size)).sum(-1).numpy()
    else:
        per_group = weight32.reshape(layers, groups, group_size).sum(axis=-1)
    node_of, pos_in_node = _pack(per_group, order_of(per_group), nodes, acc)
    log2mlog = (((node_of * groups_per_node + pos_in_node) * group_size)[..., None]
                + np.arange(group_size, dtype=np.int64)).reshape(layers, num_log)
    mlog2log = _inverse(log2mlog)
    # (2) replicas inside every node: each extra slot to the expert with the highest load per replica
    node_load = np.take_along_axis(weight32, mlog2log, axis=1).reshape(-1, num_log // nodes)
    phy_per_node = num_phy // nodes
    rows, node_log = node_load.shape
    phy2mlog = np.tile(np.arange(phy_per_node, dtype=np.int64), (rows, 1))
    count = np.ones((rows, node_log), dtype=np.int64)
    every = np.arange(rows)
    if deepseek:
        # DeepSeek: (float32 load / replicas).max(dim=-1).indices in torch; the same float32
        # division here, and numpy's argmax also takes the first maximum on ties
        count32 = count.astype(np.float32)
        for slot in range(node_log, phy_per_node):
            best = np.argmax(node_load / count32, axis=-1)
            phy2mlog[:, slot] = best
            count32[every, best] += 1
        per_phy = np.take_along_axis(node_load / count32, phy2mlog, axis=1)
    else:
        for slot in range(node_log, phy_per_node):
            best = np.argmax(node_load / count, axis=-1)
            phy2mlog[:, slot] = best
            count[every, best] += 1
        per_phy = np.take_along_axis(node_load / count, phy2mlog, axis=1)
    # (3) the node's physical experts onto its ranks
    rank_of, pos_in_rank = _pack(per_phy, order_of(per_phy), ranks // nodes, acc)
    pphy2phy = _inverse(rank_of * per_rank + pos_in_rank)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1)
    pphy2mlog = (pphy2mlog.reshape(layers, nodes, -1)
                 + np.arange(0, num_log, num_log // nodes, dtype=np.int64)[None, :, None]).reshape(layers, -1)
    return np.take_along_axis(mlog2log, pphy2mlog, axis=1)


def _rank_loads(weight: np.ndarray, phy2log: np.ndarray, ranks: int) -> np.ndarray:
    """``(L, ranks)`` float64 rank loads, each expert's load split evenly over its replicas."""
    layers, num_log = weight.shape
    count = np.zeros((layers, num_log), dtype=np.int64)
    np.add.at(count, (np.arange(layers)[:, None], phy2log), 1)
    per_slot = np.take_along_axis(weight / np.maximum(count, 1), phy2log, axis=1)
    return per_slot.reshape(layers, ranks, -1).sum(axis=2)


def _improve(weight: np.ndarray, phy2log: np.ndarray, nodes: int, ranks: int, max_rounds: int) -> np.ndarray:
    """Lower the peak rank load of every layer by swapping one expert of its most loaded rank with
    one of another rank of the same node, while a swap brings that pair below the old peak
    (every layer at once; a layer stops when no swap helps it)."""
    layers, num_phy = phy2log.shape
    per_rank = num_phy // ranks
    per_node = ranks // nodes
    out = phy2log.copy()
    every = np.arange(layers)
    count = np.zeros(weight.shape, dtype=np.int64)
    np.add.at(count, (every[:, None], phy2log), 1)
    slot_w = np.take_along_axis(weight / np.maximum(count, 1), phy2log, axis=1).reshape(layers, ranks, per_rank)
    loads = slot_w.sum(axis=2)
    active = np.ones(layers, dtype=bool)
    local = np.arange(per_node)
    lightest = min(per_node - 1, 4)  # swap partners: the lightest ranks of the node (cheap, and where swaps help)
    if lightest <= 0:
        return out
    for _ in range(max_rounds):
        rows = every[active]
        if rows.size == 0:
            break
        top = np.argmax(loads[rows], axis=1)
        peak = loads[rows, top]
        node_ranks = (top // per_node * per_node)[:, None] + local  # the ranks of top's node
        order = np.argsort(loads[rows[:, None], node_ranks], axis=1, kind="stable")[:, :lightest]
        mates = np.take_along_axis(node_ranks, order, axis=1)
        mine = slot_w[rows, top]  # (n, per_rank)
        theirs = slot_w[rows[:, None], mates]  # (n, per_node, per_rank)
        delta = mine[:, :, None, None] - theirs[:, None, :, :]  # (n, a, other, b): a leaves top, b joins
        pair = np.maximum(peak[:, None, None, None] - delta, loads[rows[:, None], mates][:, None, :, None] + delta)
        pair[(delta <= 0) | (mates == top[:, None])[:, None, :, None]] = np.inf
        flat = pair.reshape(rows.size, -1)
        best = np.argmin(flat, axis=1)
        better = flat[np.arange(rows.size), best] < peak * (1 - 1e-12)
        active[rows[~better]] = False
        if not better.any():
            break
        rows, top, best = rows[better], top[better], best[better]
        a, other, b = np.unravel_index(best, (per_rank, lightest, per_rank))
        mate = mates[better, other]
        sa, sb = top * per_rank + a, mate * per_rank + b
        out[rows, sa], out[rows, sb] = out[rows, sb], out[rows, sa].copy()
        wa, wb = slot_w[rows, top, a], slot_w[rows, mate, b]
        slot_w[rows, top, a], slot_w[rows, mate, b] = wb, wa
        loads[rows, top] += wb - wa
        loads[rows, mate] += wa - wb
    return out


def _occurrence(blocks: np.ndarray, num_log: int) -> np.ndarray:
    """``occ[r, j]``: how many earlier entries of row ``r`` hold the same value as ``blocks[r, j]``."""
    rows, width = blocks.shape
    key = (np.arange(rows)[:, None] * (num_log + 2) + blocks + 1).ravel()
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    first = np.r_[True, sorted_key[1:] != sorted_key[:-1]]
    run_start = np.maximum.accumulate(np.where(first, np.arange(key.size), 0))
    occ = np.empty(key.size, dtype=np.int64)
    occ[order] = np.arange(key.size) - run_start
    return occ.reshape(rows, width)


def _keep_slots(new: np.ndarray, old: np.ndarray, num_log: int) -> np.ndarray:
    """``new`` (ranks, slots per rank) reordered inside every rank so that each expert that ``old``
    had on that rank keeps its old slot (as many of its copies as both have); the other experts
    fill the freed slots in order."""
    ranks, width = new.shape
    rows = np.arange(ranks)[:, None]

    def counts(blocks: np.ndarray) -> np.ndarray:
        c = np.zeros((ranks, num_log + 1), dtype=np.int64)
        np.add.at(c, (np.broadcast_to(rows, blocks.shape), np.where(blocks >= 0, blocks, num_log)), 1)
        c[:, num_log] = 0  # empty slots are never kept
        return c

    new_count, old_count = counts(new), counts(old)
    old_ids = np.where(old >= 0, old, num_log)
    new_ids = np.where(new >= 0, new, num_log)
    keep = _occurrence(old, num_log) < new_count[rows, old_ids]  # old slots whose expert stays
    moving = _occurrence(new, num_log) >= old_count[rows, new_ids]  # new entries without a kept slot
    out = np.where(keep, old, 0)
    # per rank as many free slots as moving entries: zip them in (rank, position) order
    out[np.nonzero(~keep)] = new[np.nonzero(moving)]
    return out


def _migrate(new: np.ndarray, old: np.ndarray, weight: np.ndarray, nodes: int, ranks: int) -> np.ndarray:
    """``new`` with its rank contents reassigned to old ranks (inside nodes, nodes to nodes) and its
    slots reordered inside ranks so that experts stay where they were; layers whose ``old``
    placement has no higher peak than ``new`` keep ``old``. Rank loads never change."""
    layers, num_phy = new.shape
    per_rank = num_phy // ranks
    ranks_per_node = ranks // nodes
    num_log = weight.shape[1]
    out = new.copy()
    old_peak = _rank_loads(weight, np.where(old >= 0, old, 0), ranks).max(axis=1) if bool((old >= 0).all()) else None
    new_peak = _rank_loads(weight, new, ranks).max(axis=1)

    def counts(phy: np.ndarray) -> np.ndarray:  # (ranks, num_log + 1): experts per rank (last: empty)
        c = np.zeros((ranks, num_log + 1), dtype=np.int64)
        rank = np.repeat(np.arange(ranks), per_rank)
        np.add.at(c, (rank, np.where(phy >= 0, phy, num_log)), 1)
        c[:, num_log] = 0
        return c

    def assign(overlap: np.ndarray) -> np.ndarray:
        """Greedy max-overlap assignment of new blocks (rows) to old blocks (columns); identity if
        that keeps at least as much."""
        n = overlap.shape[0]
        target = np.arange(n)
        if n > 1:
            work = overlap.astype(np.float64)
            for _ in range(n):
                i, j = divmod(int(np.argmax(work)), n)
                target[i] = j
                work[i, :] = -1.0
                work[:, j] = -1.0
            if overlap[np.arange(n), target].sum() <= np.trace(overlap):
                return np.arange(n)
        return target

    for layer in range(layers):
        if old_peak is not None and old_peak[layer] <= new_peak[layer] * (1 + 1e-12):
            out[layer] = old[layer]
            continue
        c_new, c_old = counts(new[layer]), counts(old[layer])
        # (new rank, old rank): experts in common, sum_e min(new[e], old[e]) = sum_t [new >= t] . [old >= t]
        overlap = np.zeros((ranks, ranks))
        for t in range(1, int(min(c_new.max(), c_old.max())) + 1):
            overlap += (c_new >= t).astype(np.float64) @ (c_old >= t).astype(np.float64).T
        overlap = overlap.astype(np.int64)
        blocks = new[layer].reshape(ranks, per_rank)
        # nodes onto nodes, then ranks onto ranks inside each node pair
        node_overlap = overlap.reshape(nodes, ranks_per_node, nodes, ranks_per_node).sum(axis=(1, 3))
        node_target = assign(node_overlap)
        placed = np.empty_like(blocks)
        for node in range(nodes):
            target_node = node_target[node]
            sub = overlap[node * ranks_per_node:(node + 1) * ranks_per_node,
                          target_node * ranks_per_node:(target_node + 1) * ranks_per_node]
            rank_target = assign(sub)
            for i in range(ranks_per_node):
                placed[target_node * ranks_per_node + rank_target[i]] = blocks[node * ranks_per_node + i]
        # inside every rank: an expert already there keeps its slot
        placed = _keep_slots(placed, old[layer].reshape(ranks, per_rank), num_log)
        out[layer] = placed.reshape(-1)
    return out


def rebalance(
    weight: Any,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
    *,
    algorithm: str = "default",
    old: "Placement | Any | None" = None,
) -> Placement:
    """A new placement for the load ``weight`` (``(L, num_logical)``, e.g. :meth:`Heat.to_vllm`).

    ``num_replicas`` physical slots in all (``>= num_logical``, divisible by ``num_ranks``);
    ``num_groups`` expert groups (``num_logical`` divisible by it), ``num_nodes`` nodes and
    ``num_ranks`` ranks (divisible by ``num_nodes``). Hierarchical when ``num_groups % num_nodes == 0``
    (then the groups per node must also divide evenly), global otherwise; see the module docstring.
    Same arguments as vLLM's ``rebalance_experts`` and DeepSeek's ``eplb.rebalance_experts``.

    ``algorithm``: ``"default"`` (never a lower balancedness than DeepSeek's or vLLM's on any
    layer), ``"deepseek"`` (DeepSeek's ``phy2log`` exactly) or ``"vllm"`` (vLLM's ``DefaultEplbPolicy``
    exactly, without ``old``). ``old``: the placement in use (a :class:`Placement` or its ``phy2log``,
    ``(L, num_replicas)``): keep experts in place where balance allows; ``Placement.moved`` is then the
    number of slots whose expert changes.
    """
    where = "rebalance"
    if isinstance(weight, (str, bytes)) or weight is None or isinstance(weight, (int, float)):
        raise TypeError(f"{where}(weight): expected a (num_layers, num_logical) tensor of loads, got {type(weight).__name__} {weight!r}")
    try:
        load = torch.as_tensor(weight)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{where}(weight): expected a (num_layers, num_logical) tensor of loads, got {type(weight).__name__} ({exc})") from None
    if load.dtype == torch.bool or load.dtype.is_complex:
        raise TypeError(f"{where}(weight): expected a real tensor, got {load.dtype}")
    load = load.to("cpu", torch.float64)
    if load.dim() != 2 or load.shape[1] == 0 or load.shape[0] == 0:
        raise ValueError(f"{where}(weight): expected shape (num_layers, num_logical), got {tuple(load.shape)}")
    if not bool(torch.isfinite(load).all()) or bool((load < 0).any()):
        raise ValueError(f"{where}(weight): loads must be finite and >= 0")
    for name, value in (("num_replicas", num_replicas), ("num_groups", num_groups), ("num_nodes", num_nodes), ("num_ranks", num_ranks)):
        _int_arg(value, name, where)
    if algorithm not in _ALGORITHMS:
        raise ValueError(f"{where}(algorithm): expected one of {', '.join(map(repr, _ALGORITHMS))}, got {algorithm!r}")
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
    old_map = None
    if old is not None:
        old_map = old.phy2log if isinstance(old, Placement) else _as_id_tensor(old, "old", where)
        if old_map.dim() == 1:
            old_map = old_map.unsqueeze(0).expand(num_layers, -1)
        if tuple(old_map.shape) != (num_layers, num_replicas):
            raise ValueError(f"{where}(old): expected a placement of shape ({num_layers}, {num_replicas}), got {tuple(old_map.shape)}")
        if int(old_map.min()) < EMPTY or int(old_map.max()) >= num_logical:
            raise ValueError(f"{where}(old): ids must lie in [-1, {num_logical}), got [{int(old_map.min())}, {int(old_map.max())}]")
        old_map = old_map.numpy().astype(np.int64)
    groups, nodes = (num_groups, num_nodes) if hierarchical else (1, 1)
    weight32 = load.to(torch.float32).numpy()
    if algorithm != "default":
        phy2log = _hierarchical(weight32, num_replicas, groups, nodes, num_ranks, algorithm)
    else:
        exact = load.numpy()
        candidates = [_hierarchical(weight32, num_replicas, groups, nodes, num_ranks, flavour) for flavour in ("deepseek", "vllm")]
        if nodes == 1 or num_replicas == num_logical:  # vLLM's initial layout keeps groups on their node
            candidates.append(np.tile(np.arange(num_replicas, dtype=np.int64) % num_logical, (num_layers, 1)))
        peaks = np.stack([_rank_loads(exact, c, num_ranks).max(axis=1) for c in candidates])  # (C, L)
        best = np.argmin(peaks, axis=0)  # first (DeepSeek's) on ties
        phy2log = np.stack(candidates)[best, np.arange(num_layers)]
        phy2log = _improve(exact, phy2log, nodes, num_ranks, max_rounds=2 * num_ranks)
    moved = None
    if old_map is not None:
        phy2log = _migrate(phy2log, old_map, load.numpy(), nodes, num_ranks)
        moved = int(((phy2log != old_map)).sum())
    result = Placement.from_phy2log(torch.from_numpy(np.ascontiguousarray(phy2log)), num_logical)
    if moved is not None:
        object.__setattr__(result, "moved", moved)
    return result
