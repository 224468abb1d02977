"""npu emulation runs in a process of its own (PyTorch names its PrivateUse1 device once per
process, and this one named it 'fake'): ``python -m streamkit check --emulate npu`` on a
torch_npu-style script (vllm-ascend PR 4214's path on two HCCL ranks, racy and fixed), and ``pytest
--streamkit-emulate=npu`` on a torch.npu-only test file; in this process, emulate='npu' is refused
saying why and what to do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from streamkit import fake
from streamkit._backends.fake import _emulate

from _support import REPO, child_env, marker_line, run_ranks

HERE = Path(__file__).parent


def test_npu_in_a_fake_process_is_refused_saying_why_and_what_to_do():
    with fake.session():
        pass  # (this process's PrivateUse1 is 'fake' now)
    with pytest.raises(fake.EmulationError, match=r"named it 'fake'.*--emulate npu"):
        with fake.session(emulate="npu"):
            pass
    assert _emulate.installed() is None and "torch_npu" not in sys.modules


@pytest.mark.eager_only("the racy step's gathered loads are the eager order's (a deferred schedule gathers what it ran first: nan)")
def test_pr4214_script_on_two_ranks_racy_reported_with_its_lines_and_fixed_clean():
    """Each rank runs the reverted step, then the fixed one: every race names the reverted call,
    none the fixed one, and both gather every rank's loads."""
    script = HERE / "scripts" / "eplb_npu.py"
    updator = HERE / "_eplb_updator.py"
    for r in run_ranks(["-m", "streamkit", "check", "--emulate", "npu", str(script)], world=2):
        out = r.stdout
        assert r.returncode == 1, r.describe()
        assert f"_eplb_updator.py:{marker_line(updator, 'stack')}" in out and f"_eplb_updator.py:{marker_line(updator, 'gather')}" in out
        assert f"created at _eplb_updator.py:{marker_line(updator, 'updator-stream')}" in out
        assert f"eplb_npu.py:{marker_line(script, 'racy-call')}" in out
        assert f"eplb_npu.py:{marker_line(script, 'fixed-call')}" not in out  # the fix is clean
        assert "_emulate" not in out.replace("--emulate", "")
        # (1+2+3+4)*8 + (2+3+4+5)*8 from both ranks, into a (world, layers, experts) output, both times
        assert out.count("heat 2 192.0 npu:0") == 2, r.describe()


NPU_TESTS = '''
import pytest, torch

EMULATION_TESTS = EMULATION_TESTS_DIR

side = torch.npu.Stream()  # <import-stream>

@pytest.mark.skipif(not torch.npu.is_available(), reason="needs an NPU")
def test_racy():
    x = torch.ones(4, device="npu")
    with torch.npu.stream(side):
        y = x * 2  # <racy-read>

def test_pinned_round_trip_is_a_device_copy_not_a_host_access():
    # x.to("npu", non_blocking=True) of a pinned buffer is a copy ordered on the stream, not a host
    # read racing the D2H copy that fills the buffer (the device name is "npu" in this process)
    d = torch.ones(4, device="npu")
    h = d.to("cpu", non_blocking=True)
    back = h.to("npu", non_blocking=True)
    assert back.cpu().tolist() == [1.0] * 4

def test_fixed():
    x = torch.ones(4, device="npu:0")
    side.wait_stream(torch.npu.current_stream())
    with torch.npu.stream(side):
        y = x * 2
    torch.npu.current_stream().wait_stream(side)
    assert y.cpu().tolist() == [2.0] * 4 and y.device.type == "npu"

def test_pr4214_updator_under_explore(tmp_path):
    import datetime, socket, sys
    import torch.distributed as dist
    from streamkit import fake
    sys.path.insert(0, EMULATION_TESTS)
    import _eplb_updator
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("hccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        updator = _eplb_updator.EplbUpdator()

        def step():
            loads = [torch.full((8,), float(layer), device="npu") for layer in range(4)]
            for load in loads:
                load.add_(1)
            return updator.compute_and_set_moe_load(loads).cpu()

        _eplb_updator.FIXED = True
        fixed = fake.explore(step, schedules=4, emulate="npu")
        assert fixed.ok and not fixed.reference.races and fixed.reference.values.sum().item() == 80.0
        _eplb_updator.FIXED = False
        racy = fake.explore(step, schedules=4, emulate="npu")
        assert racy.reference.races and not racy.ok
    finally:
        dist.destroy_process_group()

def test_custom_op_names_itself():
    import torch_npu
    with pytest.raises(NotImplementedError, match="torch_npu.npu_moe_init_routing.*monkeypatch"):
        torch_npu.npu_moe_init_routing(torch.ones(2, device="npu"))
    assert not hasattr(torch_npu, "_C")
'''


def test_pytest_option_runs_a_torch_npu_suite(tmp_path):
    """``pytest --streamkit-emulate=npu`` on an engine's torch.npu test file, and on the torch.npu
    cases of tests/fidelity/test_device_api.py (which this process skips), in one child process."""
    test_file = tmp_path / "test_engine_npu.py"
    test_file.write_text(NPU_TESTS.replace("EMULATION_TESTS_DIR", repr(str(HERE))))
    api_rules = REPO / "tests" / "fidelity" / "test_device_api.py"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(test_file), str(api_rules), "-k", "test_engine_npu or torch.npu",
         "--streamkit-emulate=npu", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-p", "no:randomly", "-rs",
         "--rootdir", str(REPO)],
        cwd=str(REPO), env=child_env(), capture_output=True, text=True, timeout=180,
    )
    out = proc.stdout
    assert "1 failed, 16 passed" in out and "skipped" not in out, out + proc.stderr
    assert f"test_engine_npu.py:{marker_line(test_file, 'racy-read')}" in out
    assert f"created at test_engine_npu.py:{marker_line(test_file, 'import-stream')}" in out
