"""The graph rules ship with the package (``streamkit/conformance/test_graphs.py``); the normal
suite runs them here."""

from streamkit.conformance.test_graphs import *  # noqa: F401,F403
