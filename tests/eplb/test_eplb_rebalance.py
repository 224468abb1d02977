"""The rebalancer (DeepSeek's EPLB algorithm): valid placements, never worse than the identity
placement on skewed loads, hierarchical when groups divide over nodes, and the published example."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from streamkit_eplb import Heat, Placement, rebalance


def _check_valid(p: Placement, layers: int, logical: int, slots: int, ranks: int) -> None:
    assert p.phy2log.shape == (layers, slots)
    assert p.logcnt.shape == (layers, logical)
    assert bool((p.logcnt >= 1).all())  # every logical expert has a replica
    assert p.logcnt.sum(dim=1).tolist() == [slots] * layers  # replica counts sum to the slots
    per_rank = torch.bincount(p.rank_of_slot(ranks), minlength=ranks)
    assert per_rank.tolist() == [slots // ranks] * ranks  # each rank gets the same number of slots
    for layer in range(layers):  # log2phy and phy2log describe the same placement
        for expert in range(logical):
            replicas = p.log2phy[layer, expert]
            replicas = replicas[replicas >= 0]
            assert replicas.numel() == int(p.logcnt[layer, expert])
            assert bool((p.phy2log[layer, replicas] == expert).all())


@st.composite
def problems(draw):
    nodes = draw(st.sampled_from([1, 2]))
    ranks = nodes * draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 4]))
    per_group = draw(st.integers(1, 3))
    logical = groups * per_group
    per_rank = -(-logical // ranks) + draw(st.integers(0, 2))
    slots = per_rank * ranks
    layers = draw(st.integers(1, 2))
    skew = draw(st.floats(0.5, 2.0))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    ranks_of = torch.stack([torch.randperm(logical, generator=gen) for _ in range(layers)])
    weight = (1000.0 / (1.0 + ranks_of.double()) ** skew).round()  # Zipf-like popularity, shuffled
    return weight, slots, groups, nodes, ranks


@given(problems())
def test_placements_are_valid_and_never_worse_than_identity(problem):
    weight, slots, groups, nodes, ranks = problem
    layers, logical = weight.shape
    if groups % nodes == 0 and logical // nodes > slots // nodes:
        with pytest.raises(ValueError, match="node"):
            rebalance(weight, slots, groups, nodes, ranks)
        return
    p = rebalance(weight, slots, groups, nodes, ranks)
    _check_valid(p, layers, logical, slots, ranks)
    heat = Heat(weight.round().to(torch.int64).unsqueeze(1))  # one rank recorded logical ids
    if logical % ranks == 0:
        identity = Placement.identity(layers, logical)
        before = heat.predicted_balancedness(identity, ranks)
        after = heat.predicted_balancedness(p, ranks)
        assert bool((after >= before - 1e-9).all()), (before, after, p.phy2log)


def test_hierarchical_keeps_every_group_on_one_node():
    gen = torch.Generator().manual_seed(5)
    weight = torch.randint(1, 100, (3, 16), generator=gen)
    p = rebalance(weight, 24, 4, 2, 4)  # 4 groups of 4 over 2 nodes; 12 slots per node
    node_of_slot = torch.arange(24) // 12
    for layer in range(3):
        for group in range(4):
            members = torch.isin(p.phy2log[layer], torch.arange(group * 4, group * 4 + 4))
            assert node_of_slot[members].unique().numel() == 1
    # groups that do not divide over the nodes: the global algorithm (groups may be split)
    _check_valid(rebalance(weight, 24, 1, 2, 4), 3, 16, 24, 4)


def test_matches_the_published_example_up_to_ties():
    """DeepSeek's EPLB README example: 2 layers, 12 experts, 16 replicas, 4 groups, 2 nodes, 8 ranks.
    Replicas of equal load can swap between ranks, so compare each rank's load, not the ids."""
    weight = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                           [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
    published = torch.tensor([[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                              [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]])
    ours = rebalance(weight, 16, 4, 2, 8)
    _check_valid(ours, 2, 12, 16, 8)
    theirs = Placement.from_phy2log(published, 12)
    assert torch.equal(ours.logcnt, theirs.logcnt)
    assert torch.allclose(ours.rank_load(weight, 8), theirs.rank_load(weight, 8))


def test_rebalance_validates_its_arguments():
    w = torch.ones(1, 4)
    with pytest.raises(ValueError, match="num_replicas.*cannot hold"):
        rebalance(w, 3, 1, 1, 1)
    with pytest.raises(ValueError, match="num_ranks=3"):
        rebalance(w, 4, 1, 1, 3)
    with pytest.raises(ValueError, match="num_groups"):
        rebalance(w, 4, 3, 1, 2)
    with pytest.raises(ValueError, match="num_nodes"):
        rebalance(w, 4, 1, 3, 2)
    with pytest.raises(ValueError, match="finite"):
        rebalance(torch.tensor([[1.0, float("nan"), 1.0, 1.0]]), 4, 1, 1, 2)
    with pytest.raises(ValueError, match="finite and >= 0"):
        rebalance(-w, 4, 1, 1, 2)
    with pytest.raises(ValueError, match="num_replicas"):
        rebalance(w, 0, 1, 1, 1)
    with pytest.raises(ValueError, match="logical expert 1 has no slot"):
        Placement.from_phy2log([0, 0, 2], 3)
