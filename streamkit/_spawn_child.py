"""The entry point of a process that a checked script starts with multiprocessing's ``spawn``
(see :mod:`streamkit.check`): run as a file, so no ``python -c`` frame of its own shows up in the
child's race reports. ``argv``: ``--multiprocessing-fork`` (multiprocessing checks it), the report
folder, then multiprocessing's ``spawn_main`` keywords as JSON."""

import json
import os
import sys

if __name__ == "__main__":
    # run as a file, sys.path[0] is this package's folder: import streamkit from above it instead
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from streamkit.check import _spawned_main

    _spawned_main(sys.argv[2], **json.loads(sys.argv[3]))
