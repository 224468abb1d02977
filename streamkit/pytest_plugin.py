"""pytest plugin (registered through the ``pytest11`` entry point).

- ``streamkit_backend``: parametrized over ``npu``, ``cuda`` and ``fake``; a backend that is not
  available here is skipped with the reason. Yields the backend, active for the test (on fake, a
  ``fake.session(detect="raise")`` is open for the test).
- ``fake_session``: a ``fake.session(detect="raise")`` for the test.
- ``@pytest.mark.streamkit_backends("fake", "cuda")``: run ``streamkit_backend`` on these only.
- ``@pytest.mark.streamkit_explore(schedules=20, seed=None, detect="record")``: run the test body
  under that many fake schedules (eager first, then explore's plan, by the runner ``fake.explore``
  uses), each in a fresh ``fake.session``; ``fake_session`` gives the current run's session. A failing run fails the test
  with its ``--streamkit-replay=TOKEN``. The seed defaults to ``zlib.crc32`` of the node id.
  Options: ``--streamkit-replay=TOKEN`` (run only that schedule; a full token whose fingerprint no
  longer matches the test's kernels reruns the body under its constraint form), ``--streamkit-schedules=N``.

Write a stream-semantics test once against ``streamkit_backend`` and it runs on every device the
machine has.
"""

from __future__ import annotations

import importlib
import zlib
from typing import Any, Iterator

import pytest

from . import _backend


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("streamkit")
    group.addoption(
        "--streamkit-replay",
        metavar="TOKEN",
        default=None,
        help="run streamkit_explore tests under this schedule only (a token from a failure: 'random:7', 'pct:3:3',"
        " or a full token from fake.explore)",
    )
    group.addoption(
        "--streamkit-schedules",
        metavar="N",
        type=int,
        default=None,
        help="run streamkit_explore tests under N schedules (overrides the marker's count)",
    )


def pytest_configure(config: Any) -> None:
    config.addinivalue_line(
        "markers", "streamkit_backends(*names): run the streamkit_backend fixture only on these backends"
    )
    config.addinivalue_line(
        "markers",
        "streamkit_explore(schedules=20, seed=None, detect='record'): run the test body under that many fake"
        " schedules (eager first), each in a fresh fake session",
    )


def _explore_options(item: Any, marker: Any, fake: Any) -> tuple[str | None, int, int]:
    """A ``streamkit_explore`` test's ``(replay token or None, schedules, seed)``."""
    config = item.config
    token = config.getoption("--streamkit-replay", None)
    if token:
        try:
            fake.read_token(token)
        except ValueError as error:
            raise pytest.UsageError(f"--streamkit-replay: {error}") from None
    schedules = config.getoption("--streamkit-schedules", None)
    if schedules is None:
        schedules = marker.kwargs.get("schedules", marker.args[0] if marker.args else 20)
    if type(schedules) is not int or schedules < 1:
        raise pytest.UsageError(f"streamkit_explore: schedules must be an int >= 1, got {schedules!r} ({item.nodeid})")
    seed = marker.kwargs.get("seed")
    if seed is None:
        seed = zlib.crc32(item.nodeid.encode())  # (stable across runs and machines: CI reproduces it)
    if type(seed) is not int:
        raise pytest.UsageError(f"streamkit_explore: seed must be an int or None, got {seed!r} ({item.nodeid})")
    return token, schedules, seed


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: Any) -> Any:
    marker = pyfuncitem.get_closest_marker("streamkit_explore")
    if marker is None:
        return None
    reason = _backend.unavailable_reason("fake")
    if reason is not None:
        pytest.skip(reason)
    fake = importlib.import_module("streamkit.fake")
    explore = importlib.import_module("streamkit._backends.fake._explore")
    token, schedules, seed = _explore_options(pyfuncitem, marker, fake)
    detect = marker.kwargs.get("detect", "record")
    funcargs = pyfuncitem.funcargs
    testargs = {name: funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    fake_backend = _backend.load_backend("fake")

    def body() -> None:
        if "fake_session" in testargs:
            testargs["fake_session"] = fake_backend.session  # (the run's own session, opened by the runner)
        pyfuncitem.obj(**testargs)

    def fail(run: Any, n: int, total: int, explanation: str = "", token: str | None = None) -> None:
        error = run.error
        token = token or run.token
        raise AssertionError(
            f"streamkit_explore: failed under schedule {token} (run {n} of {total}):"
            f" {type(error).__name__}: {error}\n{explanation}"
            f"rerun that schedule alone with: pytest {pyfuncitem.nodeid!r} --streamkit-replay={token}"
        ) from error

    if token:  # the token's schedule; its constraint form too if the test changed since (run_token)
        run = explore.run_token(body, token, detect, where="--streamkit-replay", keep_failure=True)
        if run.error is not None:
            if run.replayed_by == "constraints" and run.schedule != "constraints":
                fail(run, 2, 2, token=explore.constraint_token(token))
            fail(run, 1, 1, token=token)
        return True
    # the one runner fake.explore uses (eager first, then its plan), the test body as the program
    explorer = explore.Explorer(body, schedules - 1, seed, detect)
    reference = explorer.run_reference()
    if reference.error is not None:
        fail(reference, 1, schedules)
    if schedules == 1:
        return True
    for n, slot in enumerate(explorer.slots(), 2):
        run = explorer.run(slot)
        if run.error is not None:
            # shrunk as fake.explore shrinks: the message names the orderings that matter and gives
            # the full token (fingerprint and constraint form: the replay survives unrelated edits)
            explorer.shrink(run, None)
            text = ""
            if run.constraints:
                text = f"shrunk to {len(run.constraints)} ordering(s):\n  " + run.explanation.replace("\n", "\n  ") + "\n"
            elif run.explanation:
                text = run.explanation + "\n"
            fail(run, n, schedules, text)
    return True


def pytest_generate_tests(metafunc: Any) -> None:
    if "streamkit_backend" not in metafunc.fixturenames:
        return
    names = list(_backend.backend_names())
    marker = metafunc.definition.get_closest_marker("streamkit_backends")
    if marker is not None:
        unknown = [n for n in marker.args if n not in names]
        if unknown:
            raise pytest.UsageError(f"streamkit_backends marker: unknown backend(s) {unknown}; choose from {names}")
        names = [n for n in names if n in marker.args]
    metafunc.parametrize("streamkit_backend", names, indirect=True, ids=names)


@pytest.fixture
def streamkit_backend(request: Any) -> Iterator[Any]:
    name = request.param
    reason = _backend.unavailable_reason(name)
    if reason is not None:
        pytest.skip(reason)
    with _backend.backend_class(name).test_context() as backend:
        yield backend


@pytest.fixture
def fake_session(request: Any) -> Iterator[Any]:
    reason = _backend.unavailable_reason("fake")
    if reason is not None:
        pytest.skip(reason)
    if request.node.get_closest_marker("streamkit_explore") is not None:
        yield None  # (each run of the test gets a session of its own: pytest_pyfunc_call)
        return
    with _backend.backend_class("fake").test_context() as backend:
        yield backend.session
