"""Fused elementwise kernels compiled ahead of time for the VM programs the passes emit most.

Why: the VM (kernels_tmpl.h, lm_ew_exec_full) runs a fused program one step at a time over a block of
LM_BLK elements, so the steps' costs add -- a division step keeps only the divider busy, an exp step
only the FMA units.  A program written as one loop over the block, every step's value in a register,
lets the out-of-order core overlap them (W4: the VM 1.35x the hand-fused C loop on a Xeon).  Plans stay
data and run without a C compiler: the programs listed in ``vm_aot.txt`` are compiled into the runtime
(one C function per program, element type and ISA copy), and a fused instruction whose micro-program
matches one of them runs it for its whole blocks; every other program, and every partial block, runs
on the VM.  Same steps, same C expressions, same order of the column-sum additions; the one difference
is that GCC may contract a product of one step into a sum of the next (the VM's separate loops never
do), so results can differ from the VM's in the last place, as between the ISA copies -- never
between thread counts (the choice depends on the program only).

``vm_aot.txt`` holds one program per line (written by ``benchmarks/vm_aot_collect.py`` from the
compiled workloads, with where each came from in a comment):

    name n_in=N: REC; REC; ...

each REC a record of the micro-program (kernels.h, lm_ew_microprog; ``_exec.ew_microprog`` lists them):

    OP dst a [b] [c]        a VM step (OP a format.py VM name), b / c a register or ``k`` (a constant)
    OP+acc dst a .. >o      the step, and its result added into output o's column partial sums
    OP=acc dst a .. >o      only added into them (the register is read by nothing later)
    store r >o / colsum r >o   an output record

Records with whole-block sums (``sum``, ``rowsum``) are not supported: their order of additions is the
VM's block reduction, which one fused loop would change.

``generate(F, text, c_expr, calls_libmvec)`` (run by format_codegen.write at build time) gives vm_aot_gen.h: the
signature table (integers, matched by kernels.h's lm_aot_find against the micro-program built at run
time) and, for kernels_tmpl.h, the kernels.
"""
from __future__ import annotations

import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
PROGRAMS = os.path.join(HERE, "vm_aot.txt")

# micro-program record kinds (kernels.h: LM_MOP_*)
MOP_STORE_ACC, MOP_ACC, MOP_OUT_STORE, MOP_OUT_COLSUM = 256, 512, 768, 771
CONST = -1  # a constant operand in a normalised signature (any negative b / c of the plan)


class ProgramError(ValueError):
    """A line of vm_aot.txt that does not describe a supported micro-program."""


def _by_name(F):
    """format.py's VM table by op name: name -> (code, arity, C expression, mask operand)."""
    return {name: (code, arity, expr, mask) for code, name, arity, expr, mask in F.VM}


def _by_code(F):
    """format.py's VM table by opcode: code -> (name, arity, C expression, mask operand)."""
    return {code: (name, arity, expr, mask) for code, name, arity, expr, mask in F.VM}


def parse(F, text, where="vm_aot.txt"):
    """[(name, n_in, records)] from the text of vm_aot.txt; records are normalised signature tuples
    (mop, dst, a, b, c, out) as ``normalise`` gives them."""
    vm = _by_name(F)
    out, names = [], set()
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\w+)\s+n_in=(\d+)\s*:\s*(.*)", line)
        if not m:
            raise ProgramError(f"{where}:{lineno}: expected 'name n_in=N: records', got {line!r}")
        name, n_in, body = m.group(1), int(m.group(2)), m.group(3)
        if name in names:
            raise ProgramError(f"{where}:{lineno}: program {name!r} listed twice")
        names.add(name)
        recs = []
        for item in (s.strip() for s in body.split(";")):
            if not item:
                continue
            toks = item.split()
            outi = 0
            if toks[-1].startswith(">"):
                outi = int(toks.pop()[1:])
            head, args = toks[0], toks[1:]
            if head in ("store", "colsum"):
                if len(args) != 1:
                    raise ProgramError(f"{where}:{lineno}: {head} takes one register: {item!r}")
                recs.append((MOP_OUT_STORE if head == "store" else MOP_OUT_COLSUM, int(args[0]), 0, 0, 0, outi))
                continue
            hm = re.fullmatch(r"([A-Z0-9_]+)(\+acc|=acc)?", head)
            if not hm or hm.group(1) not in vm:
                raise ProgramError(f"{where}:{lineno}: unknown record {head!r} (a VM op, store or colsum)")
            code, arity, _, _ = vm[hm.group(1)]
            if len(args) != 1 + arity:
                raise ProgramError(f"{where}:{lineno}: {hm.group(1)} takes dst and {arity} operands: {item!r}")
            ops = [CONST if a == "k" else int(a) for a in args]
            ops += [0] * (4 - len(ops))
            mop = code + {None: 0, "+acc": MOP_STORE_ACC, "=acc": MOP_ACC}[hm.group(2)]
            recs.append((mop, *ops, outi if hm.group(2) else 0))
        out.append((name, n_in, tuple(recs)))
    return out


def normalise(F, rec):
    """A micro-program record (op, dst, a, b, c, out) as its signature: constants as CONST, the operands
    an op does not take as 0 (a plan may carry anything there).  Must agree with kernels.h, lm_aot_find."""
    op, dst, a, b, c, o = (int(v) for v in rec)
    if op >= MOP_OUT_STORE:
        return (op, dst, 0, 0, 0, o)
    arity = _by_code(F)[op % 256][1]
    b = 0 if arity < 2 else (CONST if b < 0 else b)
    c = 0 if arity < 3 else (CONST if c < 0 else c)
    return (op, dst, a, b, c, o if op >= 256 else 0)


def format_record(F, rec):
    """The vm_aot.txt text of a normalised record."""
    op, dst, a, b, c, o = rec
    if op >= MOP_OUT_STORE:
        if op not in (MOP_OUT_STORE, MOP_OUT_COLSUM):
            raise ProgramError(f"record kind {op} (a whole-block sum) has no ahead-of-time kernel")
        return f"{'store' if op == MOP_OUT_STORE else 'colsum'} {dst} >{o}"
    name, arity, _, _ = _by_code(F)[op % 256]
    fold = {0: "", 1: "+acc", 2: "=acc"}[op // 256]
    args = [str(dst), str(a)] + ["k" if v == CONST else str(v) for v in (b, c)[:arity - 1]]
    return " ".join([name + fold, *args] + ([f">{o}"] if fold else []))


def _kernel(F, name, n_in, recs, c_expr, calls_libmvec):
    """C text of one program's kernel, for kernels_tmpl.h (LM_T, LM_SFX of the copy)."""
    vm = _by_code(F)
    cur = {}        # register -> the C name of its current value inside the loop
    pre, body = [], []
    used_in = sorted({r for rec in recs for r in _reads(vm, rec) if r < n_in})
    for r in used_in:
        pre.append(f"    const LM_T *restrict in{r} = R[{r}];")
        cur[r] = f"v{r}"
        body.append(f"        const LM_T v{r} = in{r}[j];")
    mv = False
    for s, (op, dst, a, b, c, o) in enumerate(recs):
        if op >= MOP_OUT_STORE:
            pre.append(f"    LM_T *o{s} = out_row[{o}] + j0;")
            body.append(f"        o{s}[j] {'=' if op == MOP_OUT_STORE else '+='} {cur[dst]};")
            continue
        vname, arity, expr, mask = vm[op % 256]
        mv |= calls_libmvec(F, expr)
        operand = []
        for f, v in ((3, b), (4, c))[:arity - 1]:
            if v == CONST:
                pre.append(f"    const LM_T k{s}_{f} = (LM_T)consts[-mp[{s} * LM_MW + {f}] - 1];")
                operand.append(f"k{s}_{f}")
            else:
                operand.append(cur[v])
        xyz = ", ".join(f"{n} = {v}" for n, v in zip("xyz", [cur[a]] + operand))
        e = c_expr(F, expr)
        if mask:
            m = cur[b if mask == "b" else c]
            val = f"{{ const LM_T {xyz}, st = {m} > 0 ? (LM_T)1 : (LM_T)0; t{s} = ({e}) * st; }}"
        else:
            val = f"{{ const LM_T {xyz}; t{s} = {e}; }}"
        body.append(f"        LM_T t{s}; {val}  /* {vname} */")
        if op >= 256:
            pre.append(f"    LM_T *restrict p{s} = out_row[{o}] + j0;")
            body.append(f"        p{s}[j] += t{s};")
        if op < MOP_ACC:  # an =acc step writes no register (the VM's lm_a_ labels do not either)
            cur[dst] = f"t{s}"
    pragma = "LM_SIMD_MV" if mv else "LM_SIMD"
    # the inputs' blocks two ahead (the next calls' rows, in place for contiguous inputs; a prefetch past
    # an array's end never faults)
    pre += [f"    LM_AOT_PREFETCH(in{r});" for r in used_in]
    return "\n".join([
        f"/* {name}: {'; '.join(format_record(F, r) for r in recs)} */",
        f"static void LM_SFX(lm_aot_{name})(const int64_t *mp, const double *consts, LM_T **R, LM_T **out_row,",
        "                                  int64_t j0)",
        "{",
        *pre,
        "    int64_t j;",
        "    (void)mp; (void)consts;",
        f"    {pragma} for (j = 0; j < LM_BLK; j++) {{",
        *body,
        "    }",
        "}",
    ])


def _reads(vm, rec):
    op, dst, a, b, c, o = rec
    if op >= MOP_OUT_STORE:
        return [dst]
    arity = vm[op % 256][1]
    return [v for v in (a, b, c)[:arity] if v != CONST]


def _check(F, name, n_in, recs):
    """Raise ProgramError unless every register is written (or an input) before it is read."""
    vm = _by_code(F)
    live = set(range(n_in))
    for rec in recs:
        if rec[0] >= MOP_OUT_STORE and rec[0] not in (MOP_OUT_STORE, MOP_OUT_COLSUM):
            raise ProgramError(f"program {name}: record kind {rec[0]} (a whole-block sum) is not supported")
        for r in _reads(vm, rec):
            if r not in live:
                raise ProgramError(f"program {name}: register {r} read before it is written")
        if rec[0] < MOP_ACC:
            live.add(rec[1])


def generate(F, text, c_expr, calls_libmvec):
    """The text of vm_aot_gen.h for format module F and the text of vm_aot.txt; c_expr and calls_libmvec:
    format_codegen's translation of a VM expression into C over LM_T and its test for a libmvec call
    (the VM's own cases come from them too)."""
    progs = parse(F, text)
    for name, n_in, recs in progs:
        _check(F, name, n_in, recs)
    h = ["/* Generated by vm_aot.py from vm_aot.txt at build time.  Do not edit: edit vm_aot.txt. */",
         "/* Part 1 (LM_AOT_SIGNATURES defined, once, kernels.h): the programs' signatures for lm_aot_find.",
         " * Part 2 (otherwise, kernels_tmpl.h, once per element type and ISA copy): the kernels and their",
         " * table LM_SFX(lm_aot_tbl), indexed like the signatures. */",
         "#ifdef LM_AOT_SIGNATURES",
         f"#define LM_AOT_N {len(progs)}",
         "/* per program: n_in, number of records, then the records (op dst a b c out), normalised */"]
    sig = []
    for name, n_in, recs in progs:
        sig.append(f"    /* {name} */ {n_in}, {len(recs)}, " + ", ".join(str(v) for r in recs for v in r) + ",")
    h.append("static const int64_t lm_aot_sigs[] = {")
    h += sig + ["    -1};"]
    h.append("static const char *const lm_aot_names[] = {" + "".join(f'"{n}", ' for n, *_ in progs) + "0};")
    h.append("static const signed char lm_vm_arity[256] = {"
             + ", ".join(f"[VM_{n}] = {ar}" for _, n, ar, _, _ in F.VM) + "};")
    h.append("#else")
    h.append("#ifndef LM_AOT_PREFETCH")
    h.append("#define LM_AOT_PREFETCH(p) do { for (int l_ = 0; l_ < LM_BLK * (int)sizeof(LM_T); l_ += 64) "
             "__builtin_prefetch((const char *)((p) + 2 * LM_BLK) + l_, 0, 3); } while (0)")
    h.append("#endif")
    for name, n_in, recs in progs:
        h.append(_kernel(F, name, n_in, recs, c_expr, calls_libmvec))
    h.append("typedef void (*LM_SFX(lm_aot_fn))(const int64_t *, const double *, LM_T **, LM_T **, int64_t);")
    h.append("static const LM_SFX(lm_aot_fn) LM_SFX(lm_aot_tbl)[] = {"
             + "".join(f"LM_SFX(lm_aot_{n}), " for n, *_ in progs) + "0};")
    h.append("#endif")
    return "\n".join(h) + "\n"


def read_programs(path=PROGRAMS):
    with open(path) as f:
        return f.read()
