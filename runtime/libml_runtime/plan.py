"""Plans as data, and the validator that proves a plan safe to run.

A ``Plan`` is what the compiler produces and what a plan file holds: plain arrays, numbers and strings.
The kernels in ``_exec.pyx`` do no bounds checks, so ``validate`` decodes every instruction field by field
and proves that every operand (slot, byte offset, strided extent) lies inside its buffer, every opcode,
dtype, register and constant index is known, and nothing writes to a fed input.  It raises ``PlanError``
naming the field.  It runs for every plan before its first execution, compiled or loaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import math

import numpy as np

from . import conv_layout
from . import format as F


#: request slots a plan's collectives may name (allreduce_start / allreduce_wait ``req``)
MAX_REQUESTS = 4096


class PlanError(ValueError):
    """A plan (or plan file) is malformed; the message names the offending field."""


@dataclass
class Entry:
    """One instruction list: ``run``, ``grad`` or ``step``.

    inputs: [(name, dtype, shape)] fed at slots 2, 3, ... in this order.
    outputs: [(name, slot, byte offset, dtype, shape)] copied out after the call.
    nodes: [(op, node name)]; the header's node id indexes it. instr_nodes: node id per instruction.
    checked: the same entry with a finiteness check after every instruction (or None).
    """
    code: np.ndarray
    consts: np.ndarray
    arena_bytes: int
    inputs: list
    outputs: list
    nodes: list
    instr_nodes: list = field(default_factory=list)
    checked: "Entry | None" = None


@dataclass
class Plan:
    name: str
    state: np.ndarray                  # uint8: initial bytes of the persistent state buffer (slot 1)
    params: list                       # [(name, byte offset, dtype, shape, trainable)]
    opt_state: list                    # [(name, byte offset, dtype, shape)]
    graph_inputs: list                 # [(name, dtype, shape)] every input of the graph
    label_inputs: dict                 # input name -> number of classes (range-checked on feed)
    entries: dict                      # kind -> Entry
    meta: dict = field(default_factory=dict)
    # input name -> (lo, hi): fed integers (gather indices: token ids) must lie in [lo, hi), checked on feed;
    # or (format 2.3: GatherND's index tuples) ((lo, hi), ...), one range per position along the last axis
    index_inputs: dict = field(default_factory=dict)
    # (format 2.3) names of the opt_state arrays that are buffers: non-trainable model state such as BatchNorm's
    # running statistics (Executable.buffers; export_onnx writes them back), updated by the kernels owning them
    buffers: list = field(default_factory=list)


def _nbytes(dt, shape):
    return math.prod(int(d) for d in shape) * np.dtype(dt).itemsize  # Python ints: never wraps


def validate(plan: Plan):
    """Raise PlanError unless every field of ``plan`` is consistent and every instruction is in bounds."""
    _check(isinstance(plan.state, np.ndarray) and plan.state.dtype == np.uint8 and plan.state.ndim == 1,
           "state", "must be a 1-D uint8 array")
    state_bytes = plan.state.size
    for kind, what in (("params", plan.params), ("opt_state", plan.opt_state)):
        for i, rec in enumerate(what):
            name, off, dt, shape = rec[:4]
            _check_dtype(dt, f"{kind}[{i}].dtype")
            _check_shape(shape, f"{kind}[{i}].shape")
            _check(isinstance(off, (int, np.integer)) and 0 <= off and off + _nbytes(dt, shape) <= state_bytes,
                   f"{kind}[{i}].offset", f"{off} + {_nbytes(dt, shape)} bytes exceeds the state ({state_bytes})")
            _check(off % np.dtype(dt).itemsize == 0, f"{kind}[{i}].offset", "is misaligned")
    opt_names = [s[0] for s in plan.opt_state]
    for i, name in enumerate(plan.buffers):
        _check(name in opt_names, f"buffers[{i}]", f"{name!r} is not an opt_state array"[:300])
    _check(len(set(plan.buffers)) == len(plan.buffers), "buffers", "names repeat")
    inputs = {}
    for i, (name, dt, shape) in enumerate(plan.graph_inputs):
        _check(isinstance(name, str) and name, f"graph_inputs[{i}].name", "must be a non-empty string")
        _check_dtype(dt, f"graph_inputs[{i}].dtype")
        _check_shape(shape, f"graph_inputs[{i}].shape")
        inputs[name] = (dt, tuple(shape))
    for name, c in plan.label_inputs.items():
        _check(name in inputs and isinstance(c, (int, np.integer)) and c > 0, f"label_inputs[{name!r}]",
               "must name an input and a positive class count")
    for name, rng in plan.index_inputs.items():
        _check(name in inputs and np.dtype(inputs[name][0]).kind in "iu", f"index_inputs[{name!r}]",
               "must name an integer input")
        # one range [lo, hi) for every element, or (format 2.3) one per position along the input's last axis
        per = isinstance(rng, (tuple, list)) and len(rng) > 0 and all(isinstance(r, (tuple, list)) for r in rng)
        parts = rng if per else [rng]
        _check(all(isinstance(r, (tuple, list)) and len(r) == 2 and all(isinstance(v, (int, np.integer)) for v in r)
                   and -2 ** 62 <= r[0] < r[1] <= 2 ** 62 for r in parts), f"index_inputs[{name!r}]",
               "must be a range [lo, hi) or a list of ranges, one per position along the input's last axis")
        _check(not per or (len(inputs[name][1]) > 0 and len(rng) == inputs[name][1][-1]), f"index_inputs[{name!r}]",
               f"has {len(parts)} ranges for the last axis of shape {inputs[name][1]}")
    for kind, e in plan.entries.items():
        _check(kind in ("run", "grad", "step"), "entries", f"unknown entry {kind!r}")
        validate_entry(e, state_bytes, inputs, f"entries[{kind!r}]")
        if kind == "step":  # Executable.step returns this output as the loss
            _check(any(o[0] == "loss" and o[3] in ("float32", "float64") and tuple(o[4]) == () for o in e.outputs),
                   f"entries['step'].outputs", "has no floating scalar output named 'loss'")
        if e.checked is not None:
            validate_entry(e.checked, state_bytes, inputs, f"entries[{kind!r}].checked")


def validate_entry(e: Entry, state_bytes, inputs, where):
    _check(isinstance(e.code, np.ndarray) and e.code.dtype == np.int64 and e.code.ndim == 1,
           f"{where}.code", "must be a 1-D int64 array")
    _check(isinstance(e.consts, np.ndarray) and e.consts.dtype == np.float64 and e.consts.ndim == 1,
           f"{where}.consts", "must be a 1-D float64 array")
    _check(isinstance(e.arena_bytes, (int, np.integer)) and 0 <= e.arena_bytes < 2 ** 40,
           f"{where}.arena_bytes", "out of range")
    sizes = [int(e.arena_bytes), state_bytes]
    for i, (name, dt, shape) in enumerate(e.inputs):
        _check(name in inputs and inputs[name] == (dt, tuple(shape)), f"{where}.inputs[{i}]",
               f"{name!r} does not match the graph inputs")
        sizes.append(_nbytes(dt, shape))
    for i, (name, slot, off, dt, shape) in enumerate(e.outputs):
        _check_dtype(dt, f"{where}.outputs[{i}].dtype")
        _check_shape(shape, f"{where}.outputs[{i}].shape")
        _check(isinstance(slot, (int, np.integer)) and 0 <= slot < len(sizes), f"{where}.outputs[{i}].slot",
               f"{slot} is not a buffer")
        _check(isinstance(off, (int, np.integer)) and off >= 0 and off + _nbytes(dt, shape) <= sizes[slot],
               f"{where}.outputs[{i}].offset", "is outside its buffer")
    _check(all(isinstance(n, (tuple, list)) and len(n) == 2 and all(isinstance(s, str) for s in n)
               for n in e.nodes), f"{where}.nodes", "must be (op, name) string pairs")
    v = _Decoder(e.code, len(e.consts), sizes, len(e.nodes), where)
    count = 0
    while v.pc < len(e.code):
        v.instruction()
        count += 1
    _check(not v.pending, f"{where}.code", f"allreduce request(s) {sorted(v.pending)} started and never waited for")
    _check(len(e.instr_nodes) == count and all(0 <= n < max(len(e.nodes), 1) for n in e.instr_nodes),
           f"{where}.instr_nodes", "does not match the instructions")


def _check(cond, fld, msg):
    if not cond:
        raise PlanError(f"invalid plan field {fld}: {msg}")


def _check_dtype(dt, fld):
    _check(isinstance(dt, str) and dt in F.DTYPES, fld, f"unknown dtype {dt!r}")


def _check_shape(shape, fld):
    _check(isinstance(shape, (tuple, list)) and len(shape) <= 32
           and all(isinstance(d, (int, np.integer)) and 0 <= d < 2 ** 40 for d in shape), fld,
           f"bad shape {shape!r}")
    _check(math.prod([int(d) for d in shape]) < 2 ** 40, fld, "is too large")


class _Decoder:
    """Walks the code array; decodes every instruction by its layout (format.py), then proves each field
    in range and every operand extent in bounds.  Fields are read by name."""

    def __init__(self, code, nconsts, sizes, nnodes, where):
        # a list of Python ints: indexing an ndarray element by element was a fifth of validation's time
        self.code = code.tolist()
        self.nconsts, self.sizes, self.nnodes, self.where = nconsts, sizes, nnodes, where
        self.nslots = len(sizes)
        self.pc = 0
        self.idx = 0
        self.pending = {}  # request slot -> instruction index of its allreduce_start, until its wait

    def fail(self, msg):
        raise PlanError(f"invalid plan field {self.where}.code[instruction {self.idx} @ {self.pc}]: {msg}")

    def instruction(self):
        c = self.code
        if self.pc + F.HEADER > len(c):
            self.fail("truncated header")
        op, ln, node = c[self.pc], c[self.pc + 1], c[self.pc + 2]
        if op not in F.OP_NAMES:
            self.fail(f"unknown opcode {op}")
        if ln < F.HEADER or self.pc + ln > len(c):
            self.fail(f"length {ln} is outside the code")
        if not 0 <= node < max(self.nnodes, 1):
            self.fail(f"node id {node} is out of range")
        name = F.OP_NAMES[op]
        try:
            d, end = F.LAYOUTS[name].decode(c, self.pc + F.HEADER, self.pc + ln)
        except ValueError as e:
            self.fail(f"{name}: {e}")
        if end != self.pc + ln:
            self.fail(f"length {ln} does not match the fields ({end - self.pc})")
        getattr(self, "op_" + name)(d)
        self.pc += ln
        self.idx += 1

    # -- field checks ------------------------------------------------------------------------------
    def rng(self, what, x, lo, hi):
        if not lo <= x <= hi:
            self.fail(f"{what} = {x} is outside [{lo}, {hi}]")
        return x

    def fields(self, d, spec):
        """Check scalar fields: ``spec`` = [(name, lo, hi)]."""
        for name, lo, hi in spec:
            if not lo <= d[name] <= hi:
                self.fail(f"{name} = {d[name]} is outside [{lo}, {hi}]")

    def fdtype(self, d, name="dtype"):
        return F.ITEMSIZE[self.rng(name, d[name], 0, 1)]

    def slot_off(self, what, slot, off, optional=False):
        self.rng(f"{what}.slot", slot, -1 if optional else 0, self.nslots - 1)
        self.rng(f"{what}.offset", off, 0, 2 ** 50)
        return slot, off

    def operand(self, d, what, nbytes, writable=False, align=1, optional=False):
        """The operand ``what`` (fields what.slot, what.offset) holds ``nbytes`` inside its buffer."""
        slot, off = self.slot_off(what, d[f"{what}.slot"], d[f"{what}.offset"], optional)
        if slot < 0:
            return slot, off
        if writable and slot >= F.SLOT_INPUT0:
            self.fail(f"{what} writes into a fed input")
        if nbytes > 0 and off + nbytes > self.sizes[slot]:
            self.fail(f"{what} spans bytes [{off}, {off + nbytes}) outside buffer {slot} of {self.sizes[slot]} bytes")
        if off % align:
            self.fail(f"{what} offset {off} is not aligned to {align}")
        return slot, off

    def strided(self, what, slot, off, strides, isz, dims, writable=False):
        """A strided operand (element strides): the whole footprint is in bounds."""
        self.slot_off(what, slot, off)
        for i, st in enumerate(strides):
            self.rng(f"{what}.stride[{i}]", st, 0, 2 ** 40)
        if writable and slot >= F.SLOT_INPUT0:
            self.fail(f"{what} writes into a fed input")
        if all(n > 0 for n in dims):
            last = off + isz * (sum((n - 1) * st for n, st in zip(dims, strides)) + 1)
            if last > self.sizes[slot]:
                self.fail(f"{what} reaches byte {last} outside buffer {slot} of {self.sizes[slot]} bytes")
        if off % isz:
            self.fail(f"{what} offset {off} is not aligned to {isz}")
        return strides

    def strided_of(self, d, what, isz, dims, writable=False):
        """``strided`` for the operand named ``what`` in a decoded instruction (what.slot, what.offset,
        what.stride), as ``operand`` reads a plain one."""
        return self.strided(what, d[f"{what}.slot"], d[f"{what}.offset"], d[f"{what}.stride"], isz, dims, writable)

    def dims(self, what, dims):
        for i, n in enumerate(dims):
            self.rng(f"{what}[{i}]", n, 0, 2 ** 40)
        if math.prod(dims) >= 2 ** 40:
            self.fail(f"{what} {dims} is too large")
        return dims

    def const(self, d, name):
        return self.rng(name, d[name], 0, self.nconsts - 1)

    # -- one method per opcode ------------------------------------------------------------------------
    def op_fused_elementwise(self, d):
        isz = self.fdtype(d)
        nd = self.rng("ndim", d["ndim"], 1, F.LM_MAXD)
        dims = self.dims("dims", d["dims"])
        n_in = self.rng("n_in", d["n_in"], 0, F.LM_MAXIO)
        n_out = self.rng("n_out", d["n_out"], 1, F.LM_MAXIO)
        n_regs = self.rng("n_regs", d["n_regs"], max(n_in, 1), F.LM_MAXREG)
        self.rng("n_prog", d["n_prog"], 0, F.LM_MAXPROG)
        mode = self.rng("mode", d["mode"], 0, 2)
        nchunks = self.rng("nchunks", d["nchunks"], 1, F.LM_MAXCHUNK)
        self.rng("scratch.slot", d["scratch.slot"], 0, 0)
        scratch_off = self.rng("scratch.offset", d["scratch.offset"], 0, 2 ** 50)
        in_strides = [self.strided(f"input[{i}]", r["slot"], r["offset"], r["stride"], isz, dims)
                      for i, r in enumerate(d["input"])]
        red_total = 0
        outs, out_strides = [], []
        for i, r in enumerate(d["output"]):
            s = self.strided(f"output[{i}]", r["slot"], r["offset"], r["stride"], isz, dims, writable=True)
            out_strides.append(s)
            slot, off = r["slot"], r["offset"]
            self.rng(f"output[{i}].reg", r["reg"], 0, n_regs - 1)
            red = self.rng(f"output[{i}].is_reduce", r["is_reduce"], 0, 1)
            self.rng(f"output[{i}].scale", r["scale"], -1, self.nconsts - 1)
            if not red and s[-1] != 1 and dims[-1] > 1:
                self.fail(f"output[{i}] must be contiguous along the innermost dim")
            if red:
                zero_dims = [k for k in range(nd) if s[k] == 0]
                if mode == 1 and zero_dims != [nd - 1]:
                    self.fail(f"output[{i}] reduces over more than the innermost dim in mode 1")
                numel = math.prod([dims[k] for k in range(nd) if s[k] != 0])
                red_total += numel
                # an empty iteration space still writes the reduction's zeros: numel elements
                if off + numel * isz > self.sizes[slot]:
                    self.fail(f"output[{i}] ({numel} reduced elements) is outside buffer {slot}")
            outs.append(red)
        for i, (red, s) in enumerate(zip(outs, out_strides)):
            # the kernels index a plain output (and a reduce output's partial sums, mode 2) as a dense
            # row-major array over the dims it keeps: anything else would write outside the scratch
            kept = [k for k in range(nd) if not red or s[k] != 0]
            for k in kept:
                want = math.prod([dims[j] for j in kept if j > k])
                if dims[k] > 1 and s[k] != want:
                    self.fail(f"output[{i}].stride[{k}] = {s[k]} is not the dense stride {want}")
        for k in range(nd):
            # a dim no operand moves along would only repeat work (a fuzzed size there is a hang)
            if dims[k] > 1 and not any(st[k] for st in in_strides + out_strides):
                self.fail(f"dims[{k}] = {dims[k]} is broadcast in every operand")
        if scratch_off % isz:
            self.fail(f"scratch offset {scratch_off} is not aligned to {isz}")
        if mode == 0 and any(outs):
            self.fail("mode 0 instruction has reduce outputs")
        if mode != 0 and not any(outs):
            self.fail(f"mode {mode} instruction has no reduce outputs")
        nvm = len(F.VM_ARITY)
        for i, st in enumerate(d["prog"]):
            vop = st["op"]
            if vop not in F.VM_ARITY:
                self.fail(f"prog[{i}].op = {vop} is not a VM opcode (0..{nvm - 1})")
            self.rng(f"prog[{i}].dst", st["dst"], n_in, n_regs - 1)
            self.rng(f"prog[{i}].a", st["a"], 0, n_regs - 1)
            arity = F.VM_ARITY[vop]
            # a mask operand is always a register (the kernels read it as one); other b/c may be immediates
            mask = F.VM_MASK_OPERAND.get(vop)
            b_imm = arity >= 2 and mask != 1
            c_imm = arity >= 3 and mask != 2
            self.rng(f"prog[{i}].b", st["b"], -self.nconsts if b_imm else 0, n_regs - 1)
            self.rng(f"prog[{i}].c", st["c"], -self.nconsts if c_imm else 0, n_regs - 1)
        if mode == 2:
            need = scratch_off + nchunks * red_total * isz
            if need > self.sizes[0]:
                self.fail(f"scratch [{scratch_off}, {need}) is outside the arena")

    def op_gemm_ex(self, d):
        """gemm with a VM-step epilogue (act 3): epi.vm's operands b, c are 0 (unused), 1 (the mask
        operand, an array of C's shape) or an immediate; a mask operand of the VM op is never immediate."""
        self.op_gemm(d, ex=True)
        vm = d["epi.vm"]
        if vm not in F.VM_ARITY:
            self.fail(f"epi.vm = {vm} is not a VM opcode")
        arity, mask_at = F.VM_ARITY[vm], F.VM_MASK_OPERAND.get(vm)
        aux = False
        for k, nm in ((1, "epi.b"), (2, "epi.c")):
            v = self.rng(nm, d[nm], -self.nconsts, 1)
            if k >= arity and v != 0:
                self.fail(f"{nm} = {v}: VM opcode {vm} takes {arity} operand(s)")
            if k < arity and v == 0:
                self.fail(f"{nm} is unused but VM opcode {vm} reads it")
            if mask_at == k and v != 1:
                self.fail(f"{nm} is a mask operand: it must be the auxiliary array (1)")
            aux = aux or v == 1
        if aux != (d["mask.slot"] >= 0):
            self.fail("the auxiliary operand (mask) must be present exactly when epi.b or epi.c reads it")

    def op_gemm_ex_keep(self, d):
        """gemm_ex whose epilogue writes to y (C's dense layout), C keeping the GEMM + bias value."""
        self.op_gemm_ex(d)
        isz = F.ITEMSIZE[d["dtype"]]
        self.operand(d, "y", d["M"] * d["N"] * math.prod(d["batch_dims"]) * isz, writable=True, align=isz)

    def op_gemm_strided(self, d):
        """gemm over views: lda/ldb/ldc at least the row length of the stored matrices; every operand
        inside its buffer over all batch entries; C's elements pairwise distinct (the batch entries run on
        different threads); a C that is not dense only with the plain or relu epilogue (act 0 / 1)."""
        self.op_gemm(d, strided=True)
        isz = F.ITEMSIZE[d["dtype"]]
        M, N, K, ta, tb, bd = d["M"], d["N"], d["K"], d["transA"], d["transB"], d["batch_dims"]
        rows = {"A": (K, M) if ta else (M, K), "B": (N, K) if tb else (K, N), "C": (M, N)}
        for x in "ABC":
            r, c = rows[x]
            ld = self.rng(f"ld{x.lower()}", d[f"ld{x.lower()}"], max(1, c), 2 ** 31 - 1)
            if not (M and N and all(bd)) or r * c == 0:
                continue
            last = sum((k - 1) * st for k, st in zip(bd, d[f"{x}.batch_stride"])) + (r - 1) * ld + c
            slot = d[f"{x}.slot"]
            if d[f"{x}.offset"] + isz * last > self.sizes[slot]:
                self.fail(f"{x} is outside its buffer")
            rows[x] = (r, c, ld)
        dense = d["ldc"] == N and all(bd[i] <= 1 or d["C.batch_stride"][i] == M * N * math.prod(bd[i + 1:])
                                      for i in range(len(bd)))
        if not dense and (d["act"] > 1 or d["mask.slot"] >= 0 or d["colsum.slot"] >= 0):
            self.fail("a strided C takes no mask, column sums or VM epilogue")
        # C's elements are distinct iff, its dims sorted by stride, each stride is at least the extent of
        # the dims below it (a race between batch entries otherwise, and results would depend on threads)
        dims = sorted((st, n) for st, n in zip([1, d["ldc"]] + list(d["C.batch_stride"]), [N, M] + list(bd))
                      if n > 1)
        extent = 1
        for st, n in dims:
            if st < extent:
                self.fail("C's batch strides and ldc make its elements overlap")
            extent = st * (n - 1) + extent

    def op_gemm(self, d, ex=False, strided=False):
        isz = self.fdtype(d)
        self.fields(d, [("M", 0, 2 ** 31 - 1), ("N", 0, 2 ** 31 - 1), ("K", 0, 2 ** 31 - 1), ("transA", 0, 1),
                        ("transB", 0, 1), ("act", 3, 3) if ex else ("act", 0, 2), ("batch_ndim", 0, F.LM_MAXD)])
        M, N, K, bdim, act = d["M"], d["N"], d["K"], d["batch_ndim"], d["act"]
        a = self.operand(d, "A", 0, align=isz)
        b = self.operand(d, "B", 0, align=isz)
        cc = self.operand(d, "C", 0, writable=True, align=isz)
        self.const(d, "alpha")
        self.const(d, "beta")
        bslot, boff = self.slot_off("bias", d["bias.slot"], d["bias.offset"], optional=True)
        bd = self.dims("batch_dims", d["batch_dims"])
        sa, sb, sc = (d[f"{x}.batch_stride"] for x in "ABC")
        for x, ss in zip("ABC", (sa, sb, sc)):
            for i, st in enumerate(ss):
                self.rng(f"{x}.batch_stride[{i}]", st, 0, 2 ** 40)
        mslot, moff = self.slot_off("mask", d["mask.slot"], d["mask.offset"], optional=True)
        cslot, coff = self.slot_off("colsum", d["colsum.slot"], d["colsum.offset"], optional=True)
        if act == 2 and (mslot < 0 or bdim or bslot >= 0):
            self.fail("the relu-backward epilogue (act 2) needs a mask, no bias and no batch dims")
        if act < 2 and mslot >= 0:
            self.fail("a mask operand exists only with the act 2 and act 3 epilogues")
        if act == 3 and (mslot >= 0 or cslot >= 0) and bdim:
            self.fail("an epilogue with an auxiliary operand or column sums needs no batch dims")
        if cslot >= 0 and act < 2:
            self.fail("column sums exist only with the backward epilogues (act 2, 3)")
        if mslot >= 0 and (moff + M * N * isz > self.sizes[mslot] or moff % isz):
            self.fail("mask is outside its buffer or misaligned")
        if cslot >= 0 and (cslot >= F.SLOT_INPUT0 or coff + N * isz > self.sizes[cslot] or coff % isz):
            self.fail("colsum is outside its buffer, misaligned or not writable")
        if bslot >= 0 and (boff + N * isz > self.sizes[bslot] or boff % isz):
            self.fail("bias is outside its buffer or misaligned")
        for i in range(bdim if not strided else 0):
            # C is dense (the bias/activation epilogue walks it as nbatch*M rows of N)
            want = M * N * math.prod(bd[i + 1:])
            if bd[i] > 1 and sc[i] != want:
                self.fail(f"C.batch_stride[{i}] = {sc[i]} is not the dense stride {want}")
        if M and N and all(bd) and not strided:  # (op_gemm_strided checks the extents with the ld fields)
            def last(strides, n):
                return sum((k - 1) * st for k, st in zip(bd, strides)) + n
            for nm, (slot, off), strides, n in (("A", a, sa, M * K), ("B", b, sb, K * N), ("C", cc, sc, M * N)):
                if n and off + isz * last(strides, n) > self.sizes[slot]:
                    self.fail(f"{nm} is outside its buffer")

    def op_softmax(self, d):
        isz = self.fdtype(d)
        n = math.prod(self.dims("dims", [d["outer"], d["K"], d["inner"]]))
        self.operand(d, "x", n * isz, align=isz)
        self.operand(d, "y", n * isz, writable=True, align=isz)

    def _labels(self, d, B):
        slot, off = self.slot_off("labels", d["labels.slot"], d["labels.offset"])
        ldt = self.rng("labels.dtype", d["labels.dtype"], 2, F.DTYPE_CODE["uint64"])  # the integers
        if off + B * F.ITEMSIZE[ldt] > self.sizes[slot] or off % F.ITEMSIZE[ldt]:
            self.fail("labels are outside their buffer")

    def op_softmax_masked(self, d):
        """x, y contiguous (dims); the mask strided over dims (zero strides broadcast); fill a constant."""
        isz = self.fdtype(d)
        self.rng("mode", d["mode"], 0, 2)
        self.rng("ndim", d["ndim"], 1, F.LM_MAXD)
        dims = self.dims("dims", d["dims"])
        if len(d["m.stride"]) != len(dims):
            self.fail("m.stride needs one stride per dim")
        n = math.prod(dims)
        self.operand(d, "x", n * isz, align=isz)
        self.strided_of(d, "m", isz, dims)
        self.const(d, "fill")
        self.operand(d, "y", n * isz, writable=True, align=isz)

    def op_softmax_xent(self, d):
        isz = self.fdtype(d)
        self.fields(d, [("B", 1, 2 ** 40), ("C", 1, 2 ** 40)])
        B, C = d["B"], d["C"]
        self.operand(d, "logits", B * C * isz, align=isz)
        self._labels(d, B)
        self.operand(d, "out", isz, writable=True, align=isz)

    def op_xent_grad(self, d):
        isz = self.fdtype(d)
        self.fields(d, [("B", 1, 2 ** 40), ("C", 1, 2 ** 40)])
        B, C = d["B"], d["C"]
        self.operand(d, "logits", B * C * isz, align=isz)
        self._labels(d, B)
        self.operand(d, "g", isz, align=isz)
        self.operand(d, "out", B * C * isz, writable=True, align=isz)
        self.operand(d, "loss", isz, writable=True, align=isz, optional=True)

    def op_cast(self, d):
        nt = len(F.DTYPES) - 1
        self.fields(d, [("src_dtype", 0, nt), ("dst_dtype", 0, nt), ("n", 0, 2 ** 40)])
        si, di = F.ITEMSIZE[d["src_dtype"]], F.ITEMSIZE[d["dst_dtype"]]
        self.operand(d, "src", d["n"] * si, align=si)
        self.operand(d, "dst", d["n"] * di, writable=True, align=di)

    #: the integer kernel's ops (VM codes); comparisons write one bool byte per element
    INT_OPS = {F.VM_OPS[k] for k in ("ADD", "SUB", "MUL", "DIV", "FMOD", "MOD", "AND", "OR", "XOR", "MAX", "MIN",
                                     "POW")}
    INT_CMP_OPS = {F.VM_OPS[k] for k in ("EQ", "LT", "LE", "GT", "GE")}

    def op_int_elementwise(self, d):
        self.fields(d, [("dtype", 2, len(F.DTYPES) - 1), ("ndim", 0, F.LM_MAXD)])
        if d["op"] not in self.INT_OPS | self.INT_CMP_OPS:
            self.fail(f"op = {d['op']} is not an integer kernel op")
        dims = self.dims("dims", d["dims"])
        isz = F.ITEMSIZE[d["dtype"]]
        osz = 1 if d["op"] in self.INT_CMP_OPS else isz
        self.strided_of(d, "a", isz, dims)
        self.strided_of(d, "b", isz, dims)
        self.operand(d, "out", math.prod(dims) * osz, writable=True, align=osz)

    def op_select(self, d):
        isz = self._itemsize(d)
        self.rng("ndim", d["ndim"], 0, F.LM_MAXD)
        dims = self.dims("dims", d["dims"])
        self.strided_of(d, "cond", 1, dims)
        self.strided_of(d, "a", isz, dims)
        self.strided_of(d, "b", isz, dims)
        self.operand(d, "out", math.prod(dims) * isz, writable=True, align=isz)

    def op_copy(self, d):
        n = self.rng("nbytes", d["nbytes"], 0, 2 ** 40)
        self.operand(d, "src", n)
        self.operand(d, "dst", n, writable=True)

    def _itemsize(self, d):
        isz = self.rng("itemsize", d["itemsize"], 1, 8)
        if isz not in (1, 2, 4, 8):
            self.fail(f"itemsize {isz} is not 1, 2, 4 or 8")
        return isz

    def op_strided_copy(self, d):
        isz = self._itemsize(d)
        self.rng("ndim", d["ndim"], 0, F.LM_MAXD)
        dims = self.dims("dims", d["dims"])
        self.strided_of(d, "src", isz, dims)
        self.operand(d, "dst", math.prod(dims) * isz, writable=True, align=isz)

    def op_copy_nd(self, d):
        isz = self._itemsize(d)
        self.rng("ndim", d["ndim"], 0, F.LM_MAXD)
        dims = self.dims("dims", d["dims"])
        self.strided_of(d, "src", isz, dims)
        self.strided_of(d, "dst", isz, dims, writable=True)

    def op_gather(self, d):
        self._indexed(d, self._itemsize(d), "src", gather=True)

    def op_scatter_add(self, d):
        self._indexed(d, self.fdtype(d), "g", gather=False)

    def op_scatter_sgd(self, d):
        """the rows of p that idx names step by -lr * g: g (outer, nidx, inner) read, p (outer, n, inner) written
        in place (the state); index values are data, checked by the kernel before it writes"""
        isz = self.fdtype(d)
        outer, n, inner, nidx = self.dims("sizes", [d["outer"], d["n"], d["inner"], d["nidx"]])
        self.const(d, "lr")
        self.operand(d, "g", outer * nidx * inner * isz, align=isz)
        self.operand(d, "idx", nidx * 8, align=8)
        self.operand(d, "p", outer * n * inner * isz, writable=True, align=isz)

    def _indexed(self, d, isz, src, gather):
        """gather reads n rows per outer index and writes nidx, scatter_add the reverse.  Extents are
        proven here; index values are checked by the kernels as they read them (they are data)."""
        outer, n, inner, nidx = self.dims("sizes", [d["outer"], d["n"], d["inner"], d["nidx"]])
        rows_in, rows_out = (n, nidx) if gather else (nidx, n)
        self.operand(d, src, outer * rows_in * inner * isz, align=isz)
        self.operand(d, "idx", nidx * 8, align=8)
        self.operand(d, "dst", outer * rows_out * inner * isz, writable=True, align=isz)

    def op_index_flat(self, d):
        """format 2.3: k int64 indices per position of pos_dims in, one int64 per position out.  The values
        written are data (a later gather / scatter_add checks them against its table), but their arithmetic
        is bounded here so it cannot overflow int64 (whatever the indices hold)."""
        k = self.rng("k", d["k"], 1, 32)
        self.rng("ndim", d["ndim"], 0, 32)
        dims = self.dims("dims", d["dims"])
        mult = [self.rng(f"mult[{j}]", m, 0, 2 ** 40) for j, m in enumerate(d["mult"])]
        pos = self.dims("pos_dims", d["pos_dims"])
        strides = [self.rng(f"pos_strides[{i}]", st, 0, 2 ** 40) for i, st in enumerate(d["pos_strides"])]
        if any(n < 1 for n in dims):
            self.fail(f"dims {dims}: every indexed dim must have at least one element")
        top = sum((n - 1) * m for n, m in zip(dims, mult)) + sum(max(n - 1, 0) * st for n, st in zip(pos, strides))
        if top >= 2 ** 62:
            self.fail("the largest flat position exceeds 2^62")
        rows = math.prod(pos)
        self.operand(d, "idx", rows * k * 8, align=8)
        self.operand(d, "out", rows * 8, writable=True, align=8)

    def op_sgd_update(self, d):
        isz = self.fdtype(d)
        self.rng("nparams", d["nparams"], 0, 1 << 20)
        for nm in ("lr", "momentum", "weight_decay"):
            self.const(d, nm)
        for i, r in enumerate(d["param"]):
            p = self.slot_off(f"p[{i}]", r["p.slot"], r["p.offset"])
            g = self.slot_off(f"g[{i}]", r["g.slot"], r["g.offset"], optional=True)
            v = self.slot_off(f"v[{i}]", r["v.slot"], r["v.offset"], optional=True)
            if g[0] < 0 and v[0] < 0:
                self.fail(f"g[{i}] is absent (slot -1) without a momentum buffer to hold the gradient")
            n = self.rng(f"n[{i}]", r["n"], 0, 2 ** 40)
            for nm, (slot, off), w in (("p", p, True), ("g", g, False), ("v", v, True)):
                if slot < 0:
                    continue
                if (w and slot >= F.SLOT_INPUT0) or off + n * isz > self.sizes[slot] or off % isz:
                    self.fail(f"{nm}[{i}] is outside its buffer or not writable")

    def op_adam_update(self, d):
        isz = self.fdtype(d)
        self.rng("nparams", d["nparams"], 0, 1 << 20)
        for nm in ("lr", "beta1", "beta2", "eps", "weight_decay"):
            self.const(d, nm)
        self.operand(d, "step", 8, writable=True, align=8)
        for i, r in enumerate(d["param"]):
            ops = [self.slot_off(f"{nm}[{i}]", r[f"{nm}.slot"], r[f"{nm}.offset"]) for nm in ("p", "g", "m", "v")]
            n = self.rng(f"n[{i}]", r["n"], 0, 2 ** 40)
            for nm, (slot, off) in zip(("p", "g", "m", "v"), ops):
                if (nm != "g" and slot >= F.SLOT_INPUT0) or off + n * isz > self.sizes[slot] or off % isz:
                    self.fail(f"{nm}[{i}] is outside its buffer or not writable")

    op_adam_apply = op_adam_update  # same fields; it only reads the step counter

    def op_check_finite(self, d):
        isz = self.fdtype(d)
        n = self.rng("n", d["n"], 0, 2 ** 40)
        self.operand(d, "x", n * isz, align=isz)

    # -- reductions over the middle axis of (outer, K, inner) -----------------------------------------
    def _reduce_extents(self, d, out_isz):
        isz = self.fdtype(d)
        outer, K, inner = self.dims("dims", [d["outer"], d["K"], d["inner"]])
        self.operand(d, "x", outer * K * inner * isz, align=isz)
        self.operand(d, "y", outer * inner * (out_isz or isz), writable=True, align=out_isz or isz)
        return K

    def op_reduce(self, d):
        self.rng("kind", d["kind"], 0, len(F.REDUCE_KINDS) - 1)
        self._reduce_extents(d, None)

    def op_arg_reduce(self, d):
        self.rng("kind", d["kind"], 0, len(F.ARG_REDUCE_KINDS) - 1)
        self.rng("select_last", d["select_last"], 0, 1)
        # an arg-extremum over nothing has no answer (the compiler refuses it; a plan must too)
        if self._reduce_extents(d, 8) == 0 and d["outer"] * d["inner"] > 0:
            self.fail("K = 0: arg_reduce over an empty axis")

    def op_layer_norm(self, d):
        isz = self.fdtype(d)
        self.fields(d, [("outer", 0, 2 ** 40), ("n", 1, 2 ** 40)])
        rows, n = self.dims("dims", [d["outer"], d["n"]])
        self.const(d, "eps")
        self.operand(d, "x", rows * n * isz, align=isz)
        self.operand(d, "scale", n * isz, align=isz)
        self.operand(d, "bias", n * isz, align=isz)
        self.operand(d, "y", rows * n * isz, writable=True, align=isz)
        self.operand(d, "mean", rows * isz, writable=True, align=isz)
        self.operand(d, "rstd", rows * isz, writable=True, align=isz)

    def op_layer_norm_grad(self, d):
        isz = self.fdtype(d)
        self.fields(d, [("outer", 0, 2 ** 40), ("n", 1, 2 ** 40)])
        rows, n = self.dims("dims", [d["outer"], d["n"]])
        for nm, count, w in (("x", rows * n, False), ("scale", n, False), ("mean", rows, False),
                             ("rstd", rows, False), ("dy", rows * n, False), ("dx", rows * n, True),
                             ("dscale", n, True), ("dbias", n, True)):
            self.operand(d, nm, count * isz, writable=w, align=isz)

    def op_rms_norm(self, d):
        isz = self.fdtype(d)
        self.fields(d, [("outer", 0, 2 ** 40), ("n", 1, 2 ** 40)])
        rows, n = self.dims("dims", [d["outer"], d["n"]])
        self.const(d, "eps")
        for nm, count, w in (("x", rows * n, False), ("scale", n, False), ("y", rows * n, True), ("rstd", rows, True)):
            self.operand(d, nm, count * isz, writable=w, align=isz)

    def op_rms_norm_grad(self, d):
        isz = self.fdtype(d)
        self.fields(d, [("outer", 0, 2 ** 40), ("n", 1, 2 ** 40)])
        rows, n = self.dims("dims", [d["outer"], d["n"]])
        for nm, count, w in (("x", rows * n, False), ("scale", n, False), ("rstd", rows, False),
                             ("dy", rows * n, False), ("dx", rows * n, True), ("dscale", n, True)):
            self.operand(d, nm, count * isz, writable=w, align=isz)

    def op_log_softmax(self, d):
        isz = self.fdtype(d)
        n = math.prod(self.dims("dims", [d["outer"], d["K"], d["inner"]]))
        self.operand(d, "x", n * isz, align=isz)
        self.operand(d, "y", n * isz, writable=True, align=isz)

    def op_dropout(self, d):
        """y = x * mask over n elements; p and scale are constants (the kernel refuses a p outside [0, 1]),
        seed any int64 (the key's bits), step an int64 read from its operand."""
        isz = self.fdtype(d)
        n = self.rng("n", d["n"], 0, 2 ** 40)
        self.const(d, "p")
        self.const(d, "scale")
        self.operand(d, "step", 8, align=8)
        self.operand(d, "x", n * isz, align=isz)
        self.operand(d, "y", n * isz, writable=True, align=isz)

    # -- format 2.3: convolution (ops_conv.py).  The kernels read x only at coordinates they have checked
    # against H and W (padding is never stored), so the extents below bound every access.
    def _conv_geometry(self, d, op):
        """(itemsize, Kc, scratch elements per slot) after checking the shared geometry fields (algo 1:
        the tiled path's slot, conv_layout.tiles, which `panel` must hold)."""
        isz = self.fdtype(d)
        big = 2 ** 31 - 1  # BLAS takes int dimensions
        self.fields(d, [("N", 0, big), ("C", 1, big), ("H", 1, big), ("W", 1, big), ("M", 1, big),
                        ("G", 1, big), ("kh", 1, big), ("kw", 1, big), ("sh", 1, big), ("sw", 1, big),
                        ("ph", 0, big), ("pw", 0, big), ("dh", 1, big), ("dw", 1, big), ("OH", 1, big),
                        ("OW", 1, big), ("panel", 1, big), ("nslots", 1, 64), ("algo", 0, 2), ("rb", 1, big)])
        if d["C"] % d["G"] or d["M"] % d["G"]:
            self.fail(f"group {d['G']} does not divide C = {d['C']} and M = {d['M']}")
        self.dims("conv sizes", [d["N"], d["C"], d["H"], d["W"]])
        self.dims("conv sizes", [d["N"], d["M"], d["OH"], d["OW"]])
        kc = d["C"] // d["G"] * d["kh"] * d["kw"]
        if kc >= 2 ** 31 or d["OH"] * d["OW"] >= 2 ** 31:
            self.fail(f"conv panel dimensions Kc = {kc}, OH*OW = {d['OH'] * d['OW']} exceed BLAS's int range")
        if d["algo"] == 2:
            if op != "conv":
                self.fail(f"algo 2 (the channel-vector forward) is for conv only, not {op}")
            if d["rb"] > d["OH"]:
                self.fail(f"rb = {d['rb']} is more than the output rows")
            need = conv_layout.ocv(d, isz, d["rb"])["slot"]
            if d["panel"] < need or d["panel"] % 16:
                self.fail(f"panel = {d['panel']}: algo 2's scratch slot needs {need} elements (a multiple of 16)")
            return isz, kc, d["panel"]
        if d["algo"] == 1:
            if d["rb"] > conv_layout.rows(op, d):
                self.fail(f"rb = {d['rb']} is more than the output rows")
            need = conv_layout.tiles(op, d, isz, d["rb"])["slot"]
            if d["panel"] < need or d["panel"] % 16:
                self.fail(f"panel = {d['panel']}: algo 1's scratch slot needs {need} elements (a multiple of 16)")
            return isz, kc, d["panel"]
        if d["panel"] > d["OH"] * d["OW"]:
            self.fail(f"panel = {d['panel']} is larger than OH*OW = {d['OH'] * d['OW']}")
        slot = (kc * d["panel"] + 15) // 16 * 16
        return isz, kc, slot

    def _conv_scratch(self, d, isz, kc, slot, extra=0, op="conv"):
        direct = d["G"] > 1 and d["C"] == d["G"]
        if direct:
            n = extra
        elif d["algo"] == 2:
            n = conv_layout.ocv_scratch_elements(d, isz, d["rb"], d["nslots"], slot)
        elif d["algo"] == 1:
            n = conv_layout.scratch_elements(op, d, isz, d["rb"], d["nslots"], slot, d.get("nchunks", 1),
                                             bool(d.get("sgd", 0)))
        else:
            n = d["nslots"] * slot + extra
        self.operand(d, "scratch", n * isz, writable=True, align=isz)

    def op_conv(self, d):
        """act 0 none, 1 relu, 3 the VM step epi.vm with immediate (or unused) operands only; optional
        per-channel b and scale; pre (optional) of y's size, and only with an activation."""
        isz, kc, slot = self._conv_geometry(d, "conv")
        act = self.rng("act", d["act"], 0, 3)
        if act == 2:
            self.fail("act = 2 is not a conv epilogue (0 none, 1 relu, 3 a VM step)")
        if act == 3:
            vm = d["epi.vm"]
            if vm not in F.VM_ARITY:
                self.fail(f"epi.vm = {vm} is not a VM opcode")
            arity = F.VM_ARITY[vm]
            if vm in F.VM_MASK_OPERAND:
                self.fail(f"epi.vm = {vm} takes a mask operand: a conv epilogue has only immediates")
            for k, nm in ((1, "epi.b"), (2, "epi.c")):
                v = self.rng(nm, d[nm], -self.nconsts, 0)
                if k >= arity and v != 0:
                    self.fail(f"{nm} = {v}: VM opcode {vm} takes {arity} operand(s)")
                if k < arity and v == 0:
                    self.fail(f"{nm} is unused but VM opcode {vm} reads it")
        ny = d["N"] * d["M"] * d["OH"] * d["OW"] * isz
        self.operand(d, "x", d["N"] * d["C"] * d["H"] * d["W"] * isz, align=isz)
        self.operand(d, "w", d["M"] * kc * isz, align=isz)
        self.operand(d, "b", d["M"] * isz, align=isz, optional=True)
        self.operand(d, "scale", d["M"] * isz, align=isz, optional=True)
        ys = self.operand(d, "y", ny, writable=True, align=isz)
        pre = self.operand(d, "pre", ny, writable=True, align=isz, optional=True)
        if pre[0] >= 0 and act == 0:
            self.fail("pre (the kept pre-activation) needs an activation (act 1 or 3)")
        res = self.operand(d, "res", ny, align=isz, optional=True)
        # (the kernel writes y / pre before it reads the residual: a shared byte would read a new value)
        for what, (s, o) in (("y", ys), ("pre", pre)):
            if res[0] >= 0 and s == res[0] and o < res[1] + ny and res[1] < o + ny:
                self.fail(f"res overlaps {what}: the residual must be a buffer of its own")
        self._conv_scratch(d, isz, kc, slot)

    def op_conv_shortcut(self, d):
        """conv's fields and checks (the scratch slot with the shortcut's channels, conv_layout), then
        x2 (N, C2, H2, W2) read at (oh * s2h, ow * s2w) inside it, w2 (M, C2); G = 1, algo 1 or 2, no
        res (the shortcut takes its place)."""
        big = 2 ** 31 - 1
        self.fields(d, [("C2", 1, big), ("H2", 1, big), ("W2", 1, big), ("s2h", 1, big), ("s2w", 1, big)])
        if d["G"] != 1:
            self.fail(f"conv_shortcut needs group 1, got G = {d['G']}")
        if d["algo"] not in (1, 2):
            self.fail(f"conv_shortcut runs the tiled kernels (algo 1 or 2), not algo {d['algo']}")
        if d["res.slot"] >= 0:
            self.fail("conv_shortcut has no residual operand: res.slot must be -1")
        if (d["OH"] - 1) * d["s2h"] >= d["H2"] or (d["OW"] - 1) * d["s2w"] >= d["W2"]:
            self.fail(f"shortcut input {d['H2']}x{d['W2']} at strides ({d['s2h']}, {d['s2w']}) does not cover "
                      f"the {d['OH']}x{d['OW']} output")
        self.dims("conv_shortcut sizes", [d["N"], d["C2"], d["H2"], d["W2"]])
        isz = self.fdtype(d)
        self.op_conv(d)
        self.operand(d, "x2", d["N"] * d["C2"] * d["H2"] * d["W2"] * isz, align=isz)
        self.operand(d, "w2", d["M"] * d["C2"] * isz, align=isz)

    def op_conv_grad_input(self, d):
        isz, kc, slot = self._conv_geometry(d, "conv_grad_input")
        self.fields(d, [("cblock", 1, d["C"] // d["G"])])
        self.operand(d, "w", d["M"] * kc * isz, align=isz)
        self.operand(d, "dy", d["N"] * d["M"] * d["OH"] * d["OW"] * isz, align=isz)
        self.operand(d, "dx", d["N"] * d["C"] * d["H"] * d["W"] * isz, writable=True, align=isz)
        self._conv_scratch(d, isz, kc, slot, op="conv_grad_input")

    def op_conv_grad_weight(self, d):
        """sgd 1: dw is the param updated in place (lr, weight_decay constants); the direct path then sums
        the gradient into M * Kc elements of scratch."""
        isz, kc, slot = self._conv_geometry(d, "conv_grad_weight")
        self.fields(d, [("nchunks", 1, 64), ("sgd", 0, 1)])
        if d["sgd"]:
            self.const(d, "lr")
            self.const(d, "weight_decay")
        self.operand(d, "x", d["N"] * d["C"] * d["H"] * d["W"] * isz, align=isz)
        self.operand(d, "dy", d["N"] * d["M"] * d["OH"] * d["OW"] * isz, align=isz)
        self.operand(d, "dw", d["M"] * kc * isz, writable=True, align=isz)
        direct = d["G"] > 1 and d["C"] == d["G"]
        if direct:
            self.operand(d, "scratch", d["M"] * kc * isz if d["sgd"] else 0, writable=True, align=isz)
        else:
            self._conv_scratch(d, isz, kc, slot, d["nchunks"] * d["M"] * kc, "conv_grad_weight")

    # -- format 2.3: pooling (ops_pool.py): reads are at coordinates checked against H and W
    def _pool_geometry(self, d):
        isz = self.fdtype(d)
        big = 2 ** 31 - 1
        self.fields(d, [("N", 0, big), ("C", 0, big), ("H", 1, big), ("W", 1, big), ("kh", 1, big), ("kw", 1, big),
                        ("sh", 1, big), ("sw", 1, big), ("ph", 0, big), ("pw", 0, big), ("eh", 0, big), ("ew", 0, big),
                        ("dh", 1, big), ("dw", 1, big), ("OH", 1, big), ("OW", 1, big)])
        self.dims("pool sizes", [d["N"], d["C"], d["H"], d["W"]])
        self.dims("pool sizes", [d["N"], d["C"], d["OH"], d["OW"]])
        return isz, d["N"] * d["C"] * d["H"] * d["W"], d["N"] * d["C"] * d["OH"] * d["OW"]

    def op_max_pool(self, d):
        isz, nx, ny = self._pool_geometry(d)
        self.fields(d, [("order", 0, 1)])
        self.operand(d, "x", nx * isz, align=isz)
        self.operand(d, "y", ny * isz, writable=True, align=isz)
        self.operand(d, "idx", ny * 8, writable=True, align=8)

    def op_max_pool_grad(self, d):
        """idx is data: the kernel checks each index against its output's plane (ERR_INDEX)."""
        isz, nx, ny = self._pool_geometry(d)
        self.fields(d, [("order", 0, 1)])
        self.operand(d, "dy", ny * isz, align=isz)
        self.operand(d, "idx", ny * 8, align=8)
        self.operand(d, "dx", nx * isz, writable=True, align=isz)

    def op_avg_pool(self, d):
        isz, nx, ny = self._pool_geometry(d)
        self.fields(d, [("include_pad", 0, 1)])
        self.operand(d, "x", nx * isz, align=isz)
        self.operand(d, "y", ny * isz, writable=True, align=isz)

    def op_avg_pool_grad(self, d):
        isz, nx, ny = self._pool_geometry(d)
        self.fields(d, [("include_pad", 0, 1)])
        self.operand(d, "dy", ny * isz, align=isz)
        self.operand(d, "dx", nx * isz, writable=True, align=isz)
    # -- format 2.3: resize (ops_resize.py): the tables' indices are data in the constant pool, which
    # the kernel checks against H and W before it writes (ERR_INDEX); here their extent and the operands
    def _resize_geometry(self, d):
        isz = self.fdtype(d)
        big = 2 ** 31 - 1
        self.fields(d, [("P", 0, big), ("H", 1, big), ("W", 1, big), ("OH", 1, big), ("OW", 1, big), ("kh", 1, 4096),
                        ("kw", 1, 4096), ("extrap", -1, self.nconsts - 1)])
        self.dims("resize sizes", [d["P"], d["H"], d["W"]])
        self.dims("resize sizes", [d["P"], d["OH"], d["OW"]])
        n = 2 * (d["OH"] * d["kh"] + d["OW"] * d["kw"])
        self.rng("tab", d["tab"], 0, self.nconsts - n)
        return isz, d["P"] * d["H"] * d["W"], d["P"] * d["OH"] * d["OW"]

    def op_resize(self, d):
        isz, nx, ny = self._resize_geometry(d)
        self.operand(d, "x", nx * isz, align=isz)
        self.operand(d, "y", ny * isz, writable=True, align=isz)

    def op_resize_grad(self, d):
        isz, nx, ny = self._resize_geometry(d)
        self.operand(d, "dy", ny * isz, align=isz)
        self.operand(d, "dx", nx * isz, writable=True, align=isz)

    def op_batch_norm(self, d):
        """x, y (N, C, S); scale, bias, the running statistics rmean / rvar, mean, rstd, nmean, nvar (C).
        flags: bit 0 writes nmean / nvar over rmean / rvar (then both must be writable), bit 1 the unbiased
        running variance, bit 2 the fused ReLU."""
        isz = self.fdtype(d)
        self.fields(d, [("flags", 0, 7)])
        N, C, S = self.dims("dims", [d["N"], d["C"], d["S"]])
        self.const(d, "eps")
        self.const(d, "momentum")
        upd = bool(d["flags"] & 1)
        for nm, count, w in (("x", N * C * S, False), ("scale", C, False), ("bias", C, False),
                             ("rmean", C, upd), ("rvar", C, upd), ("y", N * C * S, True), ("mean", C, True),
                             ("rstd", C, True), ("nmean", C, True), ("nvar", C, True)):
            self.operand(d, nm, count * isz, writable=w, align=isz)

    def op_batch_norm_grad(self, d):
        isz = self.fdtype(d)
        self.fields(d, [("flags", 0, 7)])
        N, C, S = self.dims("dims", [d["N"], d["C"], d["S"]])
        for nm, count, w in (("x", N * C * S, False), ("scale", C, False), ("mean", C, False),
                             ("rstd", C, False), ("dy", N * C * S, False), ("y", N * C * S, False),
                             ("dx", N * C * S, True), ("dscale", C, True), ("dbias", C, True)):
            self.operand(d, nm, count * isz, writable=w, align=isz)

    # -- collectives (format.py 66-67): MPI reads and writes the bucket behind the runtime's back between a
    # start and its wait, so the bucket's extent is proved here and the pairing of starts and waits too
    def _collective(self, d, src_or_dst, writable):
        isz = self.fdtype(d)
        self.rng("req", d["req"], 0, MAX_REQUESTS - 1)
        n = self.rng("n", d["n"], 0, 2 ** 31 - 1)
        self.rng("nparts", d["nparts"], 1, 1 << 20)
        self.operand(d, "buf", n * isz, writable=True, align=isz)
        total = 0
        for i, r in enumerate(d["part"]):
            k = self.rng(f"part[{i}].n", r["n"], 0, 2 ** 31 - 1)
            self.operand({f"{src_or_dst}.slot": r[f"{src_or_dst}.slot"], f"{src_or_dst}.offset": r[f"{src_or_dst}.offset"]},
                         src_or_dst, k * isz, writable=writable, align=isz)
            total += k
        if total != n:
            self.fail(f"the parts hold {total} elements, n = {n}")

    def op_allreduce_start(self, d):
        self._collective(d, "src", False)
        if d["req"] in self.pending:
            self.fail(f"request {d['req']} starts again before the wait of its start at instruction "
                      f"{self.pending[d['req']]}")
        self.pending[d["req"]] = self.idx

    def op_allreduce_wait(self, d):
        self._collective(d, "dst", True)
        self.const(d, "scale")
        if d["req"] not in self.pending:
            self.fail(f"request {d['req']} is waited for without a start before it")
        del self.pending[d["req"]]

    def op_counter_next(self, d):
        """out = counter; counter += 1: both int64 scalars, both written."""
        self.operand(d, "counter", 8, writable=True, align=8)
        self.operand(d, "out", 8, writable=True, align=8)
