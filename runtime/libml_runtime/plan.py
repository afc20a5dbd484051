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

from . import format as F


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
    inputs = {}
    for i, (name, dt, shape) in enumerate(plan.graph_inputs):
        _check(isinstance(name, str) and name, f"graph_inputs[{i}].name", "must be a non-empty string")
        _check_dtype(dt, f"graph_inputs[{i}].dtype")
        _check_shape(shape, f"graph_inputs[{i}].shape")
        inputs[name] = (dt, tuple(shape))
    for name, c in plan.label_inputs.items():
        _check(name in inputs and isinstance(c, (int, np.integer)) and c > 0, f"label_inputs[{name!r}]",
               "must name an input and a positive class count")
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
    """Walks the code array; every read is checked, every operand extent proven in bounds."""

    def __init__(self, code, nconsts, sizes, nnodes, where):
        # a list of Python ints: indexing an ndarray element by element was a fifth of validation's time
        self.code = code.tolist()
        self.nconsts, self.sizes, self.nnodes, self.where = nconsts, sizes, nnodes, where
        self.pc = 0
        self.end = 0
        self.idx = 0

    def fail(self, msg):
        raise PlanError(f"invalid plan field {self.where}.code[instruction {self.idx} @ {self.pc}]: {msg}")

    def take(self, what, lo=None, hi=None):
        if self.pos >= self.end:
            self.fail(f"truncated while reading {what}")
        x = self.code[self.pos]
        self.pos += 1
        if (lo is not None and x < lo) or (hi is not None and x > hi):
            self.fail(f"{what} = {x} is outside [{lo}, {hi}]")
        return x

    def operand(self, what, nbytes, writable=False, align=1):
        v = self._fields(2, 2 ** 50)
        if v is not None and v[0] < len(self.sizes):
            slot, off = v
        else:
            if v is not None:
                self.pos -= 2
            slot = self.take(f"{what}.slot", 0, len(self.sizes) - 1)
            off = self.take(f"{what}.offset", 0, 2 ** 50)
        if writable and slot >= F.SLOT_INPUT0:
            self.fail(f"{what} writes into a fed input")
        if nbytes > 0 and off + nbytes > self.sizes[slot]:
            self.fail(f"{what} spans bytes [{off}, {off + nbytes}) outside buffer {slot} of {self.sizes[slot]} bytes")
        if off % align:
            self.fail(f"{what} offset {off} is not aligned to {align}")
        return slot, off

    def _fields(self, n, hi):
        """The next ``n`` fields if they are all in the code and in [0, hi], else None (the caller then
        reads them one by one with ``take``, which names the first bad one).  Validation reads millions
        of fields for a large program: one slice and min/max instead of a call per field."""
        p = self.pos
        if p + n > self.end:
            return None
        v = self.code[p:p + n]
        if n and (min(v) < 0 or max(v) > hi):
            return None
        self.pos = p + n
        return v

    def strided(self, what, isz, dims, writable=False):
        """slot off strides[ndim] (elements): proves the whole strided footprint in bounds."""
        v = self._fields(2 + len(dims), 2 ** 40)
        if v is not None and v[0] < len(self.sizes):
            slot, off, strides = v[0], v[1], v[2:]
        else:
            if v is not None:
                self.pos -= len(v)
            slot = self.take(f"{what}.slot", 0, len(self.sizes) - 1)
            off = self.take(f"{what}.offset", 0, 2 ** 50)
            strides = [self.take(f"{what}.stride[{i}]", 0, 2 ** 40) for i in range(len(dims))]
        if writable and slot >= F.SLOT_INPUT0:
            self.fail(f"{what} writes into a fed input")
        if all(d > 0 for d in dims):
            last = off + isz * (sum((d - 1) * s for d, s in zip(dims, strides)) + 1)
            if last > self.sizes[slot]:
                self.fail(f"{what} reaches byte {last} outside buffer {slot} of {self.sizes[slot]} bytes")
        if off % isz:
            self.fail(f"{what} offset {off} is not aligned to {isz}")
        return strides

    def const(self, what):
        return self.take(what, 0, self.nconsts - 1)

    def dims(self, what, n):
        d = self._fields(n, 2 ** 40)
        if d is None:
            d = [self.take(f"{what}[{i}]", 0, 2 ** 40) for i in range(n)]
        if math.prod(d) >= 2 ** 40:
            self.fail(f"{what} {d} is too large")
        return d

    def instruction(self):
        c = self.code
        if self.pc + F.HEADER > len(c):
            self.fail("truncated header")
        op, ln, node = int(c[self.pc]), int(c[self.pc + 1]), int(c[self.pc + 2])
        if op not in F.OP_NAMES:
            self.fail(f"unknown opcode {op}")
        if ln < F.HEADER or self.pc + ln > len(c):
            self.fail(f"length {ln} is outside the code")
        if not 0 <= node < max(self.nnodes, 1):
            self.fail(f"node id {node} is out of range")
        self.pos, self.end = self.pc + F.HEADER, self.pc + ln
        getattr(self, "op_" + F.OP_NAMES[op])()
        if self.pos != self.end:
            self.fail(f"length {ln} does not match the fields ({self.pos - self.pc})")
        self.pc += ln
        self.idx += 1

    def fdtype(self):
        return F.ITEMSIZE[self.take("dtype", 0, 1)]

    def op_fused_elementwise(self):
        isz = self.fdtype()
        nd = self.take("ndim", 1, F.LM_MAXD)
        dims = self.dims("dims", nd)
        n_in = self.take("n_in", 0, F.LM_MAXIO)
        n_out = self.take("n_out", 1, F.LM_MAXIO)
        n_regs = self.take("n_regs", max(n_in, 1), F.LM_MAXREG)
        n_prog = self.take("n_prog", 0, 4096)
        mode = self.take("mode", 0, 2)
        nchunks = self.take("nchunks", 1, F.LM_MAXCHUNK)
        self.take("scratch.slot", 0, 0)
        scratch_off = self.take("scratch.offset", 0, 2 ** 50)
        in_strides = [self.strided(f"input[{i}]", isz, dims) for i in range(n_in)]
        red_total = 0
        outs = []
        out_strides = []
        for i in range(n_out):
            at = self.pos
            s = self.strided(f"output[{i}]", isz, dims, writable=True)
            out_strides.append(s)
            slot, off = int(self.code[at]), int(self.code[at + 1])
            reg = self.take(f"output[{i}].reg", 0, n_regs - 1)
            red = self.take(f"output[{i}].is_reduce", 0, 1)
            sc = self.take(f"output[{i}].scale", -1, self.nconsts - 1)
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
        for i in range(n_prog):
            vop = self.take(f"prog[{i}].op", 0, len(F.VM_OPS) - 1)
            self.take(f"prog[{i}].dst", n_in, n_regs - 1)
            self.take(f"prog[{i}].a", 0, n_regs - 1)
            arity = F.VM_ARITY[vop]
            # a mask operand (b of MASK, c of MULMASK/DIVMASK) is always a register (the kernels read it as one)
            b_imm = arity >= 2 and vop != F.VM_OPS["MASK"]
            self.take(f"prog[{i}].b", -self.nconsts if b_imm else 0, n_regs - 1)
            c_imm = arity >= 3 and vop not in (F.VM_OPS["MULMASK"], F.VM_OPS["DIVMASK"])
            self.take(f"prog[{i}].c", -self.nconsts if c_imm else 0, n_regs - 1)
        if mode == 2:
            need = scratch_off + nchunks * red_total * isz
            if need > self.sizes[0]:
                self.fail(f"scratch [{scratch_off}, {need}) is outside the arena")

    def op_gemm(self):
        isz = self.fdtype()
        M, N, K = (self.take(x, 0, 2 ** 31 - 1) for x in ("M", "N", "K"))
        ta, tb = self.take("transA", 0, 1), self.take("transB", 0, 1)
        a = self.operand("A", 0, align=isz)
        b = self.operand("B", 0, align=isz)
        cc = self.operand("C", 0, writable=True, align=isz)
        self.const("alpha")
        self.const("beta")
        bslot = self.take("bias.slot", -1, len(self.sizes) - 1)
        boff = self.take("bias.offset", 0, 2 ** 50)
        act = self.take("act", 0, 2)
        bdim = self.take("batch_ndim", 0, F.LM_MAXD)
        bd = self.dims("batch_dims", bdim)
        sa = [self.take(f"A.batch_stride[{i}]", 0, 2 ** 40) for i in range(bdim)]
        sb = [self.take(f"B.batch_stride[{i}]", 0, 2 ** 40) for i in range(bdim)]
        sc = [self.take(f"C.batch_stride[{i}]", 0, 2 ** 40) for i in range(bdim)]
        mslot = self.take("mask.slot", -1, len(self.sizes) - 1)
        moff = self.take("mask.offset", 0, 2 ** 50)
        cslot = self.take("colsum.slot", -1, len(self.sizes) - 1)
        coff = self.take("colsum.offset", 0, 2 ** 50)
        if (act == 2) != (mslot >= 0) or (act == 2 and (bdim or bslot >= 0)):
            self.fail("the relu-backward epilogue (act 2) needs a mask, no bias and no batch dims")
        if cslot >= 0 and act != 2:
            self.fail("column sums exist only with the relu-backward epilogue")
        if mslot >= 0 and (moff + M * N * isz > self.sizes[mslot] or moff % isz):
            self.fail("mask is outside its buffer or misaligned")
        if cslot >= 0 and (cslot >= F.SLOT_INPUT0 or coff + N * isz > self.sizes[cslot] or coff % isz):
            self.fail("colsum is outside its buffer, misaligned or not writable")
        if bslot >= 0 and (boff + N * isz > self.sizes[bslot] or boff % isz):
            self.fail("bias is outside its buffer or misaligned")
        for i in range(bdim):
            # C is dense (the bias/activation epilogue walks it as nbatch*M rows of N)
            want = M * N * math.prod(bd[i + 1:])
            if bd[i] > 1 and sc[i] != want:
                self.fail(f"C.batch_stride[{i}] = {sc[i]} is not the dense stride {want}")
        if M and N and all(bd):
            def last(strides, n):
                return sum((d - 1) * s for d, s in zip(bd, strides)) + n
            for nm, (slot, off), strides, n in (("A", a, sa, M * K), ("B", b, sb, K * N), ("C", cc, sc, M * N)):
                if n and off + isz * last(strides, n) > self.sizes[slot]:
                    self.fail(f"{nm} is outside its buffer")

    def op_softmax(self):
        isz = self.fdtype()
        n = math.prod(self.dims("dims", 3))
        self.operand("x", n * isz, align=isz)
        self.operand("y", n * isz, writable=True, align=isz)

    def _labels(self, B):
        slot = self.take("labels.slot", 0, len(self.sizes) - 1)
        off = self.take("labels.offset", 0, 2 ** 50)
        ldt = self.take("labels.dtype", 2, len(F.DTYPES) - 1)
        if off + B * F.ITEMSIZE[ldt] > self.sizes[slot] or off % F.ITEMSIZE[ldt]:
            self.fail("labels are outside their buffer")

    def op_softmax_xent(self):
        isz = self.fdtype()
        B, C = self.take("B", 1, 2 ** 40), self.take("C", 1, 2 ** 40)
        self.operand("logits", B * C * isz, align=isz)
        self._labels(B)
        self.operand("out", isz, writable=True, align=isz)

    def op_xent_grad(self):
        isz = self.fdtype()
        B, C = self.take("B", 1, 2 ** 40), self.take("C", 1, 2 ** 40)
        self.operand("logits", B * C * isz, align=isz)
        self._labels(B)
        self.operand("g", isz, align=isz)
        self.operand("out", B * C * isz, writable=True, align=isz)
        slot = self.take("loss.slot", -1, len(self.sizes) - 1)
        off = self.take("loss.offset", 0, 2 ** 50)
        if slot >= 0 and (slot >= F.SLOT_INPUT0 or off + isz > self.sizes[slot] or off % isz):
            self.fail("loss is outside its buffer or not writable")

    def op_cast(self):
        s, d = self.take("src_dtype", 0, len(F.DTYPES) - 1), self.take("dst_dtype", 0, len(F.DTYPES) - 1)
        n = self.take("n", 0, 2 ** 40)
        self.operand("src", n * F.ITEMSIZE[s], align=F.ITEMSIZE[s])
        self.operand("dst", n * F.ITEMSIZE[d], writable=True, align=F.ITEMSIZE[d])

    def op_int_elementwise(self):
        dt = self.take("dtype", 2, len(F.DTYPES) - 1)
        self.take("op", 1, 4)
        nd = self.take("ndim", 0, F.LM_MAXD)
        dims = self.dims("dims", nd)
        isz = F.ITEMSIZE[dt]
        self.strided("a", isz, dims)
        self.strided("b", isz, dims)
        n = math.prod(dims)
        self.operand("out", n * isz, writable=True, align=isz)

    def op_copy(self):
        n = self.take("nbytes", 0, 2 ** 40)
        self.operand("src", n)
        self.operand("dst", n, writable=True)

    def op_strided_copy(self):
        isz = self._itemsize()
        nd = self.take("ndim", 0, F.LM_MAXD)
        dims = self.dims("dims", nd)
        self.strided("src", isz, dims)
        self.operand("dst", math.prod(dims) * isz, writable=True, align=isz)

    def _itemsize(self):
        isz = self.take("itemsize", 1, 8)
        if isz not in (1, 2, 4, 8):
            self.fail(f"itemsize {isz} is not 1, 2, 4 or 8")
        return isz

    def op_copy_nd(self):
        isz = self._itemsize()
        nd = self.take("ndim", 0, F.LM_MAXD)
        dims = self.dims("dims", nd)
        self.strided("src", isz, dims)
        self.strided("dst", isz, dims, writable=True)

    def op_gather(self):
        self._indexed(self._itemsize(), gather=True)

    def op_scatter_add(self):
        self._indexed(self.fdtype(), gather=False)

    def _indexed(self, isz, gather):
        """outer n inner nidx src(2) idx(2) dst(2): gather reads n rows per outer index and writes nidx,
        scatter_add the reverse.  Extents are proven here; index values are checked by the kernels as
        they read them (they are data)."""
        outer, n, inner, nidx = self.dims("sizes", 4)
        rows_in, rows_out = (n, nidx) if gather else (nidx, n)
        self.operand("src", outer * rows_in * inner * isz, align=isz)
        self.operand("idx", nidx * 8, align=8)
        self.operand("dst", outer * rows_out * inner * isz, writable=True, align=isz)

    def op_sgd_update(self):
        isz = self.fdtype()
        npar = self.take("nparams", 0, 1 << 20)
        for nm in ("lr", "momentum", "weight_decay"):
            self.const(nm)
        for i in range(npar):
            p = (self.take(f"p[{i}].slot", 0, len(self.sizes) - 1), self.take(f"p[{i}].offset", 0, 2 ** 50))
            g = (self.take(f"g[{i}].slot", -1, len(self.sizes) - 1), self.take(f"g[{i}].offset", 0, 2 ** 50))
            v = (self.take(f"v[{i}].slot", -1, len(self.sizes) - 1), self.take(f"v[{i}].offset", 0, 2 ** 50))
            if g[0] < 0 and v[0] < 0:
                self.fail(f"g[{i}] is absent (slot -1) without a momentum buffer to hold the gradient")
            n = self.take(f"n[{i}]", 0, 2 ** 40)
            for nm, (slot, off), w in (("p", p, True), ("g", g, False), ("v", v, True)):
                if slot < 0:
                    continue
                if (w and slot >= F.SLOT_INPUT0) or off + n * isz > self.sizes[slot] or off % isz:
                    self.fail(f"{nm}[{i}] is outside its buffer or not writable")

    def op_adam_update(self):
        isz = self.fdtype()
        npar = self.take("nparams", 0, 1 << 20)
        for nm in ("lr", "beta1", "beta2", "eps", "weight_decay"):
            self.const(nm)
        self.operand("step", 8, writable=True, align=8)
        for i in range(npar):
            ops = [(self.take(f"{nm}[{i}].slot", 0, len(self.sizes) - 1), self.take(f"{nm}[{i}].offset", 0, 2 ** 50))
                   for nm in ("p", "g", "m", "v")]
            n = self.take(f"n[{i}]", 0, 2 ** 40)
            for nm, (slot, off) in zip(("p", "g", "m", "v"), ops):
                if (nm != "g" and slot >= F.SLOT_INPUT0) or off + n * isz > self.sizes[slot] or off % isz:
                    self.fail(f"{nm}[{i}] is outside its buffer or not writable")

    op_adam_apply = op_adam_update  # same fields; it only reads the step counter

    def op_check_finite(self):
        isz = self.fdtype()
        n = self.take("n", 0, 2 ** 40)
        self.operand("x", n * isz, align=isz)
