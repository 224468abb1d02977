"""pytest plugin (registered through the ``pytest11`` entry point).

- ``streamkit_backend``: parametrized over ``npu``, ``cuda`` and ``fake``; a backend that is not
  available here is skipped with the reason. Yields the backend, active for the test (on fake, a
  ``fake.session(detect="raise")`` is open for the test).
- ``fake_session``: a ``fake.session(detect="raise")`` for the test.
- ``@pytest.mark.streamkit_backends("fake", "cuda")``: run ``streamkit_backend`` on these only.

Write a stream-semantics test once against ``streamkit_backend`` and it runs on every device the
machine has.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from . import _backend


def pytest_configure(config: Any) -> None:
    config.addinivalue_line(
        "markers", "streamkit_backends(*names): run the streamkit_backend fixture only on these backends"
    )


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
def fake_session() -> Iterator[Any]:
    reason = _backend.unavailable_reason("fake")
    if reason is not None:
        pytest.skip(reason)
    with _backend.backend_class("fake").test_context() as backend:
        yield backend.session
