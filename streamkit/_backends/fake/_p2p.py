"""Point-to-point c10d ops, ``barrier`` and ``Work.is_completed()`` on the fake backend, ordered as
ProcessGroupNCCL orders them (torch 2.13).

- ``send``/``recv``/``isend``/``irecv``: a kernel on the process group's stream for the rank pair,
  which first waits for the issuing stream (``ProcessGroupNCCL::pointToPoint``: ``key =
  getKeySendRecv(rank_, peer)``, ``syncStreams(devices, ncclEvents_[key], ncclStreams_[key])``);
  the tensors are ``recordStream``-ed on that stream (so dropping them early is no free race); the
  returned work's ``wait()`` makes the current stream wait for it (``WorkNCCL::synchronizeStream``).
  ``dist.send``/``dist.recv`` are ``isend(...).wait()``/``irecv(...).wait()``.
  Gloo's own work of a send or a recv can be waited only once: the fake waits a receive's gloo work
  at issue (so its values are there at once, as on a synchronous device) and a send's at the
  first ``wait()``; later ``wait()`` calls only order streams.
- ``batch_isend_irecv``: NCCL runs the batch inside ``_coalescing_manager`` (``ncclGroupStart``), where
  ``pointToPoint`` picks the group's own key (``batchP2P = ncclActiveGroupCounter_ > 0`` ->
  ``getKeyFromDevice``: "treat it like a collective"), so every op of the batch is on the stream of
  the group's ``async_op=True`` collectives, after the issuing stream; ``endCoalescing`` records the
  batch's one work's end event after ``ncclGroupEnd``. Gloo doesn't coalesce (the batch runs as
  separate ``isend``/``irecv``): inside the hooked ``batch_isend_irecv`` (:func:`_batched`) the fake
  puts each on the group's stream, and every work it returns ends with the whole batch.
- ``dist.barrier()``: NCCL's barrier is an all-reduce whose ``wait()``/``synchronize()`` ends with
  ``cudaStreamSynchronize(currentStream)`` (``WorkNCCL::synchronize``: "if
  (barrierTensor_.defined()) ... sync the **current stream** back to host"): on the fake, the
  barrier work's ``wait()`` is a host sync with the current stream (``stats.stream_syncs``).
- ``Work.is_completed()`` of an ``async_op=True`` collective or a p2p op: NCCL queries the work's
  end event (``WorkNCCL::isCompleted`` -> ``finishedGPUExecutionInternal``: ``ncclEndEvents_->query()``);
  a ``True`` answer orders the host after the collective, as ``Event.query()`` does.

The hooks on ``ProcessGroup`` (``barrier``, and ``_get_backend`` for the fake device, which
``batch_isend_irecv`` asks for) and on ``torch.distributed.batch_isend_irecv`` are installed when the
first fake session opens and pass straight through when no fake session is open (the batch hook
only marks the calling thread's p2p ops as one batch); ``Work.is_completed`` is patched with
``Work.wait``.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch

from . import _collectives, _report
from ._fake_backend import BACKEND
from ._clocks import StreamState, merge

#: c10d ops that are point-to-point (their schemas carry no async_op: every one returns a Work)
P2P_OPS = frozenset({"send", "recv_", "recv_any_source_"})

_installed = False
_install_lock = threading.Lock()
# session -> {(process group name, rank pair): its p2p stream}
_streams: "weakref.WeakKeyDictionary[Any, dict[tuple, StreamState]]" = weakref.WeakKeyDictionary()


def _peer(plan: Any, args: Any, kwargs: dict) -> Any:
    schema = plan.op._schema
    for i, arg in enumerate(schema.arguments):
        if arg.name in ("dst", "src"):
            return args[i] if i < len(args) else kwargs.get(arg.name)
    return None  # recv_any_source_


def _pair_stream(session: Any, plan: Any, args: Any, kwargs: dict) -> StreamState:
    """The stream of this rank pair on the op's process group (made on first use; session lock held)."""
    group = _collectives.argument_value(plan.op, args, kwargs, _collectives.argument_positions(plan.op)[2])
    name, shown, rank = "?", "?", None
    try:
        pg = torch._C._distributed_c10d.ProcessGroup.unbox(group) if isinstance(group, torch.ScriptObject) else group
        name, rank = pg.group_name, pg.rank()
        desc = getattr(pg, "group_desc", "") or ""
        shown = desc if desc and desc != "undefined" else name
    except Exception:  # an unusual process group: one p2p stream for all of them
        pass
    peer = _peer(plan, args, kwargs)
    pair = "any" if peer is None or rank is None else f"{min(rank, peer)}:{max(rank, peer)}"
    streams = _streams.get(session)
    if streams is None:
        streams = _streams[session] = {}
    stream = streams.get((name, pair))
    if stream is None:
        stream = streams[(name, pair)] = session.clocks.new_stream(0, ())
        _report.label_stream(
            stream,
            f"process group {shown!r} p2p stream {pair} #{stream.idx} (its send/recv)",
            f"the process group {shown!r} p2p stream {pair}",
            "collective",
        )
    return stream


#: the calling thread's batch (inside ``batch_isend_irecv``): ``.works``, its ops' work entries so far
_batch = threading.local()


def run(call: Any, plan: Any, args: Any, kwargs: dict) -> Any:
    """Issue one p2p op (``call``: an unwrapped ``OpCall``) on its pair stream (in a batch: its
    process group's stream) and run it (see the module doc)."""
    session = call.session
    issuing = call.stream
    batch = getattr(_batch, "works", None)
    with session.lock:
        if batch is not None:  # pointToPoint in ncclGroupStart: the group's key, as its collectives
            call.stream = stream = _collectives.group_stream(session, plan, args, kwargs)
        else:
            call.stream = stream = _pair_stream(session, plan, args, kwargs)
        for tensor, _ in call.accesses:  # recordStream(tensor, ncclStream)
            state = tensor.sk_state
            if type(state.record_streams) is tuple:
                state.record_streams = set(state.record_streams)
            state.record_streams.add(stream.idx)
    # syncStreams: the p2p stream waits for the issuing one
    result, end = call.run_now(after=issuing, snapshot=True)
    receiving = plan.name != "send"
    for work in _collectives.works_of(result):
        if receiving:
            work.wait()  # the values are there at issue (a synchronous device); gloo's work is done
        entry = _collectives.register_work(work, session, end, [], gloo_waited=receiving)
        if batch is not None:
            batch.append(entry)
    return result


def _batched(original: Any) -> Any:
    """``batch_isend_irecv`` as NCCL coalesces it (module doc): its ops on the group's stream, and
    each work it returns ending with the whole batch (``endCoalescing`` records the one work's end
    event after ``ncclGroupEnd``)."""

    def batch_isend_irecv(p2p_op_list: list) -> list:
        entries: list = []  # (the _collectives entries of the batch's works)
        outer = getattr(_batch, "works", None)
        _batch.works = entries
        try:
            result = original(p2p_op_list)
        finally:
            _batch.works = outer
        entries = [e for e in entries if e.clock is not None]
        if entries:
            end = entries[-1].clock  # (the last op's: FIFO on the group's stream, it follows the rest)
            for entry in entries:
                entry.clock = end
        return result

    batch_isend_irecv.__doc__ = original.__doc__
    batch_isend_irecv.__wrapped__ = original  # type: ignore[attr-defined]
    return batch_isend_irecv


# -- ProcessGroup hooks: barrier, _get_backend ------------------------------------------------


def install() -> None:
    """Hook ``ProcessGroup.barrier`` and ``ProcessGroup._get_backend`` (once per process; they pass
    straight through while no fake session is open)."""
    global _installed
    if _installed:
        return
    with _install_lock:
        if _installed:
            return
        try:
            import torch.distributed as dist

            if not dist.is_available():
                return
            pg_class = torch._C._distributed_c10d.ProcessGroup
        except Exception:  # a torch without distributed: nothing to hook
            return
        barrier, get_backend = pg_class.barrier, pg_class._get_backend

        def _barrier(self: Any, *args: Any, **kwargs: Any) -> Any:
            work = barrier(self, *args, **kwargs)
            session = BACKEND.explicit()
            if session is not None and not session.closed and work is not None:
                _collectives.register_work(work, session, None, [], host_sync=True)
            return work

        def _get_backend(self: Any, device: Any) -> Any:
            if isinstance(device, torch.device) and device.type == "fake":
                device = torch.device("cpu")  # the fake device's collectives run on the host's backend
            elif isinstance(device, str) and device.split(":")[0] == "fake":
                device = "cpu"
            return get_backend(self, device)

        _barrier.__doc__, _get_backend.__doc__ = barrier.__doc__, get_backend.__doc__
        pg_class.barrier = _barrier
        pg_class._get_backend = _get_backend
        c10d = dist.distributed_c10d
        original = c10d.batch_isend_irecv
        batched = _batched(original)
        c10d.batch_isend_irecv = batched
        if getattr(dist, "batch_isend_irecv", None) is original:
            dist.batch_isend_irecv = batched
        _installed = True


def make_is_completed(original: Any, pending: dict) -> Any:
    """``Work.is_completed`` as CUDA's query of the work's end event: ``True`` orders the host after
    a collective this module knows."""

    def is_completed(self: Any) -> bool:
        done = original(self)
        entry = pending.get(id(self))
        if done and entry is not None and entry.clock is not None:
            session = entry.session
            current = entry.work
            if not session.closed and (current is self or (type(current) is weakref.ref and current() is self)):
                with session.lock:
                    session.clocks.host_waits_for(entry.clock)
        return done

    is_completed.__name__ = original.__name__
    is_completed.__doc__ = original.__doc__
    is_completed.__streamkit_original__ = original  # type: ignore[attr-defined]
    return is_completed


_collectives.P2P_RUN = run
_collectives.MAKE_IS_COMPLETED = make_is_completed
