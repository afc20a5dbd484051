"""lc.maximum / lc.minimum on integer tensors run in the integer kernel (int_elementwise) and match NumPy
over each type's whole range, with broadcasting and scalars; the official ONNX Max/Min integer cases run
through the conformance suite (they were skipped before)."""
import numpy as np
import pytest

import libml_compile as lc


@pytest.mark.parametrize("dt", ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"])
def test_integer_maximum_and_minimum_match_numpy_over_the_whole_range(dt):
    g = lc.Graph("m")
    a, b = g.input("a", (3, 4), dt), g.input("b", (4,), dt)
    g.output("mx", lc.maximum(a, b))
    g.output("mn", lc.minimum(a, b))
    g.output("c", lc.minimum(lc.maximum(a, 3), 100))
    prog = lc.compile(g)
    assert {r["op"] for r in prog.instructions("run")} == {"maximum", "minimum"}
    info = np.iinfo(dt)
    rng = np.random.default_rng(0)
    av = rng.integers(info.min, info.max, (3, 4), dtype=dt, endpoint=True)
    bv = rng.integers(info.min, info.max, (4,), dtype=dt, endpoint=True)
    av[0, :2] = [info.min, info.max]
    bv[:2] = [info.max, info.min]
    out = prog.run({"a": av, "b": bv})
    for k, want in (("mx", np.maximum(av, bv)), ("mn", np.minimum(av, bv)), ("c", np.clip(av, 3, 100))):
        assert out[k].dtype == np.dtype(dt)
        np.testing.assert_array_equal(out[k], want, err_msg=k)


def test_integer_maximum_refuses_mixed_dtypes_naming_the_op():
    g = lc.Graph("m")
    with pytest.raises(TypeError, match="maximum"):
        lc.maximum(g.input("a", (2,), "int32"), g.input("b", (2,), "int64"))
