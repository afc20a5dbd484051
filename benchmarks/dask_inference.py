"""Dask batch inference over an input larger than one worker's memory (issue 14).

    python benchmarks/dask_inference.py [--gb 1.0] [--memory-limit 200MB] [--chunk-rows 16384] [--dir DIR]

Writes a memory-mapped ``.npy`` of W2-MLP inputs (784 float32 features a row, ``--gb`` gigabytes, written
in slices so this process never holds it either), saves the W2 forward plan (``models/builders.py:
mlp_forward``, 784 -> 512 -> 512 -> 10, batch 128), starts a ``LocalCluster`` of 2 worker processes with
1 thread each and ``memory_limit`` per worker, and runs ``libml-run PLAN --input X.npy --out PRED.npy
--dask ADDRESS`` against it.  While it runs, every worker's resident set size is sampled (psutil, every
0.2 s).  Prints one JSON object: rows, rows/s, the input size, the memory limit, the peak RSS seen on
each worker, whether it stayed under the limit, whether any worker was restarted, and whether the output
equals the plan run in this process on a sample of rows.  Rows/s on a shared 2-core machine is not a
result to quote; the memory figures are the point.
"""
import argparse
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def parse_size(s):
    s = s.strip().upper()
    for unit, mul in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mul)
    return int(s)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=1.0, help="input size in GB (default 1)")
    p.add_argument("--memory-limit", default="200MB", help="per-worker memory limit (default 200MB)")
    p.add_argument("--chunk-rows", type=int, default=16384, help="rows per Dask chunk (default 16384: 49 MB)")
    p.add_argument("--dir", default=None, help="where to write the input and output (default: a temp dir)")
    args = p.parse_args(argv)

    import psutil
    from distributed import Client, LocalCluster

    import libml_compile as lc
    import libml_runtime as lr
    from common import builders
    from libml_runtime.cli import main as libml_run

    limit = parse_size(args.memory_limit)
    D, B = 784, 128
    rows = int(args.gb * (1 << 30)) // (D * 4)
    if args.dir is not None:
        os.makedirs(args.dir, exist_ok=True)  # (the input file and the plan go into a temporary folder in it)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        plan = os.path.join(d, "w2.plan")
        lc.compile(builders().mlp_forward([784, 512, 512, 10], B), num_threads=1).save(plan)
        xp, outp = os.path.join(d, "x.npy"), os.path.join(d, "pred.npy")
        x = np.lib.format.open_memmap(xp, "w+", np.float32, (rows, D))
        rng = np.random.default_rng(0)
        for r0 in range(0, rows, 65536):
            x[r0:r0 + 65536] = rng.standard_normal((min(65536, rows - r0), D), np.float32)
        x.flush()
        del x

        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit=limit,
                               dashboard_address=None)
        client = Client(cluster)
        workers0 = set(client.scheduler_info()["workers"])
        peak = {}
        stop = threading.Event()

        def rss():
            return psutil.Process().memory_info().rss

        def sample():
            while not stop.is_set():
                try:
                    for w, v in client.run(rss).items():
                        peak[w] = max(peak.get(w, 0), v)
                except Exception:  # noqa: BLE001 - a worker being restarted
                    pass
                stop.wait(0.2)
        t = threading.Thread(target=sample, daemon=True)
        t.start()
        t0 = time.perf_counter()
        rc = libml_run([plan, "--input", xp, "--out", outp, "--dask", cluster.scheduler_address,
                        "--chunk-rows", str(args.chunk_rows), "--quiet", "--num-threads", "1"])
        dt = time.perf_counter() - t0
        stop.set()
        t.join()
        workers1 = set(client.scheduler_info()["workers"])
        client.close()
        cluster.close()

        ok = None
        if rc == 0:  # the first and last full batches against the plan run here
            exe = lr.load(plan, num_threads=1)
            xs = np.load(xp, mmap_mode="r")
            out = np.load(outp, mmap_mode="r")
            last = (rows // B - 1) * B
            ok = bool(out.shape == (rows, 10)
                      and all(np.array_equal(out[r:r + B], exe.run({"x": np.array(xs[r:r + B])})["logits"])
                              for r in (0, last)))
        print(json.dumps({
            "rc": rc, "rows": rows, "input_bytes": rows * D * 4, "seconds": round(dt, 2),
            "rows_per_s": round(rows / dt, 1), "memory_limit_bytes": limit,
            "peak_worker_rss_bytes": sorted(peak.values()),
            "under_limit": bool(peak) and max(peak.values()) < limit,
            "workers_restarted": workers0 != workers1, "output_matches_sample": ok,
        }, indent=1))
        return 0 if rc == 0 and ok and peak and max(peak.values()) < limit and workers0 == workers1 else 1


if __name__ == "__main__":
    sys.exit(main())
