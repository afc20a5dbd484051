"""The CPU backend: scheduled instructions with their storage -> one entry of the runtime's plan.

This module is the part of lowering that knows the libml runtime (``libml_runtime/format.py``: the
opcodes and their field layouts, operand slots, the register VM of OP_EW with its limits;
``libml_runtime/plan.py``: ``Entry``).  ``lower.lower_entry`` plans an entry without it (passes, fusion,
schedule, liveness, in-place reuse, arena placement) and calls the hooks of ``CPU`` (a ``CpuBackend``)
where the plan depends on what the CPU kernels can do.  (``program.compile`` assembles the entries into
the ``Plan``; op modules with their own kernel emit it through ``OpDef.emit``, below.)

What crosses the boundary, planning -> backend (``CpuBackend.emit_entry``): a ``lower.Schedule``:

* ``instrs``: the scheduled ``lower.Instr`` in execution order.  ``kind`` "ew" (``x`` a ``passes.Group``,
  members in source order) or "op" (``x`` one graph node); ``reads`` (outside tensors, in operand order,
  immediates excluded), ``writes`` (tensors stored to memory), ``imm`` (scalar constants used as VM
  immediates), ``outputs`` (of an op node: output k's node, the node itself first, then projection
  nodes or None where nothing reads one), ``layout`` (what ``ew_layout`` computed for a group while
  planning, handed back);
* ``storage`` (a ``lower.Storage``): ``where(t)`` -> ("input", k) | ("state", byte offset) | ("arena",
  byte offset) for any tensor (a view resolves to its base), ``scratch[k]``: arena offsets of instruction
  k's scratch buffers, and ``state``, the program's ``StateLayout`` (constants are placed in it the first
  time ``where`` is asked for them, optimizer state the first time an update asks ``opt_state_offset``:
  the state's layout follows the order of emission, which is part of the plan bytes);
* ``inputs`` (the graph inputs the entry reads, in feed order), ``outputs`` ([(user name, tensor)]) and
  ``arena_bytes``.

It returns the ``Entry`` (int64 code, float64 constant pool, arena size, input and output records, node
table) and the profile summary rows, one per instruction.

The other way, the hooks planning calls before memory planning (knowledge of the CPU kernels that
decides the schedule and the arena, so it must be known before emission):

* ``legal_groups``: the fused groups split to what one OP_EW kernel can run (``LM_MAXIO`` operands
  each way, ``LM_MAXREG`` registers, ``LM_MAXPROG`` VM steps).  The limits are the runtime's, but the
  split changes the instruction list that liveness and placement run over, so it is a planning step
  asking the backend (``_split_illegal_groups`` says more);
* ``immediates``: the scalar constants of a group that become VM immediates (not memory reads, so not
  in ``reads``: they take no part in liveness);
* ``inplace_inputs``: the inputs of a group whose buffer an output may overwrite (how the VM reads and
  stores a block decides it; ``memory.plan_arena`` then picks one that dies there);
* ``ew_layout``: a group's iteration space and execution mode, and the scratch bytes its reductions
  need (an arena buffer live during that instruction only).

Operands are encoded with the format's field names (``F.encode``); ``program.compile`` validates the whole
plan afterwards (``libml_runtime.plan.validate``).  An op's own emitter (``OpDef.emit``, e.g. ops_norm.py's
LayerNorm) is called as ``emit(em, node id, node, loc, outs)`` with this module's ``Emitter``, ``loc(t)`` ->
(slot, byte offset) and ``outs[k]`` the (slot, byte offset) of output k; ``operand_fields`` writes an operand.
"""
from __future__ import annotations

import math

import numpy as np
from libml_runtime import format as F
from libml_runtime.plan import Entry

from . import ops_logic, passes
from .ir import FLOAT_DTYPES
from .ops import REGISTRY, gemm_outputs
from .ir import dense_strides
from .views import View, matrix_layout as views_matrix

_INT_OPS = {"add": F.VM_OPS["ADD"], "sub": F.VM_OPS["SUB"], "mul": F.VM_OPS["MUL"], "div": F.VM_OPS["DIV"],
            "maximum": F.VM_OPS["MAX"], "minimum": F.VM_OPS["MIN"], "pow": F.VM_OPS["POW"]}


def contiguous_strides(shape):
    """ir.dense_strides as a list (plan fields are lists)."""
    return list(dense_strides(shape))


def broadcast_strides(shape, target):
    """Element strides to read a contiguous tensor of ``shape`` over the iteration space ``target``."""
    cs = contiguous_strides(shape)
    lead = len(target) - len(shape)
    out = []
    for k, d in enumerate(target):
        j = k - lead
        out.append(0 if j < 0 or shape[j] == 1 and d != 1 else cs[j])
    return out


class CpuBackend:
    """The CPU runtime as ``lower.lower_entry`` sees it: the planning hooks and the emission of an entry
    (the module docstring describes both directions)."""

    name = "cpu"

    def legal_groups(self, group_of, consumers, root_set):
        """{node: Group} with every fused group split to the OP_EW kernel's limits (``_split_illegal_groups``)."""
        return _split_illegal_groups(group_of, consumers, root_set)

    def immediates(self, members):
        """The scalar constants of a group's ``members`` that are VM immediates (``_immediates``)."""
        return _immediates(members)

    def inplace_inputs(self, ins, w, base):
        """The inputs of group instruction ``ins`` whose buffer its output ``w`` may be written over
        (``base``: planning's storage key of a tensor, a view's base)."""
        return _inplace_inputs(ins, w, base)

    def ew_layout(self, ins):
        """(layout, scratch bytes or None) of group instruction ``ins``: the layout is handed back at
        emission as ``ins.layout``; scratch is an arena buffer the kernel uses while it runs."""
        geo = _ew_geometry(ins)
        return geo, (geo["scratch_bytes"] if geo["mode"] == 2 else None)

    def emit_entry(self, sched, check_finite=False):
        """(Entry, summary rows) of ``sched`` (a ``lower.Schedule``); ``check_finite``: a check_finite
        instruction after every instruction, over each float tensor it wrote."""
        return _emit_entry(sched, check_finite)


CPU = CpuBackend()


class Emitter:
    """The plan entry being written: int64 code, the float64 constant pool (deduplicated by bit pattern) and
    the node table ((op, node name) per node id; ``instr_nodes``: the node id of each instruction)."""

    def __init__(self, kind=None, state=None):
        # for OpDef.emit hooks: the entry being lowered ("run" is inference) and the StateLayout, where an
        # op may own persistent state (ops_dropout: its step counter, saved by checkpoints)
        self.kind, self.state = kind, state
        # (slot, byte offset) of the scratch buffers the current op asked for (OpDef.scratch)
        self.scratch: list = []
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


def operand_fields(name, where):
    """The fields ``name.slot`` and ``name.offset`` of an operand at ``where = (slot, byte offset)``."""
    return {f"{name}.slot": where[0], f"{name}.offset": where[1]}


_opnd = operand_fields  # (the short name the emitters below use on every operand)


def _slot_loc(storage):
    """``loc(t)`` -> (slot, byte offset) of tensor ``t`` in the plan format, from planning's storage classes."""
    where = storage.where

    def loc(t):
        cls, k = where(t)
        if cls == "arena":
            return F.SLOT_ARENA, k
        if cls == "state":
            return F.SLOT_STATE, k
        return F.SLOT_INPUT0 + k, 0
    return loc


def _emit_entry(sched, check_finite):
    state = sched.storage.state
    em = Emitter(sched.kind, state)
    loc = _slot_loc(sched.storage)
    summary = []
    for k, ins in enumerate(sched.instrs):
        scratch = sched.storage.scratch.get(k, ())
        if ins.kind == "ew":
            desc = _emit_ew(em, ins, ins.layout, loc, scratch[0] if scratch else 0)
        else:
            spare = iter(scratch)
            outs = [loc(o) if o is not None else (F.SLOT_ARENA, next(spare)) for o in ins.outputs]
            em.scratch = [(F.SLOT_ARENA, off) for off in spare]  # OpDef.scratch buffers, in its order
            desc = _emit_op(em, ins.x, loc, state, outs)
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
            elif ins.kind == "op" and ins.x.op in ("sgd_gemm", "sgd_scatter"):
                written = [ins.x.inputs[2]]
            for w in written:
                if w.dtype in FLOAT_DTYPES and w.size and em.instr_nodes:
                    slot, off = loc(w)
                    em.emit("check_finite", nid, {"dtype": F.DTYPE_CODE[w.dtype], "n": w.size,
                                                  **_opnd("x", (slot, off))})

    entry_outs = []
    for name, t in sched.outputs:
        slot, off = loc(t)
        entry_outs.append((name, slot, off, t.dtype, tuple(t.shape)))
    entry = Entry(np.asarray(em.code, np.int64), np.asarray(em.consts, np.float64), int(sched.arena_bytes),
                  [(t.name, t.dtype, tuple(t.shape)) for t in sched.inputs], entry_outs, em.nodes, em.instr_nodes)
    return entry, summary


# ---------------------------------------------------------------------------------------------------
# planning hooks: what one OP_EW kernel can run, immediates, in-place writes


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
    each way, LM_MAXREG registers: inputs plus at most one per non-sum member, LM_MAXPROG VM steps)."""
    n_in, n_out = _group_io(members, consumers, root_set)
    n_val = sum(1 for m in members if m.op != "sum")
    return (n_in <= F.LM_MAXIO and 1 <= n_out <= F.LM_MAXIO and n_in + n_val <= F.LM_MAXREG
            and n_val <= F.LM_MAXPROG)


def _split_illegal_groups(group_of, consumers, root_set):
    """Split every fused group the runtime could not run (too many outputs, e.g. 40 results of one input;
    too many inputs or registers) into consecutive runs of its members in source order, each as large as
    fits.  Consecutive runs of a topologically ordered member list never form a cycle: a later run cannot
    feed an earlier one.  Returns the new {node: Group}.

    (Here, not in passes.fuse: the limits are the CPU runtime's plan format, LM_MAXIO and LM_MAXREG, and
    what counts as an operand depends on the VM's immediates.  It runs as planning's ``legal_groups``
    hook, before the schedule, because the split changes the instruction list that liveness and
    placement are computed over.  ``passes.fuse`` keeps its own caps, MAX_GROUP_NODES and
    MAX_GROUP_INPUTS, heuristics below these limits.)"""
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
    mul(g, step(r)) -> MASK, and with g = a*b or a/b -> MULMASK/DIVMASK, sigmoid(u*v + z) -> FMA_SIGMOID.
    Every VM step costs one pass over the block in L1 (about as much as the arithmetic of a multiply):
    W4 drops from 17 to 8 passes.
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

    # sigmoid(u * v + z) with the multiply-add's value read nowhere else: FMA_SIGMOID (the add was
    # already folded into an FMA above, members being in topological order)
    for m in g.members:
        p = m.inputs[0] if m.op == "sigmoid" else None
        if (p is not None and p in fused and fused[p][0] == F.VM_OPS["FMA"] and uses.get(p) == 1
                and p not in keep and p not in absorbed):
            absorbed.add(p)
            fused[m] = (F.VM_OPS["FMA_SIGMOID"], fused.pop(p)[1])

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


def _emit_op(em, t, loc, state, outs):
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
    if op == "sgd_scatter":  # the rows a gather read step by -lr * their gradient rows, in place in the state
        g, idx, p = t.inputs
        ax = t.attrs["axis"]
        sizes = [int(np.prod(p.shape[:ax], dtype=np.int64)), p.shape[ax], int(np.prod(p.shape[ax + 1:], dtype=np.int64)),
                 idx.size]
        em.emit("scatter_sgd", nid, {"dtype": F.DTYPE_CODE[p.dtype], **dict(zip(("outer", "n", "inner", "nidx"), sizes)),
                                     "lr": em.const(t.attrs["lr"]), **_opnd("g", loc(g)), **_opnd("idx", loc(idx)),
                                     **_opnd("p", loc(p))})
        return {"op": "scatter+sgd", "node": t.name, "flops": 2 * g.size, "bytes": 3 * nbytes(g)}
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


def _view_matrix(v):
    got = views_matrix(v)
    if got is None:
        raise ValueError(f"gemm operand view {v} has neither rows nor columns contiguous")
    return got


def _emit_gemm(em, nid, t, loc, state, outs):
    a, b = t.inputs[:2]
    ta, tb = bool(t.attrs.get("ta")), bool(t.attrs.get("tb"))
    into_state = t.op in ("sgd_gemm", "momentum_gemm")  # C is a state buffer of the param inputs[2]
    views, out_view = t.attrs.get("views") or {}, t.attrs.get("out_view")
    shape_a = views[0].shape if 0 in views else a.shape
    M, N = (t.inputs[2].shape if into_state else out_view.shape if out_view else t.shape)[-2:]
    K = shape_a[-2] if ta else shape_a[-1]
    batch = list((out_view or t).shape[:-2]) if not into_state else []
    strided = None
    if views or out_view:  # operands read / written in place (views.absorb_views): gemm_strided
        strided, locs = {}, {}
        for k, (x, flag) in enumerate(((a, "ta"), (b, "tb"))):
            v = views.get(k) or View(x.shape, 0, dense_strides(x.shape))
            flip, ld = _view_matrix(v)
            strided[f"ld{'ab'[k]}"] = ld
            if flip:
                ta, tb = (not ta, tb) if k == 0 else (ta, not tb)
            slot, off = loc(x)
            locs[k] = (slot, off + v.offset * np.dtype(t.dtype).itemsize)
            lead = len(batch) - (len(v.shape) - 2)
            strided["AB"[k]] = [0 if j < 0 or v.shape[j] == 1 else v.strides[j]
                                for j in (i - lead for i in range(len(batch)))]
        sA, sB = strided.pop("A"), strided.pop("B")
        sC = list(out_view.strides[:-2]) if out_view else [s * M * N for s in contiguous_strides(batch)]
        strided["ldc"] = out_view.strides[-2] if out_view else N
    else:
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
    alpha *= t.attrs.get("alpha", 1.0)  # (passes.fold_gemm_scales: scalar factors of A, B or the product)
    opname = ("gemm_ex_keep" if "pre" in names else "gemm_ex") if epi else "gemm_strided" if strided else "gemm"
    em.emit(opname, nid, {**epi, **(strided or {}), "dtype": F.DTYPE_CODE[t.dtype], "M": M, "N": N, "K": K, "transA": int(ta),
                          "transB": int(tb), **_opnd("A", locs[0] if strided else loc(a)),
                          **_opnd("B", locs[1] if strided else loc(b)), **_opnd("C", out),
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
