"""Thread-count policy shared by OpenMP kernels and BLAS.

One pool only: during a plan call BLAS is pinned to one thread (threadpoolctl, on the BLAS that scipy's
``cython_blas`` uses) and the runtime parallelises GEMMs itself, calling BLAS on per-thread panels from
inside its OpenMP regions (as scikit-learn does).  Two pools busy-waiting on the same cores were
measured at 10-40x slowdowns on 2 cores.  Every OpenMP region gets ``num_threads`` explicitly.
"""
import operator
import os

_controller = None


MAX_THREADS = 256  # libgomp aborts near 10,000 threads; no machine libml targets has more than this


def resolve_threads(n=None):
    """Explicit ``n``, else OMP_NUM_THREADS (its first entry: OpenMP allows a nesting list like "4,2"),
    else the machine's cores.  A count outside [1, MAX_THREADS], or one that is not an integer, is a
    ValueError naming where it came from."""
    where = "num_threads"
    if n is None:
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        if not env:
            return min(os.cpu_count() or 1, MAX_THREADS)
        where, first = "OMP_NUM_THREADS", env.split(",")[0].strip()
        if not first.isdigit():
            raise ValueError(f"OMP_NUM_THREADS={env!r} is not a positive integer")
        n = int(first)
    elif isinstance(n, bool) or not hasattr(n, "__index__"):
        raise ValueError(f"num_threads must be an integer, got {n!r}")
    n = operator.index(n)
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"{where} must be in [1, {MAX_THREADS}], got {n}")
    return n


def _blas():
    global _controller
    if _controller is None:
        import scipy.linalg.cython_blas  # noqa: F401  (loads the BLAS whose pool we size)
        from threadpoolctl import ThreadpoolController
        ctl = ThreadpoolController()
        libs = [lib for lib in ctl.lib_controllers if lib.user_api == "blas"]
        # the BLAS that cython_blas calls is scipy's own (wheels: scipy.libs/); numpy's is separate
        import scipy
        root = os.path.dirname(os.path.dirname(scipy.__file__))
        own = [lib for lib in libs if os.path.realpath(lib.filepath).startswith(os.path.join(root, "scipy"))]
        _controller = own or libs
    return _controller


def pin_blas_single():
    """Pin the BLAS behind scipy's cython_blas to one thread (checked per call, set only when needed).

    It is not restored after each call: switching OpenBLAS's pool size back and forth costs ~40 us per
    call, more than a whole W1 step.  numpy's own BLAS (a separate library) is not touched."""
    for lib in _blas():
        if lib.get_num_threads() != 1:
            lib.set_num_threads(1)
