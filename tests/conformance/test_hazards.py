"""The hazard rules ship with the package (``streamkit/conformance/test_hazards.py``); the normal
suite runs them here (on fake: each hazard is a race)."""

from streamkit.conformance.test_hazards import *  # noqa: F401,F403
