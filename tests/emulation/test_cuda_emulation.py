"""``fake.session(emulate="cuda")``: unmodified torch.cuda code on the fake device; engine-shaped
programs (vLLM shared experts on an aux stream, SGLang two-batch overlap) racy and fixed, also
under ``fake.explore``; the process restored after the session."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

import streamkit as sk
from streamkit import fake
from streamkit._backends.fake import _emulate

from _support import free_port, marker_line

HERE = Path(__file__).parent


def test_bad_emulate_name_is_a_value_error_naming_the_argument():
    with pytest.raises(ValueError, match=r"session\(emulate\): expected None or one of 'cuda', 'npu', got 'rocm'"):
        with fake.session(emulate="rocm"):
            pass


def test_device_spellings_are_the_fake_device_and_the_process_is_restored():
    assert not torch.cuda.is_available()
    original_stream = torch.cuda.Stream
    with fake.session(emulate="cuda") as s:
        assert s.device == torch.device("cuda", 0) and sk.device() == torch.device("cuda", 0)
        assert torch.cuda.is_available() and torch.cuda.device_count() == 1 and torch.cuda.current_device() == 0
        made = [
            torch.ones(4, device="cuda"), torch.zeros(4, device="cuda:0"), torch.empty(4, device=torch.device("cuda", 0)),
            torch.arange(4.0).cuda(), torch.arange(4.0).to("cuda", non_blocking=True), torch.tensor([1.0, 2.0], device="cuda"),
        ]
        for x in made:
            assert type(x) is fake.FakeDeviceTensor and x.is_cuda and x.device.type == "cuda" and str(x.device) == "cuda:0"
        assert "device='cuda:0'" in repr(made[0])
        assert made[3].cpu().tolist() == [0.0, 1.0, 2.0, 3.0]
        with pytest.raises(sk.DeviceIndexError, match="cuda:1"):
            torch.ones(2, device="cuda:1")
        with pytest.raises(sk.DeviceIndexError):
            torch.cuda.set_device(1)
        assert torch.accelerator.current_accelerator() == torch.device("cuda")
    assert not torch.cuda.is_available() and torch.cuda.Stream is original_stream
    assert not hasattr(fake.FakeDeviceTensor, "is_cuda") or "is_cuda" not in fake.FakeDeviceTensor.__dict__
    assert _emulate.installed() is None
    with pytest.raises(RuntimeError):
        torch.ones(1, device="cuda")  # the CPU build's own error again


def test_stream_event_graph_memory_surface():
    with fake.session(emulate="cuda") as s:
        side = torch.cuda.Stream(priority=-1)
        assert side.priority == -1 and side != torch.cuda.current_stream()
        assert torch.cuda.current_stream() == torch.cuda.default_stream()
        x = torch.ones(1024, device="cuda")
        done = torch.cuda.Event(enable_timing=True)
        done.record()
        side.wait_event(done)
        torch.cuda.set_stream(side)
        assert torch.cuda.current_stream() == side
        y = x * 2
        torch.cuda.set_stream(torch.cuda.default_stream())
        torch.accelerator.set_stream(side)  # torch.accelerator answers for the emulated device
        assert torch.accelerator.current_stream() == side and torch.accelerator.device_count() == 1
        torch.accelerator.set_stream(torch.cuda.default_stream())
        torch.cuda.current_stream().wait_stream(side)
        assert y.sum().item() == 2048.0
        torch.accelerator.synchronize()
        with pytest.raises(NotImplementedError, match="interprocess"):
            torch.cuda.Event(interprocess=True)
        assert torch.cuda.memory_allocated() >= 2 * 4096 and torch.cuda.max_memory_allocated() >= torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        assert torch.cuda.max_memory_allocated() == torch.cuda.memory_allocated()
        free, total = torch.cuda.mem_get_info()
        assert total == 80 * 1024**3 and free < total
        assert torch.cuda.get_device_capability() == (9, 0) and "emulated" in torch.cuda.get_device_name()
        # a graph: captured on a side stream, replayed
        static = torch.zeros(8, device="cuda")
        g = torch.cuda.CUDAGraph()
        capture = torch.cuda.Stream()
        capture.wait_stream(torch.cuda.current_stream())
        with torch.cuda.graph(g, stream=capture, pool=torch.cuda.graph_pool_handle()):
            out = static + 1
        static.fill_(5)
        g.replay()
        assert out.cpu().tolist() == [6.0] * 8
        torch.cuda.nvtx.range_push("x")
        torch.cuda.nvtx.range_pop()
        torch.cuda._sleep(100)
        torch.cuda.synchronize()
        assert not s.races


# CUDA: torch.manual_seed seeds the CPU generator and calls torch.cuda.manual_seed_all (torch/random.py
# _manual_seed_impl), torch.seed likewise; fake kernels draw from the CPU generator, so the emulated
# torch.cuda seeding functions seed that one
def test_seeding_through_torch_and_torch_cuda_draws_what_the_cpu_draws():
    torch.manual_seed(3)
    expected = torch.randn(4)
    with fake.session(emulate="cuda"):
        draws = []
        for seed_with in (torch.manual_seed, torch.cuda.manual_seed, torch.cuda.manual_seed_all):
            seed_with(3)  # (torch.manual_seed once recursed without end through the emulated manual_seed_all)
            draws.append(torch.randn(4, device="cuda").cpu())
        torch.seed()
        torch.cuda.seed()
        torch.cuda.seed_all()
        assert torch.cuda.initial_seed() == torch.initial_seed()
    assert all(torch.equal(d, expected) for d in draws)


def test_racy_side_stream_names_the_users_lines_and_fix():
    with fake.session(emulate="cuda", detect="record") as s:
        x = torch.ones(4, device="cuda")
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            x * 2
    (race,) = s.races
    text = str(race)
    assert Path(race.first.filename).name == "test_cuda_emulation.py" and Path(race.second.filename).name == "test_cuda_emulation.py"
    assert "_emulate_torch" not in text and "/streamkit/" not in text  # never a line of the emulation layer


def _shared_experts(wait: bool):
    module = sys.modules.get("_vllm_shared_experts") or importlib.import_module("_vllm_shared_experts")
    module.WAIT_FOR_INPUT = wait
    return module


@pytest.fixture
def vllm_module():
    """The vLLM-shaped module, imported inside cuda emulation (its aux stream is made at import)."""
    sys.path.insert(0, str(HERE))
    original_set_stream = torch.cuda.set_stream
    try:
        with fake.session(emulate="cuda"):
            sys.modules.pop("_vllm_shared_experts", None)
            module = importlib.import_module("_vllm_shared_experts")
            assert torch.cuda.set_stream is module._patched_set_stream  # (vLLM's own replacement)
        assert torch.cuda.set_stream is original_set_stream  # the process as found
        yield module
    finally:
        sys.path.remove(str(HERE))
        sys.modules.pop("_vllm_shared_experts", None)


def _cpu_reference(module, x):
    layer = module.SharedExpertsMoE()
    with torch.inference_mode():
        weights, ids = torch.topk(torch.softmax(x @ layer.gate, dim=-1), layer.top_k)
        routed = torch.zeros_like(x)
        for k in range(layer.top_k):
            routed += weights[:, k:k + 1] * torch.bmm(x.unsqueeze(1), layer.experts[ids[:, k]]).squeeze(1)
        return routed + x @ layer.shared


def test_vllm_shared_experts_without_the_input_wait_is_reported_with_its_lines(vllm_module):
    vllm_module.WAIT_FOR_INPUT = False
    path = Path(vllm_module.__file__)
    with fake.session(emulate="cuda") as s:
        layer = vllm_module.SharedExpertsMoE().cuda()
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)).cuda()
        with pytest.raises(sk.RaceError) as info:
            with torch.inference_mode():
                layer(x)
    race = info.value.race
    assert Path(race.second.filename) == path and race.second.lineno == marker_line(path, "shared-read")
    assert f"created at _vllm_shared_experts.py:{marker_line(path, 'aux-stream')}" in str(info.value)


def test_vllm_shared_experts_with_the_wait_is_clean_and_equals_cpu(vllm_module):
    vllm_module.WAIT_FOR_INPUT = True
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    with fake.session(emulate="cuda") as s:
        layer = vllm_module.SharedExpertsMoE().cuda()
        with torch.inference_mode():
            out = layer(x.cuda()).cpu()
    assert not s.races
    torch.testing.assert_close(out, _cpu_reference(vllm_module, x))


def test_vllm_shared_experts_under_explore(vllm_module):
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))

    def step():
        layer = vllm_module.SharedExpertsMoE().cuda()
        with torch.inference_mode():
            return layer(x.cuda()).cpu()

    vllm_module.WAIT_FOR_INPUT = True
    fixed = fake.explore(step, schedules=4, emulate="cuda")
    assert fixed.ok and not fixed.reference.races
    vllm_module.WAIT_FOR_INPUT = False
    racy = fake.explore(step, schedules=4, emulate="cuda")
    assert racy.reference.races and not racy.ok
    again = fake.replay(step, racy.failure.token, emulate="cuda")  # the failing schedule, again
    assert again.ok is False and again.replayed_by in ("schedule", "constraints")
    with pytest.raises(ValueError, match=r"replay\(emulate\)"):
        fake.replay(step, racy.failure.token, emulate="gpu")


@pytest.fixture
def nccl_world_of_one():
    """init_process_group("nccl") under cuda emulation: gloo underneath, world size 1."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    with fake.session(emulate="cuda"):
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield dist
    finally:
        dist.destroy_process_group()


def test_sglang_two_batch_overlap_racy_and_fixed(nccl_world_of_one):
    sys.path.insert(0, str(HERE))
    try:
        import _sglang_tbo as tbo
    finally:
        sys.path.remove(str(HERE))
    path = Path(tbo.__file__)
    x = torch.arange(32.0).reshape(8, 4) / 10
    w = torch.eye(4) * 3
    tbo.JOIN = True
    with fake.session(emulate="cuda") as s:
        comm = torch.cuda.Stream()
        out = tbo.two_batch_overlap(x.cuda(), w.cuda(), comm).cpu()
    assert not s.races
    torch.testing.assert_close(out, (x @ w) * 2)
    tbo.JOIN = False
    with fake.session(emulate="cuda", detect="record") as s:
        comm = torch.cuda.Stream()
        tbo.two_batch_overlap(x.cuda(), w.cuda(), comm)
    assert s.races
    lines = {(Path(r.first.filename).name, r.first.lineno, r.second.lineno) for r in s.races}
    assert ("_sglang_tbo.py", marker_line(path, "tbo-allreduce"), marker_line(path, "tbo-combine")) in lines


def test_sglang_two_batch_overlap_under_explore(nccl_world_of_one):
    sys.path.insert(0, str(HERE))
    try:
        import _sglang_tbo as tbo
    finally:
        sys.path.remove(str(HERE))
    x = torch.arange(32.0).reshape(8, 4) / 10
    w = torch.eye(4) * 3

    def step():
        return tbo.two_batch_overlap(x.cuda(), w.cuda(), torch.cuda.Stream()).cpu()

    tbo.JOIN = True
    fixed = fake.explore(step, schedules=4, emulate="cuda")
    assert fixed.ok and not fixed.reference.races
    torch.testing.assert_close(fixed.reference.values, (x @ w) * 2)
    tbo.JOIN = False
    racy = fake.explore(step, schedules=4, emulate="cuda")
    # (world size 1: the all-reduce leaves values as they are, so only the report tells)
    path = Path(tbo.__file__)
    assert {(r.first.lineno, r.second.lineno) for r in racy.reference.races} >= {
        (marker_line(path, "tbo-allreduce"), marker_line(path, "tbo-combine"))
    }


def test_nccl_shaped_all_gather_output(nccl_world_of_one):
    dist = nccl_world_of_one
    with fake.session(emulate="cuda") as s:
        x = torch.arange(6.0, device="cuda").reshape(2, 3)
        stacked = torch.empty(1, 2, 3, device="cuda")
        dist.all_gather_into_tensor(stacked, x)
        flat = torch.empty(2, 3, device="cuda")
        dist.all_gather_into_tensor(flat, x)
        assert stacked.cpu().reshape(2, 3).tolist() == flat.cpu().tolist() == x.cpu().tolist()
    assert not s.races


def test_fixes_name_the_emulated_api_and_streamkit_s_again_after():
    # the user's code calls torch.cuda: the fix says torch.cuda.default_stream(), not sk.default_stream()
    with fake.session(emulate="cuda", detect="record") as s:
        side = torch.cuda.Stream()
        x = torch.ones(4, device="cuda")
        x.mul_(2)
        with torch.cuda.stream(side):
            x.sum()
    (race,) = s.races
    assert race.fix.startswith("side.wait_stream(torch.cuda.default_stream()) after")
    with fake.session(detect="record") as s:
        side = sk.Stream()
        x = torch.ones(4, device=s.device)
        x.mul_(2)
        with sk.switch(side):
            x.sum()
    (race,) = s.races
    assert race.fix.startswith("side.wait_stream(sk.default_stream()) after")
