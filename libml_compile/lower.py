"""Lowering: scheduled instructions -> a flat plan (int64 code, float64 constants, arena layout).

``StateLayout`` places params, optimizer state and constant data in the persistent state buffer
(slot 1), shared by all entries of a program.  ``lower_entry`` runs the passes for one entry (run / grad /
step), plans the arena and emits the code the runtime executes; the field layout of every opcode is the
one ``libml_runtime/_exec.pyx`` decodes and ``libml_runtime/plan.py`` validates.
"""
from __future__ import annotations

import math

import numpy as np
from libml_runtime import format as F
from libml_runtime.plan import Entry

from . import ops_logic, passes
from .ir import FLOAT_DTYPES, Tensor
from .ops import REGISTRY, gemm_outputs, out_specs
from .memory import Instruction, MemoryReport, align, lower_bound, plan_arena

_INT_OPS = {"add": F.VM_OPS["ADD"], "sub": F.VM_OPS["SUB"], "mul": F.VM_OPS["MUL"], "div": F.VM_OPS["DIV"],
            "maximum": F.VM_OPS["MAX"], "minimum": F.VM_OPS["MIN"]}


def contiguous_strides(shape):
    s, acc = [], 1
    for d in reversed(shape):
        s.append(acc)
        acc *= d
    return list(reversed(s))


def broadcast_strides(shape, target):
    """Element strides to read a contiguous tensor of ``shape`` over the iteration space ``target``."""
    cs = contiguous_strides(shape)
    lead = len(target) - len(shape)
    out = []
    for k, d in enumerate(target):
        j = k - lead
        out.append(0 if j < 0 or shape[j] == 1 and d != 1 else cs[j])
    return out


class StateLayout:
    """Byte layout of the persistent state buffer: params, optimizer state, constant data."""

    def __init__(self):
        self.chunks = []           # (offset, ndarray) initial contents
        self.size = 0
        self.params = []           # (name, offset, dtype, shape, trainable)
        self.opt_state = []        # (name, offset, dtype, shape)
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
        buf = np.zeros(max(align(self.size), 64), np.uint8)
        for off, v in self.chunks:
            buf[off:off + v.nbytes] = v.reshape(-1).view(np.uint8)
        return buf


class _Emitter:
    def __init__(self, kind=None, state=None):
        # for OpDef.emit hooks: the entry being lowered ("run" is inference) and the StateLayout, where an
        # op may own persistent state (ops_dropout: its step counter, saved by checkpoints)
        self.kind, self.state = kind, state
        self.code: list[int] = []
        self.consts: list[float] = []
        self._cidx: dict = {}
        self.nodes: list = []
        self.instr_nodes: list = []

    def const(self, v):
        v = float(v)
        key = np.float64(v).tobytes()
        if key not in self._cidx:
            self._cidx[key] = len(self.consts)
            self.consts.append(v)
        return self._cidx[key]

    def node(self, op, name):
        self.nodes.append((op, name))
        return len(self.nodes) - 1

    def emit(self, opname, node_id, values):
        """Append one instruction of opcode ``opname``; ``values`` maps its fields' names (format.py's
        layout) to ints, lists and records."""
        # (the fast encoder: program.compile validates the whole plan, field by field, afterwards)
        self.code += F.encode(opname, node_id, values, check=False)
        self.instr_nodes.append(node_id)


def _opnd(name, where):
    """The fields ``name.slot`` and ``name.offset`` of an operand at ``where = (slot, byte offset)``."""
    return {f"{name}.slot": where[0], f"{name}.offset": where[1]}


class _Instr:
    """A scheduled unit with what it reads and writes (for liveness)."""

    def __init__(self, kind, x):
        self.kind, self.x = kind, x
        self.reads: list[Tensor] = []
        self.writes: list[Tensor] = []
        self.imm: set = set()
        # a node with several outputs: output k's projection node, or None where nothing reads it (the
        # kernel still writes it: into scratch)
        self.outputs: list = [x]


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
                check_finite=False, simplified=False):
    """Compile the sub-graph reaching ``roots`` into an Entry.

    outputs: [(user name, tensor)] copied out after each call.  simplified: ``roots`` and ``outputs`` are
    already the result of ``passes.simplify`` over a graph that contains this one (``compile`` simplifies
    the joint graph of all entries once).  Returns (Entry, MemoryReport, summary rows).
    """
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

    present = {t.op for t in nodes}
    if "matmul" in present:
        rewrite(passes.absorb_transposes(nodes))
    if fuse:
        # (each pass sorts the graph it reads: skipped where its anchor op is absent, e.g. a graph without
        # GEMMs; 0.4 s of a 20,000-op elementwise chain)
        if "softmax_xent" in present:
            rewrite(passes.fuse_xent(passes.topo_from_roots(roots)))
        if "matmul" in present:
            rewrite(passes.fuse_epilogues(passes.topo_from_roots(roots), roots))
            rewrite(passes.fuse_relu_backward(passes.topo_from_roots(roots), roots))
            rewrite(passes.fuse_vm_epilogues(passes.topo_from_roots(roots), roots))
        if any(r.op == "sgd_update" for r in roots):  # (a topological sort costs 5 % on a 20k-op chain)
            roots = passes.fold_sgd_into_gemm(passes.topo_from_roots(roots), roots)
        if any(r.op == "adam_update" for r in roots):
            roots = passes.split_adam(passes.topo_from_roots(roots), roots)
    # after every rewrite: each in-place writer waits for all readers of the value it overwrites
    nodes, m, inplace_after = passes.order_inplace_writers(roots)
    if m:
        roots = [m.get(t, t) for t in roots]
        outputs = [(n, m.get(t, t)) for n, t in outputs]
    root_set = set(roots) | {t for _, t in outputs}
    consumers = passes.consumer_map(nodes)
    if fuse:
        group_of = _split_illegal_groups(passes.fuse(nodes), consumers, root_set)
    else:
        group_of = {t: _single_group(t) for t in nodes if passes.is_fusible(t)}
    units = passes.schedule(nodes, group_of, inplace_after)

    # ---- storage classes -------------------------------------------------------------------------
    used_inputs = [t for t in nodes if t.op == "input"]
    order = {name: k for k, (name, _, _) in enumerate(graph_inputs)}
    used_inputs.sort(key=lambda t: order[t.name])
    input_slot = {t: F.SLOT_INPUT0 + k for k, t in enumerate(used_inputs)}

    def base(t):
        while t.op == "reshape":
            t = t.inputs[0]
        return t

    instrs = []
    for kind_u, x in units:
        ins = _Instr(kind_u, x)
        if kind_u == "ew":
            members = set(x.members)
            ins.imm = _immediates(x.members)
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
    # storage keys: a reshape is a view of its input's buffer (base); every write is a buffer of its own,
    # but an elementwise output may take over the buffer of an input that dies at its instruction
    geo, steps = {}, []
    for k, ins in enumerate(instrs):
        reuse, scratch = {}, ()
        if ins.kind == "ew":
            geo[k] = _ew_geometry(ins)
            reuse = {w: c for w in ins.writes if w.op != "sum" and (c := _inplace_inputs(ins, w, base))}
            if geo[k]["mode"] == 2:
                scratch = ((f"scratch{k}", geo[k]["scratch_bytes"]),)
        else:  # outputs nothing reads: written into scratch
            scratch = tuple((f"{ins.x.name}:{j}", _nbytes(*out_specs(ins.x)[j]))
                            for j, o in enumerate(ins.outputs) if o is None)
        steps.append(Instruction([base(i) for i in ins.reads],
                                 [(w, w.name, int(w.size * np.dtype(w.dtype).itemsize)) for w in ins.writes],
                                 reuse, scratch))
    mem = plan_arena(steps, live_out=[base(t) for t in root_set])
    buffers, uniq, arena = mem.buffers, mem.unique, mem.arena_bytes
    naive += sum(align(b.nbytes) for bs in mem.scratch.values() for b in bs)  # reduction scratch
    report = MemoryReport(kind, arena, lower_bound(uniq), naive,
                          [(b.name, b.offset, b.nbytes, b.start, b.end, list(b.tensors)) for b in uniq],
                          sum(align(b.nbytes) for b in uniq))

    # ---- emission --------------------------------------------------------------------------------
    em = _Emitter(kind, state)

    def loc(t):
        """(slot, byte offset) of a tensor's storage."""
        t = base(t)
        if t.op == "input":
            return input_slot[t], 0
        if t.op == "param":
            return F.SLOT_STATE, state.where[("param", t.name)]
        if t.op == "const":
            return F.SLOT_STATE, state.alloc(("const", id(t.value), t.value.dtype.str, t.shape), t.value)
        b = buffers.get(t)
        if b is None:
            raise AssertionError(f"no storage for {t!r} (compiler bug)")
        return 0, b.offset

    summary = []
    for k, ins in enumerate(instrs):
        if ins.kind == "ew":
            scratch = mem.scratch.get(k)
            desc = _emit_ew(em, ins, geo[k], loc, scratch[0].offset if scratch else 0)
        else:
            spare = iter(mem.scratch.get(k, ()))
            outs = [loc(o) if o is not None else (0, next(spare).offset) for o in ins.outputs]
            desc = _emit_op(em, ins.x, loc, state, optimizer, outs)
        if isinstance(desc, list):  # a node lowered to several instructions (concat: one per operand)
            summary += desc
        else:
            summary.append(desc)
        if check_finite:
            # results of ops, and the params an update wrote (an update can overflow too)
            nid = em.instr_nodes[-1]
            written = list(ins.writes)
            if ins.kind == "op" and ins.x.op in ("sgd_update", "adam_update"):
                written = list(ins.x.inputs[:len(ins.x.inputs) // 2])
            elif ins.kind == "op" and ins.x.op == "sgd_gemm":
                written = [ins.x.inputs[2]]
            for w in written:
                if w.dtype in FLOAT_DTYPES and w.size and em.instr_nodes:
                    slot, off = loc(w)
                    em.emit("check_finite", nid, {"dtype": F.DTYPE_CODE[w.dtype], "n": w.size,
                                                  **_opnd("x", (slot, off))})

    entry_outs = []
    for name, t in outputs:
        slot, off = loc(t)
        entry_outs.append((name, slot, off, t.dtype, tuple(t.shape)))
    entry = Entry(np.asarray(em.code, np.int64), np.asarray(em.consts, np.float64), int(arena),
                  [(t.name, t.dtype, tuple(t.shape)) for t in used_inputs], entry_outs, em.nodes, em.instr_nodes)
    return entry, report, summary


def _group_io(members, consumers, root_set):
    """(inputs, outputs) the fused kernel of ``members`` reads and writes, as the lowering counts them:
    inputs are the outside tensors but immediates; outputs are sums, roots and members read outside."""
    ms = set(members)
    imm = _immediates(members)
    n_in = len({i for m in members for i in m.inputs if i not in ms and i not in imm})
    n_out = sum(1 for m in members
                if m.op == "sum" or m in root_set or any(c not in ms for c in consumers.get(m, ())))
    return n_in, n_out


def _fits_runtime(members, consumers, root_set):
    """Whether one OP_EW kernel over ``members`` is within the runtime's limits (format.LM_MAXIO operands
    each way, LM_MAXREG registers: inputs plus at most one per non-sum member, 4096 VM steps)."""
    n_in, n_out = _group_io(members, consumers, root_set)
    n_val = sum(1 for m in members if m.op != "sum")
    return n_in <= F.LM_MAXIO and 1 <= n_out <= F.LM_MAXIO and n_in + n_val <= F.LM_MAXREG and n_val <= 4096


def _split_illegal_groups(group_of, consumers, root_set):
    """Split every fused group the runtime could not run (too many outputs, e.g. 40 results of one input;
    too many inputs or registers) into consecutive runs of its members in source order, each as large as
    fits.  Consecutive runs of a topologically ordered member list never form a cycle: a later run cannot
    feed an earlier one.  Returns the new {node: Group}."""
    out = {}
    for g in {id(g): g for g in group_of.values()}.values():
        if _fits_runtime(g.members, consumers, root_set):
            out.update((m, g) for m in g.members)
            continue
        run = []
        for m in g.members:
            if run and not _fits_runtime(run + [m], consumers, root_set):
                _close_run(out, g, run)
                run = []
            run.append(m)
        _close_run(out, g, run)
    return out


def _close_run(out, g, run):
    h = passes.Group((g.id, run[0].id), g.shape)
    h.members = list(run)
    out.update((m, h) for m in run)


def _single_group(t):
    g = passes.Group(id(t), t.inputs[0].shape if t.op == "sum" else t.shape)
    g.members.append(t)
    return g


def _scalar_const(t):
    return t.op == "const" and t.value.size == 1 and t.dtype in FLOAT_DTYPES


def _immediates(members):
    """Scalar constants that every member of the group uses as one operand of a binary op: those become
    VM immediates (no memory read); any other use (e.g. broadcast_to(c)) reads them from memory."""
    uses = {}
    for m in members:
        for k, i in enumerate(m.inputs):
            if _scalar_const(i):
                # operand 0 of a VM step is a register: a const there is an immediate only for the
                # binary ops the lowering can swap (add/mul) or reverse (sub/div -> RSUB/RDIV)
                if k == 0:
                    ok = len(m.inputs) == 2 and m.op in ("add", "mul", "sub", "div") \
                        and not _scalar_const(m.inputs[1])
                else:
                    ok = not _scalar_const(m.inputs[0]) and REGISTRY[m.op].kind == "ew"
                uses[i] = uses.get(i, True) and ok
    return {c for c, ok in uses.items() if ok}


def _inplace_inputs(ins, w, base):
    """The inputs of fused group ``ins`` whose buffer its output ``w`` may be written over (memory.plan_arena
    takes the first whose buffer dies here and has ``w``'s size): the output's shape and dtype, read with
    exactly the output's strides (directly, not through a view) and by nobody else in this group, and
    not read by a reduction from memory at the block end (after the outputs were stored)."""
    out = []
    for i in ins.reads:
        # (inputs, params and constants live outside the arena: never a buffer to take over)
        if i.op in passes.LEAVES or base(i) is not i or i.shape != w.shape or i.dtype != w.dtype:
            continue
        if any(base(j) is i and j is not i for j in ins.reads):
            continue
        if any(m.op == "sum" and m.inputs[0] is i for m in ins.x.members):
            continue
        out.append(i)
    return out


# ---------------------------------------------------------------------------------------------------
# fused elementwise groups


def _ew_geometry(ins):
    """Iteration space, per-operand strides (collapsed), execution mode and scratch size of a group."""
    g = ins.x
    S = list(g.shape)
    ops = []  # strides per operand: inputs then outputs
    for i in ins.reads:
        ops.append(broadcast_strides(i.shape, S))
    out_kinds = []
    for w in ins.writes:
        if w.op == "sum":
            axes = set(w.attrs["axes"])
            kshape = [1 if d in axes else n for d, n in enumerate(S)]
            cs = contiguous_strides(kshape)
            ops.append([0 if d in axes else cs[d] for d in range(len(S))])
            out_kinds.append(True)
        else:
            ops.append(contiguous_strides(S))
            out_kinds.append(False)
    # drop size-1 dims, and dims no operand moves along (then every output is a reduction over them:
    # sum(broadcast_to(z)) over n copies is n * z, folded into each output's scale; the runtime refuses
    # such a dim, which would only repeat work); then merge dims that are contiguous for every operand
    red_factor = 1
    keep = []
    for d in range(len(S)):
        if S[d] > 1 and not any(s[d] for s in ops):
            red_factor *= S[d]
        elif S[d] != 1:
            keep.append(d)
    dims = [S[d] for d in keep]
    strides = [[s[d] for d in keep] for s in ops]
    k = len(dims) - 2
    while k >= 0:
        if all(s[k] == s[k + 1] * dims[k + 1] for s in strides):
            dims[k] *= dims[k + 1]
            del dims[k + 1]
            for s in strides:
                s[k] = s[k + 1]
                del s[k + 1]
        k -= 1
    if not dims:
        dims = [1]
        strides = [[0] for _ in strides]
    if len(dims) > F.LM_MAXD:
        raise NotImplementedError(f"elementwise group over {len(dims)} non-collapsible dims "
                                  f"(max {F.LM_MAXD}): {g.shape}")
    nd = len(dims)
    red = [strides[len(ins.reads) + j] for j, isr in enumerate(out_kinds) if isr]
    if not red:
        mode = 0
    elif all([d for d in range(nd) if s[d] == 0] == [nd - 1] for s in red):
        mode = 1
    else:
        mode = 2
    rows = math.prod(dims[:-1])
    items = rows * -(-dims[-1] // F.LM_BLK)
    nchunks = max(1, min(F.LM_MAXCHUNK, items))
    red_total = sum(math.prod(dims[d] for d in range(nd) if s[d] != 0) for s in red)
    isz = np.dtype(g.members[0].dtype).itemsize
    return {"dims": dims, "strides": strides, "mode": mode, "nchunks": nchunks, "red_factor": red_factor,
            "scratch_bytes": nchunks * red_total * isz}


def _vm_steps(g, ins, keep):
    """The VM program of a fused group as ``[(vm opcode, result tensor, operand tensors)]``.

    Each member (but sums, which are stores) is one step, except that a producer used exactly once, and
    neither stored nor reduced, is folded into its consumer as a superinstruction (format.VM_OPS):
    mul+add/sub -> FMA/FMS/FNMA, mul(g, sub(v, w)) -> MULSUB, relu(a +- b) -> ADDRELU/SUBRELU,
    mul(g, step(r)) -> MASK, and with g = a*b or a/b -> MULMASK/DIVMASK.  Every VM step costs one pass
    over the block in L1 (about as much as the arithmetic of a multiply): W4 drops from 17 to 9 passes.
    Operand 0 must be a register; immediates (ins.imm) may sit in operands 1 and 2 only.
    """
    members = set(g.members)
    uses = {}
    for m in g.members:
        for i in m.inputs:
            uses[i] = uses.get(i, 0) + 1
    imm = ins.imm
    absorbed, fused = set(), {}

    def free_producer(t, op):
        return (t in members and t.op == op and uses.get(t) == 1 and t not in keep and t not in absorbed
                and t not in fused)

    for m in g.members:
        if m.op == "relu":
            p = m.inputs[0]
            for op in ("add", "sub"):
                if free_producer(p, op):
                    u, v = p.inputs
                    if u in imm and op == "add":
                        u, v = v, u
                    if u not in imm:
                        absorbed.add(p)
                        fused[m] = (F.VM_OPS[op.upper() + "RELU"], (u, v))
                    break
            continue
        if len(m.inputs) != 2 or m.op not in ("add", "sub", "mul"):
            continue
        l, r = m.inputs
        pick = None
        if m.op == "mul":
            # g * step(r), and (a*b or a/b) * step(r) in one step
            for q, p in ((l, r), (r, l)):
                if not free_producer(p, "step") or q in imm:
                    continue
                for op in ("mul", "div"):
                    if free_producer(q, op) and q is not p and q.inputs[0] not in imm:
                        absorbed.update((p, q))
                        fused[m] = (F.VM_OPS[op.upper() + "MASK"], q.inputs + (p.inputs[0],))
                        break
                else:
                    absorbed.add(p)
                    fused[m] = (F.VM_OPS["MASK"], (q, p.inputs[0]))
                break
            if m in fused:
                continue
        if m.op == "add":
            for p, z in ((l, r), (r, l)):
                if free_producer(p, "mul"):
                    pick = (p, "FMA", p.inputs, z)
                    break
        elif m.op == "sub":
            if free_producer(l, "mul"):
                pick = (l, "FMS", l.inputs, r)
            elif free_producer(r, "mul"):
                pick = (r, "FNMA", r.inputs, l)
        else:
            for u, p in ((l, r), (r, l)):
                if u in imm:
                    continue
                if free_producer(p, "sub"):
                    pick = (p, "MULSUB", (u,) + p.inputs, None)
                    break
        if pick is None:
            continue
        p, vm, (u, v, *w), z = pick
        if vm in ("FMA", "FMS", "FNMA") and u in imm:
            u, v = v, u
        if u in imm:
            continue
        absorbed.add(p)
        fused[m] = (F.VM_OPS[vm], (u, v) + tuple(w) + ((z,) if z is not None else ()))

    steps = []
    for m in g.members:
        if m.op == "sum" or m in absorbed:
            continue
        if m in fused:
            steps.append((fused[m][0], m, fused[m][1]))
            continue
        vm = F.VM_OPS[REGISTRY[m.op].vm]
        ops = tuple(m.inputs)
        if len(ops) == 2 and ops[0] in imm:
            if m.op in ("add", "mul"):
                ops = ops[::-1]
            elif m.op in ("sub", "div"):
                vm, ops = F.VM_OPS["R" + m.op.upper()], ops[::-1]
        steps.append((vm, m, ops))
    return steps


def _emit_ew(em, ins, geo, loc, scratch_off):
    g = ins.x
    dtype = g.members[0].dtype if g.members[0].op != "sum" else g.members[0].inputs[0].dtype
    n_in = len(ins.reads)
    reg = {t: k for k, t in enumerate(ins.reads)}
    # outputs -- including the values reductions read -- are stored after the whole program has run
    # on a block, so their registers must never be recycled
    keep = set(ins.writes) | {m.inputs[0] for m in g.members if m.op == "sum"}
    steps = _vm_steps(g, ins, keep)
    # last use of each value inside the program, to recycle registers
    last_use = {}
    for idx, (_, _, ops) in enumerate(steps):
        for t in ops:
            last_use[t] = idx
    free, n_regs = [], n_in
    prog = []
    for idx, (vm, m, ops) in enumerate(steps):
        if free:
            dst = free.pop()
        else:
            dst, n_regs = n_regs, n_regs + 1
        fields = []
        for k, t in enumerate(ops):
            if t in ins.imm:
                assert k > 0, "an immediate in operand 0"
                fields.append(-(em.const(t.value.reshape(-1)[0]) + 1))
            else:
                fields.append(reg[t])
        fields += [0] * (3 - len(fields))
        prog.append({"op": vm, "dst": dst, "a": fields[0], "b": fields[1], "c": fields[2]})
        reg[m] = dst
        for t in dict.fromkeys(ops):  # (in operand order: a set of tensors iterates by address)
            if t not in keep and last_use.get(t) == idx and reg.get(t, -1) >= n_in:
                free.append(reg[t])
    if n_regs > F.LM_MAXREG:
        raise NotImplementedError(f"fused group needs {n_regs} registers (max {F.LM_MAXREG})")
    dims, strides = geo["dims"], geo["strides"]
    inputs = []
    for k, t in enumerate(ins.reads):
        slot, off = loc(t)
        inputs.append({"slot": slot, "offset": off, "stride": strides[k]})
    outputs = []
    for j, w in enumerate(ins.writes):
        slot, off = loc(w)
        src = reg[w.inputs[0]] if w.op == "sum" else reg[w]
        factor = w.attrs["scale"] * geo["red_factor"] if w.op == "sum" else 1.0
        outputs.append({"slot": slot, "offset": off, "stride": strides[n_in + j], "reg": src,
                        "is_reduce": 1 if w.op == "sum" else 0, "scale": em.const(factor) if factor != 1.0 else -1})
    values = {"dtype": F.DTYPE_CODE[dtype], "ndim": len(dims), "dims": dims, "n_in": n_in,
              "n_out": len(ins.writes), "n_regs": max(n_regs, 1), "n_prog": len(prog), "mode": geo["mode"],
              "nchunks": geo["nchunks"], "scratch.slot": 0, "scratch.offset": scratch_off,
              "input": inputs, "output": outputs, "prog": prog}
    names = "+".join(m.op for m in g.members)
    nid = em.node(f"fused({names})" if len(g.members) > 1 else g.members[0].op, g.members[-1].name)
    em.emit("fused_elementwise", nid, values)
    nbytes = sum(t.size * np.dtype(t.dtype).itemsize for t in ins.reads) + \
        sum(w.size * np.dtype(w.dtype).itemsize for w in ins.writes)
    flops = sum(m.size if m.op != "sum" else m.inputs[0].size for m in g.members)
    vm_names = {v: k for k, v in F.VM_OPS.items()}

    def operand(t):
        return repr(float(t.value.reshape(-1)[0])) if t in ins.imm else t.name
    program = [f"{m.name}={vm_names[vm]}({','.join(operand(t) for t in ops)})" for vm, m, ops in steps]
    return {"op": "fused_elementwise" if len(g.members) > 1 else g.members[0].op,
            "members": [f"{m.op}:{m.name}" for m in g.members], "program": program, "shape": tuple(g.shape),
            "flops": int(flops), "bytes": int(nbytes), "mode": geo["mode"]}


# ---------------------------------------------------------------------------------------------------
# everything that is not a fused elementwise group


def _nbytes(shape, dtype):
    return int(math.prod(shape) * np.dtype(dtype).itemsize)


def _emit_op(em, t, loc, state, optimizer, outs):
    """Emit node ``t``'s instruction(s); ``outs``: the (slot, offset) of each of its outputs."""
    op = t.op
    nid = em.node(op, t.name)
    if REGISTRY[op].emit is not None:
        return REGISTRY[op].emit(em, nid, t, loc, outs)
    nbytes = lambda *xs: int(sum(x.size * np.dtype(x.dtype).itemsize for x in xs))  # noqa: E731
    if op in ("matmul", "linear", "linear_ex", "sgd_gemm", "momentum_gemm"):
        return _emit_gemm(em, nid, t, loc, state, outs)
    if op == "softmax":
        ax = t.attrs["axis"]
        outer = int(np.prod(t.shape[:ax], dtype=np.int64))
        inner = int(np.prod(t.shape[ax + 1:], dtype=np.int64))
        em.emit("softmax", nid, {"dtype": F.DTYPE_CODE[t.dtype], "outer": outer, "K": t.shape[ax], "inner": inner,
                                 **_opnd("x", loc(t.inputs[0])), **_opnd("y", loc(t))})
        return {"op": op, "node": t.name, "flops": 4 * t.size, "bytes": nbytes(t, t)}
    if op in ("reduce_max", "reduce_min", "reduce_prod", "logsumexp", "argmax", "argmin", "log_softmax"):
        return _emit_reduction(em, nid, t, loc)
    if op == "softmax_xent":
        z, y = t.inputs
        em.emit("softmax_xent", nid, {"dtype": F.DTYPE_CODE[t.dtype], "B": z.shape[0], "C": z.shape[1],
                                      **_opnd("logits", loc(z)), **_opnd("labels", loc(y)),
                                      "labels.dtype": F.DTYPE_CODE[y.dtype], **_opnd("out", loc(t))})
        return {"op": op, "node": t.name, "flops": 4 * z.size, "bytes": nbytes(z, y)}
    if op == "xent_grad":
        z, y, g = t.inputs
        lo = outs[1] if t.attrs.get("with_loss") else (-1, 0)
        em.emit("xent_grad", nid, {"dtype": F.DTYPE_CODE[t.dtype], "B": z.shape[0], "C": z.shape[1],
                                   **_opnd("logits", loc(z)), **_opnd("labels", loc(y)),
                                   "labels.dtype": F.DTYPE_CODE[y.dtype], **_opnd("g", loc(g)),
                                   **_opnd("out", loc(t)), **_opnd("loss", lo)})
        return {"op": op + ("+loss" if t.attrs.get("with_loss") else ""), "node": t.name, "flops": 5 * z.size,
                "bytes": nbytes(z, y, t)}
    if op == "cast":
        x = t.inputs[0]
        em.emit("cast", nid, {"src_dtype": F.DTYPE_CODE[x.dtype], "dst_dtype": F.DTYPE_CODE[t.dtype], "n": t.size,
                              **_opnd("src", loc(x)), **_opnd("dst", loc(t))})
        return {"op": op, "node": t.name, "flops": 0, "bytes": nbytes(x, t)}
    if op in _INT_OPS:
        a, b = t.inputs
        dims = list(t.shape) or [1]
        sa = broadcast_strides(a.shape, t.shape) or [0]
        sb = broadcast_strides(b.shape, t.shape) or [0]
        em.emit("int_elementwise", nid, {"dtype": F.DTYPE_CODE[t.dtype], "op": _INT_OPS[op], "ndim": len(dims),
                                         "dims": dims, **_opnd("a", loc(a)), "a.stride": sa, **_opnd("b", loc(b)),
                                         "b.stride": sb, **_opnd("out", loc(t))})
        return {"op": op, "node": t.name, "flops": t.size, "bytes": nbytes(a, b, t)}
    if op in ops_logic.INT_KERNEL:
        # integer / bool operands (float ones are fused VM steps): comparisons write bool bytes
        a, b = t.inputs
        dims = list(t.shape) or [1]
        sa = broadcast_strides(a.shape, t.shape) or [0]
        sb = broadcast_strides(b.shape, t.shape) or [0]
        em.emit("int_elementwise", nid, {"dtype": F.DTYPE_CODE[a.dtype], "op": F.VM_OPS[ops_logic.INT_KERNEL[op]],
                                         "ndim": len(dims), "dims": dims, **_opnd("a", loc(a)), "a.stride": sa,
                                         **_opnd("b", loc(b)), "b.stride": sb, **_opnd("out", loc(t))})
        return {"op": op, "node": t.name, "flops": t.size, "bytes": nbytes(a, b, t)}
    if op in ("where", "where_select"):
        # integer / bool branches, or floats with nothing to fuse (ops_logic.lower_logic): out = cond ? a : b
        c, a, b = t.inputs
        dims = list(t.shape) or [1]
        em.emit("select", nid, {"itemsize": np.dtype(t.dtype).itemsize, "ndim": len(dims), "dims": dims,
                                **_opnd("cond", loc(c)), "cond.stride": broadcast_strides(c.shape, t.shape) or [0],
                                **_opnd("a", loc(a)), "a.stride": broadcast_strides(a.shape, t.shape) or [0],
                                **_opnd("b", loc(b)), "b.stride": broadcast_strides(b.shape, t.shape) or [0],
                                **_opnd("out", loc(t))})
        return {"op": op, "node": t.name, "flops": 0, "bytes": nbytes(c, a, b, t)}
    if op == "concat":
        out_strides = contiguous_strides(t.shape)
        ax, start, descs = t.attrs["axis"], 0, []
        slot, off = loc(t)
        for k, x in enumerate(t.inputs):
            if x.size:
                dst = (slot, off + start * out_strides[ax] * np.dtype(t.dtype).itemsize)
                _emit_copy_nd(em, em.node(op, t.name) if k else nid, t.dtype, x.shape, loc(x),
                              contiguous_strides(x.shape), dst, out_strides)
                descs.append({"op": "concat", "node": t.name, "flops": 0, "bytes": 2 * nbytes(x)})
            start += x.shape[ax]
        return descs
    if op == "broadcast_to":  # (integers and bools: floats are VM copies)
        x = t.inputs[0]
        _emit_copy_nd(em, nid, t.dtype, t.shape, loc(x), broadcast_strides(x.shape, t.shape), loc(t),
                      contiguous_strides(t.shape))
        return {"op": op, "node": t.name, "flops": 0, "bytes": 2 * nbytes(t)}
    if op == "slice":
        x = t.inputs[0]
        xs = contiguous_strides(x.shape)
        slot, off = loc(x)
        src = (slot, off + t.attrs["start"] * xs[t.attrs["axis"]] * np.dtype(t.dtype).itemsize)
        _emit_copy_nd(em, nid, t.dtype, t.shape, src, xs, loc(t), contiguous_strides(t.shape))
        return {"op": op, "node": t.name, "flops": 0, "bytes": 2 * nbytes(t)}
    if op in ("gather", "gather_grad"):
        x, idx = t.inputs
        table = x.shape if op == "gather" else t.shape   # the indexed tensor's shape
        ax = t.attrs["axis"]
        sizes = [int(np.prod(table[:ax], dtype=np.int64)), table[ax], int(np.prod(table[ax + 1:], dtype=np.int64)),
                 idx.size]
        values = dict(zip(("outer", "n", "inner", "nidx"), sizes), **_opnd("idx", loc(idx)), **_opnd("dst", loc(t)))
        if op == "gather":
            em.emit("gather", nid, {"itemsize": np.dtype(t.dtype).itemsize, **values, **_opnd("src", loc(x))})
        else:
            em.emit("scatter_add", nid, {"dtype": F.DTYPE_CODE[t.dtype], **values, **_opnd("g", loc(x))})
        return {"op": op, "node": t.name, "flops": 0 if op == "gather" else x.size, "bytes": nbytes(x, idx, t)}
    if op in ("transpose", "broadcast_to", "identity"):
        x = t.inputs[0]
        dims = list(t.shape) or [1]
        if op == "transpose":
            cs = contiguous_strides(x.shape)
            s = [cs[p] for p in t.attrs["perm"]] or [0]
        else:
            s = broadcast_strides(x.shape, t.shape) or [0]
        em.emit("strided_copy", nid, {"itemsize": np.dtype(t.dtype).itemsize, "ndim": len(dims), "dims": dims,
                                      **_opnd("src", loc(x)), "src.stride": s, **_opnd("dst", loc(t))})
        return {"op": op, "node": t.name, "flops": 0, "bytes": nbytes(x, t)}
    if op == "sgd_update":
        n = len(t.inputs) // 2
        ps, gs = t.inputs[:n], t.inputs[n:]
        recs = []
        for p, g in zip(ps, gs):
            v = _momentum_loc(state, p) if t.attrs["momentum"] else (-1, 0)
            # g slot -1: a momentum_gemm already added this param's gradient into v
            recs.append({**_opnd("p", loc(p)), **_opnd("g", loc(g) if g.op != "momentum_gemm" else (-1, 0)),
                         **_opnd("v", v), "n": p.size})
        em.emit("sgd_update", nid, {"dtype": F.DTYPE_CODE[t.dtype], "nparams": n, "lr": em.const(t.attrs["lr"]),
                                    "momentum": em.const(t.attrs["momentum"]),
                                    "weight_decay": em.const(t.attrs["weight_decay"]), "param": recs})
        return {"op": op, "node": t.name, "flops": 4 * sum(p.size for p in ps), "bytes": 3 * nbytes(*ps)}
    if op == "adam_count":  # an Adam instruction with no params: it only advances the step counter
        em.emit("adam_update", nid, {"dtype": F.DTYPE_CODE[t.dtype], "nparams": 0,
                                     **{k: em.const(0.0) for k in ("lr", "beta1", "beta2", "eps", "weight_decay")},
                                     **_opnd("step", (F.SLOT_STATE, _adam_step(state))), "param": []})
        return {"op": op, "node": t.name, "flops": 0, "bytes": 8}
    if op == "adam_update":
        n = len(t.inputs) // 2
        ps, gs = t.inputs[:n], t.inputs[n:]
        step = _adam_step(state)  # (allocated before the moments: the state layout follows allocation order)
        recs = []
        for p, g in zip(ps, gs):
            m, v = (state.opt_state_offset(f"{p.name}/{s}", p.dtype, p.shape) for s in ("exp_avg", "exp_avg_sq"))
            recs.append({**_opnd("p", loc(p)), **_opnd("g", loc(g)), **_opnd("m", (F.SLOT_STATE, m)),
                         **_opnd("v", (F.SLOT_STATE, v)), "n": p.size})
        # counted: this step's adam_count already advanced the counter (passes.split_adam)
        em.emit("adam_apply" if t.attrs.get("counted") else "adam_update", nid,
                {"dtype": F.DTYPE_CODE[t.dtype], "nparams": n,
                 **{k: em.const(t.attrs[k]) for k in ("lr", "beta1", "beta2", "eps", "weight_decay")},
                 **_opnd("step", (F.SLOT_STATE, step)), "param": recs})
        return {"op": op, "node": t.name, "flops": 10 * sum(p.size for p in ps), "bytes": 5 * nbytes(*ps)}
    raise NotImplementedError(f"no lowering for op {op!r} (node {t.name!r})")


def _emit_reduction(em, nid, t, loc):
    """The reduce / arg_reduce / log_softmax instructions: x seen as a contiguous (outer, K, inner) array
    whose middle axis (one contiguous run of x's axes, ops_reduce guarantees it) is reduced."""
    from .ops_reduce import KINDS
    x = t.inputs[0]
    axes = t.attrs["axes"] if "axes" in t.attrs else (t.attrs["axis"],)
    lo, hi = axes[0], axes[-1] + 1
    outer = int(np.prod(x.shape[:lo], dtype=np.int64))
    K = int(np.prod(x.shape[lo:hi], dtype=np.int64))
    inner = int(np.prod(x.shape[hi:], dtype=np.int64))
    base = {"dtype": F.DTYPE_CODE[x.dtype], "outer": outer, "K": K, "inner": inner,
            **_opnd("x", loc(x)), **_opnd("y", loc(t))}
    isz = np.dtype(x.dtype).itemsize
    if t.op == "log_softmax":
        em.emit("log_softmax", nid, base)
        return {"op": t.op, "node": t.name, "flops": 4 * x.size, "bytes": 2 * x.size * isz}
    if t.op in ("argmax", "argmin"):
        em.emit("arg_reduce", nid, {**base, "kind": F.ARG_REDUCE_KINDS[t.op],
                                    "select_last": int(t.attrs["select_last"])})
        return {"op": t.op, "node": t.name, "flops": x.size, "bytes": x.size * isz + 8 * t.size}
    em.emit("reduce", nid, {**base, "kind": F.REDUCE_KINDS[KINDS[t.op]]})
    return {"op": t.op, "node": t.name, "flops": (3 if t.op == "logsumexp" else 1) * x.size,
            "bytes": (x.size + t.size) * isz}


def _emit_copy_nd(em, nid, dtype, dims, src, src_strides, dst, dst_strides):
    """One OP_COPY_ND moving a ``dims``-shaped block between two strided layouts (element strides).
    Size-1 dims are dropped and dims contiguous in both layouts merged, so any rank fits LM_MAXD."""
    keep = [k for k, d in enumerate(dims) if d != 1]
    d = [dims[k] for k in keep]
    ss, ds = [src_strides[k] for k in keep], [dst_strides[k] for k in keep]
    k = len(d) - 2
    while k >= 0:
        if ss[k] == ss[k + 1] * d[k + 1] and ds[k] == ds[k + 1] * d[k + 1]:
            d[k] *= d[k + 1]
            ss[k], ds[k] = ss[k + 1], ds[k + 1]
            del d[k + 1], ss[k + 1], ds[k + 1]
        k -= 1
    if not d:
        d, ss, ds = [1], [1], [1]
    if len(d) > F.LM_MAXD:
        raise NotImplementedError(f"copy over {len(d)} non-collapsible dims (max {F.LM_MAXD}): {dims}")
    em.emit("copy_nd", nid, {"itemsize": np.dtype(dtype).itemsize, "ndim": len(d), "dims": d,
                             **_opnd("src", src), "src.stride": ss, **_opnd("dst", dst), "dst.stride": ds})


def _adam_step(state):
    """offset of Adam's float64 step counter in the state (one per program)"""
    return state.opt_state_offset("adam/step", "float64", ())


def _momentum_loc(state, p):
    """(slot, offset) of param p's momentum buffer in the state."""
    return F.SLOT_STATE, state.opt_state_offset(f"{p.name}/momentum", p.dtype, p.shape)


def _emit_gemm(em, nid, t, loc, state, outs):
    a, b = t.inputs[:2]
    ta, tb = bool(t.attrs.get("ta")), bool(t.attrs.get("tb"))
    into_state = t.op in ("sgd_gemm", "momentum_gemm")  # C is a state buffer of the param inputs[2]
    M, N = (t.inputs[2].shape if into_state else t.shape)[-2:]
    K = a.shape[-2] if ta else a.shape[-1]
    batch = list(t.shape[:-2]) if not into_state else []
    sA = broadcast_strides(a.shape[:-2], batch)
    sB = broadcast_strides(b.shape[:-2], batch)
    sC = contiguous_strides(batch)
    matA, matB = a.shape[-2] * a.shape[-1], b.shape[-2] * b.shape[-1]
    sA = [s * matA for s in sA]
    sB = [s * matB for s in sB]
    sC = [s * M * N for s in sC]
    # (..., M, K) @ (K, N) with a contiguous, untransposed A: one GEMM with M' = batch * M
    if batch and not ta and all(s == 0 for s in sB) and a.shape[:-2] == tuple(batch):
        M, batch, sA, sB, sC = M * int(np.prod(batch)), [], [], [], []
    act = t.attrs.get("act")
    epi = {}
    if t.op == "linear_ex":
        # a VM-step epilogue: operands are the auxiliary tensor (the last input) or immediates
        has_bias = t.attrs["has_bias"]
        bias = loc(t.inputs[2]) if has_bias else (-1, 0)
        aux = t.inputs[3 if has_bias else 2] if "aux" in t.attrs["operands"] else None
        mask = loc(aux) if aux is not None else (-1, 0)
        ops = [1 if o == "aux" else -(em.const(o) + 1) for o in t.attrs["operands"]]
        ops += [0] * (2 - len(ops))
        epi = {"epi.vm": F.VM_OPS[REGISTRY[t.attrs["epi"]].vm], "epi.b": ops[0], "epi.c": ops[1]}
        act_code = 3
    else:
        bias = loc(t.inputs[2]) if t.op == "linear" and act != "relu_grad" else (-1, 0)
        act_code = 1 if act == "relu" and t.op == "linear" else 2 if act == "relu_grad" else 0
        mask = loc(t.inputs[2]) if act == "relu_grad" else (-1, 0)
    names = gemm_outputs(t.attrs)
    colsum = outs[names.index("colsum")] if "colsum" in names else (-1, 0)
    if "pre" in names:  # gemm_ex_keep: C is the GEMM + bias value, the epilogue writes the node's y
        epi.update(_opnd("y", outs[0]))
    if t.op == "sgd_gemm":  # C is the param itself: p = (1 - lr*wd) p - lr * A B
        out, alpha, beta = loc(t.inputs[2]), -t.attrs["lr"], 1.0 - t.attrs["lr"] * t.attrs["weight_decay"]
    elif t.op == "momentum_gemm":  # C is the param's momentum buffer: v = momentum * v + A B
        out, alpha, beta = _momentum_loc(state, t.inputs[2]), 1.0, t.attrs["momentum"]
    else:
        out, alpha, beta = (outs[names.index("pre")] if "pre" in names else loc(t)), 1.0, 0.0
    em.emit(("gemm_ex_keep" if "pre" in names else "gemm_ex") if epi else "gemm", nid, {**epi, "dtype": F.DTYPE_CODE[t.dtype], "M": M, "N": N, "K": K, "transA": int(ta),
                          "transB": int(tb), **_opnd("A", loc(a)), **_opnd("B", loc(b)), **_opnd("C", out),
                          "alpha": em.const(alpha), "beta": em.const(beta), **_opnd("bias", bias), "act": act_code,
                          "batch_ndim": len(batch), "batch_dims": batch, "A.batch_stride": sA, "B.batch_stride": sB,
                          "C.batch_stride": sC, **_opnd("mask", mask), **_opnd("colsum", colsum)})
    nb = int(np.prod(batch)) if batch else 1
    if epi:
        return {"op": "gemm" + ("+bias" if t.attrs["has_bias"] else "") + "+" + t.attrs["epi"]
                + ("+colsum" if t.attrs.get("colsum") else "") + ("+keep" if t.attrs.get("keep") else ""),
                "node": t.name, "flops": 2 * M * N * K + M * N,
                "bytes": int(sum(x.size * np.dtype(x.dtype).itemsize for x in t.inputs + (t,))), "trans": (ta, tb)}
    return {"op": "gemm" + ("+bias" if t.op == "linear" and act != "relu_grad" else "")
            + ("+relu" if act == "relu" else "") + ("+relu'" if act == "relu_grad" else "")
            + ("+colsum" if t.attrs.get("colsum") else "")
            + ("+sgd" if t.op == "sgd_gemm" else "") + ("+momentum" if t.op == "momentum_gemm" else ""),
            "node": t.name, "flops": 2 * nb * M * N * K,
            "bytes": int(sum(x.size * np.dtype(x.dtype).itemsize for x in (a, b, t.inputs[2] if into_state else t))),
            "trans": (ta, tb)}
