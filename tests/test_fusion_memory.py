"""Fusion, memory planning and determinism (issue 4).

- fused and unfused plans agree (float64, tight) on the gradient-check graphs;
- W4's training step is a handful of instructions;
- no two buffers that are live at the same time overlap, on every graph here; report fields agree;
- in-place reuse happens where legal and never where the input is still needed;
- params after 10 steps are bit-identical across runs and across 1 vs 2 threads.
"""
import numpy as np
import pytest

import libml_compile as lc
from libml_compile.memory import align, check_no_overlap
from libml_compile.ops import step

RNG = np.random.default_rng(1234)


def _graph(build, shapes, positive=False, dtype=np.float64):
    g = lc.Graph("case")
    ps = []
    for i, s in enumerate(shapes):
        v = RNG.standard_normal(s)
        if positive:
            v = np.abs(v) + 0.5
        ps.append(g.param(f"p{i}", v.astype(dtype)))
    out = build(*ps)
    loss = lc.sum(out * g.const(RNG.standard_normal(out.shape).astype(dtype)))
    g.output("out", out)
    return g, loss


CASES = {
    "add_bcast_row": (lambda a, b: a + b, [(7, 5), (5,)], False),
    "sub_bcast_col": (lambda a, b: a - b, [(7, 5), (7, 1)], False),
    "mul_bcast_1N": (lambda a, b: a * b, [(7, 5), (1, 5)], False),
    "div_scalar": (lambda a, b: a / b, [(7, 5), ()], True),
    "div_full": (lambda a, b: a / b, [(7, 5), (7, 5)], True),
    "matmul_2d": (lambda a, b: a @ b, [(6, 4), (4, 5)], False),
    "matmul_3d_bcast": (lambda a, b: a @ b, [(2, 3, 4), (4, 5)], False),
    "matmul_1d": (lambda a, b: a @ b, [(4,), (4, 5)], False),
    "linear_relu": (lambda x, w, b: lc.relu(x @ w + b), [(9, 6), (6, 5), (5,)], False),
    "mlp_relu_backward_epilogue": (lambda x, w1, b1, w2: lc.relu(x @ w1 + b1) @ w2,
                                   [(9, 6), (6, 5), (5,), (5, 3)], False),
    "mlp_relu_backward_epilogue_panels": (lambda x, w1, b1, w2: lc.relu(x @ w1 + b1) @ w2,
                                          [(256, 300), (300, 400), (400,), (400, 50)], False),
    "sigmoid": (lambda a: lc.sigmoid(a), [(7, 5)], False),
    "softmax_ax0": (lambda a: lc.softmax(a, axis=0), [(7, 5)], False),
    "softmax_3d_ax1": (lambda a: lc.softmax(a, axis=1), [(2, 3, 4)], False),
    "mean_keepdims": (lambda a: lc.mean(a, axis=1, keepdims=True) * a, [(7, 5)], False),
    "w4_small": (lambda x, a, b, c: lc.sigmoid(x * a + b) / (1 + lc.relu(x - c)),
                 [(8, 6), (6,), (6,), (6,)], False),
    "mse": (lambda a, b: lc.mse(a, b), [(7, 5), (7, 5)], False),
    "reuse": (lambda a: lc.relu(a) * a + lc.sigmoid(a) * a, [(7, 5)], False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fused_and_unfused_plans_agree(name):
    build, shapes, pos = CASES[name]
    g, loss = _graph(build, shapes, pos)
    fused = lc.compile(g, loss=loss, fuse=True)
    plain = lc.compile(g, loss=loss, fuse=False)
    a, b = fused.grad({}), plain.grad({})
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-12, atol=1e-12, err_msg=k)
    np.testing.assert_allclose(fused.run({})["out"], plain.run({})["out"], rtol=1e-12, atol=1e-12)
    assert fused.instruction_count("grad") <= plain.instruction_count("grad")


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("fuse", [True, False])
def test_live_buffers_never_overlap(name, fuse):
    build, shapes, pos = CASES[name]
    g, loss = _graph(build, shapes, pos)
    prog = lc.compile(g, loss=loss, optimizer=lc.SGD(lr=0.1, momentum=0.9), fuse=fuse)
    for entry in ("run", "grad", "step"):
        rep = prog.memory_report(entry)
        _check_report(rep)


def _check_report(rep):
    from libml_compile.memory import Buffer
    bufs = [Buffer(n, nb, s, e, off) for n, off, nb, s, e, _ in rep.intervals]
    check_no_overlap(bufs)
    for b in bufs:
        assert b.offset % 64 == 0 and b.offset + b.nbytes <= rep.arena_bytes
    assert rep.lower_bound_bytes <= rep.arena_bytes <= rep.buffers_bytes <= rep.naive_bytes or not bufs
    assert rep.buffers_bytes == sum(align(b.nbytes) for b in bufs)


def test_overlap_checker_detects_a_clash():
    from libml_compile.memory import Buffer
    with pytest.raises(AssertionError):
        check_no_overlap([Buffer("a", 100, 0, 3, 0), Buffer("b", 100, 2, 5, 64)])
    check_no_overlap([Buffer("a", 100, 0, 1, 0), Buffer("b", 100, 2, 5, 0)])  # disjoint in time


def test_plan_arena_reuses_only_inputs_that_die_and_fit_over_a_generic_instruction_list():
    """memory.plan_arena knows instructions only by the keys they read and write: an output takes over a
    listed input's buffer iff that input is last read there, has the output's size, is not an entry
    output (live_out) and no other output of the instruction took it; scratch lives one instruction."""
    from libml_compile.memory import Instruction, plan_arena
    n = 4096
    ins = [
        Instruction([], [("a", "a", n), ("b", "b", n), ("c", "c", n), ("small", "small", 64)]),   # 0
        Instruction(["a", "b", "small"], [("d", "d", n), ("e", "e", n), ("f", "f", n)],          # 1
                    reuse={"d": ["a"], "e": ["a", "b"], "f": ["small"]}),
        Instruction(["c", "x"], [("g", "g", n)], reuse={"g": ["c", "x"]}, scratch=(("s2", 128),)),  # 2
        Instruction(["c", "d", "e", "f", "g"], [("h", "h", n)], reuse={"h": ["g"]}),               # 3
    ]
    mem = plan_arena(ins, live_out=["g", "h"])
    B = mem.buffers
    assert B["d"] is B["a"] and B["d"].tensors == ["a", "d"] and B["d"].end == 3
    assert B["e"] is B["b"]               # "a" was taken by d: e takes the next listed input that dies
    assert B["f"] is not B["small"]       # sizes differ
    assert B["g"] is not B["c"]           # c is read again at 3; "x" has no buffer (outside the arena)
    assert B["h"] is not B["g"] and B["g"].end == B["h"].end == 4  # outputs live to the end, never reused
    assert [b.name for b in mem.scratch[2]] == ["s2"] and (mem.scratch[2][0].start, mem.scratch[2][0].end) == (2, 2)
    assert [b.name for b in mem.unique] == ["a", "b", "c", "small", "f", "g", "s2", "h"]
    check_no_overlap(mem.unique)
    assert mem.arena_bytes == max(b.offset + align(b.nbytes) for b in mem.unique)


def test_mlp_training_plans_meet_memory_targets():
    # W2-shaped training plan: arena within 10 % of the liveness bound and at most half the naive sum
    from libml_models.builders import mlp
    g, loss = mlp([784, 512, 512, 10], 128)
    prog = lc.compile(g, loss=loss, optimizer=lc.SGD(lr=0.01))
    rep = prog.memory_report("step")
    _check_report(rep)
    assert rep.arena_bytes <= 1.10 * rep.lower_bound_bytes
    assert rep.arena_bytes <= 0.5 * rep.naive_bytes or pytest.fail(str(rep))


def test_inplace_reuse_where_legal_and_never_where_input_is_needed():
    g = lc.Graph("inplace")
    p = g.param("p", RNG.standard_normal((64, 32)))
    a = lc.sigmoid(p)            # dies at b: b may take its buffer
    b = a * 3.0
    c = lc.exp(b)                # b is read again below: c must not take b's buffer
    d = c + b
    g.output("d", d)
    prog = lc.compile(g, fuse=False)
    rep = prog.memory_report("run")
    shared = {name: tensors for name, off, nb, s, e, tensors in rep.intervals}
    owner = {t: name for name, ts in shared.items() for t in ts}
    assert owner[b.name] == owner[a.name], rep.intervals       # legal: reused
    assert owner[c.name] != owner[b.name], rep.intervals       # b still needed by d
    P = prog.params["p"]
    s = 1 / (1 + np.exp(-P))
    np.testing.assert_allclose(prog.run({})["d"], np.exp(3 * s) + 3 * s, rtol=1e-12)


def test_w4_training_step_is_a_handful_of_instructions():
    from libml_models.builders import w4
    g, loss = w4()
    prog = lc.compile(g, loss=loss, optimizer=lc.SGD(lr=0.01))
    assert prog.instruction_count("step") <= 3, prog.summary()
    # the elementwise part reads x once: one fused kernel over (4096, 1024)
    s = prog.summary()
    assert s.count("(4096, 1024)") == 1, s
    # forward + backward of 7 graph ops and 4 reductions: 8 VM passes over each block (17 before
    # superinstructions and scale pushing); each pass costs about as much as a multiply in L1
    for entry in ("grad", "step"):
        (kernel,) = [r for r in prog.instructions(entry) if r["op"] == "fused_elementwise"]
        assert len(kernel["program"]) <= 8, kernel["program"]
        # (sigmoid's derivative g * (s * (1 - s)) is one step, SIGMOID_GRAD, since format 2.2)
        assert {"FMA_SIGMOID", "SIGMOID_GRAD", "SUBRELU", "DIVMASK"} <= {p.split("=")[1].split("(")[0]
                                                                 for p in kernel["program"]}


def _vm_ops(prog, entry="run"):
    return [p.split("=")[1].split("(")[0] for r in prog.instructions(entry) for p in r.get("program", [])]


# each superinstruction against NumPy, with NaN/Inf/0 operands where the superinstruction must keep the
# two ops' semantics (MASK multiplies by the step: a NaN gradient stays NaN under a 0 mask)
SUPEROPS = {
    "FMA": lambda x, y, z: x * y + z,
    "FMS": lambda x, y, z: x * y - z,
    "FNMA": lambda x, y, z: z - x * y,
    "MULSUB": lambda x, y, z: x * (y - z),
    "MASK": lambda x, y, z: x * step(y) + z,  # step is internal: relu's gradient rule emits it
    "ADDRELU": lambda x, y, z: lc.relu(x + y) * z,
    "SUBRELU": lambda x, y, z: lc.relu(x - y) * z,
    "MULMASK": lambda x, y, z: (x * y) * step(z),
    "DIVMASK": lambda x, y, z: (x / y) * step(z),
    "FMA_SIGMOID": lambda x, y, z: lc.sigmoid(x * y + z),
}
NP_SUPEROPS = {
    "FMA": lambda x, y, z: x * y + z,
    "FMS": lambda x, y, z: x * y - z,
    "FNMA": lambda x, y, z: z - x * y,
    "MULSUB": lambda x, y, z: x * (y - z),
    "MASK": lambda x, y, z: x * (y > 0).astype(x.dtype) + z,
    "ADDRELU": lambda x, y, z: np.where(x + y < 0, 0, x + y) * z,
    "SUBRELU": lambda x, y, z: np.where(x - y < 0, 0, x - y) * z,
    "MULMASK": lambda x, y, z: (x * y) * (z > 0).astype(x.dtype),
    "DIVMASK": lambda x, y, z: (x / y) * (z > 0).astype(x.dtype),
    "FMA_SIGMOID": lambda x, y, z: 1 / (1 + np.exp(-(x * y + z))),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(SUPEROPS))
def test_superinstruction_matches_numpy_including_nan_inf(name, dtype):
    g = lc.Graph("s")
    x, y, z = (g.input(n, (3, 300), dtype=np.dtype(dtype).name) for n in "xyz")
    g.output("o", SUPEROPS[name](x, y, z))
    prog = lc.compile(g)
    assert name in _vm_ops(prog), prog.instructions("run")
    rng = np.random.default_rng(1)
    feeds = {n: rng.standard_normal((3, 300)).astype(dtype) for n in "xyz"}
    special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30], dtype)
    for k, n in enumerate("xyz"):
        feeds[n][k, :6] = special
        feeds[n][(k + 1) % 3, 6:12] = special[::-1]
    f64 = [feeds[n].astype(np.float64) for n in "xyz"]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        want = NP_SUPEROPS[name](*f64).astype(dtype)
    got = prog.run(feeds)["o"]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    fin = np.isfinite(want)
    np.testing.assert_array_equal(got[~fin], want[~fin])
    # a multiply-add may round once instead of twice: the error bound is relative to the terms' sizes,
    # not to the (possibly cancelled) result; sigmoid's slope is at most 1/4 and its exp/divide add a
    # few ulp of a value <= 1
    ax, ay, az = (np.abs(v) for v in f64)
    if name == "MASK":
        ay = (f64[1] > 0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        terms = {"MULSUB": ax * (ay + az), "ADDRELU": (ax + ay) * az, "SUBRELU": (ax + ay) * az,
                 "MULMASK": ax * ay, "DIVMASK": ax / ay,
                 "FMA_SIGMOID": 1 + 0.25 * (ax * ay + az)}.get(name, ax * ay + az)
    err = np.abs(got[fin].astype(np.float64) - want[fin].astype(np.float64))
    assert np.all(err <= 4 * np.finfo(dtype).eps * terms[fin]), err.max()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_keeps_nan_inf_and_signed_zero_exactly(dtype):
    # the runtime is built with -fno-trapping-math so GCC vectorises compare-and-select loops; that flag
    # must not turn relu into a max() that drops NaN or the sign of -0
    g = lc.Graph("r")
    x = g.input("x", (2, 300), dtype=np.dtype(dtype).name)
    g.output("y", lc.relu(x))
    v = np.resize(np.array([np.nan, -np.nan, np.inf, -np.inf, -0.0, 0.0, 1.5, -1.5, 1e-40], dtype), (2, 300))
    got = lc.compile(g).run({"x": v})["y"]
    want = np.where(v < 0, dtype(0), v)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fma_sigmoid_has_the_bits_of_its_two_steps(dtype):
    # FMA_SIGMOID performs FMA's operations then SIGMOID's: with the multiply-add also an output (so it
    # stays a step of its own) the sigmoid must come out bit for bit the same, immediates included
    rng = np.random.default_rng(3)
    feeds = {n: (3 * rng.standard_normal((5, 333))).astype(dtype) for n in "xyz"}
    feeds["x"][0, :4] = [np.nan, np.inf, -np.inf, 0.0]
    got = {}
    for keep in (False, True):
        g = lc.Graph("s")
        x, y, z = (g.input(n, (5, 333), dtype=np.dtype(dtype).name) for n in "xyz")
        a, b = x * y + z, x * 1.5 + 0.25
        g.output("s", lc.sigmoid(a))
        g.output("t", lc.sigmoid(b))
        if keep:
            g.output("a", a)
            g.output("b", b)
        prog = lc.compile(g)
        assert _vm_ops(prog).count("FMA_SIGMOID") == (0 if keep else 2), prog.instructions("run")
        got[keep] = prog.run(feeds)
    for k in "st":
        np.testing.assert_array_equal(got[False][k], got[True][k])
    fx, fy, fz = (feeds[n].astype(np.float64) for n in "xyz")
    with np.errstate(over="ignore", invalid="ignore"):
        want = 1 / (1 + np.exp(-(fx * fy + fz)))
        bound = 4 * np.finfo(dtype).eps * (want + np.abs(fx * fy) + np.abs(fz))
    fin = np.isfinite(want) & np.isfinite(bound)
    np.testing.assert_array_equal(np.isnan(got[False]["s"]), np.isnan(want))
    assert np.all(np.abs(got[False]["s"][fin] - want[fin]) <= bound[fin])


def test_superinstructions_with_immediates_and_shared_producers():
    # a producer read twice stays a plain step (folding it would compute it twice); constants may sit in
    # either operand slot of a superinstruction
    g = lc.Graph("s")
    x, y = g.input("x", (4, 130)), g.input("y", (4, 130))
    m = x * y
    g.output("a", m + 2.0)           # FMA(x, y, 2): m is read twice (also below)
    g.output("b", lc.exp(m))
    g.output("c", x * (1.0 - y))     # MULSUB(x, 1, y)
    g.output("d", 3.0 - x * 2.0)     # FNMA(x, 2, 3)
    prog = lc.compile(g)
    ops = _vm_ops(prog)
    assert "MULSUB" in ops and "FNMA" in ops and ops.count("MUL") >= 1, prog.instructions("run")
    rng = np.random.default_rng(0)
    fx, fy = rng.standard_normal((4, 130)), rng.standard_normal((4, 130))
    out = prog.run({"x": fx.astype(np.float32), "y": fy.astype(np.float32)})
    for k, want in dict(a=fx * fy + 2, b=np.exp(fx * fy), c=fx * (1 - fy), d=3 - 2 * fx).items():
        np.testing.assert_allclose(out[k], want, rtol=2e-6, atol=1e-6)


def test_scale_pushing_moves_a_mean_factor_into_the_reductions():
    # d/dx of mean(x*w/d)-style chains carry 1/N; pushed to the reductions it costs no VM step
    g = lc.Graph("s")
    x = g.input("x", (64, 32), dtype="float64")
    w = g.param("w", np.linspace(0.5, 1.5, 32))
    d = g.param("d", np.linspace(1.0, 2.0, 32))
    L = lc.mean(lc.div(lc.sigmoid(x * w), d))
    g.output("loss", L)
    prog = lc.compile(g, loss=L)
    ops = _vm_ops(prog, "grad")
    consts = [p for r in prog.instructions("grad") for p in r.get("program", []) if str(1 / (64 * 32)) in p]
    assert not consts, (consts, ops)
    # and the gradients are still right (central differences in float64)
    rng = np.random.default_rng(0)
    fx = rng.standard_normal((64, 32))
    grads = prog.grad({"x": fx})
    for name in ("w", "d"):
        p0 = prog.params[name].copy()
        num = np.zeros_like(p0)
        for j in range(p0.size):
            for sgn in (1, -1):
                p = p0.copy()
                p[j] += sgn * 1e-6
                prog.set_params({name: p})
                num[j] += sgn * prog.run({"x": fx})["loss"]
            prog.set_params({name: p0})
        np.testing.assert_allclose(grads[name], num / 2e-6, rtol=1e-6, atol=1e-10)


def test_summary_lists_fused_groups_flops_and_arena():
    build, shapes, _ = CASES["w4_small"]
    g, loss = _graph(build, shapes)
    prog = lc.compile(g, loss=loss, optimizer=lc.SGD(lr=0.1))
    s = prog.summary()
    assert "fused_elementwise" in s and "sigmoid" in s and "arena" in s and "MFLOP" in s


def _train(nthreads, steps=10, dtype="float32"):
    from libml_models.builders import mlp
    g, loss = mlp([96, 256, 300, 10], 64, dtype=dtype) if "dtype" in mlp.__code__.co_varnames else \
        mlp([96, 256, 300, 10], 64)
    prog = lc.compile(g, loss=loss, optimizer=lc.Adam(lr=1e-3, weight_decay=0.01), num_threads=nthreads)
    rng = np.random.default_rng(7)
    for _ in range(steps):
        prog.step({"x": rng.standard_normal((64, 96)).astype(dtype), "y": rng.integers(0, 10, 64)})
    return prog.params


def test_params_bit_identical_across_runs_and_thread_counts():
    p1a, p1b, p2 = _train(1), _train(1), _train(2)
    for k in p1a:
        assert np.array_equal(p1a[k], p1b[k]), k
        assert np.array_equal(p1a[k], p2[k]), k


def test_big_gemm_and_reductions_bit_identical_for_1_and_2_threads():
    # sizes above the parallel thresholds: panelled GEMMs and chunked reductions
    g = lc.Graph("big")
    x = g.input("x", (512, 384))
    w = g.param("w", RNG.standard_normal((384, 640)).astype(np.float32) * 0.05)
    b = g.param("b", np.zeros(640, np.float32))
    loss = lc.mean(lc.sigmoid(x @ w + b))
    feeds = {"x": RNG.standard_normal((512, 384)).astype(np.float32)}
    res = []
    for nt in (1, 2):
        prog = lc.compile(g, loss=loss, optimizer=lc.SGD(lr=0.5, momentum=0.9), num_threads=nt)
        for _ in range(10):
            prog.step(feeds)
        res.append(prog.params)
    for k in res[0]:
        assert np.array_equal(res[0][k], res[1][k]), k


@pytest.mark.parametrize("nthreads", [1, 2])
def test_row_vector_gemms_take_the_gemv_path_correctly(nthreads):
    # (1, K) @ (K, N) runs as GEMV (split into panels once large); its gradients need the transposed
    # variants (G B^T with M = 1, A^T G); sizes are above the split threshold
    K, N = 384, 512
    g = lc.Graph("gemv")
    x = g.param("x", RNG.standard_normal((1, K)))
    w = g.param("w", RNG.standard_normal((K, N)) * 0.05)
    R = RNG.standard_normal((1, N))
    y = x @ w
    loss = lc.sum(y * g.const(R))
    g.output("y", y)
    prog = lc.compile(g, loss=loss, num_threads=nthreads)
    X, W = prog.params["x"], prog.params["w"]
    np.testing.assert_allclose(prog.run({})["y"], X @ W, rtol=1e-12, atol=1e-12)
    gr = prog.grad({})
    np.testing.assert_allclose(gr["x"], R @ W.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gr["w"], X.T @ R, rtol=1e-12, atol=1e-12)
    # and with the weight stored transposed (y = x @ v.T): the GEMV runs on transposed storage
    g2 = lc.Graph("gemv_t")
    x2 = g2.param("x", X)
    v = g2.param("v", W.T.copy())
    y2 = lc.matmul(x2, lc.transpose(v))
    g2.output("y", y2)
    p2 = lc.compile(g2, loss=lc.sum(y2 * g2.const(R)), num_threads=nthreads)
    np.testing.assert_allclose(p2.run({})["y"], X @ W, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(p2.grad({})["v"], (X.T @ R).T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("K,N", [(1, 1), (5, 7), (300, 8), (37, 9), (200, 63), (64, 64), (513, 65), (700, 130),
                                 (384, 1000), (13200, 10), (8000, 17), (2049, 129), (63, 2081)])
def test_row_vector_kernel_tiles_and_tails_with_bias_relu(K, N, dtype):
    # the M = 1 kernel: 8-vector tiles, single-vector tiles, the partial last vector (read over the row's
    # end, scalar in the last rows), whole or split into two blocks of K rows (N * K >= 131072, K >= 64;
    # else column panels), with the bias+relu epilogue, against float64 NumPy
    rng = np.random.default_rng(K * 1000 + N)
    g = lc.Graph("gv")
    x = g.input("x", (1, K), dtype=dtype)
    w = g.param("w", (rng.standard_normal((K, N)) / np.sqrt(K)).astype(dtype))
    b = g.param("b", rng.standard_normal(N).astype(dtype))
    g.output("y", lc.relu(x @ w + b))
    prog = lc.compile(g, num_threads=2)
    assert any(r["op"].startswith("gemm") for r in prog.instructions("run")), prog.summary("run")
    X = rng.standard_normal((1, K)).astype(dtype)
    want = np.maximum(X.astype(np.float64) @ prog.params["w"].astype(np.float64) + prog.params["b"], 0)
    tol = 2e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(prog.run({"x": X})["y"], want, rtol=tol, atol=tol)


@pytest.mark.parametrize("K,N", [(4099, 40), (517, 300)])
def test_row_vector_kernel_split_over_k_rows_is_the_same_for_1_and_2_threads(K, N):
    # the K-row split (_gemv_ksplit) is fixed by the sizes; alpha/beta (the folded SGD update: alpha = -lr,
    # beta = 1 - lr * wd) are applied after the blocks are added, so 1 and 2 threads give the same bits
    rng = np.random.default_rng(K)
    X, T = rng.standard_normal((K, 1)), rng.standard_normal((K, N))
    out = []
    for nt in (1, 2):
        g = lc.Graph("ksplit")
        x = g.input("x", (K, 1), dtype="float32")
        t = g.input("t", (K, N), dtype="float32")
        w = g.param("w", rng.standard_normal((1, N)).astype(np.float32) if nt == 1 else out[0][0])
        prog = lc.compile(g, loss=lc.mse(x @ w, t), optimizer=lc.SGD(lr=0.1, weight_decay=0.01),
                          num_threads=nt)
        assert any(r["op"] == "gemm+sgd" for r in prog.instructions("step")), prog.summary()
        w0 = prog.params["w"].copy()
        prog.step({"x": X.astype(np.float32), "t": T.astype(np.float32)})
        out.append((w0, prog.params["w"]))
    G = X.T @ (2 * (X @ out[0][0].astype(np.float64) - T) / (K * N))
    want = out[0][0] - 0.1 * (G + 0.01 * out[0][0])
    np.testing.assert_allclose(out[0][1], want, rtol=2e-4, atol=1e-6)
    assert np.array_equal(out[0][1], out[1][1])


def test_row_vector_kernel_in_the_folded_sgd_update():
    # one input feature: the weight gradient x^T g is a (1, B) x (B, N) GEMM that plain SGD folds into
    # the update -- the M = 1 kernel then runs with alpha = -lr and beta = 1 - lr * wd
    rng = np.random.default_rng(3)
    B, N, lr, wd = 16, 40, 0.1, 0.01
    g = lc.Graph("fold")
    x = g.input("x", (B, 1), dtype="float64")
    t = g.input("t", (B, N), dtype="float64")
    w = g.param("w", rng.standard_normal((1, N)))
    loss = lc.mse(x @ w, t)
    prog = lc.compile(g, loss=loss, optimizer=lc.SGD(lr=lr, weight_decay=wd))
    assert any(r["op"] == "gemm+sgd" for r in prog.instructions("step")), prog.summary()
    X, T = rng.standard_normal((B, 1)), rng.standard_normal((B, N))
    W = prog.params["w"].copy()
    for _ in range(3):
        prog.step({"x": X, "t": T})
        G = X.T @ (2 * (X @ W - T) / (B * N))
        W = W - lr * (G + wd * W)
    np.testing.assert_allclose(prog.params["w"], W, rtol=1e-12, atol=1e-14)


def test_memory_report_plot_writes_a_timeline(tmp_path):
    pytest.importorskip("matplotlib")
    g, loss = _graph(*CASES["linear_relu"][:2])
    prog = lc.compile(g, loss=loss, optimizer=lc.SGD(lr=0.1))
    path = prog.memory_report().plot(tmp_path / "mem.png")
    assert (tmp_path / "mem.png").stat().st_size > 1000 and str(path).endswith("mem.png")


def test_memory_report_plot_without_matplotlib_names_the_extra(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *a, **k)

    g, loss = _graph(*CASES["linear_relu"][:2])
    prog = lc.compile(g, loss=loss)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"libml\[plot\]"):
        prog.memory_report().plot("unused.png")


def test_softmax_xent_forward_and_backward_run_as_one_kernel():
    from libml_models.builders import mlp
    g, loss = mlp([20, 16, 7], 12, dtype="float64")
    prog = lc.compile(g, loss=loss, optimizer=lc.SGD(lr=0.1))
    assert "xent_grad+loss" in prog.summary("step") and "softmax_xent" not in prog.summary("step")
    rng = np.random.default_rng(3)
    feeds = {"x": rng.standard_normal((12, 20)), "y": rng.integers(0, 7, 12)}
    ref = prog.run(feeds)["loss"]             # the forward-only kernel
    assert prog.step(feeds) == pytest.approx(float(ref), rel=1e-14)


def test_values_reduced_early_and_used_later_keep_their_registers():
    # s = sum(u) is declared before u's other consumers, so a naive register allocator would recycle
    # u's register after its last elementwise use while the reduction still needs it at the block end
    g = lc.Graph("regs")
    p = g.param("p", RNG.standard_normal((33, 700)))
    u = lc.sigmoid(p)
    s = lc.sum(u, axis=0)
    v = lc.exp(u * 2.0)
    w = v * 3.0 + 1.0
    t = lc.sum(w, axis=0)
    g.output("s", s)
    g.output("t", t)
    prog = lc.compile(g)
    assert prog.instruction_count("run") == 1, prog.summary("run")
    P = prog.params["p"]
    U = 1 / (1 + np.exp(-P))
    out = prog.run({})
    np.testing.assert_allclose(out["s"], U.sum(0), rtol=1e-12)
    np.testing.assert_allclose(out["t"], (np.exp(2 * U) * 3 + 1).sum(0), rtol=1e-12)


def test_inplace_output_never_overwrites_an_input_a_reduction_still_reads():
    # x (a GEMM result) dies in the fused group that computes relu(x) and sum(x): relu(x) may not take
    # x's buffer, because the reduction reads x straight from memory when the block's outputs are stored
    g = lc.Graph("inplace_red")
    a = g.param("a", RNG.standard_normal((40, 30)))
    w = g.param("w", RNG.standard_normal((30, 600)))
    x = a @ w
    y = lc.relu(x)
    s = lc.sum(x, axis=0)
    g.output("y", y)
    g.output("s", s)
    prog = lc.compile(g)
    X = prog.params["a"] @ prog.params["w"]
    out = prog.run({})
    np.testing.assert_allclose(out["y"], np.maximum(X, 0), rtol=1e-12)
    np.testing.assert_allclose(out["s"], X.sum(0), rtol=1e-12)


def test_reductions_over_empty_inputs_are_zero_even_in_a_reused_arena():
    g = lc.Graph("empty")
    x = g.input("x", (0, 5))
    w = g.param("w", np.ones(5, np.float32))
    s = lc.sum(lc.relu(x * w), axis=0)
    g.output("s", s)
    prog = lc.compile(g)
    prog.executable._arena[...] = 0xFF  # stale bytes, as after other entries ran
    np.testing.assert_array_equal(prog.run({"x": np.zeros((0, 5), np.float32)})["s"], np.zeros(5, np.float32))


def test_sibling_kernels_reading_one_tensor_are_merged():
    # relu(h), sum(h) and 2*exp(h) read the materialised GEMM output h: one kernel reads it once
    rng = np.random.default_rng(0)
    g = lc.Graph("sib")
    x = g.input("x", (64, 300))
    w = g.param("w", (rng.standard_normal((300, 300)) * 0.05).astype(np.float32))
    h = x @ w
    g.output("r", lc.relu(h))
    g.output("s", lc.sum(h, axis=0))
    g.output("e", lc.exp(h) * 2.0)
    prog = lc.compile(g)
    kernels = [r for r in prog.instructions("run") if r["op"] != "gemm"]
    assert len(kernels) == 1 and len(kernels[0]["members"]) == 4, prog.summary("run")
    X = rng.standard_normal((64, 300)).astype(np.float32)
    out = prog.run({"x": X})
    H = X.astype(np.float64) @ prog.params["w"]
    np.testing.assert_allclose(out["r"], np.maximum(H, 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["s"], H.sum(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["e"], 2 * np.exp(H), rtol=1e-5, atol=1e-5)


def test_siblings_that_depend_on_each_other_stay_apart():
    # r = relu(x) feeds a GEMM whose result a sibling reads: merging them would be a cycle
    rng = np.random.default_rng(1)
    g = lc.Graph("sib_dep")
    x = g.input("x", (32, 32))
    w = g.param("w", (rng.standard_normal((32, 32)) * 0.1).astype(np.float32))
    r = lc.relu(x)
    m = r @ w
    g.output("o", x * m)
    g.output("r", r)
    prog = lc.compile(g)
    X = rng.standard_normal((32, 32)).astype(np.float32)
    out = prog.run({"x": X})
    R = np.maximum(X, 0)
    np.testing.assert_allclose(out["o"], X * (R @ prog.params["w"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["r"], R)


def test_mean_over_no_elements_is_nan_like_numpy():
    g = lc.Graph("empty_mean")
    x = g.input("x", (0, 5))
    g.output("m0", lc.mean(x, axis=0))      # (5,): each a mean over nothing
    g.output("m", lc.mean(x))               # scalar
    g.output("s", lc.sum(x, axis=0))        # sums over nothing stay 0
    prog = lc.compile(g)
    prog.executable._arena[...] = 0  # a NaN must come from the mean, not from stale bytes
    out = prog.run({"x": np.zeros((0, 5), np.float32)})
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning):
        want = np.zeros((0, 5), np.float32).mean(axis=0)
    assert np.isnan(want).all() and np.isnan(out["m0"]).all() and np.isnan(out["m"])
    np.testing.assert_array_equal(out["s"], np.zeros(5, np.float32))


def test_relu_backward_and_bias_gradient_run_in_the_gradient_gemm_epilogue():
    build, shapes, _ = CASES["mlp_relu_backward_epilogue_panels"]
    g, loss = _graph(build, shapes)
    for nt in (1, 2):
        prog = lc.compile(g, loss=loss, num_threads=nt)
        assert "gemm+relu'+colsum" in prog.summary("grad"), prog.summary("grad")
    p1 = lc.compile(g, loss=loss, num_threads=1).grad({})
    p2 = lc.compile(g, loss=loss, num_threads=2).grad({})
    for k in p1:
        assert np.array_equal(p1[k], p2[k]), k


def _random_elementwise_graph(seed):
    """A random DAG of elementwise ops over (R, C) params, (C,) params and scalar constants, with several
    outputs and a loss mixing sums and means: a differential test of fusion, superinstruction selection
    and register allocation (every value stays finite: divisors are 1 + relu(.) or 0.5 + sigmoid(.))."""
    rng = np.random.default_rng(seed)
    R, C = int(rng.integers(1, 5)), int(rng.choice([1, 7, 130, 300]))
    g = lc.Graph(f"rand{seed}")
    vals = [g.param(f"p{k}", rng.standard_normal((R, C))) for k in range(2)]
    vals.append(g.param("v", rng.standard_normal(C)))
    for _ in range(int(rng.integers(4, 14))):
        a, b = (vals[int(rng.integers(len(vals)))] for _ in range(2))
        c = float(rng.choice([0.5, 1.0, 2.0, -3.0]))
        kind = int(rng.integers(11))
        if kind == 0:
            t = a + b
        elif kind == 1:
            t = a - b
        elif kind == 2:
            t = a * b
        elif kind == 3:
            t = lc.div(a, 1.0 + lc.relu(b))
        elif kind == 4:
            t = lc.relu(a + b) if rng.integers(2) else lc.relu(a - c)
        elif kind == 5:
            t = lc.sigmoid(a) * (c - b)
        elif kind == 6:
            t = a * c + b if rng.integers(2) else c - a * b
        elif kind == 7:
            t = lc.div(a * b, 0.5 + lc.sigmoid(a))
        elif kind == 8:
            t = lc.exp(lc.sigmoid(a)) - b * c
        elif kind == 9:
            t = lc.div(c, 1.0 + lc.relu(a)) * b
        else:
            t = lc.relu(a) * lc.relu(b)
        vals.append(t)
    outs = vals[3:]
    picks = rng.choice(len(outs), size=min(3, len(outs)), replace=False)
    loss = None
    for k, i in enumerate(picks):
        g.output(f"o{k}", outs[i])
        term = lc.mean(outs[i]) if k % 2 else lc.sum(outs[i] * 0.1)
        loss = term if loss is None else loss + term
    g.output("loss", loss)
    return g, loss


@pytest.mark.parametrize("seed", range(40))
def test_random_elementwise_graphs_fused_equal_unfused(seed):
    g, loss = _random_elementwise_graph(seed)
    fused = lc.compile(g, loss=loss, fuse=True)
    plain = lc.compile(g, loss=loss, fuse=False)
    a, b = fused.grad({}), plain.grad({})
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-11, atol=1e-12, err_msg=k)
    ra, rb = fused.run({}), plain.run({})
    for k in rb:
        np.testing.assert_allclose(ra[k], rb[k], rtol=1e-11, atol=1e-12, err_msg=k)


def test_negated_gradient_contributions_become_subtractions():
    # d/dp of sum(w * (sigmoid(p) - p)): the second path contributes -g, accumulated as an add of a neg;
    # simplification turns it into one subtraction, so no NEG pass is left in the kernel
    rng = np.random.default_rng(0)
    g = lc.Graph("negacc")
    p = g.param("p", rng.standard_normal((4, 9)))
    w = g.input("w", (4, 9), dtype="float64")
    loss = lc.sum(w * (lc.sigmoid(p) - p))
    prog = lc.compile(g, loss=loss)
    steps = [s for r in prog.instructions("grad") for s in r.get("program", [])]
    assert steps and not any("=NEG(" in s for s in steps), steps
    P, W = prog.params["p"], rng.standard_normal((4, 9))
    s = 1 / (1 + np.exp(-P))
    np.testing.assert_allclose(prog.grad({"w": W})["p"], W * s * (1 - s) - W, rtol=1e-12, atol=1e-14)


def test_arena_and_state_start_on_a_cache_line_for_compiled_and_loaded_plans(tmp_path):
    # the plan's offsets are multiples of 64; a 64-aligned base keeps every operand on a cache-line
    # boundary (NumPy's own allocations are only 16-aligned: 64-byte vector loads then split over lines)
    import libml_runtime
    g = lc.Graph("aligned")
    x = g.input("x", (3, 5))
    w = g.param("w", RNG.standard_normal((5, 7)).astype(np.float32))
    g.output("y", lc.relu(x @ w))
    prog = lc.compile(g)
    exes = [prog.executable, libml_runtime.load(prog.save(tmp_path / "p.lmplan"))]
    for exe in exes:
        assert exe._arena.ctypes.data % 64 == 0 and exe._state.ctypes.data % 64 == 0
    X = RNG.standard_normal((3, 5)).astype(np.float32)
    np.testing.assert_array_equal(exes[0].run({"x": X})["y"], exes[1].run({"x": X})["y"])
    # the compiled program adopts the compiler's state buffer without a copy
    assert prog.executable._state is prog.plan.state
