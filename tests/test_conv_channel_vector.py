"""The channel-vector convolution forward (algo 2, format 2.5; kernels_conv.h ``lm_conv_ocv``): vectors over
16 output channels, one broadcast input pixel per FMA.

The compiler picks it by a measured rule (``ops_conv._use_ocv``); here ``ops_conv.OCV_FORCE = True`` makes
every conv forward it can run use it, so the geometries algo 1 or BLAS would otherwise take (channel counts
that are not a multiple of 16, groups, dilation, rectangular kernels, 1-D, stride 3, batch-1 row blocks) and
every epilogue (bias, the frozen BatchNorm scale, relu / clip / hard_swish with the kept pre-activation) run
through it and are checked against PyTorch's forward and autograd.  The sums are the ones algo 1 does, in the
same order, so where algo 1 would run the bits are equal; the splits depend on sizes only, so the results
are bit-identical for 1 and 2 threads.  The convolution tests of test_conv.py and test_conv_fusion.py are
collected again below with algo 2 forced."""
from __future__ import annotations

import numpy as np
import pytest

import libml_compile as lc
from libml_compile import ops_conv
from libml_runtime import format as F

import test_conv as TC
# collected again in this module, under the autouse fixture that forces algo 2
from test_conv import (test_forward_and_both_gradients_match_pytorch, test_relu_after_conv_is_its_epilogue_and_matches_pytorch,  # noqa: F401
                       test_float64_central_differences_of_a_tiny_conv, test_results_are_bit_identical_for_1_and_2_threads,
                       test_plan_file_roundtrip_runs_the_conv)
from test_conv_fusion import (test_forward_only_conv_bn_hardswish_is_one_conv_kernel_and_matches_pytorch,  # noqa: F401
                              test_conv_bn_hardswish_gradients_match_pytorch_with_trained_and_with_frozen_bn,
                              test_conv_relu6_as_clip_fuses_forward_and_backward_and_matches_pytorch,
                              test_conv_hardsigmoid_gradient_comes_from_the_output_nothing_kept,
                              test_float64_central_differences_through_a_fused_scaled_kept_conv,
                              test_fused_programs_are_bit_identical_for_1_and_2_threads,
                              test_mobilenet_block_exported_by_pytorch_fuses_and_matches_onnxruntime)

#: geometries chosen for the channel-vector kernel's edges: output channels per group 32 over 2 groups, 8
#: (half a vector), 20 (a vector and a bit), 17 with dilation 2 and stride 2, a batch-1 image in row blocks,
#: 1-D, a 5x5 kernel at stride 3, a rectangular kernel with mixed strides, pads and dilations over 2 groups
OCV_CASES = {
    "groups2_16_per_group": ((2, 16, 9, 11), (32, 8, 3, 3), 1, 1, 1, 2),
    "8_channels_stride2": ((2, 8, 10, 10), (8, 8, 3, 3), 2, 1, 1, 1),
    "20_channels_odd_width": ((3, 9, 12, 7), (20, 9, 3, 3), 1, 1, 1, 1),
    "17_channels_dilated_stride2": ((2, 8, 17, 15), (17, 8, 3, 3), 2, 2, 2, 1),
    "batch1_row_blocks": ((1, 16, 40, 37), (16, 16, 3, 3), 1, 1, 1, 1),
    "1d_stride2": ((2, 8, 30), (16, 8, 5), 2, 2, 1, 1),
    "5x5_stride3": ((2, 8, 16, 14), (16, 8, 5, 5), 3, 2, 1, 1),
    "rect_mixed_grouped": ((2, 8, 9, 10), (16, 4, 3, 2), (2, 1), (1, 2), (2, 1), 2),
    # no padding read: the kernel reads x in place (conv_layout.ocv_inplace), including the odd input
    # rows / columns a stride-2 1x1 never reads and a valid 3x3 whose last window ends before the edge
    "inplace_1x1_stride2": ((2, 16, 11, 9), (32, 16, 1, 1), 2, 0, 1, 1),
    "inplace_3x3_valid_stride2_dilated": ((2, 8, 14, 13), (16, 8, 3, 3), 2, 0, 2, 1),
}
TC.CASES.update({"ocv_" + k: v for k, v in OCV_CASES.items()})


@pytest.fixture(autouse=True)
def _force_algo_2(monkeypatch):
    monkeypatch.setattr(ops_conv, "OCV_FORCE", True)


def _forward_algo(prog, entry="grad"):
    return [d["algo"] for _, name, _, d in F.instructions(prog.plan.entries[entry].code) if name == "conv"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", sorted(OCV_CASES))
def test_channel_vector_forward_and_gradients_match_pytorch(name, dtype):
    prog, feeds, want = TC._case("ocv_" + name, dtype, relu=True)
    assert _forward_algo(prog) == [2]
    fwd, grad = (1e-4, 1e-3) if dtype == np.float32 else (1e-12, 1e-12)
    TC._close(prog.run(feeds)["y"], want["y"], fwd, f"{name} forward")
    grads = prog.grad(feeds)
    for k in ("x", "w", "b"):
        TC._close(grads[k], want[k], grad, f"{name} d{k}")


@pytest.mark.parametrize("name", ["groups2_16_per_group", "20_channels_odd_width", "batch1_row_blocks",
                                  "5x5_stride3", "1d_stride2"])
def test_channel_vector_forward_has_the_bits_of_the_tiled_kernels(name, monkeypatch):
    """Same products summed in the same order as algo 1: equal bits, so the rule may pick either."""
    out = {}
    for force in (False, True):
        monkeypatch.setattr(ops_conv, "OCV_FORCE", force)
        prog, feeds, _ = TC._case("ocv_" + name, np.float32, relu=True)
        assert _forward_algo(prog) == [2 if force else 1]
        out[force] = prog.run(feeds)["y"]
    assert out[True].tobytes() == out[False].tobytes()


def test_channel_vector_results_are_bit_identical_for_1_and_2_threads():
    TC.CASES.setdefault("ocv_threads", ((5, 24, 19, 21), (40, 24, 3, 3), 2, 1, 1, 1))
    (y1, g1), (y2, g2) = (TC._determinism_case("ocv_threads", nt) for nt in (1, 2))
    assert y1.tobytes() == y2.tobytes()
    for k in g1:
        assert g1[k].tobytes() == g2[k].tobytes(), f"d{k} differs between 1 and 2 threads"


def test_the_rule_picks_algo_2_for_strided_and_small_3x3_convs_and_keeps_the_stem_and_1x1_on_others(monkeypatch):
    """The W6 / W8 layers (ops_conv._use_ocv's measurements)."""
    monkeypatch.setattr(ops_conv, "OCV_FORCE", None)

    def algo(n, c, hw, m, k, s):
        g = lc.Graph("r")
        x = g.input("x", (n, c, hw, hw))
        g.output("y", lc.conv(x, g.param("w", np.zeros((m, c, k, k), np.float32)), strides=s, pads=k // 2))
        return _forward_algo(lc.compile(g), "run")[0]

    assert algo(32, 3, 32, 16, 3, 1) == 1       # the RGB stem: 3 input channels per tap
    assert algo(32, 16, 32, 16, 3, 1) == 1      # 32x32 at stride 1
    assert algo(32, 16, 32, 32, 3, 2) == 2      # stride 2
    assert algo(1, 32, 16, 64, 3, 2) == 2
    assert algo(32, 32, 16, 32, 3, 1) == 2      # 16x16 and 8x8 at batch >= 8
    assert algo(256, 64, 8, 64, 3, 1) == 2
    assert algo(1, 64, 8, 64, 3, 1) == 1        # batch 1 at stride 1
    assert algo(256, 16, 32, 32, 1, 2) == 2     # 1x1 shortcut at stride 2, large batch: x read in place
    assert algo(32, 16, 32, 32, 1, 2) == 0      # smaller batches: BLAS over im2col panels
    assert algo(32, 16, 32, 32, 1, 1) == 0      # pointwise: BLAS on x itself
    assert algo(32, 16, 16, 8, 3, 2) == 1       # fewer than 16 output channels


def test_the_plan_validator_refuses_algo_2_outside_the_forward_and_a_short_slot():
    prog, _, _ = TC._case("ocv_20_channels_odd_width", np.float32)
    TC.assert_validator_refuses(prog.plan, "grad", (
        ("conv_grad_weight", "algo", 2, "algo 2 .* is for conv only"),
        ("conv_grad_input", "algo", 2, "algo 2 .* is for conv only"),
        ("conv", "panel", 64, "panel = 64: algo 2's scratch slot needs"),
        ("conv", "rb", 10 ** 6, "rb = 1000000 is more than the output rows")))
