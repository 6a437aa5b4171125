"""Build the one private extension, ``fastfc._core``.

The build targets a baseline instruction set, so a wheel runs on every CPU of
that level; the kernels that gain from wide vectors have AVX2 and AVX-512
variants that ``fastfc/_kernels.h`` picks at import (``fastfc._core.kernels()``
shows which).

- default: x86-64-v2 (SSE4.2, POPCNT: every x86-64 CPU since 2009) on x86-64,
  the compiler's default elsewhere.
- ``FASTFC_PORTABLE=1``: the x86-64 baseline itself (v1), for the CPUs and
  virtual machines below v2 (QEMU's default ``qemu64`` model is one).
- ``FASTFC_NATIVE=1``: ``-march=native`` (``-mcpu=native`` off x86), for a
  build that only ever runs on the machine that made it.
- ``FASTFC_CYTHON_DEBUG=1``: bounds checks on, no optimisation, for debugging
  a kernel.
"""
import os
import platform
from pathlib import Path

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("FASTFC_CYTHON_DEBUG") == "1"
native = os.environ.get("FASTFC_NATIVE") == "1"
portable = os.environ.get("FASTFC_PORTABLE") == "1"
if native and portable:
    raise SystemExit("set at most one of FASTFC_NATIVE=1 and FASTFC_PORTABLE=1")
x86 = platform.machine().lower() in ("x86_64", "amd64")
if native:
    arch = ["-march=native"] if x86 else ["-mcpu=native"]
elif x86:
    arch = ["-march=x86-64"] if portable else ["-march=x86-64-v2"]
else:
    arch = []

directives = {
    "language_level": 3,
    "boundscheck": debug,
    "wraparound": debug,
    "cdivision": not debug,
    "initializedcheck": debug,
}

ext = Extension(
    "fastfc._core",
    ["fastfc/_core.pyx"],
    include_dirs=[np.get_include()],
    # _core.pyx includes the .pxi files (one per job of the module); a change to
    # any of them rebuilds it
    depends=["fastfc/_bitops.pxd", "fastfc/_kernels.h", "fastfc/_pool.h",
             *sorted(str(p) for p in Path("fastfc").glob("*.pxi"))],
    # -g0: no debug info outside a debug build (Python's CFLAGS carry -g): a
    # third of the compile of the 4 MB generated C file, nothing at run time
    extra_compile_args=(["-O0", "-g"] if debug else ["-O3", "-g0"]) + arch,
)

setup(ext_modules=cythonize([ext], compiler_directives=directives))
