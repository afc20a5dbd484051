"""Self-check of the hand-written NumPy steps against torch autograd (``run.py --selfcheck``).

Small problems in float64, a few SGD steps: the losses and the updated parameters must agree to ~1e-10.
The W6 / W8 PyTorch module (w6_torch.py) is checked against the reference files (W6_ref.npz,
W6_eval_ref.npz) and common.W6_LOSS2 is recomputed.
If libml is installed, its ``prog.step`` is compared with the NumPy step too (float32, W1 sizes).
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import np_impl  # noqa: E402


def _torch_mlp(torch, inits, x, y, loss, lr, steps):
    ws = [torch.tensor(w, requires_grad=True) for w, _ in inits]
    bs = [torch.tensor(b, requires_grad=True) for _, b in inits]
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    losses = []
    for _ in range(steps):
        h = xt
        for i in range(len(ws)):
            h = h @ ws[i] + bs[i]
            if i < len(ws) - 1:
                h = torch.relu(h)
        L = torch.nn.functional.cross_entropy(h, yt) if loss == "xent" else torch.mean((h - yt) ** 2)
        for p in ws + bs:
            p.grad = None
        L.backward()
        with torch.no_grad():
            for p in ws + bs:
                p -= lr * p.grad
        losses.append(L.item())
    out = {}
    for i in range(len(ws)):
        out[f"w{i}"] = ws[i].detach().numpy()
        out[f"b{i}"] = bs[i].detach().numpy()
    return losses, out


def _torch_w4(torch, a, b, c, x, lr, steps):
    a, b, c = (torch.tensor(v, requires_grad=True) for v in (a, b, c))
    xt = torch.from_numpy(x)
    losses = []
    for _ in range(steps):
        L = (torch.sigmoid(xt * a + b) / (1 + torch.relu(xt - c))).mean()
        for p in (a, b, c):
            p.grad = None
        L.backward()
        with torch.no_grad():
            for p in (a, b, c):
                p -= lr * p.grad
        losses.append(L.item())
    return losses, {"a": a.detach().numpy(), "b": b.detach().numpy(), "c": c.detach().numpy()}


def _compare(name, l1, p1, l2, p2, tol):
    err = max(abs(u - v) for u, v in zip(l1, l2))
    perr = max(float(np.max(np.abs(p1[k] - p2[k]))) for k in p1)
    ok = err <= tol and perr <= tol
    print(f"  {name:<40} loss err {err:.2e}  param err {perr:.2e}  {'ok' if ok else 'FAIL'}")
    return ok


def check_w7_jax(steps=3):
    """The hand-written JAX W7 (w7_jax.py) against the PyTorch module under autograd + torch.optim.AdamW,
    in float64 from the reference initial weights: the first step's gradients, then ``steps`` AdamW
    steps (losses and every parameter).  Returns True/False, or None when JAX or the files are missing."""
    try:
        import jax
        import jax.numpy as jnp
        import torch
    except ImportError as e:
        print(f"  W7 jax vs torch: skipped ({e})")
        return None
    files = common.w7_files()
    if files is None:
        print(f"  W7 jax vs torch: skipped (no W7.onnx / W7_ref.npz in {common.BENCH_MODELS})")
        return None
    import w7_jax
    import worker

    jax.config.update("jax_enable_x64", True)  # this check only; the benchmark runs float32
    ref = files[1]
    names = common.w7_param_names()
    params = {n: a.astype(np.float64) for n, a in w7_jax.load_params(files[0], names).items()}
    tokens, labels = ref["tokens"], ref["labels"]
    model = worker._w7_torch(torch, ref).double()
    opt = torch.optim.AdamW(model.parameters(), lr=w7_jax.LR, weight_decay=w7_jax.WEIGHT_DECAY)
    tt, tl = torch.from_numpy(tokens), torch.from_numpy(labels)
    loss_fn, _, _ = w7_jax.make(jax, jnp)
    _, g = jax.value_and_grad(loss_fn)(params, jnp.asarray(tokens), jnp.asarray(labels))
    step, carry = w7_jax.make_step(jax, jnp, params)
    l_jax, l_torch = [], []
    gerr = None
    for i in range(steps):
        carry, L = step(carry, jnp.asarray(tokens), jnp.asarray(labels))
        l_jax.append(float(L))
        opt.zero_grad(set_to_none=True)
        Lt = torch.nn.functional.cross_entropy(model(tt), tl)
        Lt.backward()
        if i == 0:  # relative to each gradient's largest entry
            tg = {n: p.grad.numpy() for n, p in model.named_parameters()}
            gerr = max(float(np.max(np.abs(np.asarray(g[n]) - tg[n])) / max(np.max(np.abs(tg[n])), 1e-300))
                       for n in names)
        opt.step()
        l_torch.append(Lt.item())
    tp = {n: p.detach().numpy() for n, p in model.named_parameters()}
    jp = {n: np.asarray(a) for n, a in carry[0].items()}
    print(f"  {'W7 jax first-step grads vs autograd':<40} max rel err {gerr:.2e}  {'ok' if gerr <= 1e-9 else 'FAIL'}")
    return _compare(f"W7 jax vs torch AdamW, {steps} steps", l_jax, jp, l_torch, tp, 1e-9) and gerr <= 1e-9


def check_w6_torch():
    """The ResNet-8 of w6_torch.py with the W6_ref.npz weights against the reference data of eager PyTorch
    (written when W6.onnx was exported): train-mode logits and loss0, loss1 after one SGD-momentum step,
    the running statistics after it (after1/*), and common.W6_LOSS2 (the third loss, the first that sees
    the momentum; also in float64); W8: eval-mode logits at batch 1 and 256 against W6_eval_ref.npz.
    Returns True/False, or None when the reference files are missing."""
    try:
        import torch
    except ImportError as e:
        print(f"  W6 torch module: skipped ({e})")
        return None
    if common.missing_files("w6") or common.missing_files("w8"):
        print(f"  W6 torch module: skipped ({common.missing_files('w6') or common.missing_files('w8')})")
        return None
    import w6_torch

    F = torch.nn.functional
    ref = common.w6_files("w6")[1]
    x, y = torch.from_numpy(ref["x"]), torch.from_numpy(ref["labels"])
    checks = []  # (what, error, tolerance)
    for dtype in (torch.float32, torch.float64):
        m = w6_torch.load_reference(torch, ref).to(dtype)
        opt = torch.optim.SGD(m.parameters(), lr=common.LR, momentum=0.9)
        losses = []
        for i in range(3):
            opt.zero_grad(set_to_none=True)
            z = m(x.to(dtype))
            L = F.cross_entropy(z, y)
            L.backward()
            opt.step()
            losses.append(L.item())
            if i == 0 and dtype == torch.float32:
                err = float((z.detach() - torch.from_numpy(ref["logits0"])).abs().max())
                checks.append(("W6 train-mode logits0", err, 1e-5))
                sd = m.state_dict()
                checks.append(("W6 running stats after1/*", max(
                    float((sd[k[len("after1/"):]] - torch.from_numpy(ref[k])).abs().max())
                    for k in ref.files if k.startswith("after1/")), 1e-6))
        tag = "f32" if dtype == torch.float32 else "f64"
        tol = 1e-6 if dtype == torch.float32 else 1e-5  # float64 differs from float32 by the rounding only
        checks.append((f"W6 {tag} loss0, loss1 vs W6_ref.npz", max(abs(losses[0] - float(ref["loss0"])),
                                                               abs(losses[1] - float(ref["loss1"]))), tol))
        checks.append((f"W6 {tag} loss2 vs common.W6_LOSS2", abs(losses[2] - common.W6_LOSS2), tol))
    eref = common.w6_files("w8")[1]
    m = w6_torch.load_reference(torch, eref).eval()
    with torch.inference_mode():
        for b in (1, 256):
            z = m(torch.from_numpy(eref[f"x_b{b}"]))
            err = float((z - torch.from_numpy(eref[f"logits_b{b}"])).abs().max())
            checks.append((f"W8 eval-mode logits batch {b}", err, 1e-5))
    ok = True
    for what, err, tol in checks:
        good = err <= tol
        ok &= good
        print(f"  {what:<40} max err {err:.2e}  {'ok' if good else 'FAIL'}")
    return ok


def run(steps=3, lr=0.5):
    # a large lr so the updates move the parameters visibly between steps
    ok = True
    try:
        import torch
    except ImportError:
        print("selfcheck: torch not installed; cannot check the NumPy steps against autograd")
        return False
    torch.set_num_threads(2)
    b = common.builders()
    rng = np.random.default_rng(7)
    print("NumPy hand-written steps vs torch autograd (float64):")
    for loss, layers, B in (("xent", [13, 17, 11, 5], 9), ("mse", [7, 19, 6], 4), ("xent", [5, 3], 6)):
        inits = b.mlp_init(layers, seed=3, dtype="float64")
        x = rng.standard_normal((B, layers[0]))
        y = (rng.integers(0, layers[-1], size=B).astype(np.int64) if loss == "xent"
             else rng.standard_normal((B, layers[-1])))
        step, params = np_impl.make_mlp_step(inits, x, y, loss=loss, lr=lr)
        l1 = [step() for _ in range(steps)]
        l2, p2 = _torch_mlp(torch, inits, x, y, loss, lr, steps)
        ok &= _compare(f"mlp {layers} batch {B} {loss}", l1, params, l2, p2, 1e-10)
    x = rng.standard_normal((37, 23)) * 2
    a, bb, c = (rng.standard_normal(23) for _ in range(3))
    step, params = np_impl.make_w4_step(a, bb, c, x, lr=lr * 200)
    l1 = [step() for _ in range(steps)]
    l2, p2 = _torch_w4(torch, a, bb, c, x, lr * 200, steps)
    ok &= _compare("w4 (37, 23)", l1, params, l2, p2, 1e-10)
    inits = b.mlp_init([784, 512, 512, 10], seed=0, dtype="float64")
    x = rng.standard_normal((3, 784))
    out = np_impl.make_forward(inits, x)()
    h = torch.from_numpy(x)
    for i, (w, bias) in enumerate(inits):
        h = h @ torch.from_numpy(w) + torch.from_numpy(bias)
        if i < len(inits) - 1:
            h = torch.relu(h)
    err = float(np.max(np.abs(out - h.numpy())))
    print(f"  {'W2 forward (3, 784)':<40} out err {err:.2e}  {'ok' if err < 1e-10 else 'FAIL'}")
    ok &= err < 1e-10
    ok &= check_w7_jax() is not False  # skipped (None) when JAX or the reference files are missing
    ok &= check_w6_torch() is not False  # skipped (None) when the reference files are missing

    # libml, if installed: same W1-sized step in float32
    try:
        import libml_compile as lc
    except ImportError:
        print("libml not installed: skipped the libml vs NumPy check")
        return ok
    print("libml prog.step vs NumPy step (float32, W1/W2/W4 workloads, 3 steps, lr 0.01):")
    for wid in ("W1", "W2"):
        spec = common.WORKLOADS[wid]
        feeds = common.data(wid)
        try:
            g, L = b.mlp(spec["layers"], spec["batch"], loss=spec["loss"], seed=common.PARAM_SEED)
            prog = lc.compile(g, loss=L, optimizer=lc.SGD(lr=common.LR), num_threads=2)
            l1 = [prog.step(feeds) for _ in range(steps)]
            p1 = prog.params
        except Exception as e:  # the lead's code may not be ready
            print(f"  libml failed: {type(e).__name__}: {e}")
            ok = False
            continue
        step, p2 = np_impl.make_mlp_step(common.mlp_params(spec["layers"]), feeds["x"], feeds["y"],
                                         loss=spec["loss"], lr=common.LR)
        l2 = [step() for _ in range(steps)]
        ok &= _compare(f"{wid} libml vs numpy", l1, p1, l2, p2, 1e-4)
    try:
        feeds = common.data("W4")
        g, L = b.w4(seed=common.PARAM_SEED)
        prog = lc.compile(g, loss=L, optimizer=lc.SGD(lr=common.LR), num_threads=2)
        l1 = [prog.step(feeds) for _ in range(steps)]
        a, bb, c = common.w4_params()
        step, p2 = np_impl.make_w4_step(a, bb, c, feeds["x"], lr=common.LR)
        l2 = [step() for _ in range(steps)]
        ok &= _compare("W4 libml vs numpy", l1, prog.params, l2, p2, 1e-5)
    except Exception as e:
        print(f"  libml W4 failed: {type(e).__name__}: {e}")
        ok = False
    spec = common.WORKLOADS["W5-b1"]
    feeds = common.data("W5-b1")
    try:
        prog = lc.compile(b.mlp_forward(spec["layers"], spec["batch"], seed=common.PARAM_SEED), num_threads=2)
        out = prog.run(feeds)["logits"]
        ref = np_impl.make_forward(common.mlp_params(spec["layers"]), feeds["x"])()
        err = float(np.max(np.abs(out - ref)))
        print(f"  {'W5-b1 libml vs numpy forward':<40} out err {err:.2e}  {'ok' if err < 1e-4 else 'FAIL'}")
        ok &= err < 1e-4
    except Exception as e:
        print(f"  libml forward failed: {type(e).__name__}: {e}")
        ok = False
    return ok


if __name__ == "__main__":
    sys.exit(0 if run() else 1)
