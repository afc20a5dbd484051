"""Run the libml benchmark suite (defined in benchmarks/README.md) against PyTorch, NumPy, torch.compile, JAX, ORT.

    python benchmarks/run.py [--workloads W1,W2,...] [--systems libml,torch,...] [--quick] [--out results.json]
    python benchmarks/run.py --selfcheck      # NumPy steps vs torch autograd (and libml vs NumPy)

Every (system, workload) measurement runs in a fresh ``benchmarks/worker.py`` process; the systems
alternate within each round (the order rotates from round to round) and the reported time is the
median over processes of each process's median step time.  Child processes get 2 threads and run
without OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (removed from the children's environment only).
See benchmarks/README.md for the method.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402

THREADS = 2
UNSET = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def child_env():
    env = dict(os.environ)
    removed = {k: env.pop(k) for k in UNSET if k in env}
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
        env[k] = str(THREADS)
    xla = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = (xla + f" --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={THREADS}").strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    return env, removed


#: systems whose worker runs under another interpreter, named by an environment variable:
#: onnxruntime-training ships the same ``onnxruntime`` module as onnxruntime, so it needs a venv of its own
OTHER_PYTHON = {"ort_training": "LIBML_BENCH_ORTT_PYTHON"}


def worker_python(system):
    """(interpreter for the system's worker, None) or (None, reason it cannot run)."""
    var = OTHER_PYTHON.get(system)
    if var is None:
        return sys.executable, None
    path = os.environ.get(var)
    if not path:
        return None, (f"{var} is not set: point it at the python of a venv with onnxruntime-training "
                      "(benchmarks/README.md)")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        return None, f"{var}={path} is not an executable file"
    return path, None


def run_worker(system, wid, args, env):
    python, why_not = worker_python(system)
    if python is None:
        return {"system": system, "workload": wid, "skipped": why_not}
    cmd = [python, os.path.join(HERE, "worker.py"), "--system", system, "--workload", wid,
           "--min-time", str(args.min_time), "--warmup", str(args.warmup), "--min-steps", str(args.min_steps)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"system": system, "workload": wid, "error": f"timeout after {args.timeout} s"}
    wall = time.perf_counter() - t0
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"system": system, "workload": wid,
                "error": f"worker exited {p.returncode} without a result",
                "stderr": p.stderr[-3000:]}
    try:
        res = json.loads(lines[-1])
    except json.JSONDecodeError as e:
        return {"system": system, "workload": wid, "error": f"bad worker output: {e}"}
    res["process_wall_s"] = wall
    return res


def aggregate(runs):
    ok = [r for r in runs if "median_ms" in r]
    if not ok:
        r0 = runs[0]
        return {k: r0[k] for k in ("skipped", "error", "traceback", "stderr") if k in r0}
    meds = [r["median_ms"] for r in ok]
    agg = {"median_ms": statistics.median(meds), "process_medians_ms": meds,
           "min_ms": min(r["min_ms"] for r in ok), "steps": [r["steps"] for r in ok],
           "peak_rss_mb": max(r["peak_rss_mb"] for r in ok),
           "first_value": ok[0].get("first_value"), "blas": ok[0].get("blas"),
           "first_call_s": statistics.median(r["first_call_s"] for r in ok),
           "setup_s": statistics.median(r["setup_s"] for r in ok), "processes": len(ok)}
    if "compile_s" in ok[0]:
        agg["compile_s"] = statistics.median(r["compile_s"] for r in ok)
    for k in ("version", "xla_flags", "kernels", "note", "max_abs_err_vs_ref"):
        if k in ok[0]:
            agg[k] = ok[0][k]
    if "conv_profile" in ok[0]:
        agg["conv_profile"] = merge_conv_profiles([r["conv_profile"] for r in ok if "conv_profile" in r])
    errs = [r for r in runs if "error" in r]
    if errs:
        agg["failed_processes"] = len(errs)
        agg["error"] = errs[0]["error"]
    return agg


def merge_conv_profiles(profiles):
    """One row per conv instruction over the processes: the first process's row with ``median_ms`` the
    median of the processes' medians (``process_medians_ms`` all of them) and GFLOP/s from it."""
    rows = []
    for i, r in enumerate(profiles[0]):
        meds = [p[i]["median_ms"] for p in profiles if i < len(p)]
        row = dict(r, median_ms=statistics.median(meds), process_medians_ms=meds)
        ms = row["median_ms"]
        row["gflops"] = row["flops"] / (ms * 1e-3) / 1e9 if row.get("flops") and ms > 0 else None
        rows.append(row)
    return rows


def conv_table(results, wids, gemm_limit):
    """libml's per-conv-instruction profile of the conv workloads (W6, W8): shapes, ms, GFLOP/s, frac."""
    out = []
    for wid in wids:
        rows = results[wid].get("libml", {}).get("conv_profile")
        if not rows:
            continue
        total = sum(r["median_ms"] for r in rows)
        fl = sum(r["flops"] or 0 for r in rows)
        out.append(f"\nlibml {wid}: conv instructions (prog.profile medians inside the runtime call; shapes of the "
                   f"forward conv each instruction computes or differentiates; frac = GFLOP/s / GEMM probe); "
                   f"{len(rows)} convs, {total:.3f} ms, {fl / 1e9:.3f} GFLOP, "
                   f"{fmt(fl / (total * 1e-3) / 1e9 if total else None, '.1f')} GFLOP/s")
        hdr = (f"{'#':>4} {'instruction':<17} {'x (N,C,H,W)':<18} {'w (M,C/G,kh,kw)':<17} {'s':>2} {'p':>2} "
               f"{'y (N,M,OH,OW)':<18} {'ms':>9} {'MFLOP':>8} {'GFLOP/s':>8} {'frac':>6}")
        out.append(hdr)
        out.append("-" * len(hdr))
        for r in rows:
            gf = r.get("gflops")
            out.append(f"{r['index']:>4} {r['op'][:17]:<17} {str(tuple(r['x'])):<18} {str(tuple(r['w'])):<17} "
                       f"{r['stride'][0]:>2} {r['pad'][0]:>2} {str(tuple(r['y'])):<18} {r['median_ms']:>9.4f} "
                       f"{(r['flops'] or 0) / 1e6:>8.1f} {fmt(gf, '.1f'):>8} "
                       f"{fmt(gf / gemm_limit if gf and gemm_limit else None, '.3f'):>6}")
    return "\n".join(out)


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def report(results, wids, systems, gemm_limit, gemm_sys):
    out = []
    p = out.append
    p(f"\nmedian ms per step (median over processes of per-process medians); ratio = libml / system "
      f"(< 1: libml faster); frac = GFLOP/s / GEMM probe ({fmt(gemm_limit, '.1f')} GFLOP/s, {gemm_sys}); "
      f"libml kernel ISA: {machine_info({})['libml_isa']}")
    hdr = f"{'workload':<9} {'system':<14} {'ms':>10} {'libml/sys':>9} {'GFLOP/s':>8} {'frac':>6} {'RSS MB':>7} {'procs':>5}  note"
    p(hdr)
    p("-" * len(hdr))
    for wid in wids:
        fl = common.flops(wid)
        lib = results[wid].get("libml", {}).get("median_ms")
        for s in systems:
            r = results[wid].get(s)
            if r is None:
                continue
            if "median_ms" not in r:
                note = ("skipped: " + r["skipped"]) if "skipped" in r else ("ERROR: " + r.get("error", "?"))
                if "not run" in note or "does not run" in note or "runs W5 and W8 only" in note:
                    continue
                p(f"{wid:<9} {s:<14} {'-':>10} {'-':>9} {'-':>8} {'-':>6} {'-':>7} {'-':>5}  {note[:90]}")
                continue
            ms = r["median_ms"]
            gf = fl / (ms * 1e-3) / 1e9 if fl else None
            frac = gf / gemm_limit if (gf and gemm_limit) else None
            ratio = lib / ms if lib else None
            note = r.get("note", "")
            if r.get("error"):
                note = f"{r['failed_processes']} failed: {r['error'][:60]}"
            p(f"{wid:<9} {s:<14} {ms:>10.4f} {fmt(ratio, '.3f'):>9} {fmt(gf, '.1f'):>8} "
              f"{fmt(frac, '.3f'):>6} {r['peak_rss_mb']:>7.0f} {r['processes']:>5}  {note}")
    # compile / first-call times
    p("\ncompile time (s): libml = time of lc.compile; torch_compile / jax = first call (tracing + compile + 1 step)")
    p(f"{'workload':<9} {'libml':>9} {'torch_compile':>14} {'jax':>9}")
    for wid in wids:
        row = results[wid]
        lc = row.get("libml", {}).get("compile_s")
        tc = row.get("torch_compile", {}).get("first_call_s")
        jx = row.get("jax", {}).get("first_call_s")
        p(f"{wid:<9} {fmt(lc, '.3f'):>9} {fmt(tc, '.2f'):>14} {fmt(jx, '.2f'):>9}")
    # BLAS kernels
    p("\nBLAS / OpenMP libraries loaded per system (threadpoolctl: internal_api, architecture, num_threads)")
    seen = {}
    for wid in wids:
        for s in systems:
            r = results[wid].get(s, {})
            if r.get("blas") is not None and s not in seen:
                seen[s] = (r["blas"], r.get("kernels"))
    for s, (libs, kern) in seen.items():
        desc = "; ".join(d["note"] if "note" in d else  # e.g. threadpoolctl missing in that venv
                         f"{d.get('internal_api')}" + (f" {d['architecture']}" if d.get("architecture") else "")
                         + f" x{d.get('num_threads')} ({d.get('lib')})" for d in libs) or "none visible"
        p(f"  {s:<14} {desc}")
        if kern:
            p(f"  {'':<14} own kernels: {kern}")
    # cross-check of the first step's loss (same params, same data)
    bad = []
    for wid in wids:
        vals = {s: r.get("first_value") for s, r in results[wid].items() if r.get("first_value") is not None}
        if len(vals) > 1:
            ref = vals.get("numpy", next(iter(vals.values())))
            for s, v in vals.items():
                if abs(v - ref) > 1e-3 * max(1.0, abs(ref)):
                    bad.append(f"{wid}: {s} {v:.6g} vs numpy {ref:.6g}")
    p("\nfirst-step loss / output cross-check: " + ("all systems agree (rel 1e-3)" if not bad else "MISMATCH " + "; ".join(bad)))
    ref_checked = [w for w in wids if common.WORKLOADS[w]["kind"] in ("w6", "w7", "w8")]
    if ref_checked:
        p(f"{', '.join(ref_checked)}: every measured system matched the reference files before timing "
          "(W6: loss0, loss1, loss2; W7: loss0, loss1; W8: logits)")
    table = conv_table(results, wids, gemm_limit)
    if table:
        p(table)
    return "\n".join(out)


def machine_info(removed):
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
            "threads": THREADS, "unset_in_children": removed}
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    info["cpu"] = ln.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        from libml_runtime.isa import dispatched_isa
        info["libml_isa"] = dispatched_isa()
    except ImportError as exc:
        info["libml_isa"] = f"unavailable ({exc})"
    try:
        import numpy
        info["numpy"] = numpy.__version__
    except ImportError:
        pass
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="W1,W2,W3,W4,W5,GEMM",
                    help="comma list of W1..W8 (W5 = W5-b1,W5-b1024; W8 = W8-b1,W8-b256), W5-b1, ..., GEMM")
    ap.add_argument("--systems", default=",".join(common.SYSTEMS),
                    help=f"comma list from {','.join(common.SYSTEMS)}")
    ap.add_argument("--quick", action="store_true", help="1 round, 0.3 s of timed steps per process")
    ap.add_argument("--rounds", type=int, default=None, help="processes per (system, workload); default 3 (1 quick)")
    ap.add_argument("--min-time", type=float, default=None, help="timed seconds per process (default 2, quick 0.3)")
    ap.add_argument("--warmup", type=float, default=None, help="warm-up seconds per process (default 0.5, quick 0.1)")
    ap.add_argument("--min-steps", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=1200, help="per-process timeout, s")
    ap.add_argument("--out", default="results.json", help="JSON output file (default results.json)")
    ap.add_argument("--selfcheck", action="store_true",
                    help="check the NumPy steps, JAX W7 and the W6 torch module against autograd / the references")
    args = ap.parse_args(argv)

    if args.selfcheck:
        import selfcheck
        ok = selfcheck.run()
        print("selfcheck:", "ok" if ok else "FAILED")
        return 0 if ok else 1

    args.rounds = args.rounds or (1 if args.quick else 3)
    args.min_time = args.min_time if args.min_time is not None else (0.3 if args.quick else 2.0)
    args.warmup = args.warmup if args.warmup is not None else (0.1 if args.quick else 0.5)
    wids = common.expand_workloads(args.workloads)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for s in systems:
        if s not in common.SYSTEMS:
            raise SystemExit(f"unknown system {s!r}; known: {', '.join(common.SYSTEMS)}")
    env, removed = child_env()
    load0 = os.getloadavg()[0]
    if load0 > 0.5:
        print(f"warning: load average {load0:.2f} before the run: other processes compete for the "
              f"{os.cpu_count()} cores and the times will be noisy")
    if removed:
        print(f"unset in the worker processes: {', '.join(f'{k}={v}' for k, v in removed.items())}")
    pairs = [(w, s) for w in wids for s in systems if common.WORKLOADS[w]["kind"] in common.SUPPORTS[s]]
    runs = {p: [] for p in pairs}
    dead = set()  # pairs that were skipped or failed: not retried
    t_all = time.perf_counter()
    for rnd in range(args.rounds):
        for wid in wids:
            order = [s for s in systems if (wid, s) in runs]
            k = rnd % max(1, len(order))
            order = order[k:] + order[:k]
            for s in order:
                if (wid, s) in dead:
                    continue
                r = run_worker(s, wid, args, env)
                runs[(wid, s)].append(r)
                if "median_ms" in r:
                    msg = f"{r['median_ms']:.4f} ms  ({r['steps']} steps, peak RSS {r['peak_rss_mb']:.0f} MB)"
                elif "skipped" in r:
                    msg = "skipped: " + r["skipped"]
                    dead.add((wid, s))
                else:
                    msg = "ERROR: " + r.get("error", "?")
                    dead.add((wid, s))
                print(f"[round {rnd + 1}/{args.rounds}] {wid:<9} {s:<14} {msg}", flush=True)
    results = {w: {} for w in wids}
    for (w, s), rs in runs.items():
        if rs:
            results[w][s] = aggregate(rs)
    gemm_limit, gemm_sys = None, None
    # the machine's practical limit: the best GEMM probe in this run
    for s, r in results.get("GEMM", {}).items():
        if "median_ms" in r:
            gf = common.flops("GEMM") / (r["median_ms"] * 1e-3) / 1e9
            r["gflops"] = gf
            if gemm_limit is None or gf > gemm_limit:
                gemm_limit, gemm_sys = gf, s
    for w in wids:
        fl = common.flops(w)
        for s, r in results[w].items():
            if "median_ms" in r and fl:
                r["gflops"] = fl / (r["median_ms"] * 1e-3) / 1e9
                if gemm_limit:
                    r["fraction_of_gemm"] = r["gflops"] / gemm_limit
            if "median_ms" in r and "libml" in results[w] and "median_ms" in results[w]["libml"]:
                r["ratio_libml_over_system"] = results[w]["libml"]["median_ms"] / r["median_ms"]
    table = report(results, wids, systems, gemm_limit, gemm_sys)
    print(table)
    mi = machine_info(removed)
    mi["loadavg_before"] = load0
    mi["loadavg_after"] = os.getloadavg()[0]
    doc = {"machine": mi,
           "settings": {"rounds": args.rounds, "min_time_s": args.min_time, "warmup_s": args.warmup,
                        "min_steps": args.min_steps, "quick": args.quick, "lr": common.LR,
                        "workloads": wids, "systems": systems, "command": " ".join(sys.argv)},
           "gemm_limit_gflops": gemm_limit, "gemm_limit_system": gemm_sys,
           "flops": {w: common.flops(w) for w in wids},
           "results": results, "total_s": time.perf_counter() - t_all, "table": table,
           "raw": {f"{w}/{s}": [{k: v for k, v in r.items() if k != "times_ms"} for r in rs]
                   for (w, s), rs in runs.items()}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"\nwrote {args.out}  (total {doc['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
