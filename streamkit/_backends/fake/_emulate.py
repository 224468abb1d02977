"""Device emulation: inside ``fake.session(emulate="cuda" | "npu")`` the fake device *is* that
device type, so unmodified ``torch.cuda`` / ``torch.npu`` / ``torch_npu`` code runs on it.

How (docs/emulation.md, "Design"):

- ``npu``: PyTorch's PrivateUse1 device, which the fake backend claims, is named ``npu`` instead
  of ``fake`` (what torch_npu does). PyTorch names PrivateUse1 once per process, so a process is
  either a ``fake`` process or an ``npu`` process (:func:`claim`); the other kind of session is
  refused with :class:`EmulationError` saying so and what to do.
- ``cuda``: the CUDA device type exists in every torch build, but a CPU build has no device guard
  for it (autograd would abort the process on a tensor that claims it). So fake tensors keep their
  PrivateUse1 device in C++ and report ``cuda:0`` to Python (``Tensor.device`` / ``is_cuda``, while
  the emulation is installed); factories given ``device="cuda"`` reach a Python fallback on the
  CUDA dispatch key, and ``Tensor.to/cuda``, ``torch.tensor``/``as_tensor`` map ``cuda`` to the
  fake device. ``cuda`` emulation works in both kinds of process.
- The replaced names (``torch.cuda.*``, ``torch.npu``, ``torch_npu``, ``torch.accelerator.*``,
  ``torch.distributed`` entry points, a few ``Tensor`` methods) are installed when the first
  emulating session opens (or by ``check --emulate`` / ``pytest --streamkit-emulate`` for the whole
  run) and restored, every one, when the last one ends.
- On a machine with a real device of the emulated type, emulation is refused (a real tensor must
  never silently become fake or the reverse): hide the device (``CUDA_VISIBLE_DEVICES=``) to emulate.
"""

from __future__ import annotations

import importlib
import os
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from ..._errors import BackendUnavailableError, DeviceIndexError

#: the device types a fake session can emulate
NAMES = ("cuda", "npu")
#: the environment variable that makes every fake session of the process (and its children) emulate
ENV = "STREAMKIT_EMULATE"


class EmulationError(BackendUnavailableError):
    """This process can't emulate the requested device now (the message says why and what to do)."""


def check_name(emulate: Any, where: str = "session(emulate)") -> str | None:
    """``emulate`` validated: ``None`` (the ``fake`` device) or one of :data:`NAMES`."""
    if emulate is None or emulate in NAMES:
        return emulate
    raise ValueError(f"{where}: expected None or one of {', '.join(map(repr, NAMES))}, got {emulate!r}")


_local = threading.local()


def default() -> str | None:
    """What ``fake.session()`` emulates when not told: the innermost :func:`sessions_emulate` block,
    else ``STREAMKIT_EMULATE``, else nothing."""
    value = getattr(_local, "emulate", None)
    if value is not None:
        return value
    env = os.environ.get(ENV) or None
    return check_name(env, f"{ENV} environment variable")


@contextmanager
def sessions_emulate(emulate: str | None) -> Iterator[None]:
    """Fake sessions opened in the block (by ``fake.explore``/``fake.replay``) emulate ``emulate``."""
    check_name(emulate, "emulate")
    saved = getattr(_local, "emulate", None)
    _local.emulate = emulate if emulate is not None else saved
    try:
        yield
    finally:
        _local.emulate = saved


# -- the process's PrivateUse1 name and real devices ------------------------------------------------

def _real_cuda_available() -> bool:
    """A real CUDA device is usable here (asked of the original torch.cuda, never the emulated one)."""
    if not torch.backends.cuda.is_built():
        return False
    return bool(_ORIGINAL_CUDA_IS_AVAILABLE())


_ORIGINAL_CUDA_IS_AVAILABLE = torch.cuda.is_available


def _real_torch_npu() -> bool:
    module = __import__("sys").modules.get("torch_npu")
    return module is not None and not getattr(module, "__streamkit_emulated__", False)


def claim(emulate: str | None) -> None:
    """Make sure PrivateUse1 is the fake device under the name ``emulate`` needs (``npu`` for npu
    emulation, else ``fake``; cuda emulation takes either), or raise :class:`EmulationError`."""
    from . import _tensor

    name = torch._C._get_privateuse1_backend_name()
    if emulate == "npu":
        if _real_torch_npu():
            raise EmulationError(
                "emulate='npu': torch_npu is loaded in this process (a real Ascend stack): a real NPU tensor must"
                " never silently become fake; run the emulation in a process that doesn't import torch_npu"
            )
        if name == "fake":
            raise EmulationError(
                "emulate='npu' needs PyTorch's PrivateUse1 device named 'npu', but this process already named it"
                " 'fake' (a fake session or sk.device() ran first; PyTorch names it once per process). Run npu-emulated"
                " code in a process of its own: `python -m streamkit check --emulate npu script.py`,"
                " `pytest --streamkit-emulate=npu`, @pytest.mark.streamkit_emulate('npu') (run in a child process),"
                " or set STREAMKIT_EMULATE=npu before the process starts"
            )
        _tensor.ensure_registered("npu")
        return
    if emulate == "cuda" and _real_cuda_available():
        raise EmulationError(
            "emulate='cuda': this machine has a real CUDA device; emulating would make device='cuda' mean the fake"
            " device beside real CUDA tensors. Hide the GPU to emulate here (CUDA_VISIBLE_DEVICES= python ...), or"
            " run on the real device with the cuda backend"
        )
    if emulate == "cuda" and name == "npu" and _tensor.DEVICE_TYPE == "npu":
        return  # (an npu process: the fake device is PrivateUse1 'npu' in C++, cuda:0 to Python)
    if emulate is None and name == "npu" and _tensor.DEVICE_TYPE == "npu":
        raise EmulationError(
            "fake.session(): this process named PyTorch's PrivateUse1 device 'npu' for npu emulation (once per"
            " process), so the 'fake' device does not exist here; open fake.session(emulate='npu') or"
            " fake.session(emulate='cuda'), or run plain fake sessions in another process"
        )
    _tensor.ensure_registered()


# -- installing and restoring -------------------------------------------------------------------------

_MISSING = object()


class Patches:
    """Attributes replaced on modules and classes, restored in reverse order."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any]] = []

    def set(self, owner: Any, name: str, value: Any) -> None:
        old = owner.__dict__.get(name, _MISSING) if isinstance(owner, type) else getattr(owner, name, _MISSING)
        self._saved.append((owner, name, old))
        setattr(owner, name, value)

    def restore(self) -> None:
        while self._saved:
            owner, name, old = self._saved.pop()
            if old is _MISSING:
                try:
                    delattr(owner, name)
                except AttributeError:
                    pass
            else:
                setattr(owner, name, old)


class _Installed:
    """The emulation in place now: its kind, how many holders it has, and what to undo."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.holders = 0
        self.patches = Patches()
        self.undo: list[Callable[[], None]] = []


_installed: _Installed | None = None
_lock = threading.RLock()


def installed() -> str | None:
    """The device type emulated now (``None``: no emulation installed)."""
    current = _installed
    return current.kind if current is not None else None


def acquire(kind: str) -> None:
    """Install the emulation of ``kind`` (or count one more holder of it)."""
    global _installed
    with _lock:
        current = _installed
        if current is not None:
            if current.kind != kind:
                raise EmulationError(
                    f"emulate={kind!r}: {current.kind!r} emulation is installed in this process now (a session or"
                    f" the run's --emulate option holds it); one device type is emulated at a time: close it first"
                )
            current.holders += 1
            return
        claim(kind)
        current = _Installed(kind)
        _emulate_torch = importlib.import_module(__package__ + "._emulate_torch")  # (it imports this module)

        try:
            _emulate_torch.install(current)
        except BaseException:
            _uninstall(current)
            raise
        current.holders = 1
        _installed = current


def release(kind: str) -> None:
    """One holder of ``kind``'s emulation is done; the last one restores the process."""
    global _installed
    with _lock:
        current = _installed
        if current is None or current.kind != kind:
            return
        current.holders -= 1
        if current.holders <= 0:
            _installed = None
            _uninstall(current)


def _uninstall(current: _Installed) -> None:
    current.patches.restore()
    while current.undo:
        current.undo.pop()()


@contextmanager
def emulating(kind: str | None) -> Iterator[None]:
    """The emulation of ``kind`` installed for the block (nothing for ``None``)."""
    if kind is None:
        yield
        return
    acquire(kind)
    try:
        yield
    finally:
        release(kind)


# -- devices ----------------------------------------------------------------------------------------

def device_of(kind: str | None) -> torch.device:
    """The device a session emulating ``kind`` reports: ``cuda:0``, ``npu:0``, else the fake device."""
    from . import _tensor

    if kind is None:
        return _tensor.DEVICE
    return torch.device(kind, 0)


def check_index(kind: str, device: Any, where: str) -> None:
    """Refuse an index other than 0 of the emulated device (CUDA: "invalid device ordinal")."""
    if device is None:
        return
    if isinstance(device, int) and not isinstance(device, bool):
        index: Any = device
    elif isinstance(device, torch.device):
        index = device.index
    elif isinstance(device, str):
        index = torch.device(device).index if ":" in device else None
    else:
        raise TypeError(f"{where}: expected a device (int, str or torch.device), got {type(device).__name__}")
    if index not in (None, 0, -1):
        raise DeviceIndexError(
            f"{where}: device {str(device) if isinstance(device, torch.device) else repr(device)}: the emulated {kind} device is one device, {kind}:0 (CUDA would raise"
            f" 'invalid device ordinal'); run one process per rank, each on {kind}:0 (as CUDA_VISIBLE_DEVICES does)"
        )


# -- fake.explore / fake.replay with emulate= ---------------------------------------------------------

def with_emulate(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` (``fake.explore``, ``fake.replay``) taking ``emulate=`` too: every session it
    opens emulates that device type."""
    import functools

    @functools.wraps(function)
    def wrapper(*args: Any, emulate: str | None = None, **kwargs: Any) -> Any:
        check_name(emulate, f"{function.__name__}(emulate)")
        with sessions_emulate(emulate):
            return function(*args, **kwargs)

    wrapper.__doc__ = (function.__doc__ or "") + (
        "\n\n    ``emulate``: ``\"cuda\"`` / ``\"npu\"``: every run's session emulates that device type"
        " (``fake.session(emulate=...)``, docs/emulation.md)."
    )
    return wrapper
