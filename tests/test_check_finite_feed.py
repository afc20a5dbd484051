"""check_finite names the feed when a NaN/Inf comes in with the data (issue 10, item 28), not the first op
that reads it."""
import numpy as np
import pytest

import libml_compile as lc
from libml_runtime import NonFiniteError


def test_check_finite_blames_the_feed_that_carried_the_nan_not_the_matmul():
    g = lc.Graph("f")
    x = g.input("x", (4, 3))
    w = g.param("w", np.ones((3, 2), np.float32))
    loss = lc.sum(x @ w)
    prog = lc.compile(g, loss=loss, optimizer=lc.SGD(0.1), check_finite=True)
    xv = np.ones((4, 3), np.float32)
    xv[2, 1] = np.nan
    before = prog.params["w"].copy()
    with pytest.raises(NonFiniteError, match=r"feed 'x' at index \(2, 1\)"):
        prog.step({"x": xv})
    np.testing.assert_array_equal(prog.params["w"], before)
    # a NaN produced inside the graph is still blamed on its op
    g2 = lc.Graph("g")
    a = g2.input("a", (4,))
    g2.output("y", lc.log(a))
    with pytest.raises(NonFiniteError, match=r"op 'log'"):
        lc.compile(g2, check_finite=True).run({"a": np.full(4, -1.0, np.float32)})
