"""Graph capture: :class:`Graph` and the :class:`graph` context manager.

On cuda and npu these are thin wrappers over ``torch.cuda.CUDAGraph`` / ``torch.cuda.graph`` and
``torch.npu.NPUGraph`` / ``torch.npu.graph``; on fake, capture records kernels without running them
and enforces CUDA's capture rules (docs/semantics.md, "Graph capture").
"""

from __future__ import annotations

from typing import Any

from ._api import Stream, _expect, _same_backend
from ._backend import get_backend


class Graph:
    """A graph of captured device work, replayable (``torch.cuda.CUDAGraph``).

    ``Graph()`` makes an empty graph on the active backend (a backend without graphs raises
    :class:`~streamkit.GraphUnsupportedError`). Fill it once with ``with sk.graph(g):``; then
    :meth:`replay` launches the captured work again, on the same memory.
    """

    __slots__ = ("_backend", "_handle", "__weakref__")

    def __init__(self) -> None:
        backend = get_backend()
        self._handle = backend.new_graph()
        self._backend = backend

    def replay(self) -> None:
        """Launch the captured work on the current stream, reading and writing the memory it read and
        wrote at capture (inputs: the tensors it read; outputs: tensors of its private pool).

        The replay is ordered after all work issued to the current stream before the call, and all
        work issued to that stream after the call runs after the whole replay. Replays of one graph
        run one after another (``cudaGraphLaunch``). The host is not blocked: read outputs after a
        synchronization (a blocking copy on the same stream, ``synchronize()``), and update inputs
        in place on the replay's stream or after it synchronized. Raises
        :class:`~streamkit.GraphError` when nothing was captured successfully."""
        self._backend.graph_replay(self._handle)

    def reset(self) -> None:
        """Drop the captured work and release the graph's private memory pool (tensors of the pool
        that are still referenced keep their memory on fake; on CUDA the pool's memory may then be
        reused). The graph can then be captured again."""
        self._backend.graph_reset(self._handle)

    def pool(self) -> Any:
        """An opaque token for this graph's memory pool: ``sk.graph(other, pool=g.pool())`` hints that
        ``other``'s capture may share it (a hint: fake gives every graph its own pool)."""
        return self._backend.graph_pool(self._handle)

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def native(self) -> Any:
        """The framework's graph (``torch.cuda.CUDAGraph``, ``torch.npu.NPUGraph``); the fake graph on fake."""
        return self._handle

    def __repr__(self) -> str:
        return f"<streamkit.Graph {self._handle!r} backend={self._backend.name}>"


class graph:
    """``with sk.graph(g, stream=None, pool=None):`` capture the work issued inside the block into
    ``g`` (``torch.cuda.graph``).

    On entry the device is synchronized (``torch.cuda.graph`` does the same), then ``stream``
    becomes the current stream: the capture stream. ``None`` takes the backend's own side stream;
    capture on the default stream is refused, as by PyTorch ("CUDA graphs must be captured on a
    non-default stream"). Work issued to the capture stream, and to any stream that joins the
    capture by waiting on it (a fork), is recorded, not run; forks must be joined back (the capture
    stream waits on them) before the block ends. Tensors allocated by captured work come from the
    graph's private memory pool: they hold garbage until a replay writes them (poison on fake), and
    the pool keeps their memory for as long as the graph lives, at the same addresses for every
    replay. A host synchronization while capturing, a wait on an event recorded outside the capture
    or an unjoined fork raises (on fake :class:`~streamkit.GraphCaptureError`; on cuda/npu the
    runtime's ``RuntimeError``), and the graph stays empty. On exit the previous stream is current again.
    """

    __slots__ = ("_graph", "_stream", "_pool", "_context")

    def __init__(self, g: Graph, stream: Stream | None = None, pool: Any = None) -> None:
        if not isinstance(g, Graph):
            raise TypeError(
                f"graph(g): expected a streamkit.Graph, got {type(g).__module__}.{type(g).__qualname__}"
                " (create it with sk.Graph())"
            )
        if stream is not None:
            _expect(stream, Stream, "graph(stream)")
            _same_backend(g, stream, "graph(stream)")
        self._graph = g
        self._stream = stream
        self._pool = pool
        self._context: Any = None

    def __enter__(self) -> Graph:
        g = self._graph
        stream = None if self._stream is None else self._stream._handle
        self._context = g._backend.graph_capture(g._handle, stream, self._pool)
        self._context.__enter__()
        return g

    def __exit__(self, *exc: Any) -> Any:
        context, self._context = self._context, None
        return context.__exit__(*exc)
