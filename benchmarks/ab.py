"""A/B two libml source trees on one workload, alternating processes (the machine's noise is ±20 %).

    python benchmarks/ab.py OLD_TREE NEW_TREE --workload W4 [--reps 5] [--threads 1]

Each tree must be built in place first (``python setup.py build_ext --inplace`` in it; delete a stale
``runtime/libml_runtime/*.so`` before, header changes do not trigger a rebuild).  Every rep runs
``benchmarks/worker.py --system libml`` of *this* checkout once per tree, in alternation, with
``PYTHONPATH=TREE/runtime:TREE`` so that tree's ``libml_compile`` and ``libml_runtime`` are imported.
Prints the median over reps of each process's median and minimum step time, and the ratio NEW / OLD.
``OPENBLAS_CORETYPE``/``OPENBLAS_L2_SIZE`` are removed from the children's environment, as in run.py.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run_once(tree, workload, threads, min_time):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env.update(PYTHONPATH=f"{os.path.abspath(tree)}/runtime:{os.path.abspath(tree)}",
               OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, os.path.join(HERE, "worker.py"), "--system", "libml", "--workload", workload,
           "--min-time", str(min_time), "--threads", str(threads)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd="/", timeout=600)
    res = json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else {"error": p.stderr[-2000:]}
    if "median_ms" not in res:
        raise SystemExit(f"{tree}: {res.get('error') or res}")
    return res["median_ms"], res["min_ms"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--workload", default="W4")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=1.0)
    a = ap.parse_args(argv)
    res = {a.old: [], a.new: []}
    for _ in range(a.reps):
        for tree in (a.old, a.new):
            res[tree].append(run_once(tree, a.workload, a.threads, a.min_time))
    summary = {}
    for tree in (a.old, a.new):
        med = statistics.median(m for m, _ in res[tree])
        mn = statistics.median(m for _, m in res[tree])
        summary[tree] = med
        print(f"{tree:40s} median {med:9.4f} ms   min {mn:9.4f} ms   ({a.reps} processes, {a.threads} threads)")
    print(f"new / old = {summary[a.new] / summary[a.old]:.3f}")


if __name__ == "__main__":
    main()
