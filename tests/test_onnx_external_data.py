"""ONNX external data is read only from inside the model's folder, for every tensor kind; raw_data
length errors name the tensor; opsets below 7 are refused."""
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from libml_compile.onnx_import import ONNXImportError, import_onnx  # noqa: E402

SECRET = np.arange(4, dtype=np.float32) + 100.0


def _external(t, location, offset=0, length=None):
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset))) + ((("length", str(length)),) if length is not None else ()):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def _model(kind, location, opset=17):
    """x (4,) + c, where c is stored externally at ``location`` as an initializer or a Constant."""
    c = numpy_helper.from_array(np.zeros(4, np.float32), "c")
    _external(c, location, 0, 16)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    if kind == "initializer":
        g = helper.make_graph([helper.make_node("Add", ["x", "c"], ["y"])], "g", [x], [y], initializer=[c])
    else:
        g = helper.make_graph([helper.make_node("Constant", [], ["c"], value=c),
                               helper.make_node("Add", ["x", "c"], ["y"])], "g", [x], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


@pytest.fixture
def cwd_secret(tmp_path, monkeypatch):
    """A data file in the working directory (outside the model's folder), as an attacker would plant."""
    work = tmp_path / "cwd"
    work.mkdir()
    (work / "secret.bin").write_bytes(SECRET.tobytes())
    monkeypatch.chdir(work)
    models = tmp_path / "models"
    models.mkdir()
    return models


@pytest.mark.parametrize("kind", ["initializer", "constant"])
def test_in_memory_model_with_external_data_never_reads_the_working_directory(cwd_secret, kind):
    m = _model(kind, "secret.bin")
    for model in (m, m.SerializeToString()):
        with pytest.raises(ONNXImportError, match=r"'c'.*base_dir"):
            import_onnx(model)


@pytest.mark.parametrize("kind", ["initializer", "constant"])
def test_model_file_external_data_resolves_in_its_own_folder_not_the_cwd(cwd_secret, kind):
    path = cwd_secret / "m.onnx"
    path.write_bytes(_model(kind, "secret.bin").SerializeToString())
    with pytest.raises(ONNXImportError, match="secret.bin"):
        import_onnx(str(path))      # the file exists only in the working directory
    good = np.full(4, 7.0, np.float32)
    (cwd_secret / "secret.bin").write_bytes(good.tobytes())
    g = import_onnx(str(path))
    import libml_compile as lc
    out = lc.compile(g).run({"x": np.zeros(4, np.float32)})["y"]
    np.testing.assert_array_equal(out, good)


@pytest.mark.parametrize("loc", ["../cwd/secret.bin", "/etc/passwd", "sub/../../cwd/secret.bin"])
def test_external_locations_escaping_the_folder_are_refused(cwd_secret, loc):
    path = cwd_secret / "m.onnx"
    path.write_bytes(_model("constant", loc).SerializeToString())
    with pytest.raises(ONNXImportError, match=r"'c'.*(relative|outside)"):
        import_onnx(str(path))


def test_symlink_leaving_the_model_folder_is_refused(cwd_secret, tmp_path):
    os.symlink(tmp_path / "cwd" / "secret.bin", cwd_secret / "link.bin")
    path = cwd_secret / "m.onnx"
    path.write_bytes(_model("initializer", "link.bin").SerializeToString())
    with pytest.raises(ONNXImportError, match="outside the model's folder"):
        import_onnx(str(path))


def test_explicit_base_dir_and_offset_length_bounds(cwd_secret):
    (cwd_secret / "w.bin").write_bytes(SECRET.tobytes())
    g = import_onnx(_model("constant", "w.bin"), base_dir=str(cwd_secret))
    import libml_compile as lc
    np.testing.assert_array_equal(lc.compile(g).run({"x": np.zeros(4, np.float32)})["y"], SECRET)
    m = _model("initializer", "w.bin")
    m.graph.initializer[0].external_data[1].value = "8"   # offset 8 + length 16 > 16 bytes
    with pytest.raises(ONNXImportError, match=r"initializer 'c'.*outside"):
        import_onnx(m, base_dir=str(cwd_secret))


def test_external_data_in_subgraph_and_sparse_tensors_is_confined(cwd_secret):
    from libml_compile.onnx_import import load_model
    inner_c = _external(numpy_helper.from_array(np.zeros(4, np.float32), "ic"), "secret.bin", 0, 16)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    sub = helper.make_graph([helper.make_node("Constant", [], ["y"], value=inner_c)], "then", [], [y])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    g = helper.make_graph([helper.make_node("If", ["cond"], ["y"], then_branch=sub, else_branch=sub)],
                          "g", [cond], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ONNXImportError, match=r"'ic'.*subgraph 'then'.*base_dir"):
        load_model(m)
    vals = _external(numpy_helper.from_array(np.zeros(1, np.float32), "sv"), "secret.bin", 0, 4)
    sp = helper.make_sparse_tensor(vals, numpy_helper.from_array(np.array([0], np.int64), "si"), [4])
    m2 = helper.make_model(helper.make_graph([], "g", [], [y], sparse_initializer=[sp]),
                           opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ONNXImportError, match=r"sparse initializer 'sv'.*base_dir"):
        load_model(m2)


def test_raw_data_of_the_wrong_length_names_the_tensor():
    m = _model("initializer", "x")
    c = m.graph.initializer[0]
    c.ClearField("external_data")
    c.data_location = TensorProto.DEFAULT
    c.raw_data = b"\0" * 12
    with pytest.raises(ONNXImportError, match=r"initializer 'c'.*12 bytes.*expected 16"):
        import_onnx(m)


def test_opset_6_is_refused_with_the_supported_range():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 6)])
    m.ir_version = 3
    with pytest.raises(ONNXImportError, match=r"opset 6.*too old.*opsets 7"):
        import_onnx(m)
