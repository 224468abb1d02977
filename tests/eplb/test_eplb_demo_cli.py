"""The demo's argument checks run in the parent, before any rank starts (in-process, fast), and its
failure paths (a rank timing out, a rank failing) on stand-in processes: no rank is spawned here."""

from __future__ import annotations

import pytest

from streamkit_eplb import _demo
from streamkit_eplb._demo import DemoConfig, main, run_demo


@pytest.fixture
def no_ranks(monkeypatch):
    """Starting a rank fails the test: the checks must come first."""

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("a rank process was started before the arguments were checked")

    monkeypatch.setattr(_demo.mp, "get_context", refuse)


@pytest.mark.parametrize("skew", ["nan", "inf", "-inf", "-1"])
def test_non_finite_or_negative_skew_is_refused(skew, tmp_path, no_ranks):
    with pytest.raises(SystemExit, match="--skew must be a finite number >= 0"):
        main(["demo", f"--skew={skew}", "--out", str(tmp_path / "h.png")])


def test_out_is_checked_before_the_simulation(tmp_path, no_ranks):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["demo", "--out", str(tmp_path / "missing" / "h.png")])
    with pytest.raises(SystemExit, match="is a directory"):
        main(["demo", "--out", str(tmp_path)])


def test_other_arguments_are_checked(tmp_path, no_ranks):
    out = str(tmp_path / "h.png")
    with pytest.raises(SystemExit, match="divisible by --ranks"):
        main(["demo", "--experts", "7", "--redundant", "0", "--out", out])
    with pytest.raises(SystemExit, match="--top-k"):
        main(["demo", "--top-k", "40", "--out", out])
    with pytest.raises(SystemExit, match="--timeout"):
        main(["demo", "--timeout", "nan", "--out", out])
    with pytest.raises(SystemExit, match="--window must be > 0"):
        main(["demo", "--window", "0", "--out", out])


def test_sizes_and_seeds_are_checked_before_any_rank_starts(tmp_path, no_ranks):
    out = str(tmp_path / "h.png")
    with pytest.raises(SystemExit, match="--experts must be <= 65,536.*got 10,000,000,000,000"):
        main(["demo", "--experts", "10000000000000", "--out", out])
    with pytest.raises(SystemExit, match=r"--seed must lie in \[0, 4294967295\].*got 1180591620717411303424"):
        main(["demo", "--seed", str(2**70), "--out", out])
    with pytest.raises(SystemExit, match="--seed must lie in"):
        main(["demo", "--seed", "-1", "--out", out])
    with pytest.raises(SystemExit, match="GiB per rank"):
        main(["demo", "--tokens", "100000", "--experts", "4096", "--out", out])
    with pytest.raises(SystemExit, match="--ranks must be <= 64"):
        main(["demo", "--ranks", "128", "--experts", "128", "--redundant", "0", "--out", out])


class _StandIn:
    """A rank process that never starts anything: ``alive`` says whether it still runs."""

    started: list["_StandIn"] = []

    def __init__(self, target, args, daemon, alive, exitcode):  # noqa: ANN001
        self.alive, self.exitcode, self.terminated = alive, exitcode, False

    def start(self) -> None:
        _StandIn.started.append(self)

    def join(self, timeout=None) -> None:  # noqa: ANN001
        return None  # returns at once: the rank is as `alive` says

    def is_alive(self) -> bool:
        return self.alive

    def terminate(self) -> None:
        self.terminated, self.alive, self.exitcode = True, False, -15

    kill = terminate


def _context(alive: bool, exitcode):  # noqa: ANN001
    class Context:
        def Process(self, target, args, daemon):  # noqa: N802, ANN001
            return _StandIn(target, args, daemon, alive, exitcode)

    return lambda method: Context()


def test_a_rank_timeout_says_how_long_and_what_to_raise(tmp_path, capsys, monkeypatch):
    _StandIn.started = []
    monkeypatch.setattr(_demo.mp, "get_context", _context(alive=True, exitcode=None))  # ranks that never finish
    cfg = DemoConfig(out=str(tmp_path / "h.png"), timeout=0.3)
    assert run_demo(cfg) == 1
    assert "timed out after 0.3 s; raise --timeout" in capsys.readouterr().err
    assert len(_StandIn.started) == 2 and all(p.terminated for p in _StandIn.started)  # none left running


def test_a_failing_rank_fails_the_demo_and_stops_the_others(tmp_path, capsys, monkeypatch):
    _StandIn.started = []
    monkeypatch.setattr(_demo.mp, "get_context", _context(alive=False, exitcode=1))
    assert run_demo(DemoConfig(out=str(tmp_path / "h.png"))) == 1
    assert "rank exit codes [1, 1]" in capsys.readouterr().err
