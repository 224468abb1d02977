"""Shared helpers of the streamkit_eplb suite: launching multi-rank scenarios as subprocesses.

The ``streamkit_backend`` / ``fake_session`` fixtures come from streamkit's pytest plugin.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
WORKER = HERE / "rank_worker.py"


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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_ranks(scenario: str, world: int = 2, backend: str = "fake", timeout: float = 120.0, args: tuple[str, ...] = ()) -> list[RankResult]:
    """Run ``rank_worker.py scenario`` as ``world`` processes joined by a process group; never hangs:
    every process is killed after ``timeout`` seconds (and the test then fails)."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = child_env({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world)})
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), scenario, backend, *args],
                env=env,
                cwd=str(REPO),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    timed_out = False
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
    if timed_out:
        pytest.fail(f"scenario {scenario!r} did not finish within {timeout} s:\n" + "\n".join(r.describe() for r in results))
    return results


def rank_world_for(backend_name: str) -> int:
    """How many ranks a multi-rank test uses on ``backend_name`` (skips when there are too few devices)."""
    if backend_name == "fake":
        return 2
    import torch

    count = torch.cuda.device_count() if backend_name == "cuda" else torch.npu.device_count()  # type: ignore[attr-defined]
    if count < 2:
        pytest.skip(f"multi-rank {backend_name} test needs 2 or more devices, found {count}")
    return count


def run_demo(*args: str, timeout: float = 150.0) -> subprocess.CompletedProcess:
    """``python -m streamkit_eplb demo *args`` in a subprocess (killed after ``timeout`` s)."""
    try:
        return subprocess.run(
            [sys.executable, "-m", "streamkit_eplb", "demo", *args],
            cwd=str(REPO),
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:  # pragma: no cover
        pytest.fail(f"demo {args} did not finish in {timeout} s: {exc.stdout!r} {exc.stderr!r}")


# Fixtures rather than imports: test modules never import conftest (another conftest.py may exist).
@pytest.fixture
def ranks():
    """``ranks(scenario, world=2, backend="fake", timeout=120, args=())`` -> list of RankResult."""
    return run_ranks


@pytest.fixture
def eplb_world():
    """``eplb_world(backend_name)`` -> ranks a multi-rank test uses there (skips if too few devices)."""
    return rank_world_for


@pytest.fixture
def eplb_demo():
    """``eplb_demo(*args, timeout=150)`` -> CompletedProcess of ``python -m streamkit_eplb demo``."""
    return run_demo
