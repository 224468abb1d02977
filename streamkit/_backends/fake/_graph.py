"""Graph capture on the fake device: capture records kernels without running them, replay runs them
again on the same memory as ordinary tracked kernels.

The CUDA rules enforced here, with their sources, are in docs/semantics.md ("Graph capture").

Capture reuses the deferred machinery (:mod:`._deferred`): a captured kernel gets the outputs'
layout from the cached meta evaluation (:func:`~._deferred.layout`), and its fresh outputs are
poisoned placeholders (memory of the graph's private pool) that every replay fills. Nothing a
captured kernel touches is recorded in the access tables at capture: it hasn't run.

Replay issues each captured kernel through the launch pipeline (:class:`._pipeline.OpCall`: its
launch is ``Engine.launch``) on one *replay stream* per captured stream (made once per graph), so
the detector checks every replay as ordinary work and a deferred schedule queues it like any
kernel. The replay streams start after all work issued to the replay's
stream before ``replay()`` and after the previous replay of the graph (``cudaGraphLaunch``: "each
launch is ordered behind both any previous work in stream and any previous launches of
graphExec"); captured waits are replayed as clock merges between them, and the replay's stream then
waits for all of them.
"""

from __future__ import annotations

import functools
import weakref
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import torch

from ..._errors import GraphCaptureError, GraphError, SessionClosedError
from . import _captured_copies, _collectives, _handles
from ._clocks import StreamState, merge
from ._deferred import AtOnce, placeholders, refreeze, layout, poison
from ._pipeline import OpCall
from ._report import label_stream, stream_description
from ._sites import short_location, site_here, user_stack
from ._tracking import WRITE, Kernel, MemoryRange

if TYPE_CHECKING:
    from ._interface import Engine

_NoTorchFunction = torch._C.DisableTorchFunctionSubclass
_InferenceMode = torch._C._InferenceMode
_COPY = torch.ops.aten.copy_.default
_TO_COPY = torch.ops.aten._to_copy.default
#: a replayed kernel's first argument: a meta tensor when the deferred scheduler evaluates its layout
_MARK = torch.empty(0)

_SYNCS = {
    "blocking_copies": "a blocking copy to the host: .item(), .cpu(), .tolist(), print",
    "implicit_syncs": "an op whose output size depends on the data: nonzero, boolean masks, unique, bincount",
}
_CUDA_UNSUPPORTED = "CUDA: cudaErrorStreamCaptureUnsupported, 'operation not permitted when stream is capturing'"
_CUDA_ISOLATION = "CUDA: cudaErrorStreamCaptureIsolation, 'dependency created on uncaptured work in another stream'"


class PoolToken:
    """What ``Graph.pool()`` returns on fake: names the graph whose pool it is (a sharing hint only)."""

    __slots__ = ("graph",)

    def __init__(self, graph: "FakeGraph") -> None:
        self.graph = weakref.ref(graph)

    def __repr__(self) -> str:
        return "<fake graph pool>"


class _Runner:
    """What a replayed kernel calls: the captured op on the captured arguments, its fresh outputs
    copied into the graph's pool memory. Returns nothing (the outputs are the pool's tensors)."""

    __slots__ = ("call", "fills", "__weakref__")

    def __init__(self, call: Any, fills: list) -> None:
        self.call = call
        self.fills = fills

    def __call__(self, mark: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if mark.is_meta:
            return None  # the deferred scheduler asking for the layout: no outputs of its own
        # (inference mode: pool tensors made under inference_mode are updated in place)
        with _NoTorchFunction(), _InferenceMode(True):
            result = self.call(*args, **kwargs)
            for path, out in self.fills:
                value = result
                for i in path:
                    value = value[i]
                out.copy_(value)
        return None


class _Record:
    """One captured kernel: its op, role (which captured stream), runner and frozen arguments, the
    issue site, and the memory it touches: ``(weakref to StorageState, lo, hi, shape, dtype, kind)``."""

    __slots__ = ("op", "role", "runner", "args", "kwargs", "site", "touches")

    def __init__(self, op: Any, role: int, runner: _Runner, args: list, kwargs: dict, site: Any, touches: list) -> None:
        self.op, self.role, self.runner, self.args, self.kwargs, self.site, self.touches = (
            op, role, runner, args, kwargs, site, touches
        )


class CapturedKernel(Kernel):
    """The kernel object a captured op hands back (it never runs): its fresh outputs join the pool."""

    __slots__ = ("record",)


class FakeGraph:
    """A fake graph (what ``sk.Graph()`` holds on fake): the captured nodes, the private pool (the
    StorageStates of memory allocated by captured work, kept alive with the graph), and the replay
    streams. Nodes: ``("kernel", record)``, ``("mark", role, id)`` (an event recorded in the capture),
    ``("wait", role, id)`` (a wait on it), ``("join", role, source_role)`` (``wait_stream``)."""

    def __init__(self, session: "Engine", site: Any) -> None:
        self.session = session
        self.site = site
        self.nodes: list = []
        self.pool: list = []
        self.roles = 0
        self.captured = False
        self.streams: list[StreamState] = []
        self.labels: list[str] = []  # (the replay streams' descriptions in reports)

    def __repr__(self) -> str:
        state = f"{sum(1 for n in self.nodes if n[0] == 'kernel')} kernels" if self.captured else "empty"
        return f"<fake graph {state}>"

    # -- replay ------------------------------------------------------------------------------
    def _replay_streams(self, session: "Engine") -> list[StreamState]:
        where = user_stack(self.site)
        location = short_location(where[-1] if where else None)
        while len(self.streams) < self.roles:
            role = len(self.streams)
            state = _handles.new_stream(session, 0, self.site).state
            what = "its capture stream" if role == 0 else f"fork #{role}"
            self.labels.append(f"the replay of the graph made at {location} ({what})")
            self.streams.append(state)
        return self.streams

    def replay(self, session: "Engine", stream: StreamState, site: Any) -> None:
        if session is not self.session:
            raise SessionClosedError(
                f"this graph was captured in another fake session ({self.session!r}); capture it again in this one"
            )
        if not self.captured:
            raise GraphError("Graph.replay() without a preceding successful capture: capture it with `with sk.graph(g):` first")
        if session.capture is not None:
            _refuse_replay_in_capture(session.capture, stream)
        streams = self._replay_streams(session)
        # A fix names the stream replay() ran on: ordering it orders the replay (it starts after
        # that stream's earlier work, and that stream's later work waits for all of it).
        on = stream_description(stream)[1]
        for label, state in zip(self.labels, streams):
            label_stream(state, label, on, "graph")
        with session.lock:
            start = list(stream.clock)
            for s in streams:
                merge(start, s.clock)  # after the previous replay of this graph
            for s in streams:
                merge(s.clock, start)
        marks: dict = {}
        for node in self.nodes:
            kind = node[0]
            if kind == "kernel":
                # the captured op again, on the captured memory: an ordinary kernel (a deferred
                # schedule queues it); its first argument says whether it runs or is evaluated for layout
                call = _replayed(session, node[1], streams, site)
                call.args = [_MARK, *call.args]
                call.launch()
                _captured_copies.replayed(node[1].runner, call)  # (a copy from a pinned buffer)
            elif kind == "collective":
                # issued and run now, after what it is ordered after, as a collective is (every
                # rank replays its graph's collectives in the captured order, so peers agree)
                _replayed(session, node[1], streams, site).run_now()
            elif kind == "mark":
                marks[node[2]] = list(streams[node[1]].clock)
            else:
                with session.lock:
                    merge(streams[node[1]].clock, marks[node[2]] if kind == "wait" else streams[node[2]].clock)
        with session.lock:
            for s in streams:
                merge(stream.clock, s.clock)  # later work on the replay's stream waits for the whole graph

    def reset(self) -> None:
        self.nodes = []
        self.pool = []  # (the pool's memory: freed now, as far as no tensor still refers to it)
        self.roles = 0
        self.captured = False


def _refuse_replay_in_capture(capture: "Capture", stream: StreamState) -> None:
    """``Graph.replay()`` while ``capture`` is underway, on ``stream``: always a GraphCaptureError.

    CUDA: ``CUDAGraph::replay`` is ``cudaGraphLaunch(graph_exec_, getCurrentCUDAStream())``, and a
    graph launch into a capturing stream fails with cudaErrorStreamCaptureUnsupported ("operation not
    permitted when stream is capturing"), which invalidates the capture (measured on an H200, CUDA
    12.6 runtime: onnxruntime PR 32081; NVIDIA Warp's ``capture_launch`` documents the same failure).
    Nesting a graph needs the graph API (a child graph node, ``cudaGraphAddChildGraphNode``), which
    ``torch.cuda.CUDAGraph`` doesn't use. On the default stream the legacy-stream rule fails first.
    A replay on a stream outside the capture is not modelled during a capture: refused, the capture
    left valid."""
    if stream in capture.roles:
        capture._fail(
            f"Graph.replay() on {_stream_name(stream)}, which is capturing: CUDAGraph::replay launches the graph with"
            f" cudaGraphLaunch on the current stream, and a graph launch can't be captured ({_CUDA_UNSUPPORTED}); a"
            " graph can't replay another inside its capture: replay the other graph before the `with sk.graph(...)`"
            " block or after it (or capture its work into this graph directly)"
        )
    capture._role("Graph.replay()", stream)  # (on the default stream: cudaErrorStreamCaptureImplicit)
    raise GraphCaptureError(
        f"Graph.replay() on {_stream_name(stream)} while a graph capture is underway on other streams: the fake device"
        " doesn't model a graph launch on a stream outside the capture during it; replay the graph before the"
        " `with sk.graph(...)` block or after it"
    )


def _replayed(session: "Engine", record: "_Record", streams: list[StreamState], site: Any) -> OpCall:
    """The op call that replays ``record`` on its replay stream: its captured arguments, and the
    memory it touches as accesses (GraphError if a tensor it used has been freed)."""
    call = OpCall(session, record.op, record.runner, site=site, stream=streams[record.role])
    call.args, call.kwargs = record.args, record.kwargs
    call.accesses = [
        (MemoryRange(lo, hi, _alive(ref, record, shape, dtype), shape, dtype), access)
        for ref, lo, hi, shape, dtype, access in record.touches
    ]
    return call


def _alive(ref: Any, record: "_Record", shape: Any, dtype: torch.dtype) -> Any:
    """The StorageState a captured access refers to, or GraphError if its tensor was freed."""
    state = ref()
    if state is None or state.session is None:  # (a freed block's state may sit in its stream's pool)
        raise GraphError(
            f"Graph.replay(): a tensor of shape {tuple(shape)}, dtype {dtype} that {record.op} at"
            f" {_where(record.site)} used at capture has been freed; the replay would use memory the"
            " caching allocator may have handed to another tensor (keep a graph's inputs alive as"
            " long as the graph)"
        )
    return state


def _tensors_in(value: Any, found: list) -> list:
    if isinstance(value, torch.Tensor):
        found.append(value)
    elif type(value) is list or type(value) is tuple:
        for v in value:
            _tensors_in(v, found)
    return found


def _where(site: Any) -> str:
    frames = user_stack(site) if site else []
    return short_location(frames[-1] if frames else None)


class Capture:
    """A capture underway (``session.capture``). ``roles``: captured streams -> role (0: the capture
    stream); ``vc[role]``: a vector clock over roles in captured operations, for the join check at
    the end; ``events``: events recorded in the capture -> (mark id, clock)."""

    def __init__(self, session: "Engine", graph: FakeGraph, stream: StreamState, site: Any) -> None:
        self.session = session
        self.graph = graph
        self.site = site
        self.roles: dict[StreamState, int] = {stream: 0}
        self.vc: list[list[int]] = [[0]]
        self.nodes: list = []
        self.pool: list = []
        self.events: dict = {}
        self.failed: BaseException | None = None

    def owns(self, stream: StreamState) -> bool:
        return stream in self.roles

    def _fail(self, message: str) -> None:
        error = GraphCaptureError(message + " (the capture is invalidated)")
        if self.failed is None:
            self.failed = error
        raise error

    def _check_valid(self) -> None:
        if self.failed is not None:
            raise GraphCaptureError(
                f"the capture was invalidated by an earlier error ({self.failed}); CUDA:"
                " cudaErrorStreamCaptureInvalidated. Leave the `with sk.graph(...)` block and capture again"
            )

    def _fork(self, stream: StreamState, clock: list[int]) -> int:
        role = len(self.vc)
        self.roles[stream] = role
        vc = list(clock)
        vc.extend([0] * (role + 1 - len(vc)))
        vc[role] = 1  # the fork itself: the capture stream must be ordered after it (a join)
        self.vc.append(vc)
        return role

    # -- hooks of the session -------------------------------------------------------------------
    def _role(self, op: Any, stream: StreamState) -> int | None:
        """The role of ``stream`` in the capture (None: not captured, ordinary work); the default
        stream can't be used while a capture is underway."""
        role = self.roles.get(stream)
        if role is None:
            if stream.idx == 0:
                self._fail(
                    f"{op} issued to the default stream while a graph capture is underway: the default (legacy) stream"
                    " may not be used during a capture (CUDA: cudaErrorStreamCaptureImplicit); issue it inside the"
                    " `with sk.graph(...)` block on the capture stream, or after the block"
                )
            return None
        self._check_valid()
        return role

    def launch(
        self, op: Any, call: Any, stream: StreamState, site: Any, args: Any, kwargs: Any, accesses: list, sync: Any
    ) -> tuple[Kernel, Any] | None:
        """Record a kernel issued to a captured stream: ``(kernel, outputs)``; ``None`` for a stream
        outside the capture (ordinary work)."""
        role = self._role(op, stream)
        if role is None:
            return None
        if sync is not None:
            self._fail(
                f"{op} makes the host wait for a stream that is capturing ({_SYNCS.get(sync, sync)}) at {_where(site)};"
                f" nothing has run during a capture ({_CUDA_UNSUPPORTED}). Read results after replay() and a sync"
            )
        pinned_h2d = op is _COPY and _captured_copies.capturable_h2d(args, accesses)
        if (op is _COPY and len(accesses) < 2 and not pinned_h2d) or (
            op is _TO_COPY and kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu"
        ):
            self._fail(
                f"{op}: a copy between host and device memory at {_where(site)} during a capture; the fake device"
                " doesn't capture host transfers other than non_blocking=True copies from pinned host memory into"
                " device memory (a blocking or pageable copy synchronizes the host: cudaErrorStreamCaptureUnsupported):"
                " pin the source (t.pin_memory()) and pass non_blocking=True, or copy before the capture (a static"
                " input) and out of one after replay()"
            )
        try:
            template, tensors = layout(call, args, kwargs)
        except AtOnce:
            self._fail(
                f"{op} at {_where(site)} can't be captured on the fake device: its outputs' layout isn't known without"
                " running it (no meta kernel, an output that is a view of an input, or a host value)"
            )
        fills: list = []
        result = placeholders(template, tensors, fills, ())  # poisoned memory of the graph's pool
        record = self._record("kernel", op, role, _Runner(call, fills), args, kwargs, tensors, accesses, site)
        if pinned_h2d:
            _captured_copies.captured(record.runner, args)  # (every replay reads the pinned buffer)
        kernel = CapturedKernel(op, stream, 0, site)
        kernel.record = record
        return kernel, result

    def collective(self, plan: Any, args: Any, kwargs: dict, new_args: Any, new_kwargs: dict, accesses: list, site: Any) -> Any:
        """A c10d collective issued while capturing: ``None`` when the current stream is outside the
        capture (ordinary work); else recorded (an ``async_op=False`` one) and its return value.

        CUDA graphs capture NCCL collectives on the capture stream (NCCL >= 2.9.6), and every rank
        replays its graph's collectives in the captured order. Nothing runs on the captured memory
        at capture; the value handed back (the op's ``Work``) comes from the same collective run on
        scratch copies, so every rank still takes part in it at capture, in issue order."""
        role = self._role(plan.op, self.session.current_stream())
        if role is None:
            return None
        if _collectives.is_async(plan, args, kwargs):
            self._fail(
                f"{plan.op} with async_op=True at {_where(site)} during a graph capture: the fake device captures"
                " collectives with async_op=False only (they run on the capture stream, as NCCL captures them)"
            )
        tensors = _tensors_in(list(new_args) + list(new_kwargs.values()), [])
        runner = functools.partial(_collectives.run_and_wait, plan.call)
        self._record("collective", plan.op, role, runner, new_args, new_kwargs, tensors, accesses, site)
        scratch = {id(t): t.clone() for t in tensors}
        with _NoTorchFunction():
            return _collectives.run_and_wait(
                plan.call, *refreeze(list(new_args), scratch), **{k: refreeze(v, scratch) for k, v in new_kwargs.items()}
            )

    def _record(
        self, kind: str, op: Any, role: int, runner: Any, args: Any, kwargs: Any, tensors: list, accesses: list, site: Any
    ) -> "_Record":
        """Append a captured node: the arguments frozen (views with the layout of now, as a replay
        must see them) and the memory it touches."""
        frozen = {id(t): t.as_strided(t.size(), t.stride(), t.storage_offset()) for t in tensors}
        touches = [
            (weakref.ref(t.sk_state), t.sk_lo, t.sk_hi, tuple(t.shape), t.dtype, how) for t, how in accesses if t.sk_hi > t.sk_lo
        ]
        record = _Record(
            op, role, runner, refreeze(list(args), frozen),
            {k: refreeze(v, frozen) for k, v in kwargs.items()} if kwargs else {}, site, touches,
        )
        self.nodes.append((kind, record))
        self.vc[role][role] += 1
        return record

    def adopt(self, tensor: Any, kernel: Any) -> None:
        """A tensor allocated on a captured stream: memory of the graph's pool, kept with the graph;
        written at each replay by ``kernel`` (None: an allocation, garbage until written)."""
        state = tensor.sk_state
        self.pool.append(state)
        if kernel is None:
            poison(tensor.sk_inner)
        elif type(kernel) is CapturedKernel and tensor.sk_hi > tensor.sk_lo:
            kernel.record.touches.append(
                (weakref.ref(state), tensor.sk_lo, tensor.sk_hi, tuple(tensor.shape), tensor.dtype, WRITE)
            )

    def record(self, event: Any, stream: StreamState) -> bool:
        """``event.record(stream)``: captured (True) when ``stream`` is capturing."""
        role = self.roles.get(stream)
        if role is None:
            self.events.pop(event, None)  # re-recorded outside: no longer a captured event
            return False
        self._check_valid()
        mark = len(self.nodes)
        self.nodes.append(("mark", role, mark))
        self.events[event] = (mark, list(self.vc[role]))
        return True

    def wait_event(self, stream: StreamState, event: Any, recorded: bool) -> bool:
        """``stream.wait_event(event)``: handled here (True) when either side is in the capture."""
        captured = self.events.get(event)
        role = self.roles.get(stream)
        if captured is not None:
            self._check_valid()
            mark, clock = captured
            if role is None:
                role = self._fork(stream, clock)
            else:
                merge(self.vc[role], clock)
            self.nodes.append(("wait", role, mark))
            return True
        if role is not None and recorded:
            self._fail(
                f"the capturing stream {_stream_name(stream)} waits on an event recorded outside the capture; a"
                f" captured graph may depend only on work inside it ({_CUDA_ISOLATION}). Make the inputs ready before"
                " the capture (sk.graph synchronizes the device on entry), or record the event inside the capture"
            )
        return False

    def wait_stream(self, stream: StreamState, source: StreamState) -> bool:
        """``stream.wait_stream(source)``: handled here (True) when either side is in the capture."""
        source_role = self.roles.get(source)
        role = self.roles.get(stream)
        if source_role is not None:
            self._check_valid()
            if role is None:
                role = self._fork(stream, self.vc[source_role])
            else:
                merge(self.vc[role], self.vc[source_role])
            self.nodes.append(("join", role, source_role))
            return True
        if role is not None:
            self._fail(
                f"the capturing stream {_stream_name(stream)} waits for stream {_stream_name(source)}, which is not part"
                f" of the capture ({_CUDA_ISOLATION}); a captured graph may depend only on work inside it. Fork"
                f" {_stream_name(source)} from the capture stream first ({_stream_name(source)}.wait_stream(capture"
                " stream)) or order it before the capture"
            )
        return False

    def host_sync(self, what: str, stream: StreamState | None = None, event: Any = None) -> None:
        """A host synchronization: refused when it waits on the capture (``stream``/``event`` in it,
        or the whole device)."""
        if stream is None and event is None:
            self._fail(
                f"{what} while a graph capture is underway: the device includes a capturing stream ({_CUDA_UNSUPPORTED});"
                " synchronize before the `with sk.graph(...)` block or after it"
            )
        if stream is not None and stream in self.roles:
            self._fail(f"{what} on a stream that is capturing ({_CUDA_UNSUPPORTED}); nothing has run during a capture")
        if event is not None and event in self.events:
            self._fail(
                f"{what} on an event last recorded in a capturing stream (CUDA: cudaErrorCapturedEvent, 'operation not"
                " permitted on an event last recorded in a capturing stream')"
            )

    # -- the end -----------------------------------------------------------------------------
    def finish(self) -> None:
        """The block ended: check that every fork rejoined the capture stream, then hand the graph
        its nodes and pool."""
        self._check_valid()
        origin = self.vc[0]
        names = {role: stream for stream, role in self.roles.items()}
        for role in range(1, len(self.vc)):
            done = self.vc[role][role]
            if role >= len(origin) or origin[role] < done:
                self._fail(
                    f"stream {_stream_name(names[role])} joined the capture (it waited on the capture stream) but the"
                    " capture stream never waited for its last captured work before the capture ended (CUDA:"
                    " cudaErrorStreamCaptureUnjoined, 'capturing stream has unjoined work'); add"
                    f" `sk.current_stream().wait_stream({_code_name(names[role])})` at the end of the block"
                )
        graph = self.graph
        graph.nodes = self.nodes
        graph.pool = self.pool
        graph.roles = len(self.vc)
        graph.captured = True


def _stream_name(stream: StreamState) -> str:
    from ._report import stream_description

    return stream_description(stream)[0]


def _code_name(stream: StreamState) -> str:
    from ._report import stream_description

    return stream_description(stream)[1]


def _capture_stream(session: "Engine") -> Any:
    """``sk.graph``'s own side stream in ``session`` (``torch.cuda.graph.default_capture_stream``)."""
    handle = getattr(session, "graph_stream", None)
    if handle is None or handle.home is not session:
        handle = _handles.new_stream(session, 0, ())
        label_stream(handle.state, "sk.graph's capture stream", "<sk.graph's capture stream>", "graph")
        session.graph_stream = handle
    return handle


@contextmanager
def capture(session: "Engine", graph: FakeGraph, stream: Any, pool: Any, site: Any) -> Iterator[None]:
    """``with sk.graph(g, stream, pool)`` on fake (see :class:`streamkit.graph`)."""
    if not isinstance(graph, FakeGraph):
        raise TypeError(f"graph capture: expected a fake graph, got {type(graph).__name__}")
    if graph.session is not session:
        raise SessionClosedError(f"this graph was made in another fake session ({graph.session!r}); make a new sk.Graph()")
    if pool is not None and not isinstance(pool, PoolToken):
        raise TypeError(f"graph(pool): expected a token from another graph's pool() on fake, got {type(pool).__name__}")
    if graph.captured:
        raise GraphError(
            "This graph already owns a captured graph. To capture a new graph, create a new sk.Graph() (or call reset())"
        )
    if session.capture is not None:
        raise GraphCaptureError(
            "a graph capture is already underway in this fake session; capture one graph at a time"
            " (torch.cuda.graph documents the same restriction)"
        )
    session.host_sync_all()  # torch.cuda.graph.__enter__ synchronizes the device first
    if stream is None:
        stream = _capture_stream(session)
    state = _handles.resolve(stream, session)
    if state.idx == 0:
        raise GraphCaptureError(
            "CUDA graphs must be captured on a non-default stream. (However, after capture, it's ok to replay them on"
            " the default stream.) Pass stream=sk.Stream() or leave stream=None (sk.graph's own side stream)"
        )
    current = Capture(session, graph, state, site)
    session.capture = current
    context = session.stream_context(state)
    context.__enter__()
    try:
        yield
    except BaseException:
        session.capture = None  # the capture is abandoned: the graph stays empty
        raise
    else:
        session.capture = None
        current.finish()
    finally:
        context.__exit__(None, None, None)


def new_graph(session: "Engine") -> FakeGraph:
    return FakeGraph(session, site_here())


def replay(session: "Engine", graph: FakeGraph, stream: StreamState) -> None:
    graph.replay(session, stream, site_here() if session.tracked else None)
