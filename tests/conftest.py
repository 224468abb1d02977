"""Suite-wide set-up: ``tests/`` is on ``sys.path`` (pytest's default import mode puts a
conftest's folder there), so every test can ``import _support``; Hypothesis profiles; the fake
backend as the default choice; the ``eager_only`` marker for runs with a forced deferred schedule
(``STREAMKIT_SCHEDULE``)."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

# CI runs fewer examples per property (each is a fake session, some a subprocess); locally, more.
settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# The fake-backend tests make streams outside sessions (at import time, after a session ended) and
# compare them with sk.default_stream(): they need fake to be the backend chosen when no session or
# use_backend() block is active, as an engine's CI sets it. On a GPU machine the automatic choice
# would be cuda. The cuda/npu tests name their backend through the streamkit_backend fixture, and
# subprocess tests get the automatic choice back (_support.child_env drops the variable).
os.environ.setdefault("STREAMKIT_BACKEND", "fake")

# The suite starts some sixty Python processes (ranks, the checker, child pytest runs): let them
# reuse compiled bytecode of streamkit and the tests (__pycache__ is git-ignored) instead of
# compiling every module again in each one (about 0.2 s a process here).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "eager_only(reason): the test asserts values only the eager schedule computes (a racy program's"
        " lucky order); skipped with the reason when STREAMKIT_SCHEDULE names a deferred schedule",
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    marker = item.get_closest_marker("eager_only")
    if marker is None:
        return
    schedule = os.environ.get("STREAMKIT_SCHEDULE") or "eager"
    if schedule == "eager":
        return
    reason = marker.args[0] if marker.args else marker.kwargs.get("reason")
    if not reason:
        raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.eager_only(reason) needs the reason")
    # (sessions opened with an explicit schedule= keep theirs; this skips only tests whose
    # sessions take the forced one)
    pytest.skip(f"eager_only under STREAMKIT_SCHEDULE={schedule}: {reason}")
