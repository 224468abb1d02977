"""Session lifetime: frees of tensors kept alive by reference cycles are checked inside the session,
and the heap freeze that makes the exit collection cheap is undone (or left alone)."""

import gc

import torch

import streamkit as sk
from streamkit import fake


def test_a_tensor_freed_only_by_the_exit_collection_is_still_checked():
    with fake.session(detect="record") as s:
        side = sk.Stream()
        x = torch.ones(8, device=s.device)
        side.wait_stream(sk.current_stream())
        with sk.switch(side):
            x.mul_(2)  # side writes x; nothing orders the default stream after it
        holder = {"x": x}
        holder["self"] = holder  # a cycle: only the garbage collector frees x
        del x, holder
        assert s.races == []
    assert [r.second.kind for r in s.races] == ["free"]
    assert s.races[0].first.op == "aten.mul_.Tensor"


def test_the_heap_freeze_is_undone_at_exit_even_when_the_block_raised():
    if gc.get_freeze_count():  # (something in this process froze its heap: the other test's case)
        gc.unfreeze()
        refreeze = True
    else:
        refreeze = False
    try:
        _freeze_undone_at_exit()
    finally:
        if refreeze:
            gc.freeze()


def _freeze_undone_at_exit():
    assert gc.get_freeze_count() == 0
    with fake.session():
        assert gc.get_freeze_count() > 0  # what existed before the session is not collected at exit
    assert gc.get_freeze_count() == 0
    try:
        with fake.session():
            raise KeyError("boom")
    except KeyError:
        pass
    assert gc.get_freeze_count() == 0


def test_a_process_that_froze_its_heap_keeps_its_freeze(monkeypatch):
    calls = []
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        for name in ("freeze", "unfreeze"):
            monkeypatch.setattr(gc, name, lambda real=getattr(gc, name), name=name: (calls.append(name), real())[1])
        with fake.session():
            pass
        monkeypatch.undo()
        assert calls == []  # the session neither froze nor unfroze: the process's freeze is left alone
        # (not `== frozen`: frozen objects freed meanwhile, such as an earlier session's state the
        # new one replaced, leave the count; how many depends on what this process ran before)
        assert 0 < gc.get_freeze_count() <= frozen
    finally:
        gc.unfreeze()
