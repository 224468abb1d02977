"""The fake engine as one typed object: the interface its users type against, the one record of
what is active, and the session factory the checker installs."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import streamkit as sk
from streamkit import _backend, fake
from streamkit._backends.fake import _interface
from streamkit._backends.fake._engine import Session
from streamkit._backends.fake._fake_backend import BACKEND
from streamkit._checker_scope import checker_session
from streamkit.check import CheckedBlock


def _members(protocol: type) -> set[str]:
    names = set(protocol.__annotations__)
    names |= {n for n, v in vars(protocol).items() if callable(v) or isinstance(v, property)}
    return {n for n in names if not n.startswith("__")}


def test_a_session_has_everything_the_engine_interface_names():
    members = _members(_interface.Engine)
    assert {"launch", "host_sync", "query", "current_stream", "lock", "capture", "scheduler"} <= members
    with fake.session() as s:
        missing = sorted(n for n in members if not hasattr(s, n))
        assert missing == []
    with checker_session():
        with fake.session() as block:
            assert isinstance(block, CheckedBlock)
            assert sorted(n for n in members if not hasattr(block, n)) == []


def test_the_checkers_block_is_an_engine_by_forwarding_not_a_session_subclass():
    assert not issubclass(CheckedBlock, Session)
    assert CheckedBlock.__module__ == "streamkit.check"  # its public name
    with checker_session() as host:
        with fake.session(detect="raise") as block:
            assert isinstance(block, _interface.Engine) and isinstance(host, _interface.Engine)
            # the engine is the host's: the same lock, clocks, streams and scheduler
            assert block.lock is host.lock and block.clocks is host.clocks and block.scheduler is host.scheduler
            assert block.current_stream() is host.current_stream()
            # its own: the detect mode, its closed flag and its views of races and stats
            assert block.detect == "raise" and host.detect == "raise"
            with pytest.raises(AttributeError, match="CheckedBlock"):
                block.no_such_attribute
        assert block.closed and not host.closed and host.detect == "record"
    assert not isinstance(object(), _interface.Engine)


def test_the_open_session_is_recorded_once_in_the_registry_stack():
    assert importlib.util.find_spec("streamkit._backends.fake._active") is None
    with fake.session() as s:
        assert _backend.active_scope(BACKEND) is s
        assert sk.get_backend() is BACKEND and BACKEND.current is s
        assert [scope for backend, scope in _backend._active if backend is BACKEND] == [s]
    assert _backend.active_scope(BACKEND) is None
    assert all(backend is not BACKEND or scope is not s for backend, scope in _backend._active)
    assert BACKEND.current is not s  # the default session (or none yet) again


def test_the_checker_installs_its_session_factory_only_while_its_session_is_open():
    plain = BACKEND.new_session
    with checker_session() as host:
        assert BACKEND.new_session is not plain
        with fake.session(detect="record") as block:
            assert isinstance(block, CheckedBlock) and block.host is host
            x = torch.zeros(2, device=sk.device())
            x.add_(1)
    assert BACKEND.new_session is plain
    with fake.session() as s:
        assert type(s) is Session


def test_the_backend_holds_its_state_as_instance_state():
    assert isinstance(BACKEND, fake.FakeBackend)
    with fake.session() as s:
        assert BACKEND.session is s and s.backend is BACKEND
        assert s.device == BACKEND.torch_device == sk.device()


def test_one_access_vocabulary_for_records_and_reports():
    from dataclasses import fields

    from streamkit._backends.fake._clocks import StreamState
    from streamkit._backends.fake._tracking import ACCESS_KINDS, AccessKind

    assert ACCESS_KINDS == ("read", "write", "free", "host read", "host write")
    assert [AccessKind(i).label for i in range(1, 6)] == list(ACCESS_KINDS)
    # the public Access carries strings and streamkit.Streams, no engine state
    assert [f.name for f in fields(fake.Access)] == ["op", "stream", "kind", "stack", "stream_label", "stream_code"]
    with fake.session(detect="record") as s:
        x = torch.zeros(4, device=sk.device())
        side = sk.Stream()
        with sk.switch(side):
            x.add_(1)
        x.mul_(2)
    assert s.races
    for access in [a for r in s.races for a in (r.first, r.second)]:
        assert access.kind in ACCESS_KINDS
        assert not any(isinstance(value, StreamState) for value in vars(access).values())
    race = s.races[-1]  # the mul_ on the default stream after the add_ on side
    assert race.first.stream == side and race.first.stream_code == "side"
    assert race.second.stream_label == "the default stream"
    assert sk.RaceError is fake.RaceError and sk.RaceError.__module__ == "streamkit._errors"


def test_sessions_stay_within_the_shared_key_instance_dict():
    """CPython keeps an instance's attributes in the class's shared-key table up to 30 names; past
    that every attribute read of a session (several per op) gets slower (it once cost x.add_(y)
    1.7%). The eager session, explore's observed reference run and its focused runs all fit."""
    from streamkit._backends.fake import _explore

    sessions = []
    real = _explore.session

    def spy(**kwargs):
        cm = real(**kwargs)

        class Wrapped:
            def __enter__(self):
                s = cm.__enter__()
                sessions.append(s)
                return s

            def __exit__(self, *exc):
                return cm.__exit__(*exc)

        return Wrapped()

    def program():
        side = sk.Stream()
        x = torch.ones(8, device=sk.device())
        x.mul_(2)
        with sk.switch(side):
            total = x.sum()
        sk.current_stream().wait_stream(side)
        return total.item()

    _explore.session = spy
    try:
        fake.explore(program, schedules=3)
    finally:
        _explore.session = real
    with fake.session(detect="record", schedule="rates:3") as plain:
        program()
    names = set(vars(plain))
    for s in sessions:
        names |= set(vars(s))
    assert len(sessions) >= 4 and len(names) <= 30, sorted(names)
