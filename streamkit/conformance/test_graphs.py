"""Graph capture rules, on every backend that captures graphs (``cuda``: ``torch.cuda.CUDAGraph``;
``fake``: recorded kernels; ``npu`` is skipped: ``torch.npu.NPUGraph`` is not checked here yet).

Errors are asserted as ``RuntimeError``: CUDA raises its own (``cudaErrorStreamCaptureUnjoined``,
``cudaErrorStreamCaptureUnsupported``), fake raises ``sk.GraphCaptureError``, a RuntimeError too.
Warm-up runs on a side stream before capture, as torch/cuda/graphs.py advises.
"""

from __future__ import annotations

import pytest
import torch

import streamkit as sk


@pytest.fixture
def graphs(streamkit_backend):
    if streamkit_backend.name == "npu":
        pytest.skip("npu: the NPUGraph rules are not part of the conformance suite yet (no Ascend check run)")
    return streamkit_backend


def _warm_up(fn):
    side = sk.Stream()
    side.wait_stream(sk.current_stream())
    with sk.switch(side):
        fn()
    sk.current_stream().wait_stream(side)
    sk.synchronize()


def test_capture_and_replay_compute_right_values_with_a_static_input(graphs):
    x = torch.zeros(8, device=sk.device())
    out = {}

    def step():
        out["y"] = (x * 2 + 1).sum()

    _warm_up(step)
    g = sk.Graph()
    with sk.graph(g):
        step()
    y = out["y"]
    for value in (1.0, 2.0, 3.0):
        x.fill_(value)  # the static input, updated in place on the replay's stream
        g.replay()
        assert y.item() == 8 * (2 * value + 1)


def test_replay_then_host_read_after_synchronize(graphs):
    x = torch.arange(4, dtype=torch.float32, device=sk.device())
    g = sk.Graph()
    _warm_up(lambda: x.mul(3))
    with sk.graph(g):
        y = x.mul(3)
    g.replay()
    sk.synchronize()
    assert y.cpu().tolist() == [0.0, 3.0, 6.0, 9.0]


def test_an_unjoined_fork_raises(graphs):
    x = torch.ones(4, device=sk.device())
    side = sk.Stream()
    g = sk.Graph()
    with pytest.raises(RuntimeError):
        with sk.graph(g):
            side.wait_stream(sk.current_stream())
            with sk.switch(side):
                x.add_(1)
    sk.synchronize()


def test_item_during_capture_raises(graphs):
    x = torch.ones(4, device=sk.device())
    _warm_up(lambda: x.sum())
    g = sk.Graph()
    with pytest.raises(RuntimeError):
        with sk.graph(g):
            x.sum().item()
    sk.synchronize()
