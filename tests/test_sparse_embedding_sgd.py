"""Plain SGD of an embedding table touches only the rows the gather read (``sgd_scatter``, opcode
``scatter_sgd``): no dense gradient of the table is zeroed, filled and swept.  The steps must equal
PyTorch's dense ``nn.Embedding`` + ``torch.optim.SGD``; momentum, weight decay (both move every row) or
many indices keep the dense path."""
import numpy as np
import pytest
import torch

import libml_compile as lc
import libml_runtime as lr
from libml_runtime import format as F
from libml_runtime import planfile as PF

V, D, B, S, C = 1000, 16, 8, 12, 3


def _model(dt, seed=0, tokens_shape=(B, S)):
    rng = np.random.default_rng(seed)
    vals = {"emb": rng.standard_normal((V, D)) * 0.5, "W": rng.standard_normal((D, C)) * 0.3, "b": np.zeros(C)}
    g = lc.Graph("text")
    tok = g.input("tok", tokens_shape, "int64")
    y = g.input("y", (tokens_shape[0],), "int64")
    p = {k: g.param(k, v.astype(dt)) for k, v in vals.items()}
    h = lc.mean(lc.gather(p["emb"], tok, axis=0), axis=1)
    return g, lc.softmax_cross_entropy(h @ p["W"] + p["b"], y), vals


def _feeds(seed, tokens_shape=(B, S), hi=V):
    rng = np.random.default_rng(100 + seed)
    tok = rng.integers(0, hi, tokens_shape)
    tok[0, :3] = tok[0, 0]  # repeated ids: their rows get several updates in one step
    return {"tok": tok, "y": rng.integers(0, C, tokens_shape[0])}


def _torch_steps(vals, feeds, dt, lr, steps, momentum=0.0, wd=0.0):
    P = {k: torch.tensor(v.astype(dt), requires_grad=True) for k, v in vals.items()}
    opt = torch.optim.SGD(P.values(), lr=lr, momentum=momentum, weight_decay=wd)
    for f in feeds[:steps]:
        opt.zero_grad()
        h = P["emb"][torch.tensor(f["tok"])].mean(1)
        torch.nn.functional.cross_entropy(h @ P["W"] + P["b"], torch.tensor(f["y"])).backward()
        opt.step()
    return {k: v.detach().numpy() for k, v in P.items()}


def _ops(prog):
    return [r["op"] for r in prog.instructions("step")]


@pytest.mark.parametrize("dt,tol", [("float64", 1e-12), ("float32", 1e-6)])
def test_sgd_steps_only_the_rows_read_and_follows_torch(dt, tol):
    g, loss, vals = _model(dt)
    prog = lc.compile(g, loss, lc.SGD(0.5))
    ops = _ops(prog)
    assert "scatter+sgd" in ops and "gather_grad" not in ops, ops
    feeds = [_feeds(s) for s in range(5)]
    for f in feeds:
        prog.step(f)
    want = _torch_steps(vals, feeds, dt, 0.5, 5)
    for k in vals:
        np.testing.assert_allclose(prog.params[k], want[k], rtol=tol, atol=tol, err_msg=k)
    # rows no token named are bit-for-bit the initial ones
    used = np.unique(np.concatenate([f["tok"].reshape(-1) for f in feeds]))
    untouched = np.setdiff1d(np.arange(V), used)
    np.testing.assert_array_equal(prog.params["emb"][untouched], vals["emb"].astype(dt)[untouched])


@pytest.mark.parametrize("opt,why", [(lc.SGD(0.5, momentum=0.9), "momentum"), (lc.SGD(0.5, weight_decay=0.01), "decay")])
def test_momentum_or_weight_decay_keep_the_dense_update(opt, why):
    g, loss, vals = _model("float64")
    prog = lc.compile(g, loss, opt)
    assert "scatter+sgd" not in _ops(prog) and "gather_grad" in _ops(prog), (why, _ops(prog))
    feeds = [_feeds(s) for s in range(3)]
    for f in feeds:
        prog.step(f)
    want = _torch_steps(vals, feeds, "float64", 0.5, 3, momentum=opt.momentum, wd=opt.weight_decay)
    np.testing.assert_allclose(prog.params["emb"], want["emb"], rtol=1e-12, atol=1e-12)


def test_many_indices_keep_the_dense_update():
    g, loss, _ = _model("float32", tokens_shape=(64, 8))  # 512 ids for 1000 rows: the dense pass is as cheap
    assert "scatter+sgd" not in _ops(lc.compile(g, loss, lc.SGD(0.1)))


def test_sparse_update_is_bit_identical_for_one_and_two_threads():
    res = []
    for nt in (1, 2):
        g, loss, _ = _model("float32", seed=3, tokens_shape=(32, 6))
        prog = lc.compile(g, loss, lc.SGD(0.3), num_threads=nt)
        assert "scatter+sgd" in _ops(prog)
        for s in range(3):
            prog.step(_feeds(s, tokens_shape=(32, 6), hi=40))  # few distinct ids: many repeats
        res.append(prog.params["emb"])
    np.testing.assert_array_equal(res[0], res[1])


def test_out_of_range_token_is_refused_and_nothing_changes():
    g, loss, _ = _model("float32")
    prog = lc.compile(g, loss, lc.SGD(0.5))
    before = {k: v.copy() for k, v in prog.params.items()}
    f = _feeds(0)
    f["tok"][1, 2] = V
    with pytest.raises(ValueError, match="tok"):
        prog.step(f)
    for k in before:
        np.testing.assert_array_equal(prog.params[k], before[k])


def test_validator_refuses_a_scatter_sgd_table_outside_the_state():
    g, loss, _ = _model("float32")
    plan = lc.compile(g, loss, lc.SGD(0.5)).plan
    p = PF.loads(PF.dumps(plan))
    code = p.entries["step"].code
    for pc, op, _, _ in F.instructions(code):
        if op == "scatter_sgd":
            code[F.locate(code, pc)[1]["n"]] = 1 << 16
            break
    else:
        raise AssertionError("no scatter_sgd instruction")
    with pytest.raises(lr.PlanError, match="outside"):
        lr.validate(p)
