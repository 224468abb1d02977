"""The expert-heat collector: graph-safe counters on the current stream, collected on a side stream.

Stream protocol (every step is a rule streamkit's fake backend checks):

* ``record``, ``step``, ``reset`` and the ``enabled`` setter each issue **one** kernel on the
  *current* stream (a ``torch.library`` custom op, or ``zero_``/``fill_``), reading only device
  tensors: no side stream, no event, no ``record_stream``, no host sync, no host read of a device
  value. So they can be captured in a CUDA/ACL graph, and the enable flag and the pass index,
  being device tensors, can change between replays.
* ``collect``: the current stream first waits for the previous collect's event (its gather has
  long finished: it was issued a window ago), then one kernel copies the counters into a staging
  buffer; the side stream waits for the current stream, reduces or gathers the staging buffer
  across the group, starts a non-blocking copy into a fresh (pinned) host tensor, records an event,
  and hands the buffers it read to ``sk.record_stream`` (so freeing the collector is safe); once
  the collective was issued, one more kernel on the current stream clears the counters
  (``reset=True``). A record issued before ``collect()`` lands in that window and one issued after
  it in the next.
* ``HeatHandle.wait``: synchronizes the host with that event only, then builds the :class:`Heat`.

Every collector call must be ordered with the others (issue them on one stream, or order the
streams yourself): they all touch the same counters, as an engine's own counters would.
"""

from __future__ import annotations

import operator
import time
from typing import Any

import torch
import torch.distributed as dist

import streamkit as sk

from . import _ops
from ._heat import Heat
from ._placement import Placement

__all__ = ["CollectError", "HeatCollector", "HeatHandle", "collect_all"]

# torch >= 2.10 renamed all_gather_into_tensor (now deprecated) to all_gather_single; same c10d op.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

_NO_LIMIT = 2**62  # num_tokens when the caller gives none: every row counts


class CollectError(sk.StreamkitError):
    """A ``collect()`` failed (typically its collective: a peer died or timed out); a
    :class:`streamkit.StreamkitError` (so a ``RuntimeError``).

    Raised by :meth:`HeatHandle.wait`; ``__cause__`` is the original error. No partial
    :class:`Heat` is ever returned; the counters of that window were not cleared.
    """


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"HeatCollector({name}): expected an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"HeatCollector({name}): expected an int, got {type(value).__name__}") from None
    if value <= 0:
        raise ValueError(f"HeatCollector({name}): expected an int > 0, got {value}")
    return value


_ID_DTYPES = (torch.int32, torch.int64)
_REDUCES = ("gather", "sum")
_REPLICAS = ("hash", "modulo")
_RINGS = ("step", "layer")


def _as_log2phy(log2phy: Any, num_layers: int, num_experts: int) -> Placement:
    """A Placement from the constructor's ``log2phy`` argument (a Placement or an int tensor
    ``(N, R)`` / ``(L, N, R)`` padded with -1), checked against the collector's shape."""
    if isinstance(log2phy, Placement):
        placement = log2phy
        if placement.num_layers == 1 and num_layers > 1:
            placement = Placement.from_phy2log(placement.phy2log[0], placement.num_logical, num_layers=num_layers)
    else:
        table = torch.as_tensor(log2phy)
        if table.dtype.is_floating_point or table.dtype.is_complex or table.dtype == torch.bool:
            raise TypeError(f"HeatCollector(log2phy): expected integer slot ids (-1 pads), got {table.dtype}")
        table = table.to("cpu", torch.int64)
        if table.dim() == 2:
            table = table.unsqueeze(0).expand(num_layers, -1, -1)
        if table.dim() != 3 or table.shape[0] != num_layers:
            raise ValueError(
                "HeatCollector(log2phy): expected shape (num_logical, max_replicas) or (num_layers,"
                f" num_logical, max_replicas) with num_layers={num_layers}, got {tuple(torch.as_tensor(log2phy).shape)}"
            )
        phy2log = torch.full((num_layers, num_experts), -1, dtype=torch.int64)
        for layer in range(num_layers):
            slots = table[layer]
            used = slots[slots >= 0]
            if used.numel() and int(used.max()) >= num_experts:
                raise ValueError(
                    f"HeatCollector(log2phy): layer {layer} maps to slot {int(used.max())}, but num_experts"
                    f" (physical slots) is {num_experts}"
                )
            if used.numel() != used.unique().numel():
                raise ValueError(f"HeatCollector(log2phy): layer {layer} names a physical slot twice")
            logical = torch.arange(slots.shape[0]).unsqueeze(1).expand_as(slots)
            phy2log[layer, slots[slots >= 0]] = logical[slots >= 0]
        # a slot no logical expert names stays -1: an empty slot (elastic expert parallelism)
        placement = Placement.from_phy2log(phy2log, table.shape[1])
    if placement.num_physical != num_experts or placement.num_layers != num_layers:
        raise ValueError(
            f"HeatCollector(log2phy): the placement has {placement.num_layers} layers x {placement.num_physical}"
            f" slots, the collector {num_layers} x {num_experts} (num_experts counts physical slots)"
        )
    return placement


class HeatCollector:
    """Counts the tokens routed to every MoE expert, per layer, graph-safe; see the module docstring.

    ``HeatCollector(num_layers, num_experts, *, group=None, stream=None, window=1, reduce="gather",
    log2phy=None, dtype=torch.int32)`` allocates every buffer once, on the active streamkit
    backend's current device.

    * ``num_experts``: the counter columns: the experts ids ``record`` receives (rank-local slots,
      global physical slots or, without ``log2phy``, logical ids).
    * ``group``: a ``torch.distributed`` process group; every rank must construct its collector with
      the same arguments (checked at construction with one small collective). ``None``: one rank.
    * ``stream``: the side stream ``collect()`` uses (default: a new ``sk.Stream()``).
    * ``window``: the device keeps the last ``window`` passes; :meth:`step` starts a new pass.
      ``window=1`` without ``step()`` is a running sum (v1's behaviour).
    * ``reduce``: ``"gather"``: every rank's rows (``Heat.load`` is ``(L, world, E)``; for ids that
      are rank-local slots, vllm-ascend); ``"sum"``: one all_reduce (``Heat.load`` is ``(L, 1, E)``;
      for global physical ids, vLLM).
    * ``log2phy``: a :class:`Placement` or vLLM's ``logical_to_physical_map`` (``(N, R)`` or
      ``(L, N, R)``, ``-1`` pads): ``record(topk_ids=...)`` then receives *logical* ids and counts
      the physical slot each token goes to, the replica chosen by ``replica``. The placement also
      becomes the collector's current placement (version 0). Slots no expert occupies are empty
      (``-1`` in ``phy2log``: elastic expert parallelism).
    * ``replica``: ``"hash"`` (default; vLLM's current rule: replica
      ``((token * 2654435769) & 0xFFFFFFFF) % replicas`` of the token's row index) or ``"modulo"``
      (vLLM v0.11: the id's flat position in ``topk_ids`` modulo the replica count).
    * ``dtype``: the device counters, ``torch.int32`` (default; they hold up to 2**31-1 tokens per
      pass, layer and slot between collects) or ``torch.int64``. Heats are always int64.
    * ``ring``: ``"step"`` (default): :meth:`step` starts a new pass for every layer at once;
      ``"layer"``: every ``record`` of a layer writes that layer's next ring row and advances it
      (vllm-ascend's ``load_counter``: ``moe_load[counter % window] += tokens``; rows that wrap keep
      adding until :meth:`reset`); ``collect()`` then returns the rows in storage order.
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        *,
        group: Any = None,
        stream: sk.Stream | None = None,
        window: int = 1,
        reduce: str = "gather",
        log2phy: Any = None,
        dtype: torch.dtype = torch.int32,
        replica: str = "hash",
        ring: str = "step",
    ) -> None:
        self.num_layers = _positive_int(num_layers, "num_layers")
        self.num_experts = _positive_int(num_experts, "num_experts")
        self.window = _positive_int(window, "window")
        if reduce not in _REDUCES:
            raise ValueError(f"HeatCollector(reduce): expected 'gather' or 'sum', got {reduce!r}")
        self.reduce = reduce
        if dtype not in (torch.int32, torch.int64):
            raise TypeError(f"HeatCollector(dtype): expected torch.int32 or torch.int64, got {dtype}")
        if replica not in _REPLICAS:
            raise ValueError(f"HeatCollector(replica): expected 'hash' (vLLM's current rule) or 'modulo' (vLLM v0.11), got {replica!r}")
        if ring not in _RINGS:
            raise ValueError(f"HeatCollector(ring): expected 'step' (one pass index) or 'layer' (one ring per layer), got {ring!r}")
        self.replica = replica
        self.ring = ring
        backend = sk.get_backend()
        if stream is None:
            eplb_side = sk.Stream()  # named so in race reports: stream #n 'eplb_side'
            stream = eplb_side
        elif not isinstance(stream, sk.Stream):
            raise TypeError(
                f"HeatCollector(stream): expected a streamkit.Stream or None, got {type(stream).__name__}"
            )
        elif stream.backend != backend.name:
            raise sk.BackendMismatchError(
                f"HeatCollector(stream): the stream belongs to backend {stream.backend!r}, but the active"
                f" backend is {backend.name!r}"
            )
        self._placement = _as_log2phy(log2phy, self.num_layers, self.num_experts) if log2phy is not None else None
        self._maps = self._placement is not None
        self._version = 0
        self._layer_versions = [0] * self.num_layers
        self._backend = backend
        self._is_fake = backend.name == "fake"
        self._stream = stream
        self._device = backend.device()
        self._group = group
        if group is None:
            self._world, self._rank = 1, 0
        else:
            if not dist.is_available() or not dist.is_initialized():
                raise RuntimeError(
                    "HeatCollector(group): a process group was given but torch.distributed is not"
                    " initialized (call torch.distributed.init_process_group first, or pass group=None)"
                )
            self._world = dist.get_world_size(group)
            self._rank = dist.get_rank(group)
        self._next_window = 0
        self._enabled = True
        self._last_done: sk.Event | None = None  # the previous collect's event (staging free again)
        W, L, C = self.window, self.num_layers, self.num_experts + 1
        dev = self._device
        self._acc = torch.zeros((W, L, C), dtype=dtype, device=dev)
        # [enabled, pass index] (+ one ring position per layer with ring="layer")
        self._ctrl = torch.tensor([1, 0] + ([0] * L if ring == "layer" else []), dtype=torch.int64).to(dev)
        self._flag = self._ctrl[0:1]
        self._no_limit = torch.tensor(_NO_LIMIT, dtype=torch.int64).to(dev)
        if self._maps:
            # as wide as any placement of these slots can need (vLLM pads the same way), so that
            # set_placement() updates fixed-shape buffers in place
            self._log2phy = self._padded_log2phy(self._placement).to(dev)
            self._logcnt = self._placement.logcnt.to(dev)
        else:
            self._log2phy = torch.zeros((1, 1, 1), dtype=torch.int64, device=dev)
            self._logcnt = torch.zeros((1, 1), dtype=torch.int64, device=dev)
        self._staging = torch.zeros((W * L * C,), dtype=dtype, device=dev)
        self._gather = (
            torch.empty((self._world * W * L * C,), dtype=dtype, device=dev)
            if self._world > 1 and reduce == "gather"
            else None
        )
        self._own = _Buffers(self._staging, self._gather)
        self._fused: dict[tuple[int, ...], _Buffers] = {}  # collect_all's buffers, by the collectors' ids
        if self._world > 1:
            self._check_peers(dtype)

    # -- properties -------------------------------------------------------------------------
    @property
    def stream(self) -> sk.Stream:
        """The side stream ``collect()`` gathers and copies on."""
        return self._stream

    @property
    def world_size(self) -> int:
        return self._world

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def placement(self) -> Placement | None:
        """The current placement (``None`` if none was given), see :meth:`set_placement`."""
        return self._placement

    @property
    def placement_version(self) -> int:
        """0 at construction, +1 at every :meth:`set_placement`."""
        return self._version

    @property
    def enabled(self) -> bool:
        """Whether ``record`` counts. Setting it issues one kernel (``fill_`` of a device flag the
        record kernel reads) on the current stream: no host sync, and a captured graph sees the
        value at replay time. The getter returns the last value set from the host."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"HeatCollector.enabled: expected a bool, got {type(value).__name__}")
        self._flag.fill_(1 if value else 0)
        self._enabled = value

    def __repr__(self) -> str:
        return (
            f"HeatCollector(num_layers={self.num_layers}, num_experts={self.num_experts}, window={self.window},"
            f" reduce={self.reduce!r}, ring={self.ring!r}, world_size={self._world}, rank={self._rank}, device={self._device},"
            f" placement_version={self._version}, next_window={self._next_window})"
        )

    def payload_bytes(self, *, passes: bool = True) -> int:
        """Bytes one rank contributes to a ``collect(passes=passes)`` collective (the staging payload)."""
        rows = self.window if passes else 1
        return rows * self.num_layers * (self.num_experts + 1) * self._acc.element_size()

    # -- construction check -----------------------------------------------------------------
    def _check_peers(self, dtype: torch.dtype) -> None:
        """One small all_gather of the shape and options: disagreeing ranks fail here, all of them."""
        fields = [self.num_layers, self.num_experts, self.window, _REDUCES.index(self.reduce),
                  0 if dtype == torch.int32 else 1, int(self._maps), _REPLICAS.index(self.replica), _RINGS.index(self.ring)]
        mine = torch.tensor(fields, dtype=torch.int64).to(self._device)
        n = len(fields)
        everyone = torch.empty((n * self._world,), dtype=torch.int64, device=self._device)
        _all_gather(everyone, mine, group=self._group)
        rows = [tuple(row) for row in everyone.cpu().view(self._world, n).tolist()]
        shapes = [row[:2] for row in rows]
        if any(shape != shapes[self._rank] for shape in shapes):
            listing = ", ".join(f"rank {r}: {s}" for r, s in enumerate(shapes))
            raise ValueError(
                "HeatCollector: the ranks of the group disagree on (num_layers, num_experts) -"
                f" {listing}; every rank must construct its collector with the same shape"
            )
        if any(row != rows[self._rank] for row in rows):
            listing = ", ".join(f"rank {r}: {row[2:]}" for r, row in enumerate(rows))
            raise ValueError(
                "HeatCollector: the ranks of the group disagree on (window, reduce, dtype, log2phy given, replica, ring) -"
                f" {listing}; every rank must construct its collector with the same options"
            )

    # -- record -----------------------------------------------------------------------------
    def _check_tensor(self, name: str, t: Any) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"HeatCollector.record({name}): expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(
                f"HeatCollector.record({name}): expected an integer tensor (int32/int64), got {t.dtype}"
            )
        dev = self._device
        if t.device.type != dev.type or (dev.index is not None and t.device.index not in (None, dev.index)):
            raise ValueError(
                f"HeatCollector.record({name}): the tensor is on {t.device}, but the collector's buffers are"
                f" on {dev}; record tensors of the collector's device"
            )

    def record(
        self,
        layer: int,
        counts: torch.Tensor | None = None,
        *,
        topk_ids: torch.Tensor | None = None,
        cumulative: bool = False,
        num_tokens: torch.Tensor | None = None,
        return_physical: bool = False,
    ) -> torch.Tensor | None:
        """Add one layer's load to the current pass: **one kernel on the current stream**.

        Exactly one of:

        * ``counts``: integer tensor ``(num_experts,)``, tokens per expert slot (vllm-ascend's
          ``expert_tokens``); with ``cumulative=True`` it is a running sum (group list type 0) and is
          diffed back to per-slot counts.
        * ``topk_ids``: integer tensor, ``(num_tokens, top_k)`` (or ``(num_tokens,)``): the expert id
          each token was routed to; ``-1`` is padding and not counted. Without ``log2phy`` the ids
          are counter columns ``[0, num_experts)``; with it they are logical ids ``[0, num_logical)``
          mapped to physical slots. ``num_tokens``: optional 0-dim integer device tensor; rows of
          ``topk_ids`` at or beyond it are padding (graph-padded batches) and not counted.

        ``return_physical=True`` (with ``log2phy``): the same kernel also maps every id to the
        physical slot it was counted on and returns them, a new tensor shaped and typed like
        ``topk_ids`` (``-1`` for padding and ids without a slot), for the engine to route with:
        vLLM's ``eplb_map_to_physical_and_record`` in one call. Otherwise returns ``None``.

        Out-of-range ids raise ``ValueError`` on the fake backend; on real devices (where the check
        would cost a host sync) they are excluded and counted in ``Heat.invalid``. Nothing is counted
        while :attr:`enabled` is False. Never blocks the host and never allocates a collector buffer
        (only the returned ids); the input is read on the current stream, where it was made.
        """
        if isinstance(layer, bool):
            raise TypeError("HeatCollector.record(layer): expected an int, got bool")
        try:
            layer = operator.index(layer)
        except TypeError:
            raise TypeError(f"HeatCollector.record(layer): expected an int, got {type(layer).__name__}") from None
        if not 0 <= layer < self.num_layers:
            raise IndexError(
                f"HeatCollector.record(layer): layer {layer} is out of range [0, {self.num_layers})"
            )
        if (counts is None) == (topk_ids is None):
            raise TypeError(
                "HeatCollector.record(): pass exactly one of counts (per-expert token counts) or"
                f" topk_ids (routed expert ids); got {'both' if counts is not None else 'neither'}"
            )
        if not isinstance(cumulative, bool):
            raise TypeError(f"HeatCollector.record(cumulative): expected a bool, got {type(cumulative).__name__}")
        if not isinstance(return_physical, bool):
            raise TypeError(f"HeatCollector.record(return_physical): expected a bool, got {type(return_physical).__name__}")
        E = self.num_experts
        limit = self._no_limit
        if counts is not None:
            if num_tokens is not None:
                raise TypeError("HeatCollector.record(num_tokens): only applies to topk_ids, not to counts")
            self._check_tensor("counts", counts)
            if tuple(counts.shape) != (E,):
                raise ValueError(
                    f"HeatCollector.record(counts): expected shape ({E},) (one count per expert),"
                    f" got {tuple(counts.shape)}"
                )
            if self._is_fake:
                self._validate_counts_fake(layer, counts, cumulative)
            values, mode = counts, (_ops.MODE_CUMULATIVE if cumulative else _ops.MODE_COUNTS)
        else:
            if cumulative:
                raise TypeError("HeatCollector.record(cumulative): only applies to counts, not to topk_ids")
            self._check_tensor("topk_ids", topk_ids)
            if topk_ids.dtype not in _ID_DTYPES:
                raise TypeError(
                    f"HeatCollector.record(topk_ids): expected an int32 or int64 tensor (-1 is padding),"
                    f" got {topk_ids.dtype}"
                )
            if topk_ids.dim() not in (1, 2):
                raise ValueError(
                    "HeatCollector.record(topk_ids): expected shape (num_tokens, top_k) or (num_tokens,),"
                    f" got a {topk_ids.dim()}-dim tensor of shape {tuple(topk_ids.shape)}"
                )
            if num_tokens is not None:
                self._check_tensor("num_tokens", num_tokens)
                if num_tokens.dim() != 0:
                    raise ValueError(
                        f"HeatCollector.record(num_tokens): expected a 0-dim device tensor (the unpadded row"
                        f" count), got shape {tuple(num_tokens.shape)}"
                    )
                limit = num_tokens
            if self._is_fake:
                self._validate_topk_fake(layer, topk_ids, num_tokens)
            if not self._maps:
                mode = _ops.MODE_IDS
            else:
                mode = _ops.MODE_IDS_HASHED if self.replica == "hash" else _ops.MODE_IDS_MAPPED
            values = topk_ids
        if return_physical:
            if counts is not None or not self._maps:
                raise ValueError(
                    "HeatCollector.record(return_physical): needs topk_ids of logical experts and a collector"
                    " built with log2phy= (there is nothing to map otherwise)"
                )
            if self.ring == "layer":
                raise ValueError("HeatCollector.record(return_physical): not supported with ring='layer'")
            out = torch.empty_like(values)
            torch.ops.streamkit_eplb.record_map(self._acc, self._ctrl, values, limit, self._log2phy, self._logcnt, out, layer, mode)
            return out
        op = torch.ops.streamkit_eplb.record_layer if self.ring == "layer" else torch.ops.streamkit_eplb.record
        op(self._acc, self._ctrl, values, limit, self._log2phy, self._logcnt, layer, mode)
        return None

    def _validate_counts_fake(self, layer: int, counts: torch.Tensor, cumulative: bool) -> None:
        from streamkit import fake

        values = fake.peek(counts).to(torch.int64)
        if cumulative:
            steps = torch.diff(values, prepend=values.new_zeros(1))
            if bool((steps < 0).any()):
                raise ValueError(
                    f"HeatCollector.record(counts) for layer {layer}: cumulative=True but the counts are not a"
                    f" non-decreasing running sum: {values.tolist()}"
                )
        elif bool((values < 0).any()):
            raise ValueError(
                f"HeatCollector.record(counts) for layer {layer}: negative token counts {values.tolist()}"
            )

    def _validate_topk_fake(self, layer: int, topk_ids: torch.Tensor, num_tokens: torch.Tensor | None) -> None:
        from streamkit import fake

        values = fake.peek(topk_ids)
        if num_tokens is not None:
            limit = int(fake.peek(num_tokens))
            if limit < 0:
                raise ValueError(f"HeatCollector.record(num_tokens): expected a count >= 0, got {limit}")
            values = values[:limit]
        if values.numel() == 0:
            return
        bound = self._placement.num_logical if self._maps else self.num_experts
        bad = (values < -1) | (values >= bound)
        if bool(bad.any()):
            wrong = sorted(set(values[bad].tolist()))[:8]
            kind = "logical expert ids" if self._maps else "expert ids"
            raise ValueError(
                f"HeatCollector.record(topk_ids) for layer {layer}: {kind} must lie in"
                f" [-1, {bound}) (-1 is padding), got {wrong}"
            )

    # -- passes, reset, placement ---------------------------------------------------------------
    def step(self) -> None:
        """Start a new pass: one kernel on the current stream advances the device pass index modulo
        ``window`` and clears the pass it now points at (the oldest one). Graph-safe. Not used with
        ``ring="layer"``, where every record advances its own layer's ring."""
        if self.ring == "layer":
            raise RuntimeError(
                "HeatCollector.step(): this collector has ring='layer': every record() advances its layer's"
                " ring row, there is no common pass to start (construct it with ring='step' to use step())"
            )
        torch.ops.streamkit_eplb.step(self._acc, self._ctrl)

    def clear_pass(self) -> None:
        """Zero the pass being counted (every layer), keeping the older passes: one kernel on the
        current stream, graph-safe. vLLM's ``expert_load_pass.zero_()`` for a dummy step. With
        ``ring="layer"`` there is no common pass: use :meth:`reset`."""
        if self.ring == "layer":
            raise RuntimeError("HeatCollector.clear_pass(): this collector has ring='layer' (no common pass); use reset()")
        self._acc.index_fill_(0, self._ctrl[1:2], 0)

    def reset(self) -> None:
        """Zero every counter of every pass: one kernel (``zero_``) on the current stream (two with
        ``ring="layer"``, which also rewinds the per-layer ring positions, as vllm-ascend's
        ``clear_all_moe_loads`` does). The counts since the last ``collect()`` are discarded."""
        self._acc.zero_()
        if self.ring == "layer":
            self._ctrl[2:].zero_()

    @property
    def layer_versions(self) -> tuple[int, ...]:
        """Per layer, the :attr:`placement_version` of the :meth:`set_placement` that last changed it
        (0: the construction placement)."""
        return tuple(self._layer_versions)

    def set_placement(self, phy2log: Any, *, layers: Any = None, keep_window: bool = False) -> int:
        """Record a new placement; returns its version (the previous one + 1).

        ``phy2log``: a :class:`Placement` or a physical-to-logical map ``(P,)`` / ``(L, P)`` (``-1``:
        an empty slot). With ``log2phy`` given at construction, ``P`` must be ``num_experts`` and
        record's mapping is updated in place (device buffers of fixed shape, sized for any placement
        of the slots, so captured graphs stay valid). Without it the map is metadata: ``P`` is
        ``num_experts`` (global slots) or ``world_size * num_experts`` (rank-local slots, rank-major).

        ``layers``: commit only these layers (an int or a sequence of layer indices; async EPLB
        commits layer by layer): ``phy2log`` then holds either every layer or just these, in this
        order; the other layers keep their placement, and :attr:`layer_versions` records the new
        version for these layers only.

        ``keep_window=False`` (default): the counters of the committed layers are cleared, so counts
        of the old placement never reach a Heat of the new one; ``collect()`` first to keep them.
        ``keep_window=True`` keeps them, as vLLM keeps its window across a rearrangement: the passes
        counted under the old placement are then read (``to_vllm()``) through the new map, which is
        what vLLM computes and not the true logical load.
        """
        where = "HeatCollector.set_placement"
        if not isinstance(keep_window, bool):
            raise TypeError(f"{where}(keep_window): expected a bool, got {type(keep_window).__name__}")
        selected = self._layers_arg(layers, where)
        if isinstance(phy2log, Placement):
            placement = phy2log
        else:
            if isinstance(phy2log, str):
                raise TypeError(
                    f"{where}(phy2log): expected a Placement or a physical-to-logical map (P,) / (num_layers, P)"
                    f" of integer expert ids, got the string {phy2log!r}"
                )
            one_row = isinstance(phy2log, torch.Tensor) and phy2log.dim() == 1
            rows = self.num_layers if selected is None else len(selected)
            placement = Placement.from_phy2log(phy2log, self._placement.num_logical if self._maps else None,
                                               num_layers=rows if one_row else None)
        expected_rows = (self.num_layers,) if selected is None else (self.num_layers, len(selected))
        if placement.num_layers == 1 and 1 not in expected_rows:
            placement = Placement.from_phy2log(placement.phy2log[0], placement.num_logical, num_layers=expected_rows[-1])
        if placement.num_layers not in expected_rows:
            wanted = " or ".join(map(str, sorted(set(expected_rows))))
            raise ValueError(
                f"{where}(phy2log): {placement.num_layers} layers; expected {wanted}"
                f" (the collector has {self.num_layers}{'' if selected is None else f', layers= names {len(selected)}'})"
            )
        if self._maps:
            allowed = [self.num_experts]
            what = "num_experts (the collector's physical slots)"
        else:
            allowed = sorted({self.num_experts, self._world * self.num_experts})
            what = ("num_experts" if len(allowed) == 1 else
                    "num_experts (global slots) or world_size * num_experts (rank-local slots)")
        if placement.num_physical not in allowed:
            raise ValueError(
                f"{where}(phy2log): {placement.num_physical} physical slots; expected"
                f" {' or '.join(map(str, allowed))}: {what}"
            )
        if self._maps and placement.num_logical != self._placement.num_logical:
            raise ValueError(
                f"{where}(phy2log): {placement.num_logical} logical experts, the"
                f" collector maps {self._placement.num_logical}"
            )
        if selected is not None and placement.num_layers != self.num_layers:
            rows_of = {layer: row for row, layer in enumerate(selected)}
        else:
            rows_of = None
        # the complete new placement (other layers unchanged)
        if selected is None:
            full = placement
            changed = list(range(self.num_layers))
        else:
            if self._placement is None:
                raise ValueError(
                    f"{where}(layers): the collector has no placement yet to update layer by layer; commit"
                    " every layer first (pass phy2log for all layers without layers=)"
                )
            if self._placement.num_physical != placement.num_physical:
                raise ValueError(
                    f"{where}(phy2log): {placement.num_physical} slots per layer, the current placement has"
                    f" {self._placement.num_physical}"
                )
            merged = self._placement.phy2log.clone()
            for layer in selected:
                merged[layer] = placement.phy2log[rows_of[layer] if rows_of is not None else layer]
            num_logical = max(self._placement.num_logical, placement.num_logical)
            full = Placement.from_phy2log(merged, num_logical)
            changed = selected
        self._version += 1
        for layer in changed:
            self._layer_versions[layer] = self._version
        if self._maps:
            padded = self._padded_log2phy(full)
            if selected is None:
                self._log2phy.copy_(padded.to(self._device))
                self._logcnt.copy_(full.logcnt.to(self._device))
            else:
                index = torch.tensor(changed, dtype=torch.int64).to(self._device)
                self._log2phy.index_copy_(0, index, padded[changed].to(self._device))
                self._logcnt.index_copy_(0, index, full.logcnt[changed].to(self._device))
        self._placement = full
        if not keep_window:
            if selected is None:
                self.reset()
            else:
                index = torch.tensor(changed, dtype=torch.int64).to(self._device)
                self._acc.index_fill_(1, index, 0)
                if self.ring == "layer":
                    self._ctrl.index_fill_(0, index + 2, 0)
        return self._version

    def _layers_arg(self, layers: Any, where: str) -> list[int] | None:
        if layers is None:
            return None
        items = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
        try:
            chosen = [operator.index(layer) for layer in items if not isinstance(layer, bool)]
            if len(chosen) != len(list(items)):
                raise TypeError
        except TypeError:
            raise TypeError(f"{where}(layers): expected an int or a sequence of ints (layer indices), got {layers!r}") from None
        if not chosen:
            raise ValueError(f"{where}(layers): expected at least one layer index, got {layers!r}")
        bad = [layer for layer in chosen if not 0 <= layer < self.num_layers]
        if bad:
            raise IndexError(f"{where}(layers): {bad} out of range [0, {self.num_layers})")
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"{where}(layers): a layer is named twice in {chosen}")
        return chosen

    def _padded_log2phy(self, placement: Placement) -> torch.Tensor:
        width = self.num_experts - placement.num_logical + 1  # the most replicas one expert can have
        padded = torch.full((self.num_layers, placement.num_logical, width), -1, dtype=torch.int64)
        padded[:, :, : placement.log2phy.shape[2]] = placement.log2phy
        return padded

    # -- collect ----------------------------------------------------------------------------
    def collect(self, *, passes: bool = True, reset: bool = True) -> "HeatHandle":
        """Close the current window and start aggregating it; returns a :class:`HeatHandle`.

        ``passes=True``: the payload is the whole ring of ``window`` passes (``Heat.passes`` is
        ``(window, L, R, E)``, oldest first; in storage order with ``ring="layer"``);
        ``passes=False``: only their sum (``Heat.passes`` is ``None``; vLLM's payload size).
        ``reset=True`` clears the counters after the copy (every token in exactly one Heat);
        ``reset=False`` leaves them (a sliding window read). The host does not wait. If the
        collective fails, ``HeatHandle.wait()`` raises and the counters are kept.
        """
        return _collect([self], passes, reset, self._own, "HeatCollector.collect")[0]

    def _payload_numel(self, passes: bool) -> int:
        return (self.window if passes else 1) * self.num_layers * (self.num_experts + 1)

    def _shape(self, rows: int, world_rows: int) -> tuple[int, int, int, int]:
        return (world_rows, rows, self.num_layers, self.num_experts + 1)

    # -- state (sleep / wake) ------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The collector's device buffers by name, the live tensors themselves (as
        ``nn.Module.state_dict`` returns them): ``counters`` (the ring), ``control`` (enable flag,
        pass index, per-layer ring positions), ``log2phy`` and ``logcnt`` (the mapping). Register
        them with an engine's buffers (``module.register_buffer``) so its sleep/wake restores them,
        or copy them out and back with :meth:`load_state_dict`."""
        return {"counters": self._acc, "control": self._ctrl, "log2phy": self._log2phy, "logcnt": self._logcnt}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` (from :meth:`state_dict`, e.g. saved to the host before a sleep) into the
        device buffers in place, on the current stream (one copy per buffer; captured graphs stay
        valid). Every key of :meth:`state_dict` is required, with the same shape and dtype. The
        host-side placement and versions are not part of it (they survive a device sleep)."""
        where = "HeatCollector.load_state_dict"
        if not isinstance(state, dict):
            raise TypeError(f"{where}(state): expected a dict of tensors from state_dict(), got {type(state).__name__}")
        mine = self.state_dict()
        missing, extra = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
        if missing or extra:
            raise ValueError(f"{where}(state): keys differ from state_dict()'s: missing {missing}, unexpected {extra}")
        for name, buffer in mine.items():
            value = state[name]
            if not isinstance(value, torch.Tensor) or value.shape != buffer.shape or value.dtype != buffer.dtype:
                got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{where}(state[{name!r}]): expected {buffer.dtype} {tuple(buffer.shape)}, got {got}")
        for name, buffer in mine.items():
            value = state[name]
            buffer.copy_(value if value.device == buffer.device else value.to(buffer.device, non_blocking=True))


class _Buffers:
    """A staging buffer (and gather output) one collect reuses, and the event after which it is free."""

    __slots__ = ("staging", "gather", "last_done", "ready")

    def __init__(self, staging: torch.Tensor, gather: torch.Tensor | None) -> None:
        self.staging = staging
        self.gather = gather
        self.last_done: sk.Event | None = None
        self.ready = sk.Event()


def _host_buffer(collector: HeatCollector, numel: int) -> torch.Tensor:
    # Pinned, so the device-to-host copy is really asynchronous (into pageable memory it is
    # synchronous, on CUDA and on fake alike).
    dtype = collector._acc.dtype
    if collector._is_fake:  # (the fake device has no pinned allocator behind pin_memory=True)
        return torch.empty((numel,), dtype=dtype).pin_memory()
    try:
        return torch.empty((numel,), dtype=dtype, pin_memory=True)
    except RuntimeError:  # pragma: no cover - no pinned allocator for this device
        return torch.empty((numel,), dtype=dtype)


def _collect(collectors: list[HeatCollector], passes: bool, reset: bool, buffers: _Buffers, where: str) -> list["HeatHandle"]:
    """Take every collector's counters into ``buffers.staging`` (one after the other), reduce or
    gather that in one collective on the first collector's side stream, copy it to one host tensor."""
    if not isinstance(passes, bool) or not isinstance(reset, bool):
        raise TypeError(f"{where}(passes, reset): expected bools, got passes={passes!r}, reset={reset!r}")
    first = collectors[0]
    sizes = [c._payload_numel(passes) for c in collectors]
    total = sum(sizes)
    world, reduce = first._world, first.reduce
    world_rows = world if reduce == "gather" else 1
    host = _host_buffer(first, world_rows * total)
    side = first._stream
    current = sk.current_stream()
    if buffers.last_done is not None:
        current.wait_event(buffers.last_done)  # the previous collect's collective has read the staging buffer
    offset = 0
    metas = []
    for c, n in zip(collectors, sizes):
        torch.ops.streamkit_eplb.take(c._acc, c._ctrl, buffers.staging[offset:offset + n], passes, c.ring == "step")
        rows = c.window if passes else 1
        metas.append((c._next_window, (c._shape(rows, world_rows), passes, c._version, c._placement, c.reduce, c._world)))
        c._next_window += 1
        offset += n
    buffers.ready.record(current)
    side.wait_event(buffers.ready)
    with sk.switch(side):
        payload = buffers.staging[:total]
        source = payload
        if world > 1:
            try:
                if reduce == "sum":
                    dist.all_reduce(payload, group=first._group)
                else:
                    source = buffers.gather[: world * total]
                    _all_gather(source, payload, group=first._group)
            except sk.StreamkitError:
                raise  # a streamkit error (e.g. a race report) is a bug to see now
            except Exception as exc:  # noqa: BLE001 - a dead or slow peer: report it from wait()
                return [HeatHandle(window, meta, None, None, exc) for window, meta in metas]
        host.copy_(source, non_blocking=True)
        done = side.record_event()
    # the buffers were allocated on the constructing stream: keep their memory until the side
    # stream is done with them, even if the collector is freed first
    sk.record_stream(buffers.staging, side)
    if source is not payload:
        sk.record_stream(source, side)
    buffers.last_done = done
    for c in collectors:
        c._last_done = done
        if reset:
            c.reset()
    # no view of `host` here: touching it before the copy lands is a host read the fake backend reports
    handles, offset = [], 0
    for (window, meta), n in zip(metas, sizes):
        handles.append(HeatHandle(window, meta, host, done, None, (offset, n, total)))
        offset += n
    return handles


def collect_all(collectors: Any, *, passes: bool = True, reset: bool = True) -> list["HeatHandle"]:
    """:meth:`HeatCollector.collect` of several collectors with **one** collective (e.g. a main
    model's and its drafter's): their payloads are concatenated into one buffer, all-reduced or
    all-gathered once, and copied to the host once. Returns one :class:`HeatHandle` per collector,
    in order; each Heat is exactly what that collector's own ``collect()`` would have returned.

    The collectors must share the process group (the same object), ``reduce``, ``dtype`` and
    backend, and every rank must pass its collectors in the same order. The first collector's side
    stream runs the collective.
    """
    where = "collect_all"
    if isinstance(collectors, HeatCollector):
        collectors = [collectors]
    try:
        items = list(collectors)
    except TypeError:
        raise TypeError(f"{where}(collectors): expected a sequence of HeatCollector, got {type(collectors).__name__}") from None
    if not items:
        raise ValueError(f"{where}(collectors): expected at least one HeatCollector, got an empty sequence")
    for c in items:
        if not isinstance(c, HeatCollector):
            raise TypeError(f"{where}(collectors): expected HeatCollector items, got {type(c).__name__}")
    if len({id(c) for c in items}) != len(items):
        raise ValueError(f"{where}(collectors): a collector is listed twice")
    first = items[0]
    for c in items[1:]:
        for what, mine, theirs in (("group", c._group, first._group), ("reduce", c.reduce, first.reduce),
                                   ("dtype", c._acc.dtype, first._acc.dtype), ("backend", c._backend.name, first._backend.name)):
            if mine is not theirs and mine != theirs:
                raise ValueError(
                    f"{where}(collectors): every collector needs the same {what}; the first has {theirs!r},"
                    f" another {mine!r}"
                )
    if len(items) == 1:
        return _collect(items, passes, reset, first._own, where)
    key = tuple(id(c) for c in items)
    total = sum(c._payload_numel(True) for c in items)
    entry = first._fused.get(key)
    if entry is None or entry.staging.numel() != total:
        dev, dtype = first._device, first._acc.dtype
        gather = torch.empty((first._world * total,), dtype=dtype, device=dev) if first._world > 1 and first.reduce == "gather" else None
        entry = _Buffers(torch.zeros((total,), dtype=dtype, device=dev), gather)
        first._fused[key] = entry
    return _collect(items, passes, reset, entry, where)


class HeatHandle:
    """One pending :meth:`HeatCollector.collect`: :meth:`done` polls it, :meth:`wait` returns its Heat."""

    __slots__ = ("_meta", "_window", "_host", "_event", "_error", "_heat", "_part")

    def __init__(self, window: int, meta: Any, host: torch.Tensor | None, event: Any, error: BaseException | None,
                 part: tuple[int, int, int] | None = None) -> None:
        self._part = part  # (offset, numel, row length) of this collector's payload in `host` rows
        self._window = window
        self._meta = meta
        self._host = host
        self._event = event
        self._error = error
        self._heat: Heat | None = None

    @property
    def window(self) -> int:
        return self._window

    def done(self) -> bool:
        """``True`` once :meth:`wait` would return (or raise) without blocking."""
        if self._heat is not None or self._error is not None:
            return True
        return self._event.query()

    def wait(self, timeout: float | None = None) -> Heat:
        """Block the host until this window's copy has landed and return its :class:`Heat`.

        Waits for this handle's work only (one event), never for the whole device. Raises
        :class:`CollectError` if the collect failed, ``TimeoutError`` if ``timeout`` seconds pass
        first. Calling it again returns the same Heat.
        """
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))):
            raise TypeError(f"HeatHandle.wait(timeout): expected None or a number of seconds >= 0, got {type(timeout).__name__} {timeout!r}")
        if timeout is not None and not timeout >= 0:  # also refuses nan
            raise ValueError(f"HeatHandle.wait(timeout): expected None or a number of seconds >= 0, got {timeout!r}")
        if self._error is not None:
            raise CollectError(
                f"HeatCollector.collect() of window {self._window} failed, no Heat for it:"
                f" {type(self._error).__name__}: {self._error}"
            ) from self._error
        if self._heat is None:
            if timeout is None:
                self._event.synchronize()
            else:
                deadline = time.monotonic() + timeout
                while not self._event.query():
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"HeatHandle.wait(): window {self._window} not done after {timeout} s")
                    time.sleep(0.0005)
                self._event.synchronize()  # completes at once; orders the host after the copy
            (world_rows, rows, layers, cols), passes, version, placement, reduce, world = self._meta
            offset, n, total = self._part
            mine = self._host.view(world_rows, total)[:, offset:offset + n]
            raw = mine.reshape(world_rows, rows, layers, cols).to(torch.int64).permute(1, 2, 0, 3)  # (W, L, R, C)
            experts = cols - 1
            series = raw[..., :experts].contiguous()
            load = series.sum(0)
            invalid = raw[..., experts].sum(0).contiguous()
            self._heat = Heat(
                load, invalid, self._window,
                passes=series if passes else None,
                placement_version=version,
                phy2log=None if placement is None else placement.phy2log,
                reduce=reduce,
                num_ranks=world,
            )
            self._host = None
        return self._heat

    def __repr__(self) -> str:
        state = "failed" if self._error is not None else ("done" if self._heat is not None else "pending")
        return f"<HeatHandle window={self._window} {state}>"
