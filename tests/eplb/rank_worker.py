"""One rank of a multi-rank streamkit_eplb scenario (launched by conftest.run_ranks, not collected by pytest).

usage: rank_worker.py SCENARIO BACKEND   with MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE set.
BACKEND is ``fake`` (gloo group, fake session with detect="raise"), ``cuda`` (nccl) or ``npu`` (hccl).
Prints ``KEY value`` lines the tests assert on; exits 0 when the scenario's own checks passed.
"""

from __future__ import annotations

import datetime
import os
import random
import sys
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

import streamkit as sk
from streamkit_eplb import CollectError, HeatCollector

RANK = int(os.environ["RANK"])
WORLD = int(os.environ["WORLD_SIZE"])


def say(key: str, value: object = "") -> None:
    print(f"{key} {value}".rstrip(), flush=True)


@contextmanager
def environment(backend: str, timeout_s: float = 60.0):
    """Yields the fake session (or None on real devices) with the default process group initialized.

    The default group gets a generous timeout (the ranks may start seconds apart on a loaded
    machine); scenarios that test timeouts make a second group with a short one (short_group)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "fake":
        from streamkit import fake

        dist.init_process_group("gloo", rank=RANK, world_size=WORLD, timeout=timeout)
        with fake.session(detect="raise") as session:
            yield session
        return
    if backend == "cuda":
        torch.cuda.set_device(RANK)
        pg = "nccl"
    else:
        import torch_npu  # noqa: F401

        torch.npu.set_device(RANK)  # type: ignore[attr-defined]
        pg = "hccl"
    dist.init_process_group(pg, rank=RANK, world_size=WORLD, timeout=timeout)
    with sk.use_backend(backend):
        yield None


def short_group(timeout_s: float):
    """A group of all ranks whose collectives time out after ``timeout_s`` seconds."""
    return dist.new_group(list(range(WORLD)), timeout=datetime.timedelta(seconds=timeout_s))


def host_syncs(session) -> int:
    return session.stats.host_syncs if session is not None else 0


def scenario_main(backend: str, seeds: str = "1,2,3") -> None:
    """Race-free, sync-free, conserving: random records of every kind on every rank, collects on a
    schedule shared by the ranks; checked per rank, layer and expert for several seeds. First, in
    the same launch (a rank launch costs seconds), the shape mismatch (_mismatch)."""
    with environment(backend) as session:
        _mismatch()  # the group stays usable: every rank failed in the same one all_gather
        total_records = total_collects = record_syncs = collect_syncs = 0
        checksums = []
        for seed in map(int, seeds.split(",")):
            r, c, rs, cs, checksum = _conservation_run(session, seed)
            total_records += r
            total_collects += c
            record_syncs += rs
            collect_syncs += cs
            checksums.append(checksum)
        say("HYPOTHESIS_EXAMPLES", _hypothesis_conservation(session))
        _engines_and_placements(session)
        say("CHECKSUM", checksums)
        say("RECORDS", total_records)
        say("COLLECTS", total_collects)
        say("RECORD_SYNCS", record_syncs)
        say("COLLECT_SYNCS", collect_syncs)
        if session is not None:
            say("RACES", len(session.races))
        say("OK")
    dist.destroy_process_group()


def _conservation_run(session, seed: int):
    dev = sk.device()
    shapes = random.Random(seed)
    L, E = shapes.randint(1, 5), shapes.randint(1, 8)
    c = HeatCollector(L, E, group=dist.group.WORLD)
    data = random.Random(seed * 1000 + RANK)  # every rank records different data
    schedule = random.Random(seed)  # ... but all ranks collect at the same points
    expected = torch.zeros(L, E, dtype=torch.int64)
    window_expected = torch.zeros(L, E, dtype=torch.int64)
    results, per_window, snapshots = [], [], []
    record_syncs = collect_syncs = records = collects = 0
    for _step in range(25):
        for _ in range(data.randint(0, 4)):
            layer = data.randrange(L)
            kind = data.choice(["counts", "cumulative", "topk"])
            contribution = torch.zeros(E, dtype=torch.int64)
            if kind == "topk":
                n = data.randint(0, 9)
                ids = torch.tensor([data.randrange(-1, E) for _ in range(2 * n)], dtype=torch.int64).reshape(n, 2)
                for i in ids.flatten().tolist():
                    if i >= 0:
                        contribution[i] += 1
                arg = ids.to(data.choice([torch.int32, torch.int64])).to(dev)
                before = host_syncs(session)
                c.record(layer, topk_ids=arg)
            else:
                counts = torch.tensor([data.randrange(0, 50) for _ in range(E)], dtype=torch.int64)
                contribution += counts
                arg = (counts.cumsum(0) if kind == "cumulative" else counts).to(torch.int32).to(dev)
                before = host_syncs(session)
                c.record(layer, arg, cumulative=kind == "cumulative")
            record_syncs += host_syncs(session) - before
            records += 1
            expected[layer] += contribution
            window_expected[layer] += contribution
            del arg
        if schedule.random() < 0.35:
            before = host_syncs(session)
            handle = c.collect()
            collect_syncs += host_syncs(session) - before
            collects += 1
            per_window.append(window_expected.clone())
            window_expected.zero_()
            if schedule.random() < 0.5:  # sometimes keep it pending across more records
                heat = handle.wait()
                results.append(heat)
                snapshots.append((heat, heat.load.clone()))
            else:
                results.append(handle)
    before = host_syncs(session)
    last = c.collect()
    collect_syncs += host_syncs(session) - before
    collects += 1
    per_window.append(window_expected.clone())
    heats = [h.wait() if hasattr(h, "wait") else h for h in results] + [last.wait()]
    # a Heat returned by wait() is never overwritten by later records and collects
    for heat, snapshot in snapshots:
        assert torch.equal(heat.load, snapshot), (heat.window, heat.load, snapshot)
    assert [h.window for h in heats] == list(range(len(heats))), [h.window for h in heats]
    for heat, mine in zip(heats, per_window):  # each window holds exactly this rank's records
        assert tuple(heat.load.shape) == (L, WORLD, E), heat.load.shape
        assert torch.equal(heat.load[:, RANK, :], mine), (heat.window, heat.load[:, RANK, :], mine)
        assert int(heat.invalid.sum()) == 0
    total = torch.stack([h.load for h in heats]).sum(0)
    assert torch.equal(total[:, RANK, :], expected), (total[:, RANK, :], expected)
    return records, collects, record_syncs, collect_syncs, [int(v) for v in total.flatten().tolist()]


def _hypothesis_conservation(session) -> int:
    """The property of test_eplb_properties.py across the group, for reduce="gather" and "sum" side
    by side: every rank runs the same derandomized examples (so they agree on when to step, reset,
    enable and collect), each records rank-specific data derived from the example, and every rank
    checks every rank's rows of every window against a host model of the ring, and that the "sum"
    Heat equals the sum of the "gather" rows."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    dev = sk.device()
    group = short_group(20.0)  # a rank that fails makes its peer fail within 20 s, not hang
    examples = [0]

    @st.composite
    def programs(draw):
        layers, experts, window = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 3))
        record = st.one_of(
            st.tuples(st.just("counts"), st.integers(0, layers - 1),
                      st.lists(st.integers(0, 2**20), min_size=experts, max_size=experts), st.booleans()),
            st.tuples(st.just("topk"), st.integers(0, layers - 1),
                      st.lists(st.integers(-1, experts - 1), max_size=8), st.just(False)),
        )
        other = st.one_of(st.just(("step",)), st.just(("reset",)), st.tuples(st.just("enable"), st.booleans()),
                          st.tuples(st.just("collect"), st.booleans()))
        ops = draw(st.lists(st.one_of(record, record, other), max_size=15))
        return layers, experts, window, ops

    def contribution(op, rank, experts):
        """What rank ``rank`` records for ``op``: the example's data, made rank-specific."""
        kind, _layer, values, _cumulative = op
        if kind == "counts":
            return torch.tensor(values, dtype=torch.int64).roll(rank) + rank
        return torch.tensor([(v + rank) % experts if v >= 0 else -1 for v in values], dtype=torch.int64)

    def counted(op, tensor, experts):
        if op[0] == "counts":
            return tensor
        return torch.bincount(tensor[tensor >= 0], minlength=experts)

    # an explicit small count: each example is a collective round trip on every rank
    @settings(max_examples=12, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(programs())
    def conservation(program):
        examples[0] += 1
        layers, experts, window, ops = program
        gather = HeatCollector(layers, experts, group=group, window=window)
        summed = HeatCollector(layers, experts, group=group, window=window, reduce="sum")
        ring = torch.zeros(window, WORLD, layers, experts, dtype=torch.int64)
        index, enabled = 0, True
        expected, handles = [], []
        for op in ops:
            before = host_syncs(session)
            if op[0] == "step":
                for c in (gather, summed):
                    c.step()
                index = (index + 1) % window
                ring[index] = 0
            elif op[0] == "reset":
                for c in (gather, summed):
                    c.reset()
                ring.zero_()
            elif op[0] == "enable":
                gather.enabled = summed.enabled = enabled = op[1]
            elif op[0] == "collect":
                handles.append((gather.collect(passes=op[1]), summed.collect(passes=op[1])))
                expected.append(ring[(torch.arange(window) + index + 1) % window].clone())
                ring.zero_()
            else:
                _kind, layer, _values, cumulative = op
                if enabled:
                    for rank in range(WORLD):
                        ring[index, rank, layer] += counted(op, contribution(op, rank, experts), experts)
                mine = contribution(op, RANK, experts)
                arg = (mine.cumsum(0) if cumulative else mine).to(dev)
                before = host_syncs(session)
                for c in (gather, summed):
                    if op[0] == "counts":
                        c.record(layer, arg, cumulative=cumulative)
                    else:
                        c.record(layer, topk_ids=arg)
            assert host_syncs(session) == before, op
        handles.append((gather.collect(), summed.collect()))
        expected.append(ring[(torch.arange(window) + index + 1) % window].clone())
        for (hg, hs), want in zip(handles, expected):
            g, s = hg.wait(), hs.wait()
            assert torch.equal(g.load, want.sum(0).permute(1, 0, 2)), (g.window, g.load, want)
            assert torch.equal(s.load, g.load.sum(dim=1, keepdim=True)), (s.load, g.load)  # sum == sum of rows
            assert s.reduce == "sum" and s.world_size == 1 and s.num_ranks == WORLD
            if g.passes is not None:
                assert torch.equal(g.passes, want.permute(0, 2, 1, 3))
                assert torch.equal(s.passes, g.passes.sum(dim=2, keepdim=True))

    conservation()
    return examples[0]


def _engines_and_placements(session) -> None:
    """2 ranks: to_vllm() of a reduce="sum" collector with log2phy equals vLLM's all-reduced logical
    window (reference: map + record + window per rank, summed over ranks); to_vllm_ascend() of a
    reduce="gather" collector equals the all-gathered moe_load; set_placement splits the history."""
    from streamkit_eplb import HeatHistory, Placement, rebalance

    dev = sk.device()
    layers, logical, slots, window = 2, 4, 6, 3
    placement = Placement.from_phy2log(torch.tensor([0, 1, 2, 3, 0, 1]), logical, num_layers=layers)
    vllm = HeatCollector(layers, slots, group=dist.group.WORLD, window=window, reduce="sum", log2phy=placement)
    ascend = HeatCollector(layers, 3, group=dist.group.WORLD, window=window)  # 3 local slots per rank
    reference_window = torch.zeros(window, layers, slots, dtype=torch.int64)  # summed over ranks
    moe_load = torch.zeros(WORLD, layers, 3, dtype=torch.int64)
    for step in range(window):
        for layer in range(layers):
            for rank in range(WORLD):
                gen = torch.Generator().manual_seed(1000 * step + 10 * layer + rank)
                ids = torch.randint(-1, logical, (7, 2), generator=gen)
                tokens = torch.randint(0, 9, (3,), generator=gen)
                count = placement.logcnt[layer][ids.clamp(min=0)]
                position = torch.arange(ids.numel()).reshape_as(ids)
                phys = placement.log2phy[layer][ids.clamp(min=0)].gather(-1, (position % count).unsqueeze(-1)).squeeze(-1)
                phys = phys[ids >= 0]
                reference_window[step, layer].scatter_add_(0, phys, torch.ones_like(phys))
                moe_load[rank, layer] += tokens
                if rank == RANK:
                    vllm.record(layer, topk_ids=ids.to(dev))
                    ascend.record(layer, tokens.to(dev))
        if step < window - 1:
            vllm.step()
            ascend.step()
    heat = vllm.collect().wait()
    logical_window = torch.zeros(window, layers, logical, dtype=torch.int64)
    logical_window.scatter_add_(-1, placement.phy2log.unsqueeze(0).expand(window, -1, -1), reference_window)
    assert torch.equal(heat.to_vllm(), logical_window.sum(0)), (heat.to_vllm(), logical_window.sum(0))
    assert torch.equal(ascend.collect().wait().to_vllm_ascend()["moe_load"], moe_load.permute(1, 0, 2))
    # a rearrangement: both ranks compute the same placement from the same (all-reduced) heat
    history = HeatHistory(4)
    history.add(heat)
    new = rebalance(heat.to_vllm(), slots, 1, 1, WORLD)
    assert vllm.set_placement(new) == 1
    vllm.record(0, topk_ids=torch.tensor([[0, 1]]).to(dev))
    after = vllm.collect().wait()
    assert after.placement_version == 1 and torch.equal(after.phy2log, new.phy2log)
    assert history.add(after) is True and len(history) == 1
    assert after.load.sum().item() == 2 * WORLD
    # a main model and its drafter: collect_all reduces both in one all_reduce, Heats as separate collects
    import streamkit_eplb._collector as col
    from streamkit_eplb import collect_all

    def model_pair():
        main = HeatCollector(layers, slots, group=dist.group.WORLD, window=2, reduce="sum", log2phy=placement)
        draft = HeatCollector(1, 4, group=dist.group.WORLD, reduce="sum")
        main.record(1, topk_ids=torch.tensor([[0, 3], [2, 1]]).to(dev))
        draft.record(0, torch.tensor([RANK, 1, 2, 3]).to(dev))
        return main, draft

    separate = [c.collect().wait() for c in model_pair()]
    calls = []
    real = col.dist.all_reduce
    col.dist.all_reduce = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    try:
        together = [h.wait() for h in collect_all(list(model_pair()))]
    finally:
        col.dist.all_reduce = real
    assert len(calls) == 1, calls
    assert all(torch.equal(x.load, y.load) and torch.equal(x.passes, y.passes) for x, y in zip(separate, together))
    assert together[1].load[0, 0].tolist() == [sum(range(WORLD)), WORLD, 2 * WORLD, 3 * WORLD]
    say("ENGINES", "ok")


def _mismatch() -> None:
    """Rank 1 disagrees on num_experts: every rank fails at construction, nobody hangs."""
    experts = 8 if RANK == 0 else 16
    try:
        HeatCollector(4, experts, group=dist.group.WORLD)
    except ValueError as exc:
        say("MISMATCH", str(exc))
    else:
        say("NO_ERROR")


def collect_and_report(collector, case: str) -> None:
    """Collect with a peer gone: say how wait() ended (``case`` RAISED after how long, or ``case``
    RETURNED), then ``case`` DONE."""
    start = time.monotonic()
    handle = collector.collect()
    try:
        heat = handle.wait()
    except CollectError as exc:
        cause = exc.__cause__
        say(f"{case} RAISED", f"{time.monotonic() - start:.2f} {type(cause).__name__} {str(cause).splitlines()[0][:200] if str(cause) else ''}")
    else:
        say(f"{case} RETURNED", repr(heat))
    say(f"{case} DONE")


def scenario_peers(backend: str, flag_dir: str = "") -> None:
    """The two peer failures in one launch (a rank launch costs seconds): first rank 1 stalls
    (_peer_stall), then, on a new group, it dies (_peer_death). Each case has a group of its own,
    so the timed-out collective of the first leaves the second's group clean."""
    with environment(backend):
        # (each collector stays alive to the session's end, as in a scenario of its own: freeing
        # one whose collective failed would be a free racing that collective's side-stream read)
        collectors = [_peer_stall(flag_dir), _peer_death()]
    del collectors
    os._exit(0)


def _peer_stall(flag_dir: str) -> HeatCollector:
    """Rank 1 stays alive but never joins the collect: rank 0's wait() raises while rank 1 still
    stalls (it marks its return in ``flag_dir``), so the group's timeout bounded the wait."""
    timeout_s = 1.5
    flag = os.path.join(flag_dir or ".", f"stall_over_{os.getppid()}")
    dev = sk.device()
    c = HeatCollector(2, 4, group=short_group(timeout_s))
    if RANK != 0:
        say("STALL STALLING")
        time.sleep(timeout_s + 1.5)
        with open(flag, "w"):
            pass
        return c
    c.record(0, torch.tensor([1, 1, 1, 1]).to(dev))
    collect_and_report(c, "STALL")
    say("STALL PEER_STILL_STALLING", str(not os.path.exists(flag)))
    return c


def _peer_death() -> HeatCollector:
    """Rank 1 dies after construction; rank 0's wait() raises CollectError within the PG timeout."""
    timeout_s = 5.0
    dev = sk.device()
    c = HeatCollector(2, 4, group=short_group(timeout_s))
    c.record(0, torch.tensor([1, 1, 1, 1]).to(dev))
    c.collect().wait()  # one healthy window first
    if RANK != 0:
        say("DEATH DYING")
        os._exit(3)
    time.sleep(0.5)
    c.record(1, torch.tensor([2, 2, 2, 2]).to(dev))
    collect_and_report(c, "DEATH")
    return c


if __name__ == "__main__":
    scenario, backend, *rest = sys.argv[1:]
    globals()[f"scenario_{scenario}"](backend, *rest)
