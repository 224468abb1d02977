"""The ``npu`` backend: :class:`TorchDeviceBackend` over ``torch.npu`` (Ascend, via torch_npu).

torch_npu is imported lazily, on first use of this backend only: it is never a default dependency,
because on a machine without CANN installing it breaks ``import torch`` itself.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from .._errors import BackendUnavailableError
from ._torch_device import TorchDeviceBackend


class NpuBackend(TorchDeviceBackend):
    name = "npu"
    _graph_class = "NPUGraph"

    @classmethod
    def _find_module(cls) -> Any:
        try:
            importlib.import_module("torch_npu")
        except ModuleNotFoundError:
            raise BackendUnavailableError(
                "npu backend unavailable: torch_npu is not installed"
                " (install the Ascend stack and `pip install streamkit[npu]`)"
            ) from None
        except Exception as exc:  # a broken CANN install fails in many ways; say which
            raise BackendUnavailableError(
                f"npu backend unavailable: importing torch_npu failed: {type(exc).__name__}: {exc}"
            ) from exc
        module = getattr(torch, "npu", None)
        if module is None or not module.is_available() or module.device_count() == 0:
            raise BackendUnavailableError("npu backend unavailable: torch_npu is installed but no NPU device is visible")
        return module


backend_class = NpuBackend
