"""The reduction kernels (ops_reduce.py) against NumPy on one (512, 1024) float32 input, in one process.

    python benchmarks/reductions.py [--threads 1,2] [--repeat 200]

For each op and axis: the median wall time of ``prog.run`` (a forward-only program of the one op; the
call includes binding the input, the Python around the plan and copying the result out), the median
time of the plan's instructions alone (``prog.profile``: the kernels), and the median of the NumPy
expression computing the same result (NumPy is single-threaded).  Prints one row per case and the
ratios NumPy / libml (whole call).
"""
import argparse
import statistics
import time

import numpy as np

import libml_compile as lc


def _np_lse(x, axis):
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def _np_log_softmax(x, axis):
    t = x - np.max(x, axis=axis, keepdims=True)
    return t - np.log(np.sum(np.exp(t), axis=axis, keepdims=True))


CASES = [
    ("max", lc.max, np.max),
    ("min", lc.min, np.min),
    ("prod", lc.prod, np.prod),
    ("logsumexp", lc.logsumexp, _np_lse),
    ("argmax", lc.argmax, np.argmax),
    ("argmin", lc.argmin, np.argmin),
    ("log_softmax", lc.log_softmax, _np_log_softmax),
    ("sum_square", lc.sum_square, lambda x, axis: np.sum(x * x, axis=axis)),
    ("l2_norm", lc.l2_norm, lambda x, axis: np.sqrt(np.sum(x * x, axis=axis))),
]


def _median(fn, repeat):
    for _ in range(5):
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeat", type=int, default=200)
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    # values near 1: the product of a row of 1024 stays finite
    x = (1 + 0.01 * rng.standard_normal((512, 1024))).astype(np.float32)
    threads = [int(t) for t in a.threads.split(",")]
    print(f"input (512, 1024) float32; medians of {a.repeat} calls, microseconds")
    print(f"{'op':12s} {'axis':>4s} {'numpy':>9s} " + " ".join(f"{'libml@' + str(t):>10s}" for t in threads)
          + " " + " ".join(f"{'kernel@' + str(t):>10s}" for t in threads)
          + " " + " ".join(f"{'np/lm@' + str(t):>8s}" for t in threads))
    for name, fn, npfn in CASES:
        for axis in (1, 0):
            want = npfn(x, axis)
            t_np = _median(lambda: npfn(x, axis), a.repeat)
            t_lm, t_k = [], []
            for nt in threads:
                g = lc.Graph("bench")
                xi = g.input("x", x.shape)
                g.output("y", fn(xi, axis=axis))
                prog = lc.compile(g, num_threads=nt)
                got = prog.run({"x": x})["y"]
                if got.dtype.kind == "i":
                    assert np.array_equal(got, want), name
                else:
                    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5, err_msg=name)
                t_lm.append(_median(lambda: prog.run({"x": x}), a.repeat))
                t_k.append(prog.profile("run", {"x": x}, repeat=a.repeat).total_ms * 1e-3)
            print(f"{name:12s} {axis:4d} {t_np * 1e6:9.1f} " + " ".join(f"{t * 1e6:10.1f}" for t in t_lm)
                  + " " + " ".join(f"{t * 1e6:10.1f}" for t in t_k)
                  + " " + " ".join(f"{t_np / t:8.2f}" for t in t_lm))


if __name__ == "__main__":
    main()
