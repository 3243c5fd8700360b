"""The compiled parts, each a small C file that says why it is C: the dispatch plan's sort
(router/_pairsort.c) and the skinny float32 matmul of decode steps (model/_skinny.c). The rest of the
package is configured in pyproject.toml. `pip install` builds them."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("router._pairsort", sources=["router/_pairsort.c"]),
        Extension("model._skinny", sources=["model/_skinny.c"], extra_compile_args=["-O3"]),
    ]
)
