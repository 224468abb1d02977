"""Random race-free programs for the deferred schedules (``random_race_free_program(seed)``).

Each program runs on the default stream and two side streams over a few float buffers, and orders
every pair of conflicting accesses the way a correct program must: the generator keeps its own
vector clocks (the model of docs/semantics.md: stream clocks, events, and the host clock that host
syncs advance), and before an access that conflicts with an earlier unordered one it makes the
accessing stream wait, with ``wait_stream`` or an event (``record`` + ``wait_event``). A block
freed while another stream's use of it is unordered gets ``record_stream`` (or is kept alive to
the end). So every schedule must compute the eager run's values, and the detector must see no race.

What the programs do: in-place and out-of-place ops, writes through views, fresh ``empty``
allocations (which the allocator recycles from freed blocks) filled by ``copy_``, frees,
``record_stream``, host reads (``.item()``, ``.cpu()``), ``non_blocking`` device-to-host copies
read only after a sync that covers them (stream, event or device synchronize), ``non_blocking``
host-to-device copies from pageable memory, and event/stream waits.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import torch

import streamkit as sk

N = 16  # elements per buffer
STREAMS = 3
BUFFERS = 4


class _Model:
    """The generator's happens-before model: a clock per stream and the host clock."""

    def __init__(self) -> None:
        self.vc = [[0] * STREAMS for _ in range(STREAMS)]
        self.host = [0] * STREAMS

    def eff(self, s: int) -> list[int]:
        return [max(a, b) for a, b in zip(self.vc[s], self.host)]

    def issue(self, s: int) -> tuple[int, int]:
        self.vc[s][s] += 1
        return (s, self.vc[s][s])

    def ordered(self, access: tuple[int, int], s: int) -> bool:
        t, n = access
        return t == s or self.eff(s)[t] >= n

    def wait(self, s: int, clock: list[int]) -> None:
        self.vc[s] = [max(a, b) for a, b in zip(self.vc[s], clock)]

    def host_waits(self, clock: list[int]) -> None:
        self.host = [max(a, b) for a, b in zip(self.host, clock)]


class _Buf:
    __slots__ = ("t", "alloc", "write", "reads", "uses")

    def __init__(self, t: torch.Tensor, alloc: int, write: tuple[int, int]) -> None:
        self.t = t
        self.alloc = alloc
        self.write = write  # the last write (stream, n)
        self.reads: list[tuple[int, int]] = []  # reads since that write
        self.uses: list[tuple[int, int]] = [write]  # every access (what the free must be ordered after)


def random_race_free_program(seed: int, steps: int = 24, drop_waits: float = 0.0) -> Callable[[], Any]:
    """A program (a function of no arguments returning host values) drawn from ``seed``.

    ``drop_waits``: the probability of leaving out each wait the program needs (a control: such
    programs race, and the schedules should find wrong values)."""

    def fn() -> Any:
        rng = random.Random(seed)
        m = _Model()
        streams = [sk.current_stream()] + [sk.Stream() for _ in range(STREAMS - 1)]
        out: list[Any] = []  # host values, in program order
        keep: list[torch.Tensor] = []  # blocks kept alive to the end instead of record_stream
        pending_host: list[tuple[torch.Tensor, int, tuple[int, int]]] = []  # non_blocking D2H: (dst, stream, access)
        bufs: list[_Buf] = []
        for i in range(BUFFERS):
            t = torch.full((N,), float(i + 1), device=sk.device())
            bufs.append(_Buf(t, 0, m.issue(0)))

        def order(s: int, access: tuple[int, int]) -> None:
            """Make stream ``s`` ordered after ``access`` (a correct program's wait)."""
            if m.ordered(access, s):
                return
            if drop_waits and rng.random() < drop_waits:
                return  # (the model doesn't learn the order: later accesses may still race)
            t = access[0]
            if rng.random() < 0.5:
                streams[s].wait_stream(streams[t])
            else:
                event = sk.Event()
                event.record(streams[t])
                streams[s].wait_event(event)
            m.wait(s, m.eff(t))

        def read(b: _Buf, s: int) -> None:
            order(s, b.write)

        def write(b: _Buf, s: int) -> None:
            order(s, b.write)
            for r in b.reads:
                order(s, r)

        def did_read(b: _Buf, access: tuple[int, int]) -> None:
            b.reads.append(access)
            b.uses.append(access)

        def did_write(b: _Buf, access: tuple[int, int]) -> None:
            b.write = access
            b.reads = []
            b.uses.append(access)

        def free(b: _Buf) -> None:
            """Drop ``b``: uses on other streams not ordered before its allocation stream's future
            work are covered by record_stream, or the block is kept alive."""
            others = {a[0] for a in b.uses if a[0] != b.alloc and not m.ordered(a, b.alloc)}
            if others:
                if rng.random() < 0.7:
                    for t in sorted(others):
                        b.t.record_stream(streams[t])
                else:
                    keep.append(b.t)

        def host_sync(access_stream: int) -> None:
            """A sync that covers stream ``access_stream``'s work so far."""
            kind = rng.randrange(3)
            if kind == 0:
                streams[access_stream].synchronize()
                m.host_waits(m.eff(access_stream))
            elif kind == 1:
                event = sk.Event()
                event.record(streams[access_stream])
                event.synchronize()
                m.host_waits(m.eff(access_stream))
            else:
                sk.synchronize()
                for s in range(STREAMS):
                    m.host_waits(m.eff(s))

        for _ in range(steps):
            s = rng.randrange(STREAMS)
            op = rng.randrange(10)
            i, j = rng.randrange(BUFFERS), rng.randrange(BUFFERS)
            a, b = bufs[i], bufs[j]
            with sk.switch(streams[s]):
                if op == 0 or (op == 1 and i == j):  # in place, one buffer
                    write(a, s)
                    a.t.mul_(rng.choice((2.0, 0.5, -1.0)))
                    did_write(a, m.issue(s))
                elif op == 1:  # in place, reading another
                    write(a, s)
                    read(b, s)
                    a.t.add_(b.t, alpha=0.25)
                    acc = m.issue(s)
                    did_write(a, acc)
                    did_read(b, acc)
                elif op == 2:  # out of place: a fresh buffer on s replaces a
                    read(a, s)
                    read(b, s)
                    fresh = a.t + b.t * 0.5  # (two kernels: the temporary is s's own)
                    m.issue(s)
                    acc = m.issue(s)
                    did_read(a, acc)
                    did_read(b, acc)
                    free(a)
                    bufs[i] = _Buf(fresh, s, acc)
                elif op == 3:  # a write through a view
                    write(a, s)
                    lo = rng.randrange(N - 4)
                    a.t[lo:lo + 4].add_(float(rng.randrange(1, 5)))
                    did_write(a, m.issue(s))
                elif op == 4:  # an empty allocation (recycled), filled by copy_
                    read(b, s)
                    e = torch.empty(N, device=sk.device())
                    e.copy_(b.t)
                    acc = m.issue(s)
                    did_read(b, acc)
                    if i != j:
                        free(a)
                        bufs[i] = _Buf(e, s, acc)
                    else:  # (replace nothing: e is a temporary, freed on s)
                        out.append(float(e.sum().item()))
                        m.issue(s)
                        m.host_waits(m.eff(s))
                elif op == 5:  # a host read: .item() or .cpu()
                    read(a, s)
                    if rng.random() < 0.5:
                        out.append(float(a.t.sum().item()))
                        m.issue(s)
                    else:
                        out.append(a.t.cpu())
                    acc = m.issue(s)  # (the host's read counts as one more access)
                    did_read(a, acc)
                    m.host_waits(m.eff(s))
                elif op == 6:  # a non_blocking D2H copy, read after a later sync
                    read(a, s)
                    dst = a.t.to("cpu", non_blocking=True)
                    acc = m.issue(s)
                    did_read(a, acc)
                    pending_host.append((dst, s, acc))
                elif op == 7 and pending_host:  # sync, then read a pending D2H destination
                    dst, t, _ = pending_host.pop(0)
                    host_sync(t)
                    out.append(dst.clone())
                elif op == 8:  # a non_blocking H2D copy from pageable memory into a
                    write(a, s)
                    src = torch.arange(N, dtype=torch.float32) * float(rng.randrange(1, 4))
                    a.t.copy_(src, non_blocking=True)
                    src.fill_(-7.0)  # (staged at issue: the copy doesn't see this)
                    did_write(a, m.issue(s))
                else:  # a fresh result read on another stream later: a.sum() into a new buffer
                    read(a, s)
                    total = a.t.sum().reshape(1).expand(N).contiguous()
                    m.issue(s)
                    m.issue(s)
                    acc = m.issue(s)
                    did_read(a, acc)
                    free(b)
                    bufs[j] = _Buf(total, s, acc)
        for dst, t, _ in pending_host:
            host_sync(t)
            out.append(dst.clone())
        for s in range(1, STREAMS):
            streams[0].wait_stream(streams[s])
        out.extend(buf.t.cpu() for buf in bufs)
        return out

    return fn
