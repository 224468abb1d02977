"""Host-side results: :class:`Heat` (one collected window) and :class:`HeatHistory` (a sliding window).

Everything here is plain CPU tensor work: no device, no streams, no synchronization.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import deque
from typing import Any, Iterator, Sequence

import torch

from ._placement import Placement

_FORMAT = "streamkit_eplb.Heat"
_VERSION = 2
_READS = (1, 2)
_KINDS = ("layer", "vllm", "ascend")
_REDUCES = ("gather", "sum")


def _check_counts(t: Any, name: str, dims: int, shape_text: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"Heat({name}): expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int64:
        raise TypeError(f"Heat({name}): expected an int64 tensor, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"Heat({name}): expected shape {shape_text}, got {tuple(t.shape)}")
    if t.device.type != "cpu":
        raise ValueError(f"Heat({name}): expected a CPU tensor, got one on {t.device}")
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"Heat({name}): token counts cannot be negative (min {int(t.min())})")
    return t


def _mean_over_max(per_rank: torch.Tensor) -> torch.Tensor:
    """``mean / max`` over the last axis of a (L, R) load, as float64; 1.0 for a layer with no load."""
    per_rank = per_rank.to(torch.float64)
    mean = per_rank.mean(dim=-1)
    peak = per_rank.amax(dim=-1)
    out = torch.ones_like(mean)
    nz = peak > 0
    out[nz] = mean[nz] / peak[nz]
    return out


def balancedness_of(per_rank: torch.Tensor, kind: str = "layer") -> torch.Tensor:
    """The balancedness of a per-rank load ``(L, R)`` (float64). ``kind``:

    * ``"layer"``: per layer, ``mean_r / max_r`` (``(L,)``; 1.0 is perfect; a layer with no load is 1.0).
    * ``"vllm"``: vLLM's ``EplbState`` log line, one number (0-dim): ``sum_l mean_r / sum_l max_r``
      (``avg_tokens / max_tokens`` summed over layers; 0.0 when there is no load, as in vLLM).
    * ``"ascend"``: vllm-ascend's imbalance, per layer, ``max_r / mean_r`` (``(L,)``; 1.0 is
      perfect, higher is worse; a layer with no load is 1.0).
    """
    if kind not in _KINDS:
        raise ValueError(f"balancedness(kind): expected one of {', '.join(map(repr, _KINDS))}, got {kind!r}")
    per_rank = per_rank.to(torch.float64)
    if kind == "layer":
        return _mean_over_max(per_rank)
    mean = per_rank.mean(dim=-1)
    peak = per_rank.amax(dim=-1)
    if kind == "vllm":
        top = peak.sum()
        return mean.sum() / top if float(top) > 0 else torch.zeros((), dtype=torch.float64)
    out = torch.ones_like(mean)
    nz = mean > 0
    out[nz] = peak[nz] / mean[nz]
    return out


class Heat:
    """The expert load of one collection window (a CPU snapshot).

    * ``load``: int64 ``(num_layers, R, num_experts)``: ``load[l, r, e]`` tokens of layer ``l``
      counted for expert slot ``e``; ``R`` is the world size for ``reduce="gather"`` (row ``r`` is
      what rank ``r`` recorded: vllm-ascend's ``moe_load`` layout) and 1 for ``reduce="sum"`` (the
      sum over the ranks, vLLM's all-reduced load).
    * ``invalid``: int64 ``(num_layers, R)``: routed ids that were out of range, excluded.
    * ``window``: 0, 1, 2, ... per collector.
    * ``passes``: int64 ``(W, num_layers, R, num_experts)`` (oldest pass first, or the ring rows in
      storage order for a ``ring="layer"`` collector; ``load`` is their sum),
      or ``None`` when collected with ``passes=False``.
    * ``placement_version`` and ``phy2log`` (int64 ``(L, P)`` or ``None`` if the collector knew no
      placement): the placement the window was counted under.
    * ``reduce``: ``"gather"`` or ``"sum"``; ``num_ranks``: the group size (``R`` for gather).

    A Heat owns its tensors: a later ``collect()`` never overwrites them. Loads are never negative.
    """

    __slots__ = ("load", "invalid", "window", "passes", "placement_version", "phy2log", "reduce", "num_ranks")

    def __init__(
        self,
        load: torch.Tensor,
        invalid: torch.Tensor | None = None,
        window: int = 0,
        *,
        passes: torch.Tensor | None = None,
        placement_version: int = 0,
        phy2log: torch.Tensor | None = None,
        reduce: str = "gather",
        num_ranks: int | None = None,
    ) -> None:
        _check_counts(load, "load", 3, "(num_layers, world_size, num_experts)")
        if invalid is None:
            invalid = torch.zeros(load.shape[:2], dtype=torch.int64)
        if not isinstance(invalid, torch.Tensor) or invalid.dtype != torch.int64:
            raise TypeError("Heat(invalid): expected an int64 tensor of shape (num_layers, world_size)")
        if tuple(invalid.shape) != tuple(load.shape[:2]):
            raise ValueError(
                f"Heat(invalid): expected shape {tuple(load.shape[:2])} (num_layers, world_size),"
                f" got {tuple(invalid.shape)}"
            )
        _check_counts(invalid, "invalid", 2, "(num_layers, world_size)")
        for name, value in (("window", window), ("placement_version", placement_version)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"Heat({name}): expected an int >= 0, got {value!r}")
        if passes is not None:
            _check_counts(passes, "passes", 4, "(window, num_layers, world_size, num_experts)")
            if tuple(passes.shape[1:]) != tuple(load.shape):
                raise ValueError(f"Heat(passes): expected shape (W, *{tuple(load.shape)}), got {tuple(passes.shape)}")
            if not torch.equal(passes.sum(0), load):
                raise ValueError("Heat(passes): the passes do not sum to load")
        if reduce not in _REDUCES:
            raise ValueError(f"Heat(reduce): expected 'gather' or 'sum', got {reduce!r}")
        if reduce == "sum" and load.shape[1] != 1:
            raise ValueError(f"Heat(reduce='sum'): load must have one row per layer, got shape {tuple(load.shape)}")
        if num_ranks is None:
            num_ranks = load.shape[1]
        if not isinstance(num_ranks, int) or isinstance(num_ranks, bool) or num_ranks <= 0:
            raise ValueError(f"Heat(num_ranks): expected an int > 0, got {num_ranks!r}")
        if reduce == "gather" and num_ranks != load.shape[1]:
            raise ValueError(f"Heat(num_ranks): {num_ranks} ranks but load has {load.shape[1]} rank rows")
        if phy2log is not None:
            phy2log = torch.as_tensor(phy2log)
            if phy2log.dtype != torch.int64 or phy2log.dim() != 2 or phy2log.shape[0] != load.shape[0]:
                raise ValueError(f"Heat(phy2log): expected an int64 (num_layers, P) map, got {phy2log.dtype} {tuple(phy2log.shape)}")
            if phy2log.shape[1] not in (load.shape[2], num_ranks * load.shape[2]):
                raise ValueError(
                    f"Heat(phy2log): {phy2log.shape[1]} slots, expected num_experts={load.shape[2]} or"
                    f" num_ranks*num_experts={num_ranks * load.shape[2]}"
                )
            if phy2log.numel() and int(phy2log.min()) < -1:
                raise ValueError("Heat(phy2log): logical ids must be >= 0, or -1 for an empty slot")
        self.load = load
        self.invalid = invalid
        self.window = window
        self.passes = passes
        self.placement_version = placement_version
        self.phy2log = phy2log
        self.reduce = reduce
        self.num_ranks = num_ranks

    # -- shape ------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.load.shape[0]

    @property
    def world_size(self) -> int:
        """Rows of ``load`` per layer: the world size for ``reduce="gather"``, 1 for ``"sum"``."""
        return self.load.shape[1]

    @property
    def num_experts(self) -> int:
        return self.load.shape[2]

    # -- views ------------------------------------------------------------------------------
    def total(self) -> torch.Tensor:
        """``(num_layers, num_experts)``: the load summed over ranks (int64)."""
        return self.load.sum(dim=1)

    def rank_load(self, ep_size: int | None = None) -> torch.Tensor:
        """``(num_layers, R)`` int64: the tokens each rank serves per layer.

        ``ep_size=None``: row ``r`` of ``load`` is rank ``r``'s own (rank-local slots, vllm-ascend).
        ``ep_size=n``: ``num_experts`` global physical slots laid out contiguously over ``n`` EP
        ranks; rank ``i`` serves slots ``[i*E/n, (i+1)*E/n)`` (vLLM).
        """
        if ep_size is None:
            return self.load.sum(dim=2)
        if not isinstance(ep_size, int) or isinstance(ep_size, bool) or ep_size <= 0:
            raise ValueError(f"balancedness(ep_size): expected an int > 0 or None, got {ep_size!r}")
        if self.num_experts % ep_size:
            raise ValueError(
                f"balancedness(ep_size): num_experts={self.num_experts} is not divisible by ep_size={ep_size}"
            )
        return self.total().reshape(self.num_layers, ep_size, -1).sum(dim=2)

    def balancedness(self, ep_size: int | None = None, *, kind: str = "layer") -> torch.Tensor:
        """The balancedness of :meth:`rank_load` (``ep_size`` as there); ``kind`` is one of

        * ``"layer"`` (default, v1): per layer ``mean_r load / max_r load``, ``(L,)``, 1.0 perfect.
        * ``"vllm"``: vLLM's logged balancedness, one 0-dim value:
          ``sum_l mean_r load / sum_l max_r load`` (0.0 without load).
        * ``"ascend"``: vllm-ascend's imbalance, per layer ``max_r load / mean_r load`` (1.0 perfect).
        """
        return balancedness_of(self.rank_load(ep_size), kind)

    def _map(self, physical_to_logical: Any) -> torch.Tensor | None:
        if physical_to_logical is None:
            return self.phy2log
        if isinstance(physical_to_logical, Placement):
            return physical_to_logical.phy2log
        mapping = torch.as_tensor(physical_to_logical)
        if mapping.dtype.is_floating_point or mapping.dtype.is_complex or mapping.dtype == torch.bool:
            raise TypeError(f"logical(physical_to_logical): expected integer expert ids, got {mapping.dtype}")
        return mapping.to("cpu", torch.int64)

    def logical(self, physical_to_logical: Any = None, num_logical: int | None = None) -> torch.Tensor:
        """``(num_layers, num_logical)``: the load per *logical* expert, replicas and ranks summed.

        ``physical_to_logical``: ``(P,)`` or ``(num_layers, P)`` (vLLM's ``physical_to_logical_map``)
        or a :class:`Placement`; default: the map this Heat was counted under (``phy2log``), or the
        identity if it has none. ``P`` is ``num_experts`` (global physical slots; ranks summed) or
        ``num_ranks * num_experts`` (each rank recorded its local slots; slot ``r * E + e``).
        ``num_logical`` defaults to the map's largest id + 1.
        """
        mapping = self._map(physical_to_logical)
        if mapping is None:
            mapping = torch.arange(self.num_experts)
        if mapping.dim() == 1:
            mapping = mapping.unsqueeze(0).expand(self.num_layers, -1)
        if mapping.dim() != 2 or mapping.shape[0] != self.num_layers:
            raise ValueError(
                "logical(physical_to_logical): expected shape (P,) or (num_layers, P) with"
                f" num_layers={self.num_layers}, got {tuple(mapping.shape)}"
            )
        if num_logical is None:
            num_logical = max(int(mapping.max()) + 1, 1) if mapping.numel() else 1
        if not isinstance(num_logical, int) or isinstance(num_logical, bool) or num_logical <= 0:
            raise ValueError(f"logical(num_logical): expected an int > 0, got {num_logical!r}")
        num_physical = mapping.shape[1]
        if num_physical == self.num_experts:
            physical = self.total()
        elif num_physical == self.num_ranks * self.num_experts and self.reduce == "gather":
            physical = self.load.reshape(self.num_layers, -1)
        else:
            raise ValueError(
                f"logical(physical_to_logical): {num_physical} physical experts, but this Heat has"
                f" num_experts={self.num_experts} (global physical ids) or world_size*num_experts="
                f"{self.world_size * self.num_experts} (local experts per rank)"
            )
        if mapping.numel() and (int(mapping.min()) < -1 or int(mapping.max()) >= num_logical):
            raise ValueError(
                f"logical(physical_to_logical): ids must lie in [0, num_logical={num_logical}) or be -1 (an"
                f" empty slot), got values in [{int(mapping.min())}, {int(mapping.max())}]"
            )
        out = torch.zeros(self.num_layers, num_logical + 1, dtype=torch.int64)  # last column: empty slots
        out.scatter_add_(1, torch.where(mapping >= 0, mapping, num_logical).contiguous(), physical)
        return out[:, :num_logical].contiguous()

    def predicted_balancedness(self, placement: Placement, num_ranks: int | None = None, *, kind: str = "layer") -> torch.Tensor:
        """The balancedness this window's logical load would have under ``placement``, every logical
        expert's load split evenly over its replicas, slots rank-major over ``num_ranks`` ranks
        (default: the Heat's ``num_ranks``). Same ``kind`` as :meth:`balancedness`."""
        if not isinstance(placement, Placement):
            raise TypeError(f"predicted_balancedness(placement): expected a Placement, got {type(placement).__name__}")
        ranks = self.num_ranks if num_ranks is None else num_ranks
        logical = self.logical(num_logical=placement.num_logical if self.phy2log is not None else None)
        if logical.shape[1] != placement.num_logical:
            raise ValueError(
                f"predicted_balancedness(placement): the Heat has {logical.shape[1]} logical experts, the"
                f" placement {placement.num_logical}"
            )
        return balancedness_of(placement.rank_load(logical, ranks), kind)

    # -- engine adapters --------------------------------------------------------------------
    def to_vllm(self) -> torch.Tensor:
        """vLLM's rearrangement input: int64 ``(L, num_logical)``, the window's load per logical
        expert summed over ranks and replicas: what ``EplbState.rearrange`` computes (window map +
        sum + all_reduce) and passes to ``rebalance_experts`` as ``global_expert_load_window``."""
        return self.logical()

    def to_vllm_ascend(self, *, multi_stage: bool = False) -> dict[str, torch.Tensor]:
        """vllm-ascend's ``shared_dict`` entry: ``{"moe_load": tensor}``, int64, as
        ``EplbUpdator.compute_and_set_moe_load`` builds it (each rank's per-layer load all-gathered,
        ``torch.stack(...).permute(1, 0, 2)``):

        * ``multi_stage=False``: ``(L, world, E_local)``, the window's load (``self.load``).
        * ``multi_stage=True`` (FlashLB, ``eplb_policy_type == 3``): ``(num_iter, L, world, E_local)``,
          the ring rows (``self.passes``; collect a ``ring="layer"`` collector with ``window=num_iter``
          to get vllm-ascend's per-layer rows, storage order) as that method permutes them
          (``permute(2, 0, 1, 3)``).

        Needs ``reduce="gather"`` (and ``passes`` for ``multi_stage``)."""
        if not isinstance(multi_stage, bool):
            raise TypeError(f"to_vllm_ascend(multi_stage): expected a bool, got {type(multi_stage).__name__} {multi_stage!r}")
        if self.reduce != "gather":
            raise ValueError("to_vllm_ascend(): needs per-rank rows; collect with HeatCollector(reduce='gather')")
        if not multi_stage:
            return {"moe_load": self.load.clone()}
        if self.passes is None:
            raise ValueError("to_vllm_ascend(multi_stage=True): this Heat has no passes; collect with passes=True")
        return {"moe_load": self.passes.clone()}

    def to_sglang(self) -> dict[str, Any]:
        """An SGLang dump: ``{"logical_count": (L, num_logical) int64, "window": int,
        "placement_version": int}``. SGLang's ``--init-expert-location FILE`` (``.pt`` read with
        ``weights_only=True``, or ``.json``) takes ``logical_count`` from it and rebalances with it
        (``ExpertLocationMetadata.init_by_eplb``); the other keys are ignored there."""
        return {
            "logical_count": self.logical(),
            "window": self.window,
            "placement_version": self.placement_version,
        }

    def save_sglang(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_sglang` as ``.json`` (lists) or, for any other suffix, a ``torch.save`` file."""
        data = self.to_sglang()
        path = os.fspath(path)
        if path.endswith(".json"):
            data = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in data.items()}
            with open(path, "w", encoding="utf-8") as f:
                json.dump(data, f)
        else:
            torch.save(data, path)

    def prometheus(self, prefix: str = "streamkit_eplb", ep_size: int | None = None, labels: dict[str, str] | None = None) -> str:
        """Prometheus text exposition (format 0.0.4) of this window: per layer the balancedness
        (``kind="layer"``, ``ep_size`` as in :meth:`balancedness`), the routed tokens and the invalid
        ids; plus vLLM's one-number balancedness, the window and the placement version. ``labels``
        are added to every sample."""
        if not isinstance(prefix, str):
            raise TypeError(
                f"prometheus(prefix): expected a metric name prefix string ([a-zA-Z_:][a-zA-Z0-9_:]*),"
                f" got {type(prefix).__name__} {prefix!r}"
            )
        if not prefix or not prefix.replace("_", "a").replace(":", "a").isalnum() or not prefix.isascii() or prefix[0].isdigit():
            raise ValueError(f"prometheus(prefix): not a valid metric name prefix ([a-zA-Z_:][a-zA-Z0-9_:]*): {prefix!r}")
        if labels is not None and not isinstance(labels, dict):
            raise TypeError(
                f"prometheus(labels): expected a dict of label name -> value (e.g. {{'model': 'demo'}}) or None,"
                f" got {type(labels).__name__} {labels!r}"
            )
        base = dict(labels or {})
        for key in base:
            if not isinstance(key, str):
                raise TypeError(f"prometheus(labels): label names must be strings, got {type(key).__name__} {key!r}")
            if not key or not key.replace("_", "a").isalnum() or not key.isascii() or key[0].isdigit() or key.startswith("__"):
                raise ValueError(f"prometheus(labels): not a valid label name ([a-zA-Z_][a-zA-Z0-9_]*, no leading __): {key!r}")

        def fmt(extra: dict[str, str]) -> str:
            items = {**base, **extra}
            if not items:
                return ""
            esc = lambda v: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")  # noqa: E731
            return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in items.items()) + "}"

        lines: list[str] = []

        def metric(name: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
            lines.append(f"# HELP {prefix}_{name} {help_text}")
            lines.append(f"# TYPE {prefix}_{name} gauge")
            for extra, value in samples:
                text = repr(float(value)) if isinstance(value, float) else str(int(value))
                lines.append(f"{prefix}_{name}{fmt(extra)} {text}")

        b = self.balancedness(ep_size)
        metric("balancedness", "Per-layer balancedness: mean over ranks / max over ranks of the tokens each rank serves (1 is perfect).",
               [({"layer": str(l)}, float(b[l])) for l in range(self.num_layers)])
        tokens = self.load.sum(dim=(1, 2))
        metric("routed_tokens", "Per-layer routed (token, expert) assignments counted in the window.",
               [({"layer": str(l)}, int(tokens[l])) for l in range(self.num_layers)])
        invalid = self.invalid.sum(dim=1)
        metric("invalid_ids", "Per-layer routed ids outside the expert range, excluded from the load.",
               [({"layer": str(l)}, int(invalid[l])) for l in range(self.num_layers)])
        metric("balancedness_vllm", "vLLM's balancedness: sum over layers of mean rank load / sum over layers of max rank load.",
               [({}, float(self.balancedness(ep_size, kind="vllm")))])
        metric("window", "The collection window this sample comes from.", [({}, self.window)])
        metric("placement_version", "The expert placement version the window was counted under.", [({}, self.placement_version)])
        return "\n".join(lines) + "\n"

    # -- folding ----------------------------------------------------------------------------
    @classmethod
    def fold(cls, heats: Sequence["Heat"]) -> "Heat":
        """One Heat summing ``heats`` (oldest first; ``window`` is the newest one's; ``passes``
        concatenated when every Heat has them). Refuses heats of different shapes or placements."""
        heats = list(heats)
        if not heats:
            raise ValueError("Heat.fold(heats): nothing to fold")
        first = heats[0]
        for h in heats:
            if not isinstance(h, Heat):
                raise TypeError(f"Heat.fold(heats): expected Heats, got {type(h).__name__}")
            if h.load.shape != first.load.shape or h.reduce != first.reduce:
                raise ValueError(
                    f"Heat.fold(heats): shape {tuple(h.load.shape)} ({h.reduce}) differs from"
                    f" {tuple(first.load.shape)} ({first.reduce}) (num_layers, world_size, num_experts)"
                )
            same_map = (h.phy2log is None and first.phy2log is None) or (
                h.phy2log is not None and first.phy2log is not None and torch.equal(h.phy2log, first.phy2log)
            )
            if h.placement_version != first.placement_version or not same_map:
                raise ValueError(
                    f"Heat.fold(heats): window {h.window} was counted under placement version"
                    f" {h.placement_version}, window {first.window} under {first.placement_version}; heats of"
                    " different placements cannot be summed (their slots hold different experts)"
                )
        passes = None
        if all(h.passes is not None for h in heats):
            passes = torch.cat([h.passes for h in heats])
        return cls(
            torch.stack([h.load for h in heats]).sum(0),
            torch.stack([h.invalid for h in heats]).sum(0),
            heats[-1].window,
            passes=passes,
            placement_version=first.placement_version,
            phy2log=first.phy2log,
            reduce=first.reduce,
            num_ranks=first.num_ranks,
        )

    # -- persistence ------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write this Heat to ``path`` (a ``torch.save`` file; read it back with :meth:`load_file`)."""
        torch.save(
            {
                "format": _FORMAT, "version": _VERSION, "load": self.load, "invalid": self.invalid,
                "window": self.window, "passes": self.passes, "placement_version": self.placement_version,
                "phy2log": self.phy2log, "reduce": self.reduce, "num_ranks": self.num_ranks,
            },
            os.fspath(path),
        )

    @classmethod
    def load_file(cls, path: str | os.PathLike) -> "Heat":
        """Read a Heat written by :meth:`save` (format 1 or 2), with ``torch.load(weights_only=True)``:
        no code from the file runs. A file that is not a valid Heat raises
        ``ValueError("not a valid Heat file: <path>: <why>")``; a missing file raises the usual ``OSError``."""
        where = os.fspath(path)

        def bad(why: str) -> ValueError:
            return ValueError(f"not a valid Heat file: {where}: {why}")

        try:
            with warnings.catch_warnings():  # torch's own hints about the pickle don't apply here
                warnings.simplefilter("ignore")
                data = torch.load(where, map_location="cpu", weights_only=True)
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - every reader error means the same: not a Heat file
            raise bad(f"it cannot be read as a weights-only torch.save file ({type(exc).__name__})") from None
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise bad("not a file written by Heat.save()")
        if data.get("version") not in _READS:
            raise bad(f"format version {data.get('version')!r} is not supported (this streamkit_eplb reads {_READS})")
        try:
            extra = {}
            if data["version"] >= 2:
                extra = {k: data[k] for k in ("passes", "placement_version", "phy2log", "reduce", "num_ranks")}
                if not isinstance(extra["placement_version"], int):
                    raise TypeError("placement_version is not an int")
            window = data["window"]
            if not isinstance(window, int):
                raise TypeError("window is not an int")
            return cls(data["load"], data["invalid"], window, **extra)
        except KeyError as exc:
            raise bad(f"missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise bad(str(exc)) from None

    def heatmap(self, path: str | os.PathLike, *, title: str | None = None, ep_size: int | None = None, max_columns: int = 256) -> None:
        """Write a PNG heat map to ``path``: layers x expert slots, the expert-parallel split marked,
        per-layer balancedness beside it. With more than ``max_columns`` slots the map shows one
        column per rank (rank totals; ranks binned if still too many), so it stays readable.
        ``ep_size`` as in :meth:`rank_load`. Needs matplotlib (``pip install 'streamkit[plot]'``)."""
        from ._plot import heatmap

        heatmap([(self, title or f"expert heat, window {self.window}")], os.fspath(path), ep_size=ep_size, max_columns=max_columns)

    # -- misc -------------------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Heat):
            return NotImplemented

        def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
            return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))

        return (
            self.window == other.window
            and torch.equal(self.load, other.load)
            and torch.equal(self.invalid, other.invalid)
            and same(self.passes, other.passes)
            and same(self.phy2log, other.phy2log)
            and self.placement_version == other.placement_version
            and self.reduce == other.reduce
            and self.num_ranks == other.num_ranks
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        passes = "None" if self.passes is None else str(self.passes.shape[0])
        return (
            f"Heat(window={self.window}, num_layers={self.num_layers}, world_size={self.world_size},"
            f" num_experts={self.num_experts}, tokens={int(self.load.sum())}, invalid={int(self.invalid.sum())},"
            f" passes={passes}, reduce={self.reduce!r}, placement_version={self.placement_version})"
        )


class HeatHistory:
    """The last ``size`` :class:`Heat` windows of one placement (vLLM's sliding window).

    ``add(heat)`` appends, dropping the oldest beyond ``size``; a Heat of another placement
    (``placement_version`` or ``phy2log`` differ) *starts a new window*: the older heats are dropped
    and ``add`` returns ``True``. ``sum()`` folds the kept windows (:meth:`Heat.fold`, which refuses
    heats of different placements), ``balancedness()`` is that sum's balancedness.
    """

    def __init__(self, size: int) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ValueError(f"HeatHistory(size): expected an int > 0, got {size!r}")
        self.size = size
        self._heats: deque[Heat] = deque(maxlen=size)

    def add(self, heat: Heat) -> bool:
        """Append ``heat``; returns ``True`` when it started a new window (a placement change)."""
        if not isinstance(heat, Heat):
            raise TypeError(f"HeatHistory.add(heat): expected a Heat, got {type(heat).__name__}")
        restarted = False
        if self._heats:
            last = self._heats[-1]
            if heat.load.shape != last.load.shape:
                raise ValueError(
                    f"HeatHistory.add(heat): shape {tuple(heat.load.shape)} differs from the history's"
                    f" {tuple(last.load.shape)} (num_layers, world_size, num_experts)"
                )
            same_map = (heat.phy2log is None and last.phy2log is None) or (
                heat.phy2log is not None and last.phy2log is not None and torch.equal(heat.phy2log, last.phy2log)
            )
            if heat.placement_version != last.placement_version or not same_map:
                self._heats.clear()
                restarted = True
        self._heats.append(heat)
        return restarted

    @property
    def placement_version(self) -> int | None:
        return self._heats[-1].placement_version if self._heats else None

    def sum(self) -> Heat:
        if not self._heats:
            raise ValueError("HeatHistory.sum(): the history is empty (add() a Heat first)")
        return Heat.fold(self._heats)

    def balancedness(self, ep_size: int | None = None, *, kind: str = "layer") -> torch.Tensor:
        return self.sum().balancedness(ep_size, kind=kind)

    def clear(self) -> None:
        self._heats.clear()

    def __len__(self) -> int:
        return len(self._heats)

    def __iter__(self) -> Iterator[Heat]:
        return iter(tuple(self._heats))

    def __repr__(self) -> str:
        windows = [h.window for h in self._heats]
        return f"HeatHistory(size={self.size}, windows={windows}, placement_version={self.placement_version})"
