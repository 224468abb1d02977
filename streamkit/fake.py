"""``from streamkit import fake``: the fake backend's public names (it lives in
:mod:`streamkit._backends.fake`, registered like every other backend; its ``__all__`` is the list)."""

from ._backends.fake import *  # noqa: F401,F403
from ._backends.fake import __all__  # noqa: F401
