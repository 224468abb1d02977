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

__all__ = ["CollectError", "HeatCollector", "HeatHandle"]

# torch >= 2.10 renamed all_gather_into_tensor (now deprecated) to all_gather_single; same c10d op.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

_NO_LIMIT = 2**62  # num_tokens when the caller gives none: every row counts


class CollectError(RuntimeError):
    """A ``collect()`` failed (typically its collective: a peer died or timed out).

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
        if bool((phy2log < 0).any()):
            layer, slot = (phy2log < 0).nonzero()[0].tolist()
            raise ValueError(
                f"HeatCollector(log2phy): physical slot {slot} of layer {layer} holds no logical expert;"
                f" every slot in [0, num_experts={num_experts}) must appear exactly once"
            )
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
      the physical slot each token goes to, replica chosen as vLLM does (the id's flat position in
      ``topk_ids`` modulo the expert's replica count). The placement also becomes the collector's
      current placement (version 0).
    * ``dtype``: the device counters, ``torch.int32`` (default; they hold up to 2**31-1 tokens per
      pass, layer and slot between collects) or ``torch.int64``. Heats are always int64.
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
    ) -> None:
        self.num_layers = _positive_int(num_layers, "num_layers")
        self.num_experts = _positive_int(num_experts, "num_experts")
        self.window = _positive_int(window, "window")
        if reduce not in _REDUCES:
            raise ValueError(f"HeatCollector(reduce): expected 'gather' or 'sum', got {reduce!r}")
        self.reduce = reduce
        if dtype not in (torch.int32, torch.int64):
            raise TypeError(f"HeatCollector(dtype): expected torch.int32 or torch.int64, got {dtype}")
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
        self._ready = sk.Event()
        W, L, C = self.window, self.num_layers, self.num_experts + 1
        dev = self._device
        self._acc = torch.zeros((W, L, C), dtype=dtype, device=dev)
        self._ctrl = torch.tensor([1, 0], dtype=torch.int64).to(dev)  # [enabled, pass index]
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
            f" reduce={self.reduce!r}, world_size={self._world}, rank={self._rank}, device={self._device},"
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
                  0 if dtype == torch.int32 else 1, int(self._maps)]
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
                "HeatCollector: the ranks of the group disagree on (window, reduce, dtype, log2phy given) -"
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
    ) -> None:
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

        Out-of-range ids raise ``ValueError`` on the fake backend; on real devices (where the check
        would cost a host sync) they are excluded and counted in ``Heat.invalid``. Nothing is counted
        while :attr:`enabled` is False. Never blocks the host and never allocates a collector buffer;
        the input is read on the current stream, where it was made.
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
            if topk_ids.dim() == 0:
                raise ValueError("HeatCollector.record(topk_ids): expected shape (num_tokens, top_k) or (num_tokens,), got a 0-dim tensor")
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
            values, mode = topk_ids, (_ops.MODE_IDS_MAPPED if self._maps else _ops.MODE_IDS)
        torch.ops.streamkit_eplb.record(self._acc, self._ctrl, values, limit, self._log2phy, self._logcnt, layer, mode)

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
        ``window`` and clears the pass it now points at (the oldest one). Graph-safe."""
        torch.ops.streamkit_eplb.step(self._acc, self._ctrl)

    def reset(self) -> None:
        """Zero every counter of every pass: one kernel (``zero_``) on the current stream.
        The counts since the last ``collect()`` are discarded (vllm-ascend clears after a weight update)."""
        self._acc.zero_()

    def set_placement(self, phy2log: Any) -> int:
        """Record a new placement; returns its version (the previous one + 1).

        ``phy2log``: a :class:`Placement` or a physical-to-logical map ``(P,)`` / ``(L, P)``. With
        ``log2phy`` given at construction, ``P`` must be ``num_experts`` and record's mapping is
        updated in place (device buffers of fixed shape, sized for any placement of the slots, so
        captured graphs stay valid). Without it the map is metadata:
        ``P`` is ``num_experts`` (global slots) or ``world_size * num_experts`` (rank-local slots,
        rank-major). The counters are cleared (:meth:`reset`): counts of the old placement never
        reach a Heat of the new one. ``collect()`` first to keep them.
        """
        if isinstance(phy2log, Placement):
            placement = phy2log
        else:
            placement = Placement.from_phy2log(phy2log, self._placement.num_logical if self._maps else None,
                                               num_layers=self.num_layers if torch.as_tensor(phy2log).dim() == 1 else None)
        if placement.num_layers == 1 and self.num_layers > 1:
            placement = Placement.from_phy2log(placement.phy2log[0], placement.num_logical, num_layers=self.num_layers)
        if placement.num_layers != self.num_layers:
            raise ValueError(
                f"HeatCollector.set_placement(phy2log): {placement.num_layers} layers, the collector has {self.num_layers}"
            )
        allowed = (self.num_experts,) if self._maps else (self.num_experts, self._world * self.num_experts)
        if placement.num_physical not in allowed:
            raise ValueError(
                f"HeatCollector.set_placement(phy2log): {placement.num_physical} physical slots; expected"
                f" {' or '.join(map(str, allowed))} (num_experts{'' if self._maps else ', or world_size * num_experts'})"
            )
        if self._maps:
            if placement.num_logical != self._placement.num_logical:
                raise ValueError(
                    f"HeatCollector.set_placement(phy2log): {placement.num_logical} logical experts, the"
                    f" collector maps {self._placement.num_logical}"
                )
            padded = self._padded_log2phy(placement)
            self._log2phy.copy_(padded.to(self._device))
            self._logcnt.copy_(placement.logcnt.to(self._device))
        self._placement = placement
        self._version += 1
        self.reset()
        return self._version

    def _padded_log2phy(self, placement: Placement) -> torch.Tensor:
        width = self.num_experts - placement.num_logical + 1  # the most replicas one expert can have
        padded = torch.full((self.num_layers, placement.num_logical, width), -1, dtype=torch.int64)
        padded[:, :, : placement.log2phy.shape[2]] = placement.log2phy
        return padded

    # -- collect ----------------------------------------------------------------------------
    def _host_buffer(self, numel: int) -> torch.Tensor:
        # Pinned, so the device-to-host copy is really asynchronous (into pageable memory it is
        # synchronous, on CUDA and on fake alike).
        if self._is_fake:  # (the fake device has no pinned allocator behind pin_memory=True)
            return torch.empty((numel,), dtype=self._acc.dtype).pin_memory()
        try:
            return torch.empty((numel,), dtype=self._acc.dtype, pin_memory=True)
        except RuntimeError:  # pragma: no cover - no pinned allocator for this device
            return torch.empty((numel,), dtype=self._acc.dtype)

    def collect(self, *, passes: bool = True, reset: bool = True) -> "HeatHandle":
        """Close the current window and start aggregating it; returns a :class:`HeatHandle`.

        ``passes=True``: the payload is the whole ring of ``window`` passes (``Heat.passes`` is
        ``(window, L, R, E)``, oldest first); ``passes=False``: only their sum (``Heat.passes`` is
        ``None``; vLLM's payload size). ``reset=True`` clears the counters after the copy (every
        token in exactly one Heat); ``reset=False`` leaves them (a sliding window read).
        The host does not wait. If the collective fails, ``HeatHandle.wait()`` raises and the
        counters are kept.
        """
        if not isinstance(passes, bool) or not isinstance(reset, bool):
            raise TypeError("HeatCollector.collect(passes, reset): expected bools")
        window = self._next_window
        self._next_window += 1
        rows = self.window if passes else 1
        n = rows * self.num_layers * (self.num_experts + 1)
        world_rows = self._world if self.reduce == "gather" else 1
        host = self._host_buffer(world_rows * n)
        side = self._stream
        current = sk.current_stream()
        if self._last_done is not None:
            current.wait_event(self._last_done)  # the previous collect's gather has read the staging buffer
        torch.ops.streamkit_eplb.take(self._acc, self._ctrl, self._staging, passes)
        self._ready.record(current)
        side.wait_event(self._ready)
        meta = (self._shape(rows, world_rows), passes, self._version, self._placement, self.reduce, self._world)
        with sk.switch(side):
            payload = self._staging[:n]
            source = payload
            if self._world > 1:
                try:
                    if self.reduce == "sum":
                        dist.all_reduce(payload, group=self._group)
                    else:
                        source = self._gather[: self._world * n]
                        _all_gather(source, payload, group=self._group)
                except sk.StreamkitError:
                    raise  # a streamkit error (e.g. a race report) is a bug to see now
                except Exception as exc:  # noqa: BLE001 - a dead or slow peer: report it from wait()
                    return HeatHandle(window, meta, None, None, exc)
            host.copy_(source, non_blocking=True)
            done = side.record_event()
        # the buffers were allocated on the constructing stream: keep their memory until the side
        # stream is done with them, even if the collector is freed first
        sk.record_stream(self._staging, side)
        if source is not payload:
            sk.record_stream(source, side)
        self._last_done = done
        if reset:
            self._acc.zero_()
        return HeatHandle(window, meta, host, done, None)

    def _shape(self, rows: int, world_rows: int) -> tuple[int, int, int, int]:
        return (world_rows, rows, self.num_layers, self.num_experts + 1)


class HeatHandle:
    """One pending :meth:`HeatCollector.collect`: :meth:`done` polls it, :meth:`wait` returns its Heat."""

    __slots__ = ("_meta", "_window", "_host", "_event", "_error", "_heat")

    def __init__(self, window: int, meta: Any, host: torch.Tensor | None, event: Any, error: BaseException | None) -> None:
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
            raw = self._host.view(world_rows, rows, layers, cols).to(torch.int64).permute(1, 2, 0, 3)  # (W, L, R, C)
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
