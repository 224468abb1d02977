"""Parity with the engines: the integration glue of docs/eplb.md, run against reference
implementations of vLLM's and vllm-ascend's own accounting (tests/eplb/eplb_reference.py), and the
collector features that glue needs (map and record in one kernel, per-layer rings, layer-wise
commits, the kept window, several collectors in one collective, sleep/wake state, empty slots)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from eplb_reference import AscendEplb, VllmEplb, vllm_map_and_record

import streamkit as sk
from streamkit_eplb import CollectError, Heat, HeatCollector, Placement, collect_all, rebalance

DOC = Path(__file__).resolve().parents[2] / "docs" / "eplb.md"


def _glue(marker: str) -> dict:
    """Execute the docs/eplb.md python block whose first line starts with ``# <marker> glue``."""
    blocks = re.findall(r"^```python\n(.*?)^```", DOC.read_text(encoding="utf-8"), flags=re.S | re.M)
    (code,) = [b for b in blocks if b.startswith(f"# {marker} glue")]
    namespace: dict = {"__name__": "__eplb_glue__"}
    exec(compile(code, f"{DOC.name}:{marker} glue", "exec"), namespace)
    return namespace


def dev(values, dtype=torch.int64) -> torch.Tensor:
    return torch.as_tensor(values, dtype=dtype).to(sk.device())


# -- vLLM ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "window, interval, steps",
    [(4, 3, 13), (3, 10, 33), (2, 24, 55)],  # interval shorter than the window, longer, longer than 4 windows
    ids=["interval<window", "interval>window", "first-interval"],
)
def test_vllm_glue_equals_vllms_accounting(fake_session, window, interval, steps):
    glue = _glue("vLLM")["VllmHeat"]
    layers, logical, slots, ranks, top_k, tokens = 2, 6, 8, 2, 2, 12
    initial = Placement.from_phy2log(torch.arange(slots) % logical, logical, num_layers=layers)
    ours = glue(initial, window_size=window, step_interval=interval, ep_size=ranks)
    ref = VllmEplb(initial.phy2log, logical, window, interval)

    def policy(load, old):  # the same rebalancer on both sides: vLLM passes the old map too
        return rebalance(load, slots, 1, 1, ranks, old=old).phy2log

    gen = torch.Generator().manual_seed(window * 100 + interval)
    popularity = torch.linspace(2.5, 0, logical)
    rearranged = 0
    for step in range(steps):
        dummy = step % 7 == 5
        for layer in range(layers):
            ids = (torch.randn(tokens, logical, generator=gen) + popularity).topk(top_k, dim=-1).indices
            if step % 4 == 1:
                ids[2, 1] = -1  # a padding id
            unpadded = tokens - step % 3  # graph padding rows at the end
            expected = ref.record(layer, ids, unpadded)
            routed = ours.route(layer, ids.to(sk.device()), dev(unpadded))
            assert torch.equal(routed.cpu(), expected), (step, layer)
        want = ref.step(dummy, policy)
        got = ours.step(is_dummy=dummy)
        assert (want is None) == (got is None), step
        if want is not None:
            rearranged += 1
            assert torch.equal(got, want), step
            assert torch.equal(ours.heat.placement.phy2log, ref.phy2log)
        assert ours.heat.enabled == ref.record_enabled
        ring = ours.heat.collect(reset=False).wait().passes[:, :, 0]  # (window + 1, L, P), newest last
        assert torch.equal(ring[-1], ref.load_pass), step  # the pass being counted
        assert torch.equal(ring[:-1].sum(0), ref.load_window.sum(0)), step  # vLLM's per-slot window
    assert rearranged >= 2


def test_replica_rules_and_physical_ids(fake_session):
    """replica="hash" is vLLM's current kernel, "modulo" v0.11's; both count where they route."""
    placement = Placement.from_phy2log([0, 1, 0, 2, 0, 1], 3)
    ids = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 0], [-1, 0], [2, 1]])
    for replica in ("hash", "modulo"):
        c = HeatCollector(1, 6, log2phy=placement, replica=replica)
        expected_load = torch.zeros(6, dtype=torch.int64)
        expected = vllm_map_and_record(ids, expected_load, placement.log2phy[0], placement.logcnt[0], True, 5, replica)
        got = c.record(0, topk_ids=ids.to(sk.device()), num_tokens=dev(5), return_physical=True)
        assert torch.equal(got.cpu(), expected)
        assert c.collect().wait().load[0, 0].tolist() == expected_load.tolist()
    assert not torch.equal(  # the two rules really differ on this input
        vllm_map_and_record(ids, torch.zeros(6, dtype=torch.int64), placement.log2phy[0], placement.logcnt[0], True, None, "hash"),
        vllm_map_and_record(ids, torch.zeros(6, dtype=torch.int64), placement.log2phy[0], placement.logcnt[0], True, None, "modulo"),
    )


def test_map_and_record_is_one_kernel_without_host_sync(fake_session):
    placement = Placement.from_phy2log([0, 1, 0, 2], 3)
    c = HeatCollector(1, 4, log2phy=placement)
    ids = dev([[0, 1], [2, 0]])
    n = dev(2)
    before = fake_session.stats.copy()
    c.record(0, topk_ids=ids, num_tokens=n, return_physical=True)
    spent = fake_session.stats - before
    assert spent.kernels == 1 and spent.host_syncs == 0


# -- vllm-ascend ---------------------------------------------------------------------------------
@pytest.mark.parametrize("num_iter", [None, 3], ids=["moe_load", "flashlb"])
@pytest.mark.parametrize("group_list_type", [0, 1])
def test_vllm_ascend_glue_equals_vllm_ascends_accounting(fake_session, num_iter, group_list_type):
    glue = _glue("vllm-ascend")["AscendHeat"]
    ranks, layers, experts, interval, algorithm = 2, 3, 4, 4, 2
    ours = [glue(layers, experts, heat_collection_interval=interval, algorithm_execution_interval=algorithm,
                 num_iter=num_iter) for _ in range(ranks)]
    ref = AscendEplb(ranks, layers, experts, num_iter, interval, algorithm)
    cycle = interval + algorithm + layers
    gen = torch.Generator().manual_seed(7 + group_list_type)
    for step in range(2 * cycle + 3):
        collecting = step % 4 != 2  # e.g. prefill steps when only decode heat is collected
        for g in ours:
            g.forward_before(collecting)
        calls = list(range(layers)) + ([layers - 1] if step % 3 == 0 else [])  # a layer that runs twice
        for layer in calls:
            for rank, g in enumerate(ours):
                tokens = torch.randint(0, 9, (experts,), generator=gen)
                values = tokens.cumsum(0) if group_list_type == 0 else tokens
                ref.layer(rank, layer, values, group_list_type, collecting)
                g.moe_layer(layer, values.to(sk.device()), group_list_type)
        got = [g.forward_end() for g in ours]
        if ref.forward_end():
            assert torch.equal(torch.cat(got, dim=-2), ref.gathered[-1]), step  # the ranks' all_gather
        else:
            assert got == [None] * ranks
        if step == cycle + 1:  # sleep and wake: the buffers go, the saved state comes back
            for g in ours:
                saved = {name: t.cpu().clone() for name, t in g.heat.state_dict().items()}
                for t in g.heat.state_dict().values():
                    t.zero_()
                g.heat.load_state_dict(saved)
    assert len(ref.gathered) == 2


def test_ring_layer_has_no_common_pass(fake_session):
    c = HeatCollector(2, 3, window=2, ring="layer")
    for _ in range(3):
        c.record(0, dev([1, 0, 0]))
    c.record(1, dev([0, 0, 5]))
    passes = c.collect(reset=False).wait().passes[:, :, 0]
    assert passes[:, 0].tolist() == [[2, 0, 0], [1, 0, 0]]  # rows 0, 1, 0: the wrapped row keeps adding
    assert passes[:, 1].tolist() == [[0, 0, 5], [0, 0, 0]]
    with pytest.raises(RuntimeError, match="ring='layer'"):
        c.step()
    with pytest.raises(RuntimeError, match="ring='layer'"):
        c.clear_pass()
    c.reset()  # also rewinds every layer's position
    c.record(1, dev([0, 1, 0]))
    assert c.collect().wait().passes[:, 1, 0].tolist() == [[0, 1, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match="ring.*'step'.*'layer'"):
        HeatCollector(1, 2, ring="pass")


def test_state_dict_round_trip_and_errors(fake_session):
    c = HeatCollector(2, 3, window=2)
    c.record(1, dev([1, 2, 3]))
    names = set(c.state_dict())
    assert names == {"counters", "control", "log2phy", "logcnt"}
    saved = {k: v.cpu().clone() for k, v in c.state_dict().items()}
    c.reset()
    c.load_state_dict(saved)
    assert c.collect().wait().load[1, 0].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="missing \\['logcnt'\\]"):
        c.load_state_dict({k: v for k, v in saved.items() if k != "logcnt"})
    with pytest.raises(ValueError, match="state\\['counters'\\].*expected torch.int32"):
        c.load_state_dict({**saved, "counters": saved["counters"].long()})
    with pytest.raises(TypeError, match="load_state_dict\\(state\\): expected a dict"):
        c.load_state_dict([1])


# -- placements ----------------------------------------------------------------------------------
def test_set_placement_layer_by_layer_keeps_the_other_layers(fake_session):
    initial = Placement.from_phy2log(torch.arange(4) % 3, 3, num_layers=3)
    c = HeatCollector(3, 4, log2phy=initial, replica="modulo")
    for layer in range(3):
        c.record(layer, topk_ids=dev([[0, 1], [2, 0]]))
    new_row = [1, 2, 0, 1]
    assert c.set_placement(torch.tensor([new_row]), layers=[1]) == 1
    assert c.layer_versions == (0, 1, 0) and c.placement_version == 1
    assert c.placement.phy2log.tolist() == [[0, 1, 2, 0], new_row, [0, 1, 2, 0]]
    load = c.collect(reset=False).wait().load[:, 0]
    assert load[1].tolist() == [0, 0, 0, 0]  # the committed layer's counters were cleared
    assert load[0].tolist() == load[2].tolist() == [1, 1, 1, 1]  # the others kept theirs
    c.record(1, topk_ids=dev([[1, 2]]))  # logical 1 lives in slots 0 and 3 now, 2 in slot 1
    assert c.collect().wait().load[1, 0].tolist() == [1, 1, 0, 0]
    full = Placement.from_phy2log(torch.tensor([[2, 1, 0, 0]] * 3), 3)
    assert c.set_placement(full, layers=(0, 2)) == 2  # rows for every layer: take those named
    assert c.layer_versions == (2, 1, 2)
    assert c.placement.phy2log[1].tolist() == new_row
    with pytest.raises(IndexError, match="layers.*\\[3\\] out of range"):
        c.set_placement(full, layers=[3])
    with pytest.raises(ValueError, match="named twice"):
        c.set_placement(full, layers=[0, 0])


def test_keep_window_reads_old_passes_through_the_new_map(fake_session):
    initial = Placement.from_phy2log([0, 1, 2, 0], 3)
    for keep in (False, True):
        c = HeatCollector(1, 4, log2phy=initial, replica="modulo")
        c.record(0, topk_ids=dev([[1, 1, 1]]))  # slot 1, three times
        c.set_placement([0, 2, 1, 0], keep_window=keep)
        heat = c.collect().wait()
        assert heat.to_vllm().tolist() == ([[0, 0, 3]] if keep else [[0, 0, 0]])  # vLLM's attribution


def test_empty_slots_for_elastic_ep(fake_session):
    placement = Placement.from_phy2log([0, 1, -1, 2, 0, -1], 3)
    assert placement.num_empty == 2 and placement.logcnt.tolist() == [[2, 1, 1]]
    assert placement.log2phy[0, 0].tolist() == [0, 4]
    assert placement.rank_load(torch.tensor([[4.0, 2.0, 6.0]]), 3).tolist() == [[4.0, 6.0, 2.0]]
    c = HeatCollector(1, 6, log2phy=placement)
    got = c.record(0, topk_ids=dev([[0, 1], [2, 0], [0, 0]]), return_physical=True)
    load = c.collect().wait().load[0, 0]
    assert int(load[2]) == 0 and int(load[5]) == 0 and int(load.sum()) == 6  # never an empty slot
    assert bool((got.cpu() >= 0).all())
    table = torch.tensor([[0, 4], [1, -1], [3, -1]])  # vLLM's logical_to_physical_map with 2 empty slots
    assert HeatCollector(1, 6, log2phy=table).placement.phy2log.tolist() == [[0, 1, -1, 2, 0, -1]]
    moved = rebalance(torch.tensor([[5.0, 1.0, 1.0]]), 6, 1, 1, 3, old=placement)
    assert moved.num_empty == 0 and moved.moved == moved.moved_from(placement)


# -- several collectors, one collective ------------------------------------------------------------
def test_collect_all_equals_separate_collects(fake_session):
    def pair():
        main = HeatCollector(2, 4, window=2)
        draft = HeatCollector(1, 3, window=3)
        for step in range(4):
            main.record(step % 2, dev([step, 1, 0, 2]))
            draft.record(0, dev([1, step, 3]))
            main.step()
            if step % 2:
                draft.step()
        return main, draft

    a_main, a_draft = pair()
    separate = [a_main.collect().wait(), a_draft.collect().wait()]
    b_main, b_draft = pair()
    before = fake_session.stats.copy()
    handles = collect_all([b_main, b_draft])
    spent = fake_session.stats - before
    together = [h.wait() for h in handles]
    for x, y in zip(separate, together):
        assert torch.equal(x.load, y.load) and torch.equal(x.passes, y.passes)
    assert spent.host_syncs == 0
    again = collect_all([b_main, b_draft], passes=False)  # counters were reset; buffers reused
    assert [int(h.wait().load.sum()) for h in again] == [0, 0]
    with pytest.raises(ValueError, match="listed twice"):
        collect_all([b_main, b_main])
    with pytest.raises(ValueError, match="same reduce"):
        collect_all([b_main, HeatCollector(1, 2, reduce="sum")])
    with pytest.raises(ValueError, match="at least one"):
        collect_all([])


# -- the heat map ----------------------------------------------------------------------------------
def test_heatmap_ticks_are_integers_at_any_scale():
    pytest.importorskip("matplotlib")
    from streamkit_eplb._plot import figure

    for experts, ep_size in ((100_000, None), (24, 4)):
        heat = Heat(torch.randint(0, 5, (3, 1, experts)), reduce="sum", num_ranks=1)
        fig = figure([(heat, "t")], ep_size=ep_size)
        fig.canvas.draw()
        ax = fig.axes[0]
        lo, hi = sorted(ax.get_xlim())
        shown = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert shown and all(float(t).is_integer() for t in shown), (experts, ep_size, shown)
        labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert labels and all(re.fullmatch(r"-?\d+", text) for text in labels), labels


# -- bad input (issue 16) ----------------------------------------------------------------------------
def test_bad_input_is_refused_at_the_entry_point(fake_session):
    c = HeatCollector(1, 8, log2phy=Placement.from_phy2log(torch.arange(8) % 8, 8))
    with pytest.raises(ValueError, match="record\\(topk_ids\\).*3-dim tensor of shape \\(2, 2, 2\\)"):
        c.record(0, topk_ids=dev(torch.zeros(2, 2, 2, dtype=torch.int64)))
    with pytest.raises(TypeError, match="wait\\(timeout\\).*str '5'"):
        c.collect().wait(timeout="5")
    with pytest.raises(ValueError, match="wait\\(timeout\\).*-1"):
        c.collect().wait(timeout=-1)
    with pytest.raises(TypeError, match="set_placement\\(phy2log\\).*string 'identity'"):
        c.set_placement("identity")
    with pytest.raises(ValueError, match="9 physical slots; expected 8: num_experts"):
        c.set_placement(torch.arange(9) % 8)
    plain = HeatCollector(1, 8)
    with pytest.raises(ValueError, match="3 physical slots; expected 8: num_experts$"):
        plain.set_placement([0, 1, 2])
    heat = Heat(torch.ones(1, 1, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="prometheus\\(prefix\\).*int 123"):
        heat.prometheus(prefix=123)
    with pytest.raises(TypeError, match="prometheus\\(labels\\).*list \\['model'\\]"):
        heat.prometheus(labels=["model"])
    with pytest.raises(TypeError, match="rebalance\\(weight\\).*str 'load'"):
        rebalance("load", 8, 1, 1, 2)
    with pytest.raises(ValueError, match="rebalance\\(algorithm\\)"):
        rebalance(torch.ones(1, 4), 4, 1, 1, 2, algorithm="greedy")
    with pytest.raises(ValueError, match="from_phy2log\\(phy2log\\).*rows of equal length.*\\[\\[0, 1\\], \\[0\\]\\]"):
        Placement.from_phy2log([[0, 1], [0]])
    with pytest.raises(ValueError, match="from_phy2log\\(phy2log\\).*non-empty.*got \\[\\]"):
        Placement.from_phy2log([])
    assert issubclass(CollectError, sk.StreamkitError)
