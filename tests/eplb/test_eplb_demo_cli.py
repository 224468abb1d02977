"""The demo's argument checks run in the parent, before any rank starts (in-process, fast)."""

from __future__ import annotations

import time

import pytest

from streamkit_eplb._demo import DemoConfig, main, run_demo


@pytest.mark.parametrize("skew", ["nan", "inf", "-inf", "-1"])
def test_non_finite_or_negative_skew_is_refused(skew, tmp_path):
    with pytest.raises(SystemExit, match="--skew must be a finite number >= 0"):
        main(["demo", f"--skew={skew}", "--out", str(tmp_path / "h.png")])


def test_out_is_checked_before_the_simulation(tmp_path):
    start = time.perf_counter()
    with pytest.raises(SystemExit, match="does not exist"):
        main(["demo", "--out", str(tmp_path / "missing" / "h.png")])
    with pytest.raises(SystemExit, match="is a directory"):
        main(["demo", "--out", str(tmp_path)])
    assert time.perf_counter() - start < 2.0  # no rank was started


def test_other_arguments_are_checked(tmp_path):
    out = str(tmp_path / "h.png")
    with pytest.raises(SystemExit, match="divisible by --ranks"):
        main(["demo", "--experts", "7", "--redundant", "0", "--out", out])
    with pytest.raises(SystemExit, match="--top-k"):
        main(["demo", "--top-k", "40", "--out", out])
    with pytest.raises(SystemExit, match="--timeout"):
        main(["demo", "--timeout", "nan", "--out", out])
    with pytest.raises(SystemExit, match="--window must be > 0"):
        main(["demo", "--window", "0", "--out", out])


def test_a_rank_timeout_says_how_long_and_what_to_raise(tmp_path, capsys):
    cfg = DemoConfig(out=str(tmp_path / "h.png"), timeout=0.3)  # the ranks cannot even import torch in 0.3 s
    assert run_demo(cfg) == 1
    err = capsys.readouterr().err
    assert "timed out after 0.3 s; raise --timeout" in err
