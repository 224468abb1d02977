"""``python -m streamkit conformance``: the shipped suite, its rule-by-backend table and exit status."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from streamkit.conformance import Table, _split_id

from _support import REPO, child_env

# One process (STREAMKIT_BACKEND=fake): first the fake device before any session (issue 16: it
# belongs to the backend), then the CLI on fake and npu (torch_npu is never installed here, also not
# on GPU machines: exit 2, and fake's column), the CLI on the emulated columns (in a child process),
# the runner on a registered backend whose test set-up always fails (exit 1, every rule FAIL), and
# pin_memory() once every session has ended.
SCENARIO = r"""
import contextlib, io, json, sys
import torch
import streamkit as sk
from streamkit import conformance
from streamkit.check import main
from streamkit._backends.fake import FakeBackend

device = {"device": str(sk.device())}  # (loads the backend, which registers its device: `import streamkit` loads none)
before = torch.ones(4, device="fake")
device["before_session"] = [type(before).__name__, str(before.device), before.sum().item()]
out = io.StringIO()
with contextlib.redirect_stdout(out):
    cli = main(["conformance", "--backend", "fake", "--backend", "npu"])
emulated_out = io.StringIO()
with contextlib.redirect_stdout(emulated_out):
    emulated = main(["conformance", "--backend", "cuda-emulated", "--backend", "npu-emulated"])

class Broken(FakeBackend):
    name = "broken"

    @classmethod
    @contextlib.contextmanager
    def test_context(cls):
        raise AssertionError("broken on purpose")
        yield

sk.register_backend("broken", Broken)
broken_out = io.StringIO()
broken = conformance.run(["broken"], out=broken_out)
try:
    device["pinned_after"] = type(torch.ones(3).pin_memory()).__name__
except Exception as error:
    device["pinned_after"] = type(error).__name__
print(json.dumps({"cli": cli, "out": out.getvalue(), "broken": broken, "broken_out": broken_out.getvalue(),
                  "emulated": emulated, "emulated_out": emulated_out.getvalue(), "device": device}))
"""


def test_conformance_cli_table_and_exit_status():
    proc = subprocess.run(
        [sys.executable, "-c", SCENARIO], cwd=str(REPO), env=child_env({"STREAMKIT_BACKEND": "fake"}), capture_output=True,
        text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    out = result["out"]
    assert result["cli"] == 2, out  # npu was named and is unavailable here
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("rule "))
    assert lines[header].split() == ["rule", "fake", "npu"]
    end = lines.index("", header)
    rows = {line.rsplit(None, 2)[0].strip(): line.split()[-2:] for line in lines[header + 2:end]}
    assert rows["streams: switch_nests"] == ["pass", "skip"]
    assert rows["streams: factories_on_device[arange]"] == ["pass", "skip"]
    assert rows["hazards: unordered_read_sees_stale_data"] == ["pass", "n/a"]  # a cuda/fake-only rule
    assert rows["streams: native_objects_are_rejected"] == ["n/a", "skip"]  # a cuda/npu-only rule
    assert len(rows) >= 60 and all(cells[0] in ("pass", "n/a") for cells in rows.values()), out
    _check_emulated_columns(result["emulated"], result["emulated_out"])
    # the fake device before any session, and pin_memory() after every session ended (PyTorch's own
    # CPU kernel again, not the fake's pinned model: the override lives while a session is open)
    assert result["device"]["device"] == "fake:0"
    assert result["device"]["before_session"] == ["FakeDeviceTensor", "fake:0", 4.0]
    assert result["device"]["pinned_after"] != "PinnedHostTensor"
    assert "npu: 0 pass, 0 FAIL" in out and "unavailable: npu backend unavailable" in out
    assert "npu named but unavailable" in out
    _check_docs_sample(out, result["emulated_out"])
    assert result["broken"] == 1
    assert "FAIL streams: switch_nests on broken (setup)" in result["broken_out"]
    assert "broken on purpose" in result["broken_out"] and "rule(s) failed" in result["broken_out"]


def test_rule_names_drop_the_backend_parameter():
    assert _split_id("test_switch_nests[fake]", "fake") == "switch_nests"
    assert _split_id("test_factories_on_device[cuda-arange]", "cuda") == "factories_on_device[arange]"
    assert _split_id("test_stream_priority_type[1.0-npu]", "npu") == "stream_priority_type[1.0]"


def test_table_render_marks_failures_skips_and_rules_that_do_not_apply():
    table = Table(["fake", "cuda", "npu"])
    table.unavailable["npu"] = "npu backend unavailable: no torch_npu"
    table.set("streams: a", "fake", "pass")
    table.set("streams: a", "cuda", "FAIL")
    table.set("streams: a", "cuda", "pass")  # a teardown pass does not hide a call failure
    table.set("streams: a", "npu", "skip", "npu backend unavailable: no torch_npu")
    table.set("hazards: b", "fake", "pass")
    table.set("hazards: b", "cuda", "skip", "the allocator gave another block")
    text = table.render()
    lines = text.splitlines()
    assert lines[0].split() == ["rule", "fake", "cuda", "npu"]
    assert lines[2].split() == ["streams:", "a", "pass", "FAIL", "skip"]
    assert lines[3].split() == ["hazards:", "b", "pass", "skip", "[1]", "n/a"]
    assert "[1] the allocator gave another block" in text
    assert "npu: 0 pass, 0 FAIL, 1 skip (unavailable: npu backend unavailable: no torch_npu)" in text
    assert table.failures == [("streams: a", "cuda")]


def _check_emulated_columns(code: int, out: str) -> None:
    """``cuda (emulated)`` / ``npu (emulated)``: streamkit's cuda and npu backends over the fake
    device's emulated torch.cuda / torch.npu, every rule passing."""
    assert code == 0, out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("rule "))
    assert "cuda (emulated)" in lines[header] and "npu (emulated)" in lines[header]
    end = lines.index("", header)
    rows = lines[header + 2:end]
    assert len(rows) >= 60 and all("FAIL" not in row for row in rows), out
    cuda = next(line for line in lines if line.startswith("cuda (emulated):"))
    npu = next(line for line in lines if line.startswith("npu (emulated):"))
    assert " 0 FAIL" in cuda and " 0 FAIL" in npu
    assert int(cuda.split(":")[1].split()[0]) >= 65 and int(npu.split(":")[1].split()[0]) >= 60
    hazard = next(row for row in rows if row.startswith("hazards: unordered_read_sees_stale_data"))
    assert hazard.split()[-2:] == ["pass", "n/a"]  # the detector reports the hazard (a cuda/fake-only rule)


def _check_docs_sample(out: str, emulated_out: str) -> None:
    """The conformance figures the docs show are a real run's: docs/api.md's sample (rows and
    summary lines of `--backend fake --backend npu`) and docs/emulation.md's emulated columns."""
    api = (REPO / "docs" / "api.md").read_text()
    sample = api[api.index("python -m streamkit conformance --backend fake"):]
    sample = sample[sample.index("```text") + 7: sample.index("```", sample.index("```text") + 7)]
    lines = [line.strip() for line in out.splitlines()]
    shown = [line.strip() for line in sample.strip().splitlines() if line.strip() and line.strip() != "..."]
    assert len(shown) >= 7, sample  # the header, rows and both summary lines
    for line in shown:
        assert line in lines, f"docs/api.md shows {line!r}; the run printed:\n{out}"
    emulation = (REPO / "docs" / "emulation.md").read_text()
    for column in ("cuda (emulated)", "npu (emulated)"):
        (printed,) = [line for line in emulated_out.splitlines() if line.startswith(f"{column}: ")]
        passed, failed = re.match(r".*?: (\d+) pass, (\d+) FAIL", printed).groups()
        assert f"`{column}` {passed} pass, {failed} FAIL" in emulation.replace("\n", " "), (column, printed)
