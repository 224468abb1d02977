"""Suite-wide set-up: ``tests/`` is on ``sys.path`` (pytest's default import mode puts a
conftest's folder there), so every test can ``import _support``; Hypothesis profiles; the fake
backend as the default choice; the ``eager_only`` marker for runs with a forced deferred schedule
(``STREAMKIT_SCHEDULE``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import _pytest.pytester as _pytester
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
    config.addinivalue_line(
        "markers",
        "slow: the test starts processes (seconds each): under pytest-xdist it is handed out first, so"
        " that the workers finish together instead of one running a long test while the other idles",
    )
    _group_shared_launches(config)


def _dist_named(config: pytest.Config) -> bool:
    """Whether the command line (or PYTEST_ADDOPTS) chose a pytest-xdist distribution mode."""
    args = list(config.invocation_params.args) + os.environ.get("PYTEST_ADDOPTS", "").split()
    return any(arg in ("-d", "--distload") or arg.startswith("--dist") for arg in args)


def _group_shared_launches(config: pytest.Config) -> None:
    """``python -m pytest -n 2`` distributes with ``loadgroup`` instead of xdist's default ``load``
    (unless a ``--dist`` was named): tests that share a module-scoped fixture (a rank launch, one
    child process for several scenarios: seconds of start-up) stay on one worker, so the launch
    runs once, not once per worker; every other test is still handed out one at a time."""
    if _dist_named(config):
        return
    if getattr(config.option, "dist", "no") == "load":
        config.option.dist = "loadgroup"  # (the controller: it picks the scheduler)
    elif hasattr(config, "workerinput"):
        config.option.loadgroup = True  # (a worker: it names each grouped test's group, for the scheduler)


@pytest.hookimpl(tryfirst=True)  # (before xdist's own hook reads the xdist_group marks)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # a plain run keeps the file order
    for item in items:
        if _shares_a_module_fixture(item) and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))
    # Slow tests first (a stable sort: the rest keep their order), so the last tests handed out are
    # short ones. (loadgroup hands out its groups, the biggest first, before single tests.)
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def _shares_a_module_fixture(item: pytest.Item) -> bool:
    """Whether ``item`` uses a module- or session-scoped fixture defined in this test suite."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    tests = Path(__file__).resolve().parent
    for defs in info.name2fixturedefs.values():
        for fixturedef in defs:
            if fixturedef.scope in ("module", "package", "session") and fixturedef.baseid and (
                (Path(str(item.config.rootpath)) / fixturedef.baseid.split("::")[0]).resolve().is_relative_to(tests)
            ):
                return True
    return False


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


class _KeepProcessWideModules(_pytester.SysModulesSnapshot):
    """Pytester's snapshot of ``sys.modules`` (taken around each in-process run and each pytester
    test), keeping PyTorch's and streamkit's modules imported meanwhile instead of dropping them.
    They are process-wide: a re-import registers the same ops twice (``Only a single TORCH_LIBRARY
    ...``), and ``torch.fake``, the device module PyTorch registers once per process, would be gone
    for every later fake test. Without this, a pytester test that is the first in its process (a
    pytest-xdist worker: it depends on how tests are handed out) to import them breaks the tests
    after it; the inner runs' own test files and conftests are still dropped."""

    def __init__(self, preserve: Callable[[str], bool] | None = None) -> None:
        super().__init__(lambda name: name.split(".")[0] in _PROCESS_WIDE or bool(preserve and preserve(name)))


_PROCESS_WIDE = {"torch", "streamkit", "streamkit_eplb"}
_pytester.SysModulesSnapshot = _KeepProcessWideModules  # (read by Pytester when it takes a snapshot)
