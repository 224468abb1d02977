"""End to end, as an engine's CI runs it: an engine module that creates its side streams at import
time (and in the ``__init__`` of an object built then), a ``fake_session`` test, and a forward pass
under ``torch.inference_mode()`` with buffers made at start-up. A race on those streams must fail
the test naming the engine's line (it used to pass: the streams ran on the session's default stream)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import streamkit as sk
from _support import marker_line

with sk.use_backend("fake"):  # (what STREAMKIT_BACKEND=fake does in an engine's CI)
    import _engine_model

pytest_plugins = ["pytester"]
ENGINE = Path(_engine_model.__file__)


def _model(device: torch.device, ordered: bool) -> "_engine_model.TinyEngine":
    torch.manual_seed(0)
    return _engine_model.TinyEngine(device, ordered)


# CUDA: a side stream made at import time does not wait for the default stream (torch streams are non-blocking: c10/cuda/CUDAStream.cpp, cudaStreamNonBlocking)
def test_racy_forward_under_inference_mode_raises_naming_the_engine_line(fake_session):
    model = _model(fake_session.device, ordered=False)
    x = torch.ones(2, 8, device=fake_session.device)
    with pytest.raises(sk.RaceError) as info:
        with torch.inference_mode():
            model(x)
    race = info.value.race
    assert race.second.stream == _engine_model.STREAMS.side
    assert race.second.stream != sk.default_stream()
    assert Path(race.second.filename) == ENGINE
    assert race.second.lineno == marker_line(ENGINE, "engine-side-copy")
    # the cache was zeroed on the default stream at start-up; the side stream writes it unordered
    assert race.first.kind == "write" and race.second.kind == "write" and "copy_" in race.second.op
    assert "'side'" in str(info.value) and "_engine_model.py" in str(info.value)


# CUDA: side.wait_stream(current) orders the side stream after the producer (torch/cuda/streams.py Stream.wait_stream)
def test_ordered_forward_under_inference_mode_matches_cpu(fake_session):
    model = _model(fake_session.device, ordered=True)
    x = torch.arange(16.0, device=fake_session.device).reshape(2, 8)
    with torch.inference_mode():
        out = model(x).cpu()
    reference = _model(torch.device("cpu"), ordered=False)
    with torch.inference_mode():
        expected = reference(torch.arange(16.0).reshape(2, 8))
    torch.testing.assert_close(out, expected)
    assert not fake_session.races


def test_the_engine_test_fails_under_pytest(pytester):
    """The engine's own test, unmodified, now fails (it passed while import-time streams ran on
    the default stream)."""
    pytester.makepyfile(
        engine_model=ENGINE.read_text(),
        test_engine="""
            import torch, streamkit as sk
            with sk.use_backend("fake"):
                import engine_model

            def test_forward(fake_session):
                model = engine_model.TinyEngine(fake_session.device, ordered=False)
                with torch.inference_mode():
                    model(torch.ones(2, 8, device=fake_session.device))
        """,
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(failed=1)
    line = marker_line(ENGINE, "engine-side-copy")
    result.stdout.fnmatch_lines(["*RaceError*", f"*second: write by * on stream #* 'side' (created at engine_model.py:*) at engine_model.py:{line}*"])
