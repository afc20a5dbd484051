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


def _follow_reference(prog, ref_opt, weights, sizes, batch, steps, seed, what):
    """Train ``prog`` and a NumPy reference optimizer side by side on random batches; params must agree
    (float64, tight) after every step."""
    ref = {k: v.copy() for k, v in mlp_param_dict(weights).items()}
    rng = np.random.default_rng(seed)
    for step in range(steps):
        x = rng.standard_normal((batch, sizes[0]))
        y = rng.integers(0, sizes[-1], size=batch).astype(np.int64)
        _, _, grads = np_mlp_ref(mlp_weights_from_dict(ref, 2), x, y)
        prog.step({"x": x, "y": y})
        ref_opt.update(ref, mlp_param_dict(grads))
        got = prog.params
        for k in ref:
            assert_close(got[k], ref[k], 1e-10, 1e-13, f"{what} step {step} param {k}")


def _same_as_unfused(g, loss, x_shape, rng, n_updates):
    """Adam through the fused (split) plan and the unfused one (a single update at the end) must agree
    step after step; the fused plan must have ``n_updates`` adam_update instructions."""
    fused = lc.compile(g, loss=loss, optimizer=lc.Adam(lr=0.05))
    plain = lc.compile(g, loss=loss, optimizer=lc.Adam(lr=0.05), fuse=False)
    assert [r["op"] for r in fused.instructions("step")].count("adam_update") == n_updates
    for _ in range(3):
        feeds = {"x": rng.standard_normal(x_shape)}
        assert fused.step(feeds) == pytest.approx(plain.step(feeds), rel=1e-12)
    for k, v in plain.params.items():
        assert_close(fused.params[k], v, 1e-10, 1e-13, k)


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
    _follow_reference(prog, make_np(), weights, sizes, batch, steps=4, seed=6, what=case)


@pytest.mark.parametrize("case", ["adam", "adamw_wd"])
def test_large_params_get_their_own_adam_update_and_still_match_pytorch(case):
    """Params of at least 64 KiB get an Adam update right after their gradient (so the gradient buffer
    dies there), with the step counter advanced once per step; the params follow torch.optim.AdamW."""
    make_lc, make_np = OPT_REF_CASES[case]
    # float64: w0 (96 KiB) and w1 (80 KiB) are split -- w1 is also read by the backward GEMM for w0's
    # gradient, so its update must wait for that; the biases stay in the fused update
    sizes, batch = [96, 128, 80], 8
    weights = make_mlp_params(sizes, np.float64, seed=7)
    g, loss = build_mlp(weights, batch, dtype="float64")
    prog = lc.compile(g, loss=loss, optimizer=make_lc())
    ops = [r["op"] for r in prog.instructions("step")]
    assert ops.count("adam_update") == 3 and ops.count("adam_count") == 1, ops
    assert ops.index("adam_count") < min(k for k, o in enumerate(ops) if o == "adam_update")
    _follow_reference(prog, make_np(), weights, sizes, batch, steps=3, seed=8, what=case)
    assert prog.state_dict()["adam/step"] == 3  # one count per step, however many update instructions


def test_split_adam_frees_gradient_buffers():
    # W2's shape: with one update at the end every weight gradient was live at once (0.92x naive)
    from libml_models import builders
    g, loss = builders.mlp([784, 512, 512, 10], 128, loss="xent", seed=0)
    rep = lc.compile(g, loss=loss, optimizer=lc.Adam(lr=1e-3)).memory_report("step")
    assert rep.arena_bytes <= 0.55 * rep.naive_bytes, (rep.arena_bytes, rep.naive_bytes)
    sgd = lc.compile(g, loss=loss, optimizer=lc.SGD(lr=1e-3)).memory_report("step")
    # what is left above plain SGD is one weight gradient at a time (the largest: 784 x 512 floats)
    assert rep.arena_bytes <= sgd.arena_bytes + 784 * 512 * 4 + 4096, (rep.arena_bytes, sgd.arena_bytes)


def test_split_adam_waits_for_every_reader_of_the_params_it_updates():
    """A small param S (16 KiB, in the fused update) read by the backward GEMM dh = dz Sᵀ that the large
    param W's gradient needs: the fused update now runs as soon as dS exists, so it must wait for that
    reader.  Compared with the unfused plan (one update at the end) over a few steps."""
    rng = np.random.default_rng(3)
    g = lc.Graph("readers")
    x = g.input("x", (16, 128), dtype="float64")
    W = g.param("W", rng.standard_normal((128, 128)) * 0.1)   # 128 KiB: split
    S = g.param("S", rng.standard_normal((128, 16)) * 0.1)    # 16 KiB: stays in the fused update
    loss = lc.mean(lc.sigmoid((x @ W) @ S))
    g.output("loss", loss)
    _same_as_unfused(g, loss, (16, 128), rng, n_updates=2)


def test_split_adam_update_waits_for_the_backward_gemm_that_reads_its_param():
    """No biases: W1's own update is ready right after dW1, while dh = dz W1ᵀ (needed for dW0) still has
    to read the old W1.  Same params as the unfused plan, step after step."""
    rng = np.random.default_rng(4)
    g = lc.Graph("chain")
    x = g.input("x", (8, 96), dtype="float64")
    W0 = g.param("W0", rng.standard_normal((96, 128)) * 0.1)  # 96 KiB
    W1 = g.param("W1", rng.standard_normal((128, 80)) * 0.1)  # 80 KiB
    loss = lc.mean(lc.sigmoid(lc.relu(x @ W0) @ W1))
    g.output("loss", loss)
    _same_as_unfused(g, loss, (8, 96), rng, n_updates=2)


@pytest.mark.parametrize("opt", [lc.SGD(lr=0.1), lc.SGD(lr=0.1, momentum=0.9, weight_decay=0.01),
                                 lc.Adam(lr=0.02, weight_decay=0.01)], ids=["sgd", "momentum", "adam"])
def test_every_compile_mode_trains_the_same(opt):
    """fuse on/off x check_finite on/off: four compiles of one graph whose weights trigger every fold
    and split (W0, W1 >= 64 KiB in float64) must train alike -- one pass leaking into another entry or
    into the checked copy shows up here as a param that moved differently."""
    rng = np.random.default_rng(11)
    g = lc.Graph("modes")
    x = g.input("x", (8, 96), dtype="float64")
    y = g.input("y", (8,), dtype="int64")
    W0 = g.param("W0", rng.standard_normal((96, 128)) * 0.1)
    b0 = g.param("b0", np.zeros(128))
    W1 = g.param("W1", rng.standard_normal((128, 72)) * 0.1)
    W2 = g.param("W2", rng.standard_normal((72, 5)) * 0.1)
    logits = lc.relu(lc.relu(x @ W0 + b0) @ W1) @ W2
    loss = lc.softmax_cross_entropy(logits, y)
    g.output("loss", loss)
    progs = {(f, c): lc.compile(g, loss=loss, optimizer=opt, fuse=f, check_finite=c)
             for f in (True, False) for c in (False, True)}
    for _ in range(3):
        feeds = {"x": rng.standard_normal((8, 96)), "y": rng.integers(0, 5, 8)}
        losses = {k: p.step(feeds) for k, p in progs.items()}
        assert max(losses.values()) - min(losses.values()) <= 1e-12 * abs(losses[True, False]), losses
    ref = progs[True, False].state_dict()
    for k, p in progs.items():
        for name, v in p.state_dict().items():
            assert_close(v, ref[name], 1e-10, 1e-13, f"{k} {name}")
