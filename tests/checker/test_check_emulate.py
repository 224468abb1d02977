"""``python -m streamkit check --emulate cuda``: an unmodified torch.cuda-only script, its stream
made at import time, reported with its own lines (in this process: cuda emulation needs no process
of its own); a bad value is refused at the entry point."""

from __future__ import annotations

import io
import textwrap

import pytest
import torch

from streamkit.check import check_script, main
from streamkit._backends.fake import _emulate

from _support import marker_line

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch

    side = torch.cuda.Stream()  # <import-stream>
    assert torch.cuda.is_available()


    def step(wait):
        x = torch.randn(64, device="cuda")
        y = x * 2  # <producer>
        if wait:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            z = y.sum()  # <consumer>
        torch.cuda.current_stream().wait_stream(side)
        return z.item()


    step(sys.argv[1] == "fixed")
    print("device", torch.ones(1, device="cuda").device)
    """
)


@pytest.mark.parametrize("variant", ["racy", "fixed"])
def test_check_emulate_cuda_on_an_unmodified_torch_cuda_script(tmp_path, variant, capsys):
    script = tmp_path / "engine_step.py"
    script.write_text(SCRIPT)
    out = io.StringIO()
    code = check_script(str(script), [variant], out=out, emulate="cuda")
    text = out.getvalue()
    assert "device cuda:0" in capsys.readouterr().out  # (the script's own print)
    if variant == "fixed":
        assert code == 0 and "0 race(s)" in text, text
    else:
        assert code == 1, text
        assert f"engine_step.py:{marker_line(script, 'producer')}" in text and f"engine_step.py:{marker_line(script, 'consumer')}" in text
        assert f"created at engine_step.py:{marker_line(script, 'import-stream')}" in text
        assert "streamkit/" not in text.replace("streamkit check", "")
    assert _emulate.installed() is None and not torch.cuda.is_available()


def test_check_emulate_refuses_an_unknown_device(tmp_path, capsys):
    script = tmp_path / "s.py"
    script.write_text("pass\n")
    out = io.StringIO()
    assert check_script(str(script), emulate="rocm", out=out) == 2
    assert "check --emulate: expected None or one of 'cuda', 'npu', got 'rocm'" in out.getvalue()
    with pytest.raises(SystemExit) as exit_info:
        main(["check", "--emulate", "rocm", str(script)])
    assert exit_info.value.code == 2 and "invalid choice: 'rocm'" in capsys.readouterr().err


def test_a_script_opening_an_emulating_session_under_the_plain_checker(tmp_path):
    script = tmp_path / "own_session.py"
    script.write_text(textwrap.dedent(
        """
        import torch
        from streamkit import fake

        with fake.session(emulate="cuda", detect="record") as s:
            side = torch.cuda.Stream()
            x = torch.ones(8, device="cuda")
            with torch.cuda.stream(side):
                x.sum()  # <block-read>
            assert len(s.races) == 1
        assert not torch.cuda.is_available()
        """
    ))
    out = io.StringIO()
    assert check_script(str(script), out=out) == 1, out.getvalue()
    assert f"own_session.py:{marker_line(script, 'block-read')}" in out.getvalue()


@pytest.mark.parametrize("racy", [False, True], ids=["fixed", "racy"])
def test_the_readme_engine_example_runs_unmodified(racy, monkeypatch, capsys):
    # examples/aux_stream_cuda.py (the README's `check --emulate cuda` line): an import-time aux
    # stream, inference_mode, .double()/.float() casts, param.data = ..., nccl init and an async
    # all_reduce, written against torch.cuda only
    from _support import REPO, free_port

    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    example = REPO / "examples" / "aux_stream_cuda.py"
    out = io.StringIO()
    code = check_script(str(example), ["--racy"] if racy else [], out=out, emulate="cuda")
    text = out.getvalue()
    assert code == (1 if racy else 0), text
    if racy:
        assert "2 race(s)" in text and "on stream #1 'AUX' (created at aux_stream_cuda.py:17)" in text
        assert "fix: AUX.wait_stream(torch.cuda.default_stream())" in text
    else:
        assert "0 race(s)" in text
        assert "heat 8" in capsys.readouterr().out  # the script ran to its end (its all_reduce on 1 rank)
    assert _emulate.installed() is None and not torch.cuda.is_available()
