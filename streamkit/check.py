"""The checker: run an unmodified script inside a fake session and report every stream race.

``python -m streamkit check script.py [args...]`` runs ``script.py`` (written against ``sk.*``) as
``__main__`` with ``detect="record"``, prints each race report, and exits 1 if there was any race,
2 if the script itself failed, 0 otherwise.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import traceback
from typing import Sequence, TextIO


def check_script(path: str, args: Sequence[str] = (), out: TextIO | None = None) -> int:
    """Run ``path`` with ``args`` on the fake backend; print reports to ``out``; return the exit code."""
    from . import fake

    out = out or sys.stdout
    if not os.path.isfile(path):
        print(f"streamkit check: no such script: {path}", file=out)
        return 2
    saved_argv = sys.argv
    sys.argv = [path, *args]
    script_dir = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, script_dir)
    failed = False
    session = fake.session(detect="record")
    s = session.__enter__()
    try:
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as exc:
            failed = exc.code not in (None, 0)
            if failed:
                print(f"streamkit check: {path} exited with status {exc.code}", file=out)
        except BaseException:
            failed = True
            print(f"streamkit check: {path} raised:", file=out)
            traceback.print_exc(file=out)
    finally:
        session.__exit__(None, None, None)
        sys.argv = saved_argv
        if sys.path and sys.path[0] == script_dir:
            del sys.path[0]
    for i, race in enumerate(s.races, 1):
        print(f"\n[race {i} of {len(s.races)}]\n{race}", file=out)
    stats = s.stats
    print(
        f"\nstreamkit check: {path}: {len(s.races)} race(s); {stats.kernels} kernels,"
        f" {stats.host_syncs} host syncs",
        file=out,
    )
    if s.races:
        return 1
    return 2 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m streamkit",
        description="Stream-ordering tools. 'check' runs a script on the fake backend and reports stream races.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="run a script inside a fake session and report every race (exit 1 if any)")
    check.add_argument("script", help="the Python script to run, unmodified")
    check.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    ns = parser.parse_args(argv)
    return check_script(ns.script, ns.args)
