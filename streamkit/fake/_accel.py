"""Which implementation runs the fake backend's hot loops (issue-site capture, the happens-before
check): the C accelerator ``_native`` (the default), or, with ``STREAMKIT_NATIVE=0``, the pure-Python
reference implementation it was ported from (several times slower; for debugging streamkit itself).
"""

from __future__ import annotations

import os

from .._errors import BackendUnavailableError

USE_NATIVE = os.environ.get("STREAMKIT_NATIVE", "1") != "0"

if USE_NATIVE:
    try:
        from . import _native as native
    except ImportError as exc:  # a source tree that was never built: say so, don't slow down silently
        raise BackendUnavailableError(
            "fake backend unavailable: its C accelerator (streamkit/fake/_native.c) is not built in this"
            " installation. Reinstall with `pip install -e .` (needs a C compiler and the Python headers),"
            " or set STREAMKIT_NATIVE=0 to run the pure-Python reference implementation (several times slower)."
        ) from exc
else:
    native = None
