"""The fast path must be indistinguishable from the dispatch path: same values, races, stats."""

import pytest
import torch

import streamkit as sk
from streamkit import fake
from streamkit._backends.fake import _fastpath

def program() -> dict:
    with fake.session(detect="record") as s:
        side = sk.Stream()
        x = torch.arange(8.0).to(s.device)
        y = torch.ones(8, device=s.device)
        x.add_(y)                      # default writes x
        x += 1
        z = x * 2 + y                  # fresh outputs
        with sk.switch(side):
            w = x.sum()                # race: side reads x without waiting
            y.mul_(3)                  # race: side writes y that default read
            host = z.cpu()             # race: side copies z to the host without waiting for default
        side.wait_stream(sk.default_stream())
        with sk.switch(side):
            v = (z - 1).clone()
        sk.default_stream().wait_stream(side)
        return {
            "values": [z.tolist(), w.item(), v.tolist(), y.tolist()],
            "races": [(r.first.op, r.first.kind, r.first.lineno, r.second.op, r.second.kind, r.second.lineno) for r in s.races],
            "kernels": s.stats.kernels,
            "syncs": [s.stats.blocking_copies, s.stats.host_syncs],
            "host": [host.device.type, host.tolist(), list(host.stride())],
        }


def test_fast_and_dispatch_paths_agree(monkeypatch):
    taken = []
    real_launch = fake.Session.launch

    def launch(self, op, call, *args, **kwargs):
        taken.append(call is not getattr(op, "_op", None))  # the fast path calls the torch function itself
        return real_launch(self, op, call, *args, **kwargs)

    monkeypatch.setattr(fake.Session, "launch", launch)
    program()  # learn the plans
    taken.clear()
    fast = program()
    fast_taken = sum(taken)
    taken.clear()
    with _fastpath._dispatch_only():
        slow = program()
    assert fast_taken >= 5 and not any(taken), (fast_taken, taken)  # each run took the path it names
    assert repr(fast) == repr(slow)  # (repr: NaN equal to NaN, for poison under a forced deferred schedule)
    assert ("aten.sum.default", "read") in [(r[3], r[4]) for r in fast["races"]]
    assert ("aten.mul_.Tensor", "write") in [(r[3], r[4]) for r in fast["races"]]
    assert ("aten._to_copy.default", "read") in [(r[3], r[4]) for r in fast["races"]]


def test_fast_path_is_taken_for_whitelisted_ops(fake_session):
    x = torch.zeros(4, device=fake_session.device)
    y = torch.ones(4, device=fake_session.device)
    x.add_(y)  # first call: learned through dispatch
    key = (torch.Tensor.add_, type(x), type(y))
    plan = _fastpath._plans[key]
    assert plan is not None and plan.returns_self and str(plan.op) == "aten.add_.Tensor"
    assert plan.tensors == ((0, 2), (1, 1))  # self written, other read


def test_ops_that_are_not_one_kernel_are_never_cached(fake_session):
    x = torch.zeros(4, device=fake_session.device)
    x.copy_(torch.ones(4))  # an H2D copy, not a device kernel
    assert _fastpath._plans[(torch.Tensor.copy_, type(x), torch.Tensor)] is None
    assert x.tolist() == [1.0] * 4


def test_fast_path_refuses_tensors_of_another_session():
    with fake.session() as s:
        x = torch.zeros(4, device=s.device)
        x.add_(1)
    with fake.session():
        try:
            x.add_(1)
        except sk.SessionClosedError:
            pass
        else:
            raise AssertionError("a tensor of a closed session was accepted")


def test_dtype_conversions_that_return_their_input_keep_its_identity(fake_session):
    i = torch.zeros(4, dtype=torch.long, device=fake_session.device)
    f = torch.zeros(4, device=fake_session.device)
    assert i.float() is not i
    assert f.float() is f  # no copy: the same tensor, so races on it are still seen
    side = sk.Stream()
    g = f.float()
    with sk.switch(side):
        try:
            g.add_(1)  # f was written on the default stream (zeros): side must wait
        except sk.RaceError:
            pass
        else:
            raise AssertionError("race through an alias returned by float() was missed")


def test_an_op_that_refuses_its_arguments_leaves_no_kernel_behind():
    with fake.session(detect="raise") as s:
        side = sk.Stream()
        x = torch.zeros(4, dtype=torch.long, device=s.device)
        y = torch.ones(4, device=s.device)
        before = s.stats.kernels
        for _ in range(2):  # the first call learns through dispatch, the second takes the fast path
            with pytest.raises(RuntimeError, match="can't be cast"):
                x.add_(y)  # float into long: rejected before anything runs, as on CUDA
        assert s.stats.kernels == before
        # had the rejected writes been recorded, side reading x now would be reported as a race
        with sk.switch(side):
            x.sum()
        assert s.races == []


def test_method_calls_skip_torch_function_but_modes_still_see_them(fake_session):
    from torch.overrides import TorchFunctionMode

    from streamkit.fake import FakeDeviceTensor

    assert FakeDeviceTensor.add_ is not torch.Tensor.add_  # the Python stand-in
    seen = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    x = torch.zeros(4, device=fake_session.device)
    y = torch.ones(4, device=fake_session.device)
    with Spy():
        x.add_(y)
        z = x * 2
    assert torch.Tensor.add_ in seen and torch.Tensor.mul in seen
    assert z.cpu().tolist() == [2.0] * 4
    with pytest.raises(TypeError):
        x + "a"  # unsupported operands still end in Python's TypeError


def test_autograd_sees_ops_on_tensors_that_require_grad(fake_session):
    w = torch.ones(4, device=fake_session.device, requires_grad=True)
    for _ in range(2):  # learned, then cached: both must keep the graph
        out = w * 3
        assert out.requires_grad and out.grad_fn is not None
        with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
            w.add_(1)
    with torch.no_grad():
        w.add_(1)  # allowed without grad mode, and tracked
        assert not (w * 3).requires_grad
    assert w.cpu().tolist() == [2.0] * 4


def test_tensor_keywords_are_never_taken_past_dispatch():
    with fake.session(detect="record") as s:
        side = sk.Stream()
        x = torch.ones(4, device=s.device)
        z = torch.zeros(4, device=s.device)
        for _ in range(3):  # learned once, then reused
            torch.add(x, x, out=z)  # out= is a write of z, seen by dispatch every time
            total = z.sum(dim=[0])
        assert total.item() == 8.0
        z.sum(dim=[0])  # default reads z after the host sync of item()
        with sk.switch(side):
            torch.add(x, x, out=z)  # side writes z that default read: a race
        assert [(r.first.kind, r.second.kind, r.second.op) for r in s.races] == [("read", "write", "aten.add.out")]
        assert not any(k[0] is torch.add and torch.Tensor in map(type, k) for k in _fastpath._plans if _fastpath._plans[k])


@pytest.mark.eager_only("asserts the eager values of stack/cat while a racing side-stream add_ is queued")
def test_tensor_lists_take_the_fast_path_and_every_element_is_read():
    with fake.session(detect="record") as s:
        side = sk.Stream()
        parts = [torch.full((4,), float(i), device=s.device) for i in range(3)]
        for _ in range(2):  # learned, then cached
            stacked = torch.stack(parts)
            joined = torch.cat(parts)
        plan = _fastpath._plans[(torch.stack, list)]
        assert plan is not None and plan.lists == ((0, 1),) and str(plan.op) == "aten.stack.default"
        with sk.switch(side):
            parts[2].add_(1)  # side writes the last element, which default read in stack/cat
            torch.stack(parts)  # same stream: ordered after its own write, no race
        torch.stack(parts)  # default reads what side wrote without waiting: a race
        kinds = [(r.first.kind, r.second.kind, r.second.op) for r in s.races]
        assert ("read", "write", "aten.add_.Tensor") in kinds
        assert ("write", "read", "aten.stack.default") in kinds
        assert stacked.cpu().tolist() == [[float(i)] * 4 for i in range(3)]
        assert joined.cpu().tolist() == [float(i) for i in range(3) for _ in range(4)]


def test_a_cpu_tensor_in_a_cached_list_still_raises_the_device_error(fake_session):
    parts = [torch.ones(2, device=fake_session.device) for _ in range(2)]
    torch.stack(parts)
    torch.stack(parts)  # cached now
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
        torch.stack([parts[0], torch.ones(2)])


def test_cpu_copies_keep_pytorch_strides(fake_session):
    host = torch.arange(24.0).reshape(2, 3, 4)
    views = {
        "contiguous": lambda t: t,
        "transposed": lambda t: t.transpose(0, 2),
        "sliced": lambda t: t[:, ::2],
        "channels_last": lambda t: t.reshape(1, 2, 3, 4).contiguous(memory_format=torch.channels_last),
    }
    device = host.to(fake_session.device)
    for name, view in views.items():
        for _ in range(2):  # first call and cached call
            copied = view(device).cpu()
            expected = view(host).clone()
            assert copied.stride() == expected.stride(), name
            assert torch.equal(copied, expected), name
            assert copied.device.type == "cpu" and copied.data_ptr() != view(host).data_ptr()


def test_a_call_with_one_tensor_in_two_positions_teaches_nothing():
    # x.add_(x) first: its plan would give the read argument the write's kind (a plan is per type
    # pattern, so every later add_ of two tensors would count its second argument as written)
    with fake.session() as s:
        x = torch.ones(4, device=s.device)
        _fastpath._plans.pop((torch.Tensor.add_, type(x), type(x)), None)  # (learn it again, here)
        x.add_(x)
        y = torch.ones(4, device=s.device)
        y.add_(x)
        plan = _fastpath._plans.get((torch.Tensor.add_, type(x), type(x)))
        assert plan is not None and plan.tensors == ((0, 2), (1, 1))
        assert x.tolist() == [2.0] * 4 and y.tolist() == [3.0] * 4
