"""One module per backend: ``cuda`` and ``npu`` share :mod:`._torch_device`; ``fake`` lives in
:mod:`streamkit.fake`."""
