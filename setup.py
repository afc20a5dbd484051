"""Build the Cython runtime (libml_runtime) with -O3 and OpenMP.

The kernels live in C headers (``runtime/libml_runtime/kernels.h``) written with ``restrict`` pointers and
``#pragma omp simd`` so GCC vectorises them; ``expf``/``exp`` are declared ``omp declare simd`` and the
module links libmvec, so the vector exp from glibc is called without ``-ffast-math`` (which would break
NaN/Inf semantics).  ``-fno-trapping-math`` lets GCC vectorise compare-and-select loops; values are
unchanged by it (see the comment at ``compile_args``).  Set ``LIBML_MARCH`` to override ``-march=native`` (e.g. ``x86-64-v3``).
"""
import os
import sys

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

march = os.environ.get("LIBML_MARCH", "native")
# -fno-trapping-math: the runtime never reads FP exception flags (NaN/Inf are values it propagates and,
# under check_finite, tests), and without it GCC keeps a compare-and-select such as the VM's MASK step
# x * (m > 0 ? 1 : 0) scalar because the compare "may trap": 13.4 -> 2.3 ms for that step over 2M floats.
# Unlike -ffast-math it permits no value-changing rewrite (NaN, Inf and signed zeros stay exact).
compile_args = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", f"-march={march}",
                "-Wno-unused-function"]
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
