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

- ``--streamkit-emulate=cuda|npu``: run the suite with the fake device as that device type
  (docs/emulation.md): installed before test modules are imported (streams made at import time are
  fake streams; ``torch.cuda.is_available()`` is true for ``skipif`` guards), and each test runs in
  a ``fake.session(emulate=..., detect="raise")`` of its own, from set-up to teardown, so a race
  fails the test naming both lines. (Tests that use ``fake_session``/``streamkit_backend`` or the
  ``streamkit_explore`` marker get their sessions from those, emulating too; while a test's own
  ``fake.session()`` / ``fake.explore()`` is open, the per-test session steps aside.)
- ``@pytest.mark.streamkit_emulate("npu")``: the same for one test. Where this process can't
  emulate that device (PyTorch names its PrivateUse1 device once per process: a process that ran
  ``fake`` sessions can't emulate ``npu``), the test runs in a child pytest process instead.

Write a stream-semantics test once against ``streamkit_backend`` and it runs on every device the
machine has.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
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
    group.addoption(
        "--streamkit-emulate",
        choices=("cuda", "npu"),
        default=None,
        help="run every test with the fake device as this device type: unmodified torch.cuda / torch.npu code runs"
        " on it, each test in a fake session of its own (docs/emulation.md)",
    )


_EMULATE_KEY = "_streamkit_emulate"


def pytest_configure(config: Any) -> None:
    config.addinivalue_line(
        "markers",
        "streamkit_emulate(device): run the test in a fake session emulating 'cuda' or 'npu' (in a child process"
        " where this one can't emulate that device)",
    )
    kind = config.getoption("--streamkit-emulate", None)
    if kind is not None:
        _emulate = importlib.import_module("streamkit._backends.fake._emulate")

        saved = os.environ.get(_emulate.ENV)
        os.environ[_emulate.ENV] = kind
        try:
            _emulate.acquire(kind)  # (before test modules are imported: their import-time streams are fake)
        except _emulate.EmulationError as error:
            raise pytest.UsageError(f"--streamkit-emulate={kind}: {error}") from None
        setattr(config, _EMULATE_KEY, (kind, saved))
    config.addinivalue_line(
        "markers", "streamkit_backends(*names): run the streamkit_backend fixture only on these backends"
    )
    config.addinivalue_line(
        "markers",
        "streamkit_explore(schedules=20, seed=None, detect='record'): run the test body under that many fake"
        " schedules (eager first), each in a fresh fake session",
    )


def pytest_unconfigure(config: Any) -> None:
    held = getattr(config, _EMULATE_KEY, None)
    if held is None:
        return
    _emulate = importlib.import_module("streamkit._backends.fake._emulate")

    kind, saved = held
    delattr(config, _EMULATE_KEY)
    _emulate.release(kind)
    if saved is None:
        os.environ.pop(_emulate.ENV, None)
    else:
        os.environ[_emulate.ENV] = saved


_OWN_SESSIONS = ("fake_session", "streamkit_backend")


def _emulation_of(item: Any) -> str | None:
    """The device type ``item`` runs emulated (its marker, else the run's option), or ``None``."""
    marker = item.get_closest_marker("streamkit_emulate")
    if marker is not None:
        kind = marker.args[0] if marker.args else marker.kwargs.get("device")
        if kind not in ("cuda", "npu"):
            raise pytest.UsageError(f"streamkit_emulate marker: expected 'cuda' or 'npu', got {kind!r} ({item.nodeid})")
        return kind
    return item.config.getoption("--streamkit-emulate", None)


def _in_child(item: Any, kind: str) -> bool:
    """Whether ``item`` must run in a child process (this one can't emulate ``kind``)."""
    _emulate = importlib.import_module("streamkit._backends.fake._emulate")

    try:
        _emulate.claim(kind)
    except _emulate.EmulationError:
        return True
    installed = _emulate.installed()
    return installed is not None and installed != kind


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: Any) -> Any:
    kind = _emulation_of(item)
    if kind is None or item.get_closest_marker("streamkit_explore") is not None or any(
        name in getattr(item, "fixturenames", ()) for name in _OWN_SESSIONS
    ):
        if kind is not None and item.get_closest_marker("streamkit_emulate") is not None:
            raise pytest.UsageError(
                f"streamkit_emulate marker on {item.nodeid}: the test's own fake sessions (fake_session,"
                " streamkit_backend, streamkit_explore) take the device from --streamkit-emulate or"
                " STREAMKIT_EMULATE, not from the marker; drop one of them"
            )
        return (yield)
    if item.get_closest_marker("streamkit_emulate") is not None and _in_child(item, kind):
        item._streamkit_child = kind  # (run by pytest_pyfunc_call in a child process)
        return (yield)
    fake = importlib.import_module("streamkit.fake")
    context = fake.session(detect="raise", emulate=kind)
    opened = context.__enter__()
    opened.yields_to_sessions = True  # (a fake.session() the test opens itself steps this one aside)
    item._streamkit_session = context
    try:
        return (yield)
    except BaseException:
        item._streamkit_session = None
        context.__exit__(*sys.exc_info())
        raise


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: Any, nextitem: Any) -> Any:
    try:
        return (yield)
    finally:
        context = getattr(item, "_streamkit_session", None)
        if context is not None:
            item._streamkit_session = None
            context.__exit__(None, None, None)


def _run_in_child(item: Any, kind: str) -> None:
    """Run ``item`` alone in a child pytest process emulating ``kind``; fail with its output."""
    args = [
        sys.executable, "-m", "pytest", item.nodeid, f"--streamkit-emulate={kind}", "-q", "-p", "no:cacheprovider",
        "-p", "no:xdist", "--rootdir", str(item.config.rootpath),
    ]
    env = dict(os.environ)
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run(args, cwd=str(item.config.rootpath), env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(
            f"streamkit_emulate({kind!r}): this process can't emulate {kind} (PyTorch names its PrivateUse1 device"
            f" once per process), so the test ran in a child process, which failed (exit {proc.returncode}):\n"
            f"{proc.stdout[-6000:]}{proc.stderr[-2000:]}"
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
    child = getattr(pyfuncitem, "_streamkit_child", None)
    if child is not None:
        _run_in_child(pyfuncitem, child)
        return True
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
