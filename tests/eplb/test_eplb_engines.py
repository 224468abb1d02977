"""The engine adapters and metrics against reference implementations of each engine's own formula
(written here from the engines' code paths), on one process with simulated ranks. The same adapters
over 2 gloo ranks are checked in rank_worker.py (scenario main)."""

from __future__ import annotations

import pytest
import torch

import streamkit as sk
from streamkit_eplb import Heat, HeatCollector, Placement, balancedness_of


def _vllm_map(topk_ids, log2phy, logcnt):
    """vLLM eplb_map_to_physical_and_record: replica = flat position % replica count."""
    ids = topk_ids.long()
    count = logcnt[ids.clamp(min=0)]
    position = torch.arange(ids.numel()).reshape_as(ids)
    physical = log2phy[ids.clamp(min=0)].gather(-1, (position % count).unsqueeze(-1)).squeeze(-1)
    return torch.where(ids >= 0, physical, -1)


class VllmEplbStateRef:
    """vLLM's EplbState on one rank: expert_load_pass (L, P), a window of W passes, step(is_dummy)."""

    def __init__(self, layers, slots, window, placement):
        self.placement = placement
        self.expert_load_pass = torch.zeros(layers, slots, dtype=torch.int64)
        self.expert_load_window = torch.zeros(window, layers, slots, dtype=torch.int64)
        self.step_index = 0

    def record(self, layer, topk_ids):
        phys = _vllm_map(topk_ids, self.placement.log2phy[layer], self.placement.logcnt[layer]).flatten()
        phys = phys[phys >= 0]
        self.expert_load_pass[layer].scatter_add_(0, phys, torch.ones_like(phys))

    def step(self, is_dummy=False):
        if is_dummy:
            self.expert_load_pass.zero_()
            return
        self.expert_load_window[self.step_index] = self.expert_load_pass.clone()
        self.step_index = (self.step_index + 1) % self.expert_load_window.shape[0]
        self.expert_load_pass.zero_()

    def logical_window_load(self):
        """rearrange(): the window mapped to logical experts and summed (before the all_reduce)."""
        W, L, _ = self.expert_load_window.shape
        out = torch.zeros(W, L, self.placement.num_logical, dtype=torch.int64)
        out.scatter_add_(-1, self.placement.phy2log.unsqueeze(0).expand(W, -1, -1), self.expert_load_window)
        return out.sum(0)


def test_to_vllm_equals_vllms_rearrangement_input(fake_session):
    layers, window, ranks = 2, 3, 2
    placement = Placement.from_phy2log(torch.tensor([[0, 1, 2, 3, 0, 2], [3, 2, 1, 0, 1, 1]]), 4)
    refs = [VllmEplbStateRef(layers, 6, window, placement) for _ in range(ranks)]
    collectors = [HeatCollector(layers, 6, window=window, log2phy=placement) for _ in range(ranks)]
    gen = torch.Generator().manual_seed(1)
    for step in range(7):
        dummy = step == 4  # a data-parallel dummy step: vLLM zeroes the pass and does not advance
        for ref, col in zip(refs, collectors):
            col.enabled = not dummy
            for layer in range(layers):
                ids = torch.randint(-1, 4, (5, 2), generator=gen)
                ref.record(layer, ids)
                col.record(layer, topk_ids=ids.to(sk.device()))
            ref.step(is_dummy=dummy)
            if step < 6 and not dummy:
                col.step()
    heats = [c.collect().wait() for c in collectors]  # before step(): the ring is vLLM's window
    # reduce="gather" rows of the ranks (rank-major, as an all_gather would give them)
    gathered = Heat(torch.cat([h.load for h in heats], dim=1), phy2log=heats[0].phy2log)
    all_reduced = sum(ref.logical_window_load() for ref in refs)  # all_reduce(SUM) over the EP group
    assert torch.equal(gathered.to_vllm(), all_reduced)
    assert all_reduced.sum() > 0


def _ascend_moe_load_ref(per_rank_expert_tokens, cumulative):
    """vllm-ascend: moe_load[layer] += expert_tokens (group_list diffed when cumulative), then
    all_gather over the EP group and permute to (L, world, E_local); cleared after the update."""
    loads = []
    for steps in per_rank_expert_tokens:  # rank -> list of (layer, tensor)
        moe_load = None
        for layer, tokens in steps:
            if moe_load is None:
                moe_load = torch.zeros(3, tokens.numel(), dtype=torch.int64)
            counts = torch.diff(tokens, prepend=tokens.new_zeros(1)) if cumulative else tokens
            moe_load[layer] += counts
        loads.append(moe_load)
    return torch.stack(loads).permute(1, 0, 2)


@pytest.mark.parametrize("cumulative", [False, True])
def test_to_vllm_ascend_equals_moe_load(fake_session, cumulative):
    ranks, layers, local = 2, 3, 4
    gen = torch.Generator().manual_seed(2)
    per_rank = [[(l % layers, torch.randint(0, 30, (local,), generator=gen)) for l in range(7)] for _ in range(ranks)]
    collectors = [HeatCollector(layers, local, window=2) for _ in range(ranks)]
    for steps, col in zip(per_rank, collectors):
        for i, (layer, tokens) in enumerate(steps):
            values = tokens.cumsum(0) if cumulative else tokens
            col.record(layer, values.to(sk.device()), cumulative=cumulative)
            if i == 3:
                col.step()
    heats = [c.collect().wait() for c in collectors]
    reference = _ascend_moe_load_ref([[(l, t.cumsum(0) if cumulative else t) for l, t in s] for s in per_rank], cumulative)
    passes = torch.cat([h.passes for h in heats], dim=2)
    gathered = Heat(torch.cat([h.load for h in heats], dim=1), passes=passes)
    out = gathered.to_vllm_ascend()
    assert torch.equal(out["moe_load"], reference)
    assert set(out) == {"moe_load"}
    staged = gathered.to_vllm_ascend(multi_stage=True)["moe_load"]  # FlashLB's (iter, L, world, E) layout
    assert staged.shape == (2, layers, ranks, local) and torch.equal(staged.sum(0), reference)
    with pytest.raises(ValueError, match="reduce='gather'"):
        Heat(torch.zeros(1, 1, 2, dtype=torch.int64), reduce="sum", num_ranks=2).to_vllm_ascend()


def _vllm_log_balancedness(num_tokens_per_rank_by_layer):
    """vLLM EplbState.step(log_stats=True): num_tokens_per_rank is (ranks, layers)."""
    num_tokens_per_rank = num_tokens_per_rank_by_layer.t().float()
    avg_tokens = num_tokens_per_rank.mean(dim=0).sum(dim=0).item()
    max_tokens = num_tokens_per_rank.max(dim=0).values.sum(dim=0).item()
    return avg_tokens / max_tokens if max_tokens > 0 else 0.0


def test_balancedness_kinds_match_each_engines_formula():
    gen = torch.Generator().manual_seed(3)
    load = torch.randint(0, 100, (4, 3, 5), generator=gen)
    load[2] = 0  # a layer without load
    heat = Heat(load)
    per_rank = load.sum(dim=2).double()
    assert float(heat.balancedness(kind="vllm")) == pytest.approx(_vllm_log_balancedness(load.sum(dim=2)))
    ascend = heat.balancedness(kind="ascend")
    for layer in (0, 1, 3):
        row = per_rank[layer]
        assert float(ascend[layer]) == pytest.approx(float(row.max() / row.mean()))
        assert float(heat.balancedness()[layer]) == pytest.approx(float(row.mean() / row.max()))
    assert float(ascend[2]) == 1.0 and float(heat.balancedness()[2]) == 1.0
    assert float(balancedness_of(torch.zeros(2, 3), "vllm")) == 0.0  # vLLM: 0.0 without load
    # the four per-layer values of the issue do not average to vLLM's number
    layers = torch.tensor([[10.0, 5.0], [3.0, 9.0]])
    assert float(balancedness_of(layers, "vllm")) == pytest.approx((7.5 + 6.0) / (10 + 9))
    with pytest.raises(ValueError, match="kind"):
        heat.balancedness(kind="mean")


def test_predicted_balancedness_of_a_placement():
    # 4 logical experts, loads 40/20/10/10 on one layer, 2 ranks
    heat = Heat(torch.tensor([[[40, 20, 10, 10]]]))
    identity = Placement.identity(1, 4)
    assert float(heat.predicted_balancedness(identity, 2)[0]) == pytest.approx(40.0 / 60.0)  # ranks 60 | 20
    spread = Placement.from_phy2log([0, 3, 1, 2, 0, 0], 4)
    # slots: rank0 {0, 3, 1} rank1 {2, 0, 0}: logical 0 has 3 replicas (40/3 each)
    expected = torch.tensor([40 / 3 + 10 + 20, 10 + 80 / 3])
    assert float(heat.predicted_balancedness(spread, 2)[0]) == pytest.approx(float(expected.mean() / expected.max()))
    assert heat.balancedness(ep_size=2).tolist() == pytest.approx([40.0 / 60.0])


def test_prometheus_exposition():
    heat = Heat(torch.tensor([[[4, 0], [2, 2]], [[1, 1], [1, 1]]]), torch.tensor([[0, 1], [3, 0]]), 7, placement_version=2)
    text = heat.prometheus(labels={"model": 'ds"v3'})
    lines = text.splitlines()
    assert text.endswith("\n")
    assert "# TYPE streamkit_eplb_balancedness gauge" in lines
    samples = {line.split(" ")[0]: line.split(" ")[1] for line in lines if not line.startswith("#")}
    assert float(samples['streamkit_eplb_balancedness{model="ds\\"v3",layer="0"}']) == pytest.approx(1.0)
    assert float(samples['streamkit_eplb_balancedness{model="ds\\"v3",layer="1"}']) == pytest.approx(1.0)
    assert samples['streamkit_eplb_routed_tokens{model="ds\\"v3",layer="0"}'] == "8"
    assert samples['streamkit_eplb_invalid_ids{model="ds\\"v3",layer="1"}'] == "3"
    assert samples['streamkit_eplb_window{model="ds\\"v3"}'] == "7"
    assert samples['streamkit_eplb_placement_version{model="ds\\"v3"}'] == "2"
    for line in lines:  # every sample line: name{labels} value
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            float(value)
            assert name.startswith("streamkit_eplb_")
    with pytest.raises(ValueError, match="prefix"):
        heat.prometheus(prefix="9bad")
    with pytest.raises(ValueError, match="label name"):
        heat.prometheus(labels={"bad-name": "x"})


def test_sglang_dump(tmp_path):
    import json

    heat = Heat(torch.tensor([[[1, 2, 3]]]), phy2log=torch.tensor([[0, 1, 0]]))
    assert heat.to_sglang()["logical_count"].tolist() == [[4, 2]]
    heat.save_sglang(tmp_path / "d.json")
    assert json.loads((tmp_path / "d.json").read_text())["logical_count"] == [[4, 2]]
    heat.save_sglang(tmp_path / "d.pt")
    assert torch.load(tmp_path / "d.pt", weights_only=True)["logical_count"].tolist() == [[4, 2]]
