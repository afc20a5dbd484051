"""The AVX-512 copy's own SGEMM (runtime/libml_runtime/kernels_gemm.h), which runs the small-M GEMM panels
on AVX-512 machines instead of single-threaded OpenBLAS.

Checked against float64 NumPy on every transpose combination, on sizes around its blockings (MR 12,
NR 32, KC 256 balanced, MC 144, NC 1024, the packing and walk switches) and the edges where it declines; BLAS semantics for beta == 0
(C never read: a NaN-filled C gives finite results) and padded leading dimensions; and, through compiled
plans, the same bits for 1 and 2 threads.
"""
import numpy as np
import pytest

import libml_compile as lc
from libml_runtime import _exec
from libml_runtime.isa import dispatched_isa


def _runs_here():
    A, B, C = np.ones((16, 16), np.float32), np.ones((16, 32), np.float32), np.zeros((16, 32), np.float32)
    return _exec.own_sgemm(False, False, 1.0, A, B, 0.0, C)


avx512 = pytest.mark.skipif(not _runs_here(), reason="the own SGEMM is the AVX-512 copy's; others run BLAS")


def test_the_avx512_copy_and_only_it_runs_the_own_kernel():
    isa = dispatched_isa()
    if isa == "native":
        pytest.skip("an LIBML_MARCH build: one copy, for whatever -march it chose")
    assert _runs_here() == (isa == "avx512"), isa


def _operands(rng, m, n, k, ta, tb, pad=0):
    def mat(r, c):
        full = rng.standard_normal((r, c + pad)).astype(np.float32)
        return full[:, :c]  # a padded leading dimension when pad > 0
    A = mat(k, m) if ta else mat(m, k)
    B = mat(n, k) if tb else mat(k, n)
    return A, B


def _ref(A, B, ta, tb):
    a = A.astype(np.float64)
    b = B.astype(np.float64)
    return (a.T if ta else a) @ (b.T if tb else b)


@avx512
@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
@pytest.mark.parametrize("m, n, k", [(12, 32, 16), (13, 33, 17), (64, 512, 784), (145, 70, 257),
                                     (144, 1025, 300), (300, 40, 513),
                                     # leading dimensions >= 1024 (k-row packing of B, and of A stored
                                     # transposed), B blocks above LM_GO_ROWS_WALK (the C-row walk) and
                                     # a last column block of 52 (a partial sliver in the k-row packing)
                                     (1030, 64, 40), (40, 2100, 260)])
def test_own_sgemm_matches_float64(ta, tb, m, n, k):
    rng = np.random.default_rng(m * 7 + n * 3 + k)
    A, B = _operands(rng, m, n, k, ta, tb, pad=3)
    C0 = rng.standard_normal((m, n + 5)).astype(np.float32)[:, :n]
    for alpha, beta in ((1.0, 0.0), (-0.25, 1.0), (2.0, 0.5)):
        C = C0.copy() if beta else np.full_like(C0, np.nan)  # beta 0: C is never read (BLAS)
        assert _exec.own_sgemm(ta, tb, alpha, A, B, beta, C)
        want = alpha * _ref(A, B, ta, tb) + (beta * C0.astype(np.float64) if beta else 0)
        scale = np.abs(_ref(np.abs(A), np.abs(B), ta, tb)).max() * abs(alpha) + np.abs(C0).max()
        np.testing.assert_allclose(C, want, rtol=0, atol=2e-6 * scale * np.sqrt(k / 16))


@avx512
@pytest.mark.parametrize("m, n, k, why", [(11, 64, 64, "m < MR"), (64, 31, 64, "n < NR"), (64, 64, 15, "k < 16"),
                                          (2048, 1024, 1024, "above LM_GEMM_OWN_MAX")])
def test_own_sgemm_declines_sizes_it_leaves_to_blas(m, n, k, why):
    rng = np.random.default_rng(1)
    A, B = _operands(rng, m, n, k, False, False)
    C = np.full((m, n), 7.0, np.float32)
    assert not _exec.own_sgemm(False, False, 1.0, A, B, 0.0, C), why
    assert (C == 7.0).all()  # untouched


@avx512
def test_own_sgemm_declines_alpha_zero():
    """BLAS does not read A and B when alpha == 0 (an SGD fold with lr 0 must not turn NaN gradients
    into NaN weights): the own kernel leaves that case to BLAS."""
    A = np.full((16, 64), np.nan, np.float32)
    B = np.ones((64, 64), np.float32)
    C = np.ones((16, 64), np.float32)
    assert not _exec.own_sgemm(False, False, 0.0, A, B, 1.0, C)


def test_own_sgemm_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        _exec.own_sgemm(False, False, 1.0, np.ones((16, 8), np.float32), np.ones((9, 32), np.float32), 0.0,
                        np.ones((16, 32), np.float32))


def _mlp_step_bits(nt):
    from libml_models.builders import mlp
    g, L = mlp([784, 512, 512, 10], 128, seed=0)
    prog = lc.compile(g, loss=L, optimizer=lc.SGD(0.01), num_threads=nt)
    rng = np.random.default_rng(5)
    feeds = {"x": rng.standard_normal((128, 784)).astype(np.float32),
             "y": rng.integers(0, 10, 128).astype(np.int64)}
    losses = [prog.step(feeds) for _ in range(3)]
    return losses, prog.params


def test_w2_training_steps_give_the_same_bits_for_1_and_2_threads():
    """W2's GEMM panels (64 rows per thread, the own kernel's sizes on AVX-512) are split by size only."""
    (l1, p1), (l2, p2) = _mlp_step_bits(1), _mlp_step_bits(2)
    assert l1 == l2
    for k in p1:
        np.testing.assert_array_equal(p1[k], p2[k], err_msg=k)
