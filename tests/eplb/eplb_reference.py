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
    """vLLM's ``EplbState`` accounting for one model on one EP rank (vllm/distributed/eplb/eplb_state.py).

    ``record``: the fused map-and-record kernel into ``expert_load_pass`` (global physical slots),
    gated by ``should_record_tensor`` (allocated as ``ones``: the first step records).
    ``step(is_dummy)``: a dummy step zeroes the pass; otherwise, if ``_should_record_current_step()``
    (``interval - expert_rearrangement_step <= window_size``), the pass is copied into the window
    ring and zeroed (if not, it is left as it is); then ``expert_rearrangement_step += 1``, which
    starts at 3/4 of the interval; at the interval it is reset and ``rearrange()`` maps the window
    with the *current* ``physical_to_logical_map``, sums it (the input of the policy), commits the
    new maps and keeps the window; last, the gate is set for the next step.
    """

    def __init__(self, phy2log: torch.Tensor, num_logical: int, window: int, interval: int, replica: str = "hash") -> None:
        self.num_logical = num_logical
        self.window_size = window
        self.interval = interval
        self.replica = replica
        layers, slots = phy2log.shape
        self.load_pass = torch.zeros(layers, slots, dtype=torch.int64)
        self.load_window = torch.zeros(window, layers, slots, dtype=torch.int64)
        self.window_step = 0
        self.rearrangement_step = max(0, interval - interval // 4)
        self.set_map(phy2log)
        self.record_enabled = True  # should_record_tensor = torch.ones(())
        self.rearrangements: list[torch.Tensor] = []  # the policy's input at every rearrangement

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

    def step(self, is_dummy: bool, policy) -> torch.Tensor | None:  # noqa: ANN001
        """``EplbState.step``; returns the policy's input when it rearranged
        (``policy(load, old_phy2log) -> new phy2log``)."""
        if is_dummy:
            self.load_pass.zero_()
        else:
            if self.should_record():
                self.load_window[self.window_step] = self.load_pass
                self.load_pass.zero_()
                self.window_step = (self.window_step + 1) % self.window_size
        self.rearrangement_step += 1
        load = None
        if self.rearrangement_step >= self.interval:
            self.rearrangement_step = 0
            load = self.rearrange_input()
            self.rearrangements.append(load)
            self.set_map(policy(load, self.phy2log))  # the window is kept
        self.record_enabled = self.should_record()
        return load

    def rearrange_input(self) -> torch.Tensor:
        window = self.load_window.sum(0)
        out = torch.zeros(window.shape[0], self.num_logical, dtype=torch.int64)
        return out.scatter_add_(1, self.phy2log.clamp(min=0), torch.where(self.phy2log >= 0, window, 0))


# -- vllm-ascend's accounting --------------------------------------------------------------------
class AscendEplb:
    """vllm-ascend's dynamic-EPLB load accounting, ``world`` ranks of ``experts`` local slots.

    Per MoE layer and rank (``AscendFusedMoE`` forward, gated by the step's
    ``eplb_heat_collection_status``): ``expert_tokens`` (``group_list_type != 1``: a running sum,
    diffed back) is added to ``moe_load``; with ``multi_stage`` (FlashLB) ``moe_load`` is
    ``(num_iter, E)`` per layer and the layer's own ``load_counter`` picks the row
    (``index_add_`` into ``load_counter % num_iter``, then ``load_counter += 1``; a wrapped row keeps
    adding). ``clear_all_moe_loads`` zeroes both. ``compute_and_set_moe_load`` stacks the layers,
    all-gathers the ranks and permutes: ``(L, world, E)``, or FlashLB's ``(num_iter, L, world, E)``.
    The updator's cycle: ``cur_iterations`` counts steps; at ``interval - 1`` (end of that step) the
    load is gathered; at ``interval + algorithm_interval + num_moe_layers`` everything is cleared.
    """

    def __init__(self, world: int, layers: int, experts: int, num_iter: int | None,
                 interval: int, algorithm_interval: int) -> None:
        self.world, self.layers, self.experts = world, layers, experts
        self.multi_stage = num_iter is not None
        self.num_iter = num_iter or 1
        self.moe_load = torch.zeros(world, layers, self.num_iter, experts, dtype=torch.int64)
        self.load_counter = torch.zeros(world, layers, dtype=torch.int64)
        self.interval = interval
        self.algorithm_interval = algorithm_interval
        self.cur_iterations = 0
        self.gathered: list[torch.Tensor] = []  # shared_dict["moe_load"] at every wake-up

    def layer(self, rank: int, layer: int, expert_tokens: torch.Tensor, group_list_type: int, collecting: bool) -> None:
        if not collecting:  # _EXTRA_CTX.eplb_heat_collection_status
            return
        tokens = expert_tokens.to(torch.int64)
        if group_list_type != 1:
            tokens = torch.cat([tokens[:1], tokens[1:] - tokens[:-1]])
        if self.multi_stage:
            row = int(self.load_counter[rank, layer]) % self.num_iter
            self.moe_load[rank, layer, row] += tokens
            self.load_counter[rank, layer] += 1
        else:
            self.moe_load[rank, layer, 0] += tokens

    def forward_end(self) -> bool:
        """``EplbUpdator.forward_end``; True when this step gathered ``moe_load``."""
        gathered = False
        if self.cur_iterations == self.interval - 1:  # wakeup_eplb_worker_flag
            stacked = self.moe_load  # (world, L, iter, E): torch.stack of every rank's layers
            if self.multi_stage:
                self.gathered.append(stacked.permute(2, 1, 0, 3).clone())  # (iter, L, world, E)
            else:
                self.gathered.append(stacked[:, :, 0].permute(1, 0, 2).clone())  # (L, world, E)
            gathered = True
        self.cur_iterations += 1
        if self.cur_iterations == self.interval + self.algorithm_interval + self.layers:
            self.moe_load.zero_()  # clear_all_moe_loads
            self.load_counter.zero_()
            self.cur_iterations = 0
        return gathered
