"""``libml-compile finetune`` (issue 10, items 14, 22 and 8's finetune part): fixed-batch models exported by
torch.onnx.export train; NaN data or a diverging lr fail with exit 2 and leave the previous output alone;
external data is read from the model's own folder whatever the working directory."""
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

from libml_compile.cli import main  # noqa: E402

N, D, H, K, FIXED = 96, 16, 24, 4, 32


def _torch_mlp_onnx(path, dynamo):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.ReLU(), torch.nn.Linear(H, K))
    x = torch.randn(FIXED, D)
    try:
        torch.onnx.export(net, (x,), str(path), dynamo=dynamo, **({} if dynamo else {"opset_version": 17}))
    except Exception as e:  # noqa: BLE001 - the dynamo exporter needs extra packages
        if dynamo:
            pytest.skip(f"torch.onnx.export(dynamo=True) does not work here: {type(e).__name__}: {e}"[:300])
        raise
    m = onnx.load(str(path))
    d0 = m.graph.input[0].type.tensor_type.shape.dim[0]
    assert d0.dim_value == FIXED, "the exporter must write a fixed batch for this test"
    return path


def _data(path, nan=False, n=N):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, D)).astype(np.float32)
    y = rng.integers(0, K, n).astype(np.int64)
    if nan:
        x[5, 3] = np.nan
    np.savez(path, x_train=x, y_train=y, x_val=x[:40], y_val=y[:40])
    return str(path)


@pytest.mark.parametrize("dynamo", [False, True])
@pytest.mark.parametrize("batch_arg", [["--batch-size", str(FIXED)], []])
def test_finetune_trains_a_fixed_batch_torch_export(tmp_path, capsys, dynamo, batch_arg):
    model = _torch_mlp_onnx(tmp_path / "mlp.onnx", dynamo)
    out = tmp_path / "out.onnx"
    rc = main(["finetune", str(model), "--data", _data(tmp_path / "d.npz"), "--epochs", "2", "--lr", "0.05",
               "--no-progress", "--out", str(out)] + batch_arg)
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert f"fixed batch of {FIXED}" in cap.out
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: np.ones((FIXED, D), np.float32)})[0]
    assert y.shape == (FIXED, K) and np.all(np.isfinite(y))


def test_finetune_refuses_another_batch_size_for_a_fixed_batch_model(tmp_path, capsys):
    model = _torch_mlp_onnx(tmp_path / "mlp.onnx", False)
    rc = main(["finetune", str(model), "--data", _data(tmp_path / "d.npz"), "--batch-size", "16",
               "--no-progress", "--out", str(tmp_path / "o.onnx")])
    assert rc == 2 and "fixed batch of 32" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["nan_data", "diverging_lr"])
def test_finetune_fails_and_keeps_the_previous_output_on_non_finite_training(tmp_path, capsys, case):
    model = _torch_mlp_onnx(tmp_path / "mlp.onnx", False)
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous model")
    lr = "1e30" if case == "diverging_lr" else "0.01"
    rc = main(["finetune", str(model), "--data", _data(tmp_path / "d.npz", nan=case == "nan_data"),
               "--epochs", "3", "--lr", lr, "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert ("NaN/Inf" in err and "x_train" in err) if case == "nan_data" else ("diverged" in err or "non-finite" in err)
    assert out.read_bytes() == b"previous model"


def test_finetune_reads_external_data_from_the_models_folder_not_the_cwd(tmp_path, capsys, monkeypatch):
    src = _torch_mlp_onnx(tmp_path / "mlp.onnx", False)
    folder = tmp_path / "model"
    folder.mkdir()
    m = onnx.load(str(src))
    onnx.save_model(m, str(folder / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rc = main(["finetune", str(folder / "ext.onnx"), "--data", _data(tmp_path / "d.npz"), "--epochs", "1",
               "--no-progress", "--out", str(tmp_path / "o.onnx")])
    assert rc == 0, capsys.readouterr().err


def _dynamic_mlp_onnx(path):
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.ReLU(), torch.nn.Linear(H, K))
    torch.onnx.export(net, (torch.randn(4, D),), str(path), dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    return str(path)


def test_finetune_accumulate_trains_as_the_whole_batch_step(tmp_path):
    """--accumulate 2: each 32-row step as two micro-batches of 16 and one update -- the same training as
    the whole batch, to float summation order."""
    from libml_compile.cli import finetune_arrays
    model = _dynamic_mlp_onnx(tmp_path / "mlp.onnx")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((N, D)).astype(np.float32)
    y = rng.integers(0, K, N).astype(np.int64)
    runs = [finetune_arrays(model, x, y, epochs=2, lr=0.05, batch_size=32, accumulate=m, progress=False, log=None)
            for m in (1, 2)]
    (p1, h1), (p2, h2) = runs
    assert p2.executable.plan.meta["accumulate"]["micro_batches"] == 2
    for k in p1.params:
        np.testing.assert_allclose(p2.params[k], p1.params[k], rtol=1e-4, atol=1e-6, err_msg=k)
    np.testing.assert_allclose([r["loss"] for r in h2], [r["loss"] for r in h1], rtol=1e-5)


def test_finetune_accumulate_refuses_a_batch_it_does_not_divide_and_distributed(tmp_path, capsys):
    model = _dynamic_mlp_onnx(tmp_path / "mlp.onnx")
    data = _data(tmp_path / "d.npz")
    rc = main(["finetune", model, "--data", data, "--batch-size", "30", "--accumulate", "4", "--no-progress",
               "--out", str(tmp_path / "o.onnx")])
    assert rc == 2 and "not divisible by --accumulate 4" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()
    from libml_compile.cli import finetune_arrays
    with pytest.raises(ValueError, match="cannot be combined with --distributed"):
        finetune_arrays(model, np.zeros((8, D), np.float32), np.zeros(8, np.int64), accumulate=2, distributed=True,
                        progress=False, log=None)
