"""Data-parallel scaling figures: W2 and W3 training on 1 rank x 2 threads vs 2 ranks x 1 thread (MPI).

    python benchmarks/mpi_scaling.py                       # W2 and W3, prints a table and the cost model
    python benchmarks/mpi_scaling.py --workloads W2 --steps 5 --out dist.json
    python benchmarks/mpi_scaling.py --latency-us 50 --bandwidth-gbs 1.25   # the network to predict for

Three measurements per workload (global batch B of common.WORKLOADS, plain SGD lr 0.01, as run.py):

* ``single``: one process, 2 threads, batch B (``lc.compile`` without ``distributed``);
* ``half``: one process, 1 thread, batch B/2: one rank's compute without communication;
* ``mpi``: ``mpiexec -n 2``, 1 thread per rank, batch B/2 each, ``distributed="mpi"``; samples/s counts the
  global batch; ``Program.profile("step")`` gives the time in the ``allreduce_wait`` instructions per step
  (communication the backward did not hide) and in ``allreduce_start`` (packing + starting).

**Ring-allreduce cost model.**  A bucket of M bytes over K ranks in a ring costs 2(K-1) messages of M/K
bytes: ``t(M) = 2(K-1) * alpha + 2 (K-1)/K * M / beta`` (alpha: per-message latency, beta: bandwidth;
the reduction arithmetic is left out: it is memory-bound and small next to the packing copies), plus the
packing copies themselves, ``4 M / copy_bw`` (allreduce_start copies a bucket's gradients in, allreduce_wait
the scaled sum out; copy_bw is one rank's memcpy bandwidth, measured in the job).  A step
moves ``sum over buckets`` of that, bucket sizes taken from the compiled plan (the loss scalar is a bucket
of its own).  alpha and beta of *this* machine's transport (shared memory) are fitted from MPI_Allreduce
of 8 bytes and of 16 MB inside the 2-rank job.  Predicted step time on K machines: ``t_comp(B/K) +
t_comm(K)``, with ``t_comp(B/K) = t_half * 2 / K`` (compute scales with the per-rank batch) and no credit
taken for overlap (an upper bound: the measured wait is what overlap left exposed).  It is checked
against the 2-rank measurement (K = 2, this machine's alpha and beta), then evaluated for K = 2..16 on the
network given by ``--latency-us`` / ``--bandwidth-gbs`` (default 10 GbE: 50 us, 1.25 GB/s), for the same global
batch B (strong scaling: each of the K machines trains B/K rows; one rank per machine).

The machine is shared and has 2 cores: the figures say how the pieces compare, not what libml achieves
(README: no timing claims from a loaded machine).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _env():
    env = dict(os.environ)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    return env


# ---------------------------------------------------------------------------------------------------
# the worker: one measurement, JSON on stdout (rank 0 only under MPI)

def _worker(args):
    import common
    import libml_compile as lc
    spec = common.WORKLOADS[args.wid]
    B = spec["batch"] // args.div
    dist = "mpi" if args.mpi else None
    rank, size = (lc.distributed.rank(), lc.distributed.size()) if dist else (0, 1)
    g, loss = common.builders().mlp(spec["layers"], B, loss=spec["loss"], seed=common.PARAM_SEED)
    prog = lc.compile(g, loss=loss, optimizer=lc.SGD(lr=0.01), num_threads=args.threads, distributed=dist)
    full = common.data(args.wid)
    feeds = {k: np.ascontiguousarray(v[rank * B:(rank + 1) * B]) for k, v in full.items()}
    for _ in range(2):
        prog.step(feeds)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        prog.step(feeds)
        times.append(time.perf_counter() - t0)
    res = {"wid": args.wid, "ranks": size, "threads": args.threads, "batch_per_rank": B,
           "step_ms": float(np.median(times)) * 1e3, "samples_per_s": B * size / float(np.median(times))}
    if dist:
        from libml_runtime import format as F
        prof = prog.profile("step", feeds, repeat=args.steps, warmup=1)
        res["wait_ms"] = sum(r["median_ms"] for r in prof.rows if r["op"] == "allreduce_wait")
        res["start_ms"] = sum(r["median_ms"] for r in prof.rows if r["op"] == "allreduce_start")
        isz = 4
        res["bucket_bytes"] = [d["n"] * isz for _, op, _, d in F.instructions(prog.plan.entries["step"].code)
                               if op == "allreduce_start"]
        # this transport's alpha and beta: MPI_Allreduce of 8 bytes and of 16 MB (median of a few)
        from mpi4py import MPI
        comm = MPI.COMM_WORLD

        def t_allreduce(nbytes, reps):
            a = np.ones(nbytes // 4, np.float32)
            out = np.empty_like(a)
            comm.Barrier()
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                comm.Allreduce(a, out)
                ts.append(time.perf_counter() - t0)
            return float(np.median(ts))
        small, big = t_allreduce(8, 50), t_allreduce(16 << 20, 5)
        k = size
        alpha = small / (2 * (k - 1))
        beta = 2 * (k - 1) / k * (16 << 20) / max(big - 2 * (k - 1) * alpha, 1e-9)
        # the packing copies: allreduce_start copies a bucket's gradients into its buffer, allreduce_wait
        # copies the sum back scaled by 1/K: 2 reads + 2 writes of M bytes, one rank's memcpy bandwidth
        a = np.ones(16 << 18, np.float32)
        b = np.empty_like(a)
        ts = []
        for _ in range(9):
            t0 = time.perf_counter()
            np.copyto(b, a)
            ts.append(time.perf_counter() - t0)
        res.update(alpha_s=alpha, beta_Bps=beta, copy_Bps=2 * a.nbytes / float(np.median(ts)))
    if rank == 0:
        print("RESULT " + json.dumps(res), flush=True)


# ---------------------------------------------------------------------------------------------------
# the driver

def ring_seconds(bucket_bytes, K, alpha, beta, copy_Bps=None):
    """Ring allreduce of every bucket over K ranks: 2(K-1) latencies and 2(K-1)/K of the bytes each, plus
    (copy_Bps given) the packing copies, 4 M bytes of memory traffic per bucket of M bytes."""
    if K <= 1:
        return 0.0
    pack = sum(4 * m / copy_Bps for m in bucket_bytes) if copy_Bps else 0.0
    return pack + sum(2 * (K - 1) * alpha + 2 * (K - 1) / K * m / beta for m in bucket_bytes)


def _run(cmd, timeout):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="W2,W3")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--latency-us", type=float, default=50.0)
    p.add_argument("--bandwidth-gbs", type=float, default=1.25)
    p.add_argument("--out")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--wid", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--div", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--mpi", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args)
    import shutil
    mpiexec = shutil.which("mpiexec", path=_env()["PATH"])
    if mpiexec is None:
        raise SystemExit("mpiexec not found: pip install '.[dist]'")
    me = [sys.executable, os.path.abspath(__file__), "--worker", "--steps", str(args.steps)]
    report = []
    for wid in args.workloads.split(","):
        single = _run(me + ["--wid", wid, "--threads", "2"], args.timeout)
        half = _run(me + ["--wid", wid, "--threads", "1", "--div", "2"], args.timeout)
        mpi = _run([mpiexec, "-n", "2"] + me + ["--wid", wid, "--threads", "1", "--div", "2", "--mpi"], args.timeout)
        comm2 = ring_seconds(mpi["bucket_bytes"], 2, mpi["alpha_s"], mpi["beta_Bps"], mpi["copy_Bps"])
        predicted2 = half["step_ms"] / 1e3 + comm2
        net_a, net_b = args.latency_us * 1e-6, args.bandwidth_gbs * 1e9
        B = single["batch_per_rank"]
        pred = {K: {"step_ms": (half["step_ms"] / 1e3 * 2 / K
                                + ring_seconds(mpi["bucket_bytes"], K, net_a, net_b, mpi["copy_Bps"]))
                    * 1e3} for K in (2, 4, 8, 16)}
        for K, d in pred.items():
            d["samples_per_s"] = B / (d["step_ms"] / 1e3)
        report.append({"workload": wid, "single": single, "half": half, "mpi": mpi,
                       "model_check": {"predicted_step_ms_2ranks_this_machine": predicted2 * 1e3,
                                       "measured_step_ms_2ranks": mpi["step_ms"],
                                       "comm_ms_model": comm2 * 1e3, "wait_ms_measured": mpi["wait_ms"]},
                       "prediction_network": {"latency_us": args.latency_us, "bandwidth_gbs": args.bandwidth_gbs,
                                              "K": pred}})
        mb = sum(mpi["bucket_bytes"]) / 1e6
        print(f"{wid}: 1 rank x 2 threads {single['samples_per_s']:.0f} samples/s ({single['step_ms']:.2f} ms/step); "
              f"2 ranks x 1 thread {mpi['samples_per_s']:.0f} samples/s ({mpi['step_ms']:.2f} ms/step, "
              f"allreduce wait {mpi['wait_ms']:.2f} ms, start+pack {mpi['start_ms']:.2f} ms, "
              f"{len(mpi['bucket_bytes'])} buckets, {mb:.2f} MB/step)")
        print(f"    model on this machine (alpha {mpi['alpha_s'] * 1e6:.1f} us, beta {mpi['beta_Bps'] / 1e9:.2f} GB/s, "
              f"copies {mpi['copy_Bps'] / 1e9:.1f} GB/s): "
              f"{predicted2 * 1e3:.2f} ms/step predicted vs {mpi['step_ms']:.2f} measured "
              f"(compute {half['step_ms']:.2f} ms + comm {comm2 * 1e3:.2f} ms, no overlap credited)")
        print("    predicted on the network: " + ", ".join(
            f"K={K}: {d['step_ms']:.2f} ms, {d['samples_per_s']:.0f} samples/s" for K, d in pred.items()))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
