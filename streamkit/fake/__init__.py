"""The fake backend: a CPU device with CUDA stream semantics and happens-before race detection.

>>> from streamkit import fake
>>> with fake.session(detect="raise") as s:
...     x = torch.ones(4, device=s.device)
"""

from __future__ import annotations

from ._report import Access, Race, TensorInfo
from ._session import Session, Stats, session
from ._tensor import FakeDeviceTensor, peek

__all__ = ["Access", "FakeDeviceTensor", "Race", "Session", "Stats", "TensorInfo", "peek", "session"]
