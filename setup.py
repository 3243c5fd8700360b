"""The compiled parts, each a small C file that says why it is C: the dispatch plan's sort
(router/_pairsort.c) and the skinny float32 matmul of decode steps (model/_skinny.c). The rest of the
package is configured in pyproject.toml. `pip install` builds them.

The skinny kernel shares its larger calls among torch's threads with OpenMP: built with -fopenmp it
needs libgomp.so.1, the library torch's CPU build loads, so both run on one team of threads. A
compiler without OpenMP builds it serial."""

import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile

from setuptools import Extension, setup


def openmp_flags() -> list[str]:
    """["-fopenmp"] when the C compiler that builds the extensions (setuptools takes $CC, else
    Python's own) builds and links a shared object with it, else []."""
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint probe(void) { return omp_get_max_threads(); }\n")
        cmd = [*cc, "-fopenmp", "-shared", "-fPIC", src, "-o", os.path.join(tmp, "probe.so")]
        try:
            ok = subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
    if not ok:
        print("setup.py: the C compiler has no OpenMP; model._skinny is built serial", file=sys.stderr)
    return ["-fopenmp"] if ok else []


omp = openmp_flags()
skinny_args = {"extra_compile_args": ["-O3", *omp], "extra_link_args": omp}
setup(
    ext_modules=[
        Extension("router._pairsort", sources=["router/_pairsort.c"]),
        Extension(
            "model._skinny", sources=["model/_skinny.c"], depends=["model/_skinny_dot.h"], **skinny_args
        ),
    ]
)
