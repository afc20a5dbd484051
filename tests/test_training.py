"""Training: the loss falls, frozen params stay bit-identical, and SGD-momentum / AdamW updates match NumPy
versions of PyTorch's update formulas."""
import numpy as np
import pytest

import libml_compile as lc
from conftest import (NpAdamW, NpSGD, assert_close, build_mlp, make_mlp_params, mlp_param_dict,
                      mlp_weights_from_dict, np_mlp_ref, teacher_task)

OPTIMIZERS = {
    "sgd_momentum": lambda: lc.SGD(lr=0.1, momentum=0.9),
    "adam": lambda: lc.Adam(lr=0.01),
}


def _task_prog(optimizer, dtype="float32", trainable=None, sizes=(8, 32, 3), n=64, seed=0, **kw):
    np_dtype = np.dtype(dtype).type
    x, y = teacher_task(n, sizes[0], sizes[-1], np_dtype, seed=seed)
    weights = make_mlp_params(list(sizes), np_dtype, seed=seed)
    g, loss = build_mlp(weights, n, dtype=dtype)
    prog = lc.compile(g, loss=loss, optimizer=optimizer, trainable=trainable, **kw)
    return prog, {"x": x, "y": y}, weights


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_loss_falls_over_50_steps(opt, dtype):
    prog, feeds, _ = _task_prog(OPTIMIZERS[opt](), dtype=dtype)
    losses = [prog.step(feeds) for _ in range(50)]
    assert all(isinstance(v, float) for v in losses)
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < 0.5 * losses[0], f"loss did not fall enough: {losses[0]:.4f} -> {losses[-1]:.4f}"
    # and the trained program really predicts the task better than chance
    out = prog.run(feeds)
    acc = np.mean(np.argmax(out["logits"], axis=1) == feeds["y"])
    assert acc > 0.8, acc
    assert float(out["loss"]) < 0.5 * losses[0]


def test_step_returns_loss_before_update():
    prog, feeds, _ = _task_prog(lc.SGD(lr=0.1, momentum=0.9), dtype="float64")
    before = float(prog.run(feeds)["loss"])
    stepped = prog.step(feeds)
    after = float(prog.run(feeds)["loss"])
    assert stepped == pytest.approx(before, rel=1e-12)
    assert after < before


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_frozen_params_bit_identical(opt):
    trainable = ["w1", "b1"]
    prog, feeds, weights = _task_prog(OPTIMIZERS[opt](), trainable=trainable)
    init = {k: v.copy() for k, v in prog.params.items()}
    assert set(init) == {"w0", "b0", "w1", "b1"}
    losses = [prog.step(feeds) for _ in range(20)]
    after = prog.params
    for k in ("w0", "b0"):
        assert after[k].dtype == init[k].dtype
        assert after[k].tobytes() == init[k].tobytes(), f"frozen param {k} changed"
        assert after[k].tobytes() == mlp_param_dict(weights)[k].tobytes()
    for k in trainable:
        assert not np.array_equal(after[k], init[k]), f"trainable param {k} did not change"
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("trainable", [["w1", "b1"], ["w0"], ["b0", "w1"]])
def test_grads_only_for_trainable_params(trainable):
    prog, feeds, weights = _task_prog(None, dtype="float64", trainable=trainable)
    grads = prog.grad(feeds)
    assert set(grads) == set(trainable)
    _, _, ref = np_mlp_ref([(W.astype(np.float64), b.astype(np.float64)) for W, b in weights],
                           feeds["x"], feeds["y"])
    ref = mlp_param_dict(ref)
    for k in trainable:
        assert_close(grads[k], ref[k], 1e-9, 1e-12, f"d/d{k}")


def test_frozen_param_still_used_in_forward():
    """Freezing must not turn the param into a stale constant: set_params on it changes the loss."""
    prog, feeds, weights = _task_prog(None, dtype="float64", trainable=["w1"])
    before = float(prog.run(feeds)["loss"])
    prog.set_params({"w0": weights[0][0] * 2.0})
    after = float(prog.run(feeds)["loss"])
    assert before != after
    ws = [(weights[0][0] * 2.0, weights[0][1]), weights[1]]
    ref_loss, _, ref = np_mlp_ref(ws, feeds["x"], feeds["y"])
    assert after == pytest.approx(ref_loss, rel=1e-12)
    assert_close(prog.grad(feeds)["w1"], ref[1][0], 1e-9, 1e-12, "dw1 after set_params on frozen w0")


# ----------------------------------------------------------------------------------------------------
# optimizer updates vs NumPy re-implementations of torch.optim.SGD and torch.optim.AdamW
# ----------------------------------------------------------------------------------------------------
OPT_REF_CASES = {
    "sgd_plain": (lambda: lc.SGD(lr=0.05), lambda: NpSGD(0.05)),
    "sgd_momentum": (lambda: lc.SGD(lr=0.05, momentum=0.9), lambda: NpSGD(0.05, momentum=0.9)),
    "sgd_momentum_wd": (lambda: lc.SGD(lr=0.05, momentum=0.9, weight_decay=0.01),
                        lambda: NpSGD(0.05, momentum=0.9, weight_decay=0.01)),
    "adam": (lambda: lc.Adam(lr=0.01), lambda: NpAdamW(0.01)),
    "adam_betas_eps": (lambda: lc.Adam(lr=0.02, betas=(0.8, 0.95), eps=1e-6),
                       lambda: NpAdamW(0.02, betas=(0.8, 0.95), eps=1e-6)),
    "adamw_wd": (lambda: lc.Adam(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1),
                 lambda: NpAdamW(0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)),
}


@pytest.mark.parametrize("case", list(OPT_REF_CASES))
def test_optimizer_matches_pytorch_formulas(case):
    make_lc, make_np = OPT_REF_CASES[case]
    sizes = [6, 10, 4]
    batch = 8
    weights = make_mlp_params(sizes, np.float64, seed=31)
    g, loss = build_mlp(weights, batch, dtype="float64")
    prog = lc.compile(g, loss=loss, optimizer=make_lc())
    ref_opt = make_np()
    ref_params = {k: v.copy() for k, v in mlp_param_dict(weights).items()}
    rng = np.random.default_rng(32)
    for step in range(3):
        x = rng.standard_normal((batch, sizes[0]))
        y = rng.integers(0, sizes[-1], size=batch).astype(np.int64)
        ref_loss, _, ref_grads = np_mlp_ref(mlp_weights_from_dict(ref_params, 2), x, y)
        got_loss = prog.step({"x": x, "y": y})
        assert got_loss == pytest.approx(ref_loss, rel=1e-12), f"step {step} loss"
        ref_opt.update(ref_params, mlp_param_dict(ref_grads))
        got = prog.params
        for k in ref_params:
            assert_close(got[k], ref_params[k], 1e-10, 1e-13, f"{case} step {step} param {k}")


def test_adam_weight_decay_is_decoupled():
    """With a zero gradient (x = 0, so dW = xᵀ G = 0), AdamW shrinks params by exactly (1 - lr*wd) per
    step; L2-in-the-gradient Adam would instead move them by ~lr per step whatever wd's size."""
    W = np.array([[1.0, -2.0], [0.5, 4.0]])
    g = lc.Graph("wd")
    w = g.param("w", W)
    x = g.input("x", (1, 2), dtype="float64")
    loss = lc.sum(x @ w)
    g.output("loss", loss)
    prog = lc.compile(g, loss=loss, optimizer=lc.Adam(lr=0.1, weight_decay=0.01))
    for _ in range(3):
        assert prog.step({"x": np.zeros((1, 2))}) == 0.0
    assert_close(prog.params["w"], W * (1 - 0.1 * 0.01) ** 3, 1e-14, 0, "decoupled decay")


def test_set_params_then_train_from_there():
    prog, feeds, weights = _task_prog(lc.SGD(lr=0.05), dtype="float64")
    new = make_mlp_params([8, 32, 3], np.float64, seed=99)
    prog.set_params(mlp_param_dict(new))
    prog.step(feeds)
    _, _, ref = np_mlp_ref(new, feeds["x"], feeds["y"])
    expected = {k: v - 0.05 * mlp_param_dict(ref)[k] for k, v in mlp_param_dict(new).items()}
    for k, v in expected.items():
        assert_close(prog.params[k], v, 1e-10, 1e-13, k)


@pytest.mark.parametrize("case", ["sgd_momentum", "sgd_momentum_wd"])
def test_momentum_accumulates_in_the_gradient_gemm_and_matches_pytorch(case):
    """SGD with momentum: each weight gradient GEMM accumulates into its momentum buffer (BLAS beta =
    momentum), so no gradient buffer exists -- the arena is the plain-SGD one -- and the fused update
    adds the decay and steps.  The params still follow torch.optim.SGD's formulas for several steps."""
    make_lc, make_np = OPT_REF_CASES[case]
    sizes, batch = [6, 10, 4], 8
    weights = make_mlp_params(sizes, np.float64, seed=5)
    g, loss = build_mlp(weights, batch, dtype="float64")
    prog = lc.compile(g, loss=loss, optimizer=make_lc())
    ops = [r["op"] for r in prog.instructions("step")]
    assert ops.count("gemm+momentum") == 2, ops
    plain = lc.compile(g, loss=loss, optimizer=lc.SGD(lr=0.05))
    assert prog.memory_report("step").arena_bytes <= plain.memory_report("step").arena_bytes
    ref_opt, ref = make_np(), {k: v.copy() for k, v in mlp_param_dict(weights).items()}
    rng = np.random.default_rng(6)
    for step in range(4):
        x = rng.standard_normal((batch, sizes[0]))
        y = rng.integers(0, sizes[-1], size=batch).astype(np.int64)
        _, _, grads = np_mlp_ref(mlp_weights_from_dict(ref, 2), x, y)
        prog.step({"x": x, "y": y})
        ref_opt.update(ref, mlp_param_dict(grads))
        got = prog.params
        for k in ref:
            assert_close(got[k], ref[k], 1e-10, 1e-13, f"{case} step {step} param {k}")
