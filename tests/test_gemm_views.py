"""GEMM operands read and written in place as strided views (libml_compile/views.py, opcode gemm_strided),
and scalar factors folded into BLAS's alpha (passes.fold_gemm_scales).

Attention's head split (reshape -> select q/k/v -> transpose to (B, H, S, D)), K^T and the permute back
used to be one copy each; now the GEMMs read the in-projection's output and write the context in the
out-projection's layout.  Pinned against NumPy (the views), PyTorch autograd (values and gradients),
thread-count determinism, the plan validator (strides that overlap or leave the buffer), and the plan's
own instruction list (no transpose left in the forward pass)."""
import numpy as np
import pytest
import torch

import libml_compile as lc
import libml_runtime as lr
from libml_compile import views
from libml_compile.ops import slice_axis
from libml_runtime import format as F
from libml_runtime import planfile as PF


def _as_view(base, v):
    flat = np.ascontiguousarray(base).reshape(-1)
    isz = flat.itemsize
    return np.lib.stride_tricks.as_strided(flat[v.offset:], v.shape, [s * isz for s in v.strides])


CHAINS = {
    # name: (input shape, [(op, args)]) applied in order, both in libml and in NumPy
    "heads": ((2, 5, 12), [("reshape", (2, 5, 3, 2, 2)), ("select", (2, 1)), ("transpose", (0, 2, 1, 3))]),
    "torch_mha_seq_first": ((5, 2, 12), [("reshape", (5, 2, 3, 4)), ("reshape", (1, 5, 2, 3, 4)),
                                         ("transpose", (3, 1, 2, 0, 4)), ("reshape", (3, 5, 2, 4)),
                                         ("select", (0, 2)), ("reshape", (5, 4, 2)), ("transpose", (1, 0, 2)),
                                         ("reshape", (2, 2, 5, 2))]),
    "slice_then_transpose": ((4, 6, 8), [("slice", (2, 1, 5)), ("transpose", (0, 2, 1))]),
    "broadcast_batch": ((1, 6, 8), [("broadcast_to", (3, 6, 8)), ("transpose", (0, 2, 1))]),
    "keepdim_gather": ((3, 4, 5), [("gather1", (0, 2)), ("transpose", (0, 2, 1))]),
}


def _apply(lib, x, op, a):
    if op == "reshape":
        return lc.reshape(x, a) if lib else x.reshape(a)
    if op == "transpose":
        return lc.transpose(x, a) if lib else x.transpose(a)
    if op == "select":
        ax, i = a
        return lc.gather(x, np.int64(i), axis=ax) if lib else np.take(x, i, axis=ax)
    if op == "gather1":
        ax, i = a
        return lc.gather(x, np.array([i]), axis=ax) if lib else np.take(x, [i], axis=ax)
    if op == "slice":
        ax, lo, hi = a
        return slice_axis(x, ax, lo, hi) if lib else np.take(x, range(lo, hi), axis=ax)
    if op == "broadcast_to":
        return lc.broadcast_to(x, a) if lib else np.broadcast_to(x, a)
    raise AssertionError(op)


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_view_chain_reads_the_same_elements_as_numpy(name):
    shape, chain = CHAINS[name]
    g = lc.Graph("v")
    x = g.input("x", shape)
    t, ref = x, np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    for op, a in chain:
        t, ref = _apply(True, t, op, a), _apply(False, ref, op, a)
    got = views.view_chain(t)
    assert got is not None, f"{name}: the chain is a strided view but was not recognised"
    base, v = got
    assert base is x and v.shape == ref.shape
    np.testing.assert_array_equal(_as_view(np.arange(np.prod(shape), dtype=np.float32), v), ref)


def test_a_reshape_that_needs_a_copy_is_not_a_view():
    g = lc.Graph("v")
    x = g.input("x", (4, 6))
    # (4, 6)^T = (6, 4) merged into 24 elements is not evenly spaced: a copy
    assert views.view_chain(lc.reshape(lc.transpose(x, (1, 0)), (24,))) is None


def _attention(g, B, S, E, H, dt, seed=0, scale_each=True):
    """Multi-head self-attention as exporters emit it: x @ Wqkv, reshape, select q/k/v, head transposes,
    scaled scores (q and k each by sqrt(1/sqrt(D)), as the dynamo exporter does), softmax, @ v, permute
    back, out-projection."""
    rng = np.random.default_rng(seed)
    D = E // H
    vals = {"Wqkv": rng.standard_normal((E, 3 * E)) * 0.3, "Wo": rng.standard_normal((E, E)) * 0.3}
    x = g.input("x", (B, S, E), dt)
    p = {k: g.param(k, v.astype(dt)) for k, v in vals.items()}
    qkv = lc.reshape(x @ p["Wqkv"], (B, S, 3, H, D))
    q, k, v = (lc.transpose(lc.gather(qkv, np.int64(i), axis=2), (0, 2, 1, 3)) for i in range(3))
    if scale_each:
        c = float(np.sqrt(1 / np.sqrt(D)))
        s = (q * c) @ (lc.transpose(k, (0, 1, 3, 2)) * c)
    else:
        s = (q @ lc.transpose(k, (0, 1, 3, 2))) / float(np.sqrt(D))
    ctx = lc.transpose(lc.softmax(s, axis=-1) @ v, (0, 2, 1, 3))
    y = lc.reshape(ctx, (B, S, E)) @ p["Wo"]
    return y, vals, rng.standard_normal((B, S, E))


def _torch_attention(vals, x, B, S, E, H, dt):
    D = E // H
    P = {k: torch.tensor(v.astype(dt), requires_grad=True) for k, v in vals.items()}
    X = torch.tensor(x.astype(dt))
    qkv = (X @ P["Wqkv"]).reshape(B, S, 3, H, D)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    ctx = torch.softmax(q @ k.transpose(-1, -2) / D ** 0.5, -1) @ v
    y = ctx.transpose(1, 2).reshape(B, S, E) @ P["Wo"]
    return y, P


@pytest.mark.parametrize("scale_each", [True, False])
@pytest.mark.parametrize("dt,tol", [("float64", 1e-10), ("float32", 2e-4)])
def test_attention_reads_and_writes_heads_in_place_and_matches_torch(dt, tol, scale_each):
    B, S, E, H = 2, 7, 12, 3
    g = lc.Graph("attn")
    y, vals, x = _attention(g, B, S, E, H, dt, scale_each=scale_each)
    g.output("y", y)
    loss = lc.sum((y * y) * 0.5)
    prog = lc.compile(g, loss, lc.SGD(0.1))
    run_ops = [r["op"] for r in prog.instructions("run")]
    # one GEMM per product, nothing moved: no transpose, no select copy, no scale pass
    assert run_ops == ["gemm", "gemm", "softmax", "gemm", "gemm"], run_ops
    code = prog.plan.entries["run"].code
    assert sum(op == "gemm_strided" for _, op, _, _ in F.instructions(code)) == 2
    yt, P = _torch_attention(vals, x, B, S, E, H, dt)
    np.testing.assert_allclose(prog.run({"x": x.astype(dt)})["y"], yt.detach().numpy(), rtol=tol, atol=tol)
    (0.5 * (yt * yt).sum()).backward()
    grads = prog.grad({"x": x.astype(dt)})
    for k in vals:
        np.testing.assert_allclose(grads[k], P[k].grad.numpy(), rtol=tol * 5, atol=tol * 5, err_msg=k)
    grad_ops = [r["op"] for r in prog.instructions("grad")]
    # the backward's head transposes are views too (a copy may remain where q/k/v's gradients meet)
    assert grad_ops.count("transpose") <= 1, grad_ops


def test_attention_is_bit_identical_for_one_and_two_threads():
    B, S, E, H = 4, 16, 32, 4
    outs = []
    for nt in (1, 2):
        g = lc.Graph("attn")
        y, vals, x = _attention(g, B, S, E, H, "float32", seed=3)
        g.output("y", y)
        prog = lc.compile(g, lc.sum(y * y), lc.SGD(0.1), num_threads=nt)
        feeds = {"x": x.astype(np.float32)}
        outs.append((prog.run(feeds)["y"], prog.grad(feeds)))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    for k in outs[0][1]:
        np.testing.assert_array_equal(outs[0][1][k], outs[1][1][k])


@pytest.mark.parametrize("form", ["left", "right", "product", "divide"])
def test_scalar_factor_folds_into_the_gemm_alpha(form):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((6, 5)), rng.standard_normal((5, 4))
    g = lc.Graph("s")
    A, Bm = g.input("a", (6, 5), "float64"), g.input("b", (5, 4), "float64")
    y = {"left": lambda: (A * 0.25) @ Bm, "right": lambda: A @ (3.0 * Bm),
         "product": lambda: (A @ Bm) * -2.0, "divide": lambda: (A @ Bm) / 8.0}[form]()
    g.output("y", y)
    prog = lc.compile(g)
    assert [r["op"] for r in prog.instructions("run")] == ["gemm"]
    want = {"left": (a * 0.25) @ b, "right": a @ (3.0 * b), "product": (a @ b) * -2.0, "divide": (a @ b) / 8.0}[form]
    np.testing.assert_allclose(prog.run({"a": a, "b": b})["y"], want, rtol=1e-13)


def _strided_plan():
    g = lc.Graph("attn")
    y, _, _ = _attention(g, 2, 7, 12, 3, "float32")
    g.output("y", y)
    return lc.compile(g).plan


def _mutated(plan, fn):
    p = PF.loads(PF.dumps(plan))
    code = p.entries["run"].code
    for pc, op, _, val in F.instructions(code):
        if op == "gemm_strided":
            fn(code, F.locate(code, pc)[1], val)
            return p
    raise AssertionError("no gemm_strided instruction")


@pytest.mark.parametrize("field,value,match", [
    ("ldc", 1, "ldc"),                         # below the row length N
    ("lda", 1 << 24, "outside its buffer"),    # rows past the end of A's buffer
    ("C.batch_stride", 0, "overlap"),          # two batch entries writing the same elements
])
def test_validator_refuses_strided_gemm_fields_that_would_misread_or_race(field, value, match):
    plan = _strided_plan()
    lr.validate(plan)

    def put(code, at, val):
        pos = at[field]
        for k in (pos if isinstance(pos, list) else [pos]):
            code[k] = value
    with pytest.raises(lr.PlanError, match=match):
        lr.validate(_mutated(plan, put))
