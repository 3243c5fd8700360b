"""The one compiled part, the dispatch plan's sort (router/_pairsort.c says why it is C); the rest of
the package is configured in pyproject.toml. `pip install` builds it."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("router._pairsort", sources=["router/_pairsort.c"])])
