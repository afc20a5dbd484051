"""The ``libml-compile`` command line: info, finetune, demo."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from libml_compile.cli import main  # noqa: E402
from libml_compile.demo import classifier_path, load_digits  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture()
def clf_path():
    return classifier_path()


def test_info(clf_path, capsys):
    assert main(["info", clf_path]) == 0
    out = capsys.readouterr().out
    assert "Gemm x2" in out and "Relu x1" in out and "Flatten x1" in out
    assert "input: float (batch, 64)" in out
    assert "logits: float (batch, 10)" in out
    assert "params:   4 tensors, 4,810 values, 19,240 bytes" in out
    assert "fc1.weight: float32 (64, 64)" in out
    assert "ops lacking gradient rules: none" in out
    assert "unsupported ops: none" in out


def test_info_reports_unsupported_and_gradientless_ops(tmp_path, capsys):
    m = helper.make_model(helper.make_graph(
        [helper.make_node("LpPool", ["x"], ["c"], name="pool", kernel_shape=[3, 3]),
         helper.make_node("Cast", ["c"], ["y"], name="to_int", to=TensorProto.INT64)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [1, 1, 3, 3])]),
        opset_imports=[helper.make_opsetid("", 17)])
    path = str(tmp_path / "pool.onnx")
    onnx.save_model(m, path)
    assert main(["info", path]) == 0
    out = capsys.readouterr().out
    assert "unsupported ops: LpPool" in out
    assert "Cast (to an integer type" in out


def test_info_says_whether_batchnorm_nodes_are_in_training_mode(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    import warnings
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.ReLU())
    x = torch.randn(2, 1, 6, 6)
    for name, kw, want in (("eval", {"dynamo": False, "do_constant_folding": False}, "1 nodes, 0 in training mode"),
                           ("train", {"dynamo": False, "training": torch.onnx.TrainingMode.TRAINING,
                                      "do_constant_folding": False}, "1 nodes, 1 in training mode")):
        path = str(tmp_path / f"{name}.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net.train(name == "train"), (x,), path, opset_version=17, **kw)
        assert main(["info", path]) == 0
        out = capsys.readouterr().out
        assert f"batchnorm: {want}" in out, out
        assert ("TrainingMode.TRAINING" in out) == (name == "eval")


def test_info_bad_file(tmp_path, capsys):
    bad = tmp_path / "garbage.onnx"
    bad.write_text("not onnx at all")
    assert main(["info", str(bad)]) == 2
    assert "garbage.onnx" in capsys.readouterr().err


def test_finetune(tmp_path, clf_path, digits, capsys):
    Xtr, ytr, Xte, yte = digits
    data = str(tmp_path / "d.npz")
    np.savez(data, x_train=Xtr[:320], y_train=ytr[:320], x_val=Xte[:100], y_val=yte[:100])
    out = str(tmp_path / "tuned.onnx")
    rc = main(["finetune", clf_path, "--data", data, "--epochs", "2", "--lr", "0.01", "--optimizer", "adam",
               "--trainable", "fc2.weight", "fc2.bias", "--out", out, "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "epoch 1/2" in text and "epoch 2/2" in text and "val acc" in text and "train acc" in text
    assert os.path.exists(out)
    orig = {t.name: numpy_helper.to_array(t) for t in onnx.load(clf_path).graph.initializer}
    new = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    np.testing.assert_array_equal(orig["fc1.weight"], new["fc1.weight"])   # frozen
    assert not np.array_equal(orig["fc2.weight"], new["fc2.weight"])       # trained
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    assert sess.run(None, {"input": Xte[:7]})[0].shape == (7, 10)


def test_finetune_softmax_model_xy_npz(tmp_path, digits, capsys):
    """A model that ends in Softmax (probabilities): the loss attaches to the pre-softmax tensor."""
    src = onnx.load(classifier_path())
    src.graph.node.append(helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1))
    src.graph.output[0].name = "probs"
    path = str(tmp_path / "probs.onnx")
    onnx.save_model(src, path)
    Xtr, ytr, _, _ = digits
    data = str(tmp_path / "xy.npz")
    np.savez(data, X=Xtr[:300], y=ytr[:300])
    out = str(tmp_path / "probs_tuned.onnx")
    rc = main(["finetune", path, "--data", data, "--epochs", "1", "--lr", "0.05", "--out", out,
               "--batch-size", "20", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "pre-softmax tensor 'logits'" in text
    assert [o.name for o in onnx.load(out).graph.output] == ["probs"]


def test_finetune_errors(tmp_path, clf_path, digits, capsys):
    Xtr, ytr, _, _ = digits
    data = str(tmp_path / "d.npz")
    np.savez(data, x_train=Xtr[:64], y_train=ytr[:64])
    rc = main(["finetune", clf_path, "--data", data, "--epochs", "1", "--lr", "0.1",
               "--trainable", "no_such_param", "--out", str(tmp_path / "o.onnx"), "--no-progress"])
    assert rc == 2 and "no_such_param" in capsys.readouterr().err
    rc = main(["finetune", clf_path, "--data", str(tmp_path / "missing.npz"), "--epochs", "1", "--lr", "0.1",
               "--out", str(tmp_path / "o.onnx")])
    assert rc == 2 and "missing.npz" in capsys.readouterr().err
    np.savez(data, x_train=Xtr[:64, :32], y_train=ytr[:64])   # wrong feature count
    rc = main(["finetune", clf_path, "--data", data, "--epochs", "1", "--lr", "0.1",
               "--out", str(tmp_path / "o.onnx"), "--no-progress"])
    assert rc == 2 and "'input'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o.onnx")


def test_demo(tmp_path, capsys):
    from libml_compile.demo import run_demo
    out = str(tmp_path / "demo.onnx")
    res = run_demo(out=out, progress=False)
    text = capsys.readouterr().out
    assert res["ok"], text
    assert res["test_acc"] >= 0.95, text
    assert res["train_seconds"] < 10.0, text
    assert os.path.exists(out)
    assert "test accuracy" in text
    if res["onnxruntime"] is not None:
        assert res["onnxruntime"]["match"]


def test_demo_command(tmp_path, capsys):
    out = str(tmp_path / "cmd_demo.onnx")
    assert main(["demo", "--out", out, "--no-progress"]) == 0
    assert "demo passed" in capsys.readouterr().out


def test_entry_point_help():
    exe = shutil.which("libml-compile")
    cmd = [exe, "--help"] if exe else [sys.executable, "-m", "libml_compile.cli", "--help"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    assert "finetune" in r.stdout and "info" in r.stdout and "demo" in r.stdout
