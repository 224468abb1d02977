"""The checker: run an unmodified script inside a fake session and report every stream race.

``python -m streamkit check script.py [args...]`` runs ``script.py`` (written against ``sk.*``) as
``__main__`` inside the checker's session (``detect="record"``), prints each race report, and exits
1 if there was any race, 2 if the script itself failed, 0 otherwise.

- A ``fake.session(...)`` the script opens is a scope of the checker's session (its ``detect``
  still decides whether a race raises in the script): a :class:`CheckedBlock`.
- When the script is done, its globals are dropped and cycles collected as if by the script's last
  executed line: a race found then (memory freed while a side stream may still read it) names that
  line, not the checker.
- Processes the script starts with multiprocessing's ``spawn`` (``torch.multiprocessing.spawn``
  too) run inside a checker session of their own, and ``fork`` children go on in their copy of
  it; they stream their races to a file the parent merges into its report, each named by rank
  (spawn index or ``RANK``) or process name, with the pid.

``python -m streamkit conformance`` runs the stream-semantics conformance suite on every available
backend (:mod:`streamkit.conformance`).
"""

from __future__ import annotations

import argparse
import ast
import builtins
import gc
import json
import os
import shutil
import sys
import tempfile
import traceback
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TextIO


def __getattr__(name: str) -> Any:
    # streamkit.check.CheckedBlock, imported on first use: importing the checker loads no backend
    if name == "CheckedBlock":
        from ._checker_scope import CheckedBlock

        return CheckedBlock
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The command line multiprocessing's spawn start method gives a child (``python -c PROG``).
_SPAWN_PROG = "from multiprocessing.spawn import spawn_main; spawn_main("
_CHILD_ENTRY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_spawn_child.py")


# -- the script ----------------------------------------------------------------------------------
def _last_line(tree: ast.Module) -> int:
    """The script's last line when it ran to its end, read from its source (when its frame could
    not be kept): its last top-level statement, or inside a final ``with`` block or
    ``if __name__ == "__main__":`` block, that block's last statement."""
    node: Any = tree.body[-1] if tree.body else None
    if node is None:
        return 1
    while True:
        if isinstance(node, (ast.With, ast.AsyncWith)) and node.body:
            node = node.body[-1]
        elif isinstance(node, ast.If) and not node.orelse and "__name__" in ast.unparse(node.test) and node.body:
            node = node.body[-1]
        else:
            return node.lineno


def _last_line_of(tb: Any, filename: str) -> int | None:
    """The innermost line of ``filename`` in a traceback (where the script stopped)."""
    found = None
    for frame, lineno in traceback.walk_tb(tb):
        if frame.f_code.co_filename == filename:
            found = lineno
    return found


def _teardown_at(filename: str, line: int, clear: Callable[[], None], name: str = "<module>") -> None:
    """Call ``clear`` (which drops the script's references) and collect cycles in a frame that is
    ``filename:line`` (in function ``name``), so the free checks this triggers name that line of the
    script (streamkit's frames are never a site)."""
    def teardown() -> None:
        try:
            clear()
        except RuntimeError:  # a frame that is still running can't be cleared
            pass
        gc.collect()

    code = compile("\n" * (line - 1) + "__streamkit_teardown__()\n", filename, "exec").replace(co_name=name)
    exec(code, {"__streamkit_teardown__": teardown, "__builtins__": builtins})


_MAX_PROFILE_EVENTS = 10_000


def _call_keeping_frame(call: Callable[[], Any], wanted: Callable[[Any], bool], box: list) -> Any:
    """Run ``call()`` and keep in ``box`` the frame of the first Python function it enters for which
    ``wanted(frame)`` is true (also when ``call`` raises); return what ``call`` returns.

    A kept frame keeps its locals after it returns, and its ``f_lineno`` is the last line it ran.
    The profile hook that finds the frame is removed as soon as it has (or after a bounded number
    of calls), so the run itself is not slowed."""
    previous = sys.getprofile()
    seen = [0]

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event != "call":
            return
        seen[0] += 1
        found = wanted(frame)
        if found:
            box.append(frame)
        if found or seen[0] > _MAX_PROFILE_EVENTS:
            sys.setprofile(previous)

    sys.setprofile(profile)
    try:
        return call()
    finally:
        if sys.getprofile() is profile:
            sys.setprofile(previous)


def _user_code(frame: Any) -> bool:
    """A frame of the user's code (not torch, streamkit or the standard library)."""
    from ._backends.fake._sites import _internal

    return not _internal(frame.f_code.co_filename)


def _run_main(path: str, out: TextIO) -> bool:
    """Run the script at ``path`` as ``__main__``; its globals are dropped at its last line.
    True if the script failed (an exception, or a non-zero ``SystemExit``)."""
    with open(path, "rb") as f:
        source = f.read()
    failed = False
    try:
        tree = compile(source, path, "exec", ast.PyCF_ONLY_AST, dont_inherit=True)
        code = compile(tree, path, "exec", dont_inherit=True)
    except SyntaxError:
        print(f"streamkit check: {path} raised:", file=out)
        traceback.print_exc(file=out)
        return True
    module = types.ModuleType("__main__")
    namespace = module.__dict__
    namespace.update(__file__=path, __cached__=None, __loader__=None, __package__=None, __spec__=None, __builtins__=builtins)
    saved_main = sys.modules.get("__main__")
    sys.modules["__main__"] = module  # so that spawn children and pickle find the script's functions
    last = _last_line(tree)
    box: list = []
    tracebacks: list = []  # of the exception that ended the script: its frames hold locals too
    try:
        _call_keeping_frame(lambda: exec(code, namespace), lambda frame: frame.f_code is code, box)
        if box:
            last = box[0].f_lineno  # the last line the script ran
    except SystemExit as exc:
        tracebacks.append(exc.__traceback__)
        last = _last_line_of(exc.__traceback__, path) or last
        failed = exc.code not in (None, 0)
        if failed:
            print(f"streamkit check: {path} exited with status {exc.code}", file=out)
    except BaseException as exc:
        tracebacks.append(exc.__traceback__)
        last = _last_line_of(exc.__traceback__, path) or last
        failed = True
        print(f"streamkit check: {path} raised:", file=out)
        traceback.print_exc(file=out)
    finally:
        def clear() -> None:
            namespace.clear()
            for tb in tracebacks:
                traceback.clear_frames(tb)

        try:
            _teardown_at(path, last, clear)
        finally:
            if saved_main is not None:
                sys.modules["__main__"] = saved_main
    return failed


# -- spawned children ------------------------------------------------------------------------------
def _install_spawn_hook(report_dir: str) -> Callable[[], None]:
    """Make every process multiprocessing spawns from now on run checked (reporting to
    ``report_dir``); returns the function that undoes it."""
    import multiprocessing.spawn as spawn

    original = spawn.get_command_line

    def get_command_line(**kwds: Any) -> list:
        cmd = list(original(**kwds))
        for i in range(len(cmd) - 1):
            if cmd[i] == "-c" and cmd[i + 1].startswith(_SPAWN_PROG):
                # python [flags] -c PROG --multiprocessing-fork
                #   -> python [flags] _spawn_child.py --multiprocessing-fork DIR KWDS
                tail = [arg for arg in cmd[i + 2:] if arg != "--multiprocessing-fork"]
                cmd[i:] = [_CHILD_ENTRY, "--multiprocessing-fork", report_dir, json.dumps(kwds), *tail]
                break
        return cmd

    spawn.get_command_line = get_command_line

    def undo() -> None:
        if spawn.get_command_line is get_command_line:
            spawn.get_command_line = original

    return undo


def _spawned_main(report_dir: str, **kwds: Any) -> None:
    """A spawned child's entry point under the checker: multiprocessing's own, with the child's
    work (unpickling the process, running its target) inside a checker session."""
    import multiprocessing.spawn as spawn

    original = spawn._main

    def _main(fd: Any, parent_sentinel: Any = None) -> int:
        return _run_checked_child(report_dir, lambda: original(fd, parent_sentinel))

    spawn._main = _main
    spawn.spawn_main(**kwds)


def _child_label() -> str:
    """How the report names this child: ``rank N`` (torch.multiprocessing.spawn's index, else the
    ``RANK`` environment variable) or the process name, with the pid."""
    import multiprocessing

    pid = os.getpid()
    proc = multiprocessing.current_process()
    target, args = getattr(proc, "_target", None), getattr(proc, "_args", ())
    if getattr(target, "__module__", "") == "torch.multiprocessing.spawn" and len(args) > 1 and isinstance(args[1], int):
        return f"rank {args[1]} (pid {pid})"
    rank = os.environ.get("RANK")
    if rank is not None:
        return f"rank {rank} (pid {pid})"
    return f"{proc.name} (pid {pid})"


class _ChildLog:
    """A checked child's report file in the parent's report folder (``child-PID.jsonl``), one JSON
    record a line, flushed as written: ``start``, each ``race`` as found, ``end`` with the exit code
    and counts. Opened at the first record when ``eager`` is false (a fork that execs something else
    leaves no file)."""

    def __init__(self, report_dir: str, eager: bool) -> None:
        self.path = os.path.join(report_dir, f"child-{os.getpid()}.jsonl")
        self.file: Any = None
        if eager:
            self.write({"kind": "start", "label": _child_label()})

    def write(self, record: dict) -> None:
        if self.file is None:
            self.file = open(self.path, "a", encoding="utf-8")
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def race(self, race: Any) -> None:
        self.write({"kind": "race", "label": _child_label(), "text": str(race)})

    def end(self, exitcode: int, kernels: int, host_syncs: int) -> None:
        self.write({"kind": "end", "label": _child_label(), "exitcode": exitcode, "kernels": kernels, "host_syncs": host_syncs})
        self.file.close()


# The checker run this process is part of: its report folder, its session, and (in a child) its
# report file. Forked children find it here.
_run: dict = {"dir": None, "session": None, "log": None, "base": None}
_fork_hook_installed = False


def _on_race(race: Any) -> None:
    log = _run["log"]
    if log is not None:
        log.race(race)


def _install_fork_hook() -> None:
    global _fork_hook_installed
    if not _fork_hook_installed:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _fork_hook_installed = True


def _after_fork_in_child() -> None:
    """A process forked during a checker run (multiprocessing's ``fork`` start method): it goes on
    in its copy of the checker's session, and reports what it finds from now on in a file of its
    own; a multiprocessing child also writes its end."""
    session = _run["session"]
    if _run["dir"] is None or session is None or session.closed:
        return
    log = _run["log"] = _ChildLog(_run["dir"], eager=False)
    base = _run["base"] = session.stats.copy()
    from multiprocessing.process import BaseProcess

    original = BaseProcess._bootstrap

    def _bootstrap(self: Any, *args: Any, **kwargs: Any) -> int:
        code = 1
        try:
            code = _run_target_keeping_frame(lambda: original(self, *args, **kwargs))
        finally:
            stats = session.stats - base
            log.end(code, stats.kernels, stats.host_syncs)
        return code

    BaseProcess._bootstrap = _bootstrap  # type: ignore[method-assign]


def _run_checked_child(report_dir: str, run: Callable[[], int]) -> int:
    from ._checker_scope import checker_session

    log = _ChildLog(report_dir, eager=True)
    undo = _install_spawn_hook(report_dir)  # grandchildren are checked too
    _install_fork_hook()
    exitcode, stats = 1, None
    try:
        with checker_session(_on_race) as s:
            _run.update(dir=report_dir, session=s, log=log)
            try:
                exitcode = _run_target_keeping_frame(run)
            finally:
                stats = s.stats
    finally:
        undo()
        log.end(exitcode, stats.kernels if stats else 0, stats.host_syncs if stats else 0)
        _run.update(dir=None, session=None, log=None)
    return exitcode


def _run_target_keeping_frame(run: Callable[[], int]) -> int:
    """``run()`` (multiprocessing's child main), with the process's ``run`` method keeping the frame
    of the first user function it calls (the target): what that frame still holds when it returns
    is dropped at its last line, so a race found then names it, not torch's or multiprocessing's
    frame that called it."""
    from multiprocessing.process import BaseProcess

    original = BaseProcess.run

    def run_method(self: Any) -> None:
        box: list = []
        try:
            _call_keeping_frame(lambda: original(self), _user_code, box)
        finally:
            if box:
                frame = box[0]
                _teardown_at(frame.f_code.co_filename, frame.f_lineno, frame.clear, frame.f_code.co_name)

    BaseProcess.run = run_method  # type: ignore[method-assign]
    try:
        return run()
    finally:
        BaseProcess.run = original  # type: ignore[method-assign]


@dataclass
class ChildReport:
    """What one spawned child reported: its races (as text), and how it ended (``None``: the
    report has no end, the child crashed or was killed)."""

    label: str
    races: list[str] = field(default_factory=list)
    exitcode: int | None = None
    kernels: int = 0
    host_syncs: int = 0


def _read_child_reports(report_dir: str) -> list[ChildReport]:
    reports = []
    for name in os.listdir(report_dir):
        if not name.endswith(".jsonl"):
            continue
        report = ChildReport(label=f"pid {name[len('child-'):-len('.jsonl')]}")
        with open(os.path.join(report_dir, name), encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut short by a crash
                    continue
                report.label = record.get("label", report.label)
                if record.get("kind") == "race":
                    report.races.append(record["text"])
                elif record.get("kind") == "end":
                    report.exitcode = record.get("exitcode")
                    report.kernels = record.get("kernels", 0)
                    report.host_syncs = record.get("host_syncs", 0)
        reports.append(report)

    def order(report: ChildReport) -> tuple:
        first = report.label.split(" ")
        return (first[0] != "rank", int(first[1]) if first[0] == "rank" and first[1].isdigit() else 0, report.label)

    return sorted(reports, key=order)


# -- the command -------------------------------------------------------------------------------------
def check_script(path: str, args: Sequence[str] = (), out: TextIO | None = None, emulate: str | None = None) -> int:
    """Run ``path`` with ``args`` on the fake backend; print reports to ``out``; return the exit code.

    ``emulate="cuda"`` / ``"npu"``: the fake device is that device type for the whole run, installed
    before the script imports anything (so streams an engine makes at import time are streams of
    the checker's session); processes the script starts inherit it (``STREAMKIT_EMULATE``)."""
    from ._backends.fake import _emulate
    from ._checker_scope import checker_session

    out = out or sys.stdout
    try:
        _emulate.check_name(emulate, "check --emulate")
    except ValueError as exc:
        print(f"streamkit check: {exc}", file=out)
        return 2
    if os.path.isdir(path):
        print(
            f"streamkit check: script: {path!r} is a directory; expected a Python script file"
            " (python -m streamkit check path/to/script.py [args...])",
            file=out,
        )
        return 2
    if not os.path.isfile(path):
        print(f"streamkit check: no such script: {path}", file=out)
        return 2
    saved_env = os.environ.get(_emulate.ENV)
    if emulate is not None:
        os.environ[_emulate.ENV] = emulate
        try:
            _emulate.claim(emulate)
        except _emulate.EmulationError as exc:
            print(f"streamkit check: {exc}", file=out)
            _restore_env(_emulate.ENV, saved_env)
            return 2
    path = os.path.abspath(path)
    saved_argv = sys.argv
    sys.argv = [path, *args]
    script_dir = os.path.dirname(path)
    sys.path.insert(0, script_dir)
    report_dir = tempfile.mkdtemp(prefix="streamkit-check-")
    owner = os.getpid()
    undo = _install_spawn_hook(report_dir)
    _install_fork_hook()
    real_exit = os._exit

    def exit_now(status: int) -> Any:
        """``os._exit`` while the script runs: it would end the process before the report is
        printed, so in the checker's own process the report comes first, and the exit status is
        the checker's (1 if there was a race). Forked children exit as they asked."""
        if os.getpid() != owner or _run["session"] is None:
            real_exit(status)
        code = 1
        try:
            if status:
                print(f"streamkit check: {path} exited with status {status} (os._exit)", file=out)
            code = _report(path, _run["session"], _read_child_reports(report_dir), bool(status), out)
            shutil.rmtree(report_dir, ignore_errors=True)
            for stream in (out, sys.stdout, sys.stderr):
                stream.flush()
        finally:
            real_exit(code)

    os._exit = exit_now
    try:
        with checker_session(_on_race, emulate=emulate) as s:
            _run.update(dir=report_dir, session=s, log=None)
            try:
                failed = _run_main(path, out)
            finally:
                forked_log, forked_base = _run["log"], _run["base"]
                _run.update(dir=None, session=None, log=None, base=None)
        if os.getpid() != owner:
            # a child forked by os.fork() that ran on to the script's end: its races are in its
            # report file; the parent reports
            code = 2 if failed else 0
            if forked_log is not None:
                stats = s.stats - forked_base
                forked_log.end(code, stats.kernels, stats.host_syncs)
            return code
        children = _read_child_reports(report_dir)
    finally:
        os._exit = real_exit
        undo()
        if os.getpid() == owner:
            shutil.rmtree(report_dir, ignore_errors=True)
        sys.argv = saved_argv
        if sys.path and sys.path[0] == script_dir:
            del sys.path[0]
        if emulate is not None:
            _restore_env(_emulate.ENV, saved_env)
    return _report(path, s, children, failed, out)


def _report(path: str, s: Any, children: list[ChildReport], failed: bool, out: TextIO) -> int:
    """Print the races of the checker's session ``s`` and of ``children``, and the summary; the
    exit code: 1 if there was any race, 2 if the script failed, 0 otherwise."""
    races = [(None, str(race)) for race in s.races]
    races += [(child.label, text) for child in children for text in child.races]
    for i, (label, text) in enumerate(races, 1):
        where = f", in {label}" if label else ""
        print(f"\n[race {i} of {len(races)}{where}]\n{text}", file=out)
    name = os.path.basename(path)
    stats = s.stats
    summary = f"\nstreamkit check: {name}: {len(races)} race(s); {stats.kernels} kernels, {stats.host_syncs} host syncs"
    if children:
        in_children = sum(len(c.races) for c in children)
        summary += f" ({len(s.races)} race(s) here, {in_children} in {len(children)} child process(es))"
    print(summary, file=out)
    for child in children:
        end = (
            f"exit code {child.exitcode}; {child.kernels} kernels, {child.host_syncs} host syncs"
            if child.exitcode is not None
            else "no end of report: the process crashed or was killed; its races until then are listed"
        )
        print(f"  {child.label}: {len(child.races)} race(s); {end}", file=out)
    if races:
        return 1
    return 2 if failed else 0


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m streamkit",
        description=(
            "Stream-ordering tools. 'check' runs a script on the fake backend and reports stream races;"
            " 'conformance' runs the stream-semantics conformance suite on every available backend."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="run a script inside a fake session and report every race (exit 1 if any)")
    check.add_argument(
        "--emulate", choices=("cuda", "npu"), default=None,
        help="run the script with the fake device as this device type: unmodified torch.cuda / torch.npu /"
        " torch_npu code runs on it (docs/emulation.md)",
    )
    # (optional for argparse, so that a missing script is reported as such, not as "script, args")
    check.add_argument("script", nargs="?", help="the Python script to run, unmodified")
    check.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    conformance = sub.add_parser(
        "conformance",
        help="run the stream-semantics conformance suite on every available backend and print a rule-by-rule table",
    )
    conformance.add_argument(
        "--backend", action="append", metavar="NAME",
        help="run on this backend only (repeatable); a named backend that is unavailable fails the run (exit 2)",
    )
    conformance.add_argument("-v", "--verbose", action="store_true", help="show pytest's own output too")
    ns = parser.parse_args(argv)
    if ns.command == "conformance":
        from .conformance import run

        return run(ns.backend, verbose=ns.verbose)
    if ns.script is None:
        check.error("the following argument is required: script (python -m streamkit check SCRIPT [ARGS...])")
    return check_script(ns.script, ns.args, emulate=ns.emulate)
