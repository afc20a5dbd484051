"""W7 (the transformer text classifier of ../shared/bench/workloads.md) written by hand in JAX.

The model is PyTorch's module, op for op: token embedding (1000, 128) + position embedding (64, 128);
two post-norm ``nn.TransformerEncoderLayer(d_model=128, nhead=4, dim_feedforward=512, dropout=0,
activation="gelu", batch_first=True)``, i.e. ``h = norm1(h + self_attn(h)); h = norm2(h + linear2(gelu(
linear1(h))))`` with exact (erf) GELU and LayerNorm eps 1e-5; mean over the 64 tokens; Linear 128 -> 2;
softmax cross-entropy, mean over the batch of 16.  Parameters keep PyTorch's names and layouts
(``Linear.weight`` is (out, in), so a layer is ``x @ W.T + b``; ``in_proj_weight`` (384, 128) stacks
q, k, v) and are read from the W7.onnx initializers, the same tensors libml imports and the torch
competitor starts from.

The optimizer is ``torch.optim.AdamW(lr=1e-3, weight_decay=0.01)`` with its defaults (betas 0.9/0.999,
eps 1e-8, decay on every parameter), in PyTorch's order of operations: decay first
(``p *= 1 - lr * wd``), then ``p -= lr / (1 - b1**t) * m / (sqrt(v) / sqrt(1 - b2**t) + eps)``.
"""
import math

import numpy as np

D_MODEL, HEADS, LAYERS, FF = 128, 4, 2, 512
LN_EPS = 1e-5
LR, WEIGHT_DECAY, BETAS, ADAM_EPS = 1e-3, 0.01, (0.9, 0.999), 1e-8


def load_params(onnx_path, names):
    """{name: float32 array} of the named initializers of ``onnx_path``; a missing name raises."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in onnx.load(onnx_path).graph.initializer}
    missing = [n for n in names if n not in inits]
    if missing:
        raise ValueError(f"W7 (jax): {onnx_path} has no initializer named {missing}")
    return {n: np.ascontiguousarray(numpy_helper.to_array(inits[n]), dtype=np.float32) for n in names}


def make(jax, jnp):
    """(loss_fn(params, tokens, labels) -> scalar, adamw(params, grads, state) -> (params, state),
    init_state(params)) for dict-of-arrays params with the PyTorch names."""

    def linear(x, p, name):
        return x @ p[name + ".weight"].T + p[name + ".bias"]

    def layer_norm(x, p, name):
        mu = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)  # biased, as torch's LayerNorm
        return (x - mu) * jax.lax.rsqrt(var + LN_EPS) * p[name + ".weight"] + p[name + ".bias"]

    def self_attn(x, p, name):
        B, T, D = x.shape
        hd = D // HEADS
        qkv = x @ p[name + ".in_proj_weight"].T + p[name + ".in_proj_bias"]  # (B, T, 3D): q | k | v

        def heads(a):  # (B, T, D) -> (B, H, T, hd)
            return a.reshape(B, T, HEADS, hd).transpose(0, 2, 1, 3)
        q, k, v = (heads(a) for a in jnp.split(qkv, 3, axis=-1))
        # a Python float is weakly typed: the scale takes the dtype of q (float32, or float64 in selfcheck)
        att = jax.nn.softmax((q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(hd)), axis=-1)
        o = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, D)
        return linear(o, p, name + ".out_proj")

    def loss_fn(p, tokens, labels):
        T = tokens.shape[1]
        h = jnp.take(p["tok.weight"], tokens, axis=0) + p["pos.weight"][:T]
        for i in range(LAYERS):
            n = f"layers.{i}"
            h = layer_norm(h + self_attn(h, p, n + ".self_attn"), p, n + ".norm1")
            ff = linear(jax.nn.gelu(linear(h, p, n + ".linear1"), approximate=False), p, n + ".linear2")
            h = layer_norm(h + ff, p, n + ".norm2")
        logits = linear(jnp.mean(h, axis=1), p, "fc")
        lse = jax.nn.logsumexp(logits, axis=1)
        return jnp.mean(lse - jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0])

    def init_state(p):
        # m and v get buffers of their own: donating one buffer twice is an error
        return {"t": jnp.zeros((), p["fc.bias"].dtype), "m": {n: jnp.zeros_like(a) for n, a in p.items()},
                "v": {n: jnp.zeros_like(a) for n, a in p.items()}}

    def adamw(p, g, s):
        b1, b2 = BETAS
        t = s["t"] + 1
        bc1, bc2_sqrt = 1 - b1 ** t, jnp.sqrt(1 - b2 ** t)
        new_p, new_m, new_v = {}, {}, {}
        for n in p:
            m = b1 * s["m"][n] + (1 - b1) * g[n]
            v = b2 * s["v"][n] + (1 - b2) * jnp.square(g[n])
            decayed = p[n] * (1 - LR * WEIGHT_DECAY)
            new_p[n] = decayed - (LR / bc1) * m / (jnp.sqrt(v) / bc2_sqrt + ADAM_EPS)
            new_m[n], new_v[n] = m, v
        return new_p, {"t": t, "m": new_m, "v": new_v}

    return loss_fn, adamw, init_state


def make_step(jax, jnp, params):
    """A jitted training step with the params and the optimizer state donated (updated in place):
    ``step(carry, tokens, labels) -> (carry, loss)`` with ``carry = (params, adam_state)``, and the
    initial carry."""
    loss_fn, adamw, init_state = make(jax, jnp)

    def _step(carry, tokens, labels):
        p, s = carry
        L, g = jax.value_and_grad(loss_fn)(p, tokens, labels)
        return adamw(p, g, s), L

    p = {n: jnp.asarray(a) for n, a in params.items()}
    return jax.jit(_step, donate_argnums=(0,)), (p, init_state(p))
