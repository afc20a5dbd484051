"""Build ``classifier.onnx``: a small 64 -> 64 -> 10 MLP classifier (Flatten, Gemm + Relu, Gemm) for the
8x8 digits, written with ``onnx.helper`` and randomly initialised (He-uniform, fixed seed).

It stands in for a model exported by another framework: symbolic batch dimension ``"batch"``, float32
initializers named like a PyTorch export (``fc1.weight`` stored (out, in) with ``transB=1``), opset 17 and
IR version 8 so that every ONNX Runtime from 1.14 on loads it.  ``libml-compile demo`` fine-tunes it.

    python models/make_onnx_classifier.py [OUT.onnx]     # default: models/classifier.onnx
"""
import os
import sys

import numpy as np


def build(hidden=64, n_in=64, n_out=10, seed=0, opset=17):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def he(n_out_, n_in_):
        lim = np.sqrt(6.0 / n_in_)
        return rng.uniform(-lim, lim, size=(n_out_, n_in_)).astype(np.float32)

    inits = [
        numpy_helper.from_array(he(hidden, n_in), "fc1.weight"),
        numpy_helper.from_array(np.zeros(hidden, np.float32), "fc1.bias"),
        numpy_helper.from_array(he(n_out, hidden), "fc2.weight"),
        numpy_helper.from_array(np.zeros(n_out, np.float32), "fc2.bias"),
    ]
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc1.weight", "fc1.bias"], ["fc1"], name="fc1", transB=1),
        helper.make_node("Relu", ["fc1"], ["relu1"], name="relu1"),
        helper.make_node("Gemm", ["relu1", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "digits_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_out])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="libml models/make_onnx_classifier.py", producer_version="1")
    model.ir_version = 8
    model.doc_string = "64-64-10 MLP for the 8x8 digits (random init); fine-tuned by `libml-compile demo`"
    helper.set_model_props(model, {"task": "digits classification", "input_scale": "pixel / 16"})
    onnx.checker.check_model(model)
    return model


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    out = argv[0] if argv else os.path.join(os.path.dirname(os.path.abspath(__file__)), "classifier.onnx")
    import onnx
    onnx.save_model(build(), out)
    print(f"wrote {out} ({os.path.getsize(out)} bytes)")


if __name__ == "__main__":
    main()
