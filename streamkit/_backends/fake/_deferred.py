"""Deferred schedules: kernels wait in per-stream FIFO queues and run when a policy picks them.

A kernel may run when it heads its stream's queue and every kernel it is ordered after (its
stream's vector clock at issue, ``Kernel.deps``) has run. Host synchronizations run what they wait
for (:meth:`DeferredScheduler.drain`); the policy decides the order, and may run unrelated ready
work first. Fresh outputs are placeholders: CPU tensors of the layout a cached meta evaluation
gives, filled with poison (NaN, all bits set for integers, True for bool) until the kernel runs
and copies its values in. Kernels that can't be deferred run at once, after their dependencies
(:meth:`DeferredScheduler.run_now`): syncing ops, random ops (program order), collectives,
``resize_``, ops without a meta kernel or with data-dependent shapes, resized ``out=`` arguments,
outputs that alias an input other than as the input itself.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any

import torch

#: the schedules ``fake.session(schedule=...)`` accepts
SCHEDULES = ("eager", "lazy", "adversarial", "random", "pct", "race", "constraints")
#: ``schedule="pct"``: the default bug depth (priority change points = depth - 1)
PCT_DEPTH = 3
#: ``schedule="pct"``: the estimated number of steps (kernel issues plus kernel runs) among which
#: the change points are drawn
PCT_STEPS = 64
#: the host thread's key among the PCT priorities (streams have indices >= 0)
_HOST = -1
#: pending kernels beyond this run oldest first (CUDA's launch queue holds about 1k entries)
QUEUE_DEPTH = 1024
#: kernels a deferred session records for fake.explore (fingerprint, deviations); a longer session
#: stops recording (None), rather than keep every kernel object alive
TRACE_LIMIT = 1 << 17
#: ops that change storage sizes on the host side at issue: run at once
_AT_ONCE_NAMES = frozenset({"resize_", "set_", "resize_as_"})

_META = torch.device("meta")
_NoTorchFunction = torch._C.DisableTorchFunctionSubclass
_InferenceMode = torch._C._InferenceMode


class _AtOnce(Exception):
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
    found = _random_ops.get(op)
    if found is None:
        schema = getattr(op, "_schema", None)
        found = _random_ops[op] = schema is not None and (
            any("Generator" in str(a.type) for a in schema.arguments) or schema.name.split("::")[-1] in _AT_ONCE_NAMES
        )
    return found


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
                    raise _AtOnce  # a resized out= argument
                return ("arg", slot)
        if result._is_view():
            raise _AtOnce  # a view of an input: its memory is the input's
        return ("fresh", tuple(result.shape), result.stride(), result.dtype)
    if type(result) is list or type(result) is tuple:
        return (type(result), tuple(_template(r, metas, descs) for r in result))
    if result is None:
        return None
    raise _AtOnce  # a host value (a scalar): the host needs it now


def layout(call: Any, args: Any, kwargs: Any) -> tuple[Any, list]:
    """``(template, tensors)``: the outputs' layout from a meta evaluation, cached by the arguments'
    metadata; raises ``_AtOnce`` when the kernel can't be deferred."""
    slots: dict = {}
    tensors: list = []
    try:
        key = (call, _describe(tuple(args), slots, tensors), _describe(tuple(kwargs.items()), slots, tensors) if kwargs else None)
    except TypeError:
        raise _AtOnce from None
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
        raise _AtOnce
    return template, tensors


def _placeholders(template: Any, tensors: list, fills: list, path: tuple) -> Any:
    if template is None:
        return None
    tag = template[0]
    if tag == "arg":
        return tensors[template[1]]
    if tag == "fresh":
        _, shape, stride, dtype = template
        out = poison(torch.empty_strided(shape, stride, dtype=dtype))
        # the kernel fills the memory in the layout of issue time: an alias, so that an in-place
        # metadata change of the pending output (t_(), squeeze_(), resize_() shrinking) doesn't reach it
        fills.append((path, out.as_strided(shape, stride)))
        return out
    return tag(_placeholders(t, tensors, fills, path + (i,)) for i, t in enumerate(template[1]))


def _refreeze(value: Any, frozen: dict) -> Any:
    if isinstance(value, torch.Tensor):
        return frozen.get(id(value), value)
    if type(value) is list or type(value) is tuple:
        return type(value)(_refreeze(v, frozen) for v in value)
    return value


# -- the scheduler ---------------------------------------------------------------------------


class DeferredScheduler:
    """Kernels wait in per-stream queues; ``policy`` (a name in :data:`SCHEDULES`, not ``"eager"``)
    picks which ready kernel runs at each scheduling point. Deterministic for a given program,
    policy and seed."""

    runs_at_issue = False

    def __init__(self, session: Any, policy: str, seed: int, depth: int = PCT_DEPTH, target: Any = None) -> None:
        self.session = session
        # "race": lazy, except that the kernel ``target[1]`` (stream, seq) runs before ``target[0]``
        # whenever some legal order allows it (a race the detector reported, reversed)
        self.target = target
        self.target_ran = [False, False]
        # "constraints": eager order, except that a kernel named as the later one of a constraint
        # waits until the earlier one has run (``target`` is a ``_explore.Constraints``)
        self.constraints = None
        if policy == "constraints":
            self.constraints, self.target = target, None
        # every kernel handed to submit (issue order) and every kernel run (run order): a run's
        # fingerprint, deviations and constraint matching are computed from them (_explore.py)
        self.trace: list | None = []
        self.ran: list | None = []
        self.policy = policy
        self.seed = seed
        self.depth = depth
        self.rng = random.Random(f"{policy}:{seed}:{depth}" if policy == "pct" else f"{policy}:{seed}")
        self.pct = policy == "pct"
        if self.pct:
            # PCT (Burckhardt et al., ASPLOS 2010): the host and each stream are threads with
            # random initial priorities above depth - 1; at the i-th of depth - 1 change points
            # (random steps among PCT_STEPS) the thread taking that step drops to priority i.
            # Each scheduling point runs the highest-priority ready thread.
            self.step = 0
            points = sorted(self.rng.sample(range(1, PCT_STEPS + 1), min(depth - 1, PCT_STEPS)))
            self.changes = {step: i for i, step in enumerate(points, 1)}
            self.priority = {_HOST: depth + self.rng.random()}
        self.queues: dict[int, deque] = {}
        self.pending = 0
        self.order = 0  # issue number of the last deferred kernel
        self.error: BaseException | None = None  # the first kernel that failed when it ran

    # issue
    def submit(self, kernel: Any, sync: Any = None) -> Any:
        """Queue ``kernel`` (bound) and return its outputs: placeholders, or the arguments it writes."""
        trace = self.trace
        if trace is not None:
            if len(trace) < TRACE_LIMIT:
                trace.append(kernel)
            else:
                self.trace = self.ran = None
        if self.constraints is not None:
            self.constraints.issued(kernel)
        if sync is not None or _is_random(kernel.op):
            return self.run_now(kernel)
        try:
            template, tensors = layout(kernel.call, kernel.args, kernel.kwargs)
        except _AtOnce:
            return self.run_now(kernel)
        fills: list = []
        result = _placeholders(template, tensors, fills, ())
        # the kernel runs on the memory, with the layouts of issue time (a later metadata change
        # of an argument, such as unsqueeze_ or .data =, doesn't reach it)
        frozen = {id(t): t.as_strided(t.size(), t.stride(), t.storage_offset()) for t in tensors}
        kernel.args = _refreeze(kernel.args, frozen)
        if kernel.kwargs:
            kernel.kwargs = {k: _refreeze(v, frozen) for k, v in kernel.kwargs.items()}
        kernel.deps = list(kernel.stream.clock)
        kernel.fills = fills
        self.order += 1
        kernel.order = self.order
        queue = self.queues.get(kernel.stream.idx)
        if queue is None:
            queue = self.queues[kernel.stream.idx] = deque()
        queue.append(kernel)
        self.pending += 1
        if self.pending > QUEUE_DEPTH:
            self._run(min(self._ready(), key=lambda k: k.order))
        if self.policy == "random":
            rng = self.rng
            while self.pending and rng.random() < 0.5:  # the device makes progress meanwhile
                self._run(rng.choice(self._ready()))
        elif self.pct:
            self._pct_step(_HOST)  # the host took a step (the issue)
            host = self.priority[_HOST]
            while self.pending:  # device threads of higher priority than the host run meanwhile
                best = self._pct_best(self._ready())
                if self._pct_priority(best.stream.idx) < host:
                    break
                self._run(best)
                host = self.priority[_HOST]
        elif self.constraints is not None:
            self._release()
        return result

    def _release(self) -> None:
        """``"constraints"``: run every ready kernel no constraint holds back, oldest first (as
        eager would have run them at issue)."""
        held = self.constraints.held
        while self.pending:
            free = [k for k in self._ready() if not held(k)]
            if not free:
                return
            self._run(min(free, key=lambda k: k.order))

    # PCT
    def _pct_priority(self, thread: int) -> float:
        found = self.priority.get(thread)
        if found is None:  # (a stream's first kernel: its initial priority, drawn in issue order)
            found = self.priority[thread] = self.depth + self.rng.random()
        return found

    def _pct_best(self, ready: list) -> Any:
        return max(ready, key=lambda k: (self._pct_priority(k.stream.idx), -k.order))

    def _pct_step(self, thread: int) -> None:
        self.step += 1
        change = self.changes.get(self.step)
        if change is not None:
            self._pct_priority(thread)
            self.priority[thread] = change

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
        if self.constraints is not None:
            self.constraints.ran(kernel)
            self._release()
        return result

    # running
    def _blocked(self, clock: Any, skip: int = -1) -> bool:
        queues = self.queues
        for j, c in enumerate(clock):
            if j != skip:
                q = queues.get(j)
                if q and q[0].seq <= c:
                    return True
        return False

    def _ready(self) -> list:
        return [q[0] for q in self.queues.values() if q and not self._blocked(q[0].deps, q[0].stream.idx)]

    def _run(self, kernel: Any) -> None:
        self.queues[kernel.stream.idx].popleft()
        self.pending -= 1
        if self.ran is not None:
            self.ran.append(kernel)
        if self.constraints is not None:
            self.constraints.ran(kernel)
        if self.pct:
            self._pct_step(kernel.stream.idx)
        elif self.target is not None:
            key = (kernel.stream.idx, kernel.seq)
            for i in (0, 1):
                if key == self.target[i]:
                    self.target_ran[i] = True
        try:
            # (in inference mode: a placeholder or argument made in inference mode may be updated)
            with _NoTorchFunction(), _InferenceMode(True):
                result = kernel.run()
                for path, out in kernel.fills:
                    value = result
                    for i in path:
                        value = value[i]
                    if value.shape != out.shape and value.numel() == 0:
                        continue  # meta and CPU disagree about an unused output (batch norm's saved stats in eval)
                    out.copy_(value)
        except Exception as error:  # raised at the next host sync; its outputs stay poisoned
            if self.error is None:
                self.error = error
        kernel.fills = kernel.deps = None

    def _pick(self, ready: list, clock: Any) -> Any:
        def needed(k: Any) -> bool:
            i = k.stream.idx
            return i < len(clock) and k.seq <= clock[i]

        policy = self.policy
        if policy == "random":
            return self.rng.choice(ready)
        if policy == "constraints":
            # oldest first among the kernels no constraint holds back; when all are held, the
            # sync needs one anyway: the oldest it needs (its constraint is dropped, Constraints.ran)
            held = self.constraints.held
            free = [k for k in ready if not held(k)]
            wanted = [k for k in ready if needed(k)]
            return min(free or wanted or ready, key=lambda k: k.order)
        if policy == "pct":
            return self._pct_best(ready)
        if policy == "race" and not any(self.target_ran):
            first, second = self.target
            others = [k for k in ready if (k.stream.idx, k.seq) != first]
            for k in others:
                if (k.stream.idx, k.seq) == second:
                    return k
            if others:  # (anything but the first kernel: what the sync needs first, oldest first)
                wanted = [k for k in others if needed(k)]
                return min(wanted or others, key=lambda k: k.order)
        wanted = [k for k in ready if needed(k)]
        if policy == "lazy" or policy == "race":
            return min(wanted or ready, key=lambda k: k.order)
        # adversarial: the work the sync does not need first, newest first
        others = [k for k in ready if not needed(k)]
        return max(others or ready, key=lambda k: k.order)

    def drain(self, clock: Any) -> None:
        """Run kernels until every kernel ordered by ``clock`` has run."""
        with self.session._lock:
            while self.pending and self._blocked(clock):
                ready = self._ready()
                if not ready:
                    raise RuntimeError("fake deferred scheduler: no kernel can run (a bug in streamkit)")
                self._run(self._pick(ready, clock))
            if self.constraints is not None:
                self._release()  # (what the kernels just run released)

    def drain_all(self) -> None:
        with self.session._lock:
            while self.pending:
                self._run(self._pick(self._ready(), ()))

    def progress(self, clock: Any) -> bool:
        """``query()``: run one kernel ``clock`` waits for (if any); whether all of them have run."""
        with self.session._lock:
            if self.pending and self._blocked(clock):
                ready = self._ready()
                def needed(k: Any) -> bool:
                    i = k.stream.idx
                    return i < len(clock) and k.seq <= clock[i]
                wanted = [k for k in ready if needed(k)] or ready
                self._run(min(wanted, key=lambda k: k.order))
            return not self._blocked(clock)

    def take_error(self) -> BaseException | None:
        error, self.error = self.error, None
        return error
