"""``from streamkit import fake``: the fake backend's public names (it lives in
:mod:`streamkit._backends.fake`, registered like every other backend)."""

from ._backends.fake import (  # noqa: F401
    Access,
    FakeBackend,
    FakeDeviceTensor,
    PinnedHostTensor,
    Race,
    RaceError,
    Session,
    Stats,
    TensorInfo,
    __all__,
    peek,
    session,
)
