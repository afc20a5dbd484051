"""Which instruction-set copy of the runtime kernels runs: ``dispatched_isa()``.

A default (portable) build compiles the module for baseline x86-64 and the hot kernels three times,
for ``baseline`` (SSE2), ``avx2`` (x86-64-v3: AVX2 + FMA) and ``avx512`` (x86-64-v4); at import the
best one the CPU supports is chosen (``kernels_isa.h``).  A build with ``LIBML_MARCH=native`` (or any
explicit ``-march``) has one copy and reports ``native``.

``LIBML_ISA`` (read once, when the runtime is imported) forces a lower copy, e.g. to test each path on one
machine: ``auto`` (default), ``baseline``, ``avx2``, ``avx512``.  An unknown value, an ISA this CPU lacks,
or a forced ISA in a no-dispatch build raises ``ImportError`` naming the value: never a silent fallback.
"""
from __future__ import annotations

import os

ENV = "LIBML_ISA"
ISAS = ("baseline", "avx2", "avx512")


def _apply_env(init) -> None:
    """Called by ``_exec`` at import with its ``_isa_init(name) -> code`` (codes: kernels_isa.h)."""
    value = os.environ.get(ENV, "")
    rc = init(value.strip())
    if rc == -1:
        raise ImportError(f"{ENV}={value!r} is not one of 'auto', {', '.join(map(repr, ISAS))}")
    if rc == -2:
        raise ImportError(f"{ENV}={value!r}: this CPU does not support that instruction set "
                          f"(unset {ENV} to use the best one it has)")
    if rc == -3:
        raise ImportError(f"{ENV}={value!r}: this libml_runtime was built with an explicit -march "
                          f"(LIBML_MARCH), so it has one kernel copy and cannot switch; rebuild without "
                          f"LIBML_MARCH for run-time dispatch")
    if rc != 0:
        raise ImportError(f"{ENV}={value!r}: unexpected selection code {rc}")


def dispatched_isa() -> str:
    """'baseline', 'avx2' or 'avx512' (dispatching build), or 'native' (LIBML_MARCH build)."""
    from . import _exec
    return _exec._isa_name()
