"""Thread-count policy shared by OpenMP kernels and BLAS.

The runtime never calls BLAS from inside an OpenMP region, so the two pools take turns: BLAS gets
``num_threads`` for the duration of a plan call (threadpoolctl sets the pool of the BLAS that scipy's
``cython_blas`` uses) and the OpenMP kernels get ``num_threads`` via ``num_threads=`` on each region.
"""
import contextlib
import os

_controller = None


def resolve_threads(n=None):
    """Explicit ``n``, else OMP_NUM_THREADS, else the machine's cores."""
    if n is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        n = int(env) if env.isdigit() and int(env) > 0 else (os.cpu_count() or 1)
    n = int(n)
    if n < 1:
        raise ValueError(f"num_threads must be >= 1, got {n}")
    return n


def _blas():
    global _controller
    if _controller is None:
        import scipy.linalg.cython_blas  # noqa: F401  (loads the BLAS whose pool we size)
        from threadpoolctl import ThreadpoolController
        ctl = ThreadpoolController()
        _controller = [lib for lib in ctl.lib_controllers if lib.user_api == "blas"]
    return _controller


@contextlib.contextmanager
def blas_threads(n):
    """Give BLAS ``n`` threads for the block; restore afterwards. Only calls into BLAS when needed."""
    libs = _blas()
    old = [lib.get_num_threads() for lib in libs]
    changed = [(lib, o) for lib, o in zip(libs, old) if o != n]
    for lib, _ in changed:
        lib.set_num_threads(n)
    try:
        yield
    finally:
        for lib, o in changed:
            lib.set_num_threads(o)


def blas_info():
    """threadpoolctl's description of the BLAS libraries in use (kernel/architecture, threads)."""
    from threadpoolctl import threadpool_info
    import scipy.linalg.cython_blas  # noqa: F401
    return [i for i in threadpool_info() if i.get("user_api") == "blas"]
