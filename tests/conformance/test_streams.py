"""The stream-semantics conformance suite ships with the package (``streamkit/conformance``, run on
a device machine by ``python -m streamkit conformance``); the normal suite runs the same rules here."""

from streamkit.conformance.test_streams import *  # noqa: F401,F403
