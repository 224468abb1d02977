"""The launch pipeline: every op call that launches a kernel goes through one mechanism
(``_pipeline.OpCall``; the fast path is its one specialised copy), which captures the issue site
once, from the frame its entry point passes."""

from __future__ import annotations

import ast
import sys

import torch

import streamkit as sk
from streamkit import fake
from streamkit._backends.fake import _pipeline
from streamkit._backends.fake._tensor import DispatchCall
from streamkit._backends.fake._sites import user_stack
from streamkit._backends.fake._tracking import READ, WRITE, plan_for

from _support import REPO

FAKE = REPO / "streamkit" / "_backends" / "fake"
#: who may call the engine's launch/issue and capture an issue site
LAUNCHERS = {"_pipeline.py", "_fastpath.py", "_engine.py"}
SITE_CAPTURERS = {"_pipeline.py", "_fastpath.py", "_sites.py", "_pinned.py"}  # (_pinned: host accesses, no kernel)


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def test_kernels_are_launched_only_through_the_pipeline():
    found = []
    for path in sorted(FAKE.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for call in _calls(tree):
            func = call.func
            if isinstance(func, ast.Attribute) and func.attr in ("launch", "issue"):
                receiver = ast.unparse(func.value)
                if receiver.endswith("session") and path.name not in LAUNCHERS:
                    found.append(f"{path.name}:{call.lineno}: {receiver}.{func.attr}(...)")
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if name == "capture_site" and path.name not in SITE_CAPTURERS:
                found.append(f"{path.name}:{call.lineno}: capture_site(...)")
    assert found == []


def test_the_rule_sees_a_direct_launch():
    tree = ast.parse("def handler(session):\n    session.launch(op, call, None, None, [], {}, [])\n")
    assert [ast.unparse(c.func) for c in _calls(tree)] == ["session.launch"]


def _line() -> int:
    return sys._getframe(1).f_lineno


def test_an_op_call_captures_its_site_once_from_the_frame_it_is_given():
    plan = plan_for(torch.ops.aten.add_.Tensor)
    with fake.session(detect="record") as s:
        x = torch.zeros(4, device=s.device)
        y = torch.ones(4, device=s.device)
        call = DispatchCall(plan, sys._getframe(0)); line = _line()  # noqa: E702
        assert call.session is s and call.stream is s.current_stream()
        assert user_stack(call.site)[-1].lineno == line
        call.unwrap([x, y], {})
        assert [(id(t), k) for t, k in call.accesses] == [(id(x), WRITE), (id(y), READ)]
        call.launch()
        assert call.kernel.site is call.site and call.kernel.stream is call.stream
        assert torch.equal(x.cpu(), torch.ones(4))
    with fake.session(detect="off", schedule="eager") as off:  # (a deferred schedule keeps clocks, sites too)
        assert DispatchCall(plan, sys._getframe(0)).site is None  # nothing to report: not captured
        assert off.tracked is False


def test_run_now_orders_the_stream_after_another_and_snapshots_its_clock():
    op = torch.ops.aten.add_.Tensor
    with fake.session(detect="record") as s:
        x = torch.zeros(4, device=s.device)
        x.add_(1)  # a kernel on the default stream
        with sk.switch(sk.Stream()):
            state = s.current_stream()  # the side stream's state
        assert state is not s.default_stream
        call = _pipeline.OpCall(s, op, op._op, site=(), stream=state)
        call.args, call.accesses = [x.sk_inner, 1], [(x, WRITE)]
        before = list(s.default_stream.clock)
        result, clock = call.run_now(after=s.default_stream, snapshot=True)
        assert clock == list(state.clock) and clock[0] == before[0]  # after the default stream's add_
        assert call.kernel.stream is state and clock[state.idx] == call.kernel.seq
        assert result is x.sk_inner and s.races == []  # ordered: the side stream waited for the default one
        sk.current_stream().wait_stream(sk.Stream.from_handle(s.backend, state.handle))
        assert torch.equal(x.cpu(), torch.full((4,), 2.0))
