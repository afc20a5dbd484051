"""Build the Cython runtime (libml_runtime) with -O3 and OpenMP.

The kernels live in C headers (``runtime/libml_runtime/kernels.h``) written with ``restrict`` pointers and
``#pragma omp simd`` so GCC vectorises them; ``expf``/``exp`` are declared ``omp declare simd`` and the
module links libmvec, so the vector exp from glibc is called without ``-ffast-math`` (which would break
NaN/Inf semantics).  Set ``LIBML_MARCH`` to override ``-march=native`` (e.g. ``x86-64-v3``).
"""
import os
import sys

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

march = os.environ.get("LIBML_MARCH", "native")
compile_args = ["-O3", "-fopenmp", "-fno-math-errno", f"-march={march}", "-Wno-unused-function"]
link_args = ["-fopenmp"]
libraries = []
if sys.platform.startswith("linux"):
    libraries.append("mvec")

ext = Extension(
    "libml_runtime._exec",
    sources=["runtime/libml_runtime/_exec.pyx"],
    include_dirs=[np.get_include(), "runtime/libml_runtime"],
    extra_compile_args=compile_args,
    extra_link_args=link_args,
    libraries=libraries,
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)

setup(
    ext_modules=cythonize(
        [ext],
        compiler_directives={"language_level": 3, "boundscheck": False, "wraparound": False,
                             "cdivision": True, "initializedcheck": False},
    ),
)
