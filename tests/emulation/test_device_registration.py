"""The device belongs to the backend (issue 16): registered at ``FakeBackend.load()``, so
``sk.device()``, ``device="fake"`` and availability are right before any session (the first two
are checked in tests/checker/test_conformance_cli.py's fresh process, with ``pin_memory()`` after
every session ended); the ``_pin_memory`` override lives only while a session is open; the README
example runs with its session line removed on the cuda backend (over the emulated torch.cuda)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import streamkit as sk
from streamkit import fake
from streamkit._backends.fake import _emulate

from _support import REPO, child_env

FOREIGN = r"""
import json, torch
torch.utils.rename_privateuse1_backend("foo")
import streamkit as sk
from streamkit import fake
out = {"reason": sk.unavailable_reason("fake"), "available": sk.available_backends()}
try:
    with fake.session():
        pass
except sk.BackendUnavailableError as error:
    out["session"] = str(error)
print(json.dumps(out))
"""


def _run(code: str, env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), env=child_env(env), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_pin_memory_is_the_fakes_only_inside_a_session():
    # (before any session, and after every session: tests/checker/test_conformance_cli.py's scenario)
    with fake.session():
        assert type(torch.ones(3).pin_memory()) is fake.PinnedHostTensor


def test_fake_is_unavailable_when_another_extension_named_privateuse1():
    out = _run(FOREIGN, {})
    assert out["reason"] and "'foo' already uses it" in out["reason"]
    assert "fake" not in out["available"]
    assert "'foo' already uses it" in out["session"]


def _readme_example() -> str:
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Example\n\n```python\n(.*?)```", text, re.S).group(1)
    lines = block.splitlines()
    (i,) = [n for n, line in enumerate(lines) if line.startswith("with fake.session(")]
    body = textwrap.dedent("\n".join(lines[i + 1:]))
    return "\n".join(lines[:i]) + "\n" + body + "\n"


def test_readme_example_runs_with_its_session_line_dropped_on_the_cuda_backend(capsys):
    code = _readme_example()
    assert "fake.session" not in code
    with _emulate.emulating("cuda"), sk.use_backend("cuda") as backend:
        assert backend.name == "cuda" and sk.device() == torch.device("cuda", 0)
        exec(compile(code, "README.md", "exec"), {})
        assert capsys.readouterr().out.split() == ["2048.0"]
        racy = code.replace("side.wait_stream(sk.current_stream())", "pass")
        with pytest.raises(sk.RaceError):
            exec(compile(racy, "README.md", "exec"), {})
    assert _emulate.installed() is None and not torch.cuda.is_available()
