"""Issue 5: the loader trusts nothing.  A fuzz run mutates, truncates and extends valid plan files (and
re-signs some so the corruption reaches the parser and the validator); every case must raise PlanError or
load and run cleanly.  The fuzz body runs in a subprocess (tests/plan_fuzz_worker.py) so a segfault or
abort fails this test with the reproducer left on disk instead of killing pytest.

LIBML_FUZZ_EXAMPLES overrides the number of cases (default 2500, well under a minute).
Targeted cases below pin the validator holes the fuzzing and review found.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import libml_compile as lc
import libml_runtime as lr
from libml_runtime import format as F
from libml_runtime import planfile as PF
from libml_runtime.executable import Executable
from conftest import build_mlp, make_mlp_params

HERE = os.path.dirname(os.path.abspath(__file__))


def mixed_graph():
    """Covers gemm (batched, epilogue), softmax, transpose (strided copy), mode 1 and 2 reductions,
    int elementwise, cast, mse and SGD."""
    rng = np.random.default_rng(0)
    g = lc.Graph("mix")
    x = g.input("x", (4, 6, 5))
    t = g.input("t", (4, 5))
    k = g.input("k", (4, 3), dtype="int32")
    w = g.param("w", rng.standard_normal((5, 7)).astype(np.float32))
    v = g.param("v", rng.standard_normal((4, 5, 6)).astype(np.float32))
    h = lc.softmax(x @ w, axis=1)
    tr = lc.transpose(h, (0, 2, 1))
    r = lc.mean(lc.matmul(x, v), axis=(0, 2))
    r2 = lc.sum(tr, axis=-1)
    ki = k + k
    pred = lc.mean(x, axis=1) + lc.sigmoid(t)
    loss = lc.mse(pred, t) + lc.mean(r) + lc.mean(r2) + lc.mean(lc.cast(ki, "float32"))
    g.output("r", r)
    g.output("ki", ki)
    g.output("tr", tr)
    return g, loss


@pytest.fixture(scope="module")
def base_plans(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    paths = []
    g, loss = build_mlp(make_mlp_params([8, 16, 3], dtype=np.float32), 16, dtype="float32")
    lc.compile(g, loss, lc.SGD(lr=0.1, momentum=0.9, weight_decay=1e-3)).save(d / "sgd.plan")
    g, loss = build_mlp(make_mlp_params([5, 7, 4], dtype=np.float64, seed=1), 6, dtype="float64",
                        label_dtype="int32")
    lc.compile(g, loss, lc.Adam(lr=1e-2, weight_decay=1e-2), check_finite=True).save(d / "adam.plan")
    g, loss = mixed_graph()
    lc.compile(g, loss, lc.SGD(lr=0.01), check_finite=True).save(d / "mix.plan")
    # Adam split per param (w0 is 64 KiB): adam_count and adam_apply instructions
    g, loss = build_mlp(make_mlp_params([8, 2048, 3], dtype=np.float32, seed=2), 4, dtype="float32")
    prog = lc.compile(g, loss, lc.Adam(lr=1e-2))
    assert "adam_count" in [r["op"] for r in prog.instructions("step")]
    prog.save(d / "adam_split.plan")
    # data movement: copy_nd (concat, slice), gather and scatter_add (gather's gradient)
    g = lc.Graph("moves")
    x = g.input("x", (3, 4))
    w = g.param("w", np.arange(8, dtype=np.float32).reshape(2, 4))
    c = lc.concat([x, w, x * 2.0], axis=0)
    h = lc.gather(c, [7, -1, 0, 3], axis=0)
    loss = lc.mean(lc.sigmoid(h))
    g.output("loss", loss)
    prog = lc.compile(g, loss, lc.SGD(lr=0.1))
    assert {"concat", "slice", "gather", "gather_grad"} <= {r["op"] for r in prog.instructions("step")}
    prog.save(d / "moves.plan")
    # the reduction kernels: reduce (max, prod, logsumexp), arg_reduce, log_softmax
    g = lc.Graph("reductions")
    x = g.input("x", (3, 4, 5))
    w = g.param("w", np.linspace(0.5, 1.5, 20, dtype=np.float32).reshape(4, 5))
    h = x * w
    g.output("am", lc.argmax(h, axis=1, select_last=True))
    loss = lc.mean(lc.max(h, axis=(0, 2))) + lc.mean(lc.prod(h, axis=0)) + lc.mean(lc.logsumexp(h, axis=2)) \
        + lc.mean(lc.log_softmax(h, axis=1))
    g.output("loss", loss)
    prog = lc.compile(g, loss, lc.SGD(lr=0.1))
    assert {"reduce_max", "reduce_prod", "logsumexp", "argmax", "log_softmax"} <= \
        {r["op"] for r in prog.instructions("step")} | {r["op"] for r in prog.instructions("run")}
    prog.save(d / "reductions.plan")
    for name in ("sgd.plan", "adam.plan", "mix.plan", "adam_split.plan", "moves.plan", "reductions.plan"):
        paths.append(str(d / name))
    return d, paths


def test_fuzz_plan_files(base_plans):
    d, paths = base_plans
    n = int(os.environ.get("LIBML_FUZZ_EXAMPLES", "2500"))
    seed = int(os.environ.get("LIBML_FUZZ_SEED", "20240605"))
    cmd = [sys.executable, os.path.join(HERE, "plan_fuzz_worker.py"), str(d), str(n), str(seed)] + paths
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        last = open(d / "last_case.plan.txt").read() if (d / "last_case.plan.txt").exists() else "?"
        pytest.fail(f"fuzz worker hung; last case ({last}) is in {d / 'last_case.plan'}")
    if p.returncode != 0:
        last = open(d / "last_case.plan.txt").read() if (d / "last_case.plan.txt").exists() else "?"
        pytest.fail(f"fuzz worker failed with status {p.returncode} (negative = signal); last case: {last}, "
                    f"bytes in {d / 'last_case.plan'}\n{p.stderr[-6000:]}")
    stats = __import__("json").loads(p.stdout.strip().splitlines()[-1])
    assert stats["cases"] >= n * 0.9
    assert stats["plan_error"] > 0 and stats["loaded"] > 0, stats


# ---- targeted cases ---------------------------------------------------------------------------------

def mutated(plan, kind, fn):
    """A copy of ``plan`` whose ``kind`` entry code went through ``fn(code)`` (in place)."""
    p = PF.loads(PF.dumps(plan))
    fn(p.entries[kind].code)
    return p


@pytest.fixture(scope="module")
def mix_plan():
    g, loss = mixed_graph()
    return lc.compile(g, loss, lc.SGD(lr=0.01), check_finite=True).plan


def ew_instructions(e):
    """[(positions, values)] of the entry's fused elementwise instructions: each field's index in the
    code and its value, by the field names of format.py's layout."""
    out = []
    for pc, op, _, vals in F.instructions(e.code):
        if op == "fused_elementwise":
            out.append((F.locate(e.code, pc)[1], vals))
    return out


def test_vm_operands_are_bounded_by_arity(mix_plan):
    """Every VM step's operands: registers in range; immediates only in the slots the op's arity uses."""
    hits = set()
    for kind, e in mix_plan.entries.items():
        for pos, val in ew_instructions(e):
            for i, step in enumerate(pos["prog"]):
                arity = F.VM_ARITY[val["prog"][i]["op"]]
                n_regs = val["n_regs"]
                bad = [("dst", n_regs), ("a", n_regs), ("a", -1), ("bc"[min(arity, 2) - 1], n_regs)]
                if arity < 3:
                    bad.append(("c", -1))   # no immediate in an unused slot
                for name, value in bad:
                    def put(code, at=step[name], value=value):
                        code[at] = value
                    with pytest.raises(lr.PlanError, match=rf"prog\[{i}\]\.{name}"):
                        lr.validate(mutated(mix_plan, kind, put))
                hits.add(arity)
    assert hits == {1, 2, 3}, f"the mixed graph's kernels cover arities {hits}"


@pytest.mark.parametrize("vm,operand", [("DIVMASK", "c"), ("MASK", "b")])
def test_vm_mask_operand_must_be_a_register(vm, operand):
    from libml_compile.ops import step
    g = lc.Graph("m")
    x, y, z = (g.input(n, (2, 8)) for n in "xyz")
    g.output("o", (x / y) * step(z) if vm == "DIVMASK" else x * step(z))
    plan = lc.compile(g).plan
    e = plan.entries["run"]
    ((pos, val),) = ew_instructions(e)
    assert val["prog"][0]["op"] == F.VM_OPS[vm]

    def imm(code):
        code[pos["prog"][0][operand]] = -1
    with pytest.raises(lr.PlanError, match=rf"prog\[0\]\.{operand}"):
        lr.validate(mutated(plan, "run", imm))


def test_mode2_reduce_output_must_be_dense(mix_plan):
    hits = 0
    for kind, e in mix_plan.entries.items():
        for pos, val in ew_instructions(e):
            if val["mode"] != 2:
                continue
            for o, ov in zip(pos["output"], val["output"]):
                for k in range(val["ndim"]):
                    if ov["stride"][k] != 0 and val["dims"][k] > 1:
                        def bump(code, at=o["stride"][k]):
                            code[at] += 1
                        with pytest.raises(lr.PlanError, match="stride"):
                            lr.validate(mutated(mix_plan, kind, bump))
                        hits += 1
    assert hits, "the mixed graph no longer has a mode-2 reduction"


def test_gemm_c_batch_stride_must_be_dense(mix_plan):
    hits = 0
    for kind, e in mix_plan.entries.items():
        for pc, op, _, val in F.instructions(e.code):
            if op != "gemm" or val["batch_ndim"] == 0:
                continue

            def zero(code, at=F.locate(e.code, pc)[1]["C.batch_stride"][0]):
                code[at] = 0
            with pytest.raises(lr.PlanError, match="C.batch_stride"):
                lr.validate(mutated(mix_plan, kind, zero))
            hits += 1
    assert hits, "the mixed graph no longer has a batched GEMM"


def test_dim_broadcast_everywhere_is_rejected(mix_plan):
    """A huge dim that no operand moves along would loop for hours without touching memory."""
    pos, _ = ew_instructions(mix_plan.entries["run"])[0]

    def blow_up(code):
        code[pos["dims"][0]] = 2 ** 39
        for r in pos["input"] + pos["output"]:
            code[r["stride"][0]] = 0
    with pytest.raises(lr.PlanError):
        lr.validate(mutated(mix_plan, "run", blow_up))


def test_checked_entries_get_their_own_arena(mix_plan):
    """Regression: the checked (unfused) entries need a larger arena than the fused ones; the Executable
    used to allocate only the fused size and the checked grad/step wrote past its end."""
    bigger = [k for k, e in mix_plan.entries.items() if e.checked.arena_bytes > e.arena_bytes]
    assert bigger, "expected a checked entry with a larger arena"
    exe = Executable(mix_plan, num_threads=2, check_finite=True)
    assert exe._arena.nbytes >= max(e.checked.arena_bytes for e in mix_plan.entries.values())


@pytest.mark.parametrize("fld,value", [("arena_bytes", 2 ** 41), ("arena_bytes", -1)])
def test_entry_fields_rejected(mix_plan, fld, value):
    p = PF.loads(PF.dumps(mix_plan))
    setattr(p.entries["run"], fld, value)
    with pytest.raises(lr.PlanError, match=fld):
        lr.validate(p)


def test_load_refuses_huge_arena(tmp_path, mix_plan):
    p = PF.loads(PF.dumps(mix_plan))
    p.entries["run"].arena_bytes = 2 ** 39
    PF.save(p, tmp_path / "big.plan")
    with pytest.raises(lr.PlanError, match="arena_bytes"):
        lr.load(tmp_path / "big.plan")


def test_sgd_without_gradient_needs_a_momentum_buffer():
    """g slot -1 means "a momentum GEMM already put the gradient into v": without v it must be refused."""
    x = np.random.default_rng(0).standard_normal((4, 3))
    g = lc.Graph("sgdv")
    w = g.param("w", np.ones(3))
    loss = lc.sum(g.const(x) * w)
    plan = lc.compile(g, loss, lc.SGD(lr=0.1)).plan
    e = plan.entries["step"]
    (pc,) = [pc for pc, op, _, _ in F.instructions(e.code) if op == "sgd_update"]
    first = F.locate(e.code, pc)[1]["param"][0]
    assert e.code[first["v.slot"]] == -1        # plain SGD: no momentum buffer

    def drop_g(code):
        code[first["g.slot"]] = -1
    with pytest.raises(lr.PlanError, match=r"g\[0\]"):
        lr.validate(mutated(plan, "step", drop_g))
