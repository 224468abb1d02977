"""``from streamkit import fake``: the fake backend's public names (it lives in
:mod:`streamkit._backends.fake`, registered like every other backend)."""

from ._backends.fake import (  # noqa: F401
    PCT_DEPTH,
    Access,
    Exploration,
    FakeBackend,
    FakeDeviceTensor,
    PinnedHostTensor,
    Race,
    RaceError,
    Run,
    Session,
    Stats,
    TensorInfo,
    __all__,
    directed,
    explore,
    parse_token,
    peek,
    plan,
    replay,
    session,
)
