"""Data-parallel training over MPI: ``lc.compile(g, loss=..., optimizer=..., distributed="mpi")``.

Run the script under ``mpiexec -n K python train.py``; every rank builds the same graph with its own shard of
the batch (the same static shape on every rank) and calls ``prog.step(feeds)`` with its shard.  One runtime
call computes the local gradients, **averages them across the K ranks** and applies the update, so every
rank holds the same params after every step (PyTorch DDP's semantics: the gradient is the mean of the ranks'
gradients; with a loss that is a mean over the batch, K ranks with B/K samples each train as one process
with the global batch B).  ``step`` returns the global mean loss (the loss is reduced too); ``grad`` returns
the averaged gradients; ``run`` (inference) is local and communicates nothing.

**The plan.**  The reduction is part of the plan (format.py opcodes 66-67), not Python around it:

* the trainable params' gradients are grouped into buckets of about ``bucket_bytes`` (default 1 MB), one
  dtype per bucket, in the order the backward produces them (the params the forward reads last first);
* ``allreduce_start(g1, .., gk)`` packs a bucket's gradients into one arena buffer and starts a
  non-blocking in-place ``MPI_Iallreduce``; the schedule (sources order, passes.schedule) places it right
  after the bucket's last gradient, so the reduction runs while the rest of the backward computes (the
  runtime polls the pending requests between instructions, which is what advances them);
* ``allreduce_wait(bucket)`` waits for that bucket only, and writes the mean (sum times 1/K) into one
  tensor per gradient; the waits come after the last start (a data dependency on it), and each bucket has
  its own update node, which reads only its own wait's outputs;
* the loss scalar is a bucket of its own, started as soon as the forward ends.

Frozen params (``trainable=``) have no gradient and are never communicated.

**Memory.**  The passes that fold plain SGD into the weight-gradient GEMM (``passes.fold_sgd_into_gemm``:
sgd_gemm, momentum_gemm, the embedding rows' sgd_scatter) and split Adam per param (``passes.split_adam``)
are off for distributed plans: the gradient must exist to be reduced.  The arena therefore holds, in the
worst case, every gradient (as PyTorch's ``.grad`` tensors), plus each bucket's packed buffer (live from its
start to its wait, at most the gradients' size again) and the reduced gradients until their update:
about two to three times the trainable params' bytes over a single-process plan with the folds, and the
copies into and out of the buckets cost two passes over the gradients per step.

**Start state.**  When the program is created (``lc.compile``, or ``libml_runtime.load`` of a saved
distributed plan) every rank checks that all ranks run the same plan (a different batch shape, model or
optimizer raises on every rank, naming the ranks and their input shapes), then rank 0's params, optimizer
state and buffers are broadcast: all ranks start identical even if their initial values differ.

**Determinism.**  An allreduce of two ranks adds two values, the same bits on both ranks and from run to
run; the scale 1/2 is exact.  The single-process program that gives the same bits is gradient accumulation
(``lc.compile(..., accumulate=K)``, accumulate.py): the graph declared at the shard size B/K, fed the global
batch of B rows, each micro-batch running a rank's instructions and the gradients summed in rank order then
scaled by 1/K as ``allreduce_wait`` does.  For K = 2 the params and losses equal those of the two ranks bit
for bit, step after step: tests/test_distributed.py checks them with np.array_equal after 10 steps for SGD,
SGD with momentum and Adam in float32 and momentum in float64 on an MLP, with one and with two threads per
process, and for SGD and Adam on an MLP with BatchNorm (both runs on one machine: the ISA-dispatched kernel
copies may differ in the last bit).  For K > 2 MPI chooses the order of the sum, so only summation-order
agreement is claimed.  Against one process with the global batch in one pass (a graph declared at B rows)
the gradients agree to float summation order only (its GEMMs sum B rows at once, not B/2 rows twice): a
few ulps, not bit for bit.  BatchNorm's batch statistics are per rank, as DDP without SyncBatchNorm, and
each rank's running statistics follow its own shard (rank 0's are what ``accumulate=K`` keeps: micro-batch
0's).
"""
from __future__ import annotations

import numpy as np

from .ir import FLOAT_DTYPES, Tensor
from .ops import OpDef, make, register

#: default bucket size in bytes (PyTorch DDP's bucket_cap_mb is 25 MB; a smaller default here gives the
#: few-MB models this compiler trains several buckets to overlap)
BUCKET_BYTES = 1 << 20


def _mpi_world():
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD


def rank() -> int:
    """This process's rank in the MPI job (0 without mpi4py or outside mpiexec)."""
    w = _mpi_world()
    return 0 if w is None else w.Get_rank()


def size() -> int:
    """The number of ranks of the MPI job (1 without mpi4py or outside mpiexec)."""
    w = _mpi_world()
    return 1 if w is None else w.Get_size()


class MPI:
    """``distributed=lc.distributed.MPI(bucket_bytes=...)``: the string ``"mpi"`` with a bucket size."""

    def __init__(self, bucket_bytes=BUCKET_BYTES):
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, (int, np.integer)) or bucket_bytes < 1:
            raise ValueError(f"distributed: bucket_bytes must be a positive int, got {bucket_bytes!r}")
        self.bucket_bytes = int(bucket_bytes)

    def __repr__(self):
        return f"MPI(bucket_bytes={self.bucket_bytes})"


def config(distributed):
    """The MPI config of ``lc.compile``'s ``distributed`` argument, or None."""
    if distributed is None:
        return None
    if isinstance(distributed, MPI):
        return distributed
    if distributed == "mpi":
        return MPI()
    raise ValueError(f"compile: distributed must be None, 'mpi' or lc.distributed.MPI(...), got {distributed!r}")


# ---------------------------------------------------------------------------------------------------
# the two collective ops (one instruction each; backend emitters below)

def _s_start(inp, at):
    dts = {t.dtype for t in inp}
    if len(dts) != 1 or not dts <= set(FLOAT_DTYPES):
        raise TypeError(f"allreduce_start: operands must share one floating dtype, got {sorted(dts)}")
    return (sum(t.size for t in inp),), inp[0].dtype


def _s_wait(inp, at):
    shapes = at["shapes"]
    if sum(int(np.prod(s, dtype=np.int64)) for s in shapes) != inp[0].size:
        raise ValueError(f"allreduce_wait: shapes {shapes} do not hold the bucket's {inp[0].size} elements")
    specs = [(tuple(s), inp[0].dtype) for s in shapes]
    return specs if len(specs) > 1 else specs[0]


def _emit_start(em, nid, t, loc, outs):
    from libml_runtime import format as F
    from .backend_cpu import operand_fields as _opnd
    parts = [{**_opnd("src", loc(g)), "n": g.size} for g in t.inputs]
    em.emit("allreduce_start", nid, {"dtype": F.DTYPE_CODE[t.dtype], "req": t.attrs["req"], "n": t.size,
                                     **_opnd("buf", outs[0]), "nparts": len(parts), "part": parts})
    nb = t.size * np.dtype(t.dtype).itemsize
    return {"op": "allreduce_start", "node": t.name, "flops": 0, "bytes": 2 * nb}


def _emit_wait(em, nid, t, loc, outs):
    from libml_runtime import format as F
    from .backend_cpu import operand_fields as _opnd
    b = t.inputs[0]
    sizes = [int(np.prod(s, dtype=np.int64)) for s in t.attrs["shapes"]]
    parts = [{**_opnd("dst", o), "n": n} for o, n in zip(outs, sizes)]
    em.emit("allreduce_wait", nid, {"dtype": F.DTYPE_CODE[b.dtype], "req": t.attrs["req"], "n": b.size,
                                    "scale": em.const(t.attrs["scale"]), **_opnd("buf", loc(b)),
                                    "nparts": len(parts), "part": parts})
    nb = b.size * np.dtype(b.dtype).itemsize
    return {"op": "allreduce_wait", "node": t.name, "flops": b.size, "bytes": 2 * nb}


register(OpDef("allreduce_start", "collective", _s_start, None, None, emit=_emit_start,
               doc="packs its operands into one flat bucket and starts an in-place MPI_Iallreduce (sum) of it "
                   "(request attrs['req']); made by distributed.reduce_gradients"))
register(OpDef("allreduce_wait", "collective", _s_wait, None, None, emit=_emit_wait,
               doc="waits for the allreduce of bucket operand 0 and writes its parts times attrs['scale'] "
                   "(1/K) as one output per attrs['shapes'] entry; further operands (other buckets' starts) "
                   "only order it after them"))


# ---------------------------------------------------------------------------------------------------
# the rewrite of the grad / step entries (program.py calls it after simplify, on the joint graph's nodes)

def backward_order(loss, params):
    """``params`` in the order their gradients become final: the backward visits the forward in reverse,
    so the param the forward reads last (latest in source order) is ready first."""
    from .passes import topo_from_roots
    pos = {t: k for k, t in enumerate(topo_from_roots([loss]))}
    return sorted(range(len(params)), key=lambda i: -pos.get(params[i], -1))


def buckets(params, order, bucket_bytes):
    """Lists of param indices (``order`` is backward order), each of one dtype and about ``bucket_bytes``."""
    out, cur, nbytes = [], [], 0
    for i in order:
        p = params[i]
        if cur and (p.dtype != params[cur[0]].dtype or nbytes >= bucket_bytes):
            out.append(cur)
            cur, nbytes = [], 0
        cur.append(i)
        nbytes += p.size * np.dtype(p.dtype).itemsize
    if cur:
        out.append(cur)
    return out


def reduce_gradients(loss, params, grads, world_size, bucket_bytes):
    """(global mean loss, [mean gradient per param], [bucket param index lists]) as graph nodes: the loss
    and every bucket of ``grads`` reduced across ``world_size`` ranks (module doc)."""
    scale = 1.0 / world_size
    order = backward_order(loss, params)
    groups = buckets(params, order, bucket_bytes)
    lstart = make("allreduce_start", (loss,), {"req": 0})
    starts = [make("allreduce_start", tuple(grads[i] for i in grp), {"req": r + 1}) for r, grp in enumerate(groups)]
    last = starts[-1] if starts else lstart
    token = lambda s: (last,) if s is not last else ()  # noqa: E731 - waits come after the last start
    # the loss's wait reads every start, in bucket order: the schedule's depth-first source order then visits
    # the buckets' backward chains in that order (each start right after its gradients), and every wait
    # comes after the last start
    red_loss = make("allreduce_wait", (lstart,) + tuple(starts), {"req": 0, "shapes": ((),), "scale": scale})
    red = [None] * len(params)
    for r, (grp, s) in enumerate(zip(groups, starts)):
        outs = make("allreduce_wait", (s,) + token(s),
                    {"req": r + 1, "shapes": tuple(tuple(params[i].shape) for i in grp), "scale": scale})
        outs = outs if isinstance(outs, tuple) else (outs,)
        for i, o in zip(grp, outs):
            red[i] = o
    return red_loss, red, groups


def rewrite_entries(todo, params, optimizer, world_size, cfg):
    """The grad and step entries of ``todo`` (kind, roots, outputs) with their gradients reduced: grad
    returns the mean gradients, step the mean loss, and each bucket gets its own update node."""
    out = []
    for kind, roots, outputs in todo:
        if kind == "run":
            out.append((kind, roots, outputs))
            continue
        lt, grads = roots[0], roots[1:]
        red_loss, red, groups = reduce_gradients(lt, params, grads, world_size, cfg.bucket_bytes)
        if kind == "grad":
            bucketed = [red[i] for grp in groups for i in grp]  # (roots in bucket order: the DFS visits them so)
            out.append(("grad", [red_loss] + bucketed, [(params[i].name, red[i]) for i in range(len(params))]))
            continue
        updates, extra = [], []
        from .optim import Adam
        if isinstance(optimizer, Adam) and groups:
            # one step counter advance per step, before every bucket's update (as passes.split_adam)
            g = lt.graph
            count = g._add(Tensor(g, "adam_count", (), {"dtype": params[0].dtype}, (), params[0].dtype, None))
            extra.append(count)
        for grp in groups:
            u = optimizer.update_node([params[i] for i in grp], [red[i] for i in grp])
            if extra:
                u.attrs.update(counted=True, after=(extra[0],))
            updates.append(u)
        out.append(("step", [red_loss] + updates + extra, [("loss", red_loss)]))
    return out
