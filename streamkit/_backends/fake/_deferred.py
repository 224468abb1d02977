"""Deferred schedules: kernels wait in per-stream FIFO queues and run when a policy picks them.

A kernel may run when it heads its stream's queue and every kernel it is ordered after (its
stream's vector clock at issue, ``Kernel.deps``) has run. Host synchronizations run what they wait
for (:meth:`DeferredScheduler.drain`); the policy decides the order, and may run unrelated ready
work first. Fresh outputs of a kernel still queued once the policy's turn at its issue is over
are placeholders: CPU tensors of the layout a cached meta evaluation gives, filled with poison
(NaN, all bits set for integers, True for bool) until the kernel runs and copies its values in; a
kernel that runs in that turn (or that the policy runs at issue) hands back its own outputs. Kernels that can't be deferred run at once, after their dependencies
(:meth:`DeferredScheduler.run_now`): syncing ops, random ops (program order), collectives,
``resize_``, ops without a meta kernel or with data-dependent shapes, resized ``out=`` arguments,
outputs that alias an input other than as the input itself.
"""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from ..._errors import InternalError
from ._policies import PCT_DEPTH, PCT_STEPS, SCHEDULES, needed, is_rmw, is_update  # noqa: F401  (re-exported)
from ._policies import policy as make_policy
from ._tracking import AccessKind
#: pending kernels beyond this run oldest first (CUDA's launch queue holds about 1k entries)
QUEUE_DEPTH = 1024
#: kernels a deferred session records for fake.explore (fingerprint, deviations); a longer session
#: stops recording (None), rather than keep every kernel object alive
TRACE_LIMIT = 1 << 17
#: ops that change storage sizes on the host side at issue: run at once
_AT_ONCE_NAMES = frozenset({"resize_", "set_", "resize_as_"})

_META = torch.device("meta")
_WRITE = AccessKind.WRITE
_Tensor = torch.Tensor
_NoTorchFunction = torch._C.DisableTorchFunctionSubclass
_InferenceMode = torch._C._InferenceMode


class AtOnce(Exception):
    """The kernel can't be deferred."""


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with the value of memory nothing has written yet."""
    if t.dtype.is_floating_point or t.dtype.is_complex:
        t.fill_(float("nan"))
    elif t.dtype is torch.bool:
        t.fill_(True)
    else:
        t.fill_(-1)  # all bits set (255 for uint8)
    return t


# -- cached meta evaluation ------------------------------------------------------------------

_meta_cache: dict = {}
META_CACHE_SIZE = 4096
_random_ops: dict = {}


def _is_random(op: Any) -> bool:
    entry = _random_ops.get(id(op))  # (by id: an OpOverload's __hash__ is Python code; the entry keeps op alive)
    if entry is None:
        schema = getattr(op, "_schema", None)
        entry = _random_ops[id(op)] = (op, schema is not None and (
            any("Generator" in str(a.type) for a in schema.arguments) or schema.name.split("::")[-1] in _AT_ONCE_NAMES
        ))
    return entry[1]


def _describe(value: Any, slots: dict, tensors: list) -> Any:
    """A hashable description of one argument; tensors become ``("T", slot, shape, stride, dtype)``
    (the slot records which arguments are the same tensor)."""
    if isinstance(value, torch.Tensor):
        slot = slots.get(id(value))
        if slot is None:
            slot = slots[id(value)] = len(tensors)
            tensors.append(value)
        return ("T", slot, tuple(value.shape), value.stride(), value.dtype)
    tp = type(value)
    if tp is list or tp is tuple:
        return (tp, tuple(_describe(v, slots, tensors) for v in value))
    if isinstance(value, torch.device):
        return ("D",)
    hash(value)  # (TypeError: not cacheable, so not deferrable)
    return (tp, value)


def _describe_args(args: Any, slots: dict, tensors: list, checks: list | None = None) -> Any:
    """``_describe(tuple(args), ...)``, one loop for the usual flat argument list (this runs for
    every deferred kernel); ``checks`` gets ``(tensor, shape, stride, offset)`` of each tensor
    argument (not those in lists), the layout of issue time."""
    out = []
    for value in args:
        if isinstance(value, _Tensor):
            vid = id(value)
            slot = slots.get(vid)
            shape, stride = value.shape, value.stride()  # (a torch.Size hashes and compares as its tuple)
            if slot is None:
                slot = slots[vid] = len(tensors)
                tensors.append(value)
                if checks is not None:
                    checks.append((value, shape, stride, value.storage_offset()))
            out.append(("T", slot, shape, stride, value.dtype))
            continue
        tp = type(value)
        if tp is float or tp is int or tp is bool or value is None:
            out.append((tp, value))
        else:
            out.append(_describe(value, slots, tensors))
    return (tuple, tuple(out))


def _meta_value(desc: Any, metas: dict) -> Any:
    tag = desc[0]
    if tag == "T":
        _, slot, shape, stride, dtype = desc
        meta = metas.get(slot)
        if meta is None:
            meta = metas[slot] = torch.empty_strided(shape, stride, dtype=dtype, device=_META)
        return meta
    if tag == "D":
        return _META
    if tag is list or tag is tuple:
        return tag(_meta_value(d, metas) for d in desc[1])
    return desc[1]


def _template(result: Any, metas: dict, descs: dict) -> Any:
    """What each output is: ``("arg", slot)`` (an argument itself) or ``("fresh", shape, stride, dtype)``."""
    if isinstance(result, torch.Tensor):
        for slot, meta in metas.items():
            if result is meta:
                shape, stride = descs[slot]
                if tuple(result.shape) != shape or result.stride() != stride:
                    raise AtOnce  # a resized out= argument
                return ("arg", slot)
        if result._is_view():
            raise AtOnce  # a view of an input: its memory is the input's
        return ("fresh", tuple(result.shape), result.stride(), result.dtype)
    if type(result) is list or type(result) is tuple:
        return (type(result), tuple(_template(r, metas, descs) for r in result))
    if result is None:
        return None
    raise AtOnce  # a host value (a scalar): the host needs it now


def layout(call: Any, args: Any, kwargs: Any, checks: list | None = None) -> tuple[Any, list]:
    """``(template, tensors)``: the outputs' layout from a meta evaluation, cached by the arguments'
    metadata; raises ``AtOnce`` when the kernel can't be deferred. ``checks``: filled with
    ``(tensor, shape, stride, offset)`` of every tensor argument."""
    slots: dict = {}
    tensors: list = []
    try:
        key = (call, _describe_args(args, slots, tensors, checks), _describe(tuple(kwargs.items()), slots, tensors) if kwargs else None)
    except TypeError:
        raise AtOnce from None
    if checks is not None and len(checks) < len(tensors):  # (tensors in lists or keyword arguments)
        checks[:] = [(t, t.shape, t.stride(), t.storage_offset()) for t in tensors]
    template = _meta_cache.get(key)
    if template is None:
        metas: dict = {}
        try:
            meta_args = _meta_value(key[1], metas)
            meta_kwargs = dict(_meta_value(key[2], metas)) if kwargs else {}
            descs = {slot: (tuple(m.shape), m.stride()) for slot, m in metas.items()}
            with _NoTorchFunction():
                result = call(*meta_args, **meta_kwargs)
            template = _template(result, metas, descs)
        except Exception:
            # no meta kernel, a data-dependent shape, an argument error (which the real run raises
            # at once), a host value: run it now
            template = False
        if len(_meta_cache) >= META_CACHE_SIZE:
            _meta_cache.clear()  # (programs with ever-new shapes: start over rather than grow)
        _meta_cache[key] = template
    if template is False:
        raise AtOnce
    return template, tensors


def placeholders(template: Any, tensors: list, fills: list | None, path: tuple, alias: bool = True) -> Any:
    """The outputs of a kernel not run yet, as ``template`` (:func:`layout`) describes them: the
    argument tensors it returns, and poisoned fresh memory, each noted in ``fills`` (if given) with
    its ``path`` in the result for the kernel to fill when it runs, in the layout of issue time so
    that an in-place metadata change of the pending output (t_(), squeeze_(), resize_() shrinking)
    doesn't reach it: ``(path, alias)`` with ``alias`` (a graph capture: the alias is filled), else
    ``(path, output, shape, stride)`` (the deferred scheduler: :meth:`DeferredScheduler._execute`
    restores that layout only if the pending output's metadata changed meanwhile)."""
    if template is None:
        return None
    tag = template[0]
    if tag == "arg":
        return tensors[template[1]]
    if tag == "fresh":
        _, shape, stride, dtype = template
        out = poison(torch.empty_strided(shape, stride, dtype=dtype))
        if fills is not None:
            fills.append((path, out.as_strided(shape, stride)) if alias else (path, out, shape, stride))
        return out
    return tag(placeholders(t, tensors, fills, path + (i,), alias) for i, t in enumerate(template[1]))


#: ``Kernel.fills`` of a kernel being issued whose outputs aren't made yet (see ``submit``)
_NOT_RUN = object()


class _Ran:
    """``Kernel.fills`` of a kernel that ran while being issued: its outputs."""

    __slots__ = ("result",)

    def __init__(self, result: Any) -> None:
        self.result = result


def _frozen(checks: list) -> dict | None:
    """The arguments whose metadata changed since issue (``checks``: ``(tensor, shape, stride,
    offset)`` then), as ``{id: a view with the layout of issue time}``; None if none changed."""
    frozen = None
    for t, shape, stride, offset in checks:
        if t.shape != shape or t.stride() != stride or t.storage_offset() != offset:
            if frozen is None:
                frozen = {}
            frozen[id(t)] = t.as_strided(shape, stride, offset)
    return frozen


def refreeze(value: Any, frozen: dict) -> Any:
    if isinstance(value, torch.Tensor):
        return frozen.get(id(value), value)
    if type(value) is list or type(value) is tuple:
        return type(value)(refreeze(v, frozen) for v in value)
    return value


# -- the scheduler ---------------------------------------------------------------------------


class DeferredScheduler:
    """The queue mechanism: kernels wait in per-stream FIFO queues; a policy (:mod:`._policies`,
    one per run, chosen by the schedule's name) picks which ready kernel runs at each scheduling
    point. Deterministic for a given program, policy and seed."""

    runs_at_issue = False

    def __init__(self, session: Any, policy: str, seed: int, depth: int = PCT_DEPTH, target: Any = None) -> None:
        self.session = session
        self.name = policy
        self.policy = make_policy(policy, seed, depth, target)
        self.seed = seed
        self.depth = depth
        self.target = target
        # every kernel handed to submit (issue order) and every kernel run (run order): a run's
        # fingerprint, deviations and constraint matching are computed from them (_explore.py)
        self.trace: list | None = []
        self.ran: list | None = []
        self.queues: dict[int, deque] = {}
        self.pending = 0
        self.order = 0  # issue number of the last deferred kernel
        self.split_pairs: list = []  # (kernel, partner): a read-modify-write kernel run split around a racing one
        self.error: BaseException | None = None  # the first kernel that failed when it ran
        self._contexts = False  # inside contexts(): kernels run without entering their modes again
        self._ready: list | None = None  # what ready() found, while it stays true
        self._ready_heads: dict = {}  # stream index -> its queue's head, once found ready (ready())
        #: fake.explore's focus (:meth:`set_focus`): the kernels, as (stream, seq), whose order may
        #: change values; None: every kernel goes through the policy
        self.focus: frozenset | None = None
        #: with a focus: per storage (by id of its access table) still used by queued kernels,
        #: ``[reads, writes]`` of them
        self.busy: dict | None = None

    def set_focus(self, focus: frozenset) -> None:
        """Run every kernel outside ``focus`` at issue, as eager does, when no queued kernel uses
        memory it writes or writes memory it uses (:meth:`inert`); the policy sees only the rest.

        Why that changes no value: two kernels' order changes what they compute only when they
        touch common memory and one writes it (they conflict). Kernels ordered by the program run
        in that order in every schedule; a conflicting pair that is not ordered is a race, which
        the eager run reported (on every storage where such a pair exists, it reports one: a record
        it drops is ordered before the access that replaced it). ``focus`` (from the eager run:
        :meth:`._planner.Observation.focus`) holds every kernel that touched a storage with a race.
        A kernel outside it conflicts with no kernel it isn't ordered with, and with no queued one
        (checked here), so running it now gives the values of running it after everything queued:
        the schedule the policy makes of the focus kernels, with the others where any legal
        schedule may have put them."""
        self.focus = focus
        self.busy = {}
        self.session.inert = self.inert

    def inert(self, kernel: Any, accesses: list) -> bool:
        """With a focus: whether ``kernel`` runs at issue, outside the policy (:meth:`set_focus`);
        then it is recorded as issued and run."""
        if (kernel.stream.idx, kernel.seq) in self.focus:
            return False
        if self.pending:  # (counts are above zero only while their kernels are queued)
            busy = self.busy
            for t, kind in accesses:
                counts = busy.get(id(t.sk_state))
                if counts is not None and (counts[1] or (kind is _WRITE and counts[0])):
                    return False
        # (issued, not in ``ran``: its place in the run order changes nothing, so the deviations
        # of the run, fake.explore's constraints, leave it out)
        self._issued(kernel)
        return True

    def _issued(self, kernel: Any) -> None:
        """Record ``kernel`` in :attr:`trace` (issue order); a session past :data:`TRACE_LIMIT`
        kernels stops recording."""
        trace = self.trace
        if trace is not None:
            if len(trace) < TRACE_LIMIT:
                trace.append(kernel)
            else:
                self.trace = self.ran = None

    def _hold(self, kernel: Any, accesses: Any) -> None:
        """A queued kernel's accesses count in :attr:`busy` until it runs. (Counts at zero stay:
        they block nothing, and a recycled block's new owner may name the same counts.)"""
        busy = self.busy
        held = []
        for t, kind in accesses or ():
            key = id(t.sk_state)
            counts = busy.get(key)
            if counts is None:
                counts = busy[key] = [0, 0]
            write = kind is _WRITE
            counts[write] += 1
            held.append((counts, write))
        kernel.held = held

    def hold_output(self, kernel: Any, state: Any) -> None:
        """``state`` is a fresh output of ``kernel``, still queued: it writes it when it runs."""
        counts = self.busy[id(state)] = [0, 1]  # (new memory: nothing else holds it)
        kernel.held.append((counts, True))

    def _release(self, kernel: Any) -> None:
        for counts, write in kernel.held:
            counts[write] -= 1
        kernel.held = None

    # issue
    def submit(self, kernel: Any, sync: Any = None, accesses: Any = None) -> Any:
        """Queue ``kernel`` (bound) and return its outputs: placeholders, or the arguments it writes."""
        self._issued(kernel)
        policy = self.policy
        if policy.sees:
            policy.seen(kernel)
        if sync is not None:
            return self.run_now(kernel)
        random_op = _random_ops.get(id(kernel.op))  # (_is_random, inline)
        if random_op[1] if random_op is not None else _is_random(kernel.op):
            return self.run_now(kernel)
        if not self.pending and not policy.fast_draws and policy.fast(self, kernel):
            return self._run_at_issue(kernel)  # (before the meta evaluation: nothing to defer)
        asks = policy.fast_draws and (not self.pending or (policy.fast_queued and self.pending < QUEUE_DEPTH))
        # a focus run asks a policy that draws before the meta evaluation, which a kernel it runs
        # at issue doesn't need (runs without a focus ask after it: the draws of earlier tokens)
        early = asks and self.focus is not None
        if early and policy.fast(self, kernel):
            return self._run_first(kernel)
        checks: list = []
        try:
            template, tensors = layout(kernel.call, kernel.args, kernel.kwargs, checks)
        except AtOnce:
            if early:
                policy.cancel_fast()
            return self.run_now(kernel)
        if asks and not early and policy.fast(self, kernel):
            return self._run_first(kernel)
        # the kernel runs on the memory, with the layouts of issue time (a later metadata change
        # of an argument, such as unsqueeze_, doesn't reach it): recorded here, checked when it runs
        # (.data = and set_ give the wrapper a new CPU tensor: the one bound here doesn't change)
        kernel.deps = list(kernel.stream.clock)
        fresh = template is not None and template[0] != "arg"
        if fresh:
            # its outputs are made after the policy's turn below: a kernel that runs meanwhile
            # hands its own outputs back, with no poisoned placeholder to fill (_execute)
            kernel.fills = (_NOT_RUN, checks)
        else:
            # (the arguments it writes: placeholders(template, tensors, None, (), False))
            result = None if template is None else tensors[template[1]] if template[0] == "arg" else placeholders(template, tensors, None, (), False)
            kernel.fills = ((), checks)
        self.order += 1
        kernel.order = self.order
        queue = self.queues.get(kernel.stream.idx)
        if queue is None:
            queue = self.queues[kernel.stream.idx] = deque()
        if not queue:
            self._ready = None  # (a new head: ready() looks again)
        queue.append(kernel)
        if self.busy is not None:
            self._hold(kernel, accesses)
        self.pending += 1
        if self.pending > QUEUE_DEPTH:
            self.run(min(self.ready(), key=lambda k: k.order))
        policy.after_issue(self, kernel)
        if not fresh:
            return result
        state = kernel.fills
        if type(state) is _Ran:  # it ran during the policy's turn: its own outputs
            return state.result
        if state is None:
            return placeholders(template, tensors, None, (), False)  # (it failed when it ran: poison, never filled)
        fills: list = []  # still queued: poisoned placeholders that it fills when it runs
        result = placeholders(template, tensors, fills, (), False)
        kernel.fills = (fills, checks)
        return result

    def _run_at_issue(self, kernel: Any) -> Any:
        """The policy runs ``kernel`` at once (it is ready: nothing is queued, or nothing it waits
        for): run it as eager does, without a placeholder (what run_now would do, minus the drain
        there is nothing for)."""
        if self.ran is not None:
            self.ran.append(kernel)
        with _NoTorchFunction():
            result = kernel.run()
        self.policy.ran(kernel)
        return result

    def _run_first(self, kernel: Any) -> Any:
        """The policy's turn at issue runs ``kernel`` first: at issue, as eager does, then the rest
        of the turn (if others are queued)."""
        queued = self.pending
        result = self._run_at_issue(kernel)
        if queued:
            self.policy.after_fast(self)
        return result

    def run_now(self, kernel: Any) -> Any:
        """Run ``kernel`` now, after everything it is ordered after (a legal schedule)."""
        stream = kernel.stream
        deps = list(stream.clock)
        if kernel.seq and stream.idx < len(deps):
            deps[stream.idx] = kernel.seq - 1
        self.drain(deps)
        if self.ran is not None:
            self.ran.append(kernel)
        with _NoTorchFunction():
            result = kernel.run()
        self.policy.ran_at_issue(kernel)
        self.policy.settle(self)
        return result

    # running
    def blocked(self, clock: Any, skip: int = -1) -> bool:
        """Whether a kernel ``clock`` orders (its entries per stream; ``skip``: a stream not looked
        at) is still queued."""
        queues = self.queues
        for j, c in enumerate(clock):
            if j != skip:
                q = queues.get(j)
                if q and q[0].seq <= c:
                    return True
        return False

    def ready(self) -> list:
        """The kernels that may run now: heads of their queues whose dependencies have run. (The
        list is kept until a queue loses its head or an empty one gains one, the only changes that
        change it: callers don't change it.)"""
        found = self._ready
        if found is not None:
            return found
        queues = self.queues
        heads = self._ready_heads
        found = []
        for i, q in queues.items():
            if q:
                k = q[0]
                if heads.get(i) is k:
                    found.append(k)
                    continue
                for j, c in enumerate(k.deps):  # (blocked, inline: this runs at every scheduling point)
                    if j != i:
                        other = queues.get(j)
                        if other and other[0].seq <= c:
                            break
                else:
                    # (a head found ready stays ready until it runs: queues only lose their heads
                    # and gain later kernels, so the scan is not repeated for it)
                    heads[i] = k
                    found.append(k)
        self._ready = found
        return found

    def run(self, kernel: Any) -> None:
        """Run ``kernel`` (a ready one): a policy that splits read-modify-write kernels may run a
        racing ready one between its read and its write."""
        self.queues[kernel.stream.idx].popleft()
        self._ready = None
        self.pending -= 1
        policy = self.policy
        partner = None
        if policy.splits and self.pending and is_rmw(kernel.op):
            partners = self._partners(kernel)
            if partners:
                partner = policy.split(self, kernel, partners)
        if self.ran is not None:
            self.ran.append(kernel)
        policy.ran(kernel)
        if partner is None:
            self._execute(kernel)
            return
        # CUDA: an in-place elementwise kernel loads, computes and stores per element with no
        # atomicity; two unordered ones on the same memory may both load before either stores,
        # and one update is lost (the order below is one such interleaving). (Ops CUDA runs with
        # atomic updates, scatter_add_ and index_add_, are not read-modify-write here: is_rmw.)
        self.split_pairs.append((kernel, partner))
        fills, checks = kernel.fills
        frozen = _frozen(checks)
        if frozen is not None:
            kernel.args = refreeze(kernel.args, frozen)
        kernel.fills = (fills, ())
        target = kernel.args[0]
        with _NoTorchFunction(), _InferenceMode(True):
            read = target.clone()
            scratch = read.clone()
        kernel.args = (scratch,) + tuple(kernel.args[1:])
        self._execute(kernel)  # the read half, into scratch
        self.run(partner)  # the racing kernel, whole
        with _NoTorchFunction(), _InferenceMode(True):
            # the write half: the elements the kernel changed get its values, over the partner's
            # updates (lost); an element it left as it read it isn't stored (a kernel that updates
            # some elements, index_put_ or a bincount's zero counts added, writes only those)
            kept = scratch == read
            if scratch.dtype.is_floating_point or scratch.dtype.is_complex:
                kept |= scratch.isnan() & read.isnan()
            target.copy_(torch.where(kept, target, scratch))

    def _partners(self, kernel: Any) -> list:
        """Ready kernels of other streams that update ``kernel``'s memory in place (read-modify-write
        or atomic: :func:`is_update`), unordered with it: neither has run, and both may run now."""
        args = kernel.args
        if not args or not isinstance(args[0], torch.Tensor):
            return []
        idx, seq = kernel.stream.idx, kernel.seq
        for i, q in self.queues.items():
            if q and i != idx and is_update(q[0].op):
                break
        else:
            return []  # (no other stream's next kernel updates anything in place)
        storage = args[0].untyped_storage().data_ptr()
        found = []
        for k in self.ready():  # (kernel has left its queue: a kernel ordered after it looks ready too)
            deps = k.deps
            if idx < len(deps) and deps[idx] >= seq:
                continue
            if k.stream.idx != idx and is_update(k.op) and k.args and isinstance(k.args[0], torch.Tensor):
                if k.args[0].untyped_storage().data_ptr() == storage:
                    found.append(k)
        return found

    def _execute(self, kernel: Any) -> None:
        fills, checks = kernel.fills
        kernel.fills = kernel.deps = None
        if self.busy is not None:
            self._release(kernel)
        frozen = None  # (_frozen(checks), inline: this runs for every deferred kernel)
        for t, shape, stride, offset in checks:
            if t.shape != shape or t.stride() != stride or t.storage_offset() != offset:
                frozen = _frozen(checks)
                break
        if frozen is not None:
            kernel.args = refreeze(kernel.args, frozen)
            if kernel.kwargs:
                kernel.kwargs = {k: refreeze(v, frozen) for k, v in kernel.kwargs.items()}
        if fills is _NOT_RUN:
            # (run while submit is still issuing it: its outputs are handed back as they are, made
            # outside inference mode as eager makes them; submit is never inside a drain)
            try:
                with _NoTorchFunction():
                    kernel.fills = _Ran(kernel.run())
            except Exception as error:
                if self.error is None:
                    self.error = error
            return
        try:
            if self._contexts:
                result = kernel.run()
                if fills:
                    self._fill(result, fills)
            else:
                # (in inference mode: a placeholder or argument made in inference mode may be updated)
                with _NoTorchFunction(), _InferenceMode(True):
                    result = kernel.run()
                    if fills:
                        self._fill(result, fills)
        except Exception as error:  # raised at the next host sync; its outputs stay poisoned
            if self.error is None:
                self.error = error

    @staticmethod
    def _fill(result: Any, fills: list) -> None:
        for path, out, shape, stride in fills:
            value = result
            for i in path:
                value = value[i]
            if out.shape != shape or out.stride() != stride or out.storage_offset():
                out = out.as_strided(shape, stride, 0)  # (the pending output's metadata changed since issue)
            if value.shape != shape and value.numel() == 0:
                continue  # meta and CPU disagree about an unused output (batch norm's saved stats in eval)
            out.copy_(value)

    def drain(self, clock: Any) -> None:
        """Run kernels until every kernel ordered by ``clock`` has run."""
        if not self.pending:
            return  # (nothing queued: nothing to run, and every policy's settle runs queued kernels only)
        with self.session.lock:
            policy = self.policy
            if self.pending and self.blocked(clock):
                with self.contexts():
                    while self.pending and self.blocked(clock):
                        ready = self.ready()
                        if not ready:
                            raise InternalError("fake deferred scheduler: no kernel can run (a bug in streamkit)")
                        self.run(policy.pick(self, ready, clock))
            policy.settle(self)  # (what the kernels just run released)

    def drain_all(self) -> None:
        with self.session.lock:
            policy = self.policy
            if self.pending:
                with self.contexts():
                    while self.pending:
                        self.run(policy.pick(self, self.ready(), ()))

    @contextmanager
    def contexts(self) -> Iterator[None]:
        """The modes kernels run in (no torch function, inference mode), entered once for a batch
        of kernel runs rather than once per kernel."""
        if self._contexts:
            yield
            return
        self._contexts = True
        try:
            with _NoTorchFunction(), _InferenceMode(True):
                yield
        finally:
            self._contexts = False

    def progress(self, clock: Any) -> bool:
        """``query()``: run one kernel ``clock`` waits for (if any); whether all of them have run."""
        with self.session.lock:
            if self.pending and self.blocked(clock):
                ready = self.ready()
                wanted = [k for k in ready if needed(k, clock)] or ready
                self.run(min(wanted, key=lambda k: k.order))
            return not self.blocked(clock)

    def take_error(self) -> BaseException | None:
        error, self.error = self.error, None
        return error
