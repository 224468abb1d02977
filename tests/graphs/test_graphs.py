"""Graph capture on the fake device: the capture rules of CUDA (each raises sk.GraphCaptureError with
the rule named), the private pool, and replays checked as ordinary work by the race detector."""

from __future__ import annotations

import gc

import pytest
import torch

import streamkit as sk
from streamkit import fake


def _captured_axpy(x):
    """A graph computing ``y = 2x + 1`` and ``total = y.sum()`` from the static input ``x``."""
    g = sk.Graph()
    with sk.graph(g):
        y = x * 2 + 1
        total = y.sum()
    return g, y, total


def test_captured_outputs_hold_poison_until_the_first_replay():
    with fake.session():
        x = torch.ones(4, device=sk.device())
        g, y, total = _captured_axpy(x)
        assert torch.isnan(fake.peek(y)).all() and torch.isnan(fake.peek(total))  # nothing ran at capture
        g.replay()
        assert y.cpu().tolist() == [3.0] * 4


@pytest.mark.parametrize("schedule", ["eager", "lazy", "adversarial", "random"])
def test_replays_compute_right_values_with_the_input_changed_between_replays(schedule):
    with fake.session(schedule=schedule) as s:
        x = torch.zeros(4, device=sk.device())
        g, y, total = _captured_axpy(x)
        kernels = s.stats.kernels
        for value in (1.0, 2.0, 5.0):
            x.fill_(value)  # on the current stream: the replay below is ordered after it
            g.replay()
            assert y.cpu().tolist() == [2 * value + 1] * 4
            assert total.item() == 4 * (2 * value + 1)
        assert s.stats.kernels - kernels == 3 * (1 + 3 + 2)  # fill, the 3 captured kernels, 2 reads


def test_a_forked_side_stream_that_never_rejoins_raises_the_capture_error():
    with fake.session():
        x = torch.ones(4, device=sk.device())
        g = sk.Graph()
        side = sk.Stream()
        with pytest.raises(sk.GraphCaptureError, match=r"cudaErrorStreamCaptureUnjoined.*wait_stream\(side\)"):
            with sk.graph(g):
                side.wait_stream(sk.current_stream())  # fork
                with sk.switch(side):
                    x.add_(1)
                # no sk.current_stream().wait_stream(side)
        with pytest.raises(sk.GraphError, match="without a preceding successful capture"):
            g.replay()


def test_item_during_capture_raises_the_capture_error_and_leaves_the_graph_empty():
    with fake.session():
        x = torch.ones(4, device=sk.device())
        g = sk.Graph()
        with pytest.raises(sk.GraphCaptureError, match=r"\.item\(\).*cudaErrorStreamCaptureUnsupported"):
            with sk.graph(g):
                (x + 1).sum().item()
        with pytest.raises(sk.GraphError, match="without a preceding successful capture"):
            g.replay()
        with sk.graph(g):  # the graph can be captured after the failure
            x.mul_(3)
        g.replay()
        assert x.cpu().tolist() == [3.0] * 4


@pytest.mark.parametrize(
    "sync, rule",
    [
        (lambda x: x.cpu(), "cudaErrorStreamCaptureUnsupported"),
        (lambda x: torch.nonzero(x), "cudaErrorStreamCaptureUnsupported"),
        (lambda x: sk.current_stream().synchronize(), "cudaErrorStreamCaptureUnsupported"),
        (lambda x: sk.current_stream().query(), "cudaErrorStreamCaptureUnsupported"),
        (lambda x: sk.synchronize(), "cudaErrorStreamCaptureUnsupported"),
        (lambda x: sk.current_stream().record_event().synchronize(), "cudaErrorCapturedEvent"),
        (lambda x: x.to("cpu", non_blocking=True), "doesn't capture host transfers"),
    ],
    ids=["cpu", "nonzero", "stream-sync", "query", "device-sync", "captured-event-sync", "non-blocking-d2h"],
)
def test_host_synchronizations_during_capture_raise(sync, rule):
    with fake.session():
        x = torch.ones(4, device=sk.device())
        with pytest.raises(sk.GraphCaptureError, match=rule):
            with sk.graph(sk.Graph()):
                sync(x + 1)


def test_the_capture_is_invalidated_by_a_caught_error():
    with fake.session():
        x = torch.ones(4, device=sk.device())
        with pytest.raises(sk.GraphCaptureError, match="cudaErrorStreamCaptureInvalidated"):
            with sk.graph(sk.Graph()):
                with pytest.raises(sk.GraphCaptureError):
                    x.sum().item()
                x.add_(1)  # later captured work raises, and so does the end of the block


def test_a_wait_on_an_event_recorded_outside_the_capture_raises():
    with fake.session():
        x = torch.ones(4, device=sk.device())
        side = sk.Stream()
        side.wait_stream(sk.current_stream())
        with sk.switch(side):
            x.add_(1)
        ready = side.record_event()
        with pytest.raises(sk.GraphCaptureError, match="cudaErrorStreamCaptureIsolation"):
            with sk.graph(sk.Graph()):
                sk.current_stream().wait_event(ready)
        with pytest.raises(sk.GraphCaptureError, match="cudaErrorStreamCaptureIsolation"):
            with sk.graph(sk.Graph()):
                sk.current_stream().wait_stream(side)  # side is not part of the capture


def test_default_stream_use_during_capture_and_capture_on_it_raise():
    with fake.session():
        x = torch.ones(4, device=sk.device())
        with pytest.raises(sk.GraphCaptureError, match="non-default stream"):
            with sk.graph(sk.Graph(), stream=sk.default_stream()):
                pass
        with pytest.raises(sk.GraphCaptureError, match="cudaErrorStreamCaptureImplicit"):
            with sk.graph(sk.Graph()):
                with sk.switch(sk.default_stream()):
                    x.add_(1)


def test_fork_and_join_through_events_replays_in_order():
    with fake.session(schedule="adversarial"):
        x = torch.ones(4, device=sk.device())
        side = sk.Stream()
        g = sk.Graph()
        with sk.graph(g):
            a = x * 2
            forked = sk.current_stream().record_event()
            side.wait_event(forked)  # side joins the capture
            with sk.switch(side):
                b = a + 10
            joined = side.record_event()
            sk.current_stream().wait_event(joined)
            c = b * a
        for value in (1.0, 3.0):
            x.fill_(value)
            g.replay()
            assert c.cpu().tolist() == [(2 * value + 10) * 2 * value] * 4


def test_uncaptured_streams_run_ordinary_work_during_capture():
    with fake.session():
        x = torch.ones(4, device=sk.device())
        other = sk.Stream()
        g = sk.Graph()
        with sk.graph(g):
            with sk.switch(other):
                ran = x + 1  # not captured: runs now
            y = x * 3
        assert fake.peek(ran).tolist() == [2.0] * 4
        assert torch.isnan(fake.peek(y)).all()


def test_private_pool_tensors_survive_their_references_and_the_capture():
    with fake.session():
        x = torch.ones(4, device=sk.device())
        g = sk.Graph()
        with sk.graph(g):
            tmp = x + 1
            scratch = torch.empty(4, device=sk.device())  # an allocation of the pool: poison
            scratch.copy_(tmp)
            out = scratch * 2
            del tmp, scratch
        gc.collect()
        x.fill_(4.0)
        g.replay()
        assert out.cpu().tolist() == [10.0] * 4
        x.fill_(0.0)
        g.replay()
        assert out.cpu().tolist() == [2.0] * 4


def test_replay_of_a_freed_input_raises():
    with fake.session():
        x = torch.ones(4, device=sk.device())
        g, y, _ = _captured_axpy(x)
        del x
        gc.collect()
        with pytest.raises(sk.GraphError, match=r"shape \(4,\).*has been freed"):
            g.replay()


def test_capture_under_inference_mode():
    with fake.session():
        with torch.inference_mode():
            x = torch.ones(4, device=sk.device())
            g, y, total = _captured_axpy(x)
        g.replay()  # outside inference mode: the pool tensors are updated all the same
        assert y.cpu().tolist() == [3.0] * 4
        with torch.inference_mode():
            x.fill_(2.0)
            g.replay()
            assert total.item() == 20.0


def test_a_host_write_of_the_input_while_a_replay_may_run_is_a_race():
    with fake.session(detect="record") as s:
        x = torch.ones(4, device=sk.device())
        g, y, _ = _captured_axpy(x)
        side = sk.Stream()
        side.wait_stream(sk.current_stream())
        with sk.switch(side):
            g.replay()  # reads x on the replay's stream
        x.copy_(torch.full((4,), 7.0))  # the default stream writes x: nothing orders it after the replay
        assert len(s.races) == 1
        race = s.races[0]
        assert (race.first.kind, race.second.kind) == ("read", "write")
        assert "replay of the graph made at" in str(race)
        assert "test_graphs.py" in race.first.location


def test_a_host_write_of_the_input_after_a_sync_is_fine_and_right():
    with fake.session(detect="raise", schedule="adversarial"):
        x = torch.ones(4, device=sk.device())
        g, y, _ = _captured_axpy(x)
        side = sk.Stream()
        side.wait_stream(sk.current_stream())
        for value in (1.0, 2.0, 3.0):
            with sk.switch(side):
                g.replay()
                host = y.cpu()  # a blocking copy on the replay's stream: after the whole replay
            sk.current_stream().wait_stream(side)
            x.copy_(torch.full((4,), value + 1))
            side.wait_stream(sk.current_stream())
            assert host.tolist() == [2 * value + 1] * 4


def test_reading_an_output_on_another_stream_without_a_wait_is_a_race():
    with fake.session(detect="record") as s:
        x = torch.ones(4, device=sk.device())
        g, y, _ = _captured_axpy(x)
        side = sk.Stream()
        side.wait_stream(sk.current_stream())
        with sk.switch(side):
            g.replay()
        y.sum()  # the default stream reads y, written by the replay on side
        assert [(r.first.kind, r.second.kind) for r in s.races] == [("write", "read")]
        # the fix names the stream replay() ran on (ordering it orders the whole replay)
        assert s.races[0].fix.startswith("sk.default_stream().wait_stream(side) after test_graphs.py:"), s.races[0].fix


def test_replays_on_different_streams_are_serialized():
    """cudaGraphLaunch: each launch is ordered behind the previous launches of the graph."""
    with fake.session(detect="raise"):
        x = torch.ones(4, device=sk.device())
        g = sk.Graph()
        with sk.graph(g):
            x.add_(1)
        a, b = sk.Stream(), sk.Stream()
        a.wait_stream(sk.current_stream())
        b.wait_stream(sk.current_stream())
        with sk.switch(a):
            g.replay()
        with sk.switch(b):
            g.replay()  # writes x again: no race with the first replay
        sk.current_stream().wait_stream(b)
        assert x.cpu().tolist() == [3.0] * 4


def test_misuse_errors_are_clear():
    with fake.session():
        x = torch.ones(4, device=sk.device())
        g, _, _ = _captured_axpy(x)
        with pytest.raises(sk.GraphError, match="already owns a captured graph"):
            with sk.graph(g):
                pass
        with pytest.raises(TypeError, match=r"graph\(g\): expected a streamkit.Graph"):
            sk.graph(object())
        with pytest.raises(sk.GraphCaptureError, match="already underway"):
            with sk.graph(sk.Graph()):
                with sk.graph(sk.Graph()):
                    pass
        g.reset()
        with pytest.raises(sk.GraphError, match="without a preceding successful capture"):
            g.replay()
        with sk.graph(g, pool=None):
            x.add_(1)
        h = sk.Graph()
        with sk.graph(h, pool=g.pool()):
            x.add_(1)
        g.replay()
        h.replay()
        assert x.cpu().tolist() == [3.0] * 4


def test_a_backend_without_graphs_raises_graph_unsupported():
    class NoGraphs(type(sk.get_backend("fake"))):
        name = "nographs"

        def new_graph(self):
            return sk.Backend.new_graph(self)

    with pytest.raises(sk.GraphUnsupportedError, match="does not support graph capture"):
        NoGraphs().new_graph()


# CUDA: CUDAGraph::replay is cudaGraphLaunch(graph_exec_, getCurrentCUDAStream()); a graph launch into a capturing stream fails with cudaErrorStreamCaptureUnsupported ("operation not permitted when stream is capturing") and invalidates the capture (measured on an H200, CUDA 12.6: onnxruntime PR 32081)
def test_replaying_a_graph_inside_another_capture_raises_the_cuda_error():
    with fake.session():
        x = torch.ones(4, device=sk.device())
        inner, y, _ = _captured_axpy(x)
        outer = sk.Graph()
        with pytest.raises(sk.GraphCaptureError, match="cudaErrorStreamCaptureInvalidated"):
            with sk.graph(outer):
                with pytest.raises(sk.GraphCaptureError, match=r"cudaGraphLaunch.*cudaErrorStreamCaptureUnsupported"):
                    inner.replay()
                x.add_(1)  # the capture is invalidated: later captured work fails too
        with pytest.raises(sk.GraphCaptureError, match="cudaErrorStreamCaptureImplicit"):
            with sk.graph(outer):
                with sk.switch(sk.default_stream()):
                    inner.replay()  # the legacy stream may not be used during a capture
        side = sk.Stream()
        with sk.graph(outer):
            x.mul_(2)
            with pytest.raises(sk.GraphCaptureError, match="outside the capture"):
                with sk.switch(side):
                    inner.replay()  # not modelled: refused, the capture stays valid
        inner.replay()  # after the capture: an ordinary replay
        assert y.cpu().tolist() == [3.0] * 4
        outer.replay()
        inner.replay()
        assert x.cpu().tolist() == [2.0] * 4 and y.cpu().tolist() == [5.0] * 4
