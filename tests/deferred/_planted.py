"""Planted bugs of known depth for ``fake.explore`` (benchmarks/planted_bugs.py sweeps them all over
seeds; tests/deferred/test_planted.py runs a slice).

A bug's depth d is the number of orderings that must all hold for the wrong value (PCT's measure,
Burckhardt et al., ASPLOS 2010). Every bug has a race-free twin: the same program with the missing
waits added (or the event recorded at the right place), which must give the eager values under
every schedule. Programs use 2 to 4 streams and 9 to about 190 kernels (``filler`` kernels on
private buffers pad them, and take scheduling steps as real programs do).

Buffers are allocated up front: a fresh allocation inside the racing part would make the fake's
allocator run the stream's earlier kernels before it reuses a freed block (docs/exploration.md,
"Limits"), which overrides the orderings the directed runs hold.

Kinds: ``fork``/``join`` (a missing fork or join wait), ``event`` (an event recorded before the
write it should cover), ``lost`` (two unordered ``add_`` on one buffer: a lost update needs the
read-modify-write split), ``needle``/``late`` (a read wrong only between two particular writes of
several, early or late in a long run), ``conj`` (d independent stale reads that must all happen),
``flood`` (one real race among 60 benign ones), ``loop`` (a race in every iteration that only
matters in the last), ``mixed`` (a needle and one or two stale reads at once).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch

import streamkit as sk

N = 64


class Planted(NamedTuple):
    name: str
    kind: str
    depth: int
    streams: int
    make: Callable[[bool], Callable[[], Any]]  # make(fixed) -> program


def _filler(buf: torch.Tensor, n: int) -> None:
    for _ in range(n):
        buf.add_(1.0)


def fork(streams: int = 2, filler: int = 0) -> Callable[[bool], Callable[[], Any]]:
    def make(fixed: bool) -> Callable[[], Any]:
        def program():
            dev = sk.device()
            sides = [sk.Stream() for _ in range(streams - 1)]
            pad = torch.zeros(N, device=dev)
            pads = [torch.zeros(N, device=dev) for _ in sides]
            x = torch.ones(N, device=dev)
            _filler(pad, filler)
            x.mul_(3.0)  # the write the side stream must wait for
            out = []
            for side in sides:
                if fixed:
                    side.wait_stream(sk.current_stream())
                with sk.switch(side):
                    _filler(pads[sides.index(side)], filler // 4)
                    out.append(x.sum())
            for side in sides:
                sk.current_stream().wait_stream(side)
            return [o.item() for o in out] + [pad.sum().item()]
        return program
    return make


def join(streams: int = 2, filler: int = 0) -> Callable[[bool], Callable[[], Any]]:
    def make(fixed: bool) -> Callable[[], Any]:
        def program():
            dev = sk.device()
            side = sk.Stream()
            y = torch.zeros(N, device=dev)
            pad = torch.zeros(N, device=dev)
            side.wait_stream(sk.current_stream())
            with sk.switch(side):
                _filler(pad, filler)
                y.fill_(5.0)  # the side stream's result
            if fixed:
                sk.current_stream().wait_stream(side)
            total = y.sum()  # default stream reads it
            sk.current_stream().wait_stream(side)
            return total.item()
        return program
    return make


def event(filler: int = 0) -> Callable[[bool], Callable[[], Any]]:
    def make(fixed: bool) -> Callable[[], Any]:
        def program():
            dev = sk.device()
            side = sk.Stream()
            x = torch.zeros(N, device=dev)
            pad = torch.zeros(N, device=dev)
            sk.synchronize()
            done = sk.Event()
            if not fixed:
                done.record()  # recorded before the write it should cover
            _filler(pad, filler)
            x.fill_(2.0)
            if fixed:
                done.record()
            side.wait_event(done)
            with sk.switch(side):
                total = x.sum()
            sk.current_stream().wait_stream(side)
            return total.item()
        return program
    return make


def lost(streams: int = 2, filler: int = 0) -> Callable[[bool], Callable[[], Any]]:
    def make(fixed: bool) -> Callable[[], Any]:
        def program():
            dev = sk.device()
            sides = [sk.Stream() for _ in range(streams - 1)]
            acc = torch.zeros(N, device=dev)
            pads = [torch.zeros(N, device=dev) for _ in sides]
            for side in sides:
                side.wait_stream(sk.current_stream())
            acc.add_(1.0)
            prev = sk.current_stream()
            for i, side in enumerate(sides):
                if fixed:
                    side.wait_stream(prev)
                with sk.switch(side):
                    _filler(pads[i], filler)
                    acc.add_(float(2 + i))  # unordered with the default stream's add_: both read, both write
                prev = side
            for side in sides:
                sk.current_stream().wait_stream(side)
            return acc.cpu()
        return program
    return make


def needle(writes: int = 8, at: int = 3, filler: int = 0) -> Callable[[bool], Callable[[], Any]]:
    """Stream A writes ``x`` ``writes`` times (1, 1, ..., 7 at write ``at``, 1, ...); the reader
    on B (issued after all of them) is wrong only when it runs after write ``at`` and before the
    next: depth 2."""

    def make(fixed: bool) -> Callable[[], Any]:
        def program():
            dev = sk.device()
            side = sk.Stream()
            x = torch.zeros(N, device=dev)
            pad = torch.zeros(N, device=dev)
            side.wait_stream(sk.current_stream())
            for i in range(writes):
                _filler(pad, filler)
                x.fill_(7.0 if i == at else 1.0)
            if fixed:
                side.wait_stream(sk.current_stream())
            with sk.switch(side):
                seen = (x == 7.0).any()
            sk.current_stream().wait_stream(side)
            return bool(seen.item())
        return program
    return make


def conj(depth: int = 2, filler: int = 0) -> Callable[[bool], Callable[[], Any]]:
    """``depth`` side streams each read their own buffer that the default stream writes without a
    fork wait; the result is wrong only when every read is stale: depth ``depth``."""

    def make(fixed: bool) -> Callable[[], Any]:
        def program():
            dev = sk.device()
            sides = [sk.Stream() for _ in range(min(depth, 3))]
            bufs = [torch.zeros(N, device=dev) for _ in range(depth)]
            pad = torch.zeros(N, device=dev)
            sk.synchronize()
            reads = []
            for i, buf in enumerate(bufs):
                _filler(pad, filler)
                buf.fill_(1.0)
                side = sides[i % len(sides)]
                if fixed:
                    side.wait_stream(sk.current_stream())
                with sk.switch(side):
                    reads.append(buf.sum())
            for side in sides:
                sk.current_stream().wait_stream(side)
            stale = [r.item() != float(N) for r in reads]
            return all(stale)
        return program
    return make


def flood(benign: int = 60) -> Callable[[bool], Callable[[], Any]]:
    """``benign`` distinct races (each on its own source line) whose results are thrown away, then
    one that reaches the result. The program is generated (unrolled) so each benign race has a
    site of its own, as in a long real program."""

    def make(fixed: bool) -> Callable[[], Any]:
        lines = [
            "def program():",
            "    dev = sk.device()",
            "    side = sk.Stream()",
            f"    scratch = [torch.zeros(N, device=dev) for _ in range({benign})]",
            "    x = torch.ones(N, device=dev)",
            "    sink = torch.zeros(N, device=dev)",
            "    sk.synchronize()",
        ]
        for i in range(benign):
            lines.append(f"    scratch[{i}].add_(1.0)")
            lines.append(f"    with sk.switch(side): scratch[{i}].sum()  # benign {i}: read unordered, thrown away")
        lines.append("    x.mul_(2.0)")
        if fixed:
            lines.append("    side.wait_stream(sk.current_stream())")
        lines += [
            "    with sk.switch(side):",
            "        sink.copy_(x)",
            "    sk.current_stream().wait_stream(side)",
            "    return sink.sum().item()",
        ]
        filename = f"<planted flood {benign} {'fixed' if fixed else 'racy'}>"
        namespace = {"sk": sk, "torch": torch, "N": N}
        exec(compile("\n".join(lines), filename, "exec"), namespace)
        return namespace["program"]
    return make


def loop(iterations: int = 10) -> Callable[[bool], Callable[[], Any]]:
    """Each iteration: the default stream fills ``buf`` with the iteration number, the side stream
    waits on an event recorded before the fill (the wrong place) and copies ``buf`` to ``out``.
    Only the last iteration's copy survives."""

    def make(fixed: bool) -> Callable[[], Any]:
        def program():
            dev = sk.device()
            side = sk.Stream()
            buf = torch.zeros(N, device=dev)
            out = torch.zeros(N, device=dev)
            sk.synchronize()
            for it in range(iterations):
                done = sk.Event()
                if not fixed:
                    done.record()
                buf.fill_(float(it + 1))
                if fixed:
                    done.record()
                side.wait_event(done)
                with sk.switch(side):
                    out.copy_(buf)
                    out.add_(0.0)
                sk.current_stream().wait_stream(side)  # (the next fill waits for this copy)
            return out.sum().item()
        return program
    return make


def mixed(writes: int = 12, at: int = 5, stale: int = 1) -> Callable[[bool], Callable[[], Any]]:
    """A needle (depth 2) and ``stale`` more stale reads (one each) that must all hold: depth
    2 + ``stale``."""

    def make(fixed: bool) -> Callable[[], Any]:
        def program():
            dev = sk.device()
            side = sk.Stream()
            other = sk.Stream()
            x = torch.zeros(N, device=dev)
            ys = [torch.zeros(N, device=dev) for _ in range(stale)]
            side.wait_stream(sk.current_stream())
            for i in range(writes):
                x.fill_(7.0 if i == at else 1.0)
            if fixed:
                side.wait_stream(sk.current_stream())
            with sk.switch(side):
                seen = (x == 7.0).any()
            reads = []
            for y in ys:
                y.fill_(1.0)
                if fixed:
                    other.wait_stream(sk.current_stream())
                with sk.switch(other):
                    reads.append(y.sum())
            for s in (side, other):
                sk.current_stream().wait_stream(s)
            return bool(seen.item()) and all(r.item() == 0.0 for r in reads)
        return program
    return make


def late(writes: int = 60, at: int = 45) -> Callable[[bool], Callable[[], Any]]:
    return needle(writes=writes, at=at, filler=2)


def suite() -> list[Planted]:
    """The benchmark's planted bugs (33)."""
    bugs = [
        Planted("fork-2s", "fork", 1, 2, fork(2)),
        Planted("fork-3s-pad", "fork", 1, 3, fork(3, filler=40)),
        Planted("fork-4s-pad", "fork", 1, 4, fork(4, filler=120)),
        Planted("join", "join", 1, 2, join()),
        Planted("join-pad", "join", 1, 2, join(filler=150)),
        Planted("event", "event", 1, 2, event()),
        Planted("event-pad", "event", 1, 2, event(filler=100)),
        Planted("lost-2s", "lost", 1, 2, lost(2)),
        Planted("lost-3s", "lost", 1, 3, lost(3)),
        Planted("lost-pad", "lost", 1, 2, lost(2, filler=60)),
        Planted("flood-60", "flood", 1, 2, flood(60)),
        Planted("flood-20", "flood", 1, 2, flood(20)),
        Planted("loop-10", "loop", 1, 2, loop(10)),
        Planted("loop-30", "loop", 1, 2, loop(30)),
        Planted("needle-8@1", "needle", 2, 2, needle(8, 1)),
        Planted("needle-8@4", "needle", 2, 2, needle(8, 4)),
        Planted("needle-8@6", "needle", 2, 2, needle(8, 6)),
        Planted("needle-16@9-pad", "needle", 2, 2, needle(16, 9, filler=2)),
        Planted("needle-30@0", "needle", 2, 2, needle(30, 0)),
        Planted("late-60@45", "late", 2, 2, late(60, 45)),
        Planted("late-60@58", "late", 2, 2, late(60, 58)),
        Planted("late-40@20", "late", 2, 2, late(40, 20)),
        Planted("conj-2", "conj", 2, 3, conj(2)),
        Planted("conj-2-pad", "conj", 2, 3, conj(2, filler=40)),
        Planted("conj-3", "conj", 3, 4, conj(3)),
        Planted("conj-3-pad", "conj", 3, 4, conj(3, filler=30)),
        Planted("conj-3b", "conj", 3, 4, conj(3, filler=5)),
        Planted("conj-4", "conj", 4, 4, conj(4)),
        Planted("conj-4-pad", "conj", 4, 4, conj(4, filler=20)),
        Planted("conj-4b", "conj", 4, 4, conj(4, filler=4)),
        Planted("fork-2s-pad", "fork", 1, 2, fork(2, filler=100)),
        Planted("mixed-3", "mixed", 3, 3, mixed(12, 5, 1)),
        Planted("mixed-4", "mixed", 4, 3, mixed(12, 5, 2)),
    ]
    return bugs


#: the budget "Done when" gives each depth (issue 19)
BUDGET = {1: 20, 2: 20, 3: 50, 4: 200}
