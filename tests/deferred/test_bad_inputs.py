"""Bad inputs to the exploration entry points: each is refused where it enters, with an error that
names the argument, the value and what is accepted (issue 16)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import streamkit as sk
from streamkit import _errors, fake


def program():
    x = torch.ones(4, device=sk.device())
    return (x * 2).cpu()


def test_replay_refuses_a_program_that_is_not_callable_and_a_token_that_is_not_a_string():
    with pytest.raises(TypeError, match=r"replay\(fn\): expected a callable .* got 'prog' \(str\)"):
        fake.replay("prog", "lazy:0")
    with pytest.raises(TypeError, match=r"replay\(token\): expected a token string .* got 123 \(int\)"):
        fake.replay(program, 123)
    with pytest.raises(ValueError, match=r"schedule token: expected .*'rates:SEED'.*'pct:SEED:DEPTH\[:STEPS\]'"):
        fake.replay(program, "bogus:1")


@pytest.mark.parametrize("seed", ["abc", 1.5, [1, 2], True])
def test_session_refuses_a_seed_that_is_not_an_int(seed):
    with pytest.raises(ValueError, match=r"session\(seed\): expected an int, got " + __import__("re").escape(repr(seed))):
        fake.session(schedule="random", seed=seed).__enter__()


def test_session_checks_every_policy_argument_through_the_registry():
    with pytest.raises(ValueError, match=r"session\(schedule\): expected one of 'eager', 'lazy', .*'rates'.* got 'bogus'"):
        fake.session(schedule="bogus").__enter__()
    with pytest.raises(ValueError, match=r"session\(target\): schedule=\"pct\" takes a step count"):
        fake.session(schedule="pct", target="many").__enter__()
    with pytest.raises(ValueError, match=r"session\(target\): schedule='rates' takes no target"):
        fake.session(schedule="rates", target=((0, 1), (1, 1))).__enter__()
    with pytest.raises(ValueError, match=r"session\(target\)"):
        fake.session(schedule="order", target=[(0, 1)]).__enter__()
    with fake.session(schedule="order", target=[[[0, 1], [1, 1]]]) as s:  # (lists are normalized)
        assert s.scheduler.policy.target == (((0, 1), (1, 1)),)


def test_a_bogus_schedule_variable_is_blamed_by_name(monkeypatch):
    monkeypatch.setenv("STREAMKIT_SCHEDULE", "bogus")
    with pytest.raises(ValueError, match=r"the environment variable STREAMKIT_SCHEDULE='bogus' \(read because session\(schedule\) is None\)"):
        fake.session().__enter__()
    monkeypatch.setenv("STREAMKIT_SCHEDULE", "rates:3")  # (a token works there too)
    with fake.session() as s:
        assert (s.schedule, s.seed) == ("rates", 3)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"schedules": "8"}, TypeError, r"explore\(schedules\): expected an int >= 1, got '8' \(str\)"),
        ({"schedules": 2.5}, TypeError, r"explore\(schedules\): expected an int >= 1, got 2.5 \(float\)"),
        ({"schedules": 0}, ValueError, r"explore\(schedules\): expected an int >= 1, got 0"),
        ({"seed": "x"}, TypeError, r"explore\(seed\): expected an int, got 'x' \(str\)"),
        ({"detect": "loud"}, ValueError, r"explore\(detect\): expected one of 'raise', 'record', 'off', got 'loud'"),
    ],
)
def test_explore_refuses_bad_arguments_before_running_anything(kwargs, error, pattern):
    ran = []
    with pytest.raises(error, match=pattern):
        fake.explore(lambda: ran.append(1), **kwargs)
    assert ran == []
    with pytest.raises(TypeError, match=r"explore\(fn\): expected a callable"):
        fake.explore("prog")


def test_explore_compares_values_and_refuses_what_has_no_value_equality():
    with pytest.raises(TypeError, match=r"explore\(fn\): fn returned numpy.ndarray at the result; explore compares tensors"):
        fake.explore(lambda: program().numpy(), schedules=1)
    with pytest.raises(TypeError, match=r"fn returned builtins.object at the result\['b'\]\[1\]"):
        fake.explore(lambda: {"a": program(), "b": [1, object()]}, schedules=1)
    found = fake.explore(lambda: {"t": program(), "n": [1, 2.5, "s", None, (True, b"x", 1j)]}, schedules=2)
    assert found.ok and len(found.runs) == 2


def test_replay_fallback_warning_lives_with_the_other_errors():
    assert fake.ReplayFallbackWarning is _errors.ReplayFallbackWarning
    assert issubclass(fake.ReplayFallbackWarning, _errors.StreamkitWarning)


def test_integer_types_are_taken_as_ints():
    with fake.session(schedule="rates", seed=np.int64(5)) as s:
        assert s.seed == 5 and type(s.seed) is int
    found = fake.explore(program, schedules=np.int32(2), seed=np.int64(3))
    assert found.ok and len(found.runs) == 2
