"""Hand-written NumPy training steps (the "no framework" baseline): forward + backward + SGD, in place.

Each ``make_*`` returns ``(step, params)``: ``step()`` runs one training step on the fixed feeds, updates
``params`` (a dict of ndarrays) in place and returns the loss (computed before the update).
Checked against torch autograd by ``python benchmarks/run.py --selfcheck``.
"""
import numpy as np


def make_mlp_step(inits, x, y, loss="xent", lr=0.01):
    """MLP with ReLU between layers; ``inits`` = [(w (in,out), b (out,)), ...]; x (B, in)."""
    ws = [w.copy() for w, _ in inits]
    bs = [b.copy() for _, b in inits]
    n = len(ws)
    B = x.shape[0]
    f32 = x.dtype.type
    lr = f32(lr)
    # preallocated activations: hs[i] is the input to layer i, zs[i] its pre-activation
    zs = [np.empty((B, w.shape[1]), x.dtype) for w in ws]
    hs = [x] + [np.empty((B, w.shape[1]), x.dtype) for w in ws[:-1]]
    dws = [np.empty_like(w) for w in ws]
    if loss == "xent":
        onehot_idx = (np.arange(B), y)
    inv_b = f32(1.0 / B)

    def step():
        for i in range(n):
            np.matmul(hs[i], ws[i], out=zs[i])
            zs[i] += bs[i]
            if i < n - 1:
                np.maximum(zs[i], 0, out=hs[i + 1])
        z = zs[-1]
        if loss == "xent":
            m = z.max(axis=1, keepdims=True)
            e = np.exp(z - m)
            s = e.sum(axis=1, keepdims=True)
            # loss = mean(logsumexp - z[y])
            lval = float(np.mean(np.log(s[:, 0]) + m[:, 0] - z[onehot_idx]))
            dz = e / s
            dz[onehot_idx] -= 1
            dz *= inv_b
        else:
            diff = z - y
            lval = float(np.mean(np.square(diff)))
            dz = diff * f32(2.0 / diff.size)
        for i in range(n - 1, -1, -1):
            np.matmul(hs[i].T, dz, out=dws[i])
            db = dz.sum(axis=0)
            if i > 0:
                dh = dz @ ws[i].T
                dh *= hs[i] > 0  # relu'(z) == (relu(z) > 0)
            ws[i] -= lr * dws[i]
            bs[i] -= lr * db
            if i > 0:
                dz = dh
        return lval

    params = {}
    for i in range(n):
        params[f"w{i}"] = ws[i]
        params[f"b{i}"] = bs[i]
    return step, params


def make_w4_step(a, b, c, x, lr=0.01):
    """y = sigmoid(x*a + b) / (1 + relu(x - c)); loss = mean(y); a, b, c (N,) broadcast over rows of x."""
    a, b, c = a.copy(), b.copy(), c.copy()
    f32 = x.dtype.type
    lr = f32(lr)
    inv_n = f32(1.0 / x.size)

    def step():
        s = x * a
        s += b
        np.negative(s, out=s)
        np.exp(s, out=s)
        s += 1
        np.reciprocal(s, out=s)          # s = sigmoid(x*a + b)
        t = x - c
        mask = t > 0
        np.maximum(t, 0, out=t)
        t += 1                           # t = 1 + relu(x - c)
        yv = s / t
        lval = float(yv.mean(dtype=np.float64))
        # dL/du (u = x*a+b) = inv_n / t * s * (1 - s)
        g = np.reciprocal(t, out=t)      # t := 1/t
        g *= inv_n
        du = g * s
        np.subtract(1, s, out=s)
        du *= s
        # dL/dc = sum(inv_n * y / t * [x > c])
        yv *= g
        yv *= mask
        dc = yv.sum(axis=0)
        db = du.sum(axis=0)
        du *= x
        da = du.sum(axis=0)
        a[...] -= lr * da
        b[...] -= lr * db
        c[...] -= lr * dc
        return lval

    return step, {"a": a, "b": b, "c": c}


def make_forward(inits, x):
    ws = [w for w, _ in inits]
    bs = [b for _, b in inits]
    n = len(ws)

    def run():
        h = x
        for i in range(n):
            h = h @ ws[i]
            h += bs[i]
            if i < n - 1:
                np.maximum(h, 0, out=h)
        return h

    return run
