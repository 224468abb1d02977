"""The one-launch Triton ``record`` kernel computes exactly what the aten composition computes.

Runs on a CUDA device when there is one; else under Triton's CPU interpreter when the environment
sets ``TRITON_INTERPRET=1`` (it must be set before Triton is imported); else it is skipped with the
reason. Triton is not a dependency: CI machines without it skip this file.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed: the CUDA record kernel is not used here")

from streamkit_eplb import Placement, _ops  # noqa: E402

if torch.cuda.is_available():
    DEVICE = torch.device("cuda")
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = torch.device("cpu")
else:
    pytest.skip("no CUDA device, and TRITON_INTERPRET=1 is not set for Triton's CPU interpreter", allow_module_level=True)

from streamkit_eplb import _triton  # noqa: E402

LAYERS, SLOTS, LOGICAL, WINDOW = 4, 12, 10, 3


def _buffers(enabled: int = 1, current: int = 1):
    acc = torch.randint(0, 5, (WINDOW, LAYERS, SLOTS + 1), dtype=torch.int32, device=DEVICE)
    ctrl = torch.tensor([enabled, current], dtype=torch.int64, device=DEVICE)
    return acc, ctrl


def _placement():
    gen = torch.Generator().manual_seed(3)
    phy2log = torch.stack([torch.cat([torch.randperm(LOGICAL, generator=gen), torch.randint(0, LOGICAL, (SLOTS - LOGICAL,), generator=gen)]) for _ in range(LAYERS)])
    p = Placement.from_phy2log(phy2log, LOGICAL, num_layers=LAYERS)
    width = SLOTS - LOGICAL + 1  # padded as HeatCollector pads it: the most replicas one expert can have
    log2phy = torch.full((LAYERS, LOGICAL, width), -1, dtype=torch.int64)
    log2phy[:, :, : p.log2phy.shape[2]] = p.log2phy
    return log2phy.to(DEVICE), p.logcnt.to(DEVICE)


def _both(acc, ctrl, values, limit, log2phy, logcnt, layer, mode):
    expected = acc.clone()
    _ops.record_op(expected, ctrl, values, limit, log2phy, logcnt, layer, mode)
    got = acc.clone()
    assert _triton.supports(got, values)
    _triton.record(got, ctrl, values, limit, log2phy, logcnt, layer, mode)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(got, expected), (got - expected).nonzero()
    return got


@pytest.mark.parametrize("mode", [_ops.MODE_IDS, _ops.MODE_IDS_MAPPED, _ops.MODE_IDS_HASHED], ids=["slots", "modulo", "hash"])
@pytest.mark.parametrize("enabled", [1, 0])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_routed_ids_match_the_aten_composition(mode, enabled, dtype):
    gen = torch.Generator().manual_seed(7)
    mapped = mode != _ops.MODE_IDS
    high = LOGICAL if mapped else SLOTS
    ids = torch.randint(-1, high + 2, (300, 8), generator=gen).to(dtype)  # padding and out-of-range ids too
    log2phy, logcnt = _placement() if mapped else (torch.zeros((1, 1, 1), dtype=torch.int64, device=DEVICE), torch.zeros((1, 1), dtype=torch.int64, device=DEVICE))
    acc, ctrl = _buffers(enabled)
    for limit in (123, 0):  # rows at or beyond num_tokens are padding
        _both(acc, ctrl, ids.to(DEVICE), torch.tensor(limit, device=DEVICE), log2phy, logcnt, 2, mode)
    full = _both(acc, ctrl, ids.to(DEVICE), torch.tensor(10**9, device=DEVICE), log2phy, logcnt, 2, mode)
    assert (int((full - acc).sum()) > 0) == bool(enabled)


@pytest.mark.parametrize("mode", [_ops.MODE_IDS_MAPPED, _ops.MODE_IDS_HASHED], ids=["modulo", "hash"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_map_and_record_writes_the_same_physical_ids(mode, dtype):
    """record_map: the one launch also writes each id's physical slot, as the composition does."""
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(-1, LOGICAL + 2, (200, 8), generator=gen).to(dtype).to(DEVICE)
    log2phy, logcnt = _placement()
    acc, ctrl = _buffers()
    limit = torch.tensor(150, device=DEVICE)
    expected_acc, expected_out = acc.clone(), torch.empty_like(ids)
    _ops.record_map_op(expected_acc, ctrl, ids, limit, log2phy, logcnt, expected_out, 1, mode)
    got_acc, got_out = acc.clone(), torch.empty_like(ids)
    assert _triton.supports(got_acc, ids, got_out)
    _triton.record(got_acc, ctrl, ids, limit, log2phy, logcnt, 1, mode, got_out)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(got_out, expected_out)
    assert torch.equal(got_acc, expected_acc)


@pytest.mark.parametrize("cumulative", [False, True])
def test_counts_match_the_aten_composition(cumulative):
    gen = torch.Generator().manual_seed(5)
    counts = torch.randint(0, 50, (SLOTS,), generator=gen)
    if cumulative:
        counts = counts.cumsum(0)
    acc, ctrl = _buffers(current=2)
    mode = _ops.MODE_CUMULATIVE if cumulative else _ops.MODE_COUNTS
    none = torch.zeros((1, 1, 1), dtype=torch.int64, device=DEVICE)
    got = _both(acc, ctrl, counts.to(DEVICE), torch.tensor(0, device=DEVICE), none, none[0], 3, mode)
    assert int((got - acc).sum()) == int(counts[-1] if cumulative else counts.sum())


def test_the_collector_uses_it_on_cuda():
    if DEVICE.type != "cuda":
        pytest.skip("the CUDA dispatch of the record op needs a CUDA device")
    assert _ops.cuda_record_kernel() == "triton"
