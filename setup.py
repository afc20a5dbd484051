"""Build the Cython runtime (libml_runtime) with -O3 and OpenMP.

The kernels live in C headers (``runtime/libml_runtime/kernels.h``) written with ``restrict`` pointers and
``#pragma omp simd`` so GCC vectorises them; ``expf``/``exp`` are declared ``omp declare simd`` and the
module links libmvec, so the vector exp from glibc is called without ``-ffast-math`` (which would break
NaN/Inf semantics).  ``-fno-trapping-math`` lets GCC vectorise compare-and-select loops; values are
unchanged by it (see the comment at ``compile_args``).

Portable by default: on x86-64 the module is compiled for baseline x86-64 (SSE2), so a wheel built on a new
machine runs on any x86-64 CPU, and the hot kernels are compiled two more times inside ``#pragma GCC
target`` regions, for AVX2+FMA (x86-64-v3) and AVX-512 (x86-64-v4); the best copy the CPU supports is
picked once at import (``kernels_isa.h``), and ``libml_runtime.isa.dispatched_isa()`` names it (also shown
by ``libml-run --profile`` and the benchmark header).  ``LIBML_ISA=baseline|avx2|avx512`` at run time forces
a lower copy (testing each path on one machine).  GEMMs are BLAS's (OpenBLAS dispatches by itself).

``LIBML_MARCH=native`` (or any ``-march`` value, e.g. ``x86-64-v3``) at build time is the opt-in for a
machine-specific build: everything is compiled with that ``-march`` and there is no dispatch (the ISA is
reported as ``native``).  Such a module can die with SIGILL on another CPU.
"""
import importlib.util
import os
import platform
import sys

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

march = os.environ.get("LIBML_MARCH", "").strip()
define_macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
if march:
    arch_args = [f"-march={march}"]
    define_macros.append(("LM_NO_DISPATCH", "1"))  # one copy, for that -march
elif platform.machine().lower() in ("x86_64", "amd64"):
    arch_args = ["-march=x86-64", "-mtune=generic"]  # the baseline every x86-64 CPU runs; kernels dispatch
else:
    arch_args = []  # the compiler's default target; kernels_isa.h dispatches on x86-64 only
# -fno-trapping-math: the runtime never reads FP exception flags (NaN/Inf are values it propagates and,
# under check_finite, tests), and without it GCC keeps a compare-and-select such as the VM's MASK step
# x * (m > 0 ? 1 : 0) scalar because the compare "may trap": 13.4 -> 2.3 ms for that step over 2M floats.
# Unlike -ffast-math it permits no value-changing rewrite (NaN, Inf and signed zeros stay exact).
compile_args = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", *arch_args,
                "-Wno-unused-function", "-Wno-unused-variable"]  # (the VM cases declare x, y, z; not every expression reads them)
link_args = ["-fopenmp"]
libraries = []
if sys.platform.startswith("linux"):
    libraries.append("mvec")

# the C and Cython side of the plan format (format_gen.h, format_gen.pxi) is generated from format.py here,
# before anything is compiled: the only copy of the format is that file
_spec = importlib.util.spec_from_file_location(
    "_libml_format_codegen", os.path.join(os.path.dirname(os.path.abspath(__file__)), "runtime", "libml_runtime",
                                          "format_codegen.py"))
_codegen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_codegen)
_codegen.write()


def _glibc_at_least(major, minor):
    name, version = platform.libc_ver()
    try:
        return name == "glibc" and tuple(int(x) for x in version.split(".")[:2]) >= (major, minor)
    except ValueError:
        return False


# libmvec's tanh/erf/log1p/expm1 vector variants exist from glibc 2.35 on: declared `omp declare simd` only
# where the build's glibc has them (elsewhere the same loops call the scalar functions; a module built
# here needs this glibc or newer at run time anyway, as every module linked against it does)
if sys.platform.startswith("linux") and _glibc_at_least(2, 35):
    define_macros.append(("LM_HAVE_MVEC_235", "1"))

ext = Extension(
    "libml_runtime._exec",
    sources=["runtime/libml_runtime/_exec.pyx"],
    include_dirs=[np.get_include(), "runtime/libml_runtime"],
    depends=["runtime/libml_runtime/" + h for h in ("kernels.h", "kernels_tmpl.h", "kernels_batchnorm.h", "kernels_conv.h", "kernels_gemm.h", "kernels_isa.h", "kernels_inst.h",
                                                    "format_gen.h", "format_gen.pxi", "format.py", "vm_aot_gen.h", "vm_aot.txt", "vm_aot.py", "_conv.pxi", "_pool.pxi", "_resize.pxi", "_attention.pxi", "_mpi.pxi")],
    extra_compile_args=compile_args,
    extra_link_args=link_args,
    libraries=libraries,
    define_macros=define_macros,
)

setup(
    ext_modules=cythonize(
        [ext],
        compiler_directives={"language_level": 3, "boundscheck": False, "wraparound": False,
                             "cdivision": True, "initializedcheck": False},
    ),
)
