"""Race reports: the two accesses, the tensor, and the wait that fixes it; and the reporter that
builds each race once, for the access check and the allocator's free check alike."""

from __future__ import annotations

import dataclasses
import re
import traceback
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ..._errors import RaceError  # noqa: F401  (fake.RaceError: exported here too)
from ._clocks import StreamState
from ._sites import short_location, user_stack
from ._tracking import AccessKind, AccessRecord, Kernel

if TYPE_CHECKING:
    from ._allocator import StorageState

_ASSIGN = re.compile(r"^\s*(?:self\.)?([A-Za-z_]\w*)\s*(?::[^=]+)?=\s*[\w.]*Stream\(")


# Streams the backend made itself (a process group's stream): (label, code name, role)
_LABELS: "weakref.WeakKeyDictionary[StreamState, tuple[str, str, str]]" = weakref.WeakKeyDictionary()


# How a report's fix names the default stream and record_stream in code: streamkit's API, or the
# emulated device's while device emulation is installed (the user's code calls torch.cuda, not sk).
_API = {"default": "sk.default_stream()", "record": "sk.record_stream(tensor, {stream})"}


def name_api(module: str | None) -> None:
    """Fixes name code in ``module``'s API (``"torch.cuda"``, ``"torch.npu"``: ``torch.cuda.default_stream()``,
    ``tensor.record_stream(s)``), or in streamkit's (``None``)."""
    if module is None:
        _API.update(default="sk.default_stream()", record="sk.record_stream(tensor, {stream})")
    else:
        _API.update(default=f"{module}.default_stream()", record="tensor.record_stream({stream})")


def label_stream(state: StreamState, label: str, code_name: str, role: str) -> None:
    """Name a stream that no user code created (``role``: ``"collective"`` for a process group's)."""
    _LABELS[state] = (label, code_name, role)


def stream_description(state: StreamState) -> tuple[str, str]:
    """``(label, code_name)`` for a fake stream: e.g. ``("stream #1 'side' (created at a.py:8)", "side")``."""
    named = _LABELS.get(state)
    if named is not None:
        return named[0], named[1]
    if state.idx == 0:
        return "the default stream", _API["default"]
    frames = user_stack(state.site)
    where = frames[-1] if frames else None
    name = None
    if where is not None and where.line:
        match = _ASSIGN.match(where.line)
        if match:
            name = match.group(1)
    label = f"stream #{state.idx}" + (f" {name!r}" if name else "") + f" (created at {short_location(where)})"
    return label, name or f"<stream #{state.idx}>"


@dataclass(frozen=True)
class Access:
    """One access to device memory by a kernel (or the allocator, for kind ``"free"``; or the
    host, for ``"host read"`` / ``"host write"`` of pinned memory)."""

    op: str
    stream: Any  # streamkit.Stream; None for the host
    kind: str  # one of ACCESS_KINDS: "read" | "write" | "free" | "host read" | "host write"
    stack: list[traceback.FrameSummary] = field(repr=False)
    #: how reports name the stream: ``"stream #1 'side' (created at a.py:8)"``, ``"the host"``
    stream_label: str = field(default="the host", repr=False, compare=False)
    #: the stream as code names it: ``"side"``, ``"sk.default_stream()"`` (``""`` for the host)
    stream_code: str = field(default="", repr=False, compare=False)

    @property
    def frame(self) -> traceback.FrameSummary | None:
        return self.stack[-1] if self.stack else None

    @property
    def filename(self) -> str | None:
        return self.frame.filename if self.frame else None

    @property
    def lineno(self) -> int | None:
        return self.frame.lineno if self.frame else None

    @property
    def location(self) -> str:
        """The user's ``file.py:line`` of this access."""
        return short_location(self.frame)


@dataclass(frozen=True)
class TensorInfo:
    """The memory both accesses touched."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    allocated_at: str
    allocated_on: str
    #: when the first access was to an earlier tensor whose freed block the caching allocator handed
    #: to this one: that tensor, as "a tensor of shape (...), dtype ... (allocated at f.py:3 on ...)"
    previous: str | None = None


def _format_stack(stack: list[traceback.FrameSummary], indent: str) -> str:
    lines = []
    for frame in stack[-4:]:
        lines.append(f"{indent}{frame.filename}:{frame.lineno} in {frame.name}")
        if frame.line:
            lines.append(f"{indent}    {frame.line}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Race:
    """Two accesses to overlapping bytes, at least one a write, with no happens-before between them.

    ``first`` was issued before ``second``; ``fix`` names the wait that orders them.
    """

    first: Access
    second: Access
    tensor: TensorInfo
    fix: str
    #: ``((stream, seq), (stream, seq))``: the two kernels (stream index, sequence number on it),
    #: when both accesses are kernels' (a race-directed schedule runs the second first)
    kernels: tuple | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        first_label = self.first.stream_label
        second_label = self.second.stream_label
        shape = tuple(self.tensor.shape)
        lines = [
            f"stream race on a tensor of shape {shape}, dtype {self.tensor.dtype}"
            f" (allocated at {self.tensor.allocated_at} on {self.tensor.allocated_on}):",
            (
                f"  the caching allocator recycled this memory: the first access is to {self.tensor.previous},"
                " freed before this tensor was allocated on the same stream"
            ) if self.tensor.previous else "",
            f"  first:  {self.first.kind} by {self.first.op} on {first_label} at {self.first.location}",
            _format_stack(self.first.stack, "            "),
            f"  second: {self.second.kind} by {self.second.op} on {second_label} at {self.second.location}",
            _format_stack(self.second.stack, "            "),
            "  nothing orders the second after the first (no wait, event or host sync in between).",
            f"  fix: {self.fix}",
        ]
        return "\n".join(line for line in lines if line)


def suggest_fix(first: Access, second: Access, first_stream: StreamState, second_stream: StreamState | None) -> str:
    """The wait that orders ``second`` (on ``second_stream``; ``None``: the host) after ``first``."""
    first_name = first.stream_code
    if second_stream is None:  # a host access to pinned memory an asynchronous copy uses
        return (
            f"synchronize the host with {first_name} after {first.location} and before {second.location}:"
            f" {first_name}.synchronize(), or record an event on {first_name} after the copy and call its"
            " synchronize(), or sk.synchronize()"
        )
    second_name = second.stream_code
    if _LABELS.get(first_stream, ("", "", ""))[2] == "collective":
        if second.kind == "free":
            return (
                f"call .wait() on the Work that the collective at {first.location} returned with {second_name} (the"
                f" allocation stream) current before the last reference is dropped at {second.location}"
            )
        return (
            f"call .wait() on the Work that the collective at {first.location} returned (async_op=True) before"
            f" {second.location}, with the stream of {second.location} current (wait() makes the current stream"
            f" wait for the collective)"
        )
    if _LABELS.get(second_stream, ("", "", ""))[2] == "collective":
        return (
            f"make the stream that issues the collective at {second.location} wait for {first_name} (wait_stream or"
            f" an event) after {first.location} and before the collective: {second_name} waits only for the"
            f" issuing stream"
        )
    if second.kind == "free":
        return (
            f"call {_API['record'].format(stream=first_name)} after {first.location} (the allocator then keeps the"
            f" memory until {first_name}'s work is done), or {second_name}.wait_stream({first_name}) before the"
            f" last reference is dropped at {second.location}"
        )
    return (
        f"{second_name}.wait_stream({first_name}) after {first.location} and before {second.location}"
        f" (or record an event on {first_name} after {first.location} and {second_name}.wait_event(it)"
        f" before {second.location})"
    )


class Reporter:
    """Turns detector findings into :class:`Race` reports, each distinct race once (by both ops,
    locations and kinds), appended to ``races``.

    ``wrap_stream(state)`` gives the public ``streamkit.Stream`` of a fake stream.
    """

    def __init__(self, races: list[Race], wrap_stream: Callable[[StreamState], Any]) -> None:
        self.races = races
        self._wrap_stream = wrap_stream
        self._seen: set[tuple] = set()

    def _access(self, op: Any, stream: StreamState, kind: AccessKind, site: Sequence[tuple]) -> Access:
        label, code = stream_description(stream)
        return Access(str(op), self._wrap_stream(stream), kind.label, user_stack(site), label, code)

    def _tensor_info(self, shape: tuple, dtype: torch.dtype, state: StorageState) -> TensorInfo:
        alloc = user_stack(state.alloc_site) if state.alloc_site else []
        label, _ = stream_description(state.alloc_stream)
        return TensorInfo(tuple(shape), dtype, short_location(alloc[-1] if alloc else None), label)

    def _add(
        self, first: Access, second: Access, info: TensorInfo, first_stream: StreamState, second_stream: StreamState | None,
        kernels: tuple | None = None,
    ) -> tuple[Race, bool]:
        race = Race(first, second, info, suggest_fix(first, second, first_stream, second_stream), kernels)
        key = (first.op, first.location, first.kind, second.op, second.location, second.kind)
        if key in self._seen:
            return race, False
        self._seen.add(key)
        self.races.append(race)
        return race, True

    def access_race(
        self, earlier: AccessRecord, earlier_kind: AccessKind, kernel: Kernel, kind: AccessKind, tensor: Any, state: StorageState
    ) -> tuple[Race, bool]:
        """``kernel``'s access of ``kind`` to ``tensor`` is unordered with ``earlier``: the race, and
        whether it is new (a race already reported is not appended again)."""
        first = self._access(earlier.kernel.op, earlier.kernel.stream, earlier_kind, earlier.kernel.site)
        second = self._access(kernel.op, kernel.stream, kind, kernel.site)
        info = self._tensor_info(tensor.shape, tensor.dtype, state)
        prior = getattr(state, "prior", None)
        owner = prior.get(id(earlier)) if prior else None
        if owner is not None and owner[0] is earlier:
            _, meta, site, stream = owner
            shape, dtype = meta or ((state.nbytes,), torch.uint8)
            alloc = user_stack(site) if site else []
            info = dataclasses.replace(
                info,
                previous=f"a tensor of shape {tuple(shape)}, dtype {dtype} (allocated at"
                f" {short_location(alloc[-1] if alloc else None)} on {stream_description(stream)[0]})",
            )
        kernels = ((earlier.kernel.stream.idx, earlier.kernel.seq), (kernel.stream.idx, kernel.seq))
        return self._add(first, second, info, earlier.kernel.stream, kernel.stream, kernels)

    def host_race(
        self, kernel: Kernel, earlier_kind: AccessKind, kind: AccessKind, op: str, site: Sequence[tuple], shape: Any,
        dtype: torch.dtype,
    ) -> tuple[Race, bool]:
        """The host accessed pinned memory (``kind``: HOST_READ or HOST_WRITE, by ``op`` at ``site``)
        that ``kernel``, an asynchronous copy, may still be using (``earlier_kind``: READ or WRITE)."""
        first = self._access(kernel.op, kernel.stream, earlier_kind, kernel.site)
        second = Access(op, None, kind.label, user_stack(site))
        frames = user_stack(kernel.site) if kernel.site else []
        info = TensorInfo(tuple(shape), dtype, short_location(frames[-1] if frames else None), "pinned host memory")
        return self._add(first, second, info, kernel.stream, None)

    def free_race(self, earlier: AccessRecord, earlier_kind: AccessKind, state: StorageState, site: Sequence[tuple]) -> tuple[Race, bool]:
        """The last reference to ``state``'s memory was dropped (at ``site``) while ``earlier`` may
        still run on another stream: the allocator could hand the memory out again."""
        first = self._access(earlier.kernel.op, earlier.kernel.stream, earlier_kind, earlier.kernel.site)
        second = self._access("the caching allocator (last reference dropped)", state.alloc_stream, AccessKind.FREE, site)
        shape, dtype = state.alloc_meta or ((state.nbytes,), torch.uint8)
        return self._add(first, second, self._tensor_info(shape, dtype, state), earlier.kernel.stream, state.alloc_stream)
