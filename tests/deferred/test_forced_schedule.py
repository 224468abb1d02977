"""``STREAMKIT_SCHEDULE=random`` forces a deferred schedule on every session that names none: a few
representative test files pass that way (the whole suite: see docs/exploration.md, "Forcing a
schedule"), and ``eager_only`` tests skip with their reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from _support import child_env

TESTS = Path(__file__).resolve().parents[1]
FILES = [
    "detector/test_scenarios.py",
    "fidelity/test_allocator.py",
    "fidelity/test_host_transfers.py",
    "fidelity/test_stream_rules.py",
    "deferred/test_recycle.py",
]


def test_representative_files_pass_under_a_forced_random_schedule():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "no:xdist", "--no-header", *FILES],
        cwd=TESTS, env=child_env({"STREAMKIT_SCHEDULE": "random"}), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout
    # the environment reached the sessions: the racy eager-value tests were skipped, with reasons
    assert "eager_only under STREAMKIT_SCHEDULE=random: asserts the values of the eager order" in proc.stdout
