"""Backend selection, wrappers and argument errors of the public API."""

import pytest
import torch

import streamkit as sk
from streamkit import fake


def test_fake_is_always_available_and_last_in_preference_order():
    names = sk.available_backends()
    assert names[-1] == "fake"
    assert names == [n for n in ("npu", "cuda", "fake") if n in names]


def test_unavailable_backends_say_why():
    for name in ("cuda", "npu"):
        reason = sk.unavailable_reason(name)
        if reason is None:
            continue
        assert name in reason
        with pytest.raises(sk.BackendUnavailableError, match=name):
            sk.get_backend(name)


def test_unknown_backend_name_is_a_value_error():
    with pytest.raises(ValueError, match="choose one of"):
        sk.get_backend("tpu")
    with pytest.raises(TypeError, match="name"):
        sk.get_backend(3)


def test_session_is_the_active_backend_inside_and_not_after():
    with fake.session() as s:
        assert sk.get_backend() is s.backend
        assert sk.device() == s.device == torch.device("fake", 0)
        with sk.use_backend("fake") as b:
            assert b is s.backend
        assert sk.get_backend().session is s
    # one fake backend object; after the block it works in the default session
    assert sk.get_backend("fake") is s.backend and sk.get_backend("fake").session is not s


def test_env_var_selects_the_backend(monkeypatch):
    monkeypatch.setenv("STREAMKIT_BACKEND", "fake")
    assert sk.get_backend().name == "fake"
    monkeypatch.setenv("STREAMKIT_BACKEND", "nope")
    with pytest.raises(ValueError, match="nope"):
        sk.get_backend()


def test_set_backend_validates_and_resets():
    sk.set_backend("fake")
    try:
        assert sk.get_backend().name == "fake"
    finally:
        sk.set_backend(None)
    with pytest.raises(ValueError):
        sk.set_backend("tpu")


def test_sessions_do_not_nest():
    with fake.session():
        with pytest.raises(sk.StreamkitError, match="already open"):
            with fake.session():
                pass


def test_bad_detect_mode():
    with pytest.raises(ValueError, match="detect"):
        fake.session(detect="loud").__enter__()


def test_argument_type_errors_name_the_argument(fake_session):
    s = sk.Stream()
    with pytest.raises(TypeError, match=r"wait_stream\(other\)"):
        s.wait_stream(torch.ones(1))
    with pytest.raises(TypeError, match=r"wait_event\(event\)"):
        s.wait_event(s)
    with pytest.raises(TypeError, match=r"switch\(stream\)"):
        with sk.switch("side"):
            pass
    with pytest.raises(TypeError, match="priority"):
        sk.Stream(priority="high")
    with pytest.raises(TypeError, match="enable_timing"):
        sk.Event(enable_timing=1)
    with pytest.raises(TypeError, match=r"record_stream\(tensor\)"):
        sk.record_stream([1], s)
    with pytest.raises(ValueError, match="not on the fake device"):
        sk.record_stream(torch.ones(2), s)


def test_streams_of_an_ended_session_bind_to_the_next_one():
    with fake.session():
        old = sk.Stream()
        old_event = sk.Event()
    with pytest.raises(sk.SessionClosedError, match="no fake.session"):
        old.synchronize()
    with pytest.raises(sk.SessionClosedError):
        with sk.switch(old):
            pass
    with fake.session():
        new = sk.Stream()
        new.wait_stream(old)  # old is a stream of this session now
        with sk.switch(old):
            assert sk.current_stream() == old != new
        with pytest.warns(sk.UnrecordedEventWarning):
            new.wait_event(old_event)


def test_tensors_of_a_closed_session_are_refused():
    with fake.session() as s:
        x = torch.ones(3, device=s.device)
    with fake.session():
        with pytest.raises(sk.SessionClosedError, match="ended"):
            x + 1


def test_priority_is_clamped_like_cuda(fake_session):
    assert sk.Stream(priority=-1).priority == -1
    assert sk.Stream(priority=100).priority == 0
    assert sk.Stream(priority=-100).priority == -5


def test_repr_and_native(fake_session):
    s = sk.Stream()
    assert "fake" in repr(s) and s.native is None and s.backend == "fake"
    assert sk.Event().native is None
