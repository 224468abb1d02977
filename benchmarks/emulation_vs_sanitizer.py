"""Verdicts side by side: the same torch.cuda programs on a real GPU under PyTorch's CUDA sanitizer
(``TORCH_CUDA_SANITIZER=1``) and on the fake device under ``python -m streamkit check --emulate cuda``
(with ``CUDA_VISIBLE_DEVICES=`` so the emulation may run on the GPU machine: docs/emulation.md).

Needs a machine with a CUDA device for the sanitizer column; without one it prints why and exits 0
after the emulated column. Each program runs in a child process of its own.

Run: python benchmarks/emulation_vs_sanitizer.py
Expected differences, explained: the sanitizer checks kernels' tensor arguments only, so a free of
memory still read by another stream (record_stream missing) is not a race to it but is to streamkit;
both report an unordered read after write across streams.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

PROGRAMS = {
    "side stream reads without a wait (racy)": """
import torch
side = torch.cuda.Stream()
x = torch.ones(1 << 20, device="cuda")
torch.cuda._sleep(50_000_000)
x.mul_(2)
with torch.cuda.stream(side):
    y = x.sum()
torch.cuda.synchronize()
""",
    "side stream waits for the producer (fixed)": """
import torch
side = torch.cuda.Stream()
x = torch.ones(1 << 20, device="cuda")
x.mul_(2)
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    y = x.sum()
torch.cuda.current_stream().wait_stream(side)
torch.cuda.synchronize()
""",
    "event hand-over (fixed)": """
import torch
side = torch.cuda.Stream()
x = torch.ones(1 << 20, device="cuda")
x.add_(1)
ready = torch.cuda.Event()
ready.record()
side.wait_event(ready)
with torch.cuda.stream(side):
    y = x * 3
torch.cuda.current_stream().wait_stream(side)
print(y.sum().item())
""",
    "consumer on the default stream without a join (racy)": """
import torch
side = torch.cuda.Stream()
x = torch.zeros(1 << 20, device="cuda")
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    torch.cuda._sleep(50_000_000)
    x.fill_(1)
y = x + 1
torch.cuda.synchronize()
""",
    "free without record_stream (racy for streamkit only)": """
import torch
side = torch.cuda.Stream()
x = torch.ones(1 << 20, device="cuda")
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    torch.cuda._sleep(50_000_000)
    y = x * 1
del x
z = torch.empty(1 << 20, device="cuda").fill_(7)
torch.cuda.synchronize()
""",
}


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(code)
        path = f.name
    try:
        return subprocess.run(env.pop("__argv__") + [path], env=env, capture_output=True, text=True, timeout=300)
    finally:
        os.unlink(path)


def sanitizer_verdict(code: str) -> str:
    env = dict(os.environ, TORCH_CUDA_SANITIZER="1", __argv__=[sys.executable])
    proc = _run(code, env)
    text = proc.stdout + proc.stderr
    if "CSAN detected a possible data race" in text:
        return "race"
    return "clean" if proc.returncode == 0 else f"error (exit {proc.returncode})"


def emulated_verdict(code: str) -> str:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", __argv__=[sys.executable, "-m", "streamkit", "check", "--emulate", "cuda"])
    proc = _run(code, env)
    return {0: "clean", 1: "race"}.get(proc.returncode, f"error (exit {proc.returncode})")


def main() -> int:
    import torch

    gpu = torch.cuda.is_available()
    if not gpu:
        print("no CUDA device here (torch.cuda.is_available() is False): the sanitizer column is not run")
    print(f"{'program':55s}  {'sanitizer (GPU)':16s}  emulate='cuda' (CPU)")
    agree = disagree = 0
    for name, code in PROGRAMS.items():
        real = sanitizer_verdict(code) if gpu else "not run"
        emulated = emulated_verdict(code)
        print(f"{name:55s}  {real:16s}  {emulated}")
        if gpu:
            if real == emulated:
                agree += 1
            else:
                disagree += 1
    if gpu:
        print(f"\n{agree} agree, {disagree} disagree (see the module docstring for the expected difference)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
