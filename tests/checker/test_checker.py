"""The checker on ordinary scripts: scripts that open their own fake sessions, races found when the
script ends, and processes started with multiprocessing spawn (tests/checker/scripts)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import streamkit as sk
from streamkit import fake
from streamkit._checker_scope import checker_session
from streamkit.check import CheckedBlock, _last_line, check_script

from _support import REPO, child_env, free_port, marker_line

SCRIPTS = Path(__file__).parent / "scripts"


def _check(path, *args):
    """Run the checker in this process: (exit code, the script's output and the report)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = check_script(str(path), args, out=out)
    return code, out.getvalue()


def _race_blocks(text: str) -> list[str]:
    return re.split(r"\n\[race \d+ of \d+[^\]]*\]\n", text)[1:]


# -- a script's own fake.session() ------------------------------------------------------------------
def test_checker_block_is_a_scope_of_the_checker_session():
    with checker_session() as host:
        side = sk.Stream()
        with fake.session(detect="record") as s:
            assert isinstance(s, CheckedBlock) and s.host is host
            # what a script uses of its session: the device, its detect mode, open until the block ends
            assert s.device == sk.device() and s.detect == "record" and not s.closed
            assert sk.get_backend() is host.backend and s.backend is host.backend
            x = torch.ones(4, device=s.device)
            x.add_(1)
            with sk.switch(side):
                x.sum()
            assert len(s.races) == 1 and s.races[0] is host.races[0]
            assert s.stats.kernels == 3
        assert s.closed and not host.closed and host.detect == "record"
        sk.current_stream().wait_stream(side)
        x.add_(1)  # the host goes on; the block's views are frozen
        assert len(s.races) == 1 and s.stats.kernels == 3
        with pytest.raises(fake.RaceError):
            with fake.session(detect="raise") as strict:
                assert host.detect == "raise"
                with sk.switch(side):
                    x.sum()  # unordered with the add_ above
        assert host.detect == "record" and strict.closed
        assert len(host.races) == 2  # the checker saw the raised race too
        with fake.session(detect="off") as off:
            y = torch.ones(2, device=sk.device())
            y.add_(1)
            with sk.switch(side):
                y.sum()
        assert len(off.races) == 1  # under the checker, "off" is checked like "record"
        sk.current_stream().wait_stream(side)


def test_checker_block_raises_a_free_race_at_its_end_in_raise_mode():
    with checker_session():
        side = sk.Stream()
        with pytest.raises(fake.RaceError, match="free"):
            with fake.session(detect="raise"):
                x = torch.ones(4, device=sk.device())
                side.wait_stream(sk.current_stream())
                with sk.switch(side):
                    x.sum()
                del x  # the free race is pending; the block's end raises it


def test_blocks_do_not_nest_and_sessions_outside_the_checker_are_unchanged():
    with checker_session():
        with fake.session():
            with pytest.raises(sk.StreamkitError, match="don't nest"):
                with fake.session():
                    pass
    with fake.session(detect="record") as s:
        assert type(s) is fake.Session


def test_a_script_with_its_own_sessions_runs_under_the_checker():
    path = SCRIPTS / "own_sessions.py"
    code, out = _check(path)
    assert code == 1, out
    assert f"record block races: 1 {marker_line(path, 'record-read')}" in out
    assert "nested: True" in out
    assert f"raised: {marker_line(path, 'raise-read')}" in out
    assert "after the block: 1 True 3" in out
    assert "clean block: 8.0 0 1" in out
    blocks = _race_blocks(out)
    assert len(blocks) == 3, out
    name = path.name
    assert f"{name}:{marker_line(path, 'record-read')}" in blocks[0]
    assert f"{name}:{marker_line(path, 'raise-read')}" in blocks[1]
    # the read that was never joined: its tensor is freed when the script ends, at its last line
    last = marker_line(path, "last")
    assert f"free by the caching allocator (last reference dropped) on the default stream at {name}:{last}" in blocks[2]
    assert f"{name}:{marker_line(path, 'unjoined-read')}" in blocks[2]
    assert "check.py" not in out


def test_the_readme_example_runs_under_the_checker(tmp_path):
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert "fake.session(" in block
    script = tmp_path / "readme_example.py"
    script.write_text(block)
    code, out = _check(script)
    assert code == 0, out
    assert "2048.0" in out.split() and "0 race(s)" in out


def test_teardown_after_sys_exit_names_the_exit_line():
    path = SCRIPTS / "teardown_in_main.py"
    code, out = _check(path)
    assert code == 1, out
    assert "exited with status 3" in out
    blocks = _race_blocks(out)
    assert len(blocks) == 2, out
    # a global, and a local of main() that only the exception's frames kept: both at the exit line
    for block in blocks:
        assert f"free by the caching allocator (last reference dropped) on the default stream at {path.name}:{marker_line(path, 'exit')}" in block
    assert sorted(f"{path.name}:{marker_line(path, m)}" in b for b in blocks for m in ("side-read", "local-read")) == [False, False, True, True]
    assert "check.py" not in out


@pytest.mark.parametrize(
    "source, line",
    [
        ("a = 1\nb = 2\n", 2),
        ("def main():\n    pass\n\nif __name__ == '__main__':\n    x = 1\n    main()\n", 6),
        ("with open(__file__) as f:\n    a = 1\n    b = 2\n", 3),
        ("for i in range(3):\n    pass\n", 1),
        ("", 1),
    ],
)
def test_last_line(source, line):
    import ast

    assert _last_line(ast.parse(source)) == line


# -- spawned children --------------------------------------------------------------------------------
def test_spawned_and_forked_children_are_checked_and_merged():
    path = SCRIPTS / "spawn_ranks.py"
    proc = subprocess.run(
        [sys.executable, "-m", "streamkit", "check", str(path), str(free_port())],
        cwd=str(REPO), env=child_env(), capture_output=True, text=True, timeout=120,
    )
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr  # the parent had no race: the child's counts
    assert "ranks done; fork child exit code 1" in out
    headers = re.findall(r"\[race \d+ of 3, in ([^\]]+)\]", out)
    assert [h.split(" (pid ")[0] for h in headers] == ["rank 0", "rank 1", "ForkProcess-1"], out
    rank0, rank1, forked = _race_blocks(out)
    name = path.name
    # rank 0: the local freed as rank_fn returned names rank_fn's last line, not torch's caller
    assert f"free by the caching allocator (last reference dropped) on the default stream at {name}:{marker_line(path, 'rank0-return')}" in rank0
    assert f"{name}:{marker_line(path, 'rank0-read')}" in rank0
    assert f"{name}:{marker_line(path, 'child-write')}" in rank1 and f"{name}:{marker_line(path, 'child-read')}" in rank1
    assert f"{name}:{marker_line(path, 'fork-write')}" in forked and f"{name}:{marker_line(path, 'fork-write-side')}" in forked
    for block in (rank0, rank1, forked):
        assert "<string>" not in block and "_spawn_child.py" not in block and "check.py" not in block
        assert "multiprocessing" not in block
    assert "3 race(s);" in out and "(0 race(s) here, 3 in 3 child process(es))" in out
    assert re.search(r"rank 0 \(pid \d+\): 1 race\(s\); exit code 0; [1-9]\d* kernels", out), out
    # rank 1 never finished its report; the race it streamed before dying is there
    assert re.search(r"rank 1 \(pid \d+\): 1 race\(s\); no end of report", out), out
    # the fork child raised: its report ends with exit code 1 and its own counts (not the parent's)
    assert re.search(r"ForkProcess-1 \(pid \d+\): 1 race\(s\); exit code 1; 3 kernels, 1 host syncs", out), out


def test_child_labels(monkeypatch):
    import multiprocessing

    from streamkit import check

    class Proc:
        name = "SpawnProcess-3"
        _target = None
        _args = ()

    proc = Proc()
    monkeypatch.setattr(multiprocessing, "current_process", lambda: proc)
    monkeypatch.delenv("RANK", raising=False)
    pid = os.getpid()
    assert check._child_label() == f"SpawnProcess-3 (pid {pid})"
    monkeypatch.setenv("RANK", "5")
    assert check._child_label() == f"rank 5 (pid {pid})"
    import torch.multiprocessing.spawn  # noqa: F401

    proc._target = sys.modules["torch.multiprocessing.spawn"]._wrap
    proc._args = (print, 2, (), "errfile")
    assert check._child_label() == f"rank 2 (pid {pid})"  # the spawn index wins over RANK


def test_child_reports_survive_a_cut_line(tmp_path):
    from streamkit import check

    (tmp_path / "child-11.jsonl").write_text(
        '{"kind": "start", "label": "SpawnProcess-1 (pid 11)"}\n{"kind": "race", "label": "SpawnProcess-1 (pid 11)", "text": "R"}\n{"kind": "ra'
    )
    (tmp_path / "child-12.jsonl").write_text(
        '{"kind": "start", "label": "rank 0 (pid 12)"}\n{"kind": "end", "label": "rank 0 (pid 12)", "exitcode": 0, "kernels": 4, "host_syncs": 1}\n'
    )
    first, second = check._read_child_reports(str(tmp_path))
    assert (first.label, first.races, first.exitcode, first.kernels) == ("rank 0 (pid 12)", [], 0, 4)
    assert (second.label, second.races, second.exitcode) == ("SpawnProcess-1 (pid 11)", ["R"], None)


def test_import_time_side_stream_made_before_the_checker_runs(tmp_path):
    # The library was imported (and made its side stream, in the process's default session) before
    # the checker opened its session, as when a launcher or sitecustomize imports it first; the
    # script is unmodified. The stream binds to the checker's session on first use, so the race is
    # reported.
    lib = tmp_path / "sk_early_lib.py"
    lib.write_text("import streamkit as sk\nSIDE = sk.Stream()\n")
    script = tmp_path / "script.py"
    script.write_text(
        "import torch, streamkit as sk\nimport sk_early_lib as lib\n"
        "x = torch.ones(4, device=sk.device())\nx.add_(1)\n"
        "with sk.switch(lib.SIDE):\n    y = x.sum()\n"
        "lib.SIDE.synchronize()\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        import sk_early_lib  # noqa: F401  (imported before the checker runs)

        code, out = _check(script)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("sk_early_lib", None)
    assert code == 1 and "1 race(s)" in out, out


def test_import_time_side_stream_of_a_module_the_script_imports(tmp_path):
    # The script's imports run inside the checker's session: a stream a module makes when imported
    # is the checker's, and the race is reported.
    lib = tmp_path / "sk_import_time_lib.py"
    lib.write_text("import streamkit as sk\nSIDE = sk.Stream()\n")
    script = tmp_path / "script.py"
    script.write_text(
        "import torch, streamkit as sk\nimport sk_import_time_lib as lib\n"
        "x = torch.ones(4, device=sk.device())\nx.add_(1)\n"
        "with sk.switch(lib.SIDE):\n    y = x.sum()  # <read>\n"
        "lib.SIDE.synchronize()\n"
    )
    try:
        code, out = _check(script)
    finally:
        sys.modules.pop("sk_import_time_lib", None)
    assert code == 1, out
    (block,) = _race_blocks(out)
    assert f"script.py:{marker_line(script, 'read')}" in block and "stream #1 'SIDE'" in block


def test_a_block_that_has_ended_cannot_be_entered_again(tmp_path):
    script = tmp_path / "reenter.py"
    script.write_text(
        "import streamkit as sk\nfrom streamkit import fake\n"
        "with fake.session() as s:\n    pass\n"
        "try:\n    s.__enter__()\nexcept sk.SessionClosedError as e:\n    print('refused:', e)\n"
    )
    code, out = _check(script)
    assert code == 0 and "refused:" in out and "has ended" in out, out


def test_a_schedule_asked_for_under_the_checker_warns_and_runs_eager(tmp_path):
    script = tmp_path / "lazy.py"
    script.write_text(
        "import warnings, torch, streamkit as sk\nfrom streamkit import fake\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    with fake.session(schedule='lazy') as s:\n"
        "        x = torch.ones(4, device=s.device)\n"
        "        print('value', (x * 2).sum().item())\n"
        "print('warned', any('checker runs the script on its own eager session' in str(w.message) for w in seen))\n"
    )
    code, out = _check(script)
    assert code == 0 and "value 8.0" in out and "warned True" in out, out
