"""The pytest marker (in this process for cuda; in a child process for npu, which this process
can't emulate), and the refusals on machines with a real device (simulated)."""

from __future__ import annotations

import sys
import types

import pytest

from streamkit import fake
from streamkit._backends.fake import _emulate

pytest_plugins = ["pytester"]

MARKED = '''
import pytest, torch

@pytest.mark.streamkit_emulate("cuda")
def test_cuda_racy():
    side = torch.cuda.Stream()
    x = torch.ones(4, device="cuda")
    with torch.cuda.stream(side):
        x.sum()  # <marked-read>

@pytest.mark.streamkit_emulate("cuda")
@pytest.mark.skipif(False, reason="")
def test_cuda_fixed():
    assert torch.cuda.is_available()
    x = torch.ones(4, device="cuda")
    assert x.device.type == "cuda" and x.sum().item() == 4.0

@pytest.mark.streamkit_emulate("npu")
def test_npu_in_a_child():
    import torch_npu
    side = torch_npu.npu.Stream()
    x = torch.ones(4, device="npu")
    side.wait_stream(torch.npu.current_stream())
    with torch.npu.stream(side):
        assert (x * 2).sum().item() == 8.0

def test_unmarked_sees_no_emulation():
    assert not torch.cuda.is_available()
'''


def test_streamkit_emulate_marker(pytester):
    with fake.session():
        pass  # (this process is a fake process: the npu test must go to a child)
    pytester.makepyfile(test_marked=MARKED)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-q", "-p", "no:randomly")
    result.assert_outcomes(failed=1, passed=3)
    result.stdout.fnmatch_lines(["*test_cuda_racy*", "*RaceError*", "*second: read by * at test_marked.py:8*"])
    assert _emulate.installed() is None


def test_cuda_emulation_is_refused_where_a_real_gpu_is_visible(monkeypatch):
    monkeypatch.setattr(_emulate, "_real_cuda_available", lambda: True)
    with pytest.raises(fake.EmulationError, match="real CUDA device.*CUDA_VISIBLE_DEVICES="):
        with fake.session(emulate="cuda"):
            pass
    assert _emulate.installed() is None


def test_npu_emulation_is_refused_where_the_real_torch_npu_is_loaded(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    with pytest.raises(fake.EmulationError, match="torch_npu is loaded"):
        with fake.session(emulate="npu"):
            pass


def test_one_device_type_at_a_time():
    with _emulate.emulating("cuda"):
        with pytest.raises(fake.EmulationError, match="one device type is emulated at a time"):
            _emulate.acquire("npu")
