"""Lowering, the target-independent half: one entry's sub-graph -> scheduled instructions with storage.

``lower_entry`` plans one entry (run / grad / step): the per-entry passes (transposes into GEMM flags,
epilogue, SGD and Adam rewrites, in-place writers after their readers), fusion (``passes.fuse``),
the schedule (``passes.schedule``), the instruction list with what each instruction reads and writes,
and memory (``memory.plan_arena``: liveness, in-place reuse, arena placement).  It hands the result, a
``Schedule``, to a backend (``backend_cpu.CPU``, the only one), which writes the runtime's plan entry.
Nothing in this module reads the plan format, the register VM or the kernels' fields.  (Some of the
graph rewrites it runs are still chosen for the CPU kernels: ``passes.fuse_vm_epilogues``,
``ops_logic.lower_logic``'s float 0/1 masks; they stay graph-to-graph passes.)

Across the boundary, to the backend (``backend.emit_entry(Schedule)`` -> (Entry, summary rows)):

* ``Schedule.instrs``: ``Instr`` in execution order: ``kind`` "ew" (``x`` a ``passes.Group``, a fused
  elementwise+reduction kernel) or "op" (``x`` one node); ``reads``, ``writes``, ``imm``, ``outputs``
  and the backend's own ``layout`` of a group (see ``Instr``);
* ``Schedule.storage``: a ``Storage``, where each tensor lives as a storage class and an index: ("input",
  k), ("state", byte offset) or ("arena", byte offset), and the arena offsets of each instruction's
  scratch buffers;
* the entry's inputs (feed order), outputs ([(user name, tensor)]) and arena size.

Back from the backend, before memory planning (its knowledge of the kernels shapes the plan; the hooks
are described in ``backend_cpu``): ``legal_groups`` (fused groups split to the kernel's limits),
``immediates`` (scalar constants that are not memory reads), ``inplace_inputs`` (which inputs an output
may overwrite) and ``ew_layout`` (a group's scratch bytes, and a layout handed back at emission).

``StateLayout`` places params, optimizer state and constant data in the persistent state buffer, shared
by all entries of a program.  The backend asks for constants' and optimizer state's offsets while it
emits (``Storage.where``, ``StateLayout.opt_state_offset``), so the state's layout follows emission order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from libml_runtime.executable import aligned_zeros

from . import ops_attention, ops_logic, passes, views
from .ir import Tensor
from .ops import REGISTRY, out_specs
from .memory import Instruction, MemoryReport, align, lower_bound, plan_arena


class StateLayout:
    """Byte layout of the persistent state buffer: params, optimizer state, constant data (the buffer is
    one of the storage classes of ``Storage``; offsets are bytes, every array 64-byte aligned)."""

    def __init__(self):
        self.chunks = []           # (offset, ndarray) initial contents
        self.size = 0
        self.params = []           # (name, offset, dtype, shape, trainable)
        self.opt_state = []        # (name, offset, dtype, shape)
        self.buffers = []          # names of the opt_state arrays that are buffers (Graph.buffer)
        self.where: dict = {}      # tensor / key -> offset

    def alloc(self, key, value, nbytes=None):
        """Place ``value`` (None: ``nbytes`` of zeros, never materialised here) at the next aligned offset."""
        if key in self.where:
            return self.where[key]
        off = align(self.size)
        if value is not None:
            value = np.array(value, order="C", copy=None)
            nbytes = value.nbytes
            self.chunks.append((off, value))
        self.size = off + nbytes
        self.where[key] = off
        return off

    def add_param(self, t: Tensor, trainable):
        off = self.alloc(("param", t.name), t.value)
        self.params.append((t.name, off, t.dtype, t.shape, bool(trainable)))
        return off

    def add_buffer(self, t: Tensor):
        """Place buffer ``t`` (Graph.buffer) with its initial value; it is listed with the optimizer state
        (state_dict, plan files and checkpoints carry it) and in ``buffers`` (its name)."""
        off = self.alloc(("buffer", t.name), t.value)
        self.opt_state.append((t.name, off, t.dtype, t.shape))
        self.buffers.append(t.name)
        return off

    def opt_state_offset(self, name, dtype, shape):
        """Offset of optimizer-state array ``name`` (momentum, Adam moments, step counter), created on
        first use.  It starts at zero: the buffer's zero pages, not a copy of a zero array (W3 with Adam:
        200 MB of moments; copying them took 0.5 s of lc.compile)."""
        if ("opt", name) in self.where:
            return self.where[("opt", name)]
        off = self.alloc(("opt", name), None, int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
        self.opt_state.append((name, off, dtype, tuple(shape)))
        return off

    def buffer(self):
        """The initial state bytes: every chunk copied in; zeros elsewhere (optimizer state, alignment
        gaps), from calloc'ed pages that are only touched when first used."""
        buf = aligned_zeros(max(align(self.size), 64))  # (the Executable adopts it without a copy)
        for off, v in self.chunks:
            buf[off:off + v.nbytes] = v.reshape(-1).view(np.uint8)
        return buf


class Instr:
    """A scheduled unit with what it reads and writes (for liveness, and for the backend).

    kind "ew": ``x`` is a ``passes.Group``; ``reads`` its outside operands in first-use order (immediates
    excluded), ``writes`` the members stored to memory (sums, roots, members read outside the group),
    ``imm`` the scalar constants the backend takes as immediates, ``layout`` the backend's ``ew_layout``.
    kind "op": ``x`` is the node; ``reads`` its inputs, ``writes`` its outputs that something reads (none
    for an update: it writes the state), ``outputs`` output k's node (the node itself, then projections)
    or None where nothing reads it (the kernel still writes it: into scratch; empty for an update)."""

    def __init__(self, kind, x):
        self.kind, self.x = kind, x
        self.reads: list[Tensor] = []
        self.writes: list[Tensor] = []
        self.imm: set = set()
        self.outputs: list = [x]
        self.layout = None


def storage_base(t):
    """The tensor whose storage ``t`` is: a reshape is a view of its input's buffer."""
    while t.op == "reshape":
        t = t.inputs[0]
    return t


class Storage:
    """Where the tensors of one entry live: ``where(t)`` is ("input", k) for the entry's k-th input,
    ("state", byte offset) for params and constants (in ``state``, the program's ``StateLayout``) and
    ("arena", byte offset) for everything an instruction writes.  A view lives where its base does.  A
    constant is placed in the state the first time ``where`` is asked for it.  ``scratch[k]``: the arena
    offsets of instruction k's scratch buffers, in the order it asked for them."""

    def __init__(self, inputs, state, buffers, scratch, inner=None):
        self.input_index = {t: k for k, t in enumerate(inputs)}
        self.state = state
        self.buffers = buffers  # storage key -> memory.Buffer
        self.inner = inner or {}  # a part placed inside another tensor's buffer -> its byte offset there
        self.scratch = {k: [b.offset for b in bs] for k, bs in scratch.items()}

    def where(self, t):
        t = storage_base(t)
        if t.op == "input":
            return "input", self.input_index[t]
        if t.op == "param":
            return "state", self.state.where[("param", t.name)]
        if t.op == "buffer":
            return "state", self.state.where[("buffer", t.name)]
        if t.op == "const":
            return "state", self.state.alloc(("const", id(t.value), t.value.dtype.str, t.shape), t.value)
        b = self.buffers.get(t)
        if b is None:
            raise AssertionError(f"no storage for {t!r} (compiler bug)")
        return "arena", b.offset + self.inner.get(t, 0)


@dataclass
class Schedule:
    """One planned entry, what the backend emits from: the instructions in execution order, their
    storage, the graph inputs the entry reads (in feed order), its outputs [(user name, tensor)] and the
    arena's size in bytes."""
    kind: str
    instrs: list
    storage: Storage
    inputs: list
    outputs: list
    arena_bytes: int


def _node_outputs(x, consumers):
    """[x, output 1's projection or None, ...] for node ``x`` (projections are found among its readers)."""
    n_out = len(out_specs(x))
    outs = [x] + [None] * (n_out - 1)
    for c in consumers.get(x, ()):
        if c.op == "output":
            k = c.attrs["index"]
            if outs[k] is not None and outs[k] is not c:
                raise AssertionError(f"two projections of output {k} of {x.name!r} (compiler bug)")
            outs[k] = c
    return outs


def lower_entry(kind, roots, outputs, state: StateLayout, graph_inputs, optimizer=None, fuse=True,
                check_finite=False, simplified=False, backend=None, distributed=False, micro_batch_of=None):
    """Compile the sub-graph reaching ``roots`` into an Entry.

    outputs: [(user name, tensor)] copied out after each call.  simplified: ``roots`` and ``outputs`` are
    already the result of ``passes.simplify`` over a graph that contains this one (``compile`` simplifies
    the joint graph of all entries once).  backend: what emits the entry and answers the planning hooks
    (default ``backend_cpu.CPU``).  distributed: the gradients are reduced across ranks (distributed.py), so
    the update is never folded into their GEMMs nor Adam split per param (both need the gradient); also set
    for gradient accumulation (accumulate.py), which sums them.  micro_batch_of: {node name: micro-batch
    index} of an accumulating program: the schedule runs micro-batch k's instructions before k + 1's
    (nodes not named there run as soon as they are ready).  Returns (Entry, MemoryReport, summary rows).
    """
    if backend is None:
        from .backend_cpu import CPU as backend
    if simplified:
        nodes, rep = passes.topo_from_roots(roots), {}
    else:
        nodes, rep = passes.simplify(roots)
    # naive: every intermediate of the simplified joint graph in a buffer of its own (no fusion, no reuse)
    naive = sum(align(t.size * np.dtype(t.dtype).itemsize) for t in nodes
                if t.op not in passes.LEAVES and t.op != "reshape" and REGISTRY[t.op].kind != "opt")

    # rep maps every replaced tensor to its final replacement
    outputs = [(n, rep.get(t, t)) for n, t in outputs]
    roots = [rep.get(t, t) for t in roots]
    if not simplified:
        # (compile runs this once on the joint graph, after simplify) bools meeting floats become the
        # float VM's 0/1 masks, fused with their float neighbours
        lm = ops_logic.lower_logic(nodes)
        if lm:
            outputs = [(n, lm.get(t, t)) for n, t in outputs]
            roots = [lm.get(t, t) for t in roots]
            nodes = passes.topo_from_roots(roots)

    def rewrite(rw):
        """Apply one pass's Rewrite to this entry's roots and outputs (the joint graph is left as it is)."""
        nonlocal roots, outputs
        roots, m = rw.apply(roots)
        outputs = [(n, m.get(t, t)) for n, t in outputs]

    if fuse and any(t.op == "conv" for t in nodes):
        # (ops_conv: 1x1 convs on (N, C, 1, 1), squeeze-excitation, become GEMMs for the GEMM passes below)
        from .ops_conv import pointwise_convs_as_gemms
        rewrite(pointwise_convs_as_gemms(nodes, roots))
        nodes = passes.topo_from_roots(roots)
    present = {t.op for t in nodes}
    if fuse and "gather_grad" in present:
        # attention's packed q/k/v gradient: the head gradients side by side in the in-projection's layout
        # (ops_attention), before the transpose and view passes let their GEMMs write it
        rewrite(ops_attention.assemble_scatter_sums(nodes, roots))
        nodes = passes.topo_from_roots(roots)
        present = {t.op for t in nodes}
    if "matmul" in present:
        rewrite(passes.absorb_transposes(nodes))
    if fuse and "matmul" in present:
        # scales fold into alpha once transposes no longer hide them (matmul(transpose(x * c), .)); then
        # the transposes the scales hid (transpose(matmul(.) * c)) are absorbed in turn
        rewrite(passes.fold_gemm_scales(passes.topo_from_roots(roots), roots))
        rewrite(passes.absorb_transposes(passes.topo_from_roots(roots)))
    if fuse and "softmax" in present:
        # attention: the mask add / where read by a softmax alone runs inside it (ops_attention; after the
        # scale folds into the QK^T GEMM's alpha, before GEMM epilogues could take the add)
        rewrite(ops_attention.fuse_masked_softmax(passes.topo_from_roots(roots), roots))
    if fuse:
        # (each pass sorts the graph it reads: skipped where its anchor op is absent, e.g. a graph without
        # GEMMs; 0.4 s of a 20,000-op elementwise chain)
        if "softmax_xent" in present:
            rewrite(passes.fuse_xent(passes.topo_from_roots(roots)))
        if "matmul" in present:
            rewrite(passes.fuse_epilogues(passes.topo_from_roots(roots), roots))
            rewrite(passes.fuse_relu_backward(passes.topo_from_roots(roots), roots))
            rewrite(passes.fuse_vm_epilogues(passes.topo_from_roots(roots), roots))
        if "conv" in present:  # (ops_conv: BatchNorm's affine and the activation as the conv's epilogue)
            from .ops_conv import fuse_conv_epilogues, fuse_conv_residuals, fuse_conv_shortcuts
            rewrite(fuse_conv_epilogues(passes.topo_from_roots(roots), roots))
            rewrite(fuse_conv_shortcuts(passes.topo_from_roots(roots), roots))
            rewrite(fuse_conv_residuals(passes.topo_from_roots(roots), roots))
        # (a distributed plan keeps every gradient for its allreduce: no SGD folded into a gradient kernel)
        if not distributed and "conv_grad_weight" in present and any(r.op == "sgd_update" for r in roots):
            roots = passes.fold_sgd_into_conv(passes.topo_from_roots(roots), roots)
        if not distributed and any(r.op == "sgd_update" for r in roots):  # (a topological sort costs 5 % on a 20k-op chain)
            roots = passes.fold_sgd_into_gemm(passes.topo_from_roots(roots), roots)
        if not distributed and any(r.op == "adam_update" for r in roots):
            roots = passes.split_adam(passes.topo_from_roots(roots), roots)
        if "matmul" in present:
            # last: the passes above read matmul inputs as dense tensors (views.py)
            rewrite(views.absorb_views(passes.topo_from_roots(roots), roots))
            if "assemble" in present:  # then the GEMMs computing an assemble's parts write them in place
                rewrite(ops_attention.assemble_in_place(passes.topo_from_roots(roots), roots))
    # after every rewrite: each in-place writer waits for all readers of the value it overwrites
    nodes, m, inplace_after = passes.order_inplace_writers(roots)
    if m:
        roots = [m.get(t, t) for t in roots]
        outputs = [(n, m.get(t, t)) for n, t in outputs]
    root_set = set(roots) | {t for _, t in outputs}
    consumers = passes.consumer_map(nodes)
    if fuse:
        group_of = backend.legal_groups(passes.fuse(nodes), consumers, root_set)
    else:
        group_of = {t: _single_group(t) for t in nodes if passes.is_fusible(t)}
    prio = None if not micro_batch_of else (lambda t: micro_batch_of.get(t.name, -1))
    units = passes.schedule(nodes, group_of, inplace_after, priority=prio)

    # ---- instructions: what each scheduled unit reads and writes ---------------------------------
    used_inputs = [t for t in nodes if t.op == "input"]
    order = {name: k for k, (name, _, _) in enumerate(graph_inputs)}
    used_inputs.sort(key=lambda t: order[t.name])

    instrs = []
    for kind_u, x in units:
        ins = Instr(kind_u, x)
        if kind_u == "ew":
            members = set(x.members)
            ins.imm = backend.immediates(x.members)
            for m in x.members:
                for i in m.inputs:
                    if i not in members and i not in ins.imm and i not in ins.reads:
                        ins.reads.append(i)
            for m in x.members:
                if m.op == "sum" or m in root_set or any(c not in members for c in consumers.get(m, ())):
                    ins.writes.append(m)
        else:
            ins.reads = [i for i in x.inputs]
            ins.writes = [x] if REGISTRY[x.op].kind != "opt" else []  # updates write the state only
            ins.outputs = _node_outputs(x, consumers) if REGISTRY[x.op].kind != "opt" else []
            ins.writes += [o for o in ins.outputs[1:] if o is not None]
        instrs.append(ins)

    # ---- liveness over the schedule; in-place reuse; arena placement (memory.plan_arena) -----------
    # storage keys: a reshape is a view of its input's buffer (storage_base); every write is a buffer of its
    # own, but an elementwise output may take over the buffer of an input that dies at its instruction
    # (which inputs: the backend's inplace_inputs)
    # parts of an assemble written in place (ops_attention.assemble_in_place): their GEMMs' outputs are
    # placed inside the assemble's buffer, at the part's offset
    part_of = {}
    for t in nodes:
        if passes.is_placed(t):
            nb = int(t.size * np.dtype(t.dtype).itemsize)
            for x in t.inputs:
                part_of[x] = (t, t.name, nb, int(x.attrs["placed_at"]) * np.dtype(t.dtype).itemsize)
    steps = []
    for k, ins in enumerate(instrs):
        reuse, scratch = {}, ()
        if ins.kind == "ew":
            ins.layout, scratch_bytes = backend.ew_layout(ins)
            reuse = {w: c for w in ins.writes
                     if w.op != "sum" and (c := backend.inplace_inputs(ins, w, storage_base))}
            if scratch_bytes is not None:
                scratch = ((f"scratch{k}", scratch_bytes),)
        else:  # outputs nothing reads: written into scratch
            scratch = tuple((f"{ins.x.name}:{j}", _nbytes(*out_specs(ins.x)[j]))
                            for j, o in enumerate(ins.outputs) if o is None)
            # then the kernel's own working buffers (OpDef.scratch), after the unread outputs' (the
            # backend takes them in this order)
            own = REGISTRY[ins.x.op].scratch
            if own is not None:
                scratch += tuple((f"{ins.x.name}:scratch{j}", int(nb)) for j, nb in enumerate(own(ins.x)))
        steps.append(Instruction([storage_base(i) for i in ins.reads],
                                 [(w, w.name, int(w.size * np.dtype(w.dtype).itemsize)) for w in ins.writes],
                                 reuse, scratch, {w: part_of[w] for w in ins.writes if w in part_of}))
    mem = plan_arena(steps, live_out=[storage_base(t) for t in root_set])
    buffers, uniq, arena = mem.buffers, mem.unique, mem.arena_bytes
    naive += sum(align(b.nbytes) for bs in mem.scratch.values() for b in bs)  # reduction scratch
    report = MemoryReport(kind, arena, lower_bound(uniq), naive,
                          [(b.name, b.offset, b.nbytes, b.start, b.end, list(b.tensors)) for b in uniq],
                          sum(align(b.nbytes) for b in uniq))

    # ---- emission (the backend) -------------------------------------------------------------------
    sched = Schedule(kind, instrs, Storage(used_inputs, state, buffers, mem.scratch, mem.inner), used_inputs,
                     outputs, arena)
    entry, summary = backend.emit_entry(sched, check_finite=check_finite)
    return entry, report, summary


def _single_group(t):
    g = passes.Group(id(t), t.inputs[0].shape if t.op == "sum" else t.shape)
    g.members.append(t)
    return g


def _nbytes(shape, dtype):
    return int(math.prod(shape) * np.dtype(dtype).itemsize)
