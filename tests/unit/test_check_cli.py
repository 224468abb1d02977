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


# The CLI's entry point in this process (what `python -m streamkit check` calls): the subprocess
# start-up (importing torch) is paid once above, for the README's racy example.
def check_in_process(capsys, *args):
    from streamkit.check import main

    code = main(["check", *args])
    return code, capsys.readouterr().out


def test_fixed_example_is_clean(capsys):
    code, out = check_in_process(capsys, os.path.join(ROOT, "examples/side_stream_fixed.py"))
    assert code == 0, out
    assert "0 race(s)" in out


def test_script_arguments_and_failures(tmp_path, capsys):
    script = tmp_path / "argv.py"
    script.write_text("import sys\nassert sys.argv[1:] == ['--n', '3'], sys.argv\nraise SystemExit(0)\n")
    assert check_in_process(capsys, str(script), "--n", "3")[0] == 0
    bad = tmp_path / "bad.py"
    bad.write_text("raise ValueError('boom')\n")
    code, out = check_in_process(capsys, str(bad))
    assert code == 2 and "boom" in out
    code, out = check_in_process(capsys, str(tmp_path / "nope.py"))
    assert code == 2 and "no such script" in out
