"""Reference implementations of the engines, written for the tests from their published code.

* :func:`deepseek_rebalance`: DeepSeek's ``eplb.rebalance_experts`` (deepseek-ai/EPLB, eplb.py):
  torch float32, per-layer Python packing loop, ``sort(descending=True)``.
* :func:`vllm_rebalance`: vLLM's ``DefaultEplbPolicy.rebalance_experts``
  (vllm/distributed/eplb/policy/default.py): numpy, float64 pack sums, ``np.argsort(-w)``, and
  ``preserve_intragpu_slots`` when an old map is given.
* :class:`VllmEplb`: vLLM's expert-load accounting, one EP rank: the fused map-and-record kernel
  (``eplb_map_to_physical_and_record``: Knuth multiplicative hash of the token index, or the older
  flat-position modulo; padding and ``num_unpadded_tokens`` masked; ``record_enabled`` gate),
  ``EplbState.step`` (dummy steps not counted, the window ring, the rearrangement counter starting
  at 3/4 of the interval, the recording gate ``_should_record_current_step``) and
  ``EplbState.rearrange``'s input (window summed, mapped to logical experts with the *current*
  ``physical_to_logical_map``, all-reduced).
* :class:`AscendEplb`: vllm-ascend's dynamic-EPLB accounting: per-layer ``expert_tokens`` (group
  list type 0 = cumulative) added into ``moe_load`` per layer, a per-layer ring of
  ``num_iterations`` entries for FlashLB, gathered to ``(iter, L, world, E_local)`` and
  ``(L, world, E_local)``, counted only on collection steps.

These are test oracles, not part of the package. Loop structure follows the originals on purpose.
"""

from __future__ import annotations

import numpy as np
import torch

KNUTH = 2654435769  # floor(2**32 / golden ratio): vLLM's replica hash multiplier


# -- DeepSeek ------------------------------------------------------------------------------------
def _ds_pack(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    layers, n = weight.shape
    per = n // num_packs
    if per == 1:
        return torch.arange(n).expand(weight.shape), torch.zeros(weight.shape, dtype=torch.int64)
    order = weight.float().sort(-1, descending=True).indices
    pack_of = torch.full(weight.shape, -1, dtype=torch.int64)
    pos = torch.full(weight.shape, -1, dtype=torch.int64)
    for i in range(layers):
        loads = [0] * num_packs
        items = [0] * num_packs
        for g in order[i]:
            p = min((q for q in range(num_packs) if items[q] < per), key=loads.__getitem__)
            pack_of[i, g] = p
            pos[i, g] = items[p]
            loads[p] += weight[i, g]
            items[p] += 1
    return pack_of, pos


def _ds_replicate(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, num_log = weight.shape
    phy2log = torch.arange(num_phy).repeat(n, 1)
    logcnt = torch.ones(n, num_log, dtype=torch.int64)
    rows = torch.arange(n)
    for i in range(num_log, num_phy):
        best = (weight / logcnt).max(dim=-1).indices
        phy2log[:, i] = best
        logcnt[rows, best] += 1
    return phy2log, logcnt


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, torch.arange(perm.size(1)).expand(perm.shape))
    return inv


def deepseek_rebalance(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> torch.Tensor:
    """phy2log ``(L, num_replicas)`` as DeepSeek's ``rebalance_experts`` returns it."""
    weight = torch.as_tensor(weight).float().cpu()
    if num_groups % num_nodes != 0:
        num_groups, num_nodes = 1, 1
    layers, num_log = weight.shape
    group_size = num_log // num_groups
    per_node_groups = num_groups // num_nodes
    per_gpu = num_replicas // num_gpus
    per_group = weight.unflatten(-1, (num_groups, group_size)).sum(-1)
    gpack, grank = _ds_pack(per_group, num_nodes)
    log2mlog = (((gpack * per_node_groups + grank) * group_size).unsqueeze(-1) + torch.arange(group_size)).flatten(-2)
    mlog2log = _inverse(log2mlog)
    mlog_w = weight.gather(-1, mlog2log).view(-1, num_log // num_nodes)
    phy2mlog, mlogcnt = _ds_replicate(mlog_w, num_replicas // num_nodes)
    phy_w = (mlog_w / mlogcnt).gather(-1, phy2mlog)
    pack, rank = _ds_pack(phy_w, num_gpus // num_nodes)
    pphy2phy = _inverse(pack * per_gpu + rank)
    pphy2mlog = phy2mlog.gather(-1, pphy2phy)
    pphy2mlog = (pphy2mlog.view(layers, num_nodes, -1) + torch.arange(0, num_log, num_log // num_nodes).view(1, -1, 1)).flatten(-2)
    return mlog2log.gather(-1, pphy2mlog)


# -- vLLM's default policy -----------------------------------------------------------------------
def _v_pack(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    layers, n = weight.shape
    per = n // num_packs
    if per == 1:
        return np.tile(np.arange(n, dtype=np.int64), (layers, 1)), np.zeros((layers, n), dtype=np.int64)
    order = np.argsort(-weight, axis=-1)
    pack_of = np.full((layers, n), -1, dtype=np.int64)
    pos = np.full((layers, n), -1, dtype=np.int64)
    loads = np.zeros((layers, num_packs), dtype=np.float64)
    items = np.zeros((layers, num_packs), dtype=np.int64)
    for i in range(layers):
        for g in order[i]:
            p = int(np.argmin(loads[i]))
            pack_of[i, g] = p
            pos[i, g] = items[i, p]
            loads[i, p] += weight[i, g]
            items[i, p] += 1
            if items[i, p] == per:
                loads[i, p] = np.inf
    return pack_of, pos


def _v_replicate(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray]:
    n, num_log = weight.shape
    phy2log = np.tile(np.arange(num_phy, dtype=np.int64), (n, 1))
    logcnt = np.ones((n, num_log), dtype=np.int64)
    rows = np.arange(n)
    for i in range(num_log, num_phy):
        best = np.argmax(weight / logcnt, axis=-1)
        phy2log[:, i] = best
        logcnt[rows, best] += 1
    return phy2log, logcnt


def _v_inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    inv[np.arange(perm.shape[0])[:, None], perm] = np.arange(perm.shape[1], dtype=np.int64)
    return inv


def _v_preserve(phy2log: np.ndarray, num_ranks: int, old: np.ndarray) -> np.ndarray:
    """vLLM's ``preserve_intragpu_slots``: experts staying on a GPU keep their old slots."""
    layers, num_phy = phy2log.shape
    per = num_phy // num_ranks
    out = phy2log.copy()
    for layer in range(layers):
        for gpu in range(num_ranks):
            new_local = list(phy2log[layer, gpu * per:(gpu + 1) * per])
            used = [False] * per
            kept = [False] * per
            for slot in range(per):
                for j in range(per):
                    if not used[j] and new_local[j] == old[layer, gpu * per + slot]:
                        out[layer, gpu * per + slot] = new_local[j]
                        used[j] = kept[slot] = True
                        break
            rest = [new_local[j] for j in range(per) if not used[j]]
            free = [s for s in range(per) if not kept[s]]
            for s, e in zip(free, rest):
                out[layer, gpu * per + s] = e
    return out


def vllm_rebalance(weight, num_replicas: int, num_groups: int, num_nodes: int, num_ranks: int, old=None) -> torch.Tensor:
    """phy2log as vLLM's ``DefaultEplbPolicy.rebalance_experts`` returns it."""
    w = torch.as_tensor(weight).float().cpu().numpy()
    if num_groups % num_nodes != 0:
        num_groups, num_nodes = 1, 1
    layers, num_log = w.shape
    group_size = num_log // num_groups
    per_node_groups = num_groups // num_nodes
    per_gpu = num_replicas // num_ranks
    per_group = w.reshape(layers, num_groups, group_size).sum(axis=-1)
    gpack, grank = _v_pack(per_group, num_nodes)
    log2mlog = (((gpack * per_node_groups + grank)[..., None] * group_size) + np.arange(group_size, dtype=np.int64)).reshape(layers, num_log)
    mlog2log = _v_inverse(log2mlog)
    mlog_w = np.take_along_axis(w, mlog2log, axis=1).reshape(-1, num_log // num_nodes)
    phy2mlog, mlogcnt = _v_replicate(mlog_w, num_replicas // num_nodes)
    phy_w = np.take_along_axis(mlog_w / mlogcnt, phy2mlog, axis=1)
    pack, rank = _v_pack(phy_w, num_ranks // num_nodes)
    pphy2phy = _v_inverse(pack * per_gpu + rank)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1)
    pphy2mlog = (pphy2mlog.reshape(layers, num_nodes, -1) + np.arange(0, num_log, num_log // num_nodes, dtype=np.int64)[None, :, None]).reshape(layers, -1)
    out = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    if old is not None:
        out = _v_preserve(out, num_ranks, torch.as_tensor(old).numpy())
    return torch.from_numpy(out)


def peak_rank_load(weight, phy2log, num_ranks: int) -> torch.Tensor:
    """``(L,)`` float64: the most loaded rank per layer, every expert's load split over its replicas."""
    w = torch.as_tensor(weight, dtype=torch.float64)
    phy = torch.as_tensor(phy2log)
    count = torch.zeros_like(w).scatter_add_(1, phy, torch.ones(phy.shape, dtype=torch.float64))
    per_slot = (w / count.clamp(min=1)).gather(1, phy)
    return per_slot.reshape(w.shape[0], num_ranks, -1).sum(2).amax(1)


# -- vLLM's accounting ---------------------------------------------------------------------------
def vllm_map_and_record(topk_ids, load_view, log2phy, logcnt, enabled: bool, num_unpadded: int | None, replica: str = "hash") -> torch.Tensor:
    """One layer of vLLM's fused map-and-record kernel, element by element (int64 ids)."""
    ids = topk_ids.reshape(-1).tolist()
    top_k = topk_ids.shape[-1] if topk_ids.dim() > 1 else 1
    out = []
    for pos, e in enumerate(ids):
        if 0 <= e < logcnt.shape[0]:
            count = max(int(logcnt[e]), 1)
            token = pos // top_k
            r = ((token * KNUTH) & 0xFFFFFFFF) % count if replica == "hash" else pos % count
            phys = int(log2phy[e, r])
        else:
            phys = -1
        out.append(phys)
        unpadded = num_unpadded is None or pos < num_unpadded * top_k
        if enabled and unpadded and 0 <= phys < load_view.shape[0]:
            load_view[phys] += 1
    return torch.tensor(out, dtype=topk_ids.dtype).reshape(topk_ids.shape)


class VllmEplb:
    """vLLM's ``EplbState`` accounting for one model, all ranks simulated in one process (global
    physical ids: the all-reduce of ``expert_load_pass`` is the sum of the ranks' passes)."""

    def __init__(self, phy2log: torch.Tensor, num_logical: int, window: int, interval: int, replica: str = "hash") -> None:
        self.num_logical = num_logical
        self.window_size = window
        self.interval = interval
        self.replica = replica
        layers, slots = phy2log.shape
        self.load_pass = torch.zeros(layers, slots, dtype=torch.int64)
        self.load_window = torch.zeros(window, layers, slots, dtype=torch.int64)
        self.window_step = 0
        self.rearrangement_step = max(0, interval - interval // 4)  # starts at 3/4 of the interval
        self.set_map(phy2log)
        self.record_enabled = self.should_record()
        self.rearrangements: list[torch.Tensor] = []  # the global_expert_load_window of each

    def set_map(self, phy2log: torch.Tensor) -> None:
        self.phy2log = phy2log.clone()
        layers, slots = phy2log.shape
        self.logcnt = torch.zeros(layers, self.num_logical, dtype=torch.int64)
        self.log2phy = torch.full((layers, self.num_logical, slots), -1, dtype=torch.int64)
        for layer in range(layers):
            for slot in range(slots):  # slot order, as EplbState builds its map
                e = int(phy2log[layer, slot])
                if e >= 0:
                    self.log2phy[layer, e, self.logcnt[layer, e]] = slot
                    self.logcnt[layer, e] += 1

    def should_record(self) -> bool:
        return self.interval - self.rearrangement_step <= self.window_size

    def record(self, layer: int, topk_ids: torch.Tensor, num_unpadded: int | None) -> torch.Tensor:
        return vllm_map_and_record(topk_ids, self.load_pass[layer], self.log2phy[layer], self.logcnt[layer],
                                   self.record_enabled, num_unpadded, self.replica)

    def step(self, is_dummy: bool, rebalance_fn) -> bool:  # noqa: ANN001
        """``EplbState.step``; returns True when it rearranged (``rebalance_fn(load) -> phy2log``)."""
        if is_dummy:
            self.load_pass.zero_()
        else:
            self.load_window[self.window_step] = self.load_pass
            self.window_step = (self.window_step + 1) % self.window_size
            self.load_pass.zero_()
        self.rearrangement_step += 1
        rearranged = False
        if self.rearrangement_step >= self.interval:
            self.rearrangement_step = 0
            load = self.rearrange_input()
            self.rearrangements.append(load)
            self.set_map(rebalance_fn(load))  # the window is kept: stale passes, new map
            rearranged = True
        self.record_enabled = self.should_record()
        return rearranged

    def rearrange_input(self) -> torch.Tensor:
        window = self.load_window.sum(0)
        out = torch.zeros(window.shape[0], self.num_logical, dtype=torch.int64)
        return out.scatter_add_(1, self.phy2log.clamp(min=0), torch.where(self.phy2log >= 0, window, 0))


# -- vllm-ascend's accounting --------------------------------------------------------------------
class AscendEplb:
    """vllm-ascend's dynamic EPLB load accounting for ``world`` ranks of rank-local experts: each
    MoE layer adds its ``expert_tokens`` (``group_list_type == 0``: cumulative) into a per-layer
    ring slot; the ring of a layer advances when that layer has run (``num_iterations`` entries);
    only steps inside a heat-collection interval count; the gathered tensors are FlashLB's
    ``(iter, L, world, E_local)`` and the summed ``moe_load`` ``(L, world, E_local)``."""

    def __init__(self, world: int, layers: int, experts: int, num_iterations: int, collect_every: int) -> None:
        self.world, self.layers, self.experts = world, layers, experts
        self.num_iterations = num_iterations
        self.collect_every = collect_every
        self.ring = torch.zeros(world, num_iterations, layers, experts, dtype=torch.int64)
        self.position = [0] * layers  # per-layer ring position
        self.step_index = 0

    def collecting(self) -> bool:
        return self.step_index % self.collect_every == 0

    def layer(self, rank: int, layer: int, expert_tokens: torch.Tensor, cumulative: bool) -> None:
        tokens = expert_tokens.to(torch.int64)
        if cumulative:
            tokens = torch.diff(tokens, prepend=tokens.new_zeros(1))
        if self.collecting():
            self.ring[rank, self.position[layer], layer] += tokens

    def end_layer_pass(self, layer: int) -> None:
        if self.collecting():
            self.position[layer] = (self.position[layer] + 1) % self.num_iterations
            self.ring[:, self.position[layer], layer] = 0

    def end_step(self) -> None:
        self.step_index += 1

    def flashlb_load(self) -> torch.Tensor:
        """``(iter, L, world, E)``, oldest entry first per layer."""
        out = torch.empty(self.num_iterations, self.layers, self.world, self.experts, dtype=torch.int64)
        for layer in range(self.layers):
            order = [(self.position[layer] + 1 + i) % self.num_iterations for i in range(self.num_iterations)]
            out[:, layer] = self.ring[:, order, layer].permute(1, 0, 2)
        return out

    def moe_load(self) -> torch.Tensor:
        return self.flashlb_load().sum(0)
