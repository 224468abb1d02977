"""Host-side results: :class:`Heat` (one collected window) and :class:`HeatHistory` (a sliding window).

Everything here is plain CPU tensor work: no device, no streams, no synchronization.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Iterator, Sequence

import torch

_FORMAT = "streamkit_eplb.Heat"
_VERSION = 1


def _check_load(load: torch.Tensor, where: str) -> None:
    if not isinstance(load, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(load).__name__}")
    if load.dtype != torch.int64:
        raise TypeError(f"{where}: expected an int64 tensor, got {load.dtype}")
    if load.dim() != 3:
        raise ValueError(
            f"{where}: expected shape (num_layers, world_size, num_experts), got {tuple(load.shape)}"
        )
    if load.device.type != "cpu":
        raise ValueError(f"{where}: expected a CPU tensor, got one on {load.device}")


def _balancedness(per_rank: torch.Tensor) -> torch.Tensor:
    """``mean / max`` over the last axis of an int64 (L, R) load, as float64; 1.0 for a layer with no load."""
    per_rank = per_rank.to(torch.float64)
    mean = per_rank.mean(dim=-1)
    peak = per_rank.amax(dim=-1)
    out = torch.ones_like(mean)
    nz = peak > 0
    out[nz] = mean[nz] / peak[nz]
    return out


class Heat:
    """The expert load of one collection window, gathered from every rank (a CPU snapshot).

    ``load`` is an int64 tensor ``(num_layers, world_size, num_experts)``: ``load[l, r, e]`` is the
    number of tokens that rank ``r`` recorded for expert ``e`` of layer ``l`` during the window
    (vllm-ascend's ``moe_load`` layout after its all_gather). ``invalid`` is ``(num_layers,
    world_size)``: the ``topk_ids`` outside ``[-1, num_experts)`` that were excluded (always zero on
    the fake backend, which rejects them with a ``ValueError`` instead). ``window`` numbers the
    collections of one collector: 0, 1, 2, ...

    A Heat owns its tensors: a later ``collect()`` never overwrites them.
    """

    __slots__ = ("load", "invalid", "window")

    def __init__(self, load: torch.Tensor, invalid: torch.Tensor | None = None, window: int = 0) -> None:
        _check_load(load, "Heat(load)")
        if invalid is None:
            invalid = torch.zeros(load.shape[:2], dtype=torch.int64)
        if not isinstance(invalid, torch.Tensor) or invalid.dtype != torch.int64:
            raise TypeError("Heat(invalid): expected an int64 tensor of shape (num_layers, world_size)")
        if tuple(invalid.shape) != tuple(load.shape[:2]):
            raise ValueError(
                f"Heat(invalid): expected shape {tuple(load.shape[:2])} (num_layers, world_size),"
                f" got {tuple(invalid.shape)}"
            )
        if not isinstance(window, int) or isinstance(window, bool) or window < 0:
            raise ValueError(f"Heat(window): expected an int >= 0, got {window!r}")
        self.load = load
        self.invalid = invalid
        self.window = window

    # -- shape ------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.load.shape[0]

    @property
    def world_size(self) -> int:
        return self.load.shape[1]

    @property
    def num_experts(self) -> int:
        return self.load.shape[2]

    # -- views ------------------------------------------------------------------------------
    def total(self) -> torch.Tensor:
        """``(num_layers, num_experts)``: the load summed over ranks (int64)."""
        return self.load.sum(dim=1)

    def rank_load(self) -> torch.Tensor:
        """``(num_layers, world_size)``: the tokens each rank recorded per layer (int64)."""
        return self.load.sum(dim=2)

    def balancedness(self, ep_size: int | None = None) -> torch.Tensor:
        """Per layer, ``mean / max`` over ranks of the per-rank load (float64, ``(num_layers,)``).

        With ``ep_size=None`` (vllm-ascend: every rank records its *local* experts), the load of rank
        ``r`` is ``load[l, r, :].sum()``. With ``ep_size=n`` (vLLM-style: every rank records
        *physical* expert ids, ``num_experts`` of them laid out contiguously over ``n`` EP ranks),
        the load of EP rank ``i`` is the total load of physical experts ``[i*E/n, (i+1)*E/n)``.
        1.0 is perfect balance; a layer with no load at all counts as 1.0.
        """
        if ep_size is None:
            return _balancedness(self.rank_load())
        if not isinstance(ep_size, int) or isinstance(ep_size, bool) or ep_size <= 0:
            raise ValueError(f"balancedness(ep_size): expected an int > 0 or None, got {ep_size!r}")
        if self.num_experts % ep_size:
            raise ValueError(
                f"balancedness(ep_size): num_experts={self.num_experts} is not divisible by ep_size={ep_size}"
            )
        per_rank = self.total().reshape(self.num_layers, ep_size, -1).sum(dim=2)
        return _balancedness(per_rank)

    def logical(self, physical_to_logical: torch.Tensor | Sequence[int], num_logical: int) -> torch.Tensor:
        """``(num_layers, num_logical)``: the load per *logical* expert, replicas summed (vLLM layout).

        ``physical_to_logical`` maps each physical expert to its logical expert: shape ``(P,)`` (the
        same map for every layer) or ``(num_layers, P)`` (vLLM's ``physical_to_logical_map``). ``P``
        is either ``num_experts`` (the experts recorded are global physical ids, e.g. from
        ``topk_ids``; ranks are summed) or ``world_size * num_experts`` (every rank recorded its
        local experts and physical id ``r * num_experts + e`` is local expert ``e`` of rank ``r``).
        """
        if not isinstance(num_logical, int) or isinstance(num_logical, bool) or num_logical <= 0:
            raise ValueError(f"logical(num_logical): expected an int > 0, got {num_logical!r}")
        mapping = torch.as_tensor(physical_to_logical)
        if mapping.dtype.is_floating_point or mapping.dtype.is_complex or mapping.dtype == torch.bool:
            raise TypeError(f"logical(physical_to_logical): expected integer expert ids, got {mapping.dtype}")
        mapping = mapping.to("cpu", torch.int64)
        if mapping.dim() == 1:
            mapping = mapping.unsqueeze(0).expand(self.num_layers, -1)
        if mapping.dim() != 2 or mapping.shape[0] != self.num_layers:
            raise ValueError(
                "logical(physical_to_logical): expected shape (P,) or (num_layers, P) with"
                f" num_layers={self.num_layers}, got {tuple(torch.as_tensor(physical_to_logical).shape)}"
            )
        num_physical = mapping.shape[1]
        if num_physical == self.num_experts:
            physical = self.total()
        elif num_physical == self.world_size * self.num_experts:
            physical = self.load.reshape(self.num_layers, -1)
        else:
            raise ValueError(
                f"logical(physical_to_logical): {num_physical} physical experts, but this Heat has"
                f" num_experts={self.num_experts} (global physical ids) or world_size*num_experts="
                f"{self.world_size * self.num_experts} (local experts per rank)"
            )
        if mapping.numel() and (int(mapping.min()) < 0 or int(mapping.max()) >= num_logical):
            raise ValueError(
                f"logical(physical_to_logical): ids must lie in [0, num_logical={num_logical}),"
                f" got values in [{int(mapping.min())}, {int(mapping.max())}]"
            )
        out = torch.zeros(self.num_layers, num_logical, dtype=torch.int64)
        out.scatter_add_(1, mapping.contiguous(), physical)
        return out

    # -- persistence ------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write this Heat to ``path`` (a ``torch.save`` file; read it back with :meth:`load_file`)."""
        torch.save(
            {"format": _FORMAT, "version": _VERSION, "load": self.load, "invalid": self.invalid, "window": self.window},
            os.fspath(path),
        )

    @classmethod
    def load_file(cls, path: str | os.PathLike) -> "Heat":
        """Read a Heat written by :meth:`save` (loaded with ``weights_only=True``: no code runs)."""
        data = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"Heat.load_file({os.fspath(path)!r}): not a file written by Heat.save()")
        if data.get("version") != _VERSION:
            raise ValueError(
                f"Heat.load_file({os.fspath(path)!r}): format version {data.get('version')!r} is not supported"
                f" (this streamkit_eplb reads version {_VERSION})"
            )
        return cls(data["load"], data["invalid"], int(data["window"]))

    def heatmap(self, path: str | os.PathLike, *, title: str | None = None) -> None:
        """Write a PNG heat map to ``path``: layers x experts, one panel per rank.

        Needs matplotlib (``pip install 'streamkit[plot]'``).
        """
        _heatmap(self.load, os.fspath(path), title or f"expert heat, window {self.window}")

    # -- misc -------------------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Heat):
            return NotImplemented
        return (
            self.window == other.window
            and torch.equal(self.load, other.load)
            and torch.equal(self.invalid, other.invalid)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"Heat(window={self.window}, num_layers={self.num_layers}, world_size={self.world_size},"
            f" num_experts={self.num_experts}, tokens={int(self.load.sum())}, invalid={int(self.invalid.sum())})"
        )


def _heatmap(load: torch.Tensor, path: str, title: str) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Heat.heatmap() needs matplotlib: pip install 'streamkit[plot]' (or pip install matplotlib)"
        ) from exc
    num_layers, world, num_experts = load.shape
    data = load.to(torch.float64).numpy()
    vmax = max(float(data.max()), 1.0) if data.size else 1.0
    width = min(3.0 + 0.2 * num_experts, 9.0)
    height = min(1.5 + 0.3 * num_layers, 10.0)
    fig = Figure(figsize=(width * world + 1.0, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, world, squeeze=False)[0]
    image = None
    for rank, ax in enumerate(axes):
        image = ax.imshow(data[:, rank, :], aspect="auto", interpolation="nearest", cmap="inferno", vmin=0, vmax=vmax)
        ax.set_title(f"rank {rank}")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="tokens")
    fig.suptitle(title)
    fig.savefig(path, format="png", dpi=100)


class HeatHistory:
    """The last ``size`` :class:`Heat` windows (vLLM's sliding window of expert load).

    ``add(heat)`` appends (dropping the oldest beyond ``size``), ``sum()`` returns a :class:`Heat`
    whose load is the sum over the kept windows (its ``window`` is the newest one's), and
    ``balancedness()`` is that sum's balancedness.
    """

    def __init__(self, size: int) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ValueError(f"HeatHistory(size): expected an int > 0, got {size!r}")
        self.size = size
        self._heats: deque[Heat] = deque(maxlen=size)

    def add(self, heat: Heat) -> None:
        if not isinstance(heat, Heat):
            raise TypeError(f"HeatHistory.add(heat): expected a Heat, got {type(heat).__name__}")
        if self._heats and heat.load.shape != self._heats[-1].load.shape:
            raise ValueError(
                f"HeatHistory.add(heat): shape {tuple(heat.load.shape)} differs from the history's"
                f" {tuple(self._heats[-1].load.shape)} (num_layers, world_size, num_experts)"
            )
        self._heats.append(heat)

    def sum(self) -> Heat:
        if not self._heats:
            raise ValueError("HeatHistory.sum(): the history is empty (add() a Heat first)")
        load = torch.stack([h.load for h in self._heats]).sum(dim=0)
        invalid = torch.stack([h.invalid for h in self._heats]).sum(dim=0)
        return Heat(load, invalid, self._heats[-1].window)

    def balancedness(self, ep_size: int | None = None) -> torch.Tensor:
        return self.sum().balancedness(ep_size)

    def clear(self) -> None:
        self._heats.clear()

    def __len__(self) -> int:
        return len(self._heats)

    def __iter__(self) -> Iterator[Heat]:
        return iter(tuple(self._heats))

    def __repr__(self) -> str:
        windows = [h.window for h in self._heats]
        return f"HeatHistory(size={self.size}, windows={windows})"
