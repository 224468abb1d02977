"""Exact overlap of strided views (docs/semantics.md, "What is a kernel, an access, a host sync"):
two accesses conflict only if they share an element's bytes, so interleaved slices, disjoint
column splits and disjoint transposed blocks written on two streams are not a race; views that
share an element still are."""

from __future__ import annotations

import random

import torch

import streamkit as sk
from _support import marker_line
from _programs import assert_matches_cpu, races_of
from streamkit._backends.fake import _overlap


def _two_streams(device, first, second, ordered=False):
    """``first(x)`` on the default stream, ``second(x)`` on a side stream, no wait between them
    unless ``ordered``."""
    x = torch.arange(48.0, device=device).view(8, 6)
    side = sk.Stream()
    side.wait_stream(sk.current_stream())
    first(x)
    if ordered:
        side.wait_stream(sk.current_stream())
    with sk.switch(side):
        second(x)
    sk.current_stream().wait_stream(side)
    return x


DISJOINT = {
    "interleaved columns": (lambda x: x[:, ::2].mul_(2), lambda x: x[:, 1::2].add_(1)),
    "column split": (lambda x: x[:, :3].mul_(2), lambda x: x[:, 3:].add_(1)),
    "transposed blocks": (lambda x: x[:4].t().mul_(2), lambda x: x[4:].t().add_(1)),
    "interleaved rows of a transpose": (lambda x: x.t()[::2].mul_(2), lambda x: x.t()[1::2].sum()),
}
OVERLAPPING = {
    "every 2nd and every 3rd column": (lambda x: x[:, ::2].mul_(2), lambda x: x[:, ::3].add_(1)),
    "a column and a row": (lambda x: x[:, 1].mul_(2), lambda x: x[2].sum()),
    "interleaved read of a written block": (lambda x: x[:, :3].mul_(2), lambda x: x[:, 1::2].sum()),
}


# CUDA: two kernels conflict only on the bytes both touch (CUDA memory model: a data race needs a shared location); CSAN compares bounding ranges (torch/cuda/_sanitizer.py), the fake compares elements
def test_views_sharing_no_element_are_no_race():
    for name, (first, second) in DISJOINT.items():
        assert races_of(lambda d: _two_streams(d, first, second)) == [], name
        assert_matches_cpu(lambda d: _two_streams(d, first, second), seeds=(0,))


# CUDA: a shared element written on one stream and touched on another with no wait is a data race (CUDA stream semantics)
def test_views_sharing_an_element_race_until_ordered():
    for name, (first, second) in OVERLAPPING.items():
        races = races_of(lambda d: _two_streams(d, first, second))
        # (reports name the lambda's line, in OVERLAPPING)
        assert [(r.first.kind, r.first.stream == sk.default_stream(), r.second.stream != sk.default_stream()) for r in races] == [
            ("write", True, True)
        ], name
        assert races_of(lambda d: _two_streams(d, first, second, ordered=True)) == [], name
        assert_matches_cpu(lambda d: _two_streams(d, first, second, ordered=True), seeds=(0,))


def test_a_strided_write_keeps_the_records_between_its_elements():
    # x[::2] written on default after x[1::2] was written on side: the side write stays recorded,
    # so a later unordered read of x[1::2] on default still races with it
    def program(device):
        x = torch.zeros(8, device=device)
        side = sk.Stream()
        side.wait_stream(sk.current_stream())
        with sk.switch(side):
            x[1::2].fill_(1.0)  # <odd-write>
        x[::2].fill_(2.0)
        x[1::2].sum()  # <odd-read>
        sk.current_stream().wait_stream(side)

    races = races_of(program)
    assert [(r.first.lineno, r.second.lineno) for r in races] == [
        (marker_line(__file__, "odd-write"), marker_line(__file__, "odd-read"))
    ]


def test_disjoint_agrees_with_the_elements():
    rng = random.Random(0)
    base = torch.arange(120.0)
    for _ in range(300):
        views = []
        for _ in range(2):
            shape = (rng.randint(1, 4), rng.randint(1, 4))
            stride = (rng.randint(0, 12), rng.randint(0, 5))
            extent = sum((n - 1) * s for n, s in zip(shape, stride)) + 1
            offset = rng.randint(0, 120 - extent)
            views.append(base.as_strided(shape, stride, offset))
        a, b = views
        ea = {a.storage_offset() + i * a.stride(0) + j * a.stride(1) for i in range(a.shape[0]) for j in range(a.shape[1])}
        eb = {b.storage_offset() + i * b.stride(0) + j * b.stride(1) for i in range(b.shape[0]) for j in range(b.shape[1])}
        la, lb = _overlap.layout_of(a), _overlap.layout_of(b)
        ra = (a.storage_offset() * 4, (max(ea) + 1) * 4)
        rb = (b.storage_offset() * 4, (max(eb) + 1) * 4)
        if not (ra[0] < rb[1] and rb[0] < ra[1]):
            continue  # (the detector asks only when bounding ranges overlap)
        record = _overlap.strided_record(*ra, 0, 0, None, la) if la is not None else type("R", (), {"start": ra[0], "end": ra[1]})()
        if la is None:
            assert max(ea) - min(ea) + 1 == len(ea)  # dense: its elements fill its range
        assert _overlap.disjoint(record, rb[0], rb[1], lb) == (not (ea & eb)), (a.stride(), b.stride())
