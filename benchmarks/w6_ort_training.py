"""W6 trained by ONNX Runtime Training (the on-device training API) from the reference W6.onnx.

Runs in the ORT Training venv (benchmarks/README.md: ``LIBML_BENCH_ORTT_PYTHON``), like w7_ort_training.py.
What stands between the file and a PyTorch-equal training step, and how it is handled here:

1. W6.onnx has 19 outputs: the logits and the 18 updated BatchNorm running statistics.  The loss reads
   only ``logits`` (``loss_input_names``); the statistics stay outputs of the training model
   (``additional_output_names``) and the running statistics are checkpoint parameters without gradient
   (``frozen_params``), so each step writes the updated ones back, as PyTorch's BatchNorm does.
2. ORT Training's optimizers are AdamW and plain SGD (``SGDOptimizerV2``: no momentum), and the C++
   ``Optimizer`` knows these two only ("Not implemented for optimizer algo").  W6 trains with
   ``torch.optim.SGD(lr=0.01, momentum=0.9)``, so the training model computes loss and gradients (ORT) and the momentum update runs
   in NumPy on the checkpoint's parameters (``buf = 0.9 * buf + g`` with ``buf = g`` at the first step,
   ``p -= lr * buf``: PyTorch's rule); that update and its copies are inside the timed step.
3. The eval model ``generate_artifacts`` writes is not loadable (ORT 1.19.2: "This number of op outputs
   should be 1 when Training_mode = False" for W6's 3-output BatchNormalization), so the Module is built
   without one; the benchmark never evaluates.
"""
import os

LR, MOMENTUM = 0.01, 0.9


def running_stats(meta):
    """The BatchNorm running statistics of W6_meta.json that are W6.onnx initializers (not the counters)."""
    return [b for b in meta["buffers"] if not b.endswith("num_batches_tracked")]


def generate(onnx_path, meta, out_dir):
    """Training artifacts + checkpoint of W6 in ``out_dir``: softmax cross-entropy (mean) on ``logits``,
    gradients for W6_meta.json's 29 params, the running statistics frozen in the checkpoint."""
    import onnx
    from onnxruntime.training import artifacts

    os.makedirs(out_dir, exist_ok=True)  # generate_artifacts does not create it
    artifacts.generate_artifacts(onnx.load(onnx_path), requires_grad=list(meta["params"]),
                                 frozen_params=running_stats(meta), loss=artifacts.LossType.CrossEntropyLoss,
                                 loss_input_names=["logits"], additional_output_names=list(meta["extra_outputs"]),
                                 artifact_directory=out_dir)


def make_step(art_dir, meta, x, labels, threads):
    """``step() -> loss`` (float): forward + backward in ORT (``threads`` intra-op threads, sequential),
    then SGD with momentum on every parameter and the running statistics written back."""
    import numpy as np
    import onnxruntime as ort
    from onnxruntime.training.api import CheckpointState, Module

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    state = CheckpointState.load_checkpoint(os.path.join(art_dir, "checkpoint"))
    module = Module(os.path.join(art_dir, "training_model.onnx"), state, None, device="cpu", session_options=so)
    module.train()
    outs = module.output_names()
    stats = [name[: -len(".updated")] for name in meta["extra_outputs"]]
    if len(outs) != 1 + len(stats):
        raise RuntimeError(f"W6 (ort_training): training model outputs {outs}, expected the loss and "
                           f"{len(stats)} running statistics")
    params = [state.parameters[n] for n in meta["params"]]
    stat_params = [state.parameters[n] for n in stats]
    bufs = [None] * len(params)
    x, labels = np.ascontiguousarray(x, np.float32), np.ascontiguousarray(labels, np.int64)

    def step():
        res = module(x, labels)
        for i, p in enumerate(params):
            g = p.grad
            if bufs[i] is None:
                bufs[i] = np.array(g, copy=True)  # never a view of ORT's gradient buffer
            else:
                bufs[i] *= MOMENTUM
                bufs[i] += g
            w = p.data
            w -= LR * bufs[i]
            p.data = w
        module.lazy_reset_grad()  # the next backward overwrites instead of accumulating
        for p, v in zip(stat_params, res[1:]):
            p.data = v
        return float(res[0])
    return step
