"""Helpers shared by the whole suite: one multi-rank launcher, ``free_port`` and the ``# <marker>``
line finder. (``tests/conftest.py`` puts ``tests/`` on ``sys.path``, so tests ``import _support``.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marker_line(path: str | os.PathLike, marker: str) -> int:
    """The number of the one line of ``path`` that ends with the comment ``# <marker>``."""
    tag = "# <" + marker + ">"
    hits = [i for i, text in enumerate(Path(path).read_text().splitlines(), 1) if text.rstrip().endswith(tag)]
    assert len(hits) == 1, f"marker {tag!r} in {Path(path).name}: expected one line, found {hits}"
    return hits[0]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process: this repo importable, one OpenMP thread, unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("STREAMKIT_BACKEND", None)
    env.update(extra or {})
    return env


@dataclass
class RankResult:
    rank: int
    returncode: int
    stdout: str
    stderr: str

    def lines(self, prefix: str) -> list[str]:
        return [line[len(prefix):].strip() for line in self.stdout.splitlines() if line.startswith(prefix)]

    def describe(self) -> str:
        return f"--- rank {self.rank} rc={self.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr[-4000:]}"


class RanksTimedOut(AssertionError):
    pass


#: what rank 0 prints when the store's port was taken meanwhile (see :func:`run_ranks`)
_PORT_TAKEN = ("EADDRINUSE", "Address already in use", "address already in use")


def run_ranks(argv: Sequence[str], world: int = 2, timeout: float = 120.0, env: dict[str, str] | None = None) -> list[RankResult]:
    """Run ``python *argv`` as ``world`` processes that can join one gloo process group
    (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE`` set). Never hangs: after ``timeout``
    seconds every process is killed and :class:`RanksTimedOut` (an AssertionError) is raised.

    The port is free when chosen, but rank 0 binds it seconds later (after ``import torch``), and
    meanwhile another launch (``-n 2`` runs two at once: their gloo sockets take ephemeral ports)
    may take it. Rank 0 then fails with EADDRINUSE and the others wait for a store that never
    comes: such a launch is run again on a new port (at most three tries)."""
    for attempt in range(3):
        results, timed_out = _run_ranks_once(argv, world, timeout, env)
        port_taken = any(r.returncode != 0 and any(m in r.stderr for m in _PORT_TAKEN) for r in results)
        if not port_taken or attempt == 2:
            break
    if timed_out:
        raise RanksTimedOut(f"{argv} did not finish within {timeout} s:\n" + "\n".join(r.describe() for r in results))
    return results


def _run_ranks_once(argv: Sequence[str], world: int, timeout: float, env: dict[str, str] | None) -> tuple[list[RankResult], bool]:
    port = free_port()
    procs = []
    for rank in range(world):
        rank_env = child_env({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world), **(env or {})})
        procs.append(
            subprocess.Popen(
                [sys.executable, *map(str, argv)], env=rank_env, cwd=str(REPO),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
        )
    results = []
    timed_out = False
    try:
        for rank, proc in enumerate(procs):
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                for other in procs:
                    if other.poll() is None:
                        other.kill()
                out, err = proc.communicate()
            results.append(RankResult(rank, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results, timed_out


def rank_results(
    worker: str | os.PathLike, *args: str, world: int = 2, timeout: float = 120.0
) -> list[dict]:
    """Run ``worker`` (with command-line ``args``) on ``world`` gloo ranks; each must exit 0 and
    print one ``RESULT <json>`` line whose ``rank`` is its own. Returns the parsed results, in rank
    order. Skips the calling test (with the reason) where this torch has no gloo."""
    import pytest
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    parsed = []
    for r in run_ranks([worker, *args], world=world, timeout=timeout):
        lines = r.lines("RESULT ")
        assert r.returncode == 0 and len(lines) == 1, r.describe()
        data = json.loads(lines[0])
        assert data["rank"] == r.rank, r.describe()
        parsed.append(data)
    return parsed


def rank_entries(results: list[dict], key: str) -> list[dict]:
    """Every rank's ``results[rank][key]``, in rank order; a rank that reported an error for ``key``
    (an ``{"error": traceback}`` entry) fails the test with it."""
    out = []
    for data in results:
        entry = data[key]
        assert "error" not in entry, f"rank {data['rank']} {key} failed:\n{entry['error']}"
        out.append(entry)
    return out
