"""Every activation runs as a GEMM epilogue, forward and backward (capability-matched, not relu only).

The ``epilogue`` capability of an op (ops.OpDef) lets passes.fuse_vm_epilogues fold it into the GEMM that
produces its operand 0: GELU/tanh/LeakyRelu/... after ``x @ W + b``, their gradient steps after the GEMM
producing the upstream gradient (with the bias gradient as the GEMM's column sums), and residual adds.
Pinned against PyTorch autograd, with the plan's instruction names showing the fusion happened."""
import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import libml_compile as lc
import libml_runtime as lr
from libml_runtime import format as F
from libml_runtime import planfile

ACTS = {
    "gelu": (lambda t: lc.gelu(t), TF.gelu, "gelu"),
    "gelu_tanh": (lambda t: lc.gelu(t, "tanh"), lambda t: TF.gelu(t, approximate="tanh"), "gelu_tanh"),
    "tanh": (lc.tanh, torch.tanh, "tanh"),
    "leaky_relu": (lambda t: lc.leaky_relu(t, 0.1), lambda t: TF.leaky_relu(t, 0.1), "leaky_relu"),
    "sigmoid": (lc.sigmoid, torch.sigmoid, "sigmoid"),
    "hard_swish": (lc.hard_swish, TF.hardswish, "hard_swish"),
    "elu": (lambda t: lc.elu(t, 0.7), lambda t: TF.elu(t, 0.7), "elu"),
    "mish": (lc.mish, TF.mish, "mish"),
    "softplus": (lc.softplus, TF.softplus, "softplus"),
}


def _mlp(act, dt, B=16, D=24, H=40, C=5, seed=0):
    rng = np.random.default_rng(seed)
    vals = dict(W1=rng.standard_normal((D, H)) * 0.3, b1=rng.standard_normal(H) * 0.1,
                W2=rng.standard_normal((H, H)) * 0.2, W3=rng.standard_normal((H, C)) * 0.3)
    x, y = rng.standard_normal((B, D)), rng.integers(0, C, B)
    g = lc.Graph("m")
    xi, yi = g.input("x", (B, D), dt), g.input("y", (B,), "int64")
    p = {k: g.param(k, v.astype(dt)) for k, v in vals.items()}
    f = ACTS[act][0]
    z = f(f(xi @ p["W1"] + p["b1"]) @ p["W2"]) @ p["W3"]
    return g, lc.softmax_cross_entropy(z, yi), vals, x, y


@pytest.mark.parametrize("dt,tol", [("float64", 1e-12), ("float32", 2e-5)])
@pytest.mark.parametrize("act", sorted(ACTS))
def test_activation_runs_as_forward_and_backward_gemm_epilogue_and_matches_torch(act, dt, tol):
    g, loss, vals, x, y = _mlp(act, dt)
    prog = lc.compile(g, loss, lc.SGD(0.1))
    name = ACTS[act][2]
    run_ops = [r["op"] for r in prog.instructions("run")]
    assert f"gemm+bias+{name}" in run_ops and f"gemm+{name}" in run_ops, run_ops
    ops = [r["op"] for r in prog.instructions("grad")]
    # backward: the derivative step sits on the GEMM that produces the upstream gradient
    assert any(o.startswith("gemm+") and ("_grad" in o or o.startswith("gemm+mul")) for o in ops), ops
    if act in ("tanh", "sigmoid"):
        # their gradient reads the output, so the pre-activation need not be stored
        assert f"gemm+bias+{name}" in ops, ops
    else:
        # the others' gradient reads the GEMM result itself: the epilogue writes the activation to a
        # buffer of its own and the GEMM keeps the pre-activation, a second output (gemm_ex_keep)
        assert f"gemm+bias+{name}+keep" in ops, ops
    # and no activation or derivative step is left outside a GEMM
    assert not any(m.split(":")[0] in (name, f"{name}_grad") for r in prog.instructions("grad")
                   for m in r.get("members", ())), prog.instructions("grad")
    out = prog.grad({"x": x.astype(dt), "y": y})
    T = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in vals.items()}
    tf = ACTS[act][1]
    tz = tf(tf(torch.tensor(x) @ T["W1"] + T["b1"]) @ T["W2"]) @ T["W3"]
    TF.cross_entropy(tz, torch.tensor(y)).backward()
    for k in T:
        want = T[k].grad.numpy()
        np.testing.assert_allclose(out[k], want, rtol=tol, atol=tol * np.abs(want).max(), err_msg=k)


def test_residual_add_of_a_full_tensor_is_a_gemm_epilogue():
    rng = np.random.default_rng(1)
    g = lc.Graph("res")
    x = g.input("x", (8, 16))
    r = g.input("r", (8, 32))
    w = g.param("w", rng.standard_normal((16, 32)).astype(np.float32))
    g.output("y", lc.tanh(x) @ w + r * 2.0)
    prog = lc.compile(g)
    assert "gemm+add" in [i["op"] for i in prog.instructions("run")]
    xv, rv = rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal((8, 32)).astype(np.float32)
    np.testing.assert_allclose(prog.run({"x": xv, "r": rv})["y"], np.tanh(xv) @ w.value + rv * 2, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("act", ["relu", "gelu", "none"])
def test_epilogue_applies_when_the_inner_dimension_is_empty(act):
    """x (4, 0) @ W (0, 3) + b is b in every row: the GEMM's epilogue must still run (it used to be skipped
    for K = 0, so a linear layer with bias returned zeros)."""
    g = lc.Graph("k0")
    x = g.input("x", (4, 0))
    w = g.param("w", np.zeros((0, 3), np.float32))
    b = g.param("b", np.array([-1.0, 0.5, 2.0], np.float32))
    h = x @ w + b
    h = {"relu": lc.relu, "gelu": lc.gelu, "none": lambda t: t}[act](h)
    g.output("y", h)
    out = lc.compile(g).run({"x": np.zeros((4, 0), np.float32)})["y"]
    bv = b.value.astype(np.float64)
    want = {"relu": np.maximum(bv, 0), "gelu": 0.5 * bv * (1 + np.vectorize(__import__("math").erf)(bv / 2 ** 0.5)),
            "none": bv}[act]
    np.testing.assert_allclose(out, np.broadcast_to(want, (4, 3)), rtol=1e-6, atol=1e-7)


def _gemm_ex_plan():
    g, loss, _, _, _ = _mlp("leaky_relu", "float32")
    plan = lc.compile(g, loss, lc.SGD(0.1)).plan
    e = plan.entries["grad"]
    hits = [(pc, d) for pc, op, _, d in F.instructions(e.code) if op == "gemm_ex"]
    assert hits
    return plan, hits


@pytest.mark.parametrize("field,value,msg", [("epi.vm", 10 ** 6, "not a VM opcode"),
                                             ("act", 1, "act"),
                                             ("epi.c", 0, "unused but VM opcode")])
def test_validator_refuses_a_malformed_vm_epilogue(field, value, msg):
    plan, hits = _gemm_ex_plan()
    # the backward LeakyRelu step: (g, x, alpha) -> epi.b = the auxiliary array, epi.c = the immediate
    pc, d = next((pc, d) for pc, d in hits if d["epi.c"] < 0)
    p = planfile.loads(planfile.dumps(plan))
    pos = F.locate(p.entries["grad"].code, pc)[1]
    p.entries["grad"].code[pos[field]] = value
    with pytest.raises(lr.PlanError, match=msg):
        lr.validate(p)
