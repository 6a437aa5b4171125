"""Build the one private extension, ``fastfc._core``.

``FASTFC_CYTHON_DEBUG=1`` rebuilds it with bounds checks and without
optimisation, for debugging a kernel.
"""
import os
import platform

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("FASTFC_CYTHON_DEBUG") == "1"
# The extension is built from source on the machine that runs it, so by
# default it uses that CPU's instructions (hardware popcount, wide vectors).
# FASTFC_PORTABLE=1 builds for any x86-64 with POPCNT instead.
portable = os.environ.get("FASTFC_PORTABLE") == "1"
machine = platform.machine().lower()
if machine in ("x86_64", "amd64"):
    arch = ["-march=x86-64-v2"] if portable else ["-march=native"]
else:
    arch = [] if portable else ["-mcpu=native"]

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
    extra_compile_args=["-O0", "-g"] if debug else ["-O3", *arch],
)

setup(ext_modules=cythonize([ext], compiler_directives=directives))
