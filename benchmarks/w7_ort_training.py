"""W7 trained by ONNX Runtime Training (the on-device training API) from the reference W7.onnx.

``onnxruntime-training`` ships the same ``onnxruntime`` module as ``onnxruntime``, so it lives in a venv
of its own (benchmarks/README.md: ``LIBML_BENCH_ORTT_PYTHON``); this module runs there and needs only
NumPy, onnx and onnxruntime-training (whose ``onnxruntime.training`` imports torch).

Two things stand between the file and ORT's artifact generator, and both are handled here, not hidden:

1. ORT's LayerNormalization gradient reads the forward's saved mean and inverse std, i.e. the node's
   optional outputs 1 and 2; W7.onnx's LayerNormalization nodes name only output 0, and
   ``generate_artifacts`` then fails inside the gradient builder (``gradient_builder_base.h:123 ...
   i < node_->OutputDefs().size() was false``).  ``with_layer_norm_stats`` returns a copy of the model
   whose LayerNormalization nodes name those two outputs: the same computation (the outputs exist in
   the operator whether named or not), every initializer untouched.
2. ``onnxblock.optim.AdamW`` defaults to eps 1e-6, weight decay 0 and ``adam_mode=1`` (Hugging Face
   AdamW: decay after the update, eps added to the un-corrected sqrt(v)).  W7 uses
   ``torch.optim.AdamW(lr=1e-3, weight_decay=0.01)``: eps 1e-8, decay 0.01, and the contrib op's
   ``adam_mode=0`` ("aligned with Torch AdamW"), which ``set_torch_adamw_mode`` writes into the generated
   optimizer graph (the block has no argument for it).  With both, the first two losses equal eager
   PyTorch's (W7_ref.npz loss0, loss1).
"""
import os

LR, WEIGHT_DECAY, ADAM_EPS = 1e-3, 0.01, 1e-8


def with_layer_norm_stats(model):
    """A copy of ``model`` whose LayerNormalization nodes also name their Mean and InvStdDev outputs
    (``<Y>__mean``, ``<Y>__invstd``); new nodes are built, ``model`` is not changed."""
    import onnx
    from onnx import helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    for n in out.graph.node:
        if n.op_type == "LayerNormalization" and len(n.output) == 1:
            y = n.output[0]
            new = helper.make_node("LayerNormalization", list(n.input), [y, y + "__mean", y + "__invstd"],
                                   name=n.name, domain=n.domain or None)
            new.attribute.extend(n.attribute)
            nodes.append(new)
        else:
            nodes.append(n)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def set_torch_adamw_mode(optimizer_path):
    """Rewrite the AdamWOptimizer node of a generated optimizer model to adam_mode=0 (PyTorch AdamW:
    decay before the update, eps added to sqrt(v / (1 - beta2^t))).  Raises if there is no such node."""
    import onnx
    from onnx import helper

    m = onnx.load(optimizer_path)
    nodes, found = [], 0
    for n in m.graph.node:
        if n.op_type == "AdamWOptimizer":
            attrs = [a for a in n.attribute if a.name != "adam_mode"]
            n2 = helper.make_node(n.op_type, list(n.input), list(n.output), name=n.name, domain=n.domain)
            n2.attribute.extend(attrs)
            n2.attribute.append(helper.make_attribute("adam_mode", 0))
            nodes.append(n2)
            found += 1
        else:
            nodes.append(n)
    if found != 1:
        raise RuntimeError(f"W7 (ort_training): expected one AdamWOptimizer node in {optimizer_path}, "
                           f"found {found}")
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.save(m, optimizer_path)


def generate(onnx_path, param_names, out_dir):
    """Training, eval and optimizer artifacts + checkpoint of W7 in ``out_dir``: softmax cross-entropy
    (mean) on the logits, PyTorch-mode AdamW on every parameter."""
    import onnx
    from onnxruntime.training import artifacts, onnxblock

    model = with_layer_norm_stats(onnx.load(onnx_path))
    os.makedirs(out_dir, exist_ok=True)  # generate_artifacts does not create it
    artifacts.generate_artifacts(model, requires_grad=list(param_names),
                                 loss=artifacts.LossType.CrossEntropyLoss,
                                 optimizer=onnxblock.optim.AdamW(eps=ADAM_EPS, weight_decay=WEIGHT_DECAY),
                                 artifact_directory=out_dir)
    set_torch_adamw_mode(os.path.join(out_dir, "optimizer_model.onnx"))


def make_step(art_dir, tokens, labels, threads):
    """``step() -> loss`` (float) running forward + backward + AdamW once on the artifacts in
    ``art_dir`` with ``threads`` intra-op threads, sequential execution."""
    import numpy as np
    import onnxruntime as ort
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    state = CheckpointState.load_checkpoint(os.path.join(art_dir, "checkpoint"))
    module = Module(os.path.join(art_dir, "training_model.onnx"), state,
                    os.path.join(art_dir, "eval_model.onnx"), device="cpu", session_options=so)
    opt = Optimizer(os.path.join(art_dir, "optimizer_model.onnx"), module)
    opt.set_learning_rate(LR)
    module.train()
    tokens, labels = np.ascontiguousarray(tokens, np.int64), np.ascontiguousarray(labels, np.int64)

    def step():
        loss = module(tokens, labels)
        opt.step()
        module.lazy_reset_grad()  # the next call's backward overwrites instead of accumulating
        return float(loss)
    return step
