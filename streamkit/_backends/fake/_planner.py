"""The exploration planner: what ``fake.explore`` (one process or several ranks) and the
``streamkit_explore`` pytest marker run, in which order (docs/exploration.md, "The plan").

The eager reference run is observed (:class:`Observation`): every kernel's accesses (storage,
bytes, read or write) and the clock it was issued under, every occurrence of every race (not just
the first, which the report keeps), the storages the returned values and host reads come from,
and the number of kernels. From that:

- **directed runs** (:func:`directed_slots`): every race reversed at once; per race, its first
  and its last occurrence reversed (``race:``); a racing read-modify-write pair split
  (``split:``, a lost update); and the needle sweep, one run per write the racing access may
  fall between (``order:``: it runs after the ``i``-th of the unordered writes to its bytes and
  before the ``i+1``-th). Races whose kernels reach the returned values come first.
- **undirected runs** (:func:`undirected_slots`): PCT with change points over the real step count
  (``pct:SEED:DEPTH:STEPS``: twice the focus kernels, the steps a run takes; depths cycling 1, 2, 3, 4), random runs with per-stream rates
  (``rates:SEED``), adversarial and lazy. Seeds are hashes of (explore's seed, run index).
- :func:`interleave` mixes them from the first schedules on, so no flood of benign races starves
  the random search.

Every run but the constraint form orders only the **focus** (:meth:`Observation.focus`): the
kernels of every race and those that touched a storage some race was on; the rest run at issue
(:meth:`._deferred.DeferredScheduler.set_focus` says why no value is lost or added).
"""

from __future__ import annotations

import ctypes
import functools
import weakref
import itertools
import zlib
from typing import Any, Iterator, NamedTuple

import torch

from ._policies import PCT_DEPTH, is_rmw, is_update, run_seed
from ._tracking import READ, WRITE

#: the needle sweep: at most this many positions per race
NEEDLE_POSITIONS = 48
#: kernels the reference run's observation records at most
OBSERVE_LIMIT = 1 << 17
#: "every race reversed at once": at most this many occurrences
REVERSE_ALL_PAIRS = 512
#: the needle sweep compares what a racing read would find at each position for storages up to
#: this size (a CRC of the bytes, in the eager reference run only)
CONTENT_BYTES = 1 << 16
#: ops whose kernel hands values to the host (their reads are sinks: they reach what fn returns)
_HOST_READS = frozenset({"_local_scalar_dense", "_to_copy", "equal", "nonzero", "bincount", "unique", "masked_select", "allclose"})


class Slot(NamedTuple):
    """One planned run: ``fake.session(schedule=schedule, seed=seed, depth=depth, target=target)``."""

    schedule: str
    seed: int
    depth: int = PCT_DEPTH
    target: Any = None


class _Kernel(NamedTuple):
    op: Any
    index: int  # issue order
    clock: tuple  # the stream's clock at issue, merged with the host's
    accesses: tuple  # (storage key, lo, hi, kind)


class Observation:
    """What the eager reference run did (filled by the hooks :meth:`install` sets on its session)."""

    def __init__(self) -> None:
        self.kernels: dict[tuple[int, int], _Kernel] = {}
        self.occurrences: list[tuple] = []  # (race key, (stream, seq), (stream, seq), first kind, second kind)
        # storages named by key, by id while they live (weak: keeping them alive would keep their
        # blocks from being freed, and the reference run would miss free races and reuse)
        self._state_keys: dict[int, int] = {}
        self._state_refs: dict[int, Any] = {}
        self.sinks: set[int] = set()
        self.raced: set[int] = set()  # storage keys some race (access, free) was on
        self.racers: set[tuple[int, int]] = set()  # kernels of every race, host races included

    # -- the hooks --------------------------------------------------------------------------------
    def install(self, session: Any) -> None:
        """Observe ``session`` (the eager reference run's): wraps its access check and sets its
        race hook. (The session's ``_check``, the detector's bound check, is the one call every
        kernel's accesses pass through.)"""
        check = session._check
        host = session.clocks.host
        kernels = self.kernels
        key_of = self._key

        # a storage's content (CRC) as of now, by storage key, with its size then: computed once
        # between two writes to it (a kernel that writes it drops it, before it runs)
        contents: dict = {}

        def observed(accesses: list, stream: Any, kernel: Any) -> None:
            check(accesses, stream, kernel)
            if len(kernels) >= OBSERVE_LIMIT:
                return  # (memory: the plan uses the first kernels of a very long run)
            clock = stream.clock
            merged = tuple(max(c, host[i]) if i < len(host) else c for i, c in enumerate(clock))
            # (the eager run: the kernel runs after this check, so the content is what it finds)
            records = []
            for t, kind in accesses:
                key = key_of(t.sk_state)
                records.append((key, t.sk_lo, t.sk_hi, kind, _cached_content(contents, key, t)))
            for record in records:
                if record[3] == WRITE:
                    contents.pop(record[0], None)  # (stale once it runs)
            kernels[(stream.idx, kernel.seq)] = _Kernel(kernel.op, len(kernels), merged, tuple(records))

        session._check = observed
        session.race_hook = self._race
        session.on_raced = self._raced

    def _key(self, state: Any) -> int:
        sid = id(state)
        key = self._state_keys.get(sid)
        if key is None:
            key = self._state_keys[sid] = len(self._state_refs)
            self._state_refs[key] = weakref.ref(state, functools.partial(self._gone, sid, key))
        return key

    def _gone(self, sid: int, key: int, ref: Any) -> None:
        if self._state_keys.get(sid) == key:
            del self._state_keys[sid]  # (its id may name a new storage now)

    def _race(self, earlier: Any, earlier_kind: Any, kernel: Any, kind: Any) -> bool:
        first = earlier.kernel
        self.occurrences.append((
            race_key(earlier, earlier_kind, kernel, kind),
            (first.stream.idx, first.seq), (kernel.stream.idx, kernel.seq), earlier_kind, kind,
        ))
        return False  # (the report is built as usual)

    def _raced(self, state: Any, kernels: tuple) -> None:
        if state is not None:
            self.raced.add(self._key(state))
        self.racers.update((k.stream.idx, k.seq) for k in kernels if k.seq)

    def returned(self, values: Any) -> None:
        """The fake tensors ``fn`` returned: their storages are sinks."""
        st = getattr(values, "sk_state", None)
        if st is not None:
            self.sinks.add(self._key(st))
        elif isinstance(values, (list, tuple)):
            for v in values:
                self.returned(v)
        elif isinstance(values, dict):
            for v in values.values():
                self.returned(v)

    def release(self) -> None:
        """Drop the storages (the run is over; keys stay valid as numbers)."""
        self._state_keys = {}
        self._state_refs = {}

    # -- what the plan reads ------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """PCT's step count k: every kernel issued and run."""
        return max(2 * len(self.kernels), 2)

    def focus(self) -> frozenset | None:
        """The kernels whose order may change values (:meth:`._deferred.DeferredScheduler.set_focus`):
        every kernel of a race and every kernel that touched a storage some race was on. None when
        the observation is cut short (:data:`OBSERVE_LIMIT`): then every kernel is a focus."""
        if len(self.kernels) >= OBSERVE_LIMIT:
            return None
        raced = self.raced
        found = set(self.racers)
        if raced:
            for key, k in self.kernels.items():
                for a in k.accesses:
                    if a[0] in raced:
                        found.add(key)
                        break
        return frozenset(found)

    @property
    def streams(self) -> int:
        return len({s for s, _ in self.kernels}) or 1

    def relevant(self) -> set[tuple[int, int]]:
        """The kernels whose results may reach what ``fn`` returns or the host reads: a backward
        pass from the sinks over storages (conservative: a write doesn't kill)."""
        live = set(self.sinks)
        for k in self.kernels.values():
            if _op_name(k.op) in _HOST_READS:
                live.update(a[0] for a in k.accesses if a[3] == READ)
        found = set()
        for key, k in sorted(self.kernels.items(), key=lambda item: -item[1].index):
            if any(a[3] == WRITE and a[0] in live for a in k.accesses) or _op_name(k.op) in _HOST_READS:
                found.add(key)
                live.update(a[0] for a in k.accesses if a[3] == READ)
        return found

    def conflict(self, a: tuple[int, int], b: tuple[int, int]) -> bool:
        """Whether kernels ``a`` and ``b`` (``(stream, seq)``) touch common bytes, one of them writing."""
        ka, kb = self.kernels.get(a), self.kernels.get(b)
        if ka is None or kb is None:
            return False
        for sa, lo, hi, kind, _ in ka.accesses:
            for sb, lo2, hi2, kind2, _ in kb.accesses:
                if sa == sb and lo < hi2 and lo2 < hi and (kind == WRITE or kind2 == WRITE):
                    return True
        return False

    def ordered(self, a: tuple[int, int], b: tuple[int, int]) -> bool:
        """Whether kernel ``a`` is ordered before kernel ``b`` (b's clock at issue covers a)."""
        kb = self.kernels.get(b)
        if kb is None:
            return False
        s, n = a
        return s == b[0] and n <= b[1] or (s < len(kb.clock) and kb.clock[s] >= n)


def _cached_content(contents: dict, key: int, tensor: Any) -> int | None:
    """:func:`_content`, from ``contents`` (by storage key: ``(size, crc)``, ``crc`` None once a
    kernel wrote the storage) while the storage has its size of then (a resize that changes bytes
    without a write access computes it again)."""
    inner = getattr(tensor, "sk_inner", None)
    if inner is None:
        return None
    storage = inner.untyped_storage()
    size = storage.nbytes()
    found = contents.get(key)
    if found is not None and found[0] == size and found[1] is not None:
        return found[1]
    crc = _storage_crc(storage, size)
    contents[key] = (size, crc)
    return crc


def _content(tensor: Any) -> int | None:
    """A CRC of the whole storage's bytes as the eager run has them now (small storages only):
    the needle sweep skips positions whose value the racing access would read anyway."""
    inner = getattr(tensor, "sk_inner", None)
    if inner is None:
        return None
    storage = inner.untyped_storage()
    return _storage_crc(storage, storage.nbytes())


def _storage_crc(storage: Any, size: int) -> int | None:
    if not size or size > CONTENT_BYTES or storage.device.type != "cpu":
        return None
    # (read in place, no tensor op: a CPU storage's bytes at its address; numpy() on the storage
    # would make it non-resizable for the program's out= ops)
    return zlib.crc32((ctypes.c_char * size).from_address(storage.data_ptr()))


def race_key(earlier: Any, earlier_kind: Any, kernel: Any, kind: Any) -> tuple:
    """A race by its two kernels' ops, issue sites (the innermost user frame: the frames above
    ``fn`` differ between explore's runs) and kinds: the occurrences of a race in a loop share it."""
    first = earlier.kernel
    return (first.op, first.site[0] if first.site else None, earlier_kind, kernel.op, kernel.site[0] if kernel.site else None, kind)


_OP_NAMES: dict = {}


def _op_name(op: Any) -> str:
    name = _OP_NAMES.get(op)
    if name is None:
        schema = getattr(op, "_schema", None)
        name = _OP_NAMES[op] = schema.name.split("::")[-1] if schema is not None else str(op)
    return name


# -- directed runs ----------------------------------------------------------------------------------


def _needles(obs: Observation, first: tuple, second: tuple, first_kind: Any, second_kind: Any) -> list[Slot]:
    """The needle sweep of one race occurrence: the racing access placed after each of the
    unordered writes of the other stream to its bytes in turn (``order:`` runs: after the i-th
    write, before the next). A position where the memory holds what the eager position holds
    can't change a read, and two positions with the same content read the same: one run per
    content not seen at the eager position, nearest to it first (positions of unknown content
    all run)."""
    if first_kind == READ:  # (a write after a read: the reader is the earlier kernel)
        mover, writer = first, second
    else:
        mover, writer = second, first
    km, kw = obs.kernels.get(mover), obs.kernels.get(writer)
    if km is None or kw is None:
        return []
    spans = [(s, lo, hi) for s, lo, hi, kind, _ in km.accesses]
    touched = {s for s, _, _ in spans}
    writes = []
    for key, k in obs.kernels.items():
        if key[0] != writer[0]:
            continue
        if not any(kind == WRITE and s == s2 and lo < hi2 and lo2 < hi for s, lo, hi, kind, _ in k.accesses for s2, lo2, hi2 in spans):
            continue
        if obs.ordered(key, mover) or obs.ordered(mover, key):
            continue
        writes.append((k.index, key))
    writes.sort()
    if len(writes) < 2:
        return []  # (one write: the reversal covers both positions)
    ids = [key for _, key in writes]
    eager = sum(1 for index, _ in writes if index < km.index)
    # what the memory holds at position p: what the first access after the p-th write found
    by_index = sorted(obs.kernels.values(), key=lambda k: k.index)

    def content(p: int) -> Any:
        after = writes[p - 1][0] if p > 0 else -1
        before = writes[p][0] if p < len(writes) else None
        for k in by_index[after + 1 :]:
            for s, lo, hi, kind, crc in k.accesses:
                if s in touched:
                    return crc if crc is not None else ("?", p)
            if before is not None and k.index >= before:
                break
        return ("?", p)

    seen = {content(eager)}
    positions = sorted(range(len(ids) + 1), key=lambda p: (abs(p - eager), -p))
    slots = []
    for p in positions:
        if p == eager:
            continue
        c = content(p)
        if c in seen:
            continue
        seen.add(c)
        pairs = []
        if p > 0:
            pairs.append((ids[p - 1], mover))
        if p < len(ids):
            pairs.append((mover, ids[p]))
        slots.append(Slot("order", 0, PCT_DEPTH, tuple(pairs)))
        if len(slots) >= NEEDLE_POSITIONS:
            break
    return slots


def directed_slots(obs: Observation, ranks: bool = False) -> list[Slot]:
    """The directed runs of a reference run, in the order they are worth trying (module docstring).
    ``ranks``: the runs an exploration over several ranks takes (:mod:`._ranks`): each race
    reversed and the needle sweep, without the runs that hold many kernels at once (every race
    reversed at once, a needle with every other race reversed) or split kernels."""
    groups: dict = {}
    for key, first, second, fk, sk in obs.occurrences:
        if first[0] == second[0]:
            continue
        entry = groups.get(key)
        if entry is None:
            groups[key] = [(first, second, fk, sk), (first, second, fk, sk)]
        else:
            entry[1] = (first, second, fk, sk)
    if not groups:
        return []
    relevant = obs.relevant()
    order = sorted(groups.items(), key=lambda item: not (item[1][0][0] in relevant or item[1][0][1] in relevant or item[1][1][1] in relevant))
    ranked_keys = [key for key, _ in order]
    ranked = [value for _, value in order]
    out: list[Slot] = []

    def add(slot: Slot) -> None:
        if slot not in out:
            out.append(slot)

    pairs = []
    for _, first, second, _, _ in obs.occurrences:
        if first[0] != second[0] and (second, first) not in pairs:
            pairs.append((second, first))
    if len(pairs) > 1 and not ranks:
        # every race reversed at once, every occurrence (a conjunction of reversals in one run)
        add(Slot("order", 0, PCT_DEPTH, tuple(pairs[:REVERSE_ALL_PAIRS])))
    for (a, b, fk, sk), last in ranked:
        ka, kb = obs.kernels.get(a), obs.kernels.get(b)
        if ka is not None and kb is not None and not ranks:
            # (reversing two add_ changes nothing: lose one; the one split reads and writes without
            # atomics, the other may be an atomic update, scatter_add_ say, and is lost all the same)
            if is_rmw(ka.op) and is_update(kb.op):
                add(Slot("split", 0, PCT_DEPTH, (a, b)))
            elif is_rmw(kb.op) and is_update(ka.op):
                add(Slot("split", 0, PCT_DEPTH, (b, a)))
        if last[:2] != (a, b):
            add(Slot("race", 0, PCT_DEPTH, last[:2]))  # (a loop's last iteration: its result survives)
        add(Slot("race", 0, PCT_DEPTH, (a, b)))
    sweeps = [(group, _needles(obs, *last)) for group, (_, last) in enumerate(ranked)]
    sweeps += [(group, _needles(obs, *first)) for group, (first, last) in enumerate(ranked) if last[:2] != first[:2]]
    # a needle with every other race reversed as well (a needle and a stale read, both needed),
    # then the needle alone; round robin over the races
    group_keys = ranked_keys
    plain = []
    for entries in itertools.zip_longest(*[[(g, slot) for slot in slots] for g, slots in sweeps]):
        for entry in entries:
            if entry is None:
                continue
            g, slot = entry
            others = tuple(
                (second, first) for key, first, second, _, _ in obs.occurrences
                if first[0] != second[0] and key != group_keys[g]
            )[:REVERSE_ALL_PAIRS]
            if others and not ranks:
                add(Slot("order", 0, PCT_DEPTH, slot.target + others))
            plain.append(slot)
    for slot in plain:
        add(slot)
    return out


# -- undirected runs and the interleaving ------------------------------------------------------------


def undirected_slots(seed: int, steps: int | None) -> Iterator[Slot]:
    """PCT (depths 1, 2, 3, 4 in turn, change points over ``steps``; None: the legacy 64) and
    per-stream-rate random runs alternating, with adversarial and lazy among the first six; every
    seed a hash of (``seed``, kind, index)."""
    yield Slot("pct", run_seed(seed, 0, "pct"), 1, steps)
    yield Slot("rates", run_seed(seed, 0, "rates"))
    yield Slot("adversarial", seed)
    yield Slot("pct", run_seed(seed, 1, "pct"), 2, steps)
    yield Slot("lazy", seed)
    yield Slot("rates", run_seed(seed, 1, "rates"))
    for i in itertools.count(2):
        yield Slot("pct", run_seed(seed, i, "pct"), 1 + i % 4, steps)
        yield Slot("rates", run_seed(seed, i, "rates"))


def interleave(directed: list, seed: int, steps: int | None, schedules: int) -> list:
    """``schedules`` runs: the first two directed ones (every race reversed, the top race
    reversed), then directed and undirected runs alternating (two directed, one undirected while
    directed ones last); undirected only when there are no races."""
    undirected = undirected_slots(seed, steps)
    out: list = []
    d = 0
    pattern = itertools.cycle((True, False, True))
    while len(out) < schedules:
        take_directed = d < len(directed) and (len(out) < 2 or next(pattern))
        if take_directed:
            out.append(directed[d])
            d += 1
        else:
            out.append(next(undirected))
    return out
