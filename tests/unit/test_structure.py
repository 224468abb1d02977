"""The package's shape: no import cycles, neutral modules that import no backend, backends as
plugins (a third-party one registers by name), and every backend's reason when none loads."""

from __future__ import annotations

import ast
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import streamkit as sk
from streamkit import _backend

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("streamkit", "streamkit_eplb")
NEUTRAL = ("streamkit", "streamkit._api", "streamkit._backend", "streamkit._errors", "streamkit.pytest_plugin")
BACKENDS = "streamkit._backends."


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every project module ``name`` imports, at module level or inside functions (not under
    ``if TYPE_CHECKING:``): ``from X import Y`` counts as X.Y when that is a module, else X."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    targets: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for extra in child.orelse:
                    visit(extra)
                continue
            if isinstance(child, ast.Import):
                targets.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = here[: len(here) - child.level + 1] if child.level else []
                module = ".".join(base + (child.module.split(".") if child.module else []))
                for alias in child.names:
                    full = f"{module}.{alias.name}"
                    targets.add(full if full in modules else module)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {t for t in targets if t in modules and t != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_import_walk_sees_function_level_and_relative_imports(graph):
    # guards the walker itself: these edges exist (one relative, one at function level)
    assert "streamkit._backend" in graph["streamkit._api"]
    assert "streamkit._backends.fake._tensor" in graph["streamkit._backends.fake._fastpath"]
    assert "streamkit._checker_scope" in graph["streamkit.check"]


def test_no_module_imports_another_in_a_cycle(graph):
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                dfs(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node)
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_neutral_modules_import_no_backend(graph):
    for name in NEUTRAL:
        backends = sorted(t for t in graph[name] if t.startswith(BACKENDS) or t == "streamkit.fake")
        assert backends == [], f"{name} imports backend modules {backends}"


class HostBackend(sk.Backend):
    """A trivial third-party backend: host "streams" on which every op has already completed."""

    name = "host"

    @classmethod
    def load(cls) -> "HostBackend":
        return cls()

    def device(self):
        return torch.device("cpu")

    def synchronize(self):
        pass

    def new_stream(self, priority):
        return ("stream", priority, object())

    def current_stream(self):
        return _DEFAULT

    def default_stream(self):
        return _DEFAULT

    def stream_context(self, stream):
        import contextlib

        return contextlib.nullcontext()

    def stream_wait_event(self, stream, event):
        pass

    def stream_synchronize(self, stream):
        pass

    def stream_query(self, stream):
        return True

    def stream_priority(self, stream):
        return stream[1]

    def stream_key(self, stream):
        return id(stream[2])

    def new_event(self, enable_timing):
        return {"recorded": False}

    def event_record(self, event, stream):
        event["recorded"] = True

    def event_synchronize(self, event):
        pass

    def event_query(self, event):
        return True

    def event_elapsed_time(self, start, end):
        return 0.0

    def record_stream(self, tensor, stream):
        pass


_DEFAULT = ("stream", 0, object())


@pytest.fixture
def registry(monkeypatch):
    """The registry's tables, restored after the test."""
    monkeypatch.setattr(_backend, "_MODULES", dict(_backend._MODULES))
    monkeypatch.setattr(_backend, "_classes", dict(_backend._classes))
    monkeypatch.setattr(_backend, "_import_errors", {})
    return _backend


def test_a_third_party_backend_registers_by_class_and_runs_the_api(registry):
    sk.register_backend("host", HostBackend)
    assert sk.backend_names()[-1] == "host" and "host" in sk.available_backends()
    with sk.use_backend("host") as backend:
        assert isinstance(backend, HostBackend) and sk.get_backend() is backend
        side = sk.Stream(priority=-1)
        assert side.backend == "host" and side.priority == -1
        side.wait_stream(sk.current_stream())
        with sk.switch(side) as s:
            assert s is side
        event = side.record_event()
        event.synchronize()
        assert event.query() and side.query()
    # and its test hook is the default one: the backend is active for the test, then synchronized
    with HostBackend.test_context() as backend:
        assert sk.get_backend() is backend


def test_switching_to_a_stream_of_another_backend_than_the_active_one_is_an_error(registry):
    # A library made its side stream while another backend was chosen (at import time on a GPU
    # machine, say), and a fake session is open now: work inside switch() would not run on that
    # stream, so it is refused, naming both backends and the fix.
    from streamkit import fake

    sk.register_backend("host", HostBackend)
    with sk.use_backend("host"):
        host_side = sk.Stream()
    with fake.session():
        with pytest.raises(sk.BackendMismatchError) as info:
            with sk.switch(host_side):
                pass
        fake_side = sk.Stream()
        with sk.use_backend("host"), pytest.raises(sk.BackendMismatchError, match="active backend is host"):
            sk.switch(fake_side)
        with sk.switch(fake_side):  # its own backend: fine
            assert sk.current_stream() == fake_side
    text = str(info.value)
    assert "belongs to the host backend, but the active backend is fake" in text
    assert "STREAMKIT_BACKEND=fake" in text and "sk.set_backend('fake')" in text


def test_a_third_party_backend_registers_by_module_name(registry, tmp_path, monkeypatch):
    (tmp_path / "sk_host_backend.py").write_text(
        textwrap.dedent(
            """
            import streamkit as sk
            from streamkit._backends.fake import FakeBackend
            class Mine(FakeBackend):
                name = "mine"
            backend_class = Mine
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sk.register_backend("mine", "sk_host_backend", preferred=True)
    assert sk.backend_names()[0] == "mine"
    assert _backend.backend_class("mine").__module__ == "sk_host_backend"
    sys.modules.pop("sk_host_backend", None)


def test_registration_refuses_bad_arguments(registry):
    with pytest.raises(ValueError, match="register_backend\\(name\\)"):
        sk.register_backend("not a name", HostBackend)
    with pytest.raises(TypeError, match="Backend subclass"):
        sk.register_backend("host", object)
    with pytest.raises(ValueError, match="unknown streamkit backend 'nope'"):
        sk.get_backend("nope")


def test_when_no_backend_loads_the_error_lists_every_reason(registry, monkeypatch):
    class Unplugged(HostBackend):
        @classmethod
        def load(cls):
            raise sk.BackendUnavailableError("unplugged backend unavailable: the device is unplugged")

    registry._MODULES.clear()
    registry._MODULES.update({"broken": "no_such_module_for_streamkit"})
    sk.register_backend("unplugged", Unplugged)
    monkeypatch.setattr(registry, "_active", [])
    monkeypatch.setattr(registry, "_selected", None)
    monkeypatch.delenv("STREAMKIT_BACKEND", raising=False)
    with pytest.raises(sk.BackendUnavailableError) as info:
        sk.Stream()
    text = str(info.value)
    assert "no streamkit backend is available" in text
    assert "unplugged backend unavailable: the device is unplugged" in text
    assert "broken backend unavailable: importing no_such_module_for_streamkit failed: ModuleNotFoundError" in text


# -- the private-attribute rule -------------------------------------------------------------------
FAKE_PACKAGE = REPO / "streamkit" / "_backends" / "fake"
#: modules that use the fake engine besides the backend's own (the checker's scope)
ENGINE_USERS = (REPO / "streamkit" / "_checker_scope.py",)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _defined_privates(tree: ast.Module) -> set[str]:
    """The private names a module defines: its globals, class members, attributes it assigns
    (``obj._x = ...``) and ``__slots__`` entries."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.alias) and node.asname:
            names.add(node.asname)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets):
            names |= {c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    return {n for n in names if _private(n)}


def _root(node: ast.AST) -> str | None:
    """The name an attribute chain starts from (``torch`` in ``torch.ops.aten._to_copy``)."""
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _external_names(tree: ast.Module) -> set[str]:
    """Names a module binds to modules and objects outside the project (``import torch``,
    ``from typing import Any``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if not a.name.startswith("streamkit")}
        elif isinstance(node, ast.ImportFrom) and not node.level and not (node.module or "").startswith("streamkit"):
            names |= {a.asname or a.name for a in node.names}
    return names


def _project_trees() -> dict[str, ast.Module]:
    return {name: ast.parse(path.read_text(), str(path)) for name, path in _modules().items()}


def test_no_fake_module_reads_another_modules_private_attributes():
    """The engine is called, not reached into: a fake backend module reads no private name
    (``x._name``, ``from m import _name``) that only another project module defines. (Private
    names of torch and the standard library, such as ``torch._C``, are out of scope: no project
    module defines them.)"""
    trees = _project_trees()
    defined = {name: _defined_privates(tree) for name, tree in trees.items()}
    paths = _modules()
    checked = [n for n, p in paths.items() if p.parent == FAKE_PACKAGE or p in ENGINE_USERS]
    assert len(checked) > 10, checked  # (guards the walk itself)
    found = []
    for name in checked:
        own = defined[name]
        elsewhere = set().union(*(names for other, names in defined.items() if other != name))
        external = _external_names(trees[name])
        package = name.split(".")[:-1] if paths[name].name != "__init__.py" else name.split(".")
        for node in ast.walk(trees[name]):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                if _root(node.value) in external:
                    continue  # torch._C, sys._getframe: not the project's
                if node.attr in elsewhere and node.attr not in own:
                    found.append(f"{paths[name].relative_to(REPO)}:{node.lineno}: .{node.attr}")
            elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("streamkit")):
                base = package[: len(package) - node.level + 1] if node.level else []
                module = ".".join(base + (node.module.split(".") if node.module else []))
                for alias in node.names:
                    if _private(alias.name) and f"{module}.{alias.name}" not in paths:  # (a module is no attribute)
                        found.append(f"{paths[name].relative_to(REPO)}:{node.lineno}: import {alias.name}")
    assert found == [], "private names of other modules read:\n" + "\n".join(found)


def test_the_private_attribute_rule_sees_a_violation(tmp_path):
    # guards the rule itself: a module assigning a private attribute, another reading it
    owner = ast.parse("class A:\n    def __init__(self):\n        self._secret = 1\n")
    reader = ast.parse("def f(a):\n    return a._secret\n")
    assert "_secret" in _defined_privates(owner) and "_secret" not in _defined_privates(reader)
    reads = [n.attr for n in ast.walk(reader) if isinstance(n, ast.Attribute) and _private(n.attr)]
    assert reads == ["_secret"]


def test_no_fake_module_counts_frame_depths():
    """Issue sites are captured at each entry point from its caller's frame (or walked from where
    the call is served): no module counts frames through streamkit's own call chain."""
    fake_dir = REPO / "streamkit" / "_backends" / "fake"
    found = []
    for path in sorted(fake_dir.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            depth = node.args[0]
            if name == "_getframe" and isinstance(depth, ast.Constant) and isinstance(depth.value, int) and depth.value > 1:
                found.append(f"{path.name}:{node.lineno}: _getframe({depth.value})")
    assert found == []
