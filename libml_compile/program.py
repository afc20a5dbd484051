"""``lc.compile``: graph -> training program.

The data path: clone the user's graph → autodiff appends the backward graph → the optimizer appends one
update node → for each entry (``run``: forward outputs; ``grad``: loss and gradients; ``step``: loss and
update) the passes simplify, fuse and schedule it, the planner lays out the arena, and lowering emits a
flat plan.  The resulting ``Program`` holds a ``libml_runtime.Executable`` (``prog.executable``: the plan
bound to its arena and state, which runs it), delegates run/grad/step/params and the rest of the runtime's
API to it, and adds the compiler's views of what it did (``summary``, ``memory_report``, ``instructions``).
"""
from __future__ import annotations

import gc
import time

from libml_runtime.executable import Executable
from libml_runtime.plan import Plan, validate

from . import accumulate as _acc, autodiff, distributed as _dist, ops_logic, passes, patterns
from .ir import FLOAT_DTYPES, INT_DTYPES, Graph, Tensor, clone_graph
from .lower import StateLayout, lower_entry
from .ops import REGISTRY
from .optim import SGD, Adam

PLAN_ENTRIES = ("run", "grad", "step")


class Program:
    """A compiled program: the runtime's ``Executable`` (``self.executable``) plus the compiler's inspection.

    Every runtime call (``run``/``grad``/``step``/``params``/``set_params``/``state_dict``/
    ``load_state_dict``/``save``/``save_checkpoint``/``load_checkpoint``/``profile``) is made on the one
    ``executable``, so they all take its lock: a snapshot (``params``, ``state_dict``, ``save``) is never
    half a ``step`` of another thread.  ``graph`` is the user's graph as passed to ``lc.compile``;
    ``compile_seconds`` the wall time ``lc.compile`` took."""

    def __init__(self, plan, graph, reports, summaries, num_threads=None, check_finite=False, compile_seconds=0.0):
        # the compiler hands over the state buffer it just built (no copy: see Executable's _adopt_state)
        self.executable = Executable(plan, num_threads=num_threads, check_finite=check_finite, _adopt_state=True)
        self.graph = graph
        self._reports = reports
        self._summaries = summaries
        self.compile_seconds = compile_seconds

    # ---- the runtime's API, delegated to self.executable --------------------------------------------
    @property
    def plan(self):
        """The ``libml_runtime.Plan`` this program runs (its ``state`` is the live state buffer)."""
        return self.executable.plan

    @property
    def num_threads(self):
        """OpenMP threads each runtime call uses (fixed at compile time)."""
        return self.executable.num_threads

    @property
    def world(self):
        """(rank, size) of a distributed program's MPI job (``distributed="mpi"``); (0, 1) otherwise."""
        return self.executable.world

    @property
    def check_finite(self):
        """Whether calls run the checked entries, which stop at the first op producing NaN/Inf."""
        return self.executable.check_finite

    @property
    def params(self):
        """name -> copy of the current value of every param (taken under the lock: never half an update)."""
        return self.executable.params

    @property
    def buffers(self):
        """name -> copy of the current value of every buffer (Graph.buffer: BatchNorm's running statistics),
        taken under the lock."""
        return self.executable.buffers

    def set_params(self, values):
        """Overwrite params by name from ``{name: array of the param's shape}``; every value is checked
        first (known name, shape, real dtype, no overflow), and on any error nothing is written."""
        return self.executable.set_params(values)

    def run(self, feeds):
        """Forward only: ``{output name: array}`` for every graph output (the loss if it has none)."""
        return self.executable.run(feeds)

    def grad(self, feeds):
        """``{param name: d loss / d param}`` for the trainable params (each of its param's shape); no update."""
        return self.executable.grad(feeds)

    def step(self, feeds):
        """Forward + backward + optimizer update in one runtime call; returns the loss as a float."""
        return self.executable.step(feeds)

    def state_dict(self):
        """Copies of the params and optimizer state, all taken under one hold of the lock (one step's)."""
        return self.executable.state_dict()

    def load_state_dict(self, d):
        """Restore a ``state_dict``: every array must have the exact dtype and shape; on any error nothing is
        written."""
        return self.executable.load_state_dict(d)

    def save(self, path):
        """Write the plan with the current params and optimizer state to one self-contained plan file
        (``libml_runtime.load`` reads it back; see FORMAT.md), atomically; returns ``path``."""
        return self.executable.save(path)

    def save_checkpoint(self, path, loader=None, extra=None):
        """Atomically write params, optimizer state and (optionally) a data loader's position."""
        return self.executable.save_checkpoint(path, loader=loader, extra=extra)

    def load_checkpoint(self, path, loader=None):
        """Restore a checkpoint written by ``save_checkpoint``; returns its ``extra`` dict."""
        return self.executable.load_checkpoint(path, loader=loader)

    # ---- the compiler's views -----------------------------------------------------------------------
    def memory_report(self, entry=None):
        """MemoryReport of ``entry`` (default: ``step`` if present, else ``grad``, else ``run``)."""
        entry = entry or next(k for k in ("step", "grad", "run") if k in self._reports)
        return self._reports[entry]

    def summary(self, entry=None):
        """The plan's instructions (fused groups with their ops), FLOPs and bytes each, the arena size."""
        entry = entry or next(k for k in ("step", "grad", "run") if k in self._summaries)
        rows = self._summaries[entry]
        rep = self._reports[entry]
        lines = [f"program {self.plan.name!r} entry {entry!r}: {len(rows)} instructions, "
                 f"arena {rep.arena_bytes / 1e6:.3f} MB (lower bound {rep.lower_bound_bytes / 1e6:.3f} MB, "
                 f"naive {rep.naive_bytes / 1e6:.3f} MB), state {self.plan.state.nbytes / 1e6:.3f} MB",
                 f"{'#':>3}  {'instruction':<22} {'MFLOP':>10} {'MB':>9}  contents"]
        tf = tb = 0
        for k, r in enumerate(rows):
            what = ", ".join(r["members"]) if "members" in r else r.get("node", "")
            if "shape" in r:
                what = f"{r['shape']} mode {r['mode']}, {len(r['program'])} VM steps: {what}"
            lines.append(f"{k:>3}  {r['op']:<22} {r['flops'] / 1e6:>10.3f} {r['bytes'] / 1e6:>9.3f}  {what}")
            tf += r["flops"]
            tb += r["bytes"]
        lines.append(f"     {'total':<22} {tf / 1e6:>10.3f} {tb / 1e6:>9.3f}")
        return "\n".join(lines)

    def profile(self, kind, feeds, repeat=20, warmup=3):
        """The runtime's per-instruction timings (``Executable.profile``), each row joined with what the
        compiler knows of the instruction: its name as in ``summary`` (e.g. ``gemm+bias+relu``),
        ``flops``, ``bytes``, achieved ``gflops`` and ``gbps``, and ``contents`` (fused members or node).
        Params are left as they were."""
        prof = self.executable.profile(kind, feeds, repeat=repeat, warmup=warmup)
        rows = self._summaries.get(kind, [])
        if not self.check_finite and len(rows) == len(prof.rows):  # checked entries are unfused
            for r, s in zip(prof.rows, rows):
                sec = r["median_ms"] / 1e3
                r.update(op=s["op"], flops=s["flops"], bytes=s["bytes"],
                         gflops=s["flops"] / sec / 1e9 if sec > 0 else 0.0,
                         gbps=s["bytes"] / sec / 1e9 if sec > 0 else 0.0,
                         contents=", ".join(s["members"]) if "members" in s else s.get("node", r["node"]))
        return prof

    def instruction_count(self, entry="step"):
        return len(self._summaries[entry])

    def instructions(self, entry="step"):
        """One dict per instruction of ``entry``: ``op``, ``flops``, ``bytes``; fused kernels also carry
        ``members`` (the graph ops) and ``program`` (the VM steps, e.g. ``"add_5=FMA(x,a,b)"``)."""
        return [dict(r) for r in self._summaries[entry]]



def _tightest(old, new, shape):
    """The intersection of two ranges of one fed index input (``Plan.index_inputs``): each ``(lo, hi)`` for
    every element or ``((lo, hi), ...)`` per position along the input's last axis (``shape[-1]`` of them)."""
    if old is None:
        return new
    single = [isinstance(r[0], int) for r in (old, new)]
    if all(single):
        return max(old[0], new[0]), min(old[1], new[1])
    po, pn = ([r] * shape[-1] if one else list(r) for r, one in zip((old, new), single))
    return tuple((max(a[0], b[0]), min(a[1], b[1])) for a, b in zip(po, pn))


def compile(g: Graph, loss: Tensor | None = None, optimizer=None, trainable=None, num_threads=None,
            check_finite=False, fuse=True, distributed=None, accumulate=None) -> Program:
    """Compile ``g`` into a Program.

    loss: a floating scalar tensor of ``g`` (None: forward-only program). optimizer: ``SGD``/``Adam``
    (needs a loss). trainable: param names or glob patterns (``"encoder.layer.1.*"``) to train (None: all);
    no gradient work is done for the rest.
    num_threads: OpenMP and BLAS threads (default: OMP_NUM_THREADS or the machine's cores).
    check_finite: also build checked entries that stop at the first op producing NaN/Inf.
    fuse: False disables fusion (one instruction per op; for testing and debugging).
    distributed: ``"mpi"`` (or ``lc.distributed.MPI(bucket_bytes=...)``) inside a job started by ``mpiexec -n K``:
    data-parallel training, the gradients averaged across the K ranks inside each ``grad``/``step`` call
    and the loss returned by ``step`` the global mean (libml_compile/distributed.py: buckets, overlap,
    memory cost, rank 0's params broadcast at creation).
    accumulate: M (a positive int) for gradient accumulation: ``g`` is declared at the micro-batch size b, the
    program's inputs have M * b rows, and each ``grad``/``step`` call runs forward + backward on the M
    micro-batches in order inside the plan, averages their gradients exactly as an allreduce of M ranks does
    and (``step``) updates once; ``step`` returns the mean micro-batch loss (libml_compile/accumulate.py).
    Not combinable with ``distributed``.

    Python's cyclic garbage collector is paused while the compiler runs (and restored as it was): the
    passes allocate hundreds of thousands of small objects, and the collector's repeated scans of them
    took 2.2 of 7.4 s on a 20,000-op chain.  Nothing the compiler builds needs collecting before it ends."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _compile(g, loss, optimizer, trainable, num_threads, check_finite, fuse, distributed, accumulate)
    finally:
        if was_enabled:
            gc.enable()


def _new(t, *maps):
    """``t`` after the rewrites whose {old: new} maps are ``maps``, in order."""
    for m in maps:
        t = m.get(t, t)
    return t


def _compile(g, loss, optimizer, trainable, num_threads, check_finite, fuse, distributed=None,
             accumulate=None) -> Program:
    """``compile`` with the garbage collector paused."""
    t0 = time.perf_counter()
    if not isinstance(g, Graph):
        raise TypeError(f"compile: expected an lc.Graph, got {type(g).__name__}")
    if loss is not None:
        if not isinstance(loss, Tensor) or loss.graph is not g:
            raise ValueError(f"compile: loss must be a tensor of graph {g.name!r}, got {loss!r}")
        if loss.shape != () or loss.dtype not in FLOAT_DTYPES:
            raise ValueError(f"compile: loss {loss.name!r} must be a floating scalar, got shape {loss.shape} "
                             f"dtype {loss.dtype}")
    if optimizer is not None and loss is None:
        raise ValueError("compile: an optimizer needs a loss")
    dist = _dist.config(distributed)
    if dist is not None and loss is None:
        raise ValueError("compile: distributed='mpi' needs a loss (data-parallel training)")
    world = _dist.size() if dist is not None else 1
    n_micro = _acc.config(accumulate, distributed, loss)
    if optimizer is not None and not isinstance(optimizer, (SGD, Adam)):
        raise TypeError(f"compile: optimizer must be lc.SGD or lc.Adam, got {type(optimizer).__name__}")
    if trainable is None:
        train_names = list(g.params)
    else:
        if isinstance(trainable, str):
            trainable = [trainable]
        import fnmatch
        train_names, chosen = [], set()
        for n in trainable:
            if n in g.params:
                hits = [n]
            elif isinstance(n, str) and any(c in n for c in "*?["):  # a glob pattern: "encoder.layer.1.*"
                hits = [p for p in g.params if fnmatch.fnmatchcase(p, n)]
                if not hits:
                    raise ValueError(f"compile: trainable pattern {n!r} matches no param of graph {g.name!r}; "
                                     f"params are {sorted(g.params)[:30]}")
            else:
                raise ValueError(f"compile: trainable param {n!r} is not a param of graph {g.name!r}; "
                                 f"params are {sorted(g.params)[:30]}")
            for h in hits:
                if h not in chosen:
                    chosen.add(h)
                    train_names.append(h)
    if not g.outputs and loss is None:
        raise ValueError(f"compile: graph {g.name!r} has no outputs and no loss: nothing to compute")

    # the private copy the compiler works on, with decomposed GELU / LayerNorm chains as their fused ops
    tg, m = clone_graph(g, rewrite=patterns.recognize if fuse else None)
    state = StateLayout()
    train_set = set(train_names)  # (a list here made 10,000 params cost 0.5 s of list scans)
    for name, p in tg.params.items():
        state.add_param(p, name in train_set)
    for b in tg.buffers.values():
        state.add_buffer(b)
    graph_inputs = [(name, t.dtype, t.shape) for name, t in tg.inputs.items()]
    label_inputs = {t.inputs[1].name: t.inputs[0].shape[1] for t in tg.nodes
                    if t.op == "softmax_xent" and t.inputs[1].op == "input"}
    # fed indices (token ids, GatherElements / GatherND indices) are range-checked on feed, with a message
    # naming the input: the range each indexing op declares (OpDef.fed_index_range; gather: [-n, n) for a
    # table of n rows, ONNX's negative indices counting from the end), the tightest over the input's uses
    index_inputs = {}
    for t in tg.nodes:
        hook = REGISTRY[t.op].fed_index_range
        if hook is not None:
            k, rng = hook(t)
            src = t.inputs[k]
            # through integer casts and reshapes (an ONNX Unsqueeze of fed labels), which keep the values;
            # a per-component range only while the last axis is the same
            while src.op in ("cast", "reshape") and src.inputs[0].dtype != "bool" and (
                    isinstance(rng[0], int) or src.inputs[0].shape[-1:] == src.shape[-1:]):
                src = src.inputs[0]
            if src.op == "input" and src.dtype in INT_DTYPES:
                index_inputs[src.name] = _tightest(index_inputs.get(src.name), rng, src.shape)

    entries, reports, summaries = {}, {}, {}
    replica = None
    if n_micro > 1:  # the micro-batch graph replayed per micro-batch, inputs of M * b rows (accumulate.py)
        replica = _acc.Replica(tg, n_micro)
        graph_inputs = [(name, t.dtype, t.shape) for name, t in tg.inputs.items()]
        for name, rng in list(index_inputs.items()):  # per-position ranges along a split axis repeat
            if not isinstance(rng[0], int) and tg.inputs[name].ndim == 1:
                index_inputs[name] = tuple(rng) * n_micro

    # the whole joint graph is built before any entry is lowered: gradient rules see the graph as the
    # user declared it, never a fused node
    run_outputs = list(tg.outputs.items()) or [("loss", m[loss])]
    todo = [("run", [t for _, t in run_outputs], run_outputs)]
    if replica is not None:
        todo = replica.entries(run_outputs, m[loss], [tg.params[n] for n in train_names], optimizer)
    elif loss is not None:
        lt = m[loss]
        params = [tg.params[n] for n in train_names]
        grads = autodiff.grad_graph(lt, params)
        gouts = [(p.name, grads[p]) for p in params]
        todo.append(("grad", [lt] + [gt for _, gt in gouts], gouts))
        if optimizer is not None and dist is not None:  # (the updates are made per bucket, after simplify)
            todo.append(("step", [lt] + [gt for _, gt in gouts], [("loss", lt)]))
        elif optimizer is not None:
            upd = [optimizer.update_node(params, [grads[p] for p in params])] if params else []
            todo.append(("step", [lt] + upd, [("loss", lt)]))
    # simplify once over the joint graph of every entry (each entry's nodes are a sub-graph of it): per
    # entry, the same rewrites were found three times (0.6 s of 4.7 s on a 20,000-op chain)
    # (both build new nodes: the entries' roots and outputs are looked up in the maps they return)
    joint, rep = passes.simplify([t for _, roots, _ in todo for t in roots])
    # bools meeting floats become the float VM's 0/1 masks (ops_logic), once, on the joint graph
    lm = ops_logic.lower_logic(joint)
    todo = [(kind, [_new(t, rep, lm) for t in roots], [(n, _new(t, rep, lm)) for n, t in outputs])
            for kind, roots, outputs in todo]
    if dist is not None:  # the gradients reduced across ranks, in buckets (distributed.py)
        todo = _dist.rewrite_entries(todo, params, optimizer, world, dist)
    # (distributed and accumulating plans keep every gradient: no SGD folded into a GEMM, no Adam split)
    keep_grads = dist is not None or replica is not None
    micro = replica.micro_batch_of() if replica is not None else None
    # every entry rewrites the joint graph by path copying (passes.Rewrite): a checked entry (which must
    # name the single op that produced a NaN/Inf, so it is not fused) never sees another entry's fusions
    checked = {kind: lower_entry(kind, roots, outputs, state, graph_inputs, optimizer, fuse=False,
                                 check_finite=True, simplified=True, distributed=keep_grads, micro_batch_of=micro)[0]
               for kind, roots, outputs in todo} if check_finite else {}
    for kind, roots, outputs in todo:
        e, reports[kind], summaries[kind] = lower_entry(kind, roots, outputs, state, graph_inputs, optimizer,
                                                        fuse=fuse, simplified=True, distributed=keep_grads,
                                                        micro_batch_of=micro)
        e.checked = checked.get(kind)
        entries[kind] = e

    plan = Plan(name=g.name, state=state.buffer(), params=state.params, opt_state=state.opt_state,
                buffers=state.buffers,
                graph_inputs=graph_inputs, label_inputs=label_inputs, index_inputs=index_inputs, entries=entries,
                meta={"optimizer": repr(optimizer), "loss": loss.name if loss is not None else None,
                      **({"distributed": {"backend": "mpi", "world_size": world,
                                          "bucket_bytes": dist.bucket_bytes}} if dist is not None else {}),
                      **({"accumulate": {"micro_batches": n_micro, "micro_batch_rows": replica.b}}
                         if replica is not None else {})})
    validate(plan)
    return Program(plan, g, reports, summaries, num_threads=num_threads, check_finite=check_finite,
                   compile_seconds=time.perf_counter() - t0)
