"""Issue sites: where in the user's code each kernel, allocation and stream came from.

A site is captured cheaply on every access (code object + instruction offset per frame: a frame's
line number costs a line-table scan) and turned into a file:line stack only when a race is reported.
"""

from __future__ import annotations

import linecache
import os
import sys
import sysconfig
import traceback
from typing import Any, Sequence

import torch


# User frames kept per access: the line itself and two callers. (Each one costs on every op.)
STACK_DEPTH = 3
_INTERNAL_DIRS = tuple(
    os.path.dirname(os.path.abspath(p)) + os.sep
    for p in (torch.__file__, os.path.join(os.path.dirname(__file__), "..", "..", "__init__.py"))
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


# (id(code), lasti) of a starting frame -> (its code, the frames the walk passed beyond it as
# (code, lasti) pairs, the site, whether the walk reached the top, the depth). A hit is checked
# against the live frames, so it is exact.
_site_cache: dict[tuple, tuple] = {}
_SITE_CACHE_SIZE = 4096


def site_here() -> tuple:
    """The issue site of the API call being served, walked outwards from the function that calls
    this: torch's and streamkit's frames are skipped, so no frame depth is counted. For calls that
    are not per-op (stream and graph creation, replay, a free race): the walk's cache is keyed by
    its starting frame, here streamkit's own. Per-op entry points pass their caller's frame to
    :func:`capture_site` instead."""
    return capture_site(sys._getframe(1))


def capture_site(frame: Any, depth: int = STACK_DEPTH) -> tuple:
    """Capture up to ``depth`` user frames from ``frame`` outwards as (code, instruction offset) pairs.

    torch/streamkit frames are skipped (classified once per file), so a kernel issued many frames
    below the user's line (``nn.Module`` call chains, c10d wrappers) still names that line. If no
    user frame is found, the innermost frame is kept.

    A site is a function of the walked frames' (code, offset) pairs alone, so the last walk from
    the same starting point is reused when every frame it passed still matches (the common case:
    an op in a loop). Checking costs a third of walking.
    """
    code = frame.f_code
    lasti = frame.f_lasti
    key = (id(code), lasti)
    entry = _site_cache.get(key)
    if entry is not None and entry[0] is code and entry[4] == depth:
        f = frame
        for c, offset in entry[1]:
            f = f.f_back
            if f is None or f.f_code is not c or f.f_lasti != offset:
                break
        else:
            if not entry[3] or f.f_back is None:
                return entry[2]
    site, passed, reached_top = _walk(frame, depth)
    if len(_site_cache) >= _SITE_CACHE_SIZE:
        _site_cache.clear()
    _site_cache[key] = (code, passed, site, reached_top, depth)
    return site


def _walk(frame: Any, depth: int) -> tuple[tuple, tuple, bool]:
    """``(site, passed, reached_top)``: the user frames found, every frame walked after the first,
    and whether the walk ran out of frames (then a hit must end there too)."""
    site = []
    passed = []
    innermost = frame
    skipped = 0
    get = _internal_codes.get
    while frame is not None:
        code = frame.f_code
        if frame is not innermost:
            passed.append((code, frame.f_lasti))
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
    return tuple(site), tuple(passed), frame is None


_lines: dict[tuple, int] = {}  # (code, offset) -> line: each site's line is looked up once


def line_of(code: Any, offset: int) -> int:
    """The source line of the instruction at byte ``offset`` in ``code`` (what ``frame.f_lineno`` says)."""
    key = (code, offset)
    found = _lines.get(key)
    if found is not None:
        return found
    found = code.co_firstlineno  # (co_lines scans the whole function: cached, issue 19)
    for start, end, line in code.co_lines():
        if start <= offset < end:
            found = line if line is not None else code.co_firstlineno
            break
    if len(_lines) >= 65536:
        _lines.clear()
    _lines[key] = found
    return found


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
