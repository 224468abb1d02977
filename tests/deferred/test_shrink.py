"""Shrinking explore's failures to the ordering constraints that cause them, and tokens that carry
a fingerprint and that constraint form: bit-identical replay of an unchanged program, and replay of
an edited one through its constraints."""

from __future__ import annotations

import types
import math
import warnings
from pathlib import Path

import pytest
import torch

import streamkit as sk
from streamkit import fake
from streamkit._backends.fake._explore import constraint_token

from _support import marker_line

pytest_plugins = ["pytester"]
HERE = Path(__file__)


def readme_program():
    side = sk.Stream()
    x = torch.ones(1024, device=sk.device())
    x.mul_(2)  # <readme-write>
    with sk.switch(side):  # (the fork wait is missing)
        total = x.sum()  # <readme-read>
    sk.current_stream().wait_stream(side)
    return total.item()


def two_races():
    """Two races; only the first one's reordering changes the returned value (the second read's
    result is dropped)."""
    side = sk.Stream()
    x = torch.ones(1024, device=sk.device())
    y = torch.ones(1024, device=sk.device())
    x.mul_(2)  # <two-write>
    y.add_(1)
    with sk.switch(side):
        total = x.sum()  # <two-read>
        y.sum()  # (races with y.add_, and nobody looks)
    sk.current_stream().wait_stream(side)
    return total.item()


def both_needed():
    """Wrong only when both reads run before their writes; the writes are on two streams, so one
    held-back stream can't delay both."""
    s1, s2, s3 = sk.Stream(), sk.Stream(), sk.Stream()
    x = torch.ones(1024, device=sk.device())
    y = torch.ones(1024, device=sk.device())
    s2.wait_stream(sk.current_stream())
    x.mul_(2)  # <both-write-x>
    with sk.switch(s1):
        a = x.sum()  # <both-read-x>
    with sk.switch(s2):
        y.mul_(2)  # <both-write-y>
    with sk.switch(s3):
        b = y.sum()  # <both-read-y>
    for s in (s1, s2, s3):
        sk.current_stream().wait_stream(s)
    return a.item() != 2048.0 and b.item() != 2048.0


def lines(pairs):
    return [(a.line, b.line) for a, b in pairs]


def test_the_readme_example_shrinks_to_one_constraint_naming_both_lines():
    found = fake.explore(readme_program, schedules=4)
    f = found.failure
    assert not found.ok and len(f.constraints) == 1
    ((a, b),) = f.constraints
    assert (a.op, a.stream, a.line) == ("aten.sum", "side", marker_line(HERE, "readme-read"))
    assert (b.op, b.stream, b.line) == ("aten.mul_", "default", marker_line(HERE, "readme-write"))
    assert f.explanation == (
        f"ran aten.sum on side (test_shrink.py:{a.line}) before aten.mul_ on default (test_shrink.py:{b.line})"
    )
    assert 1 <= f.shrink_runs <= fake.SHRINK_RUNS
    text = found.explain()
    assert f.explanation in text and "shrunk to 1 constraint" in text and f.token in text
    # the constraint form alone fails too (the sum reads the ones: 1024, not 2048)
    alone = fake.replay(readme_program, constraint_token(f.token))
    assert alone.replayed_by == "constraints" and not alone.ok and alone.values == 1024.0


def test_of_two_races_the_one_that_changes_the_value_is_kept():
    found = fake.explore(two_races, schedules=8)
    assert not found.ok
    f = found.failure
    assert f.deviations >= 2  # (the failing run reversed both races, or more)
    assert lines(f.constraints) == [(marker_line(HERE, "two-read"), marker_line(HERE, "two-write"))]


def test_a_failure_that_needs_two_reorderings_shrinks_to_two():
    found = fake.explore(both_needed, schedules=8)
    assert not found.ok and found.failure.values is True
    assert sorted(lines(found.failure.constraints)) == [
        (marker_line(HERE, "both-read-x"), marker_line(HERE, "both-write-x")),
        (marker_line(HERE, "both-read-y"), marker_line(HERE, "both-write-y")),
    ]
    # each constraint alone gives the eager value
    for pair in found.failure.constraints:
        one = fake.Run("constraints", 0, fingerprint="-", constraints=(pair,)).token
        assert fake.replay(both_needed, one).ok


def many_deviations():
    side = sk.Stream()
    xs = [torch.ones(64, device=sk.device()) for _ in range(12)]
    for x in xs:
        x.mul_(2)
    with sk.switch(side):
        sums = [x.sum() for x in xs]
    sk.current_stream().wait_stream(side)
    return [s.item() for s in sums]


def test_shrinking_stops_at_its_bound_and_shrink_false_keeps_every_deviation(monkeypatch):
    found = fake.explore(many_deviations, schedules=1, shrink=3)
    f = found.failure
    assert not found.ok and f.shrink_runs == 3 and f.deviations > 3
    full = fake.explore(many_deviations, schedules=1)
    from streamkit._backends.fake._explore import SHRINK_RUNS_PER_CONSTRAINT

    assert full.failure.shrink_runs <= fake.SHRINK_RUNS + 3 * SHRINK_RUNS_PER_CONSTRAINT
    assert len(full.failure.constraints) <= len(f.constraints)
    kept = fake.explore(many_deviations, schedules=1, shrink=False).failure
    assert kept.shrink_runs == 0 and kept.explanation is None and len(kept.constraints) == kept.deviations > 3
    calls = []
    monkeypatch.setattr("streamkit._backends.fake._explore.SHRINK_RUNS", 2)
    monkeypatch.setattr("streamkit._backends.fake._explore.SHRINK_RUNS_PER_CONSTRAINT", 0)
    real = fake.session
    monkeypatch.setattr("streamkit._backends.fake._explore.session", lambda **kw: calls.append(kw["schedule"]) or real(**kw))
    assert fake.explore(many_deviations, schedules=1).failure.shrink_runs == 2
    assert calls.count("constraints") == 2
    for bad in (-1, 1.5, "yes"):
        with pytest.raises(ValueError, match="explore\\(shrink\\)"):
            fake.explore(many_deviations, schedules=1, shrink=bad)


def ran_order(token, fn):
    with fake.session(detect="record", schedule=token) as s:
        values = fn()
    return values, [(k.stream.idx, k.seq) for k in s.scheduler.ran]


def test_tokens_round_trip_and_replay_bit_for_bit():
    found = fake.explore(readme_program, schedules=8, seed=3)
    for run in found.runs:
        assert fake.read_token(run.token)[:4] == (run.schedule, run.seed, run.depth, run.target)
        assert fake.replay(readme_program, run.token).token == run.token
    f = found.failure
    t = fake.read_token(f.token)
    assert (t.fingerprint, t.constraints) == (f.fingerprint, f.constraints) and len(t.fingerprint) == 8
    assert fake.Run(t.schedule, t.seed, t.depth, t.target, fingerprint=t.fingerprint, constraints=t.constraints, focus=t.focus).token == f.token
    assert t.focus == f.focus and f.focus  # (the kernels the schedule ordered travel in the token)
    assert fake.parse_token(f.token) == (f.schedule, f.seed, f.depth, f.target)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fake.ReplayFallbackWarning)  # (nothing changed: no fallback)
        again = fake.replay(readme_program, f.token)
        first, order = ran_order(f.token, readme_program)
        second, order2 = ran_order(f.token, readme_program)
    assert again.replayed_by == "schedule" and not again.ok
    assert math.isnan(f.values) == math.isnan(again.values) and (math.isnan(f.values) or f.values == again.values)
    assert order == order2 and len(order) >= 3
    assert torch.equal(torch.tensor(first), torch.tensor(second)) or math.isnan(first) and math.isnan(second)
    # the old short tokens still parse and replay
    assert fake.parse_token("random:7") == ("random", 7, 3, None)
    assert fake.replay(readme_program, "random:5").token == "random:5"


def tensors_program():
    """Tensor values: the side stream scales ``x`` without waiting for the default stream's write."""
    side = sk.Stream()
    x = torch.arange(256, device=sk.device(), dtype=torch.float32)
    x.mul_(3)
    with sk.switch(side):
        y = x * 0.1 + 1
    sk.current_stream().wait_stream(side)
    return [y, x]


def test_replay_of_tensors_is_bit_identical():
    fn = tensors_program
    for run in fake.explore(fn, schedules=6).runs:
        again = fake.replay(fn, run.token)
        assert all(torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) for a, b in zip(run.values, again.values))
        assert all(torch.equal(a.isnan(), b.isnan()) for a, b in zip(run.values, again.values))


@pytest.mark.parametrize(
    "bad",
    ["", "random", "random:x", "nope:1", "race:0.1", "random:1/xyz", "random:1/0123456789", "random:1/01234567/!!",
     "random:1/01234567/abcd", "constraints", "constraints/01234567", "random:1/01234567/a/b"],
)
def test_bad_tokens_name_the_format(bad):
    with pytest.raises(ValueError, match=r"SCHEDULE\[/FINGERPRINT\[/CONSTRAINTS\]\]"):
        fake.read_token(bad)
    with pytest.raises(ValueError, match="schedule token"):
        fake.replay(readme_program, bad)


def test_a_session_takes_a_token():
    f = fake.explore(readme_program, schedules=4).failure
    with fake.session(detect="record", schedule=f.token) as s:
        value = readme_program()
    assert s.schedule == f.schedule and s.fingerprint_matched and math.isnan(value) == math.isnan(f.values)
    with fake.session(detect="record", schedule=constraint_token(f.token)):
        assert readme_program() == 1024.0
    with pytest.raises(ValueError, match="session\\(schedule\\)"):
        fake.session(schedule="bogus").__enter__()


PROGRAM = '''\
import torch, streamkit as sk


def program():
    side = sk.Stream()
    x = torch.ones(1024, device=sk.device())
    x.mul_(2)
    with sk.switch(side):
        total = x.sum()
    sk.current_stream().wait_stream(side)
    return total.item()
'''

EDITED = '''\
import torch, streamkit as sk

# An unrelated edit: a comment block,
# a helper, and a host computation in the function.


def helper(n):
    return n * 2


def program():
    side = sk.Stream()
    scale = helper(3)  # (host only)
    x = torch.ones(1024, device=sk.device())
    w = torch.zeros(8, device=sk.device())  # new, unrelated device work
    w.add_(scale)
    x.mul_(2)
    with sk.switch(side):
        total = x.sum()
    sk.current_stream().wait_stream(side)
    return total.item()
'''


def load(path, name):
    """The program at ``path`` as a module, compiled from its source now: an edit made within the
    same second (same size) must not be served from a stale bytecode cache."""
    module = types.ModuleType(name)
    module.__file__ = str(path)
    exec(compile(Path(path).read_text(), str(path), "exec"), module.__dict__)
    return module


@pytest.mark.parametrize("seeded", [False, True])
def test_a_token_survives_an_unrelated_edit(tmp_path, seeded):
    path = tmp_path / "prog_edit.py"
    path.write_text(PROGRAM)
    module = load(path, f"prog_edit_{seeded}_a")
    # seeded: a random/pct failure (detect="off": no race-directed runs), else the race-directed one
    found = fake.explore(module.program, schedules=8, detect="off" if seeded else "record")
    f = found.failure
    assert not found.ok
    assert (f.schedule != "race") if seeded else (f.schedule == "race")
    token = f.token
    path.write_text(EDITED)
    edited = load(path, f"prog_edit_{seeded}_b")
    assert edited.program.__code__.co_firstlineno != module.program.__code__.co_firstlineno
    with pytest.warns(fake.ReplayFallbackWarning, match="fingerprint .* changed|changed since the token") as caught:
        again = fake.replay(edited.program, token)
    assert "constraint form" in str(caught[0].message)
    assert again.replayed_by == "constraints" and not again.ok and again.values == 1024.0  # the wrong value again
    assert again.token == token
    # the constraint's kernels are the same source lines, now lower in the file
    ((a, b),) = f.constraints
    assert (a.text, b.text) == ("total = x.sum()", "x.mul_(2)")


def test_a_replay_whose_kernels_are_gone_says_which_constraints_did_not_match(tmp_path):
    path = tmp_path / "prog_gone.py"
    path.write_text(PROGRAM)
    token = fake.explore(load(path, "prog_gone_a").program, schedules=2).failure.token
    path.write_text(PROGRAM.replace("x.mul_(2)", "x.add_(x)"))
    with pytest.warns(fake.ReplayFallbackWarning) as caught:
        again = fake.replay(load(path, "prog_gone_b").program, token)
    assert any("no longer issues" in str(w.message) and "aten.mul_" in str(w.message) for w in caught)
    assert again.replayed_by == "constraints"


RACY_TEST = """
import pytest, torch, streamkit as sk

@pytest.mark.streamkit_explore(schedules=4)
def test_side_sum(fake_session):
    side = sk.Stream()
    x = torch.ones(1024, device=fake_session.device)
    x.mul_(2)
    with sk.switch(side):
        total = x.sum()
    sk.current_stream().wait_stream(side)
    assert total.item() == 2048.0
"""


def test_the_pytest_replay_option_falls_back_to_the_constraint_form(pytester):
    pytester.makepyfile(test_racy=RACY_TEST)
    # lazy:0 passes this test (the doubling runs first); a stale fingerprint makes the plugin rerun
    # the body under the token's constraint form, which fails
    pair = (
        fake.KernelId("aten.sum", "test_racy.py", "test_side_sum", "total = x.sum()", 1, 10, "side"),
        fake.KernelId("aten.mul_", "test_racy.py", "test_side_sum", "x.mul_(2)", 1, 8, "default"),
    )
    stale = fake.Run("lazy", 0, fingerprint="00000000", constraints=(pair,)).token
    result = pytester.runpytest("-p", "no:cacheprovider", "-W", "always", f"--streamkit-replay={stale}")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*failed under schedule constraints/00000000/* (run 2 of 2)*1024.0 == 2048.0*"])
    fresh = fake.Run("lazy", 0).token
    pytester.runpytest("-p", "no:cacheprovider", f"--streamkit-replay={fresh}").assert_outcomes(passed=1)


def test_a_run_too_long_to_record_is_not_shrunk(monkeypatch):
    monkeypatch.setattr("streamkit._backends.fake._deferred.TRACE_LIMIT", 3)
    f = fake.explore(readme_program, schedules=2).failure
    assert f.explanation.startswith("(not shrunk") and f.constraints == () and f.token == f.short_token
