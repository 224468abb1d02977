"""The fake backend's C accelerator (everything else is declared in pyproject.toml)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("streamkit.fake._native", ["streamkit/fake/_native.c"], extra_compile_args=["-O2"])])
