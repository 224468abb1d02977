"""``python -m streamkit_eplb demo [--buggy] [options]``: see ``python -m streamkit_eplb demo --help``."""

from __future__ import annotations

import sys

from ._demo import main

if __name__ == "__main__":
    sys.exit(main())
