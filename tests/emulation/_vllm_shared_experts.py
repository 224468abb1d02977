"""An MoE layer after vLLM's shared experts on an aux stream (vllm/model_executor/layers/fused_moe/
layer.py: ``shared_experts_stream``), written against torch.cuda only. The aux stream is made at
import time, as vLLM makes it; the input-ready wait is an event (``WAIT_FOR_INPUT`` False: vLLM's
wait removed); the hidden-state clone read on the aux stream is kept alive with ``record_stream``."""

import threading

import torch

AUX = torch.cuda.Stream()  # <aux-stream>
WAIT_FOR_INPUT = True

# vLLM (vllm/utils/torch_utils.py) replaces torch.cuda.set_stream at import, to track the current
# stream cheaply: the emulation must be installed before this runs, and restore the original after.
_current_stream_tls = threading.local()
prev_set_stream = torch.cuda.set_stream


def _patched_set_stream(stream: torch.cuda.Stream) -> None:
    _current_stream_tls.value = stream
    prev_set_stream(stream)


torch.cuda.set_stream = _patched_set_stream


def current_stream() -> torch.cuda.Stream:
    if getattr(_current_stream_tls, "value", None) is None:
        _current_stream_tls.value = torch.cuda.current_stream()
    return _current_stream_tls.value


class SharedExpertsMoE(torch.nn.Module):
    def __init__(self, hidden: int = 16, experts: int = 4, top_k: int = 2) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.top_k = top_k
        self.gate = torch.nn.Parameter(torch.randn(hidden, experts, generator=g) * 0.1, requires_grad=False)
        self.experts = torch.nn.Parameter(torch.randn(experts, hidden, hidden, generator=g) * 0.1, requires_grad=False)
        self.shared = torch.nn.Parameter(torch.randn(hidden, hidden, generator=g) * 0.1, requires_grad=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states * 1.0  # the layer's input, written on the current stream
        ready = torch.cuda.Event()
        ready.record()
        if WAIT_FOR_INPUT:
            AUX.wait_event(ready)  # <input-ready-wait>
        with torch.cuda.stream(AUX):
            shared_out = hidden_states @ self.shared  # <shared-read>
        hidden_states.record_stream(AUX)
        weights, ids = torch.topk(torch.softmax(hidden_states @ self.gate, dim=-1), self.top_k)
        routed = torch.zeros_like(hidden_states)
        for k in range(self.top_k):
            expert = self.experts[ids[:, k]]
            routed += weights[:, k:k + 1] * torch.bmm(hidden_states.unsqueeze(1), expert).squeeze(1)
        current_stream().wait_stream(AUX)
        shared_out.record_stream(current_stream())  # (made on AUX, last used here)
        return routed + shared_out
