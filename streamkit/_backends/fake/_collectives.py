"""c10d collectives on the fake backend, ordered as ProcessGroupNCCL / ProcessGroupHCCL order them.

- ``async_op=False`` (the default): the collective is a kernel on the issuing (current) stream,
  as NCCL runs it (torch >= 2.7: "in asyncOp=false mode, we use currentStream as ncclStream");
  the same happens-before as an internal stream plus ``work.wait()`` right after.
- ``async_op=True``: the collective is a kernel on its process group's own stream, which first
  waits for the issuing stream (``syncStream``). The returned ``Work``'s ``wait()`` (or
  ``synchronize()``) makes the stream current *at wait time* wait for the collective
  (``WorkNCCL::synchronizeStream``). The collective's tensors are held until then (NCCL's
  ``TensorShelf`` stash; before it, ``recordStream`` on the NCCL stream), so dropping them before
  ``wait()`` is not a free race.

The eager scheduler still runs the collective at issue, outside the session lock (it blocks on
peers), and waits for gloo's own work there: values are those of a synchronous device, only the
ordering differs.

The ``Work`` that ``dist.*`` hands back is the Python object pybind keeps for the C++ work: while
this module holds it (from issue to the first ``wait()``), pybind returns that same object, so a
registry keyed on it finds it again. ``Work.wait``/``Work.synchronize`` are replaced at the class
level the first time an ``async_op=True`` collective runs on the fake device (process-wide) and put
back when the last session that issued one ends (:func:`session_ended`, from ``Session.__exit__``);
a work this module doesn't know is passed straight through.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

import torch

from . import _report
from ._clocks import StreamState, merge
from ._pipeline import OpCall

if TYPE_CHECKING:
    from ._interface import Engine

_Work = None  # torch._C._distributed_c10d.Work, once dist is in use
_P2P_OPS = frozenset({"send", "recv_", "recv_any_source_"})  # (_p2p.P2P_OPS)
# set by _p2p when it loads (_session imports it): the p2p launch and the Work.is_completed wrapper
P2P_RUN: Any = None
MAKE_IS_COMPLETED: Any = None
_original: dict[str, Any] = {}  # "wait"/"synchronize" -> the unpatched method
_install_lock = threading.Lock()

# id(Work) -> _Pending, for async works not yet collected
_pending: dict[int, "_Pending"] = {}
# session -> {process group name: its stream}
_pg_streams: "weakref.WeakKeyDictionary[Any, dict[str, StreamState]]" = weakref.WeakKeyDictionary()


class _Pending:
    """An async collective's completion, as a clock, until its Work is waited for."""

    __slots__ = ("work", "session", "clock", "stash", "gloo_waited", "host_sync")

    def __init__(
        self, work: Any, session: "Engine", clock: list[int] | None, stash: list, gloo_waited: bool | None = None,
        host_sync: bool = False,
    ) -> None:
        self.work = work  # the Work itself until the first wait(), then a weak reference
        self.session = session
        self.clock = clock  # the process-group stream's clock after the collective (None: untracked)
        self.stash = stash  # the collective's fake tensors (the allocator can't reuse them yet)
        # p2p works (_p2p): whether gloo's own work was waited (it can be waited once); None: not p2p
        self.gloo_waited = gloo_waited
        self.host_sync = host_sync  # a barrier's work: wait() syncs the host with the current stream (_p2p)


def argument_positions(op: Any) -> tuple:
    """``(async_op index, its default, process_group index)`` in a c10d op's schema (``None``: absent)."""
    found = _ARGUMENTS.get(op)
    if found is None:
        async_index = async_default = group_index = None
        for i, arg in enumerate(op._schema.arguments):
            if arg.name == "async_op":
                async_index = i
                async_default = bool(arg.default_value) if arg.has_default_value() else False
            elif group_index is None and "ProcessGroup" in str(arg.type):
                group_index = i
        found = _ARGUMENTS[op] = (async_index, async_default, group_index)
    return found


_ARGUMENTS: dict[Any, tuple] = {}


def argument_value(op: Any, args: Any, kwargs: dict, index: int | None, default: Any = None) -> Any:
    if index is None:
        return default
    if index < len(args):
        return args[index]
    return kwargs.get(op._schema.arguments[index].name, default)


def group_stream(session: "Engine", plan: Any, args: Any, kwargs: dict) -> StreamState:
    """The stream of the op's process group in ``session`` (made on first use): its
    ``async_op=True`` collectives and its batched p2p ops (``_p2p``). Call with the session lock held."""
    group = argument_value(plan.op, args, kwargs, argument_positions(plan.op)[2])
    name = desc = "?"
    if group is not None:
        try:
            pg = torch._C._distributed_c10d.ProcessGroup.unbox(group) if isinstance(group, torch.ScriptObject) else group
            name = pg.group_name
            desc = getattr(pg, "group_desc", "") or ""
        except Exception:  # an unusual process group: one stream for all of them
            pass
    streams = _pg_streams.get(session)
    if streams is None:
        streams = _pg_streams[session] = {}
    stream = streams.get(name)
    if stream is None:
        stream = streams[name] = session.clocks.new_stream(0, ())
        shown = desc if desc and desc != "undefined" else name
        _report.label_stream(
            stream,
            f"process group {shown!r} stream #{stream.idx} (its collectives with async_op=True)",
            f"the process group {shown!r} stream",
            "collective",
        )
    return stream


def works_of(result: Any) -> list:
    items = result if isinstance(result, (tuple, list)) else (result,)
    return [r for r in items if hasattr(r, "wait") and not isinstance(r, (torch.Tensor, list, tuple))]


def is_async(plan: Any, args: Any, kwargs: dict) -> bool:
    """Whether the c10d call was made with ``async_op=True`` (its schema's argument, or default)."""
    async_index, async_default, _ = argument_positions(plan.op)
    return bool(argument_value(plan.op, args, kwargs, async_index, async_default))


def run_and_wait(call: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a c10d op and wait for gloo's own work (the ordering is the clocks'): what a collective
    kernel does when it runs."""
    result = call(*args, **kwargs)
    for work in works_of(result):
        work.wait()
    return result


def run(call: OpCall, plan: Any, args: Any, kwargs: dict) -> Any:
    """Issue one c10d op (``call``: unwrapped, on the current stream) and run it: the kernel's
    stream and the returned Work follow the rules above."""
    session = call.session
    if plan.name in _P2P_OPS:  # send/recv: on the rank pair's stream (_p2p)
        return P2P_RUN(call, plan, args, kwargs)
    asynchronous = is_async(plan, args, kwargs)
    issuing = None
    if asynchronous:
        issuing = call.stream
        with session.lock:
            call.stream = group_stream(session, plan, args, kwargs)
    # syncStream: the pg stream waits for the issuing one. Run outside the lock: it blocks on
    # peers, and other threads must keep issuing. (a deferred schedule runs it now, after what it
    # is ordered after: collectives keep their issue order on every rank)
    result, end = call.run_now(after=issuing, snapshot=asynchronous)
    works = works_of(result)
    for work in works:
        work.wait()  # gloo's own completion (the eager scheduler); the ordering is the clocks'
    if asynchronous:
        stash = [tensor for tensor, _ in call.accesses]
        for work in works:
            register_work(work, session, end, stash)
    return result


def register_work(work: Any, session: "Engine", clock: list[int] | None, stash: list, **flags: Any) -> "_Pending":
    """Keep ``work`` (a c10d work or its Python object) until its first ``wait()``: its completion
    is ``clock``; returns the entry (a batch of p2p ops moves its clock to the batch's end)."""
    _install()
    _users.add(session)
    if isinstance(work, torch.ScriptObject):
        work = _Work.unbox(work)  # the Python object dist.* will return (while this one lives)
    if len(_pending) >= _PURGE_AT:
        _purge()
    entry = _pending[id(work)] = _Pending(work, session, clock, stash, **flags)
    return entry


_PURGE_AT = 256


def _purge() -> None:
    """Forget works of sessions that have ended (never waited for: nothing can order on them now)."""
    global _PURGE_AT
    for key, entry in list(_pending.items()):
        if entry.session.closed:
            _pending.pop(key, None)
    _PURGE_AT = max(256, 2 * len(_pending))


def _install() -> None:
    global _Work
    if _Work is not None:
        return
    with _install_lock:
        if _Work is not None:
            return
        work_class = torch._C._distributed_c10d.Work
        for name in ("wait", "synchronize"):
            original = _original[name] = getattr(work_class, name)
            setattr(work_class, name, _make_waiter(original))
        original = _original["is_completed"] = work_class.is_completed
        work_class.is_completed = MAKE_IS_COMPLETED(original, _pending)  # a query of the work's end event
        _Work = work_class


# sessions that issued async collectives: the patch stays while one of them is open
_users: "weakref.WeakSet[Any]" = weakref.WeakSet()


def session_ended(session: "Engine") -> None:
    """``session`` has ended: when no open session needs them any more, put the original
    ``Work.wait``/``Work.synchronize`` back and forget the works of ended sessions."""
    global _Work
    if session not in _users:
        return
    with _install_lock:
        _users.discard(session)
        if _Work is None or any(not s.closed for s in _users):
            return
        for name, original in _original.items():
            setattr(_Work, name, original)
        _original.clear()
        _Work = None
        for key, entry in list(_pending.items()):
            if entry.session.closed:
                _pending.pop(key, None)


def _make_waiter(original: Any) -> Any:
    def wait(self: Any, *args: Any, **kwargs: Any) -> Any:
        entry = _pending.get(id(self))
        if entry is not None and entry.gloo_waited:
            out = True  # a p2p work gloo already completed (gloo's send/recv works can be waited once)
        else:
            out = original(self, *args, **kwargs)
            if entry is not None and entry.gloo_waited is False:
                entry.gloo_waited = True
        if entry is not None:
            _waited(self, entry)
        return out

    wait.__name__ = original.__name__
    wait.__doc__ = original.__doc__
    wait.__streamkit_original__ = original  # type: ignore[attr-defined]
    return wait


def _waited(work: Any, entry: _Pending) -> None:
    """``work.wait()``: the current stream waits for the collective (every call), and the
    collective's tensors are released (the first call)."""
    current = entry.work
    if current is not work and not (type(current) is weakref.ref and current() is work):
        return  # another object at a reused address
    session = entry.session
    if not session.closed and entry.clock is not None:
        with session.lock:
            merge(session.current_stream().clock, entry.clock)
    if entry.host_sync and not session.closed:  # a barrier (_p2p): cudaStreamSynchronize(currentStream)
        session.host_sync(session.current_stream().clock, "stream_syncs")
    if current is work:
        key = id(work)
        entry.work = weakref.ref(work, lambda _, key=key, entry=entry: _pending.get(key) is entry and _pending.pop(key))
        entry.stash = []  # as NCCL unstashes in synchronizeStream: the allocator may take them back now
