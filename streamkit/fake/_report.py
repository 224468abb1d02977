"""Race reports: the two accesses, the tensor, and the wait that fixes it.

Issue sites are captured cheaply on every access (code object + instruction offset per frame: a
frame's line number costs a line-table scan) and turned into file:line stacks only here, when a
race is reported.
"""

from __future__ import annotations

import linecache
import os
import re
import sys
import sysconfig
import traceback
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ._accel import native

# User frames kept per access: the line itself and two callers. (Each one costs on every op.)
STACK_DEPTH = 3
_INTERNAL_DIRS = tuple(
    os.path.dirname(os.path.abspath(p)) + os.sep
    for p in (torch.__file__, os.path.join(os.path.dirname(__file__), "..", "__init__.py"))
)
_INTERNAL_FILES = ("<frozen ", "contextlib.py", "threading.py", "runpy.py", "typing_extensions.py", f"{os.sep}_pytest{os.sep}", f"{os.sep}pluggy{os.sep}")


_STDLIB = os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep
_SITE = tuple({os.path.abspath(sysconfig.get_paths()[k]) + os.sep for k in ("purelib", "platlib")})


def _internal(filename: str) -> bool:
    """torch, streamkit, pytest and the standard library (multiprocessing, runpy...) are not the user's code."""
    path = os.path.abspath(filename)
    if path.startswith(_INTERNAL_DIRS) or any(marker in filename for marker in _INTERNAL_FILES):
        return True
    return path.startswith(_STDLIB) and not path.startswith(_SITE)


_internal_codes: dict[str, bool] = {}  # filename -> torch/streamkit internal?
_MAX_SKIPPED = 64


def capture_site_python(frame: Any, depth: int = STACK_DEPTH) -> list:
    """Capture up to ``depth`` user frames from ``frame`` outwards as (code, instruction offset) pairs.

    torch/streamkit frames are skipped (classified once per code object), so a kernel issued many
    frames below the user's line (``nn.Module`` call chains, c10d wrappers) still names that line.
    If no user frame is found, the innermost frame is kept.
    """
    site = []
    innermost = frame
    skipped = 0
    get = _internal_codes.get
    while frame is not None:
        code = frame.f_code
        internal = get(code.co_filename)  # a str: its hash is cached, unlike a code object's
        if internal is None:
            internal = _internal_codes[code.co_filename] = _internal(code.co_filename)
        if not internal:
            site.append((code, frame.f_lasti))
            depth -= 1
            if not depth:
                break
        elif skipped >= _MAX_SKIPPED:
            break
        else:
            skipped += 1
        frame = frame.f_back
    if not site and innermost is not None:
        site.append((innermost.f_code, innermost.f_lasti))
    return site


# Runs on every op: the C port of capture_site_python (the reference), unless STREAMKIT_NATIVE=0.
if native is not None:
    native.configure(_internal_codes, _internal, _MAX_SKIPPED)
    capture_site = native.capture_site
else:
    capture_site = capture_site_python


def line_of(code: Any, offset: int) -> int:
    """The source line of the instruction at byte ``offset`` in ``code`` (what ``frame.f_lineno`` says)."""
    for start, end, line in code.co_lines():
        if start <= offset < end:
            return line if line is not None else code.co_firstlineno
    return code.co_firstlineno


def user_stack(site: Sequence[tuple]) -> list[traceback.FrameSummary]:
    """The captured frames without torch/streamkit internals, innermost last (as in tracebacks)."""
    frames = []
    for code, offset in site:
        if _internal(code.co_filename):
            continue
        lineno = line_of(code, offset)
        frames.append(
            traceback.FrameSummary(code.co_filename, lineno, code.co_name, line=linecache.getline(code.co_filename, lineno).strip())
        )
    if not frames and site:  # everything was internal: show the outermost captured frame
        code, offset = site[-1]
        frames.append(traceback.FrameSummary(code.co_filename, line_of(code, offset), code.co_name))
    frames.reverse()
    return frames


def short_location(frame: traceback.FrameSummary | None) -> str:
    if frame is None:
        return "<unknown>"
    return f"{os.path.basename(frame.filename)}:{frame.lineno}"


_ASSIGN = re.compile(r"^\s*(?:self\.)?([A-Za-z_]\w*)\s*(?::[^=]+)?=\s*[\w.]*Stream\(")


def stream_description(stream: Any) -> tuple[str, str]:
    """``(label, code_name)`` for a fake stream: e.g. ``("stream #1 'side' (created at a.py:8)", "side")``."""
    state = stream._handle
    if state.idx == 0:
        return "the default stream", "sk.default_stream()"
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
    """One access to device memory by a kernel (or the allocator, for kind ``"free"``)."""

    op: str
    stream: Any  # streamkit.Stream
    kind: str  # "read" | "write" | "free"
    stack: list[traceback.FrameSummary] = field(repr=False)

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

    def __str__(self) -> str:
        first_label, _ = stream_description(self.first.stream)
        second_label, _ = stream_description(self.second.stream)
        shape = tuple(self.tensor.shape)
        lines = [
            f"stream race on a tensor of shape {shape}, dtype {self.tensor.dtype}"
            f" (allocated at {self.tensor.allocated_at} on {self.tensor.allocated_on}):",
            f"  first:  {self.first.kind} by {self.first.op} on {first_label} at {self.first.location}",
            _format_stack(self.first.stack, "            "),
            f"  second: {self.second.kind} by {self.second.op} on {second_label} at {self.second.location}",
            _format_stack(self.second.stack, "            "),
            "  nothing orders the second after the first (no wait, event or host sync in between).",
            f"  fix: {self.fix}",
        ]
        return "\n".join(line for line in lines if line)


def suggest_fix(first: Access, second: Access) -> str:
    _, first_name = stream_description(first.stream)
    second_label, second_name = stream_description(second.stream)
    if second.kind == "free":
        return (
            f"call sk.record_stream(tensor, {first_name}) after {first.location} (the allocator then keeps the"
            f" memory until {first_name}'s work is done), or {second_name}.wait_stream({first_name}) before the"
            f" last reference is dropped at {second.location}"
        )
    return (
        f"{second_name}.wait_stream({first_name}) after {first.location} and before {second.location}"
        f" (or record an event on {first_name} after {first.location} and {second_name}.wait_event(it)"
        f" before {second.location})"
    )


def make_access(op: Any, stream: Any, kind: str, site: Sequence[tuple]) -> Access:
    return Access(str(op), stream, kind, user_stack(site))


def here(depth: int) -> tuple:
    return capture_site(sys._getframe(depth + 1))
