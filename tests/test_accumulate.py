"""Gradient accumulation (``lc.compile(..., accumulate=M)``, libml_compile/accumulate.py).

The exact counterpart of M ranks is checked against ``mpiexec -n 2`` in tests/test_distributed.py; here, in
one process: accumulate=2 equals two micro-batch ``grad`` calls averaged as allreduce_wait averages (bit for
bit), the global-batch program to float32 summation order, BatchNorm's per-micro-batch statistics and
micro-batch 0's running statistics, plan files, and the refusals.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import libml_compile as lc
import libml_runtime

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpi_worker as W  # noqa: E402  (the same MLP, data and optimizers as the distributed tests)

B, M = W.B, 2
OPTS = ["sgd", "momentum", "adam"]


def _prog(batch, opt=None, accumulate=None, dtype="float32"):
    g, loss = W.model(lc, batch, dtype)
    return lc.compile(g, loss=loss, optimizer=W.optimizer(lc, opt) if opt else None, num_threads=1,
                      accumulate=accumulate)


def _feeds(step, dtype="float32"):
    x, y = W.data(step, dtype)
    return {"x": x, "y": y}


def _halves(feeds, m=M):
    b = B // m
    return [{k: v[i * b:(i + 1) * b] for k, v in feeds.items()} for i in range(m)]


def _mean(parts):
    """allreduce_wait's mean: the sum in order, then times 1/M rounded to the dtype."""
    acc = parts[0]
    for p in parts[1:]:
        acc = acc + p
    return acc * acc.dtype.type(1.0 / len(parts))


@pytest.mark.parametrize("m", [2, 4])
def test_grad_is_the_micro_batch_gradients_summed_then_scaled_bit_for_bit(m):
    acc, micro = _prog(B // m, accumulate=m), _prog(B // m)
    feeds = _feeds(0)
    got = acc.grad(feeds)
    parts = [micro.grad(h) for h in _halves(feeds, m)]
    for k in W.model(lc, 2)[0].params:
        assert got[k].shape == parts[0][k].shape
        assert np.array_equal(got[k], _mean([p[k] for p in parts])), k


@pytest.mark.parametrize("opt", OPTS)
def test_steps_equal_manual_accumulation_then_one_update_bit_for_bit(opt):
    # every step returns the mean of the micro-batch losses; plain SGD's update is p - lr * g with one
    # rounding (a fused multiply-add: exact in float64, then rounded), so its reference params are computed
    # in NumPy from the micro-batch gradients
    acc, micro = _prog(B // M, opt, accumulate=M), _prog(B // M)
    for s in range(5):
        feeds = _feeds(s)
        micro.set_params(acc.params)
        halves = _halves(feeds)
        losses = [np.float32(micro.run(h)["loss"]) for h in halves]
        grads = [micro.grad(h) for h in halves]
        before = acc.params
        loss = acc.step(feeds)
        assert np.float32(loss) == (losses[0] + losses[1]) * np.float32(0.5)
        if opt == "sgd":
            for k, p in before.items():
                g = _mean([gr[k] for gr in grads])
                ref = (p.astype(np.float64) - np.float64(np.float32(0.1)) * g.astype(np.float64)).astype(np.float32)
                assert np.array_equal(acc.params[k], ref), (s, k)


@pytest.mark.parametrize("opt", OPTS)
def test_accumulate_matches_the_global_batch_program_to_float32_summation_order(opt):
    acc, full = _prog(B // M, opt, accumulate=M), _prog(B, opt)
    la, lf = [], []
    for s in range(W.STEPS):
        la.append(acc.step(_feeds(s)))
        lf.append(full.step(_feeds(s)))
    pa, pf = acc.params, full.params
    for k in pf:
        np.testing.assert_allclose(pa[k], pf[k], rtol=1e-5, atol=2e-6, err_msg=f"{opt}: {k}")
        assert not np.array_equal(pa[k], W.model(lc, 2)[0].params[k].value), f"{opt}: {k} did not train"
    np.testing.assert_allclose(la, lf, rtol=1e-5, atol=1e-6)


def test_the_sgd_fold_and_the_adam_split_are_off_and_the_plan_is_one_runtime_call():
    plain = [r["op"] for r in _prog(B, "sgd").instructions("step")]
    ops = [r["op"] for r in _prog(B // M, "sgd", accumulate=M).instructions("step")]
    assert any(o.startswith("sgd_gemm") or "sgd" in o and "gemm" in o for o in plain), plain
    assert ops.count("sgd_update") == 1 and not any("gemm" in o and "sgd" in o for o in ops), ops
    # two copies of the forward: two loss kernels
    assert sum("xent" in o for o in ops) == M, ops
    adam = [r["op"] for r in _prog(B // M, "adam", accumulate=M).instructions("step")]
    assert adam.count("adam_update") == 1, adam


def test_run_concatenates_batched_outputs_and_averages_the_loss():
    g, loss = W.model(lc, B // M)
    logits = [t for t in g.nodes if t.op == "add" and t.shape == (B // M, W.C)][-1]
    g.output("logits", logits)
    acc = lc.compile(g, loss=loss, optimizer=lc.SGD(lr=0.1), num_threads=1, accumulate=M)
    g2, loss2 = W.model(lc, B // M)
    logits2 = [t for t in g2.nodes if t.op == "add" and t.shape == (B // M, W.C)][-1]
    g2.output("logits", logits2)
    micro = lc.compile(g2, loss=loss2, num_threads=1)
    feeds = _feeds(3)
    out = acc.run(feeds)
    parts = [micro.run(h) for h in _halves(feeds)]
    assert np.array_equal(out["logits"], np.concatenate([p["logits"] for p in parts]))
    assert np.float32(out["loss"]) == _mean([np.float32(p["loss"]) for p in parts])


def _bn_model(batch, seed=0):
    rng = np.random.default_rng(seed)
    g = lc.Graph("bn")
    x = g.input("x", (batch, W.D))
    y = g.input("y", (batch,), dtype="int64")
    w1 = g.param("w1", (rng.standard_normal((W.D, W.H)) * 0.3).astype(np.float32))
    s = g.param("s", np.ones(W.H, np.float32))
    w2 = g.param("w2", (rng.standard_normal((W.H, W.C)) * 0.3).astype(np.float32))
    h = lc.batch_norm(x @ w1, scale=s, relu=True, name="bn")
    loss = lc.softmax_cross_entropy(h @ w2, y)
    return g, loss


def test_batchnorm_uses_per_micro_batch_statistics_and_micro_batch_0_updates_the_running_ones():
    g, loss = _bn_model(B // M)
    acc = lc.compile(g, loss=loss, optimizer=lc.SGD(lr=0.1), num_threads=1, accumulate=M)
    g2, loss2 = _bn_model(B // M)
    micro = lc.compile(g2, loss=loss2, num_threads=1)
    feeds = _feeds(1)
    halves = _halves(feeds)
    grads = [micro.grad(h) for h in halves]
    got = acc.grad(feeds)
    for k in got:
        assert np.array_equal(got[k], _mean([gr[k] for gr in grads])), k
    # the running statistics: what one grad call on micro-batch 0 writes (rank 0's buffers on 2 ranks)
    g3, loss3 = _bn_model(B // M)
    first = lc.compile(g3, loss=loss3, num_threads=1)
    first.grad(halves[0])
    for k, v in first.buffers.items():
        assert np.array_equal(acc.buffers[k], v), k
        assert not np.array_equal(v, g3.buffers[k].value), f"{k} was not updated"


def test_a_saved_plan_carries_accumulate_and_trains_the_same(tmp_path):
    a, b = _prog(B // M, "adam", accumulate=M), _prog(B // M, "adam", accumulate=M)
    a.step(_feeds(0))
    b.step(_feeds(0))
    path = a.save(str(tmp_path / "acc.lmplan"))
    exe = libml_runtime.load(path, num_threads=1)
    assert exe.plan.meta["accumulate"] == {"micro_batches": M, "micro_batch_rows": B // M}
    for s in range(1, 4):
        assert exe.step(_feeds(s)) == b.step(_feeds(s))
    for k, v in b.params.items():
        assert np.array_equal(exe.params[k], v), k
    with pytest.raises(ValueError, match=r"feed 'x'.*accumulate=2: 2 micro-batches of 8 rows"):
        exe.step({"x": _feeds(0)["x"][:8], "y": _feeds(0)["y"][:8]})


def test_accumulate_1_is_the_plain_program():
    a, b = _prog(B, "momentum", accumulate=1), _prog(B, "momentum")
    assert [r["op"] for r in a.instructions("step")] == [r["op"] for r in b.instructions("step")]
    assert "accumulate" not in a.plan.meta


@pytest.mark.parametrize("bad", [0, -2, 1.5, "2", True, 2.0])
def test_accumulate_must_be_a_positive_int(bad):
    g, loss = W.model(lc, B // M)
    with pytest.raises(ValueError, match="accumulate must be a positive int"):
        lc.compile(g, loss=loss, optimizer=lc.SGD(lr=0.1), accumulate=bad)


def test_feeds_without_m_times_b_rows_are_refused_naming_the_input():
    acc = _prog(B // M, "sgd", accumulate=M)
    x, y = W.data(0)
    with pytest.raises(ValueError, match=r"feed 'x': expected shape \(16, 12\), got \(8, 12\) \(accumulate=2"):
        acc.step({"x": x[:8], "y": y})
    with pytest.raises(ValueError, match=r"feed 'y': expected shape \(16,\), got \(8,\) \(accumulate=2"):
        acc.grad({"x": x, "y": y[:8]})


def test_refusals_at_compile_time():
    g, loss = W.model(lc, B // M)
    with pytest.raises(ValueError, match="accumulate=2 cannot be combined with distributed"):
        lc.compile(g, loss=loss, optimizer=lc.SGD(lr=0.1), accumulate=2, distributed="mpi")
    with pytest.raises(ValueError, match="accumulate=2 needs a loss"):
        lc.compile(g, accumulate=2)
    g2 = lc.Graph("mixed")
    x = g2.input("x", (4, 3))
    mask = g2.input("mask", (3,))
    w = g2.param("w", np.ones((3, 2), np.float32))
    loss2 = lc.mean((x * mask) @ w)
    with pytest.raises(ValueError, match="same leading .micro-batch. size"):
        lc.compile(g2, loss=loss2, optimizer=lc.SGD(lr=0.1), accumulate=2)
    g3 = lc.Graph("scalar")
    x3 = g3.input("x", (4, 3))
    t3 = g3.input("t", ())
    w3 = g3.param("w", np.ones((3, 2), np.float32))
    with pytest.raises(ValueError, match="input 't' is a scalar"):
        lc.compile(g3, loss=lc.mean(x3 @ w3) * t3, optimizer=lc.SGD(lr=0.1), accumulate=2)
    g4, loss4 = W.model(lc, B // M)
    h = [t for t in g4.nodes if t.op == "param"][0]
    g4.output("w1_sum", lc.sum(g4.inputs["x"]) * lc.sum(h))  # a scalar: averaged, fine
    g4.output("col", lc.sum(g4.inputs["x"], axis=0))  # (D,): no micro-batch axis
    with pytest.raises(ValueError, match="output 'col' of shape"):
        lc.compile(g4, loss=loss4, optimizer=lc.SGD(lr=0.1), accumulate=2)


def _cnn(batch, seed=0):
    rng = np.random.default_rng(seed)
    g = lc.Graph("cnn")
    x = g.input("x", (batch, 3, 8, 8))
    y = g.input("y", (batch,), dtype="int64")
    w = g.param("w", (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32))
    h = lc.conv(x, w, g.param("cb", np.zeros(4, np.float32)), pads=1)
    h = lc.batch_norm(h, scale=g.param("s", np.ones(4, np.float32)), bias=g.param("t", np.zeros(4, np.float32)),
                      relu=True, name="bn")
    h = lc.reshape(lc.max_pool(h, (2, 2)), (batch, 64))
    h = lc.dropout(h, 0.2, seed=5)
    w2 = g.param("w2", (rng.standard_normal((64, 32)) * 0.1).astype(np.float32))
    h = lc.layer_norm(lc.tanh(h @ w2), g.param("ln_g", np.ones(32, np.float32)),
                      g.param("ln_b", np.zeros(32, np.float32)))
    w3 = g.param("w3", (rng.standard_normal((32, 5)) * 0.1).astype(np.float32))
    return g, lc.softmax_cross_entropy(lc.gelu(h) @ w3, y)


@pytest.mark.parametrize("opt", ["momentum", "adam"])
def test_conv_batchnorm_pool_dropout_layernorm_micro_batches_bit_for_bit(opt):
    # every micro-batch of a step draws dropout's mask at the same step (as K ranks do, which share seed and
    # step): the reference's two grad calls are made at that step, with the counter set back in between
    g, loss = _cnn(B // M)
    acc = lc.compile(g, loss=loss, optimizer=W.optimizer(lc, opt), num_threads=2, accumulate=M)
    g2, loss2 = _cnn(B // M)
    micro = lc.compile(g2, loss=loss2, num_threads=2)
    rng = np.random.default_rng(1)
    for s in range(3):
        feeds = {"x": rng.standard_normal((B, 3, 8, 8)).astype(np.float32), "y": rng.integers(0, 5, B)}
        micro.set_params(acc.params)
        parts = []
        for h in _halves(feeds):
            sd = micro.state_dict()
            sd["dropout/step"] = acc.state_dict()["dropout/step"]
            micro.load_state_dict(sd)
            parts.append(micro.grad(h))
        got = acc.grad(feeds)
        for k in got:
            assert np.array_equal(got[k], _mean([p[k] for p in parts])), (s, k)
        acc.step(feeds)


def test_check_finite_and_unfused_programs_accumulate_the_same():
    ref = _prog(B // M, "adam", accumulate=M)
    g, loss = W.model(lc, B // M)
    chk = lc.compile(g, loss=loss, optimizer=W.optimizer(lc, "adam"), num_threads=1, accumulate=M, check_finite=True)
    for s in range(3):
        assert chk.step(_feeds(s)) == ref.step(_feeds(s))
    for k, v in ref.params.items():
        np.testing.assert_allclose(chk.params[k], v, rtol=1e-6, atol=1e-7)


def _deep(batch, width=256):
    rng = np.random.default_rng(0)
    g = lc.Graph("deep")
    x = g.input("x", (batch, 64))
    y = g.input("y", (batch,), dtype="int64")
    h = x
    for i in range(3):
        h = lc.relu(h @ g.param(f"w{i}", (rng.standard_normal((h.shape[1], width)) * 0.05).astype(np.float32)))
    wo = g.param("wo", (rng.standard_normal((width, 10)) * 0.05).astype(np.float32))
    return g, lc.softmax_cross_entropy(h @ wo, y)


def test_micro_batches_run_one_after_the_other_so_the_arena_does_not_grow_with_m():
    # micro-batch k's forward and backward run before micro-batch k + 1's, and each gradient is added to
    # the running sum as soon as it is ready: the arena holds one micro-batch's activations and about two
    # gradient sets whatever M is
    arena = {m: lc.compile(*_deep(32), optimizer=lc.Adam(lr=1e-3), num_threads=1, accumulate=m)
             .memory_report().arena_bytes for m in (2, 8)}
    assert arena[8] <= 1.1 * arena[2], arena
    ops = [r["op"] for r in lc.compile(*_deep(32), optimizer=lc.SGD(lr=0.1), num_threads=1, accumulate=4)
           .instructions("step")]
    losses = [i for i, o in enumerate(ops) if "xent" in o]
    gemms = [i for i, o in enumerate(ops) if o.startswith("gemm")]
    # each micro-batch: 4 forward GEMMs, its loss, then its backward GEMMs before the next forward
    assert len(losses) == 4 and all(sum(losses[k] < i < losses[k + 1] for i in gemms) == 4 + 7 for k in range(3)), ops
