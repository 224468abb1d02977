"""Multi-rank: the collector across a process group (gloo ranks on the fake backend; NCCL/HCCL
across the visible devices when those backends exist), the shape check, dead peers, and the demo.

Every scenario runs as subprocesses with their own timeout: a failure is a failed test, never a hang.
"""

from __future__ import annotations

import re

import pytest

from streamkit_eplb._buggy import marker_lines


def _assert_ok(results):
    for r in results:
        assert r.returncode == 0, r.describe()


def test_ranks_are_race_free_sync_free_and_conserve_every_token(streamkit_backend, main_ranks, eplb_world):
    name = streamkit_backend.name
    results = main_ranks(name, eplb_world(name))
    _assert_ok(results)
    for r in results:
        assert r.lines("OK") == [""], r.describe()
        assert int(r.lines("RECORDS")[0]) > 50
        assert int(r.lines("COLLECTS")[0]) > 5
        assert int(r.lines("HYPOTHESIS_EXAMPLES")[0]) == 12  # the property held on every example
        assert r.lines("ENGINES") == ["ok"], r.describe()
    # every rank sees the same gathered windows
    assert len({r.lines("CHECKSUM")[0] for r in results}) == 1
    if name == "fake":  # detect="raise" ran the whole thing; and not one host sync
        for r in results:
            assert r.lines("RACES") == ["0"]
            assert r.lines("RECORD_SYNCS") == ["0"], r.describe()
            assert r.lines("COLLECT_SYNCS") == ["0"], r.describe()


def test_ranks_disagreeing_on_the_shape_fail_at_construction(streamkit_backend, main_ranks, eplb_world):
    name = streamkit_backend.name
    results = main_ranks(name, eplb_world(name))  # (the main scenario's launch runs the mismatch first)
    _assert_ok(results)
    for r in results:
        (message,) = r.lines("MISMATCH") or [r.describe()]
        assert "disagree on (num_layers, num_experts)" in message
        assert "rank 0: (4, 8)" in message and "rank 1: (4, 16)" in message


def _survivor_raised(results, case: str) -> tuple[str, str]:
    """Rank 0 must have raised CollectError from wait() (not returned a partial heat) in ``case``
    (STALL or DEATH): the cause's type and message."""
    survivor = results[0]
    assert survivor.returncode == 0, survivor.describe()
    assert survivor.lines(f"{case} RETURNED") == [], survivor.describe()
    (raised,) = survivor.lines(f"{case} RAISED") or [survivor.describe()]
    _seconds, cause, *message = raised.split(" ", 2)
    assert survivor.lines(f"{case} DONE") == [""], survivor.describe()
    return cause, " ".join(message)


# The two peer failures share one launch (the ``peers`` scenario: the stall, then the death).
@pytest.mark.streamkit_backends("fake")
def test_a_dead_peer_makes_wait_raise_not_return_a_partial_heat(streamkit_backend, peer_failure_ranks):
    results = peer_failure_ranks()
    cause, _message = _survivor_raised(results, "DEATH")
    assert cause != "NoneType"  # the collective's own error is attached as __cause__
    assert results[1].lines("DEATH DYING") == [""]


@pytest.mark.streamkit_backends("fake")
def test_a_stalled_peer_makes_wait_raise_within_the_group_timeout(streamkit_backend, peer_failure_ranks):
    results = peer_failure_ranks()
    cause, message = _survivor_raised(results, "STALL")
    assert "timed out" in message.lower() or "timeout" in message.lower(), (cause, message)
    # the wait ended while the peer still stalled: the group's timeout bounded it, not the peer's return
    assert results[0].lines("STALL PEER_STILL_STALLING") == ["True"], results[0].describe()


SMALL = ("--layers", "4", "--experts", "8", "--redundant", "2", "--steps", "4", "--window", "4", "--tokens", "32", "--timeout", "100")


@pytest.mark.streamkit_backends("fake")
def test_demo_closes_the_loop_and_plots_before_and_after(streamkit_backend, eplb_demo, tmp_path):
    out = tmp_path / "heat.png"
    proc = eplb_demo(*SMALL, "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert "2 gloo ranks on the fake backend" in text
    assert "races: 0" in text
    assert "record 1.00 kernels, 0.00 host syncs" in text and "step 1.00 kernels, 0.00 host syncs" in text
    assert "placement v0" in text and "placement v1" in text
    table = [line.split() for line in text.splitlines() if line.strip()[:1].isdigit() and len(line.split()) == 4]
    assert len(table) == 4  # one row per layer: before, predicted, after
    assert all(0.0 < float(v) <= 1.0 for row in table for v in row[1:])
    mean = next(line.split() for line in text.splitlines() if line.strip().startswith("mean"))
    assert float(mean[3]) > float(mean[1])  # rebalancing helped on skewed traffic
    moved = re.search(r"rebalance: (\d+) of (\d+) expert slots change \(weights to move; (\d+) without old=\)", text)
    assert moved and int(moved[1]) <= int(moved[3]) <= int(moved[2]), text  # old= never moves more
    assert "rank 0 time: spawn" in text and "imports" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.streamkit_backends("fake")
def test_demo_buggy_reports_the_race_and_exits_non_zero(streamkit_backend, eplb_demo):
    proc = eplb_demo(*SMALL, "--buggy", "--steps", "2")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    text = proc.stdout
    assert "race(s)" in text and "the race report" in text and "found the race" in text
    flagged = [line for line in text.splitlines() if "<- gather on the side stream vs. clear" in line]
    assert flagged, text
    assert any(f"_buggy.py:{n}" in flagged[0] for n in marker_lines("gather"))
    assert any(f"_buggy.py:{n}" in flagged[0] for n in marker_lines("clear"))
    assert "stream race on a tensor" in text
