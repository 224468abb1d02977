"""Bad inputs to the engine's entry points: each raises (or reports) at the entry point, naming
the argument, the value and what is accepted; and a switch() object entered twice restores the
stream it found."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import textwrap

import pytest
import torch

import streamkit as sk
from streamkit import fake
from streamkit.check import check_script, main

from _support import REPO, child_env


def test_set_backend_refuses_a_non_string_name():
    with pytest.raises(TypeError, match=r"set_backend\(name\): expected a backend name \(str\).*got list \['fake'\]"):
        sk.set_backend(["fake"])


def test_a_switch_object_entered_twice_restores_the_stream_it_found():
    # torch's StreamContext entered twice restores the side stream after both blocks: we don't
    with fake.session():
        side = sk.Stream()
        default = sk.current_stream()
        sw = sk.switch(side)
        with sw:
            assert sk.current_stream() == side
            with sw:
                assert sk.current_stream() == side
            assert sk.current_stream() == side
        assert sk.current_stream() == default
        with sw:  # and it works again afterwards
            assert sk.current_stream() == side
        assert sk.current_stream() == default


def test_wait_event_on_a_stream_suggests_where_events_come_from():
    with fake.session():
        side = sk.Stream()
        with pytest.raises(TypeError) as info:
            side.wait_event(side)
    message = str(info.value)
    assert "Stream.wait_event(event): expected a streamkit.Event, got streamkit._api.Stream" in message
    assert "record_event()" in message and "current_stream()" not in message


def test_peek_names_what_it_got():
    with pytest.raises(TypeError, match=r"peek\(tensor\): expected a fake-device tensor .*got str 'x'"):
        fake.peek("x")
    with pytest.raises(TypeError, match=r"got a tensor on cpu"):
        fake.peek(torch.ones(2))


def test_an_event_of_an_ended_session_says_an_event():
    with fake.session():
        event = sk.Event()
    with pytest.raises(sk.SessionClosedError) as info:
        sk.current_stream().wait_event(event)
    assert "works as an event of that session" in str(info.value)


def test_the_checker_on_a_directory_says_it_is_a_directory(tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = check_script(str(tmp_path), (), out=out)
    assert code == 2
    assert f"script: {str(tmp_path)!r} is a directory; expected a Python script file" in out.getvalue()


def test_check_without_a_script_names_only_the_script():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as info:
        main(["check"])
    assert info.value.code == 2
    assert "required: script" in err.getvalue() and "args" not in err.getvalue().split("required:")[1]


def test_a_checked_script_ending_with_os_exit_still_reports_its_race(tmp_path):
    script = tmp_path / "exits.py"
    script.write_text(textwrap.dedent("""
        import os
        import torch
        import streamkit as sk

        x = torch.zeros(4, device=sk.device())
        side = sk.Stream()
        with sk.switch(side):
            x.add_(1)
        x.mul_(2)
        print("script done", flush=True)
        os._exit(0)
    """))
    proc = subprocess.run(
        [sys.executable, "-m", "streamkit", "check", str(script)],
        cwd=str(REPO), env=child_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "script done" in proc.stdout
    assert "[race 1 of 2]" in proc.stdout and "exits.py: 2 race(s)" in proc.stdout
    assert "by aten.mul_.Tensor on the default stream at exits.py:10" in proc.stdout
