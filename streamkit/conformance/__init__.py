"""The stream-semantics conformance suite, shipped with the package so that a CUDA or Ascend machine
verifies the fake backend's rules on its own hardware.

``python -m streamkit conformance [--backend NAME ...]`` runs the rules (the pytest modules in this
package, through the ``streamkit_backend`` fixture) on every registered backend (or the named ones)
and prints one row per rule and one column per backend: ``pass``, ``FAIL``, ``skip`` (the reason
below the table) or ``n/a`` (the rule does not apply to that backend). Exit status: 0 if no rule
failed; 1 if one did; 2 if a backend named with ``--backend`` is unavailable, or pytest could not run.

Two more columns, ``cuda (emulated)`` and ``npu (emulated)`` (``--backend cuda-emulated`` /
``npu-emulated``; in the default run too): streamkit's own ``cuda`` and ``npu`` backends over the
fake device's emulated ``torch.cuda`` / ``torch.npu`` (docs/emulation.md), in one child process
(npu emulation needs a process of its own: PyTorch names its PrivateUse1 device once).

Needs pytest (``pip install pytest``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence, TextIO

HERE = os.path.dirname(os.path.abspath(__file__))
_ORDER = ("fake", "cuda", "npu")  # the table's first columns; other registered backends follow
#: the emulated columns: label -> the device type the fake device emulates for it
EMULATED = {"cuda (emulated)": "cuda", "npu (emulated)": "npu"}
_EMULATED_ALIASES = {"cuda-emulated": "cuda (emulated)", "npu-emulated": "npu (emulated)"}


@dataclass
class Cell:
    outcome: str  # "pass" | "FAIL" | "skip"
    reason: str = ""


@dataclass
class Table:
    """The outcome of every (rule, backend): rules in collection order."""

    backends: list[str]
    rules: list[str] = field(default_factory=list)
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # backend -> reason

    def set(self, rule: str, backend: str, outcome: str, reason: str = "") -> None:
        if rule not in self.rules:
            self.rules.append(rule)
        current = self.cells.get((rule, backend))
        if current is not None and current.outcome == "FAIL":
            return  # a failure in any phase (setup, call, teardown) stands
        self.cells[(rule, backend)] = Cell(outcome, reason)

    @property
    def failures(self) -> list[tuple[str, str]]:
        return [key for key, cell in self.cells.items() if cell.outcome == "FAIL"]

    def render(self) -> str:
        notes: dict[str, int] = {}
        rows = []
        for rule in self.rules:
            row = [rule]
            for backend in self.backends:
                cell = self.cells.get((rule, backend))
                if cell is None:
                    row.append("n/a")
                elif cell.outcome == "skip" and cell.reason != self.unavailable.get(backend):
                    number = notes.setdefault(cell.reason, len(notes) + 1)
                    row.append(f"skip [{number}]")
                else:
                    row.append(cell.outcome)
            rows.append(row)
        header = ["rule", *self.backends]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        out = [line(header), line(["-" * w for w in widths]), *map(line, rows)]
        summary = []
        for backend in self.backends:
            column = [self.cells[(r, backend)].outcome for r in self.rules if (r, backend) in self.cells]
            counts = {k: column.count(k) for k in ("pass", "FAIL", "skip")}
            text = f"{backend}: {counts['pass']} pass, {counts['FAIL']} FAIL, {counts['skip']} skip"
            if backend in self.unavailable:
                text += f" (unavailable: {self.unavailable[backend]})"
            summary.append(text)
        out += ["", *summary]
        out += [f"[{n}] {reason}" for reason, n in notes.items()]
        return "\n".join(out)


def _split_id(name: str, backend: str) -> str:
    """``test_x[fake-arange]`` -> ``x[arange]`` (the rule, without the backend's parameter)."""
    base, _, params = name.partition("[")
    base = base[len("test_"):] if base.startswith("test_") else base
    if not params:
        return base
    parts = params.rstrip("]").split("-")
    if backend in parts:
        parts.remove(backend)
    return f"{base}[{'-'.join(parts)}]" if parts else base


class _Collector:
    """A pytest plugin object: keeps the selected backends' items and records each outcome."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self.where: dict[str, tuple[str, str]] = {}  # nodeid -> (rule, backend)
        self.failures: list[str] = []  # each failure's report, for the quiet output

    def pytest_collection_modifyitems(self, session: Any, config: Any, items: list) -> None:
        keep, drop = [], []
        for item in items:
            callspec = getattr(item, "callspec", None)
            backend = callspec.params.get("streamkit_backend") if callspec is not None else None
            if backend is None or backend not in self.table.backends:
                drop.append(item)
                continue
            module = os.path.splitext(os.path.basename(str(item.path)))[0]
            module = module[len("test_"):] if module.startswith("test_") else module
            rule = f"{module}: {_split_id(item.name, backend)}"
            self.where[item.nodeid] = (rule, backend)
            if rule not in self.table.rules:
                self.table.rules.append(rule)
            keep.append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
        items[:] = keep

    def pytest_runtest_logreport(self, report: Any) -> None:
        where = self.where.get(report.nodeid)
        if where is None:
            return
        rule, backend = where
        if report.failed:
            self.table.set(rule, backend, "FAIL")
            self.failures.append(f"FAIL {rule} on {backend} ({report.when}):\n{report.longreprtext}")
        elif report.skipped and hasattr(report, "wasxfail"):  # a hazard the device did not show this time
            self.table.set(rule, backend, "skip", f"not observed: {report.wasxfail}")
        elif report.skipped:
            longrepr = report.longrepr
            reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
            self.table.set(rule, backend, "skip", reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason)
        elif report.when == "call":
            self.table.set(rule, backend, "pass")


def _columns(requested: Sequence[str] | None) -> list[str]:
    from .. import _backend

    names = list(_backend.backend_names())
    emulated = list(EMULATED)
    if requested:
        requested = [_EMULATED_ALIASES.get(n, n) for n in requested]
        unknown = [n for n in requested if n not in names and n not in EMULATED]
        if unknown:
            choices = names + list(_EMULATED_ALIASES)
            raise ValueError(f"unknown backend(s) {', '.join(unknown)}: choose from {', '.join(choices)}")
        emulated = [n for n in emulated if n in requested]
        names = [n for n in names if n in requested]
    return [n for n in _ORDER if n in names] + [n for n in names if n not in _ORDER] + emulated


def _pytest_args(verbose: bool, child: bool = True) -> list[str]:
    return [
        HERE,
        "--rootdir", HERE, "-c", os.devnull,  # no project's ini file or conftest applies
        "-p", "no:cacheprovider", *(["-p", "no:xdist", "-p", "no:randomly"] if child else []),
        "-p", "no:streamkit", "-p", "streamkit.pytest_plugin",  # this copy of the plugin, registered once
        *(["-v", "--tb=short"] if verbose else ["-p", "no:terminal"]),  # quiet: the failures are printed below
    ]


def emulated_columns(kinds: Sequence[str], verbose: bool = False) -> int:
    """(The child process of the emulated columns.) For each of ``kinds`` in turn, run the rules on
    streamkit's backend of that name over the emulated ``torch.<kind>``; print each column's
    outcomes as one JSON line. (One process serves both: npu emulation names the process's
    PrivateUse1 device ``npu``, and cuda emulation works in such a process too.)"""
    import pytest

    for kind in kinds:
        table = Table([kind])
        collector = _Collector(table)
        code = pytest.main([*_pytest_args(verbose), f"--streamkit-emulate={kind}"], plugins=[collector])
        cells = {rule: [cell.outcome, cell.reason] for (rule, _), cell in table.cells.items()}
        record = {"kind": kind, "code": int(code), "rules": table.rules, "cells": cells, "failures": collector.failures}
        print("STREAMKIT-CONFORMANCE " + json.dumps(record), flush=True)
    return 0


def _run_emulated(table: Table, labels: Sequence[str], verbose: bool, out: TextIO) -> list[str]:
    """Fill the emulated columns ``labels`` from one child process; returns the failures' reports."""
    kinds = sorted((EMULATED[label] for label in labels), key=lambda kind: kind != "npu")  # (npu names the process)
    env = dict(os.environ)
    env["STREAMKIT_EMULATE"] = kinds[0]
    env.pop("STREAMKIT_BACKEND", None)
    package_root = os.path.dirname(os.path.dirname(HERE))
    env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    code = f"import sys; from streamkit.conformance import emulated_columns; sys.exit(emulated_columns({kinds!r}, {verbose!r}))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    if verbose:
        print(proc.stdout, file=out)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("STREAMKIT-CONFORMANCE "):
            record = json.loads(line[len("STREAMKIT-CONFORMANCE "):])
            results[record["kind"]] = record
    failures: list[str] = []
    for label in labels:
        kind = EMULATED[label]
        result = results.get(kind)
        if result is None:
            table.unavailable[label] = f"the child process failed (exit {proc.returncode}): {(proc.stderr or proc.stdout)[-500:]}"
            continue
        for rule in result["rules"]:
            cell = result["cells"].get(rule)
            if cell is not None:
                table.set(rule, label, cell[0], cell[1])
        failures += [text.replace(f" on {kind} (", f" on {label} (", 1) for text in result["failures"]]
    return failures


def run(backends: Sequence[str] | None = None, verbose: bool = False, out: TextIO | None = None) -> int:
    """Run the conformance rules on ``backends`` (default: every registered one); print pytest's
    report of any failure, then the table, to ``out``; return the exit status (see the module)."""
    from .. import _backend

    out = out or sys.stdout
    try:
        import pytest
    except ImportError:
        print("streamkit conformance: needs pytest (pip install pytest)", file=out)
        return 2
    try:
        columns = _columns(backends)
    except ValueError as exc:
        print(f"streamkit conformance: {exc}", file=out)
        return 2
    table = Table(columns)
    for name in columns:
        if name in EMULATED:
            continue
        reason = _backend.unavailable_reason(name)
        if reason is not None:
            table.unavailable[name] = reason
    collector = _Collector(table)
    code = 0
    if any(name not in EMULATED for name in columns):
        code = pytest.main(_pytest_args(verbose, child=False), plugins=[collector])
    failures = list(collector.failures)
    emulated = [label for label in columns if label in EMULATED]
    if emulated:
        failures += _run_emulated(table, emulated, verbose, out)
    if not verbose:
        for text in failures:
            print(text + "\n", file=out)
    print(f"\nstreamkit conformance (torch {_torch_version()}):\n", file=out)
    print(table.render(), file=out)
    if table.failures:
        print(f"\n{len(table.failures)} rule(s) failed", file=out)
        return 1
    named_unavailable = [n for n in (backends or ()) if n in table.unavailable]
    if named_unavailable:
        print(f"\nstreamkit conformance: backend(s) {', '.join(named_unavailable)} named but unavailable", file=out)
        return 2
    if int(code) not in (0, 1) or not table.cells:
        print(f"\nstreamkit conformance: pytest did not run the suite (exit status {int(code)})", file=out)
        return 2
    return 0


def _torch_version() -> str:
    import torch

    return torch.__version__
