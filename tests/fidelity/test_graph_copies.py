"""Graph capture of host-to-device copies (docs/semantics.md, "Graph capture"): a
``non_blocking=True`` copy from pinned host memory is a memcpy node of the graph that reads the
pinned buffer at every replay; the host may refill the buffer only once it has synchronized with
the previous replay's copy. Blocking or pageable copies stay refused."""

from __future__ import annotations

import pytest
import torch

import streamkit as sk
from _support import marker_line
from _programs import SCHEDULES
from streamkit import fake


def _feed(device, ordered=True):
    host = torch.zeros(4).pin_memory()
    static = torch.zeros(4, device=device)
    g = sk.Graph()
    with sk.graph(g):
        static.copy_(host, non_blocking=True)
        out = static * 2
    values = []
    for step in range(3):
        host.copy_(torch.full((4,), float(step)))
        g.replay()
        if not ordered:
            host.fill_(-1.0)  # <refill-early>
        sk.synchronize()
        values.append(out.cpu().tolist())
    return values


# CUDA: cudaMemcpyAsync from pinned host memory is captured as a memcpy node that reads the buffer at each cudaGraphLaunch (Programming Guide, "Stream Capture"; CUDA Runtime API, "API synchronization behavior")
def test_a_pinned_h2d_copy_is_captured_and_reads_the_buffer_at_every_replay():
    for schedule in SCHEDULES:
        with fake.session(detect="raise", schedule=schedule) as s:
            assert _feed(s.device) == [[0.0] * 4, [2.0] * 4, [4.0] * 4], schedule


# CUDA: the host must not write a pinned buffer an unfinished asynchronous copy reads (CUDA semantics notes, "Use pinned memory buffers")
def test_refilling_the_buffer_before_the_replay_is_done_races():
    with fake.session(detect="record") as s:
        _feed(s.device, ordered=False)
    assert [(r.first.op, r.second.kind, r.second.lineno) for r in s.races] == [
        ("aten.copy_.default", "host write", marker_line(__file__, "refill-early"))
    ]  # (one report per site)


# CUDA: a pageable or blocking copy synchronizes the host, which a capture forbids (cudaErrorStreamCaptureUnsupported)
@pytest.mark.parametrize("copy", [
    lambda dst, src: dst.copy_(src, non_blocking=True),  # pageable source
    lambda dst, src: dst.copy_(src.pin_memory()),  # blocking
], ids=["pageable", "blocking"])
def test_pageable_and_blocking_copies_stay_refused(copy):
    with fake.session() as s:
        dst = torch.zeros(4, device=s.device)
        src = torch.ones(4)
        with pytest.raises(sk.GraphCaptureError, match="cudaErrorStreamCaptureUnsupported"):
            with sk.graph(sk.Graph()):
                copy(dst, src)
