"""The checker CLI on the shipped examples and on bad input."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_check(*args):
    return subprocess.run(
        [sys.executable, "-m", "streamkit", "check", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_racy_example_is_reported_with_both_lines_and_exit_1():
    proc = run_check("examples/side_stream_racy.py")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 race(s)" in proc.stdout
    src = open(os.path.join(ROOT, "examples/side_stream_racy.py")).read().splitlines()
    write_line = next(i for i, l in enumerate(src, 1) if "default stream writes" in l)
    read_line = next(i for i, l in enumerate(src, 1) if "BUG" in l)
    assert f"side_stream_racy.py:{write_line}" in proc.stdout
    assert f"side_stream_racy.py:{read_line}" in proc.stdout
    assert "side.wait_stream(sk.default_stream())" in proc.stdout


def test_fixed_example_is_clean():
    proc = run_check("examples/side_stream_fixed.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 race(s)" in proc.stdout


def test_script_arguments_and_failures(tmp_path):
    script = tmp_path / "argv.py"
    script.write_text("import sys\nassert sys.argv[1:] == ['--n', '3'], sys.argv\nraise SystemExit(0)\n")
    assert run_check(str(script), "--n", "3").returncode == 0
    bad = tmp_path / "bad.py"
    bad.write_text("raise ValueError('boom')\n")
    proc = run_check(str(bad))
    assert proc.returncode == 2 and "boom" in proc.stdout
    missing = run_check(str(tmp_path / "nope.py"))
    assert missing.returncode == 2 and "no such script" in missing.stdout
