"""The expert-heat collector: per-layer counters updated on a side stream, gathered without a host sync.

Stream protocol (every step is a rule the fake backend checks):

* ``record``: the side stream waits for the current stream (the counts were made there), then one
  in-place kernel adds them into the layer's row of the counter buffer; the input is handed to
  ``sk.record_stream`` so its memory is not reused before the side stream has read it. Nothing
  joins back to the current stream and the host never waits.
* ``collect``: the side stream waits for the current stream, gathers the counter buffer into a
  gather buffer allocated once, starts a non-blocking copy into a fresh host tensor, clears the
  counters and records an event, all on the side stream, in that order. So a record issued before
  ``collect`` lands in this window and one issued after it in the next, and every token in exactly one.
* ``HeatHandle.wait``: synchronizes the host with that event only, then builds the :class:`Heat`.

Buffer layout: one ``(num_layers, num_experts + 3)`` int64 device buffer. Column 0 counts ``topk_ids``
below ``-1`` (invalid), column 1 padding (``-1``), columns ``[2, E + 2)`` the experts and column
``E + 2`` ids ``>= E`` (invalid). ``topk_ids`` are mapped to those columns by one ``searchsorted``
over the boundaries ``[-1, 0, ..., E]`` and added with one ``scatter_add_``: no host sync, no data-
dependent shapes (``bincount`` synchronizes on CUDA, and so does ``index_put_(accumulate=True)`` in
older torch releases, for its range check).
"""

from __future__ import annotations

import operator
import time
from typing import Any

import torch
import torch.distributed as dist

import streamkit as sk

from ._heat import Heat

__all__ = ["CollectError", "HeatCollector", "HeatHandle"]

# torch >= 2.10 renamed all_gather_into_tensor (now deprecated) to all_gather_single; same c10d op.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


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
_FIRST_EXPERT = 2  # column of expert 0 in the counter buffer (see the module docstring)


class HeatCollector:
    """Collects per-layer MoE expert load on a side stream; see the module docstring for the protocol.

    ``HeatCollector(num_layers, num_experts, *, group=None, stream=None)`` allocates its buffers on
    the active streamkit backend's current device. ``group`` is a ``torch.distributed`` process
    group: every rank of it must build a collector with the same ``(num_layers, num_experts)``
    (checked at construction with one small collective). Without a group the world size is 1 and no
    collective ever runs. ``stream`` is the side stream to use (default: a new ``sk.Stream()``).
    """

    def __init__(self, num_layers: int, num_experts: int, *, group: Any = None, stream: sk.Stream | None = None) -> None:
        self.num_layers = _positive_int(num_layers, "num_layers")
        self.num_experts = _positive_int(num_experts, "num_experts")
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
        self._window = 0
        self._ready = sk.Event()  # re-recorded on the current stream by every record/collect
        L, E, F = self.num_layers, self.num_experts, _FIRST_EXPERT
        # Everything the collector owns is allocated and used on the side stream only.
        with sk.switch(stream):
            self._acc = torch.zeros((L, E + 3), dtype=torch.int64, device=self._device)
            self._gather = (
                torch.empty((self._world * L, E + 3), dtype=torch.int64, device=self._device)
                if self._world > 1
                else None
            )
            # per-layer views, made once: record() then issues only the arithmetic kernel(s)
            self._rows = [self._acc[layer] for layer in range(L)]  # (E + 3,)
            self._expert_rows = [row[F : F + E] for row in self._rows]  # (E,)
            self._expert_tails = [row[F + 1 : F + E] for row in self._rows]  # (E - 1,): cumulative counts
            self._one = torch.ones((1,), dtype=torch.int64, device=self._device)
            bounds = torch.arange(-1, E + 1, dtype=torch.int64, device=self._device)  # -1, 0, ..., E
            self._bounds = {torch.int64: bounds, torch.int32: bounds.to(torch.int32)}
            if self._world > 1:
                self._check_peers()

    # -- properties -------------------------------------------------------------------------
    @property
    def stream(self) -> sk.Stream:
        """The side stream all of the collector's work runs on."""
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

    def __repr__(self) -> str:
        return (
            f"HeatCollector(num_layers={self.num_layers}, num_experts={self.num_experts},"
            f" world_size={self._world}, rank={self._rank}, device={self._device}, next_window={self._window})"
        )

    # -- construction check -----------------------------------------------------------------
    def _check_peers(self) -> None:
        """One small all_gather of (num_layers, num_experts): disagreeing ranks fail here, all of them."""
        mine = torch.tensor([self.num_layers, self.num_experts], dtype=torch.int64).to(self._device)
        everyone = torch.empty((2 * self._world,), dtype=torch.int64, device=self._device)
        _all_gather(everyone, mine, group=self._group)
        shapes = [tuple(pair) for pair in everyone.cpu().view(self._world, 2).tolist()]
        if any(shape != shapes[self._rank] for shape in shapes):
            listing = ", ".join(f"rank {r}: {s}" for r, s in enumerate(shapes))
            raise ValueError(
                "HeatCollector: the ranks of the group disagree on (num_layers, num_experts) -"
                f" {listing}; every rank must construct its collector with the same shape"
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
    ) -> None:
        """Add one step's expert load of ``layer`` to the current window (on the side stream).

        Exactly one of:

        * ``counts``: integer tensor ``(num_experts,)``, tokens per expert (vllm-ascend's
          ``expert_tokens``); with ``cumulative=True`` it is a running sum (group list type 0) and is
          diffed back to per-expert counts.
        * ``topk_ids``: integer tensor of any shape (typically ``(num_tokens, top_k)``), the expert
          id each token was routed to; ``-1`` is padding and is excluded. Ids outside
          ``[-1, num_experts)`` raise ``ValueError`` on the fake backend; on real devices (where the
          check would cost a host sync) they are excluded and counted in ``Heat.invalid``.

        Never blocks the host and never makes the current stream wait. The tensor must not be
        written again before the side stream has read it (make a new one per step, as engines do, or
        order the writer after ``collector.stream``).
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
        if counts is not None:
            self._check_tensor("counts", counts)
            if tuple(counts.shape) != (E,):
                raise ValueError(
                    f"HeatCollector.record(counts): expected shape ({E},) (one count per expert),"
                    f" got {tuple(counts.shape)}"
                )
            if self._is_fake:
                self._validate_counts_fake(layer, counts, cumulative)
            tensor = counts
        else:
            if cumulative:
                raise TypeError("HeatCollector.record(cumulative): only applies to counts, not to topk_ids")
            self._check_tensor("topk_ids", topk_ids)
            if topk_ids.dtype not in _ID_DTYPES:
                raise TypeError(
                    f"HeatCollector.record(topk_ids): expected an int32 or int64 tensor (-1 is padding),"
                    f" got {topk_ids.dtype}"
                )
            if self._is_fake:
                self._validate_topk_fake(layer, topk_ids)
            tensor = topk_ids

        side = self._stream
        self._ready.record(sk.current_stream())
        side.wait_event(self._ready)
        with sk.switch(side):
            if counts is not None:
                self._expert_rows[layer].add_(counts)
                if cumulative and E > 1:
                    self._expert_tails[layer].sub_(counts[:-1])
            else:
                # id -> column: < -1 -> 0 (invalid), -1 -> 1 (padding), e -> e + 2, >= E -> E + 2 (invalid)
                column = torch.searchsorted(self._bounds[topk_ids.dtype], topk_ids.reshape(-1), right=True)
                self._rows[layer].scatter_add_(0, column, self._one.expand(column.numel()))
        sk.record_stream(tensor, side)

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

    def _validate_topk_fake(self, layer: int, topk_ids: torch.Tensor) -> None:
        from streamkit import fake

        values = fake.peek(topk_ids)
        if values.numel() == 0:
            return
        bad = (values < -1) | (values >= self.num_experts)
        if bool(bad.any()):
            wrong = sorted(set(values[bad].tolist()))[:8]
            raise ValueError(
                f"HeatCollector.record(topk_ids) for layer {layer}: expert ids must lie in"
                f" [-1, {self.num_experts}) (-1 is padding), got {wrong}"
            )

    # -- collect ----------------------------------------------------------------------------
    def _host_buffer(self) -> torch.Tensor:
        shape = (self._world * self.num_layers, self.num_experts + 3)
        if self._is_fake:  # (a non-blocking copy into pageable memory is synchronous, as on CUDA)
            return torch.empty(shape, dtype=torch.int64).pin_memory()
        if not self._is_fake:
            try:  # pinned, so the device-to-host copy is really asynchronous
                return torch.empty(shape, dtype=torch.int64, pin_memory=True)
            except RuntimeError:  # pragma: no cover - no pinned allocator for this device
                pass
        return torch.empty(shape, dtype=torch.int64)

    def collect(self) -> "HeatHandle":
        """Close the current window and start aggregating it; returns a :class:`HeatHandle`.

        Orders the side stream after the current stream, all-gathers the counters across the group
        (into a buffer allocated once), starts a non-blocking copy to a new host tensor and clears
        the counters, all on the side stream. The host does not wait. If the collective fails, the
        error is raised by ``HeatHandle.wait()`` and the counters are kept.
        """
        self._ready.record(sk.current_stream())  # (first: a closed session's stream raises here)
        window = self._window
        self._window += 1
        host = self._host_buffer()
        side = self._stream
        side.wait_event(self._ready)
        with sk.switch(side):
            source = self._acc
            if self._world > 1:
                try:
                    _all_gather(self._gather, self._acc, group=self._group)
                except sk.StreamkitError:
                    raise  # a streamkit error (e.g. a race report) is a bug to see now
                except Exception as exc:  # noqa: BLE001 - a dead or slow peer: report it from wait()
                    return HeatHandle(self, window, None, None, exc)
                source = self._gather
            host.copy_(source, non_blocking=True)
            self._acc.zero_()
            done = side.record_event()
        return HeatHandle(self, window, host, done, None)


class HeatHandle:
    """One pending :meth:`HeatCollector.collect`: :meth:`done` polls it, :meth:`wait` returns its Heat."""

    __slots__ = ("_shape", "_window", "_host", "_event", "_error", "_heat")

    def __init__(self, collector: HeatCollector, window: int, host: torch.Tensor | None, event: Any, error: BaseException | None) -> None:
        self._shape = (collector.world_size, collector.num_layers, collector.num_experts)
        self._window = window
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
            world, layers, experts = self._shape
            raw = self._host.view(world, layers, experts + 3)
            load = raw[:, :, _FIRST_EXPERT : _FIRST_EXPERT + experts].permute(1, 0, 2).contiguous()
            invalid = (raw[:, :, 0] + raw[:, :, _FIRST_EXPERT + experts]).t().contiguous()
            self._heat = Heat(load, invalid, self._window)
            self._host = None
        return self._heat

    def __repr__(self) -> str:
        state = "failed" if self._error is not None else ("done" if self._heat is not None else "pending")
        return f"<HeatHandle window={self._window} {state}>"
