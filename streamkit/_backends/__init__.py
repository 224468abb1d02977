"""One module per backend, each exporting its class as ``backend_class``: ``cuda`` and ``npu``
share :mod:`._torch_device`; ``fake`` is the package :mod:`._backends.fake` (also importable as
:mod:`streamkit.fake`)."""
