"""``libml-compile``: the compiler's command line.

    libml-compile info MODEL.onnx
    libml-compile finetune MODEL.onnx --data DATA.npz --epochs N --lr X [--optimizer sgd|adam]
                           [--trainable NAME ...] [--batch-size B] --out OUT.onnx
    mpiexec -n K libml-compile finetune MODEL.onnx --data DATA.npz ... --distributed   # data-parallel
    libml-compile demo [--out OUT.onnx] [--epochs N]     # trains the bundled classifier from random weights

``finetune`` data files (``.npz``) hold ``x_train``/``y_train`` and optionally ``x_val``/``y_val`` (or
``x_test``/``y_test``); a file with only ``X``/``x`` and ``y`` is split (``--val-fraction``).  Integer labels
train with softmax cross-entropy on the model's output (the pre-softmax tensor when the model ends in
``Softmax``) and report accuracy; float targets train with mean squared error.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from typing import Any, Dict, Optional, Sequence

import numpy as np

__all__ = ["main", "model_info", "format_info", "finetune_arrays", "load_npz_data", "loss_tensor_name"]


# ----------------------------------------------------------------------------------------------------
# info
# ----------------------------------------------------------------------------------------------------

def _vi_shape(vi):
    dims = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append("?")
    return tuple(dims)


def _vi_dtype(vi):
    import onnx
    which = vi.type.WhichOneof("value")
    if which != "tensor_type":
        return which or "?"
    try:
        return onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type).lower()
    except Exception:
        return "?"


def _grad_less_libml_ops() -> Optional[set]:
    try:
        from libml_compile.ops import REGISTRY
    except Exception:
        return None
    return {name for name, d in REGISTRY.items() if getattr(d, "grad", None) is None}


def model_info(model) -> Dict[str, Any]:
    """Facts about an ONNX model (path or ModelProto) as a dict; works for models libml cannot import."""
    import onnx
    from onnx import numpy_helper

    from .onnx_import import SUPPORTED_OPS, _default_opset, load_model, onnx_to_libml

    m, source = load_model(model)
    inits = {t.name: t for t in m.graph.initializer}
    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in m.graph.node)
    from .onnx_import import classify_initializers, folded_initializers, tied_initializers
    roles = classify_initializers(m)
    params, frozen, consts = [], [], []
    for t in m.graph.initializer:
        arr = numpy_helper.to_array(t)
        rec = (t.name, tuple(arr.shape), arr.dtype.name, int(arr.nbytes))
        if not np.issubdtype(arr.dtype, np.floating):
            consts.append(rec)
        elif roles.get(t.name, ("param",))[0] == "param":
            params.append(rec)
        else:
            frozen.append(rec + (roles[t.name][1],))
    unsupported = sorted(op for op in ops if op not in SUPPORTED_OPS)
    no_grad_libml = _grad_less_libml_ops()
    emits = onnx_to_libml()  # ONNX op -> the libml ops its translation emits (registry + handlers)
    lacking = []
    for op in sorted(ops):
        if op in unsupported:
            continue
        lowered = emits.get(op)
        if op == "Cast":
            ints = [n for n in m.graph.node if n.op_type == "Cast"
                    and any(a.name == "to" and a.i not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)
                            for a in n.attribute)]
            if ints:
                lacking.append("Cast (to an integer type: not differentiable)")
                continue
        if lowered and no_grad_libml is not None and any(o in no_grad_libml for o in lowered):
            lacking.append(op)
    return {
        "source": source,
        "ir_version": m.ir_version,
        "opset": _default_opset(m),
        "producer": " ".join(x for x in (m.producer_name, m.producer_version) if x),
        "graph_name": m.graph.name,
        "inputs": [(vi.name, _vi_dtype(vi), _vi_shape(vi)) for vi in m.graph.input if vi.name not in inits],
        "outputs": [(vi.name, _vi_dtype(vi), _vi_shape(vi)) for vi in m.graph.output],
        "ops": dict(sorted(ops.items())),
        "n_nodes": len(m.graph.node),
        "params": params,
        "param_count": int(sum(int(np.prod(p[1], dtype=np.int64)) for p in params)),
        "param_bytes": int(sum(p[3] for p in params)),
        "constants": consts,
        # float initializers import_onnx keeps constant (scales, epsilons, fill values), with the reason
        "frozen": frozen,
        "tied_params": tied_initializers(m, roles),
        "folded_params": folded_initializers(m, roles),
        # BatchNormalization nodes in training mode (batch statistics: training_mode=1 from opset 14, or the
        # running-statistics outputs before it) and in inference mode; the dynamo exporter writes a
        # train-mode module as inference BatchNorm (or folds it into the convolutions: then there is none)
        "batchnorm_training": [n.name or n.output[0] for n in m.graph.node if n.op_type == "BatchNormalization"
                               and (len(n.output) > 1 and any(n.output[1:])
                                    or any(a.name == "training_mode" and a.i for a in n.attribute))],
        "batchnorm_count": sum(1 for n in m.graph.node if n.op_type == "BatchNormalization"),
        "unsupported_ops": unsupported,
        "ops_without_gradient": lacking,
        "gradient_rules_known": no_grad_libml is not None,
        "metadata": {p.key: p.value for p in m.metadata_props},
    }


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def format_info(info: Dict[str, Any]) -> str:
    lines = []
    lines.append(f"model:    {info['source'] or '<ModelProto>'}")
    lines.append(f"graph:    {info['graph_name']!r}, IR version {info['ir_version']}, opset {info['opset']}"
                 + (f", producer {info['producer']}" if info["producer"] else ""))
    lines.append("inputs:")
    for n, dt, s in info["inputs"]:
        lines.append(f"  {n}: {dt} {_fmt_shape(s)}")
    lines.append("outputs:")
    for n, dt, s in info["outputs"]:
        lines.append(f"  {n}: {dt} {_fmt_shape(s)}")
    lines.append(f"ops ({info['n_nodes']} nodes): " + ", ".join(f"{k} x{v}" for k, v in info["ops"].items()))
    lines.append(f"params:   {len(info['params'])} tensors, {info['param_count']:,} values, "
                 f"{info['param_bytes']:,} bytes (float initializers used as weights: trainable)")
    for n, s, dt, b in info["params"]:
        lines.append(f"  {n}: {dt} {_fmt_shape(s)}")
    if info["frozen"]:
        lines.append(f"frozen:   {len(info['frozen'])} float initializers, {sum(f[3] for f in info['frozen']):,} "
                     f"bytes, imported as constants (import_onnx(params=[...]) trains them)")
        for n, s, dt, b, why in info["frozen"]:
            lines.append(f"  {n}: {dt} {_fmt_shape(s)}  ({why})")
    for n, users in info["tied_params"].items():
        lines.append(f"warning: {n!r} feeds {len(users)} weight slots ({', '.join(users[:3])}"
                     f"{', ...' if len(users) > 3 else ''}): training ties them (dynamo's initializer merging)")
    if info["folded_params"]:
        lines.append("warning: params that look like exporter-computed weight copies: "
                     + ", ".join(info["folded_params"][:8]) + ("..." if len(info["folded_params"]) > 8 else "")
                     + " (export with dynamo=True, optimize=False or dynamo=False to keep the weights)")
    if info["batchnorm_count"]:
        tr = len(info["batchnorm_training"])
        lines.append(f"batchnorm: {info['batchnorm_count']} nodes, {tr} in training mode (batch statistics), "
                     f"{info['batchnorm_count'] - tr} in inference mode (running statistics)"
                     + ("; to fine-tune with batch statistics, export with torch.onnx.export(..., dynamo=False, "
                        "training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False)" if tr == 0 else ""))
    if info["constants"]:
        lines.append(f"constants: {len(info['constants'])} integer initializers "
                     f"({sum(c[3] for c in info['constants']):,} bytes)")
    if info["unsupported_ops"]:
        lines.append("unsupported ops: " + ", ".join(info["unsupported_ops"]) + "  (import_onnx will refuse this model)")
    else:
        lines.append("unsupported ops: none")
    if not info["gradient_rules_known"]:
        lines.append("ops lacking gradient rules: unknown (libml_compile.ops not available)")
    elif info["ops_without_gradient"]:
        lines.append("ops lacking gradient rules: " + ", ".join(info["ops_without_gradient"]))
    else:
        lines.append("ops lacking gradient rules: none")
    for k, v in info["metadata"].items():
        lines.append(f"metadata: {k} = {v}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# fine-tuning
# ----------------------------------------------------------------------------------------------------

def load_npz_data(path: str, val_fraction: float = 0.1, seed: int = 0):
    """Return ``(x_train, y_train, x_val, y_val)`` from an ``.npz`` file (see module doc)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    from libml_runtime.fileio import check_regular
    check_regular(path, "data file")  # a FIFO or /dev/zero would hang or fill memory
    try:
        d = np.load(path, allow_pickle=False)
        keys = set(d.files)
    except Exception as e:
        raise ValueError(f"cannot read data file {path!r} as .npz: {e}") from e
    with d:
        def get(*names):
            for n in names:
                if n in keys:
                    return d[n]
            return None
        xtr, ytr = get("x_train", "X_train", "xtr", "Xtr"), get("y_train", "ytr")
        xva, yva = get("x_val", "X_val", "x_test", "X_test", "xte", "Xte"), get("y_val", "y_test", "yte")
        if xtr is None:
            x, y = get("x", "X", "inputs"), get("y", "labels", "targets")
            if x is None or y is None:
                raise ValueError(f"data file {path!r} has arrays {sorted(keys)}; expected x_train/y_train "
                                 f"[x_val/y_val] or X/y")
            n = len(x)
            perm = np.random.default_rng(seed).permutation(n)
            nv = int(round(val_fraction * n))
            xtr, ytr, xva, yva = x[perm[nv:]], y[perm[nv:]], x[perm[:nv]], y[perm[:nv]]
        if ytr is None:
            raise ValueError(f"data file {path!r}: x_train without y_train")
        if len(xtr) != len(ytr):
            raise ValueError(f"data file {path!r}: {len(xtr)} training inputs but {len(ytr)} labels")
        if xva is not None and (yva is None or len(xva) != len(yva)):
            raise ValueError(f"data file {path!r}: validation inputs and labels do not match")
        return xtr, ytr, xva, yva


def loss_tensor_name(model, output: Optional[str] = None):
    """The ONNX tensor a loss should attach to: the output, or the input of a final Softmax.

    Returns ``(tensor_name, output_name, ended_in_softmax)``.
    """
    outs = [vi.name for vi in model.graph.output]
    out = output or outs[0]
    if out not in outs:
        raise ValueError(f"model has no output {out!r} (outputs: {outs})")
    producer = {o: n for n in model.graph.node for o in n.output}
    node = producer.get(out)
    # follow Identity nodes back
    while node is not None and node.op_type == "Identity":
        node = producer.get(node.input[0])
    if node is not None and node.op_type == "Softmax":
        return node.input[0], out, True
    return out, out, False


def _check_finite_data(what, arr):
    """Raise ValueError naming the array when a float data array holds NaN or Inf."""
    if arr is None:
        return
    arr = np.asarray(arr)
    if np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.complexfloating):
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise ValueError(f"data array {what!r} holds {bad} NaN/Inf value(s) (first at index "
                             f"{np.unravel_index(int(np.argmin(np.isfinite(arr).reshape(-1))), arr.shape)}); "
                             f"training on it would give NaN weights")


def _fixed_batch(m, input_name: Optional[str]):
    """The static leading dim of the model's data input, or None when it is symbolic/unknown."""
    inits = {t.name for t in m.graph.initializer}
    ins = [vi for vi in m.graph.input if vi.name not in inits]
    if input_name:
        ins = [vi for vi in ins if vi.name == input_name]
    if len(ins) != 1:
        return None
    dims = ins[0].type.tensor_type.shape.dim
    if len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
        return int(dims[0].dim_value)
    return None


def _loss_tensor(g, oname):
    """(tensor, ended_in_softmax): the tensor of graph ``g`` a loss attaches to: model output ``oname``, or
    the logits under it when it is a softmax over the classes (the library's detection,
    ``ops.softmax_source``, which softmax_cross_entropy's DoubleSoftmaxWarning uses too)."""
    from .ops import softmax_source

    out = g.tensor(oname)
    sm = softmax_source(out)
    return (sm.inputs[0], True) if sm is not None else (out, False)


def _pick_input(g, name: Optional[str]):
    names = list(g.meta["onnx_input_shapes"])
    if name:
        if name not in names:
            raise ValueError(f"model has no input {name!r} (inputs: {names})")
        return name
    if len(names) != 1:
        raise ValueError(f"model has {len(names)} inputs {names}; choose one with --input")
    return names[0]


def finetune_arrays(model, x_train, y_train, x_val=None, y_val=None, *, epochs=10, lr=0.01,
                    optimizer="sgd", momentum=0.9, weight_decay=0.0, batch_size=None, trainable=None,
                    input_name=None, output_name=None, seed=0, num_threads=None, progress=True,
                    log=print, eval_batch=256, base_dir=None, distributed=False, accumulate=1):
    """Fine-tune an ONNX model (path or ModelProto) on arrays with ``prog.step``.

    Returns ``(prog, history)``; ``history`` is a list of per-epoch dicts (loss, train/val metric).
    ``prog.graph.meta["onnx_model"]`` is the original model, so ``lc.export_onnx(prog, path)`` writes the
    fine-tuned model.

    batch_size: None means 32, or the model's batch when its input has a fixed leading dim.  A model with
    a fixed batch (what ``torch.onnx.export`` writes by default) trains and evaluates at that batch (the
    last partial evaluation batch is padded); another ``batch_size`` is refused.
    base_dir: folder of the model's external data (a path model uses its own folder).
    distributed: data-parallel training inside ``mpiexec -n K`` (``lc.compile(distributed="mpi")``):
    ``batch_size`` is the global batch, each rank trains on its ``batch_size / K`` rows of every batch of
    the same shuffled order (a fixed-batch model: that batch per rank, K times it globally), the losses
    are global means, and only rank 0 logs (the caller exports on rank 0 only).
    accumulate: M > 1 accumulates the gradients of M micro-batches per step (``lc.compile(accumulate=M)``,
    the exact single-process counterpart of M ranks): ``batch_size`` is still the batch of one step, run
    as M micro-batches of ``batch_size / M`` rows (a fixed-batch model: its batch is the micro-batch, M
    times it per step).  Not combined with ``distributed``.
    Raises ValueError when the data holds NaN/Inf, or when the loss or a param becomes non-finite (a
    diverging learning rate): nothing is returned, so the caller exports nothing.
    """
    import libml_compile as lc

    from .onnx_import import import_onnx, load_model

    m, _source = load_model(model, base_dir=base_dir)
    x_train = np.asarray(x_train)
    y_train = np.asarray(y_train)
    n = len(x_train)
    if n == 0:
        raise ValueError("no training data")
    for what, arr in (("x_train", x_train), ("y_train", y_train), ("x_val", x_val), ("y_val", y_val)):
        _check_finite_data(what, arr)
    fixed = _fixed_batch(m, input_name)
    if fixed is not None:
        if batch_size is not None and int(batch_size) != fixed:
            raise ValueError(f"the model's input has a fixed batch of {fixed}; --batch-size {batch_size} "
                             f"cannot be used (pass --batch-size {fixed}, or export the model with a dynamic "
                             f"batch axis)")
        if n < fixed:
            raise ValueError(f"the model's input has a fixed batch of {fixed} but there are only {n} "
                             f"training samples")
        if log:
            log(f"model has a fixed batch of {fixed}: training and evaluating at batch {fixed} "
                f"(the last partial evaluation batch is padded)")
        batch_size = eval_batch = fixed
    elif batch_size is None:
        batch_size = 32
    B = min(int(batch_size), n)
    M = int(accumulate)
    if M < 1 or M != accumulate:
        raise ValueError(f"--accumulate {accumulate!r}: micro-batches per step must be a positive integer")
    if M > 1 and distributed:
        raise ValueError(f"--accumulate {M} cannot be combined with --distributed (use the ranks or "
                         f"accumulation, not both)")
    K, rank = (lc.distributed.size(), lc.distributed.rank()) if distributed else (1, 0)
    if K * M > 1 and fixed is not None:
        B = fixed * K * M  # the model's batch is each rank's, or each micro-batch's
        if n < B:
            raise ValueError(f"{K * M} {'ranks' if K > 1 else 'micro-batches'} with the model's fixed batch of "
                             f"{fixed} need {B} training samples, there are {n}")
    elif B % K:
        raise ValueError(f"--batch-size {B} is not divisible by the {K} MPI ranks")
    elif B % M:
        raise ValueError(f"--batch-size {B} is not divisible by --accumulate {M}")
    b = B // (K * M)  # each rank's share of a batch (each micro-batch's, accumulating)
    if rank != 0:
        log, progress = None, False
    classify = np.issubdtype(y_train.dtype, np.integer)
    _, oname, _ = loss_tensor_name(m, output_name)  # validates the output name

    # probe the input name with a throwaway import (symbolic dims bound to the batch size)
    def build(batch):
        probe_names = [vi.name for vi in m.graph.input if vi.name not in {t.name for t in m.graph.initializer}]
        inp = input_name or (probe_names[0] if len(probe_names) == 1 else None)
        if inp is None:
            raise ValueError(f"model has {len(probe_names)} inputs {probe_names}; choose one with --input")
        g = import_onnx(m, shapes={inp: (batch,) + tuple(x_train.shape[1:])})
        return g, _pick_input(g, inp)

    g, inp = build(b)
    in_dtype = g.inputs[inp].dtype
    logits, softmax_end = _loss_tensor(g, oname)
    tname = logits.name
    if softmax_end and log:
        log(f"model output {oname!r} is a Softmax; taking the loss from the pre-softmax tensor {tname!r}")
    if classify:
        if len(logits.shape) != 2 or logits.shape[0] != b:
            raise ValueError(f"tensor {tname!r} has shape {logits.shape}; classification needs (batch, classes)")
        ncls = logits.shape[1]
        lo, hi = int(y_train.min()), int(y_train.max())
        if lo < 0 or hi >= ncls:
            raise ValueError(f"labels range over [{lo}, {hi}] but the model has {ncls} classes")
        label_name = "labels" if "labels" not in g.inputs else "__libml_labels"
        labels = g.input(label_name, (b,), dtype="int64")
        loss = lc.softmax_cross_entropy(logits, labels)
    else:
        label_name = "targets" if "targets" not in g.inputs else "__libml_targets"
        tshape = (b,) + tuple(y_train.shape[1:])
        if tuple(logits.shape) != tshape:
            raise ValueError(f"targets of shape {tshape} do not match tensor {tname!r} of shape {logits.shape}")
        labels = g.input(label_name, tshape, dtype=logits.dtype)
        loss = lc.mse(logits, labels)
    if optimizer == "sgd":
        opt = lc.SGD(lr=lr, momentum=momentum, weight_decay=weight_decay)
    elif optimizer == "adam":
        opt = lc.Adam(lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r} (sgd or adam)")
    if trainable:
        unknown = [t for t in trainable if t not in g.params]
        if unknown:
            raise ValueError(f"--trainable names {unknown} are not params of the model "
                             f"(params: {sorted(g.params)})")
    prog = lc.compile(g, loss=loss, optimizer=opt, trainable=list(trainable) if trainable else None,
                      num_threads=num_threads, distributed="mpi" if distributed else None,
                      accumulate=M if M > 1 else None)

    EB = fixed or max(1, min(int(eval_batch), max(n, len(x_val) if x_val is not None else 0)))
    ge = import_onnx(m, shapes={inp: (EB,) + tuple(x_train.shape[1:])})
    elogits, _ = _loss_tensor(ge, oname)
    ekey = oname if ge.outputs.get(oname) is elogits else "__libml_logits"
    if ekey not in ge.outputs:  # the loss tensor is internal (pre-softmax): expose it for evaluation
        ge.output(ekey, elogits)
    peval = lc.compile(ge, num_threads=num_threads)

    def predict(x):
        peval.set_params(prog.params)
        outs = []
        for i in range(0, len(x), EB):
            chunk = np.ascontiguousarray(x[i:i + EB], dtype=in_dtype)
            k = len(chunk)
            if k < EB:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], EB - k, axis=0)])
            outs.append(peval.run({inp: chunk})[ekey][:k])
        return np.concatenate(outs) if outs else np.zeros((0,))

    def metric(x, y):
        if x is None or len(x) == 0:
            return None
        p = predict(x)
        if classify:
            return float(np.mean(np.argmax(p, axis=1) == y))
        return float(np.mean((p - y) ** 2))

    mname = "acc" if classify else "mse"
    rng = np.random.default_rng(seed)
    steps = n // B
    history = []
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    x_train_c = np.ascontiguousarray(x_train, dtype=in_dtype)
    y_train_c = np.ascontiguousarray(y_train, dtype=np.int64 if classify else labels.dtype)
    for epoch in range(1, epochs + 1):
        perm = rng.permutation(n)
        total = 0.0
        bar = tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False,
                   disable=not progress, dynamic_ncols=True) if tqdm is not None else None
        t0 = time.perf_counter()
        for s in range(steps):
            # (the same order on every rank: same seed; accumulating, the step takes M micro-batches)
            idx = perm[s * B + rank * b * M:s * B + (rank + 1) * b * M]
            lv = prog.step({inp: x_train_c[idx], label_name: y_train_c[idx]})
            if not np.isfinite(lv):
                if bar is not None:
                    bar.close()
                raise ValueError(f"training diverged: the loss is {float(lv)} at epoch {epoch}, step {s + 1} "
                                 f"(lr {lr} with {optimizer}); lower --lr.  Nothing was exported")
            total += float(lv)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total / (s + 1):.4f}", refresh=False)
        if bar is not None:
            bar.close()
        rec = {"epoch": epoch, "loss": total / max(steps, 1), f"train_{mname}": metric(x_train, y_train),
               f"val_{mname}": metric(x_val, y_val), "seconds": time.perf_counter() - t0}
        history.append(rec)
        if log:
            val = rec[f"val_{mname}"]
            log(f"epoch {epoch}/{epochs}: loss {rec['loss']:.4f}  train {mname} {rec[f'train_{mname}']:.4f}"
                + (f"  val {mname} {val:.4f}" if val is not None else ""))
    bad = sorted(k for k, v in prog.params.items() if not np.all(np.isfinite(v)))
    if bad:
        raise ValueError(f"training produced non-finite values in params {bad[:5]}; lower --lr.  "
                         f"Nothing was exported")
    prog._libml_predict = predict  # handy for callers (demo): forward pass with the current params
    return prog, history


# ----------------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------------

def _parser():
    p = argparse.ArgumentParser(prog="libml-compile",
                                description="libml: a static-graph training compiler for the CPU")
    sub = p.add_subparsers(dest="cmd", metavar="{demo,info,finetune}")
    sub.required = True

    d = sub.add_parser("demo", help="train the bundled ONNX digits classifier (random initial weights), "
                                    "export and check it")
    d.add_argument("--out", help="where to write the trained model (default: a temporary directory, removed at the end)")
    d.add_argument("--epochs", type=int, default=None)
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.add_argument("--threads", type=int, default=None)

    i = sub.add_parser("info", help="describe an ONNX model: ops, params, inputs/outputs, gradient support")
    i.add_argument("model")

    f = sub.add_parser("finetune", help="fine-tune an ONNX model on an .npz data set and export it")
    f.add_argument("model")
    f.add_argument("--data", required=True, help=".npz with x_train/y_train[/x_val/y_val] or X/y")
    f.add_argument("--epochs", type=int, default=10)
    f.add_argument("--lr", type=float, default=0.01)
    f.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    f.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    f.add_argument("--weight-decay", type=float, default=0.0)
    f.add_argument("--batch-size", type=int, default=None,
                   help="training batch (default 32, or the model's batch when its input has a fixed one)")
    f.add_argument("--trainable", nargs="+", metavar="NAME", help="params to train (default: all)")
    f.add_argument("--input", dest="input_name", help="model input fed with the data (default: the only one)")
    f.add_argument("--output", dest="output_name", help="model output the loss attaches to (default: first)")
    f.add_argument("--val-fraction", type=float, default=0.1)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--threads", type=int, default=None)
    f.add_argument("--no-progress", action="store_true")
    f.add_argument("--out", required=True, help="output .onnx path")
    f.add_argument("--distributed", action="store_true",
                   help="data-parallel training under mpiexec -n K (needs the dist extra): --batch-size is the "
                        "global batch, split over the ranks; rank 0 logs and exports")
    f.add_argument("--accumulate", type=int, default=1, metavar="M",
                   help="gradient accumulation: each step of --batch-size rows runs as M micro-batches and one "
                        "update (the graph is compiled at batch / M: M times less activation memory)")
    return p


def _rank():
    from .distributed import rank
    return rank()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "info":
            print(format_info(model_info(args.model)))
            return 0
        if args.cmd == "finetune":
            from .onnx_export import export_onnx
            xtr, ytr, xva, yva = load_npz_data(args.data, args.val_fraction, args.seed)
            if not args.distributed or _rank() == 0:
                print(f"data: {len(xtr)} training / {0 if xva is None else len(xva)} validation samples from "
                      f"{args.data}")
            prog, hist = finetune_arrays(
                args.model, xtr, ytr, xva, yva, epochs=args.epochs, lr=args.lr, optimizer=args.optimizer,
                momentum=args.momentum, weight_decay=args.weight_decay, batch_size=args.batch_size,
                trainable=args.trainable, input_name=args.input_name, output_name=args.output_name,
                seed=args.seed, num_threads=args.threads, progress=not args.no_progress,
                base_dir=os.path.dirname(os.path.abspath(args.model)), distributed=args.distributed,
                accumulate=args.accumulate)
            if prog.executable.world[0] == 0:  # (distributed: every rank holds the same params)
                export_onnx(prog, args.out)
                print(f"exported the fine-tuned model to {args.out}")
            return 0
        if args.cmd == "demo":
            from .demo import run_demo
            res = run_demo(out=args.out, epochs=args.epochs, progress=not args.no_progress,
                           num_threads=args.threads)
            return 0 if res["ok"] else 1
    except (ValueError, TypeError, FileNotFoundError, OSError) as e:
        print(f"libml-compile {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
