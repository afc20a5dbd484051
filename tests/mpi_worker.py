"""Worker for tests/test_distributed.py, run as ``mpiexec -n K python tests/mpi_worker.py CASE OUT [ARG]``.

Every case builds the same small MLP on every rank; rank r trains on rows [r*B/K, (r+1)*B/K) of one fixed
global batch per step.  Results (params after training, losses) are written by rank 0 to OUT (.npz); a
rank-local result by rank r to OUT.rank<r>.npz.  CASE "single" runs the same model without MPI on the whole
global batch (the oracle).
"""
from __future__ import annotations

import os
import sys

import numpy as np

B, D, H, C, STEPS = 16, 12, 24, 5, 10


def model(lc, batch, dtype="float32", seed=0):
    rng = np.random.default_rng(seed)
    g = lc.Graph("mlp")
    x = g.input("x", (batch, D), dtype=dtype)
    y = g.input("y", (batch,), dtype="int64")
    w1 = g.param("w1", (rng.standard_normal((D, H)) * 0.3).astype(dtype))
    b1 = g.param("b1", np.zeros(H, dtype))
    w2 = g.param("w2", (rng.standard_normal((H, C)) * 0.3).astype(dtype))
    b2 = g.param("b2", np.zeros(C, dtype))
    loss = lc.softmax_cross_entropy(lc.relu(x @ w1 + b1) @ w2 + b2, y)
    g.output("loss", loss)
    return g, loss


def bn_model(lc, batch, seed=0):
    """The MLP with a training-mode BatchNorm (running statistics as buffers) after the hidden layer."""
    rng = np.random.default_rng(seed)
    g = lc.Graph("mlp_bn")
    x = g.input("x", (batch, D))
    y = g.input("y", (batch,), dtype="int64")
    w1 = g.param("w1", (rng.standard_normal((D, H)) * 0.3).astype(np.float32))
    s = g.param("s", np.ones(H, np.float32))
    t = g.param("t", np.zeros(H, np.float32))
    w2 = g.param("w2", (rng.standard_normal((H, C)) * 0.3).astype(np.float32))
    b2 = g.param("b2", np.zeros(C, np.float32))
    h = lc.batch_norm(x @ w1, scale=s, bias=t, relu=True, name="bn")
    loss = lc.softmax_cross_entropy(h @ w2 + b2, y)
    return g, loss


def data(step, dtype="float32"):
    rng = np.random.default_rng(100 + step)
    return rng.standard_normal((B, D)).astype(dtype), rng.integers(0, C, B).astype(np.int64)


def optimizer(lc, name):
    return {"sgd": lc.SGD(lr=0.1), "momentum": lc.SGD(lr=0.1, momentum=0.9, weight_decay=1e-3),
            "adam": lc.Adam(lr=1e-2, weight_decay=1e-2)}[name]


def train(lc, opt, rank, size, dist, trainable=None, dtype="float32", bucket_bytes=None, threads=1):
    batch = B // size
    g, loss = model(lc, batch, dtype)
    if dist and bucket_bytes:
        dist = lc.distributed.MPI(bucket_bytes=bucket_bytes)
    prog = lc.compile(g, loss=loss, optimizer=optimizer(lc, opt), trainable=trainable, num_threads=threads,
                      distributed=dist)
    losses = []
    for s in range(STEPS):
        x, y = data(s, dtype)
        lo = rank * batch
        losses.append(prog.step({"x": x[lo:lo + batch], "y": y[lo:lo + batch]}))
    return prog, losses


def save(out, **arrays):
    tmp = out + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, out)


def main():
    case, out = sys.argv[1], sys.argv[2]
    arg = sys.argv[3] if len(sys.argv) > 3 else None
    if case == "load":  # the runtime alone: load the plan, train 3 steps, every rank writes its params
        import libml_runtime
        from mpi4py import MPI
        rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
        exe = libml_runtime.load(arg, num_threads=1)
        assert "libml_compile" not in sys.modules
        lo = rank * (B // size)
        losses = []
        for s in range(1, 4):
            x, y = data(s)
            losses.append(exe.step({"x": x[lo:lo + B // size], "y": y[lo:lo + B // size]}))
        save(f"{out}.rank{rank}.npz", losses=np.array(losses), **exe.params)
        return
    import libml_compile as lc
    if case == "single":  # the oracle: one process, the global batch (no MPI)
        opt, trainable, dtype = (arg.split(":") + ["", ""])[:3]
        prog, losses = train(lc, opt, 0, 1, None, trainable=trainable.split(",") if trainable else None,
                             dtype=dtype or "float32")
        save(out, losses=np.array(losses), **prog.params)
        return
    rank, size = lc.distributed.rank(), lc.distributed.size()
    if case == "suite":  # every training configuration in one job: out is a directory
        from libml_runtime import format as F
        runs = {"sgd": ("sgd", None, None), "momentum": ("momentum", None, None), "adam": ("adam", None, None),
                "adam_again": ("adam", None, None), "adam_buckets": ("adam", None, 64),
                "frozen": ("momentum", ["w2", "b2"], None), "momentum_f64": ("momentum", None, None),
                "momentum_2threads": ("momentum", None, None)}
        for key, (opt, trainable, bucket) in runs.items():
            prog, losses = train(lc, opt, rank, size, "mpi", trainable=trainable, bucket_bytes=bucket,
                                 dtype="float64" if key.endswith("f64") else "float32",
                                 threads=2 if key.endswith("2threads") else 1)
            ins = F.instructions(prog.plan.entries["step"].code)
            reduced = sum(d["n"] for _, op, _, d in ins if op == "allreduce_start")
            save(os.path.join(out, f"{key}.rank{rank}.npz"), losses=np.array(losses), reduced=reduced,
                 ops=np.array([r["op"] for r in prog.instructions("step")]), **prog.params)
        return
    if case == "train":  # arg: optimizer[:trainable,...][:bucket_bytes]
        parts = arg.split(":")
        trainable = parts[1].split(",") if len(parts) > 1 and parts[1] else None
        bucket = int(parts[2]) if len(parts) > 2 else None
        prog, losses = train(lc, parts[0], rank, size, "mpi", trainable=trainable, bucket_bytes=bucket)
        save(f"{out}.rank{rank}.npz", losses=np.array(losses), **prog.params)
        if rank == 0:
            ins = prog.instructions("step")
            save(out, losses=np.array(losses), ops=np.array([r["op"] for r in ins]), **prog.params)
    elif case == "save":  # train 3 steps, save the plan (rank 0)
        g, loss = model(lc, B // size)
        prog = lc.compile(g, loss=loss, optimizer=lc.SGD(lr=0.1, momentum=0.9), num_threads=1, distributed="mpi")
        x, y = data(0)
        lo = rank * (B // size)
        prog.step({"x": x[lo:lo + B // size], "y": y[lo:lo + B // size]})
        if rank == 0:
            prog.save(out)
    elif case == "ckpt":  # DataLoader shards + checkpoint at step 3, resumed into a new program (arg: path)
        from libml_runtime.data import DataLoader
        rng = np.random.default_rng(7)
        arrays = {"x": rng.standard_normal((40, D)).astype(np.float32), "y": rng.integers(0, C, 40)}

        def fresh():
            g, loss = model(lc, B // size)
            return (lc.compile(g, loss=loss, optimizer=lc.Adam(lr=1e-2), num_threads=1, distributed="mpi"),
                    DataLoader(arrays, B // size, seed=3, rank=rank, size=size))
        prog, dl = fresh()
        for _ in range(3):
            prog.step(dl.next_batch())
        prog.save_checkpoint(arg, loader=dl, extra={"step": 3})
        for _ in range(3):  # crosses the epoch boundary (2 global batches of 16 per epoch of 40 rows)
            prog.step(dl.next_batch())
        straight = prog.params
        prog2, dl2 = fresh()
        extra = prog2.load_checkpoint(arg, loader=dl2)
        for _ in range(3):
            prog2.step(dl2.next_batch())
        resumed = prog2.params
        save(f"{out}.rank{rank}.npz", step=extra["step"], **{f"a_{k}": v for k, v in straight.items()},
             **{f"b_{k}": v for k, v in resumed.items()})
    elif case == "raise":  # rank 1 raises after one step; the others go on stepping
        prog, _ = train(lc, "sgd", rank, size, "mpi")
        x, y = data(0)
        lo = rank * (B // size)
        if rank == 1:
            raise RuntimeError("rank 1 fails on purpose")
        for _ in range(1000):
            prog.step({"x": x[lo:lo + B // size], "y": y[lo:lo + B // size]})
    elif case == "caught":  # rank 1's step raises (a bad feed), it catches the error and stops stepping
        prog, _ = train(lc, "sgd", rank, size, "mpi")
        x, y = data(0)
        lo = rank * (B // size)
        feeds = {"x": x[lo:lo + B // size], "y": y[lo:lo + B // size]}
        prog.step(feeds)
        if rank == 1:
            try:
                prog.step({"x": x[:3], "y": y[:3]})
            except ValueError as e:
                save(f"{out}.rank1.npz", error=np.array(str(e)))
            return  # (rank 1 leaves the job without an error)
        try:
            for _ in range(100):
                prog.step(feeds)
        except Exception as e:  # noqa: BLE001 - the error rank 0 gets is what the test checks
            save(f"{out}.rank0.npz", error=np.array(f"{type(e).__name__}: {e}"))
            raise
    elif case == "kill":  # rank 1 is killed (SIGKILL) mid-training
        import signal
        prog, _ = train(lc, "sgd", rank, size, "mpi")
        x, y = data(0)
        lo = rank * (B // size)
        if rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        for _ in range(100000):
            prog.step({"x": x[lo:lo + B // size], "y": y[lo:lo + B // size]})
    elif case == "start":  # ranks start from different params (rank 0's are broadcast), then a bad batch
        g, loss = model(lc, B // size, seed=rank)
        prog = lc.compile(g, loss=loss, optimizer=lc.SGD(lr=0.1), num_threads=1, distributed="mpi")
        save(f"{out}.params.rank{rank}.npz", **prog.params)
        batch = B // size if rank == 0 else B // size - 2
        g, loss = model(lc, batch)
        try:
            lc.compile(g, loss=loss, optimizer=lc.SGD(lr=0.1), num_threads=1, distributed="mpi")
        except Exception as e:  # noqa: BLE001 - every rank reports what it raised
            save(f"{out}.rank{rank}.npz", error=np.array(f"{type(e).__name__}: {e}"))
            return
        save(f"{out}.rank{rank}.npz", error=np.array(""))
    elif case == "mismatch":  # rank 1 declares a batch of a different size
        batch = B // size if rank == 0 else B // size - 2
        g, loss = model(lc, batch)
        try:
            lc.compile(g, loss=loss, optimizer=lc.SGD(lr=0.1), num_threads=1, distributed="mpi")
        except Exception as e:  # noqa: BLE001 - every rank reports what it raised
            save(f"{out}.rank{rank}.npz", error=np.array(f"{type(e).__name__}: {e}"))
            return
        save(f"{out}.rank{rank}.npz", error=np.array(""))
    elif case == "bn":  # the BatchNorm MLP, arg: optimizer; every rank writes its params and buffers
        g, loss = bn_model(lc, B // size)
        prog = lc.compile(g, loss=loss, optimizer=optimizer(lc, arg), num_threads=1, distributed="mpi")
        lo, losses = rank * (B // size), []
        for s in range(STEPS):
            x, y = data(s)
            losses.append(prog.step({"x": x[lo:lo + B // size], "y": y[lo:lo + B // size]}))
        save(f"{out}.rank{rank}.npz", losses=np.array(losses), **prog.params,
             **{f"buffer:{k}": v for k, v in prog.buffers.items()})
    elif case == "diverge":  # ranks start from different params: rank 0's are broadcast
        g, loss = model(lc, B // size, seed=rank)
        prog = lc.compile(g, loss=loss, optimizer=lc.SGD(lr=0.1), num_threads=1, distributed="mpi")
        save(f"{out}.rank{rank}.npz", **prog.params)
    else:
        raise SystemExit(f"unknown case {case!r}")


if __name__ == "__main__":
    main()
