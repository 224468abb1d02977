"""Running one fidelity program on plain CPU torch and on the fake device under several schedules."""

from __future__ import annotations

from typing import Any, Callable

import torch

import streamkit as sk
from streamkit import fake

#: the schedules a race-free program must compute CPU torch's values under
SCHEDULES = ("eager", "lazy", "adversarial", "random")


def _host(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu() if value.device.type != "cpu" else value.clone()
    if type(value) is list or type(value) is tuple:
        return [_host(v) for v in value]
    return value


def assert_matches_cpu(program: Callable[[torch.device], Any], seeds: tuple = (0, 1)) -> Any:
    """Run ``program(device)`` on CPU torch (a fake session open for its ``sk`` calls), then on the
    fake device under every schedule of :data:`SCHEDULES` (``random`` once per seed), race-free
    (``detect="raise"``); every run's host values must equal the CPU run's. Returns those."""
    with fake.session(detect="raise"):
        expected = _host(program(torch.device("cpu")))
    runs = [(s, 0) for s in SCHEDULES if s != "random"] + [("random", seed) for seed in seeds]
    for schedule, seed in runs:
        with fake.session(detect="raise", schedule=schedule, seed=seed) as s:
            got = _host(program(s.device))
        torch.testing.assert_close(got, expected, equal_nan=True, msg=lambda m: f"schedule={schedule} seed={seed}: {m}")
    return expected


def races_of(program: Callable[[torch.device], Any]) -> list:
    """The races an eager ``detect="record"`` run of ``program`` on the fake device reports."""
    with fake.session(detect="record") as s:
        program(s.device)
        sk.synchronize()
    return list(s.races)
