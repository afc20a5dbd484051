"""The fused elementwise kernels compiled ahead of time (runtime/libml_runtime/vm_aot.py, vm_aot.txt).

A fused instruction whose micro-program is listed in vm_aot.txt runs its whole blocks as one C loop;
these tests pin that the listed programs are still what the workloads compile to (else the kernels are
dead code: rerun benchmarks/vm_aot_collect.py --write), that the kernels compute what the VM computes
-- NaN and Inf included, both element types, any thread count -- and that bad lines of vm_aot.txt fail
the build with the line named.
"""
import numpy as np
import pytest

import libml_compile as lc
from libml_runtime import _exec, format as F, vm_aot
from libml_runtime.format_codegen import _c_expr, _calls_libmvec


def _aot_names(prog, entry):
    code = np.ascontiguousarray(prog.plan.entries[entry].code, dtype=np.int64)
    return [_exec.ew_aot(code, pc) for pc, op, _, _ in F.instructions(code) if op == "fused_elementwise"]


@pytest.fixture
def vm_only():
    old = _exec.set_ew_aot(0)
    yield
    _exec.set_ew_aot(old)


def _w4(shape, dtype="float32", nt=2, seed=0):
    rng = np.random.default_rng(seed)
    g = lc.Graph("w4")
    x = g.input("x", shape, dtype=dtype)
    a, b, c = (g.param(n, (rng.standard_normal(shape[1]) * 0.5).astype(dtype)) for n in "abc")
    y = lc.div(lc.sigmoid(x * a + b), 1.0 + lc.relu(x - c), name="y")
    return lc.compile(g, loss=lc.mean(y), optimizer=lc.SGD(0.01), num_threads=nt)


def _mse(dtype="float32", nt=2):
    from libml_models.builders import mlp
    g, L = mlp([32, 64, 300], 40, loss="mse", dtype=dtype)
    return lc.compile(g, loss=L, optimizer=lc.SGD(0.01), num_threads=nt)


def test_listed_programs_are_what_the_workloads_compile_to():
    names = {n for n, _, _ in vm_aot.parse(F, vm_aot.read_programs())}
    w4 = _w4((64, 1024))
    assert _aot_names(w4, "step") == ["w4_grad"] and _aot_names(w4, "grad") == ["w4_grad"]
    assert _aot_names(w4, "run") == ["w4_run"]
    assert "w3_grad" in _aot_names(_mse(), "step")
    assert {"w4_grad", "w4_run", "w3_grad"} <= names


def _feeds(shape, dtype, seed=1, specials=True):
    x = np.random.default_rng(seed).standard_normal(shape).astype(dtype) * 3
    if specials:
        flat = x.reshape(-1)
        flat[5], flat[77], flat[300], flat[901] = np.nan, np.inf, -np.inf, 1e30  # exp overflow, 0 * inf
    return {"x": x}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cols", [1024, 1000])  # 1000: a partial last block, run by the VM
def test_w4_kernel_gives_the_vm_bits_nan_and_inf_included(dtype, cols):
    """No product of one W4 step feeds a sum of the next, so GCC has nothing to contract across steps:
    the one loop computes exactly the VM's bits (vm_aot.py says where it may not)."""
    feeds = _feeds((48, cols), dtype)
    prog = _w4((48, cols), dtype)
    assert _aot_names(prog, "step") == ["w4_grad"]
    got = prog.grad(feeds), prog.run(feeds)
    old = _exec.set_ew_aot(0)
    try:
        want = prog.grad(feeds), prog.run(feeds)
    finally:
        _exec.set_ew_aot(old)
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for k in g:
            np.testing.assert_array_equal(np.asarray(g[k]), np.asarray(w[k]), err_msg=k)
    assert np.isnan(got[1]["loss"])  # the NaN input reaches the mean, as in NumPy


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_w4_kernel_matches_float64_numpy(dtype):
    shape = (40, 1024)
    feeds = _feeds(shape, dtype, specials=False)
    prog = _w4(shape, dtype)
    p = {k: v.astype(np.float64) for k, v in prog.params.items()}
    x = feeds["x"].astype(np.float64)
    s = 1 / (1 + np.exp(-(x * p["a"] + p["b"])))
    r = np.maximum(x - p["c"], 0)
    d = 1 + r
    y = s / d
    gz = s * (1 - s) / d / x.size
    want = {"a": (gz * x).sum(0), "b": gz.sum(0), "c": (y / d * (r > 0) / x.size).sum(0)}
    got = prog.grad(feeds)
    tol = 1e-5 if dtype == "float32" else 1e-12
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=tol, atol=tol * np.abs(want[k]).max(), err_msg=k)
    np.testing.assert_allclose(prog.run(feeds)["loss"], y.mean(), rtol=tol)


def test_kernels_give_the_same_bits_for_any_thread_count():
    shape = (96, 1024)
    feeds = _feeds(shape, "float32")
    runs = []
    for nt in (1, 2):
        prog = _w4(shape, nt=nt)
        losses = [prog.step(feeds) for _ in range(3)]
        runs.append((losses, prog.params))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    for k in runs[0][1]:
        np.testing.assert_array_equal(runs[0][1][k], runs[1][1][k], err_msg=k)


def test_mse_kernel_matches_the_vm():
    """The MSE gradient's program adds a product step into a sum step: GCC may contract them in one loop,
    so the kernel agrees with the VM to the last place, not bit for bit."""
    prog = _mse()
    assert "w3_grad" in _aot_names(prog, "step")
    rng = np.random.default_rng(3)
    feeds = {"x": rng.standard_normal((40, 32)).astype(np.float32),
             "y": rng.standard_normal((40, 300)).astype(np.float32)}
    got = prog.grad(feeds)
    old = _exec.set_ew_aot(0)
    try:
        want = prog.grad(feeds)
    finally:
        _exec.set_ew_aot(old)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-6, atol=1e-7 * np.abs(want[k]).max(), err_msg=k)


def test_profile_names_the_kernel(vm_only):
    prog = _w4((64, 1024))
    feeds = _feeds((64, 1024), "float32", specials=False)
    rows = prog.profile("step", feeds, repeat=2, warmup=0).rows
    assert [r["kernel"] for r in rows if r["op"].startswith("fused")] == ["w4_grad"]
    assert "[aot w4_grad]" in str(prog.profile("step", feeds, repeat=1, warmup=0))


# ---- vm_aot.txt: what the generator accepts ----------------------------------------------------------

def _gen(text):
    return vm_aot.generate(F, text, _c_expr, _calls_libmvec)


def test_generator_round_trips_the_listed_programs():
    text = vm_aot.read_programs()
    progs = vm_aot.parse(F, text)
    assert progs
    again = "\n".join(f"{n} n_in={k}: " + "; ".join(vm_aot.format_record(F, r) for r in recs)
                      for n, k, recs in progs)
    assert vm_aot.parse(F, again) == progs
    h = _gen(text)
    assert h.count("static void LM_SFX(lm_aot_") == len(progs)


@pytest.mark.parametrize("line, msg", [
    ("p n_in=2 SUB 2 0 1", "expected 'name n_in=N: records'"),
    ("p n_in=2: NOPE 2 0 1", "unknown record 'NOPE'"),
    ("p n_in=2: SUB 2 0", "SUB takes dst and 2 operands"),
    ("p n_in=2: SUB 2 0 5", "register 5 read before it is written"),
    ("p n_in=1: EXP 1 0; store 3 >0", "register 3 read before it is written"),
    ("p n_in=1: EXP 1 0; store 1 2 >0", "store takes one register"),
])
def test_bad_program_lines_name_the_line(line, msg):
    with pytest.raises(vm_aot.ProgramError, match=msg):
        _gen("# a comment\n" + line)


def test_a_program_listed_twice_is_refused():
    with pytest.raises(vm_aot.ProgramError, match="listed twice"):
        _gen("p n_in=1: EXP 1 0; store 1 >0\np n_in=1: EXP 1 0; store 1 >0")


def test_whole_block_sums_have_no_kernel():
    with pytest.raises(vm_aot.ProgramError, match="whole-block sum"):
        vm_aot.format_record(F, (769, 1, 0, 0, 0, 0))


def test_normalise_ignores_operands_an_op_does_not_take():
    codes = {name: code for code, name, *_ in F.VM}
    exp, add = codes["EXP"], codes["ADD"]
    assert vm_aot.normalise(F, (exp, 3, 0, 7, -4, 9)) == (exp, 3, 0, 0, 0, 0)
    assert vm_aot.normalise(F, (add, 3, 0, -4, 8, 0)) == (add, 3, 0, vm_aot.CONST, 0, 0)
    assert vm_aot.normalise(F, (256 + add, 3, 0, 2, 8, 5)) == (256 + add, 3, 0, 2, 0, 5)


def test_a_plan_file_loaded_by_the_runtime_alone_runs_the_kernel(tmp_path):
    """The kernels are chosen from the decoded program at run time, so a plan file (data, no compiler)
    gets them too, with the bits of the compiled program."""
    import libml_runtime
    prog = _w4((32, 1024))
    feeds = _feeds((32, 1024), "float32", specials=False)
    prog.save(tmp_path / "w4.plan")
    exe = libml_runtime.load(tmp_path / "w4.plan", num_threads=2)
    code = np.ascontiguousarray(exe.plan.entries["step"].code, dtype=np.int64)
    assert [_exec.ew_aot(code, pc) for pc, op, _, _ in F.instructions(code) if op == "fused_elementwise"] \
        == ["w4_grad"]
    assert exe.step(feeds) == prog.step(feeds)
    for k, v in prog.params.items():
        np.testing.assert_array_equal(exe.params[k], v, err_msg=k)
