"""Shared helpers of the streamkit_eplb suite: launching multi-rank scenarios as subprocesses.

The ``streamkit_backend`` / ``fake_session`` fixtures come from streamkit's pytest plugin.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import _support
import pytest
from _support import REPO, RankResult, child_env

HERE = Path(__file__).resolve().parent
WORKER = HERE / "rank_worker.py"


def run_ranks(scenario: str, world: int = 2, backend: str = "fake", timeout: float = 120.0, args: tuple[str, ...] = ()) -> list[RankResult]:
    """Run ``rank_worker.py scenario`` as ``world`` processes joined by a process group; never hangs:
    every process is killed after ``timeout`` seconds (and the test then fails)."""
    try:
        return _support.run_ranks([WORKER, scenario, backend, *args], world=world, timeout=timeout)
    except _support.RanksTimedOut as exc:
        pytest.fail(str(exc))


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


@pytest.fixture(scope="module")
def main_ranks():
    """``main_ranks(backend_name, world)`` -> list of RankResult of the ``main`` scenario (which runs
    the shape mismatch first), launched once per backend per module: the tests of both share it."""
    launched: dict[tuple[str, int], list[RankResult]] = {}

    def get(backend_name: str, world: int) -> list[RankResult]:
        if (backend_name, world) not in launched:
            launched[backend_name, world] = run_ranks("main", world=world, backend=backend_name)
        return launched[backend_name, world]

    return get


@pytest.fixture(scope="module")
def peer_failure_ranks(tmp_path_factory):
    """``peer_failure_ranks()`` -> list of RankResult of the ``peers`` scenario (a stalled peer, then
    a dead one, on fake), launched once per module: the tests of both share it."""
    launched: list[list[RankResult]] = []

    def get() -> list[RankResult]:
        if not launched:
            launched.append(run_ranks("peers", timeout=90, args=(str(tmp_path_factory.mktemp("stall")),)))
        return launched[0]

    return get


@pytest.fixture
def eplb_world():
    """``eplb_world(backend_name)`` -> ranks a multi-rank test uses there (skips if too few devices)."""
    return rank_world_for


@pytest.fixture
def eplb_demo():
    """``eplb_demo(*args, timeout=150)`` -> CompletedProcess of ``python -m streamkit_eplb demo``."""
    return run_demo
