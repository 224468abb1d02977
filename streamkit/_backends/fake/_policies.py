"""Schedule policies: which queued kernel runs at each scheduling point of a deferred schedule.

The queue mechanism (per-stream FIFO queues, readiness, placeholders, host syncs) is
:class:`._deferred.DeferredScheduler`; a policy only chooses, after Shuttle's ``Scheduler`` trait
(``new_execution`` / ``next_task``): every policy is one class with the same small interface
(:class:`Policy`), and :data:`POLICIES` is the one registry the schedule names, the short tokens
(parsing and formatting) and the argument checks of ``fake.session(schedule, seed, depth,
target)`` come from.

Policies (docs/exploration.md, "Schedules"): ``lazy``, ``adversarial``, ``random`` (the legacy
coin after each issue), ``rates`` (per-stream rates drawn per run: any stream may overtake any
other; racing read-modify-write kernels may be split), ``pct`` (Burckhardt et al., ASPLOS 2010),
``race`` (one race reversed), ``order`` (kernels held until others ran: a race at a chosen
position, every race reversed at once), ``split`` (one racing read-modify-write kernel split
around another: a lost update) and ``constraints`` (the shrunk, edit-proof form of a failure).
"""

from __future__ import annotations

import math
import operator
import random
from typing import Any, ClassVar

#: ``schedule="pct"``: the default bug depth (priority change points = depth - 1)
PCT_DEPTH = 3
#: ``schedule="pct"`` without a step count (tokens ``pct:SEED:DEPTH`` of earlier versions): the
#: change points are drawn among this many steps
PCT_STEPS = 64
#: the host thread's key among the PCT priorities (streams have indices >= 0)
HOST = -1

#: in-place ops that write ``self`` without reading it: not read-modify-write (not split)
_BLIND_WRITES = frozenset({"fill_", "zero_", "copy_", "set_", "resize_", "resize_as_", "detach_", "requires_grad_"})
#: in-place ops whose CUDA kernels update each element with an atomic, so two racing ones can't lose
#: an update (not split): scatter_add_/scatter_reduce_/scatter_(reduce=) (ScatterGatherKernel.cu,
#: ReduceAdd: fastAtomicAdd; gpuAtomicMul/Max/Min), index_add_/index_reduce_ (Indexing.cu,
#: indexFuncSmallIndex/LargeIndex: gpuAtomicAdd), put_(accumulate=True) (IndexKernel.cu, put_kernel:
#: fastAtomicAdd); without a reduction scatter_/put_ store without reading. (Under
#: torch.use_deterministic_algorithms(True) CUDA runs index_add_ and a 1-D scatter_add_ as a sorted
#: index_put_(accumulate=True), which isn't atomic: not modelled.)
_ATOMIC_UPDATES = frozenset({"scatter_add_", "scatter_reduce_", "scatter_", "index_add_", "index_reduce_", "put_"})
_rmw_ops: dict = {}


def is_rmw(op: Any) -> bool:
    """Whether ``op`` reads and writes its first argument in place without atomics (``add_``,
    ``mul_``, ``index_put_(accumulate=True)``...): two racing ones can lose an update on a GPU.
    ``scatter_add_`` and ``index_add_`` update with atomics on CUDA: not read-modify-write here."""
    entry = _rmw_ops.get(id(op))  # (by id: an OpOverload's __hash__ is Python code; the entry keeps op alive)
    if entry is not None:
        return entry[1]
    schema = getattr(op, "_schema", None)
    found = False
    if schema is not None and schema.arguments:
        name = schema.name.split("::")[-1]
        info = schema.arguments[0].alias_info
        found = bool(
            name.endswith("_") and name not in _BLIND_WRITES and name not in _ATOMIC_UPDATES and info is not None and info.is_write
            and sum(1 for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write) == 1
        )
    _rmw_ops[id(op)] = (op, found)
    return found


def is_update(op: Any) -> bool:
    """Whether ``op`` updates its first argument in place, atomically or not (:func:`is_rmw`, or
    ``scatter_add_``, ``index_add_``...): run between the read and the write of a racing
    read-modify-write kernel, its update is lost."""
    entry = _update_ops.get(id(op))
    if entry is None:
        entry = _update_ops[id(op)] = (op, is_rmw(op) or _op_name(op) in _ATOMIC_UPDATES)
    return entry[1]


_update_ops: dict = {}


def _op_name(op: Any) -> str:
    schema = getattr(op, "_schema", None)
    return schema.name.split("::")[-1] if schema is not None else ""


class ScheduleError(ValueError):
    """A schedule, seed, depth or target that ``fake.session`` doesn't accept."""


def _check_seed(seed: Any, where: str = "session(seed)") -> int:
    """An int (or an integer type such as numpy's, as an int); bool, float, str, list: refused."""
    if type(seed) is not int:
        try:
            if isinstance(seed, bool):
                raise TypeError
            seed = operator.index(seed)
        except TypeError:
            raise ScheduleError(f"{where}: expected an int, got {seed!r} ({type(seed).__name__})") from None
    return seed


def _kernel_pair(target: Any, where: str) -> tuple:
    try:
        pair = tuple((int(stream), int(seq)) for stream, seq in target)
        if len(pair) != 2 or any(type(v) is bool for k in target for v in k):
            raise ValueError
    except (TypeError, ValueError):
        raise ScheduleError(f"{where}: expected ((stream, seq), (stream, seq)), got {target!r}") from None
    return pair


def _kid(text: str) -> tuple[int, int]:
    stream, sep, seq = text.partition(".")
    if not (sep and stream.isdigit() and seq.isdigit()):
        raise ValueError(text)
    return int(stream), int(seq)


class Policy:
    """The interface every policy implements. A fresh instance drives one run (Shuttle's
    ``new_execution``); the scheduler (``sched``: the queues) calls:

    - :meth:`seen` for every kernel handed to the scheduler, deferred or not (issue order);
    - :meth:`after_issue` once a kernel was queued (the device may progress meanwhile);
    - :meth:`pick` when the host waits for ``clock`` (``()``: for everything): one ready kernel;
    - :meth:`ran` after a kernel ran; :meth:`settle` after a host sync or a kernel run at issue;
    - :meth:`split` before a read-modify-write kernel runs: a ready kernel to run between its read
      and its write (a lost update), or None.

    Class side: :attr:`name`, :meth:`check` (the session's arguments, normalized), :meth:`token`
    and :meth:`parse` (the short token's fields after the name)."""

    name: ClassVar[str] = ""
    #: whether :meth:`split` may return a kernel (the scheduler looks for partners only then)
    splits: ClassVar[bool] = False
    #: whether :meth:`fast` draws random numbers (then it is asked only for kernels that could be
    #: deferred, as :meth:`after_issue` would be; else before the meta evaluation, which it saves)
    fast_draws: ClassVar[bool] = False
    #: whether :meth:`fast` is also asked while kernels are queued (a True answer then runs the
    #: kernel at issue, and :meth:`after_fast` continues the turn :meth:`after_issue` would take)
    fast_queued: ClassVar[bool] = False
    #: whether :meth:`seen` is overridden (the scheduler calls it only then)
    sees: ClassVar[bool] = False
    #: what the token's fields are, for the error message of a malformed token
    token_form: ClassVar[str] = "NAME:SEED"

    def __init__(self, seed: int = 0, depth: int = PCT_DEPTH, target: Any = None) -> None:
        self.seed = seed
        self.depth = depth
        self.target = target
        self.rng = random.Random(f"{self.name}:{seed}")

    # -- the session's arguments and the token ---------------------------------------------------
    @classmethod
    def check(cls, seed: Any, depth: Any, target: Any) -> tuple[int, int, Any]:
        """``(seed, depth, target)`` as this policy takes them; :class:`ScheduleError` (a
        ValueError naming the argument) otherwise."""
        seed = _check_seed(seed)
        if target is not None:
            raise ScheduleError(
                f"session(target): schedule={cls.name!r} takes no target, got {target!r} (\"race\" and \"split\" take"
                " two kernels, \"order\" pairs of kernels, \"constraints\" pairs of fake.KernelId, \"pct\" a step count)"
            )
        return seed, depth, None

    @classmethod
    def token(cls, seed: int, depth: int, target: Any) -> str:
        return f"{cls.name}:{seed}"

    @classmethod
    def parse(cls, fields: list[str]) -> tuple[int, int, Any]:
        if len(fields) != 1 or not fields[0].lstrip("-").isdigit():
            raise ValueError(fields)
        return int(fields[0]), PCT_DEPTH, None

    # -- the run ------------------------------------------------------------------------------------
    def seen(self, kernel: Any) -> None:
        pass

    def fast(self, sched: Any, kernel: Any) -> bool:
        """Nothing is queued: whether ``kernel`` runs at once (then it isn't queued, and
        :meth:`after_issue` isn't called for it); a policy that says False has made the choice
        :meth:`after_issue` would make for it (it must not make it again)."""
        return False

    def after_issue(self, sched: Any, kernel: Any) -> None:
        pass

    def after_fast(self, sched: Any) -> None:
        """(:attr:`fast_queued` policies) ``fast`` ran a kernel at issue while others were queued:
        the rest of what :meth:`after_issue` would have done after running it first."""

    def cancel_fast(self) -> None:
        """``fast`` said False for a kernel that then ran at once (it can't be deferred): no
        :meth:`after_issue` comes for it, so the choice ``fast`` made for it is dropped."""

    def settle(self, sched: Any) -> None:
        pass

    def ran(self, kernel: Any) -> None:
        pass

    def ran_at_issue(self, kernel: Any) -> None:
        pass

    def split(self, sched: Any, kernel: Any, partners: list) -> Any:
        return None

    def pick(self, sched: Any, ready: list, clock: Any) -> Any:
        raise NotImplementedError


def needed(k: Any, clock: Any) -> bool:
    i = k.stream.idx
    return i < len(clock) and k.seq <= clock[i]


def _oldest(kernels: list) -> Any:
    return min(kernels, key=lambda k: k.order)


class Lazy(Policy):
    """Nothing runs at issue; a host sync runs only what it waits for, oldest first."""

    name = "lazy"

    def pick(self, sched: Any, ready: list, clock: Any) -> Any:
        return _oldest([k for k in ready if needed(k, clock)] or ready)


class Adversarial(Policy):
    """A host sync first runs every ready kernel it does not wait for, newest first; then what it
    waits for, newest ready first."""

    name = "adversarial"

    def pick(self, sched: Any, ready: list, clock: Any) -> Any:
        others = [k for k in ready if not needed(k, clock)]
        return max(others or ready, key=lambda k: k.order)


class Random(Policy):
    """After each issue, with probability 1/2 each time, a random ready kernel runs; a sync runs
    random ready kernels until it is met. (The policy of earlier versions, kept so that their
    ``random:SEED`` tokens replay bit for bit; explore's random runs are :class:`Rates`.)"""

    name = "random"
    _decided = False  # (no fast path: this legacy policy keeps its exact draws, fast() says False)

    def after_issue(self, sched: Any, kernel: Any) -> None:
        if self._decided:
            self._decided = False
            return
        rng = self.rng
        while sched.pending and rng.random() < 0.5:  # the device makes progress meanwhile
            sched.run(rng.choice(sched.ready()))

    def pick(self, sched: Any, ready: list, clock: Any) -> Any:
        return self.rng.choice(ready)


class Rates(Policy):
    """Random with per-stream rates: the host and each stream draw a rate (log-uniform over
    [1/64, 64], a stream when its first kernel is considered); at every scheduling point the next
    step is the host's (after an issue) or a ready stream's, with probability proportional to the
    rates. A fast stream drains before slow ones start, so any stream can overtake any other
    (unlike :class:`Random`, whose coin drains earlier chains first). A read-modify-write kernel
    with a ready racing partner is split around it (its read, the partner, its write) with
    probability 1/2: the lost update of two unordered ``add_``."""

    name = "rates"
    splits = True
    fast_draws = True

    def __init__(self, seed: int = 0, depth: int = PCT_DEPTH, target: Any = None) -> None:
        super().__init__(seed, depth, target)
        self.rates: dict[int, float] = {HOST: self._draw()}

    def _draw(self) -> float:
        return 2.0 ** self.rng.uniform(-6.0, 6.0)

    def _rate(self, stream: int) -> float:
        found = self.rates.get(stream)
        if found is None:
            found = self.rates[stream] = self._draw()
        return found

    def _choose(self, ready: list, host: float) -> Any:
        rates = self.rates  # (rates are > 0: a missing one is drawn, in the order of ready)
        weights = [rates.get(k.stream.idx) or self._rate(k.stream.idx) for k in ready]
        r = self.rng.random() * (sum(weights) + host)
        for k, w in zip(ready, weights):
            if r < w:
                return k
            r -= w
        return None  # (the host's step)

    _decided = False

    def fast(self, sched: Any, kernel: Any) -> bool:
        # (_choose([kernel], host), inline: the same draws and sums)
        idx = kernel.stream.idx
        weight = self.rates.get(idx) or self._rate(idx)
        if self.rng.random() * (weight + self.rates[HOST]) < weight:
            return True
        self._decided = True
        return False

    def cancel_fast(self) -> None:
        self._decided = False

    def after_issue(self, sched: Any, kernel: Any) -> None:
        if self._decided:
            self._decided = False
            return
        host = self.rates[HOST]
        while sched.pending:
            k = self._choose(sched.ready(), host)
            if k is None:
                return
            sched.run(k)

    def pick(self, sched: Any, ready: list, clock: Any) -> Any:
        return self._choose(ready, 0.0) or ready[-1]

    def split(self, sched: Any, kernel: Any, partners: list) -> Any:
        if self.rng.random() < 0.5:
            return self.rng.choice(partners)
        return None


class PCT(Policy):
    """PCT (Burckhardt et al., ASPLOS 2010): the host and each stream are threads with random
    initial priorities above ``depth - 1``; at the i-th of ``depth - 1`` change points (random
    steps among ``k``, the run's step count estimated from the eager run: ``target``) the thread
    taking that step drops to priority i. Each scheduling point runs the highest-priority ready
    thread: after an issue, kernels run while their stream outranks the host. A step is the host
    issuing a deferred kernel or a deferred kernel running."""

    name = "pct"
    token_form = "pct:SEED:DEPTH[:STEPS]"
    fast_draws = True

    def __init__(self, seed: int = 0, depth: int = PCT_DEPTH, target: Any = None) -> None:
        self.seed, self.depth, self.target = seed, depth, target
        steps = PCT_STEPS if target is None else target
        # (the legacy seed string without a step count: pct:SEED:DEPTH tokens replay bit for bit)
        self.rng = random.Random(f"pct:{seed}:{depth}" if target is None else f"pct:{seed}:{depth}:{steps}")
        self.step = 0
        points = sorted(self.rng.sample(range(1, steps + 1), min(depth - 1, steps)))
        self.changes = {step: i for i, step in enumerate(points, 1)}
        self.priority: dict[int, float] = {HOST: depth + self.rng.random()}

    @classmethod
    def check(cls, seed: Any, depth: Any, target: Any) -> tuple[int, int, Any]:
        seed = _check_seed(seed)
        if target is not None and (type(target) is not int or target < 1):
            raise ScheduleError(f"session(target): schedule=\"pct\" takes a step count (an int >= 1) or None, got {target!r}")
        return seed, depth, target

    @classmethod
    def token(cls, seed: int, depth: int, target: Any) -> str:
        return f"pct:{seed}:{depth}" + (f":{target}" if target is not None else "")

    @classmethod
    def parse(cls, fields: list[str]) -> tuple[int, int, Any]:
        if len(fields) not in (2, 3) or not fields[0].lstrip("-").isdigit() or not all(f.isdigit() for f in fields[1:]):
            raise ValueError(fields)
        depth = int(fields[1])
        steps = int(fields[2]) if len(fields) == 3 else None
        if depth < 1 or steps == 0:
            raise ValueError(fields)
        return int(fields[0]), depth, steps

    def _priority(self, thread: int) -> float:
        found = self.priority.get(thread)
        if found is None:  # (a stream's first kernel: its initial priority, drawn in issue order)
            found = self.priority[thread] = self.depth + self.rng.random()
        return found

    def _best(self, ready: list) -> Any:
        """The ready kernel of the highest-priority stream, the oldest of it (priorities drawn in
        the order of ``ready``)."""
        priority = self.priority
        best = None
        top = 0.0
        for k in ready:
            p = priority.get(k.stream.idx)
            if p is None:
                p = self._priority(k.stream.idx)
            if best is None or p > top or (p == top and k.order < best.order):
                best, top = k, p
        return best

    def _step(self, thread: int) -> None:
        self.step += 1
        change = self.changes.get(self.step)
        if change is not None:
            self._priority(thread)
            self.priority[thread] = change

    _stepped = False

    fast_queued = True

    def fast(self, sched: Any, kernel: Any) -> bool:
        if self.target is None:
            return False  # (legacy pct:SEED:DEPTH tokens: the exact path of earlier versions)
        self._step(HOST)  # the host took a step (the issue)
        if not sched.pending:
            if self._priority(kernel.stream.idx) >= self.priority[HOST]:
                return True
        elif self._first(sched, kernel):
            return True
        self._stepped = True
        return False

    def _first(self, sched: Any, kernel: Any) -> bool:
        """With kernels queued: whether :meth:`after_issue` would run ``kernel`` first (it is ready,
        its stream outranks the host and every stream with queued work), so it may run at issue.
        No when its stream has no priority yet (drawing it here would change the draws' order)."""
        priority = self.priority
        mine = priority.get(kernel.stream.idx)
        if mine is None or mine < priority[HOST]:
            return False
        own = kernel.stream.idx
        queues = sched.queues
        for i, q in queues.items():
            if q:
                p = priority.get(i)
                if i == own or p is None or p >= mine:
                    return False
        return not sched.blocked(kernel.stream.clock, own)

    def after_fast(self, sched: Any) -> None:
        self._higher(sched)

    def cancel_fast(self) -> None:
        self._stepped = False  # (the host's step for the issue was taken)

    def after_issue(self, sched: Any, kernel: Any) -> None:
        if self._stepped:
            self._stepped = False
        else:
            self._step(HOST)  # the host took a step (the issue)
        self._higher(sched)

    def _higher(self, sched: Any) -> None:
        host = self.priority[HOST]
        while sched.pending:  # device threads of higher priority than the host run meanwhile
            if self._below(sched, host):
                break
            best = self._best(sched.ready())
            if self._priority(best.stream.idx) < host:
                break
            sched.run(best)
            host = self.priority[HOST]

    def _below(self, sched: Any, host: float) -> bool:
        """Whether every stream with queued work has a priority below ``host`` (then no ready kernel
        outranks the host: :meth:`after_issue` stops without looking for ready ones). False when one
        has no priority yet (drawing it here would change the draws' order)."""
        priority = self.priority
        for i, q in sched.queues.items():
            if q:
                p = priority.get(i)
                if p is None or p >= host:
                    return False
        return True

    def ran(self, kernel: Any) -> None:
        # (a deferred kernel's run is a step; one run at issue is not): _step, inline
        self.step += 1
        change = self.changes.get(self.step)
        if change is not None:
            thread = kernel.stream.idx
            self._priority(thread)
            self.priority[thread] = change

    def pick(self, sched: Any, ready: list, clock: Any) -> Any:
        return self._best(ready)


class Race(Policy):
    """``target = (first, second)``, two kernels as ``(stream, seq)``: lazy, except that while
    neither has run, the second runs as soon as it is ready and the first only when nothing else
    can (a race the detector reported, reversed)."""

    name = "race"
    token_form = "race:S.N:S.N"

    def __init__(self, seed: int = 0, depth: int = PCT_DEPTH, target: Any = None) -> None:
        super().__init__(seed, depth, target)
        self.target_ran = [False, False]

    @classmethod
    def check(cls, seed: Any, depth: Any, target: Any) -> tuple[int, int, Any]:
        _check_seed(seed)  # (unused: the schedule is the target's)
        if target is None:
            raise ScheduleError(f"session(target): schedule={cls.name!r} takes target=((stream, seq), (stream, seq))")
        return 0, PCT_DEPTH, _kernel_pair(target, "session(target)")

    @classmethod
    def token(cls, seed: int, depth: int, target: Any) -> str:
        (i, a), (j, b) = target
        return f"{cls.name}:{i}.{a}:{j}.{b}"

    @classmethod
    def parse(cls, fields: list[str]) -> tuple[int, int, Any]:
        if len(fields) != 2:
            raise ValueError(fields)
        return 0, PCT_DEPTH, (_kid(fields[0]), _kid(fields[1]))

    def ran(self, kernel: Any) -> None:
        key = (kernel.stream.idx, kernel.seq)
        for i in (0, 1):
            if key == self.target[i]:
                self.target_ran[i] = True

    def pick(self, sched: Any, ready: list, clock: Any) -> Any:
        if not any(self.target_ran):
            first, second = self.target
            others = [k for k in ready if (k.stream.idx, k.seq) != first]
            for k in others:
                if (k.stream.idx, k.seq) == second:
                    return k
            if others:  # (anything but the first kernel: what the sync needs first, oldest first)
                return _oldest([k for k in others if needed(k, clock)] or others)
        return _oldest([k for k in ready if needed(k, clock)] or ready)


class PairHolds:
    """Pairs ``(a, b)`` of kernel keys: the kernel named ``b`` is held until the one named ``a`` has
    run. A host sync that needs a held kernel runs it anyway: its pairs are then in :attr:`dropped`.
    (The ``"order"`` policy and the ``"constraints"`` rule keep their pairs here.)"""

    def __init__(self, pairs: Any) -> None:
        self.waiting: dict = {}  # b key -> keys of the kernels it still waits for
        self.blocks: dict = {}  # a key -> keys of the kernels waiting for it
        for a, b in pairs:
            self.waiting.setdefault(b, set()).add(a)
            self.blocks.setdefault(a, []).append(b)
        self.dropped: list = []  # (a key, b key) pairs a host sync overrode

    def names(self, key: Any) -> bool:
        """Whether some pair names ``key``."""
        return key in self.waiting or key in self.blocks

    def held(self, key: Any) -> bool:
        return key is not None and bool(self.waiting.get(key))

    def ran(self, key: Any) -> None:
        """The kernel named ``key`` ran: the kernels it held may run."""
        if key is None:
            return
        left = self.waiting.pop(key, None)
        if left:
            self.dropped.extend((a, key) for a in left)
        for b in self.blocks.pop(key, ()):
            waiting = self.waiting.get(b)
            if waiting is not None:
                waiting.discard(key)


class _Holds(Policy):
    """Eager order (each kernel runs as soon as it is ready, oldest first), except that a kernel
    named as the later one of a pair ``(a, b)`` waits until ``a`` has run. A host sync that needs a
    held kernel runs it anyway (its pairs are then in :attr:`dropped`). Subclasses name kernels."""

    def _setup(self, pairs: Any) -> None:
        self.holds = PairHolds(pairs)

    @property
    def dropped(self) -> list:
        return self.holds.dropped

    def key(self, kernel: Any) -> Any:
        raise NotImplementedError

    def held(self, kernel: Any) -> bool:
        return self.holds.held(self.key(kernel))

    def ran(self, kernel: Any) -> None:
        self.holds.ran(self.key(kernel))

    def settle(self, sched: Any) -> None:
        """Run every ready kernel no pair holds back, oldest first (as eager would at issue)."""
        while sched.pending:
            free = [k for k in sched.ready() if not self.held(k)]
            if not free:
                return
            sched.run(_oldest(free))

    after_issue = lambda self, sched, kernel: self.settle(sched)  # noqa: E731

    def ran_at_issue(self, kernel: Any) -> None:
        self.ran(kernel)

    def fast(self, sched: Any, kernel: Any) -> bool:
        return not self.held(kernel)

    def pick(self, sched: Any, ready: list, clock: Any) -> Any:
        # oldest first among the kernels no pair holds back; when all are held, the sync needs one
        # anyway: the oldest it needs (its pairs are dropped, ran())
        free = [k for k in ready if not self.held(k)]
        return _oldest(free or [k for k in ready if needed(k, clock)] or ready)


class Order(_Holds):
    """``target``: pairs ``(a, b)`` of kernels as ``(stream, seq)``; ``b`` waits until ``a`` has
    run, everything else runs as eager would. explore's directed runs: a race at each position
    among the writes it races with (the needle sweep), every race reversed at once."""

    name = "order"
    token_form = "order:S.N-S.N[,S.N-S.N...]"

    def __init__(self, seed: int = 0, depth: int = PCT_DEPTH, target: Any = None) -> None:
        super().__init__(seed, depth, target)
        self._setup(target)

    @classmethod
    def check(cls, seed: Any, depth: Any, target: Any) -> tuple[int, int, Any]:
        _check_seed(seed)
        if not target:
            raise ScheduleError("session(target): schedule=\"order\" takes pairs ((stream, seq), (stream, seq)), at least one")
        try:
            pairs = tuple(_kernel_pair(pair, "session(target)") for pair in target)
        except TypeError:
            raise ScheduleError(f"session(target): schedule=\"order\" takes pairs ((stream, seq), (stream, seq)), got {target!r}") from None
        return 0, PCT_DEPTH, pairs

    @classmethod
    def token(cls, seed: int, depth: int, target: Any) -> str:
        return "order:" + ",".join(f"{i}.{a}-{j}.{b}" for (i, a), (j, b) in target)

    @classmethod
    def parse(cls, fields: list[str]) -> tuple[int, int, Any]:
        if len(fields) != 1 or not fields[0]:
            raise ValueError(fields)
        pairs = []
        for item in fields[0].split(","):
            a, sep, b = item.partition("-")
            if not sep:
                raise ValueError(item)
            pairs.append((_kid(a), _kid(b)))
        return 0, PCT_DEPTH, tuple(pairs)

    def key(self, kernel: Any) -> Any:
        return (kernel.stream.idx, kernel.seq)


class Split(Race):
    """``target = (first, second)``, two racing read-modify-write kernels as ``(stream, seq)``:
    eager order, except that ``first`` waits until ``second`` is ready too, then runs split around
    it: ``first`` reads, ``second`` runs, ``first`` writes (what two unordered ``add_`` on a GPU may
    do: an update lost)."""

    name = "split"
    token_form = "split:S.N:S.N"
    splits = True

    def __init__(self, seed: int = 0, depth: int = PCT_DEPTH, target: Any = None) -> None:
        super().__init__(seed, depth, target)
        self.done = False

    def ran(self, kernel: Any) -> None:
        if (kernel.stream.idx, kernel.seq) in self.target:
            self.done = True

    def _held(self, k: Any) -> bool:
        return not self.done and (k.stream.idx, k.seq) in self.target

    def fast(self, sched: Any, kernel: Any) -> bool:
        return not self._held(kernel)

    def settle(self, sched: Any) -> None:
        while sched.pending:
            ready = sched.ready()
            if not self.done:
                keys = {(k.stream.idx, k.seq): k for k in ready}
                first, second = self.target
                if first in keys and second in keys:
                    sched.run(keys[first])  # (split() hands it the second)
                    continue
            free = [k for k in ready if not self._held(k)]
            if not free:
                return
            sched.run(_oldest(free))

    after_issue = lambda self, sched, kernel: self.settle(sched)  # noqa: E731

    def pick(self, sched: Any, ready: list, clock: Any) -> Any:
        free = [k for k in ready if not self._held(k)]
        return _oldest(free or [k for k in ready if needed(k, clock)] or ready)

    def split(self, sched: Any, kernel: Any, partners: list) -> Any:
        if not self.done and (kernel.stream.idx, kernel.seq) == self.target[0]:
            for k in partners:
                if (k.stream.idx, k.seq) == self.target[1]:
                    return k
        return None


class ConstraintsPolicy(_Holds):
    """``target``: a :class:`._tokens.Constraints` (pairs of :class:`._tokens.KernelId`, matched
    by name as kernels are issued); the rule of :class:`_Holds`."""

    name = "constraints"
    token_form = "constraints/FINGERPRINT/CONSTRAINTS"

    def __init__(self, seed: int = 0, depth: int = PCT_DEPTH, target: Any = None) -> None:
        super().__init__(seed, depth, target)
        self.rule = target
        self.holds = PairHolds(())  # (the rule keeps the pairs)

    @classmethod
    def check(cls, seed: Any, depth: Any, target: Any) -> tuple[int, int, Any]:
        # (pairs of fake.KernelId are made a _tokens.Constraints by _tokens.resolve_schedule)
        _check_seed(seed)
        if target is None or not all(hasattr(target, m) for m in ("issued", "held", "ran")):
            raise ScheduleError(
                f"session(target): schedule=\"constraints\" takes pairs of fake.KernelId (or use schedule=TOKEN), got {target!r}"
            )
        return 0, PCT_DEPTH, target

    @classmethod
    def token(cls, seed: int, depth: int, target: Any) -> str:
        return "constraints"

    @classmethod
    def parse(cls, fields: list[str]) -> tuple[int, int, Any]:
        if fields:
            raise ValueError(fields)
        return 0, PCT_DEPTH, None

    sees = True

    def seen(self, kernel: Any) -> None:
        self.rule.issued(kernel)

    def held(self, kernel: Any) -> bool:
        return self.rule.held(kernel)

    def ran(self, kernel: Any) -> None:
        self.rule.ran(kernel)

    ran_at_issue = ran


class Eager(Policy):
    """Every kernel runs at issue (no queue: :class:`._tracking.EagerScheduler`)."""

    name = "eager"


#: the registry: schedule name -> policy class (``"eager"`` has no queue)
POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (Eager, Lazy, Adversarial, Random, Rates, PCT, Race, Order, Split, ConstraintsPolicy)
}
#: the schedules ``fake.session(schedule=...)`` accepts
SCHEDULES = tuple(POLICIES)
#: the schedules named by ``NAME:SEED`` alone
SEEDED = tuple(name for name, cls in POLICIES.items() if cls.token_form == "NAME:SEED")


def token_format() -> str:
    """The short tokens, from the registry."""
    forms = [f"'{n}:SEED'" for n in SEEDED] + [f"'{c.token_form}'" for c in POLICIES.values() if c.token_form != "NAME:SEED"]
    return ", ".join(forms)


def check_args(schedule: str, seed: Any, depth: Any, target: Any) -> tuple[str, int, int, Any]:
    """``fake.session``'s ``(schedule, seed, depth, target)`` checked and normalized by the
    registry; :class:`ScheduleError` naming the argument, the value and what is accepted."""
    cls = POLICIES.get(schedule) if isinstance(schedule, str) else None
    if cls is None:
        raise ScheduleError(f"session(schedule): expected one of {', '.join(map(repr, SCHEDULES))} or a token, got {schedule!r}")
    if type(depth) is not int or depth < 1:
        raise ScheduleError(f"session(depth): expected an int >= 1, got {depth!r}")
    seed, depth, target = cls.check(seed, depth, target)
    return schedule, seed, depth, target


def short_token(schedule: str, seed: int, depth: int, target: Any) -> str:
    """The short token of a schedule (the registry's format)."""
    return POLICIES[schedule].token(seed, depth, target)


def parse_short(text: str) -> tuple[str, int, int, Any]:
    """A short token as ``(schedule, seed, depth, target)``; ValueError otherwise."""
    name, *fields = text.split(":")
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(text)
    seed, depth, target = cls.parse(fields)
    return name, seed, depth, target


def policy(schedule: str, seed: int, depth: int, target: Any) -> Policy:
    """A fresh policy for one run."""
    return POLICIES[schedule](seed, depth, target)


def run_seed(seed: int, index: int, kind: str = "") -> int:
    """The seed of explore's ``index``-th run of ``kind``, from its ``seed``: a hash, so nearby
    explore seeds don't repeat each other's runs (31 bits: tokens stay short)."""
    import zlib

    return zlib.crc32(f"{seed}:{kind}:{index}".encode()) & 0x7FFFFFFF


def pct_bound(threads: int, steps: int, depth: int) -> float:
    """PCT's guaranteed probability per run of finding a bug of depth ``depth`` in a program of
    ``threads`` threads and ``steps`` steps: 1 / (n k^(d-1)) (Burckhardt et al., Theorem 9)."""
    return 1.0 / (max(threads, 1) * math.pow(max(steps, 1), depth - 1))
