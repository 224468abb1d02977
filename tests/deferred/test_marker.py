"""``@pytest.mark.streamkit_explore``: the test body runs under several fake schedules, a failing
run names its ``--streamkit-replay`` token, and that option reruns it alone."""

from __future__ import annotations

import re
import zlib

import streamkit.fake  # noqa: F401  (loaded before pytester's in-process runs, which drop the modules they load)

pytest_plugins = ["pytester"]

RACY = """
import pytest, torch, streamkit as sk

@pytest.mark.streamkit_explore(schedules=4)
def test_side_sum(fake_session):
    side = sk.Stream()
    x = torch.ones(1024, device=fake_session.device)
    x.mul_(2)
    {wait}
    with sk.switch(side):
        total = x.sum()
    sk.current_stream().wait_stream(side)
    assert total.item() == 2048.0
"""


def test_a_racy_test_fails_with_its_replay_token_and_the_token_reruns_that_schedule(pytester):
    pytester.makepyfile(test_racy=RACY.format(wait=""))
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    token = re.search(r"--streamkit-replay=([a-z]+:[-\d.]+(?::[\d.]+)?(?:\+focus=[\w-]*)?)", out).group(1)
    # eager passes (recording the race); the race reversed, run 2 of 4, fails; the kernels its
    # schedule orders (the focus: those on the raced memory) are in the token
    assert token.startswith("race:0.2:1.1+focus=")
    assert "run 2 of 4" in out
    again = pytester.runpytest("-p", "no:cacheprovider", f"--streamkit-replay={token}")
    again.assert_outcomes(failed=1)
    again.stdout.fnmatch_lines([f"*failed under schedule {token} (run 1 of 1)*"])
    pytester.runpytest("-p", "no:cacheprovider", "--streamkit-replay=eager:0").assert_outcomes(passed=1)
    seed = zlib.crc32(b"test_racy.py::test_side_sum")
    pytester.runpytest("-p", "no:cacheprovider", f"--streamkit-replay=adversarial:{seed}").assert_outcomes(failed=1)


def test_a_failure_is_shrunk_and_its_full_token_replays_after_an_unrelated_edit(pytester):
    pytester.makepyfile(test_racy=RACY.format(wait=""))
    out = pytester.runpytest("-p", "no:cacheprovider").stdout.str()
    # the explanation names both kernels by op, stream and line (mul_ at line 7, sum at line 10)
    assert "shrunk to 1 ordering(s):" in out, out
    assert "ran aten.sum on side (test_racy.py:10) before aten.mul_ on default (test_racy.py:7)" in out, out
    token = re.findall(r"alone with: pytest \S+ --streamkit-replay=(\S+)", out)[-1]
    assert token.startswith("race:0.2:1.1+focus=") and token.count("/") == 2  # fingerprint and constraint form
    # an unrelated edit above the racy lines, with device work of its own: the token still reproduces
    # the wrong value (through its schedule, or else its constraint form: test_shrink.py covers that)
    pytester.makepyfile(test_racy=RACY.format(wait="").replace(
        "    side = sk.Stream()",
        "    scratch = torch.zeros(8, device=fake_session.device)  # unrelated work\n"
        "    scratch.add_(1)\n"
        "    side = sk.Stream()",
    ))
    again = pytester.runpytest("-p", "no:cacheprovider", f"--streamkit-replay={token}")
    again.assert_outcomes(failed=1)
    # (a wrong value: nan, the sum before x's fill, or 1024, before the doubling; the focus of the
    # token names kernels by number, which the edit shifted, so the seed's schedule may order others)
    again.stdout.re_match_lines([r".*\(run [12] of [12]\): AssertionError: assert (nan|1024\.0) == 2048\.0.*"])


def test_the_fixed_test_passes_under_every_schedule(pytester):
    pytester.makepyfile(test_fixed=RACY.format(wait="side.wait_stream(sk.current_stream())"))
    pytester.runpytest("-p", "no:cacheprovider", "--streamkit-schedules=10").assert_outcomes(passed=1)


COUNT = """
import zlib, pytest, torch, streamkit as sk

sessions = []

@pytest.mark.streamkit_explore(schedules=5)
def test_a(fake_session):
    assert sk.get_backend().session is fake_session and not fake_session.closed
    sessions.append(("a", fake_session))
    torch.ones(2, device=fake_session.device).add_(1)

@pytest.mark.streamkit_explore(schedules=3, seed=7)
def test_seeded(fake_session):
    sessions.append(("seeded", fake_session))

def test_check():
    print("RUNS", [(s.schedule, s.seed == zlib.crc32(b"test_count.py::test_a")) for t, s in sessions if t == "a"])
    print("SEEDED", [(s.schedule, s.seed) for t, s in sessions if t == "seeded"])
    assert len({id(s) for t, s in sessions}) == len(sessions) and all(s.closed for t, s in sessions)
"""


def test_runs_follow_eager_then_explore_order_in_fresh_sessions_and_the_count_option_overrides(pytester):
    pytester.makepyfile(test_count=COUNT)
    result = pytester.runpytest("-p", "no:cacheprovider", "-s")
    result.assert_outcomes(passed=3)
    # eager, then explore's plan (no races: PCT over the real length, rates, adversarial...), with
    # seeds hashed from the node id's CRC (adversarial and lazy take it as it is)
    result.stdout.fnmatch_lines([
        "*RUNS [[]('eager', False), ('pct', False), ('rates', False), ('adversarial', True), ('pct', False)[]]*",
        "*SEEDED [[]('eager', 0), ('pct', *), ('rates', *)[]]*",
    ])
    from streamkit import fake

    seeded = [(e.schedule, e.seed) for e in fake.plan(2, 7)]
    assert f"SEEDED [('eager', 0), {seeded[0]}, {seeded[1]}]" in result.stdout.str()
    result = pytester.runpytest("-p", "no:cacheprovider", "-s", "--streamkit-schedules=2")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*RUNS [[]('eager', False), ('pct', False)[]]*"])
    result = pytester.runpytest("-p", "no:cacheprovider", "-s", "--streamkit-replay=pct:5:2")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*RUNS [[]('pct', False)[]]*", "*SEEDED [[]('pct', 5)[]]*"])


def test_a_bad_replay_token_is_a_usage_error(pytester):
    pytester.makepyfile(test_racy=RACY.format(wait=""))
    result = pytester.runpytest("-p", "no:cacheprovider", "--streamkit-replay=pct:1")
    assert result.ret != 0
    assert "--streamkit-replay: schedule token" in result.stdout.str() + result.stderr.str()
