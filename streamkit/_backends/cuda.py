"""The ``cuda`` backend: :class:`TorchDeviceBackend` over ``torch.cuda``."""

from __future__ import annotations

from typing import Any

import torch

from .._errors import BackendUnavailableError
from ._torch_device import TorchDeviceBackend


class CudaBackend(TorchDeviceBackend):
    name = "cuda"

    @classmethod
    def _find_module(cls) -> Any:
        if not torch.backends.cuda.is_built():
            raise BackendUnavailableError(
                f"cuda backend unavailable: this torch ({torch.__version__}) was built without CUDA"
            )
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            raise BackendUnavailableError("cuda backend unavailable: torch.cuda.is_available() is False (no CUDA device)")
        return torch.cuda


backend_class = CudaBackend
