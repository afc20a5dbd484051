"""The bool dtype and the comparison / logic family (ops_logic.py): forward against NumPy (NaN, Inf,
broadcasting, integer and bool operands), Where's gradients against PyTorch autograd and float64 central
differences, Mod's two sign conventions, bool inputs / consts / outputs / casts, how the kernels are chosen
(fused float masks, integer kernel, select), and a masked-attention step against PyTorch."""
import numpy as np
import pytest

import libml_compile as lc
from conftest import assert_close, check_grads_fd

torch = pytest.importorskip("torch")

CMP = {"equal": np.equal, "less": np.less, "less_equal": np.less_equal, "greater": np.greater,
       "greater_equal": np.greater_equal}
SPECIAL = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0, 2.5])


def _run(build, feeds, **kw):
    """Compile the graph ``build(g)`` makes (it declares inputs and outputs) and run it once."""
    g = lc.Graph("logic")
    build(g)
    return lc.compile(g, **kw).run(feeds)


def _floats(rng, shape, dtype):
    """Random floats with NaN, +-Inf, +-0 and exact ties mixed in (ties: values from a small set)."""
    v = rng.choice(np.concatenate([SPECIAL, rng.integers(-3, 4, 8).astype(float)]), size=shape)
    return v.astype(dtype)


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("op", sorted(CMP))
def test_float_comparisons_match_numpy_with_nan_inf_and_broadcasting(op, dtype, fuse):
    rng = np.random.default_rng(len(op))
    a, b = _floats(rng, (3, 1, 5), dtype), _floats(rng, (4, 1), dtype)

    def build(g):
        x, y = g.input("a", a.shape, dtype), g.input("b", b.shape, dtype)
        g.output("c", getattr(lc, op)(x, y))
        g.output("s", getattr(lc, op)(x, 1.0))  # a scalar operand (a VM immediate)
    out = _run(build, {"a": a, "b": b}, fuse=fuse)
    assert out["c"].dtype == np.bool_ and out["c"].shape == (3, 4, 5)
    np.testing.assert_array_equal(out["c"], CMP[op](a, b))
    np.testing.assert_array_equal(out["s"], CMP[op](a, np.asarray(1.0, dtype)))


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "int32", "int64", "uint32", "uint64"])
def test_integer_comparisons_match_numpy(dtype):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(3)
    vals = np.array([info.min, info.max, 0, 1, info.min + 1, 7], dtype)
    a, b = rng.choice(vals, (2, 6)), rng.choice(vals, (6,))

    def build(g):
        x, y = g.input("a", a.shape, dtype), g.input("b", b.shape, dtype)
        for op in CMP:
            g.output(op, getattr(lc, op)(x, y))
    out = _run(build, {"a": a, "b": b})
    for op, f in CMP.items():
        assert out[op].dtype == np.bool_
        np.testing.assert_array_equal(out[op], f(a, b), err_msg=op)


def test_python_comparison_operators_build_nodes_and_equality_stays_identity():
    g = lc.Graph("ops")
    x, y = g.input("x", (4,)), g.input("y", (4,))
    assert (x < y).op == "less" and (x <= 0.5).op == "less_equal"
    assert (x > y).op == "greater" and (x >= y).op == "greater_equal"
    assert (0.5 < x).op == "greater"  # reflected by Python: 0.5 < x is x > 0.5
    # == keeps identity (tensors are dict keys and set members throughout the compiler)
    assert (x == y) is False and (x == x) is True and len({x, y, x}) == 2
    g.output("lt", x < y)
    g.output("r", 0.5 < x)
    xv, yv = np.float32([0, 1, 2, np.nan]), np.float32([1, 1, 1, 1])
    out = lc.compile(g).run({"x": xv, "y": yv})
    np.testing.assert_array_equal(out["lt"], xv < yv)
    np.testing.assert_array_equal(out["r"], 0.5 < xv)


@pytest.mark.parametrize("fuse", [True, False])
def test_logic_on_bool_inputs_and_on_float_masks(fuse):
    rng = np.random.default_rng(5)
    p, q = rng.random((3, 4)) < 0.5, rng.random((4,)) < 0.5
    a, b = _floats(rng, (3, 4), "float32"), _floats(rng, (3, 4), "float32")

    def build(g):
        P, Q = g.input("p", p.shape, bool), g.input("q", q.shape, bool)
        A, B = g.input("a", a.shape), g.input("b", b.shape)
        g.output("and", lc.logical_and(P, Q))     # bools that are not masks: the integer kernel
        g.output("or", lc.logical_or(P, Q))
        g.output("xor", lc.logical_xor(P, Q))
        g.output("not", lc.logical_not(P))
        m = lc.logical_and(A < B, lc.logical_not(lc.isnan(A)))  # masks: the float VM
        g.output("mix", lc.logical_or(m, Q))                    # a mask with a fed bool
        g.output("mixx", lc.logical_xor(lc.logical_not(m), P))
        g.output("and_const", lc.logical_and(P, True))
    out = _run(build, {"p": p, "q": q, "a": a, "b": b}, fuse=fuse)
    np.testing.assert_array_equal(out["and"], p & q)
    np.testing.assert_array_equal(out["or"], p | q)
    np.testing.assert_array_equal(out["xor"], p ^ q)
    np.testing.assert_array_equal(out["not"], ~p)
    m = (a < b) & ~np.isnan(a)
    np.testing.assert_array_equal(out["mix"], m | q)
    np.testing.assert_array_equal(out["mixx"], ~m ^ p)
    np.testing.assert_array_equal(out["and_const"], p)
    assert all(v.dtype == np.bool_ for v in out.values())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_isnan_isinf(dtype):
    x = np.tile(SPECIAL, (2, 1)).astype(dtype)

    def build(g):
        X = g.input("x", x.shape, dtype)
        g.output("nan", lc.isnan(X))
        g.output("inf", lc.isinf(X))
        g.output("pos", lc.isinf(X, detect_negative=False))
        g.output("neg", lc.isinf(X, detect_positive=False))
        g.output("none", lc.isinf(X, detect_positive=False, detect_negative=False))
    out = _run(build, {"x": x})
    np.testing.assert_array_equal(out["nan"], np.isnan(x))
    np.testing.assert_array_equal(out["inf"], np.isinf(x))
    np.testing.assert_array_equal(out["pos"], np.isposinf(x))
    np.testing.assert_array_equal(out["neg"], np.isneginf(x))
    np.testing.assert_array_equal(out["none"], np.zeros(x.shape, bool))


@pytest.mark.parametrize("fuse", [True, False])
def test_where_forward_float_int_bool_with_broadcasting(fuse):
    rng = np.random.default_rng(7)
    c = rng.random((3, 1, 4)) < 0.5
    x, y = _floats(rng, (2, 4), "float32"), _floats(rng, (3, 2, 1), "float32")
    xi, yi = rng.integers(-100, 100, (2, 4)).astype(np.int64), np.int64(-7)
    p, q = rng.random((4,)) < 0.5, rng.random((3, 2, 4)) < 0.5

    def build(g):
        C = g.input("c", c.shape, bool)
        X, Y = g.input("x", x.shape), g.input("y", y.shape)
        g.output("f", lc.where(C, X, Y))
        g.output("f_imm", lc.where(C, X, -1e9))
        g.output("f_mask", lc.where(X > 0, X, Y))          # the condition is fused as a mask
        XI = g.input("xi", xi.shape, "int64")
        g.output("i", lc.where(C, XI, -7))                  # integers: the select instruction
        P, Q = g.input("p", p.shape, bool), g.input("q", q.shape, bool)
        g.output("b", lc.where(C, P, Q))
    out = _run(build, {"c": c, "x": x, "y": y, "xi": xi, "p": p, "q": q}, fuse=fuse)
    np.testing.assert_array_equal(out["f"], np.where(c, x, y))
    np.testing.assert_array_equal(out["f_imm"], np.where(c, x, np.float32(-1e9)))
    np.testing.assert_array_equal(out["f_mask"], np.where(x > 0, x, y))
    np.testing.assert_array_equal(out["i"], np.where(c, xi, yi))
    assert out["i"].dtype == np.int64
    np.testing.assert_array_equal(out["b"], np.where(c, p, q))
    assert out["b"].dtype == np.bool_


def _where_graph(c, xv, yv, wv, dtype):
    """loss = sum(where(c, x * w, y) ** 2 * R): both branches and the condition's broadcasting."""
    g = lc.Graph("w")
    C = g.const(c)
    x, y, w = g.param("x", xv.astype(dtype)), g.param("y", yv.astype(dtype)), g.param("w", wv.astype(dtype))
    R = np.random.default_rng(0).standard_normal((3, 4)).astype(dtype)
    out = lc.where(C, x * w, y)
    loss = lc.sum(out * out * g.const(R))
    g.output("out", out)
    g.output("loss", loss)
    return g, loss, R


def test_where_gradients_match_torch_and_finite_differences():
    rng = np.random.default_rng(11)
    c = rng.random((3, 1)) < 0.5                       # broadcast over columns
    c[0, 0], c[1, 0] = True, False
    xv, yv, wv = rng.standard_normal((3, 4)), rng.standard_normal((4,)), rng.standard_normal((1, 4))
    # float64: central differences
    g, loss, R = _where_graph(c, xv, yv, wv, np.float64)
    prog = lc.compile(g, loss=loss)
    check_grads_fd(prog, {}, ["x", "y", "w"], rtol=1e-6, atol=1e-8)
    # float32: PyTorch autograd
    g, loss, R = _where_graph(c, xv, yv, wv, np.float32)
    grads = lc.compile(g, loss=loss).grad({})
    tx, ty, tw = (torch.tensor(v.astype(np.float32), requires_grad=True) for v in (xv, yv, wv))
    o = torch.where(torch.tensor(c), tx * tw, ty)
    (o * o * torch.tensor(R)).sum().backward()
    for name, t in (("x", tx), ("y", ty), ("w", tw)):
        assert_close(grads[name], t.grad.numpy(), rtol=1e-5, atol=1e-6, what=f"d loss / d {name}")


def test_where_with_a_computed_condition_gets_gradients_through_both_branches():
    # the condition is a comparison of the params themselves (the usual clamp-like pattern)
    rng = np.random.default_rng(12)
    av = rng.standard_normal((5, 3))
    g = lc.Graph("w2")
    a = g.param("a", av)
    out = lc.where(a > 0.1, a * a, lc.sin(a))
    loss = lc.sum(out * g.const(np.arange(15.0).reshape(5, 3)))
    g.output("loss", loss)
    prog = lc.compile(g, loss=loss)
    check_grads_fd(prog, {}, ["a"], rtol=1e-6, atol=1e-8)
    ta = torch.tensor(av, requires_grad=True)
    (torch.where(ta > 0.1, ta * ta, torch.sin(ta)) * torch.arange(15.0, dtype=torch.float64).reshape(5, 3)).sum().backward()
    assert_close(prog.grad({})["a"], ta.grad.numpy(), rtol=1e-10, atol=1e-12, what="d loss / d a")


def test_a_comparison_feeding_where_fuses_into_one_kernel_without_bool_round_trip():
    g = lc.Graph("fuse")
    a, b, x = g.input("a", (64, 64)), g.input("b", (64, 64)), g.input("x", (64, 64))
    g.output("y", lc.exp(lc.where(lc.logical_and(a < b, lc.logical_not(lc.isnan(x))), x * 2.0, -1e9)))
    prog = lc.compile(g)
    ins = prog.instructions("run")
    assert [r["op"] for r in ins] == ["fused_elementwise"], ins
    steps = " ".join(ins[0]["program"])
    for vm in ("LT(", "ISNAN(", "NOT(", "AND(", "WHERE(", "EXP("):
        assert vm in steps, steps
    rng = np.random.default_rng(1)
    av, bv, xv = (rng.standard_normal((64, 64)).astype(np.float32) for _ in range(3))
    xv[0, :5] = np.nan
    ref = np.exp(np.where((av < bv) & ~np.isnan(xv), xv * 2, np.float32(-1e9)))
    y = prog.run({"a": av, "b": bv, "x": xv})["y"]
    np.testing.assert_array_equal(y == 0, ref == 0)  # exactly the masked entries (exp(-1e9) = 0)
    np.testing.assert_allclose(y, ref, rtol=1e-6)      # (the VM's vector exp differs from NumPy's by an ulp)


def test_a_bool_leaving_a_group_is_cast_to_one_byte_once():
    g = lc.Graph("out")
    a = g.input("a", (8,))
    m = a * 2.0 > 1.0
    g.output("m", m)
    g.output("y", lc.where(m, a, 0.0))
    prog = lc.compile(g)
    assert sorted(r["op"] for r in prog.instructions("run")) == ["cast", "fused_elementwise"]
    av = np.linspace(-1, 2, 8).astype(np.float32)
    out = prog.run({"a": av})
    np.testing.assert_array_equal(out["m"], av * 2 > 1)
    np.testing.assert_array_equal(out["y"], np.where(av * 2 > 1, av, 0))


def test_masked_attention_softmax_trains_one_step_like_torch():
    rng = np.random.default_rng(21)
    T, D = 6, 4
    q_in = rng.standard_normal((T, D)).astype(np.float32)
    wq, wk, wv = (rng.standard_normal((D, D)).astype(np.float32) * 0.5 for _ in range(3))
    target = rng.standard_normal((T, D)).astype(np.float32)
    mask = np.tril(np.ones((T, T), bool))                 # causal: a fed bool input
    lr = 0.1
    g = lc.Graph("attn")
    X, M, Y = g.input("x", (T, D)), g.input("mask", (T, T), bool), g.input("y", (T, D))
    Wq, Wk, Wv = g.param("wq", wq), g.param("wk", wk), g.param("wv", wv)
    scores = (X @ Wq) @ lc.transpose(X @ Wk) * (1 / np.sqrt(D))
    att = lc.softmax(lc.where(M, scores, -1e9), axis=-1)
    out = att @ (X @ Wv)
    loss = lc.mse(out, Y)
    g.output("loss", loss)
    prog = lc.compile(g, loss=loss, optimizer=lc.SGD(lr=lr))
    l0 = prog.step({"x": q_in, "mask": mask, "y": target})

    tw = [torch.tensor(w, requires_grad=True) for w in (wq, wk, wv)]
    tx = torch.tensor(q_in)
    s = (tx @ tw[0]) @ (tx @ tw[1]).T * (1 / np.sqrt(D))
    a = torch.softmax(torch.where(torch.tensor(mask), s, torch.tensor(-1e9)), dim=-1)
    tl = ((a @ (tx @ tw[2]) - torch.tensor(target)) ** 2).mean()
    tl.backward()
    assert abs(l0 - tl.item()) < 1e-5 * max(1, abs(tl.item()))
    params = prog.params
    for name, t in zip(("wq", "wk", "wv"), tw):
        assert_close(params[name], (t - lr * t.grad).detach().numpy(), rtol=1e-4, atol=1e-6, what=name)
    # the masked entries got no attention
    l1 = prog.run({"x": q_in, "mask": mask, "y": target})["loss"]
    assert l1 < l0


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "int32", "int64", "uint64"])
@pytest.mark.parametrize("fmod", [0, 1])
def test_integer_mod_both_sign_conventions(dtype, fmod):
    info = np.iinfo(dtype)
    a = np.array([7, -7, 7, -7, 0, info.min, info.max, 5, info.min], dtype) if info.min < 0 else \
        np.array([7, 0, info.max, 5, 3, 250 % (info.max + 1), 1, 9, 100], dtype)
    b = np.array([3, 3, -3, -3, 5, -1, 7, 5, 3], dtype) if info.min < 0 else np.array([3, 5, 7, 5, 1, 7, 2, 4, 9], dtype)

    def build(g):
        A, B = g.input("a", a.shape, dtype), g.input("b", b.shape, dtype)
        g.output("m", lc.mod(A, B, fmod=fmod))
        g.output("k", lc.mod(A, 4, fmod=fmod))
    out = _run(build, {"a": a, "b": b})
    with np.errstate(all="ignore"):
        ref = np.fmod(a, b) if fmod else np.mod(a, b)
        refk = np.fmod(a, np.asarray(4, dtype)) if fmod else np.mod(a, np.asarray(4, dtype))
    np.testing.assert_array_equal(out["m"], ref)
    np.testing.assert_array_equal(out["k"], refk)
    assert out["m"].dtype == np.dtype(dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_float_mod_and_fmod_match_numpy(dtype):
    rng = np.random.default_rng(2)
    a = np.concatenate([rng.standard_normal(20) * 10, [5.0, -5.0, 0.0, -0.0, np.inf, np.nan, 3.0, -1.0]]).astype(dtype)
    b = np.concatenate([rng.standard_normal(20) * 3, [2.5, 2.5, -2.0, 2.0, 2.0, 1.0, 0.0, np.inf]]).astype(dtype)

    def build(g):
        A, B = g.input("a", a.shape, dtype), g.input("b", b.shape, dtype)
        g.output("mod", lc.mod(A, B))
        g.output("fmod", lc.mod(A, B, fmod=1))
        g.output("fused", lc.exp(lc.mod(A * 1.0, 3.0)))  # fused with its producer and consumer
    out = _run(build, {"a": a, "b": b})
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(out["fmod"], np.fmod(a, b))
        np.testing.assert_array_equal(out["mod"], np.mod(a, b))
        np.testing.assert_array_equal(np.signbit(out["mod"]), np.signbit(np.mod(a, b)))
        np.testing.assert_allclose(out["fused"], np.exp(np.mod(a, np.asarray(3, dtype))), rtol=1e-6)


def test_integer_mod_by_zero_raises_naming_the_node():
    g = lc.Graph("z")
    a, b = g.input("a", (3,), "int32"), g.input("b", (3,), "int32")
    g.output("m", lc.mod(a, b, name="remainder"))
    prog = lc.compile(g)
    np.testing.assert_array_equal(prog.run({"a": np.int32([5, 6, 7]), "b": np.int32([2, 4, 3])})["m"], [1, 2, 1])
    with pytest.raises(ZeroDivisionError, match="remainder"):
        prog.run({"a": np.int32([5, 6, 7]), "b": np.int32([2, 0, 3])})
    with pytest.raises(ZeroDivisionError, match="mod"):
        g2 = lc.Graph("z2")
        g2.output("m", lc.mod(g2.const(np.int32([1, 2])), g2.const(np.int32([1, 0]))))
        lc.compile(g2)


def test_bool_inputs_consts_outputs_and_casts():
    x = np.float32([0.0, -0.0, 1.5, -2.0, np.nan, np.inf])
    flags = np.array([True, False, True, True, False, False])

    def build(g):
        X = g.input("x", x.shape)
        F_ = g.input("flags", flags.shape, dtype=bool)
        C = g.const(np.array([True, False, False, True, True, False]))
        assert C.dtype == "bool" and F_.dtype == "bool"
        g.output("to_bool", lc.cast(X, "bool"))                # x != 0: NaN is True, as NumPy
        g.output("to_f64", lc.cast(F_, "float64"))
        g.output("to_i32", lc.cast(F_, "int32"))
        g.output("i_to_bool", lc.cast(lc.cast(F_, "int8") - 1, "bool"))  # 0 / -1 -> False / True
        g.output("flags", lc.identity(F_))
        g.output("c", lc.logical_xor(F_, C))
        g.output("moved", lc.transpose(lc.reshape(lc.concat([F_, C]), (2, 6))))
    out = _run(build, {"x": x, "flags": flags})
    np.testing.assert_array_equal(out["to_bool"], x.astype(bool))
    assert out["to_bool"].dtype == np.bool_
    np.testing.assert_array_equal(out["to_f64"], flags.astype(np.float64))
    np.testing.assert_array_equal(out["to_i32"], flags.astype(np.int32))
    np.testing.assert_array_equal(out["i_to_bool"], ~flags)
    np.testing.assert_array_equal(out["flags"], flags)
    c = np.array([True, False, False, True, True, False])
    np.testing.assert_array_equal(out["c"], flags ^ c)
    np.testing.assert_array_equal(out["moved"], np.concatenate([flags, c]).reshape(2, 6).T)


def test_bool_feeds_are_checked_by_dtype():
    g = lc.Graph("feed")
    f = g.input("f", (3,), bool)
    g.output("n", lc.logical_not(f))
    prog = lc.compile(g)
    np.testing.assert_array_equal(prog.run({"f": np.array([True, False, True])})["n"], [False, True, False])
    with pytest.raises(TypeError, match="f"):
        prog.run({"f": np.float32([1, 0, 1])})


def test_declaration_errors_name_the_op_and_operand():
    g = lc.Graph("err")
    x, f = g.input("x", (3,)), g.input("f", (3,), bool)
    i = g.input("i", (3,), "int32")
    with pytest.raises(TypeError, match="where: the condition 'x' must be bool"):
        lc.where(x, x, x)
    with pytest.raises(TypeError, match="logical_and: needs bool operands, got 'x'"):
        lc.logical_and(x, f)
    with pytest.raises(TypeError, match="less: operand dtypes differ"):
        lc.less(x, i)
    with pytest.raises(TypeError, match="isnan: needs a floating tensor, got 'i'"):
        lc.isnan(i)
    with pytest.raises(TypeError, match="add: arithmetic on bool tensors"):
        f + f
    with pytest.raises(TypeError, match="where: the branches differ in dtype"):
        lc.where(f, x, i)
    with pytest.raises(TypeError, match="only True and False"):
        lc.logical_and(f, 1)
    with pytest.raises(ValueError, match="mod: fmod must be 0 or 1"):
        lc.mod(x, x, fmod=2)
    g.output("m", lc.mod(x, x))
    with pytest.raises(NotImplementedError, match="'mod'.*no gradient rule"):
        p = g.param("p", np.ones(3, np.float32))
        lc.compile(g, loss=lc.sum(lc.mod(p, 2.0)))


def test_onnx_import_of_a_masked_where_model():
    onnx = pytest.importorskip("onnx")
    h, TP = onnx.helper, onnx.TensorProto
    nodes = [h.make_node("Less", ["x", "t"], ["m"]), h.make_node("Not", ["m"], ["nm"]),
             h.make_node("And", ["nm", "flag"], ["c"]), h.make_node("Where", ["c", "x", "fill"], ["y"]),
             h.make_node("IsNaN", ["x"], ["nan"]), h.make_node("Mod", ["k", "three"], ["r"], fmod=0)]
    graph = h.make_graph(nodes, "g",
                         [h.make_tensor_value_info("x", TP.FLOAT, [2, 3]), h.make_tensor_value_info("flag", TP.BOOL, [3]),
                          h.make_tensor_value_info("k", TP.INT32, [3])],
                         [h.make_tensor_value_info("y", TP.FLOAT, [2, 3]), h.make_tensor_value_info("nan", TP.BOOL, [2, 3]),
                          h.make_tensor_value_info("r", TP.INT32, [3])],
                         [h.make_tensor("t", TP.FLOAT, [], [0.5]), h.make_tensor("fill", TP.FLOAT, [], [-1e9]),
                          h.make_tensor("three", TP.INT32, [], [3])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    g = lc.import_onnx(model)
    prog = lc.compile(g)
    x = np.float32([[0, 1, np.nan], [2, -1, 0.25]])
    flag = np.array([True, False, True])
    k = np.int32([-7, 8, 5])
    out = prog.run({"x": x, "flag": flag, "k": k})
    np.testing.assert_array_equal(out["y"], np.where(~(x < 0.5) & flag, x, np.float32(-1e9)))
    np.testing.assert_array_equal(out["nan"], np.isnan(x))
    np.testing.assert_array_equal(out["r"], np.mod(k, 3))


def test_compiling_leaves_the_users_graph_alone_and_is_deterministic():
    def build():
        g = lc.Graph("det")
        x, f = g.input("x", (4, 3)), g.input("f", (3,), bool)
        m = lc.logical_and(x > 0.0, f)
        g.output("m", m)
        g.output("y", lc.where(m, x, lc.where(f, 1.0, 0.0)))
        return g, m
    g, m = build()
    p1 = lc.compile(g)
    assert m.op == "logical_and" and m.dtype == "bool"  # the lowering rewrote a private clone
    p2 = lc.compile(build()[0])
    for kind in p1.plan.entries:
        np.testing.assert_array_equal(p1.plan.entries[kind].code, p2.plan.entries[kind].code)
    xv = np.float32([[1, -1, 0], [2, np.nan, -3], [0.5, 0.5, 0.5], [-1, -1, 4]])
    fv = np.array([True, False, True])
    out = p1.run({"x": xv, "f": fv})
    ref_m = (xv > 0) & fv
    np.testing.assert_array_equal(out["m"], ref_m)
    np.testing.assert_array_equal(out["y"], np.where(ref_m, xv, np.where(fv, 1.0, 0.0).astype(np.float32)))
    assert out["y"].dtype == np.float32


def test_kernel_choice_for_where():
    """Fed bool condition and nothing to fuse: one select; a float consumer: cast + one fused kernel."""
    g = lc.Graph("k")
    c, x, y = g.input("c", (16,), bool), g.input("x", (16,)), g.input("y", (16,))
    g.output("alone", lc.where(c, x, y))
    assert [r["op"] for r in lc.compile(g).instructions("run")] == ["where_select"]
    g2 = lc.Graph("k2")
    c, x, y = g2.input("c", (16,), bool), g2.input("x", (16,)), g2.input("y", (16,))
    g2.output("fused", lc.where(c, x, y) * 3.0)
    assert [r["op"] for r in lc.compile(g2).instructions("run")] == ["cast", "fused_elementwise"]


def test_a_plan_with_bools_saves_and_loads(tmp_path):
    import libml_runtime
    g = lc.Graph("saved")
    x, f, k = g.input("x", (5,)), g.input("f", (5,), bool), g.input("k", (5,), "int16")
    g.output("m", lc.logical_and(x < 1.0, f))
    g.output("w", lc.where(f, k, lc.mod(k, 3)))
    g.output("c", lc.greater(k, 0))
    prog = lc.compile(g)
    prog.save(tmp_path / "p.libml")
    loaded = libml_runtime.load(tmp_path / "p.libml")
    feeds = {"x": np.float32([0, 1, 2, np.nan, -5]), "f": np.array([True, True, False, True, False]),
             "k": np.int16([-4, 5, 7, -1, 0])}
    a, b = prog.run(feeds), loaded.run(feeds)
    for name in ("m", "w", "c"):
        np.testing.assert_array_equal(a[name], b[name])
        assert a[name].dtype == b[name].dtype
    np.testing.assert_array_equal(b["m"], (feeds["x"] < 1) & feeds["f"])
    np.testing.assert_array_equal(b["w"], np.where(feeds["f"], feeds["k"], np.mod(feeds["k"], 3)))
