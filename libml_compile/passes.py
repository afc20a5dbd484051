"""Graph passes over the joint training graph (forward + backward + update alike).

Order (``lower.lower_entry``): simplify (constant folding, algebraic identities, CSE, DCE) →
absorb transposes into GEMM flags → epilogue / SGD / Adam rewrites → order in-place writers after the
readers of what they overwrite → fuse (split to the runtime's limits) → schedule.  Passes work on a private
clone of the user's graph.  simplify runs once, on the joint graph of every entry, before any entry is
lowered; the per-entry rewrites after it work on that result.  No pass edits a node: every rewrite builds
new nodes (path copying: simplify's rounds, ``ops_logic.lower_logic``, ``Rewrite``, the copies of
``order_inplace_writers``) and returns the new roots or an {old: new} map, so entries never see each other's
fusions and may be lowered in any order.
"""
from __future__ import annotations

import math

import numpy as np

from .ir import FLOAT_DTYPES, Tensor, broadcast_shapes
from .ops import REGISTRY, gemm_outputs, ref_outputs

LEAVES = ("input", "param", "const", "buffer")
FOLD_MAX_GROWTH = 4096  # do not fold an op whose constant result is this much larger than its inputs


def topo_from_roots(roots):
    """Nodes reachable from ``roots``, in a topological order (DFS post-order, iterative): each node is
    emitted after its inputs, the inputs in order (the order the recursive definition gives)."""
    seen, order = set(), []
    for r in roots:
        if r in seen:
            continue
        seen.add(r)
        stack = [(r, iter(r.inputs))]
        while stack:
            t, it = stack[-1]
            for i in it:
                if i not in seen:
                    seen.add(i)
                    stack.append((i, iter(i.inputs)))
                    break
            else:
                stack.pop()
                order.append(t)
    return order


def consumer_map(nodes):
    """{tensor: [nodes of ``nodes`` reading it, in order, once per input slot]}."""
    consumers = {}
    for t in nodes:
        for i in t.inputs:
            consumers.setdefault(i, []).append(t)
    return consumers


class Rewrite:
    """The replacements one pass decides, applied by path copying: the graph the pass read is never changed.

    ``replace(t, op, inputs, attrs)``: in the rewritten graph, ``t`` is the node ``op(inputs)`` (inputs are
    tensors of the graph read, or nodes built for the rewrite); it keeps ``t``'s name, shape and dtype.
    ``apply(roots)`` returns the new roots and ``{old: new}``: every replaced node and every node
    downstream of one is a fresh copy, the rest is shared.  So the entries of one program (run, grad,
    step, their checked variants) rewrite the same joint graph independently, in any order."""

    def __init__(self):
        self.rep = {}

    def replace(self, t, op, inputs, attrs):
        self.rep[t] = (op, tuple(inputs), attrs)

    def apply(self, roots):
        if not self.rep:
            return list(roots), {}
        rep = self.rep

        def ins_of(t):
            return rep[t][1] if t in rep else t.inputs
        # topological order of the rewritten graph (recipes' inputs in place of the replaced nodes')
        seen, order = set(), []
        for r in roots:
            if r in seen:
                continue
            seen.add(r)
            stack = [(r, iter(ins_of(r)))]
            while stack:
                t, it = stack[-1]
                for i in it:
                    if i not in seen:
                        seen.add(i)
                        stack.append((i, iter(ins_of(i))))
                        break
                else:
                    stack.pop()
                    order.append(t)
        m, fresh = {}, []
        for t in order:
            op, ins, attrs = rep.get(t, (t.op, t.inputs, t.attrs))
            new_ins = tuple(m.get(i, i) for i in ins)
            if t not in rep and all(a is b for a, b in zip(new_ins, t.inputs)):
                continue  # unchanged and nothing upstream changed: shared
            n = Tensor(t.graph, op, new_ins, dict(attrs), t.shape, t.dtype, t.name, t.value)
            n.auto_name = t.auto_name
            m[t] = n
            fresh.append(n)
        return [m.get(r, r) for r in roots], m


def _attr_key(attrs):
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in attrs.items()))


def _is_scalar_const(t, value=None):
    if t.op != "const" or t.value.size != 1:
        return False
    return value is None or float(t.value.reshape(-1)[0]) == value


def node_like(t, op, inputs, attrs, value=None):
    """A new node standing for ``t`` in a rewritten graph: ``op(inputs)`` with ``t``'s graph, name, shape,
    dtype and id; ``t`` is left as it is.  It takes no new id, so the auto names of nodes built later are
    the ones they had when passes edited nodes in place (plans stay byte-identical)."""
    n = Tensor.__new__(Tensor)
    n.graph, n.op, n.inputs, n.attrs, n.value = t.graph, op, tuple(inputs), attrs, value
    n.shape, n.dtype, n.name, n.id, n.auto_name = t.shape, t.dtype, t.name, t.id, t.auto_name
    return n


def simplify(roots, max_rounds=4):
    """Constant folding, algebraic identities, CSE and DCE. Returns ``(live nodes in topological order,
    {node: its new version})``.

    Rewrites build new nodes, never edit one (path copying): a round gives every node it replaces, folds or
    rewires a new version, which every reader of the node reads, and the nodes it leaves alone (with all
    their inputs) are shared with the graph it read.  The map covers every node of the graph read that
    changed (callers look their roots and outputs up in it).  A rewrite can build new nodes (sign and
    scale pushing) that the same round does not visit, so rounds repeat until one rewrites nothing (W4
    needs two)."""
    rep: dict[Tensor, Tensor] = {}
    nodes = None
    for _ in range(max_rounds):
        # a round ends with the topological order of its live roots: the next round starts from it
        nodes, step_rep, changed = _simplify_round(roots, nodes)
        # compose with the earlier rounds: every key maps to its latest version
        rep = {t: step_rep.get(s, s) for t, s in rep.items()} if rep else {}
        rep.update(step_rep)
        roots = [step_rep.get(t, t) for t in roots]
        if not changed:
            break
    return nodes, rep


def _simplify_round(roots, nodes=None):
    """One rewriting round; ``nodes``: the topological order of ``roots`` if known.  Returns (the live
    nodes, {node of the round: what its readers read now}, whether a rewrite built a node not visited).

    Two maps: ``ver[t]`` is t's new version (t reading its inputs' new versions, or the constant t folds
    to); ``cur[t]`` is what t's readers read: t's replacement if a rule or CSE replaced it, else its
    version.  The scale-pushing tests look at a reader through ``ver``, its inputs too (a reader not
    visited yet still reads the old nodes)."""
    if nodes is None:
        nodes = topo_from_roots(roots)
    changed = False
    cur: dict[Tensor, Tensor] = {}
    ver: dict[Tensor, Tensor] = {}
    cse: dict = {}
    folded: dict[Tensor, list] = {}  # folded node with several outputs (its const) -> the values of all of them
    # readers of each node, roots included (as None): scale pushing moves a factor off a node only when
    # every reader takes it over, otherwise the scaled node stays alive and the rewrite adds an op
    readers = consumer_map(nodes)
    for t in roots:
        readers.setdefault(t, []).append(None)
    visited = set(nodes)  # and every version: a replacement not in it is a new node

    for t in nodes:
        op = t.op
        if op in LEAVES:
            if op == "const" and t.value.size <= 64:
                key = ("const", t.dtype, t.shape, t.value.tobytes())
                if key in cse:
                    cur[t] = cse[key]
                else:
                    cse[key] = t
            continue
        ins = tuple([cur.get(i, i) for i in t.inputs])
        d = REGISTRY[op]
        if op in ("add", "sub", "mul", "div"):
            ins = _drop_redundant_broadcasts(op, t.shape, ins)
        # constant folding with the op's NumPy reference (compile time only); a node with several outputs
        # folds all of them at once (its projections, visited after it, take theirs from ``folded``)
        if op == "output" and ins[0] in folded:
            cur[t] = ver[t] = _const_like(t, folded[ins[0]][t.attrs["index"]])
            continue
        if d.ref is not None and d.kind != "opt" and ins and all(i.op == "const" for i in ins):
            if t.size <= FOLD_MAX_GROWTH * max(max(i.size for i in ins), 1):
                u = t if ins == t.inputs else node_like(t, op, ins, t.attrs)
                vals = ref_outputs(u, [i.value for i in ins])
                c = cur[t] = ver[t] = _const_like(t, vals[0])
                if len(vals) > 1:
                    folded[c] = vals
                continue
        if op == "reshape" and ins[0].shape != t.shape and ins[0].op == "reshape":
            ins = (ins[0].inputs[0],)  # collapse the chain (_algebraic then drops a reshape back to x's shape)
        u = t
        if ins != t.inputs:
            u = cur[t] = ver[t] = node_like(t, op, ins, t.attrs)
            visited.add(u)
            if t in readers:
                readers[u] = readers[t]
        s = _algebraic(u, readers, ver)
        if s is not None and s.shape == t.shape and s.dtype == t.dtype:
            cur[t] = s
            readers[s] = readers.get(u, [])
            changed = changed or (s.op not in LEAVES and s not in visited)  # a new node: not visited yet
            continue
        key = (op, tuple([id(i) for i in ins]), _attr_key(t.attrs))
        if d.kind != "opt" and key in cse:
            cur[t] = cse[key]
        else:
            cse[key] = u
    live_roots = [cur.get(x, x) for x in roots]
    return topo_from_roots(live_roots), cur, changed


def _const_like(t, val):
    """The constant ``val`` standing for node ``t`` (its name, shape and dtype): what ``t`` folds to."""
    val = np.array(val, dtype=t.dtype, order="C").reshape(t.shape)
    val.flags.writeable = False
    return node_like(t, "const", (), {}, val)


def _drop_redundant_broadcasts(op, shape, ins):
    """add(broadcast_to(x, S), y) -> add(x, y) when broadcasting x with y already gives S: the fused
    kernel broadcasts with zero strides for free (and a broadcast scalar becomes an immediate).  Returns
    the inputs of the node ``op`` of ``shape`` reading ``ins``."""
    if ins[0].op != "broadcast_to" and ins[1].op != "broadcast_to":
        return ins
    ins = list(ins)
    for k in (0, 1):
        x, other = ins[k], ins[1 - k]
        if x.op == "broadcast_to":
            inner = x.inputs[0]
            if broadcast_shapes(op, inner.shape, other.shape) == shape:
                ins[k] = inner
    return tuple(ins)


def _takes_scale(c, t, ver):
    """Whether reader ``c`` of ``t`` absorbs a constant factor of ``t`` under the scale-pushing rules
    (``c`` as its version ``ver`` gives, reading its inputs' versions)."""
    if c is None:
        return False
    c = ver.get(c, c)
    op = c.op
    if op == "sum":
        return True
    if op == "mul":
        for i in c.inputs:
            if _is_scalar_const(ver.get(i, i)):
                return False
        return True
    if op != "div":
        return False
    a, b = c.inputs
    return ver.get(a, a) is t and ver.get(b, b) is not t


def _scaled(t, readers, ver):
    """(x, k) if ``t`` is x * k for a float scalar constant k, x of t's shape, and every reader of ``t``
    can take the factor over."""
    rd = readers.get(t)
    if t.op != "mul" or t.dtype not in FLOAT_DTYPES or not rd or not all(_takes_scale(c, t, ver) for c in rd):
        return None
    for x, k in (t.inputs, t.inputs[::-1]):
        if _is_scalar_const(k) and not _is_scalar_const(x) and x.shape == t.shape:
            return x, k
    return None


def _only_reader(rd, t, ver):
    """Whether the readers ``rd`` of a node are just the node being rewritten, ``t`` (a version)."""
    return rd is not None and len(rd) == 1 and rd[0] is not None and ver.get(rd[0], rd[0]) is t


def _algebraic(t, readers, ver):
    """x*1, 1*x, x+0, x-0, x/1, identity(x), reshape(x) of x's shape, neg(neg(x)), sign and scale pushing
    -> simpler node or None (a new one, or a node of the graph).  ``readers``/``ver``: see _simplify_round
    (reshape chains are collapsed there, as the node's new inputs)."""
    from .ops import add, div, make, mul, neg, sub
    a = t.inputs[0] if t.inputs else None
    b = t.inputs[1] if len(t.inputs) > 1 else None
    if t.op == "identity":
        return a
    if t.op == "mul":
        if _is_scalar_const(b, 1.0):
            return a
        if _is_scalar_const(a, 1.0):
            return b
    if t.op in ("add", "sub") and _is_scalar_const(b, 0.0):
        return a
    if t.op == "add" and _is_scalar_const(a, 0.0):
        return b
    if t.op == "div" and _is_scalar_const(b, 1.0):
        return a
    if t.op == "neg" and a.op == "neg":
        return a.inputs[0]
    # a + (-b) -> a - b, (-a) + b -> b - a, a - (-b) -> a + b: gradient accumulation adds negated
    # contributions (the gradient of sub's second operand); the neg then often dies
    if t.op in ("add", "sub") and t.dtype in FLOAT_DTYPES:
        if b.op == "neg" and b.inputs[0].shape == b.shape:
            return (sub if t.op == "add" else add)(a, b.inputs[0])
        if t.op == "add" and a.op == "neg" and a.inputs[0].shape == a.shape:
            return sub(b, a.inputs[0])
    # sign pushing: gradient rules emit neg() (sub, div); moving it outward lets neg(neg(.)) cancel and
    # a reduction absorb it in its scale, saving passes in fused kernels (W4's backward: two)
    if t.op == "mul" and t.dtype in FLOAT_DTYPES and (a.op == "neg") != (b.op == "neg"):
        return neg(mul(a.inputs[0], b) if a.op == "neg" else mul(a, b.inputs[0]))
    if t.op == "sum" and a.op == "neg":
        return make("sum", (a.inputs[0],), dict(t.attrs, scale=-t.attrs["scale"]))
    # scale pushing, the same for a constant factor k (a mean's 1/N enters the backward pass as one):
    # (x*k)*y -> (x*y)*k, (x*k)/y -> (x/y)*k, (k/d)*y -> (y/d)*k, sum(x*k) -> sum(x) scaled by k.  The
    # factor travels to the reduction that ends the chain and costs nothing there.
    if t.dtype in FLOAT_DTYPES and t.op in ("mul", "div", "sum"):
        if t.op == "sum":
            xk = _scaled(a, readers, ver)
            if xk is not None:
                return make("sum", (xk[0],), dict(t.attrs, scale=t.attrs["scale"] * float(xk[1].value.reshape(-1)[0])))
            return None
        for k_side in ((0, 1) if t.op == "mul" else (0,)):
            p, y = t.inputs[k_side], t.inputs[1 - k_side]
            if _is_scalar_const(y):
                continue
            xk = _scaled(p, readers, ver)
            if xk is not None:
                x, k = xk
                return mul(mul(x, y) if t.op == "mul" else div(x, y), k)
            if (t.op == "mul" and p.op == "div" and _only_reader(readers.get(p), t, ver)
                    and _is_scalar_const(p.inputs[0])
                    and p.inputs[1].shape == p.shape):
                return mul(div(y, p.inputs[1]), p.inputs[0])
    if t.op == "reshape" and a.shape == t.shape:
        return a
    if t.op == "broadcast_to" and a.shape == t.shape:
        return a
    return None


def gemm_flags(m):
    """The attrs a GEMM node built from matmul ``m`` inherits: its transpose flags and, when not 1, the
    alpha ``fold_gemm_scales`` gave it."""
    f = {"ta": m.attrs.get("ta", False), "tb": m.attrs.get("tb", False)}
    if m.attrs.get("alpha", 1.0) != 1.0:
        f["alpha"] = m.attrs["alpha"]
    return f


def _scalar_factor(x):
    """(inner, c) when ``x`` is inner * c, c * inner or inner / c for a float scalar constant c and inner
    of x's shape and dtype, else None."""
    if x.op not in ("mul", "div") or x.dtype not in FLOAT_DTYPES:
        return None
    pairs = [x.inputs, x.inputs[::-1]] if x.op == "mul" else [x.inputs]
    for inner, k in pairs:
        if _is_scalar_const(k) and inner.shape == x.shape and inner.dtype == x.dtype:
            c = float(k.value.reshape(-1)[0])
            if x.op == "div":
                if c == 0.0:
                    return None
                c = 1.0 / c
            return inner, c
    return None


def fold_gemm_scales(nodes, roots):
    """matmul(x * c, y), matmul(x, y * c) and matmul(x, y) * c (or / c) for float scalar constants c ->
    one matmul with BLAS's alpha = c: attention's 1/sqrt(d) (exporters scale q and k by its square root,
    or the scores), and the same factors in its backward, cost no pass over an operand or the product.
    The scaled operand stays if something else reads it.  (alpha multiplies the product before any
    epilogue: bias and activation see alpha * A @ B, as (x * c) @ y + b computes.)  Returns a Rewrite."""
    rw = Rewrite()
    consumers = consumer_map(nodes)
    keep = set(roots)
    folded = {}
    for t in nodes:
        if t.op != "matmul":
            continue
        ins, alpha = list(t.inputs), t.attrs.get("alpha", 1.0)
        for k in (0, 1):
            got = _scalar_factor(ins[k])
            if got is not None:
                ins[k], c = got
                alpha *= c
        if alpha != t.attrs.get("alpha", 1.0):
            folded[t] = (ins, dict(t.attrs, alpha=alpha))
            rw.replace(t, "matmul", ins, folded[t][1])
    for d in nodes:
        got = _scalar_factor(d)
        if got is None:
            continue
        m, c = got
        if m.op != "matmul" or m in keep or consumers.get(m) != [d]:
            continue
        ins, attrs = folded.get(m, (m.inputs, dict(m.attrs)))
        rw.replace(d, "matmul", ins, dict(attrs, alpha=attrs.get("alpha", 1.0) * c))
    return rw


def fuse_epilogues(nodes, roots):
    """matmul -> + bias(N,) [-> relu]  ==>  one ``linear`` node: BLAS writes a panel, the epilogue adds the
    bias and applies relu while the panel is in cache.  The consumer is replaced (its consumers read the
    new node); the matmul stays only if something else still reads it.  Returns a Rewrite."""
    rw = Rewrite()
    consumers = consumer_map(nodes)
    keep = set(roots)
    for m in nodes:
        if m.op != "matmul" or m in keep or len(consumers.get(m, ())) != 1:
            continue
        add = consumers[m][0]
        if add.op != "add" or add.shape != m.shape:
            continue
        bias = add.inputs[1] if add.inputs[0] is m else add.inputs[0]
        if bias is m or bias.size != m.shape[-1] or bias.shape[-1:] != m.shape[-1:]:
            continue
        out, act = add, "none"
        cons = consumers.get(add, ())
        if len(cons) == 1 and cons[0].op == "relu" and add not in keep:
            out, act = cons[0], "relu"
        if bias.ndim != 1:
            from .ops import reshape
            bias = reshape(bias, (bias.size,))
        rw.replace(out, "linear", (m.inputs[0], m.inputs[1], bias), dict(gemm_flags(m), act=act))
    return rw


def fuse_vm_epilogues(nodes, roots):
    """GEMM [+ bias] -> op  ==>  one ``linear_ex`` node, for every op with the ``epilogue`` capability
    (ops.OpDef.epilogue): the activations forward (GELU, tanh, LeakyRelu with its alpha as an immediate,
    ...), their gradient steps backward (``tanh_grad(g = GEMM, y)``: the GEMM producing the upstream
    gradient multiplies by the derivative while its panel is in cache), and products or sums with a tensor
    of the GEMM's shape (residual adds).  The op's operand 0 must be the GEMM's result, read by nothing
    else; its other operands are scalar consts (VM immediates) or at most one tensor of its shape (the
    auxiliary operand, 2-D GEMMs only).  A sum over axis 0 of the result (the bias gradient) becomes the
    GEMM's column sums.  Runs after fuse_epilogues / fuse_relu_backward, which keep relu's own epilogues.
    Returns a Rewrite."""
    rw = Rewrite()
    consumers = consumer_map(nodes)
    keep = set(roots)
    kept = set()  # GEMMs whose value one epilogue already keeps
    below = None  # (built on first use) below(c, d): whether c depends on d
    for d in nodes:
        spec = REGISTRY.get(d.op)
        if spec is None or not spec.epilogue or spec.vm is None or not d.inputs or len(d.inputs) > 3:
            continue
        p = d.inputs[0]
        if p.shape != d.shape or p.dtype != d.dtype or d.dtype not in FLOAT_DTYPES or p in kept:
            continue
        # the GEMM's value is read elsewhere too (GELU's gradient reads its input): the epilogue writes
        # its result to a buffer of its own and the GEMM + bias value stays as the node's "pre" output.
        # That saves a pass over it only if its other readers come after d (the backward pass): a sibling
        # reading it beside d would share d's elementwise kernel, which reads it once for both
        others = [c for c in consumers.get(p, ()) if c is not d]
        keep_pre = p in keep or bool(others)
        if others:
            if below is None:
                below = _descendant_test(nodes, consumers)
            if not all(below(c, d) for c in others):
                continue
        if p.op == "matmul":
            has_bias, head = False, (p.inputs[0], p.inputs[1])
        elif p.op == "linear" and p.attrs.get("act") == "none":
            has_bias, head = True, (p.inputs[0], p.inputs[1], p.inputs[2])
        else:
            continue
        operands, aux = [], None
        for x in d.inputs[1:]:
            if x.op == "const" and x.value.size == 1:
                operands.append(float(x.value.reshape(-1)[0]))
            elif x.shape == d.shape and x.dtype == d.dtype and aux is None and x is not p:
                aux = x
                operands.append("aux")
            else:
                break
        else:
            if aux is not None and not _flat_2d(head[0], head[1], p.attrs.get("ta"), d.shape):
                continue  # the kernel reads the auxiliary operand as rows of a 2-D C
            if aux is not None and d.op in ("add", "mul") and p.op == "matmul" and aux.op in ("matmul", "linear",
                                                                                              "linear_ex"):
                continue  # gemm + gemm: either could host the other; leave it to the element-wise kernel
            if keep_pre and aux is not None:
                continue  # (an auxiliary operand could be computed from the kept value: a cycle)
            attrs = dict(gemm_flags(p), epi=d.op, has_bias=has_bias, operands=tuple(operands))
            inputs = head + ((aux,) if aux is not None else ())
            if keep_pre:
                attrs["keep"] = True
                rw.replace(d, "linear_ex", inputs, attrs)
                rw.replace(p, "output", (d,), {"index": gemm_outputs(attrs).index("pre")})
                kept.add(p)
            elif has_bias:
                rw.replace(d, "linear_ex", inputs, attrs)
            else:
                _replace_with_colsum(rw, d, "linear_ex", inputs, attrs, consumers)
    return rw


def _descendant_test(nodes, consumers):
    """``below(c, d)``: whether node ``c`` depends on node ``d``, for ``d`` among the epilogue candidates
    (ops with the epilogue capability reading a GEMM).  One pass over the topological order carries each
    node's set of candidate ancestors as the bits of a Python int: linear in the graph (a search per
    candidate made a 4,000-op chain of GEMMs take 12 s to compile)."""
    bit = {}
    for t in nodes:
        spec = REGISTRY.get(t.op)
        if spec is not None and spec.epilogue and t.inputs and t.inputs[0].op in ("matmul", "linear"):
            bit[t] = 1 << len(bit)
    anc = {}
    for t in nodes:
        a = bit.get(t, 0)
        for i in t.inputs:
            a |= anc.get(i, 0)
        anc[t] = a
    return lambda c, d: bool(anc.get(c, 0) & bit.get(d, 0))


def fold_sgd_into_gemm(nodes, roots):
    """Weight gradients that are a single 2-D GEMM read by nothing but the SGD update are never
    materialised, nor are the gradients of embedding tables under plain SGD (``sgd_scatter``: the rows the
    gather read step in place; see _sparse_rows).  Returns the new roots.

    Plain SGD: one GEMM accumulates straight into the param (``sgd_gemm``), in place: ``order_inplace_writers``
    (run after every rewrite) orders it after every other reader of the param.
    SGD with momentum: the GEMM accumulates into the momentum buffer, v = momentum*v + G
    (``momentum_gemm``, which becomes that param's gradient input of the update); the single fused
    update then adds the weight decay and steps p, so the update stays one pass over all params."""
    upd = next((t for t in roots if t.op == "sgd_update"), None)
    if upd is None:
        return roots
    from .ops import make
    momentum = upd.attrs["momentum"]
    consumers = consumer_map(nodes)
    n = len(upd.inputs) // 2
    keep_p, keep_g, folded = [], [], []
    for p, g in zip(upd.inputs[:n], upd.inputs[n:]):
        if _sparse_rows(g, p, upd, consumers, roots):
            folded.append(make("sgd_scatter", (g.inputs[0], g.inputs[1], p), {"axis": g.attrs["axis"],
                                                                              "lr": upd.attrs["lr"]}))
            continue
        if not (g.op == "matmul" and g.ndim == 2 and g.shape == p.shape and g not in roots
                and consumers.get(g) == [upd] and p.op == "param"):
            keep_p.append(p)
            keep_g.append(g)
            continue
        gemm = gemm_flags(g)
        if momentum:
            keep_p.append(p)
            keep_g.append(make("momentum_gemm", (g.inputs[0], g.inputs[1], p), dict(gemm, momentum=momentum)))
        else:
            folded.append(make("sgd_gemm", (g.inputs[0], g.inputs[1], p),
                               dict(gemm, lr=upd.attrs["lr"], weight_decay=upd.attrs["weight_decay"])))
    if not folded and all(a is b for a, b in zip(keep_g, upd.inputs[n:])):
        return roots
    # a new update node, never an edit of ``upd``: the unfused (check_finite) lowering of the same entry
    # still needs the original, which updates every param itself
    rest = [r for r in roots if r is not upd]
    if keep_p:
        rest.append(make("sgd_update", tuple(keep_p) + tuple(keep_g), dict(upd.attrs)))
    return rest + folded


def fold_sgd_into_conv(nodes, roots):
    """Plain SGD folded into the conv weight-gradient kernel: a ``conv_grad_weight`` read by nothing but the
    (momentum-free) SGD update becomes ``conv_sgd`` (x, dy, p), which sums the gradient as
    conv_grad_weight does and steps p in place with the update's own kernel arithmetic (p -= lr * (dw +
    weight_decay * p)), so results equal the unfused step's bits and no gradient buffer exists.  Momentum
    and Adam keep the gradient (their state needs it).  ``order_inplace_writers`` orders it after every
    other reader of p.  Returns the new roots (a new sgd_update for the other params, as
    fold_sgd_into_gemm)."""
    upd = next((t for t in roots if t.op == "sgd_update"), None)
    if upd is None or upd.attrs["momentum"]:
        return roots
    from .ops import make
    consumers = consumer_map(nodes)
    n = len(upd.inputs) // 2
    keep_p, keep_g, folded = [], [], []
    for p, g in zip(upd.inputs[:n], upd.inputs[n:]):
        if (g.op == "conv_grad_weight" and g.shape == p.shape and p.op == "param" and g not in roots
                and consumers.get(g) == [upd] and g.dtype == p.dtype):
            folded.append(make("conv_sgd", (g.inputs[0], g.inputs[1], p),
                               dict(g.attrs, lr=upd.attrs["lr"], weight_decay=upd.attrs["weight_decay"])))
        else:
            keep_p.append(p)
            keep_g.append(g)
    if not folded:
        return roots
    rest = [r for r in roots if r is not upd]  # (a new update node: the unfused lowering needs the original)
    if keep_p:
        rest.append(make("sgd_update", tuple(keep_p) + tuple(keep_g), dict(upd.attrs)))
    return rest + folded


#: a table's SGD step touches only the rows a gather read (sgd_scatter) when they are at most this share of it
SPARSE_ROWS_SHARE = 0.25


def _sparse_rows(g, p, upd, consumers, roots):
    """Whether param ``p``'s gradient ``g`` is a gather's scatter-add gradient that plain SGD can apply to the
    rows read only: no momentum (a dense buffer) and no weight decay (which moves every row), ``g`` read by
    the update alone, and few indices against the table's rows (else the dense pass is as cheap)."""
    if g.op != "gather_grad" or p.op != "param" or g.shape != p.shape or g in roots or consumers.get(g) != [upd]:
        return False
    if upd.attrs["momentum"] or upd.attrs["weight_decay"]:
        return False
    return g.inputs[1].size <= SPARSE_ROWS_SHARE * p.shape[g.attrs["axis"]]


ADAM_SPLIT_BYTES = 1 << 16  # params at least this large get an Adam update of their own


def split_adam(nodes, roots):
    """Large params get their own Adam update, scheduled right after their gradient, so the gradient
    buffer dies there instead of living until one update at the end of the step.  Returns the new roots.

    A single fused update keeps every gradient live at once (the arena is then close to the naive sum,
    as PyTorch's ``.grad`` tensors are); split, gradients share memory like activations do.  Params
    under ADAM_SPLIT_BYTES stay in the one fused pass (the per-instruction overhead would outweigh a
    few KB).  The step counter is advanced once, by an ``adam_count`` node every update depends on
    (``attrs['after']``); ``order_inplace_writers`` later orders each update after the other readers of
    its params.  The arithmetic per element is the fused pass's, unchanged."""
    upd = next((t for t in roots if t.op == "adam_update"), None)
    if upd is None:
        return roots
    from .ops import make
    n = len(upd.inputs) // 2
    big = [(p, g) for p, g in zip(upd.inputs[:n], upd.inputs[n:])
           if p.op == "param" and p.size * np.dtype(p.dtype).itemsize >= ADAM_SPLIT_BYTES and g not in roots]
    if not big:
        return roots
    graph = upd.graph
    count = graph._add(Tensor(graph, "adam_count", (), {"dtype": upd.dtype}, (), upd.dtype, None))
    split = []
    for p, g in reversed(big):  # backward order: the last layer's gradient is ready first
        split.append(make("adam_update", (p, g), dict(upd.attrs, counted=True, after=(count,))))
    rest = [(p, g) for p, g in zip(upd.inputs[:n], upd.inputs[n:]) if all(p is not q for q, _ in big)]
    fused = []
    if rest:
        # A new node, never an edit of ``upd``: the unfused (check_finite) lowering still needs the original.
        fused.append(make("adam_update", tuple(p for p, _ in rest) + tuple(g for _, g in rest),
                          dict(upd.attrs, counted=True, after=(count,))))
    return [r for r in roots if r is not upd] + fused + [count] + split


# in-place writers of graph tensors: op -> input slots it overwrites (a function of the node)
def inplace_targets(t):
    """Input slots of ``t`` whose storage ``t`` overwrites in place (params), or () for other ops."""
    if t.op in ("sgd_gemm", "sgd_scatter", "conv_sgd"):
        return (2,)
    if t.op in ("sgd_update", "adam_update"):
        return tuple(range(len(t.inputs) // 2))
    return ()


def _view_base(t):
    while t.op == "reshape":
        t = t.inputs[0]
    return t


def order_inplace_writers(roots):
    """The general rule for in-place updates: a node that overwrites a tensor (a param, by an SGD/Adam
    update or an SGD-folded GEMM) runs only after every other node that reads the old value, readers the
    passes created included (other folded GEMMs, epilogue nodes, fused copies).  Run on the final graph,
    right before fusion and scheduling.  Returns ``(nodes in topological order, {node: its new version},
    {writer: the nodes it runs after})``; ``schedule`` takes the last.

    Every writer W runs after the computing nodes (views resolved) that read a tensor W overwrites.  The
    constraints are returned, not stored in the writers' attrs: writers are shared by the entries lowered
    from one joint graph, and nodes are never edited.  A writer that itself reads a tensor written by
    another writer W' (``A@B`` with both params folded: each GEMM reads the other's param) is ordered
    before W' unless that closes a cycle among writers; then, and whenever a writer reads a tensor it overwrites itself in another slot
    (the kernels write while they read), the operand is replaced by a copy (``identity``) taken before
    any write.  The copy costs what the gradient buffer of an unfolded GEMM would have; the writer reading
    it is a new node (path copying, as every node downstream of it).
    """
    from .ops import make
    nodes = topo_from_roots(roots)
    writers = [t for t in nodes if inplace_targets(t)]
    if not writers:
        return nodes, {}, {}
    written = {}  # base tensor -> writer
    for w in writers:
        for k in inplace_targets(w):
            written[_view_base(w.inputs[k])] = w
    succ = {w: set() for w in writers}  # w -> writers that must run after w

    def reaches(a, b):
        stack, seen = [a], set()
        while stack:
            u = stack.pop()
            if u is b:
                return True
            if u not in seen:
                seen.add(u)
                stack.extend(succ[u])
        return False

    copies, new_ins = {}, {}
    for w in writers:
        own = set(inplace_targets(w))
        ins = list(w.inputs)
        for k, x in enumerate(ins):
            if k in own:
                continue
            other = written.get(_view_base(x))
            if other is None:
                continue
            if other is not w and (other in succ[w] or not reaches(other, w)):
                succ[w].add(other)  # w reads what ``other`` overwrites: w first
                continue
            if x not in copies:
                copies[x] = make("identity", (x,), {})
            ins[k] = copies[x]
        if copies:
            new_ins[w] = tuple(ins)
    m = {}
    if copies:
        for t in nodes:
            ins = tuple([m.get(i, i) for i in new_ins.get(t, t.inputs)])
            if ins != t.inputs:
                m[t] = node_like(t, t.op, ins, t.attrs)
        nodes = topo_from_roots([m.get(r, r) for r in roots])
        writers = [m.get(w, w) for w in writers]
        written = {b: m.get(w, w) for b, w in written.items()}
    readers = {}
    for t in nodes:
        if t.op in LEAVES or t.op == "reshape":
            continue
        for i in t.inputs:
            b = _view_base(i)
            if b in written and written[b] is not t:
                readers.setdefault(written[b], {})[t] = None
    return nodes, m, {w: tuple(readers.get(w, ())) for w in writers}


def fuse_relu_backward(nodes, roots):
    """dZ = matmul(...) * step(relu_out), and db = sum(dZ, axis=0): the mask and the bias-gradient
    reduction become the epilogue of the GEMM that produces the upstream gradient, applied to each
    panel while it is in cache (the panel owns whole columns, so its column sums need no partials).
    Returns a Rewrite."""
    rw = Rewrite()
    consumers = consumer_map(nodes)
    keep = set(roots)
    for d in nodes:
        if d.op != "mul" or d.ndim != 2 or d in keep:
            continue
        m, st = d.inputs
        if st.op == "matmul":
            m, st = st, m
        if (m.op != "matmul" or st.op != "step" or m.ndim != 2 or m.shape != d.shape or m in keep
                or st.inputs[0].shape != d.shape or consumers.get(m) != [d]):
            continue
        mask = st.inputs[0]
        attrs = dict(gemm_flags(m), act="relu_grad")
        _replace_with_colsum(rw, d, "linear", (m.inputs[0], m.inputs[1], mask), attrs, consumers)
    return rw


def _flat_2d(a, b, ta, out_shape):
    """Whether the GEMM op(a) @ b runs as one 2-D GEMM of its result's rows (backend_cpu merges the leading
    dims, M' = batch * M, when b is 2-D and a untransposed): its epilogue then sees C as dense rows, so an
    auxiliary operand of C's shape and column sums over all leading dims work for any rank."""
    return len(out_shape) == 2 or (b.ndim == 2 and not ta and a.shape[:-2] == tuple(out_shape[:-2]))


def _replace_with_colsum(rw, d, op, inputs, attrs, consumers):
    """Replace ``d`` by the GEMM ``op(inputs)``; if something sums ``d`` over all its leading dims (a bias
    gradient), the GEMM computes the column sums too, as its second output, and the sum reads that."""
    flat = _flat_2d(inputs[0], inputs[1], attrs.get("ta"), d.shape)
    sums = [c for c in consumers.get(d, ()) if c.op == "sum" and c.attrs["axes"] == tuple(range(d.ndim - 1))
            and c.attrs["keepdims"] and c.attrs["scale"] == 1.0 and d.ndim >= 2 and flat]
    rw.replace(d, op, inputs, dict(attrs, colsum=True) if sums else attrs)
    if sums:
        rw.replace(sums[0], "output", (d,), {"index": 1})
        for other in sums[1:]:  # CSE may have missed duplicates: read the same output
            rw.replace(other, "identity", (sums[0],), {})


def fuse_xent(nodes):
    """softmax_xent(z, y) and xent_grad(z, y, g) with a constant g: one kernel computes both (the loss
    as the gradient kernel's second output), one pass over the logits instead of two.  Returns a Rewrite."""
    rw = Rewrite()
    grads = {(t.inputs[0], t.inputs[1]): t for t in nodes
             if t.op == "xent_grad" and t.inputs[2].op == "const" and not t.attrs.get("with_loss")}
    for t in nodes:
        if t.op == "softmax_xent" and (t.inputs[0], t.inputs[1]) in grads:
            g = grads.pop((t.inputs[0], t.inputs[1]))
            rw.replace(g, "xent_grad", g.inputs, dict(g.attrs, with_loss=True))
            rw.replace(t, "output", (g,), {"index": 1})
    return rw


def _swaps_last2(x):
    return x.op == "transpose" and x.ndim >= 2 and \
        tuple(x.attrs["perm"]) == tuple(range(x.ndim - 2)) + (x.ndim - 1, x.ndim - 2)


def absorb_transposes(nodes):
    """matmul(transpose_last2(x), y) -> matmul(x, y, ta=True): BLAS transposes for free; and
    transpose_last2(matmul(a, b)) -> matmul(b, a) with both flags flipped ((AB)^T = B^T A^T), when the
    product is read by the transpose only (the gradient of a param used transposed, as every exported
    Linear weight: it is computed in the param's own layout, never transposed afterwards).  Returns a
    Rewrite."""
    rw = Rewrite()
    consumers = consumer_map(nodes)
    absorbed = {}  # matmul -> (inputs, attrs) with its operand transposes absorbed
    for t in nodes:
        if t.op != "matmul":
            continue
        attrs = dict(t.attrs)
        ins = list(t.inputs)
        for k, flag in ((0, "ta"), (1, "tb")):
            x = ins[k]
            if _swaps_last2(x):
                ins[k] = x.inputs[0]
                attrs[flag] = not attrs.get(flag, False)
        absorbed[t] = (ins, attrs)
        if tuple(ins) != t.inputs:
            rw.replace(t, "matmul", ins, attrs)
    for t in nodes:
        m = t.inputs[0] if t.inputs else None
        if _swaps_last2(t) and m in absorbed and consumers.get(m) == [t]:
            (a, b), at = absorbed[m]
            rw.replace(t, "matmul", (b, a), dict(at, ta=not at.get("tb", False), tb=not at.get("ta", False)))
    return rw


# ---------------------------------------------------------------------------------------------------
# fusion

MAX_GROUP_NODES = 40
MAX_GROUP_INPUTS = 24


class Group:
    """A fused elementwise(+reduction) kernel over iteration shape ``shape``; ``members`` in source order."""

    __slots__ = ("id", "shape", "members")

    def __init__(self, gid, shape):
        self.id, self.shape, self.members = gid, shape, []


def is_fusible(t):
    d = REGISTRY.get(t.op)
    return d is not None and d.kind in ("ew", "reduce") and t.dtype in FLOAT_DTYPES


def fuse(nodes):
    """Greedy fusion of elementwise chains and their reductions.

    A node joins the group of an input when the group iterates over the node's own shape (for a
    reduction: its input's shape), the input is an elementwise member (a group's reduction results are
    only ready after the whole group ran) and no other input of the node depends on the group through
    anything outside it (which would make a cycle).  Returns {node: Group} for fused nodes.
    """
    group_of: dict[Tensor, Group] = {}
    unit: dict[Tensor, object] = {}          # node -> its Group or itself (unfused ops, views)
    direct: dict[object, set] = {}           # unit -> units it reads directly
    rdirect: dict[object, set] = {}          # unit -> units reading it directly
    # level: longer than any path below the unit (level[u] > level[d] for every d in direct[u]), kept
    # exact enough by propagation on every new edge; a path from u down to target only visits units
    # above target's level, so reachability searches stay local instead of walking the whole graph
    level: dict[object, int] = {}
    slots: dict[Group, int] = {}             # group -> input slots of its members (a bound on its inputs)
    groups: list[Group] = []

    def reaches(start, target):
        floor = level[target]
        stack, seen = [start], set()
        while stack:
            u = stack.pop()
            if u is target:
                return True
            if u in seen or level[u] <= floor:
                continue
            seen.add(u)
            stack.extend(direct.get(u, ()))
        return False

    def add_edges(u, deps):
        """u now reads every unit of ``deps``: record the edges and lift levels above them."""
        deps = deps - {u}
        direct[u] |= deps
        for d in deps:
            rdirect[d].add(u)
        need = 1 + max((level[d] for d in deps), default=-1)
        if need > level[u]:
            level[u] = need
            work = [u]
            while work:  # readers must stay above what they read
                x = work.pop()
                for r in rdirect[x]:
                    if level[r] <= level[x]:
                        level[r] = level[x] + 1
                        work.append(r)

    def new_unit(u, deps):
        direct[u], rdirect[u], level[u] = set(), set(), 0
        add_edges(u, deps)

    pos = {t: k for k, t in enumerate(nodes)}

    def can_join(g, t):
        if len(g.members) >= MAX_GROUP_NODES:
            return False
        # the input slots of all members bound the group's inputs: count them only when that bound is over
        if slots[g] + len(t.inputs) > MAX_GROUP_INPUTS and _group_inputs_after(g, t, group_of) > MAX_GROUP_INPUTS:
            return False
        for j in t.inputs:
            if j not in unit or (group_of.get(j) is g and j.op != "sum"):
                continue  # a leaf, or an elementwise member of g (read from its register)
            if reaches(unit[j], g):
                return False
        return True

    def merge(g, h):
        """Fold group h into g (they are independent: neither reaches the other)."""
        g.members = sorted(g.members + h.members, key=pos.__getitem__)
        for m in h.members:
            group_of[m] = g
            unit[m] = g
        slots[g] += slots.pop(h)
        hd, hr = direct.pop(h), rdirect.pop(h)
        level.pop(h)
        for d in hd:
            rdirect[d].discard(h)
        for r in hr:
            direct[r].discard(h)
            if r is not g:
                add_edges(r, {g})
        add_edges(g, hd - {g})
        h.members = []

    for t in nodes:
        if t.op in LEAVES:
            continue
        if is_fusible(t):
            it_shape = t.inputs[0].shape if t.op == "sum" else t.shape
            cands = []
            for i in t.inputs:
                g = group_of.get(i)
                if g is not None and i.op != "sum" and g.shape == it_shape and g not in cands:
                    cands.append(g)
            target = None
            for g in cands:
                if can_join(g, t):
                    target = g
                    break
            if target is not None:
                # independent chains that meet at t (e.g. sigmoid(x*a+b) / (1 + relu(x-c))) become one
                # kernel: each reads x once instead of materialising its result for the other
                for h in cands:
                    if h is target or not h.members:
                        continue
                    if (len(target.members) + len(h.members) < MAX_GROUP_NODES
                            and not reaches(h, target) and not reaches(target, h)):
                        merge(target, h)
                        if not can_join(target, t):  # limits: undo is not needed, just stop merging
                            break
                if not can_join(target, t):
                    target = None
            if target is None:
                target = Group(len(groups), it_shape)
                groups.append(target)
                new_unit(target, set())
                slots[target] = 0
            target.members.append(t)
            slots[target] += len(t.inputs)
            group_of[t] = target
            unit[t] = target
            add_edges(target, {unit[j] for j in t.inputs if j in unit and unit[j] is not target})
        else:
            unit[t] = t
            new_unit(t, {unit[j] for j in t.inputs if j in unit})

    # sibling fusion: groups over the same iteration shape that read the same full-size tensor from
    # memory (relu(x) and sum(x), or a gradient read by two consumers) become one kernel reading it once
    readers: dict[Tensor, list] = {}
    for g in groups:
        members = set(g.members)
        for i in {i for m in g.members for i in m.inputs if i not in members}:
            if i.size == math.prod(g.shape) and i.size > 1:
                readers.setdefault(i, []).append(g)
    for i, gs in readers.items():
        gs = list(dict.fromkeys(group_of[g.members[0]] for g in gs if g.members))  # current groups, once
        base = gs[0] if gs else None
        for h in gs[1:]:
            if h is base or h.shape != base.shape or len(base.members) + len(h.members) > MAX_GROUP_NODES:
                continue
            if reaches(h, base) or reaches(base, h):
                # dependent (e.g. one tensor read all along a chain): later readers sit near h, so try
                # them against h; against the first one each search would walk the whole chain
                base = h
                continue
            if _group_inputs_after(base, None, group_of, extra=h.members) > MAX_GROUP_INPUTS:
                continue
            merge(base, h)
    return group_of


def _group_inputs_after(g, t, group_of, extra=()):
    members = set(g.members) | ({t} if t is not None else set()) | set(extra)
    ext = {i for m in members for i in m.inputs
           if i not in members and not _is_scalar_const(i)}
    return len(ext)


def is_placed(t):
    """Whether ``t`` is an ``assemble`` its parts' instructions write in place (ops_attention): no
    instruction of its own."""
    return t.op == "assemble" and bool(t.attrs.get("in_place"))


def schedule(nodes, group_of, inplace_after=None, priority=None):
    """Instruction list: ("ew", Group) for fused groups, ("op", node) for other computing nodes.

    inplace_after: {writer: nodes it must run after} (``order_inplace_writers``), besides every node's
    inputs and ``attrs['after']``.  priority: node -> int, the first tie-breaker among ready units (lower
    first; a unit takes its members' lowest): gradient accumulation runs micro-batch k's forward and
    backward before micro-batch k + 1's (accumulate.py), so their activations share memory.

    Views (reshape) and leaves make no instruction.  Kahn's algorithm over the instruction DAG, ties
    broken by source order, so the schedule follows the program as written where it can."""
    pos = {t: k for k, t in enumerate(nodes)}
    units, unit_of = [], {}
    for t in nodes:
        if t.op in LEAVES:
            continue
        if t in group_of:
            g = group_of[t]
            if g not in unit_of:
                unit_of[g] = len(units)
                units.append(("ew", g))
            unit_of[t] = unit_of[g]
        elif t.op in ("reshape", "output") or is_placed(t):
            continue  # a view, an output its node's instruction writes, or parts written in place
        else:
            unit_of[t] = len(units)
            units.append(("op", t))

    def producer_units(t, acc):
        # reshape is a view, output k of a node is written by the node's instruction: depend on that
        while t.op in ("reshape", "output"):
            t = t.inputs[0]
        if is_placed(t):  # written by its parts' instructions
            for i in t.inputs:
                producer_units(i, acc)
        elif t in unit_of:
            acc.add(unit_of[t])

    inplace_after = inplace_after or {}
    preds = [set() for _ in units]
    for k, (kind, x) in enumerate(units):
        members = x.members if kind == "ew" else [x]
        for m in members:
            for i in m.inputs + tuple(m.attrs.get("after", ())) + inplace_after.get(m, ()):
                producer_units(i, preds[k])
        preds[k].discard(k)
    succs = [[] for _ in units]
    for k, ps in enumerate(preds):
        for p in ps:
            succs[p].append(k)
    import heapq
    if priority is None:
        key = [min(pos[m] for m in (x.members if kind == "ew" else [x])) for kind, x in units]
    else:
        key = [min((priority(m), pos[m]) for m in (x.members if kind == "ew" else [x])) for kind, x in units]
    indeg = [len(p) for p in preds]
    ready = [(key[k], k) for k in range(len(units)) if indeg[k] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, k = heapq.heappop(ready)
        order.append(units[k])
        for s in succs[k]:
            indeg[s] -= 1
            if indeg[s] == 0:
                heapq.heappush(ready, (key[s], s))
    if len(order) != len(units):
        raise AssertionError("fusion produced a cyclic schedule (compiler bug)")
    return order
