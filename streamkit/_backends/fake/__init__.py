"""The fake backend: a CPU device with CUDA stream semantics and happens-before race detection.

>>> from streamkit import fake
>>> with fake.session(detect="raise") as s:
...     x = torch.ones(4, device=s.device)
"""

from __future__ import annotations

from ._pinned import PinnedHostTensor
from ._report import Access, Race, RaceError, TensorInfo
from ._deferred import PCT_DEPTH
from ._explore import (
    SHRINK_RUNS, Exploration, KernelId, ReplayFallbackWarning, Run, directed, parse_token, plan, read_token, replay,
)
from ._ranks import RankExploration, RankRun, explore
from ._session import FakeBackend, Session, Stats, session
from ._tensor import FakeDeviceTensor, peek
from ._emulate import EmulationError, with_emulate

# emulation hook: explore/replay take emulate= (streamkit/_backends/fake/_emulate.py)
explore = with_emulate(explore)
replay = with_emulate(replay)

#: what the registry loads (``streamkit._backend``)
backend_class = FakeBackend

__all__ = [
    "PCT_DEPTH", "SHRINK_RUNS", "Access", "EmulationError", "Exploration", "FakeBackend", "FakeDeviceTensor", "KernelId", "PinnedHostTensor", "Race",
    "RaceError", "RankExploration", "RankRun", "ReplayFallbackWarning", "Run", "Session", "Stats", "TensorInfo", "directed",
    "explore", "parse_token", "peek", "plan", "read_token", "replay", "session",
]
