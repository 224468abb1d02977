"""Lost updates of the engines' expert-load accumulation patterns under explore's split runs
(docs/exploration.md, "Racing read-modify-write kernels").

- vllm-ascend (``vllm_ascend/ops/fused_moe``): ``self.moe_load += expert_tokens`` on the
  moe-load stream, and EPLB-style ``shared.add_(torch.bincount(ids, minlength=E))``: an
  elementwise add, loads and stores with no atomics, so two unordered ones lose an update.
- vLLM (``vllm/model_executor/layers/fused_moe``, ``record_expert_load``):
  ``expert_load_view.scatter_add_(0, topk_ids.flatten().long(), ones)``. CUDA runs scatter_add_
  (and index_add_) with an atomic add per element (``ScatterGatherKernel.cu`` ``ReduceAdd``:
  ``fastAtomicAdd``; ``Indexing.cu``: ``gpuAtomicAdd``): two unordered ones race by the rules
  (the detector reports it) but lose no count, so explore must not fail on them. An elementwise
  ``add_`` racing with a ``scatter_add_`` still loses the scatter's counts when the add_ is split
  around it.
"""

from __future__ import annotations

import pytest
import torch

import streamkit as sk
from streamkit import fake

E = 8
IDS = ([0, 1, 1, 3, 5, 5, 5, 7], [1, 2, 2, 2, 6, 7, 0, 0])


def two_streams(update, ordered: bool = False):
    """Two side streams each add one batch's counts into one shared buffer; with ``ordered`` the
    second waits for the first."""

    def program():
        dev = sk.device()
        shared = torch.zeros(E, dtype=torch.long, device=dev)
        ids = [torch.tensor(i, device=dev) for i in IDS]
        sides = [sk.Stream(), sk.Stream()]
        for side, batch in zip(sides, ids):
            side.wait_stream(sk.current_stream())
            if ordered and side is sides[1]:
                side.wait_stream(sides[0])
            with sk.switch(side):
                update(shared, batch)
        for side in sides:
            sk.current_stream().wait_stream(side)
        return shared.cpu()

    return program


def bincount_add(shared, ids):
    shared.add_(torch.bincount(ids, minlength=E))  # (vllm-ascend: self.moe_load += expert_tokens)


def scatter_add(shared, ids):
    shared.scatter_add_(0, ids, torch.ones_like(ids))  # (vLLM's record_expert_load)


def index_add(shared, ids):
    shared.index_add_(0, ids, torch.ones_like(ids))


TOTAL = torch.bincount(torch.tensor(IDS[0]), minlength=E) + torch.bincount(torch.tensor(IDS[1]), minlength=E)


def test_bincount_added_into_a_shared_buffer_on_unordered_streams_loses_counts():
    program = two_streams(bincount_add)
    found = fake.explore(program, schedules=20)
    assert torch.equal(found.reference.values, TOTAL)
    f = found.failure
    assert f is not None and f.schedule == "split", found.runs
    one = [torch.bincount(torch.tensor(i), minlength=E) for i in IDS]
    # CUDA: elements both batches count keep one batch's count (the other update lost);
    # elements only one batch counts keep it (a kernel stores only what it changed)
    expected = [torch.where((one[0] > 0) & (one[1] > 0), one[k], TOTAL) for k in (0, 1)]
    assert any(torch.equal(f.values, e) for e in expected), (f.values, expected)
    assert "split around" in f.explanation and "one update was lost" in f.explanation
    assert torch.equal(fake.replay(program, f.token).values, f.values)
    assert fake.explore(two_streams(bincount_add, ordered=True), schedules=20).ok


@pytest.mark.parametrize("update", [scatter_add, index_add])
def test_atomic_accumulation_races_but_loses_nothing(update):
    program = two_streams(update)
    found = fake.explore(program, schedules=20)
    assert torch.equal(found.reference.values, TOTAL)
    assert found.reference.races, "the two unordered updates race by the rules"
    assert found.ok, found.explain()
    for seed in range(8):  # (rates runs split read-modify-write kernels: these aren't)
        assert torch.equal(fake.replay(program, f"rates:{seed}").values, TOTAL)


def test_an_elementwise_add_split_around_a_scatter_add_loses_the_scattered_counts():
    def mixed(shared, ids):
        if ids.tolist() == IDS[0]:
            scatter_add(shared, ids)
        else:
            bincount_add(shared, ids)

    program = two_streams(mixed)
    found = fake.explore(program, schedules=20)
    f = found.failure
    assert f is not None and f.schedule == "split", found.runs
    assert not torch.equal(f.values, TOTAL)
    assert "aten.add_" in f.explanation.split("split around")[0] and "scatter_add_" in f.explanation
