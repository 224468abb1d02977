"""Autograd on the fake backend.

PyTorch runs backward for a non-CPU device on a per-device autograd thread that needs a native
device guard; the fake device only has PyTorch's Python one, and that thread aborts the process.
So the fake backend refuses backward with a clear NotImplementedError (never an abort, never
silently wrong gradients), while forward passes of tensors that require grad are tracked as usual.

Run in a subprocess: if the refusal ever regresses into the abort, the test fails instead of
taking the test process down.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json
    import torch
    import streamkit as sk
    from streamkit import fake

    out = {"refused": []}
    with fake.session(detect="record") as s:
        w = torch.ones(4, device=s.device, requires_grad=True)
        loss = (w * 3).sum()
        out["forward"] = loss.item()
        for name, call in [
            ("Tensor.backward", lambda: loss.backward()),
            ("autograd.backward", lambda: torch.autograd.backward([loss])),
            ("autograd.grad", lambda: torch.autograd.grad(loss, [w])),
        ]:
            try:
                call()
            except NotImplementedError as exc:
                out["refused"].append([name, str(exc)])
        out["races"] = [str(r) for r in s.races]
    print("RESULT " + json.dumps(out), flush=True)
    """
)


def test_backward_is_refused_clearly_and_forward_works():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60, cwd=str(REPO)
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"exit code {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    out = json.loads(lines[0][len("RESULT "):])
    assert out["forward"] == 12.0
    assert [name for name, _ in out["refused"]] == ["Tensor.backward", "autograd.backward", "autograd.grad"]
    assert all("not supported on the fake device" in message for _, message in out["refused"])
    assert out["races"] == []
