"""Gradient accumulation: ``lc.compile(g, loss=..., optimizer=..., accumulate=M)``.

The graph is declared at the micro-batch size b (every input's axis 0 is its batch axis, of b rows).  The
program's inputs have M * b rows; ``prog.step(feeds)`` runs forward + backward on each micro-batch
``feeds[name][k*b:(k+1)*b]`` in order, averages the M gradients and applies the optimizer once (PyTorch's
``loss / M; loss.backward()`` M times, then ``opt.step()``).  It is one runtime call, like every step: the
compiler replays the micro-batch graph M times inside the plan (``Replica``), each copy reading a slice
of the fed inputs (no loop runs in Python, and no NumPy arithmetic).

**Exactly the single-process counterpart of K = M ranks** (distributed.py).  The M gradients of a param
are summed in micro-batch order and then scaled, ``((g0 + g1) + ... + g_{M-1}) * (1/M)`` in the param's
dtype with 1/M rounded to it, which is what ``allreduce_wait`` writes (the MPI sum, then times the scale
constant); the returned loss is the same mean of the M micro-batch losses, as the distributed plan's loss
bucket.  Each micro-batch runs the very instructions one rank runs on its shard (same shapes, same
kernels), and the sum is a kernel of its own (a reshape keeps it out of the gradient kernels' epilogues and
fused groups), so for M = 2 (an allreduce of two ranks adds the same two values) the params after any
number of steps equal, bit for bit, those of ``mpiexec -n 2`` with shards of b rows (tests/test_distributed.py
checks SGD, momentum and Adam in float32 and momentum in float64 on an MLP, and SGD and Adam on an MLP with
BatchNorm, its running statistics included, after 10 steps; both runs on one machine, with the same kernel
copies: the ISA-dispatched copies may differ in the last bit).  For M > 2 the sum order here is fixed,
MPI's is the library's choice: equal to summation order.  As for distributed plans, the folds of plain SGD into the weight-gradient
GEMM and the per-param Adam split are off (lower_entry(distributed=True)): the gradient must exist to be
summed.  Against one process with the global batch (a program declared at M * b rows) the result agrees
to float summation order only (its GEMMs sum M * b rows at once).

**What the micro-batches share.**  Nodes that read no input (params, consts, a param's transpose, dropout's
step counter) are computed once; everything reading an input is replayed per micro-batch.  Consequences,
all as on K ranks: a training-mode BatchNorm normalises each micro-batch with its own batch statistics
(DDP without SyncBatchNorm), and only micro-batch 0 writes the running statistics (rank 0's buffers: the
other copies read the buffers' initial values as constants for their unused running outputs); every
micro-batch's dropout draws the same mask per position (the ranks share seed and step; PyTorch's
accumulation would draw M different masks), and the step counter advances once per step.

**Memory.**  The schedule runs micro-batch k's forward and backward before micro-batch k + 1's
(lower_entry's ``micro_batch_of``), and each gradient joins the running sum as soon as it is final (the
adds are kernels of their own), so the arena holds one micro-batch's activations, the running sums and the
current micro-batch's gradients: about two gradient sets besides the activations, whatever M is (PyTorch
accumulates into ``.grad`` in place, one set; here the micro-batch's gradient must exist on its own to be
added exactly as the allreduce adds it).  The plan holds M copies of the forward and backward
instructions (its code and compile time grow with M).

``run`` (inference) also takes M * b rows: outputs with a leading axis of b rows are concatenated along
it, scalar outputs (the loss) are the mean of the M values; other outputs are refused at compile time.
The plan's ``meta["accumulate"]`` records M and b (saved plans carry it; the runtime needs nothing else).
"""
from __future__ import annotations

import numpy as np

from .ir import FLOAT_DTYPES, Tensor


def config(accumulate, distributed, loss):
    """The number of micro-batches M of ``lc.compile``'s ``accumulate`` argument (1: no accumulation)."""
    if accumulate is None:
        return 1
    if isinstance(accumulate, (bool, np.bool_)) or not isinstance(accumulate, (int, np.integer)) or accumulate < 1:
        raise ValueError(f"compile: accumulate must be a positive int (micro-batches per step), got {accumulate!r}")
    m = int(accumulate)
    if m > 1 and loss is None:
        raise ValueError(f"compile: accumulate={m} needs a loss (gradient accumulation is for training)")
    if m > 1 and distributed is not None:
        raise ValueError(f"compile: accumulate={m} cannot be combined with distributed={distributed!r} (not "
                         f"supported); use K ranks or accumulate, not both")
    return m


def _rename_dead(g, t):
    """Give node ``t`` (about to be left dead by the replay) a fresh auto name, freeing its name."""
    del g._by_name[t.name]
    t.name = g._fresh_name(t.op, t.id)
    t.auto_name = True
    g._by_name[t.name] = t


class Replica:
    """The micro-batch graph ``tg`` replayed M times in place: ``maps[k]`` maps each node of the micro-batch
    graph to its copy for micro-batch k (itself for nodes that read no input); ``tg.inputs`` become inputs of
    M * b rows under the same names, the old ones are left dead."""

    def __init__(self, tg, m):
        self.graph, self.m = tg, m
        inputs = dict(tg.inputs)
        if not inputs:
            raise ValueError(f"compile: accumulate={m}: graph {tg.name!r} has no inputs to split into micro-batches")
        for name, t in inputs.items():
            if t.ndim == 0:
                raise ValueError(f"compile: accumulate={m}: input {name!r} is a scalar; every input must have a "
                                 f"leading batch axis of the micro-batch size")
        rows = {name: t.shape[0] for name, t in inputs.items()}
        if len(set(rows.values())) != 1:
            raise ValueError(f"compile: accumulate={m}: every input's axis 0 is split into micro-batches, so all "
                             f"inputs must have the same leading (micro-batch) size; got {rows}")
        self.b = b = next(iter(rows.values()))
        if b == 0:
            raise ValueError(f"compile: accumulate={m}: the micro-batch size (the inputs' axis 0) is 0")
        from .ops import slice_axis
        old_nodes = list(tg.nodes)
        big = {}
        for name, t in inputs.items():
            _rename_dead(tg, t)
            big[name] = tg._add(Tensor(tg, "input", (), {}, (m * b,) + t.shape[1:], t.dtype, name))
        tg.inputs = big
        name_of = {t: name for name, t in inputs.items()}
        self.maps = maps = [{} for _ in range(m)]
        self._made = []  # (node, micro-batch index) of every node built for one micro-batch
        dep = set()
        for t in old_nodes:
            if t.op == "input":
                if t in name_of:
                    dep.add(t)
                    for k in range(m):
                        maps[k][t] = slice_axis(big[name_of[t]], 0, k * b, (k + 1) * b)
                        self._made.append((maps[k][t], k))
                else:
                    for k in range(m):
                        maps[k][t] = t
                continue
            if not any(i in dep for i in t.inputs):
                for k in range(m):
                    maps[k][t] = t
                continue
            dep.add(t)
            consts = None
            if t.op == "batch_norm" and t.inputs[3].op == "buffer" and t.inputs[4].op == "buffer":
                # micro-batches 1.. do not write the running statistics (rank 0's buffers: module doc)
                consts = (tg.const(t.inputs[3].value), tg.const(t.inputs[4].value))
            keep_name, auto = t.name, t.auto_name
            _rename_dead(tg, t)
            for k in range(m):
                ins = [maps[k][i] for i in t.inputs]
                if k and consts is not None:
                    ins[3], ins[4] = consts
                name = keep_name if k == 0 else None
                n = Tensor(tg, t.op, ins, t.attrs, t.shape, t.dtype, name, t.value)
                n.auto_name = auto if k == 0 else True
                tg._add(n)
                maps[k][t] = n
                self._made.append((n, k))

    def mean(self, xs, barrier=False):
        """((x0 + x1) + ... + x_{M-1}) * (1/M) in the tensors' dtype: allreduce_wait's sum-then-scale.
        ``barrier``: every add reads reshaped views (reshapes are views, never fused), so each add is a
        kernel of its own: never an epilogue or fused member of the kernels computing the xs (which could
        change their rounding), and run as soon as its micro-batch's term is ready, so only the running sum
        and the current micro-batch's gradients are live, not all M."""
        from .ops import add, mul, reshape
        x0 = xs[0]
        shape, n = x0.shape, x0.size
        scale = self.graph.const(1.0 / self.m, dtype=x0.dtype)
        if not barrier:
            acc = x0
            for x in xs[1:]:
                acc = add(acc, x)
            return mul(acc, scale)
        flats = []  # two distinct views of n elements, neither of the tensors' own shape
        for f in ((1, n), (n, 1), (n,), (1, 1, n)):
            if f != shape and f not in flats:
                flats.append(f)
        acc = x0
        for k, x in enumerate(xs[1:]):
            f = flats[k % 2]
            acc = add(reshape(acc, f), reshape(x, f))
        return reshape(mul(acc, scale), shape)

    def run_output(self, name, t):
        """The run entry's value of output ``t``: batched outputs concatenated, scalars averaged."""
        from .ops import concat
        outs = [self.maps[k][t] for k in range(self.m)]
        if outs[0] is outs[-1]:
            return t  # reads no input: the same for every micro-batch
        if t.ndim >= 1 and t.shape[0] == self.b:
            return concat(outs, axis=0)
        if t.ndim == 0 and t.dtype in FLOAT_DTYPES:
            return self.mean(outs)
        raise ValueError(f"compile: accumulate={self.m}: output {name!r} of shape {t.shape} has no leading axis of "
                         f"the micro-batch size {self.b} (to concatenate) and is not a float scalar (to average)")

    def micro_batch_of(self):
        """{node name: micro-batch index} of the nodes computing one micro-batch's forward and backward
        (lower_entry's schedule runs micro-batch k before k + 1: their activations then share the arena;
        the passes' rewrites keep a node's name)."""
        return {t.name: k for t, k in self._made}

    def entries(self, run_outputs, loss, params, optimizer):
        """The (kind, roots, outputs) entries of the accumulating program (program.py's ``todo``)."""
        from . import autodiff
        run_outs = [(n, self.run_output(n, t)) for n, t in run_outputs]
        todo = [("run", [t for _, t in run_outs], run_outs)]
        losses = [self.maps[k][loss] for k in range(self.m)]
        per = []
        for k, lk in enumerate(losses):  # in micro-batch order
            first = len(self.graph.nodes)
            per.append(autodiff.grad_graph(lk, params))
            self._made.extend((t, k) for t in self.graph.nodes[first:])
        mean_loss = self.mean(losses)
        grads = [self.mean([per[k][p] for k in range(self.m)], barrier=True) for p in params]
        todo.append(("grad", [mean_loss] + grads, [(p.name, gp) for p, gp in zip(params, grads)]))
        if optimizer is not None:
            upd = [optimizer.update_node(params, grads)] if params else []
            todo.append(("step", [mean_loss] + upd, [("loss", mean_loss)]))
        return todo
