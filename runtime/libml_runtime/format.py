"""The plan format, defined once: opcodes and the field layout of every instruction, register-VM opcodes
with their arity and C expression, dtype codes, limits, slots and error codes.

Everything else is derived from these tables:

* ``format_codegen.py`` writes ``format_gen.h`` (C enums, constants, field offsets, the VM's ``switch``
  cases) and ``format_gen.pxi`` (their Cython declarations) at build time; ``setup.py`` runs it before
  compiling, so the C side cannot disagree with this file;
* the built module carries this table as text (``_exec.format_table()``); ``check_build`` compares it at
  import and names the first entry that differs (a stale build after an edit here fails loudly instead
  of computing something else);
* the compiler's emitters (``lower.py``) encode instructions by field name (``encode``), the validator
  (``plan.py``), the executable and the tests decode them by name (``decode``).

Adding an opcode or a VM opcode appends to a table (codes are never reused or renumbered: plan files
store them) and bumps ``MINOR``; a runtime that meets a plan of a newer minor version says which it
needs (``planfile``).
"""
from __future__ import annotations

import re

import numpy as np

#: plan format version: MAJOR changes the container (planfile.py's prefix); MINOR counts additions
#: (opcodes, VM opcodes) a newer plan may use and an older runtime does not know
MAJOR, MINOR = 2, 7

HEADER = 3  # every instruction: opcode, length (header included), node id; then its fields

# ---------------------------------------------------------------------------------------------------
# instruction layouts.  A layout is a sequence of fields: ``name`` (one int64), ``name[count]`` (count
# int64s; count is an earlier field or a number) or ``name[count]{fields}`` (count records).  A dotted
# name is only a name ("A.slot").  Operands are (slot, byte offset) pairs: ``X.slot X.offset``.

#: format 2.3: the geometry fields every convolution instruction starts with (ops_conv.py)
_CONV_GEOM = "dtype N C H W M G kh kw sh sw ph pw dh dw OH OW panel nslots algo rb"
#: format 2.3: the geometry fields every pooling instruction starts with (ops_pool.py)
_POOL_GEOM = "dtype N C H W kh kw sh sw ph pw eh ew dh dw OH OW"
#: format 2.3: the geometry fields both resize instructions start with (ops_resize.py)
_RESIZE_GEOM = "dtype P H W OH OW kh kw tab extrap"

OPCODES = [
    # (code, name, layout)
    (1, "fused_elementwise",
     "dtype ndim dims[ndim] n_in n_out n_regs n_prog mode nchunks scratch.slot scratch.offset "
     "input[n_in]{slot offset stride[ndim]} "
     "output[n_out]{slot offset stride[ndim] reg is_reduce scale} "
     "prog[n_prog]{op dst a b c}"),
    (2, "gemm",
     "dtype M N K transA transB A.slot A.offset B.slot B.offset C.slot C.offset alpha beta "
     "bias.slot bias.offset act batch_ndim batch_dims[batch_ndim] A.batch_stride[batch_ndim] "
     "B.batch_stride[batch_ndim] C.batch_stride[batch_ndim] mask.slot mask.offset colsum.slot colsum.offset"),
    (3, "softmax", "dtype outer K inner x.slot x.offset y.slot y.offset"),
    (4, "softmax_xent", "dtype B C logits.slot logits.offset labels.slot labels.offset labels.dtype "
                        "out.slot out.offset"),
    (5, "xent_grad", "dtype B C logits.slot logits.offset labels.slot labels.offset labels.dtype "
                     "g.slot g.offset out.slot out.offset loss.slot loss.offset"),
    (6, "cast", "src_dtype dst_dtype n src.slot src.offset dst.slot dst.offset"),
    (7, "int_elementwise", "dtype op ndim dims[ndim] a.slot a.offset a.stride[ndim] b.slot b.offset "
                           "b.stride[ndim] out.slot out.offset"),
    (8, "copy", "nbytes src.slot src.offset dst.slot dst.offset"),
    (9, "strided_copy", "itemsize ndim dims[ndim] src.slot src.offset src.stride[ndim] dst.slot dst.offset"),
    (10, "sgd_update", "dtype nparams lr momentum weight_decay "
                       "param[nparams]{p.slot p.offset g.slot g.offset v.slot v.offset n}"),
    (11, "adam_update", "dtype nparams lr beta1 beta2 eps weight_decay step.slot step.offset "
                        "param[nparams]{p.slot p.offset g.slot g.offset m.slot m.offset v.slot v.offset n}"),
    (12, "check_finite", "dtype n x.slot x.offset"),
    (13, "adam_apply", "dtype nparams lr beta1 beta2 eps weight_decay step.slot step.offset "
                       "param[nparams]{p.slot p.offset g.slot g.offset m.slot m.offset v.slot v.offset n}"),
    (14, "copy_nd", "itemsize ndim dims[ndim] src.slot src.offset src.stride[ndim] dst.slot dst.offset "
                    "dst.stride[ndim]"),
    (15, "gather", "itemsize outer n inner nidx src.slot src.offset idx.slot idx.offset dst.slot dst.offset"),
    (16, "scatter_add", "dtype outer n inner nidx g.slot g.offset idx.slot idx.offset dst.slot dst.offset"),
    # 2.1: a GEMM whose epilogue is any VM step (act must be 3): c = vm(c + bias, b, c') per row, b / c'
    # each 0 (unused), 1 (the `mask` operand: an auxiliary array of C's shape) or < 0 (an immediate,
    # consts[-v-1]); with colsum, the column sums of the result.  gemm's fields come first (same offsets).
    (29, "gemm_ex", "dtype M N K transA transB A.slot A.offset B.slot B.offset C.slot C.offset alpha beta "
     "bias.slot bias.offset act batch_ndim batch_dims[batch_ndim] A.batch_stride[batch_ndim] "
     "B.batch_stride[batch_ndim] C.batch_stride[batch_ndim] mask.slot mask.offset colsum.slot colsum.offset "
     "epi.vm epi.b epi.c"),
    # ---- format 2.1: reductions (libml_compile/ops_reduce.py).  All three view x as a contiguous
    # (outer, K, inner) array and reduce / normalise its middle axis; every output element is computed by
    # one thread in a fixed order, so results do not depend on the thread count.
    # kind (REDUCE_KINDS): 0 max, 1 min, 2 prod, 3 logsumexp; y is (outer, inner).
    (17, "reduce", "dtype kind outer K inner x.slot x.offset y.slot y.offset"),
    # kind 0 argmax, 1 argmin; y int64 (outer, inner); select_last 0/1 picks the first/last extremum
    (18, "arg_reduce", "dtype kind select_last outer K inner x.slot x.offset y.slot y.offset"),
    # y = x - max - log(sum(exp(x - max))) along K, y of x's shape
    (19, "log_softmax", "dtype outer K inner x.slot x.offset y.slot y.offset"),
    # ---- logic family (ops_logic.py): Where over any dtype whose values are not in the float VM --
    # out = cond ? a : b, cond one byte per element (bool), a/b/out of ``itemsize`` bytes; strided reads
    (23, "select", "itemsize ndim dims[ndim] cond.slot cond.offset cond.stride[ndim] a.slot a.offset "
                   "a.stride[ndim] b.slot b.offset b.stride[ndim] out.slot out.offset"),
    # 2.2: gemm_ex whose epilogue writes its result to y, C keeping the GEMM + bias value (the epilogue op's
    # input, which its gradient reads): gemm_ex's fields come first (same offsets)
    (32, "gemm_ex_keep", "dtype M N K transA transB A.slot A.offset B.slot B.offset C.slot C.offset alpha beta "
     "bias.slot bias.offset act batch_ndim batch_dims[batch_ndim] A.batch_stride[batch_ndim] "
     "B.batch_stride[batch_ndim] C.batch_stride[batch_ndim] mask.slot mask.offset colsum.slot colsum.offset "
     "epi.vm epi.b epi.c y.slot y.offset"),
    # ---- format 2.2: normalisation (libml_compile/ops_norm.py).  x is a contiguous (outer, n) array
    # normalised over each row of n >= 1; scale and bias have n elements; mean / rstd one per row.
    # y = (x - mean) * rstd * scale + bias, rstd = 1 / sqrt(biased variance + consts[eps])
    (30, "layer_norm", "dtype outer n eps x.slot x.offset scale.slot scale.offset bias.slot bias.offset "
                       "y.slot y.offset mean.slot mean.offset rstd.slot rstd.offset"),
    # dx (outer, n), dscale and dbias (n) from x, scale, the saved mean / rstd and dy
    (31, "layer_norm_grad", "dtype outer n x.slot x.offset scale.slot scale.offset mean.slot mean.offset "
                            "rstd.slot rstd.offset dy.slot dy.offset dx.slot dx.offset dscale.slot "
                            "dscale.offset dbias.slot dbias.offset"),
    # ---- format 2.2: dropout in training mode (libml_compile/ops_dropout.py).  y = x * (keep ? scale : 0)
    # over n contiguous elements; element i is kept when r >= ceil(consts[p] * 2^32) (r / 2^32 >= p), r the
    # 32-bit word (i / 8) mod 4 of Philox4x32-10 with counter ((i / 32) * 8 + i mod 8, step) (two 64-bit
    # halves, low 32-bit word first) and key seed (the field's 64 bits); nothing is kept when that threshold
    # reaches 2^32 (p = 1: y = x * 0).  step is an int64 read from its operand (this training call's
    # number: counter_next's out).  The mask depends only on (seed, step, i): any thread count, any ISA.
    (33, "dropout", "dtype n p scale seed step.slot step.offset x.slot x.offset y.slot y.offset"),
    # out = *counter; *counter += 1 (int64 scalars): a persistent counter (the state) advanced once per
    # call of an entry, its value before the advance copied to out for this call's readers
    (34, "counter_next", "counter.slot counter.offset out.slot out.offset"),
    # ---- format 2.3: gemm over strided operands (libml_compile/views.py: attention's head transposes,
    # the in-projection's q/k/v slices and the output's permute read or written in place).  gemm's fields
    # (same offsets), then the leading dimensions of A, B and C in elements; the batch strides may be any
    # (non-overlapping for C).  C is dense unless act is 0 or 1 with no mask and no column sums.
    (35, "gemm_strided", "dtype M N K transA transB A.slot A.offset B.slot B.offset C.slot C.offset alpha beta "
     "bias.slot bias.offset act batch_ndim batch_dims[batch_ndim] A.batch_stride[batch_ndim] "
     "B.batch_stride[batch_ndim] C.batch_stride[batch_ndim] mask.slot mask.offset colsum.slot colsum.offset "
     "lda ldb ldc"),
    # ---- format 2.3: RMS normalisation (libml_compile/ops_norm.py, ONNX RMSNormalization and the pattern
    # x * 1/sqrt(mean(x^2) + eps) * w).  Rows of n as layer_norm, without centring or bias:
    # rstd = 1 / sqrt(sum(x^2) / n + consts[eps]), y = x * rstd * scale; rstd written per row
    (36, "rms_norm", "dtype outer n eps x.slot x.offset scale.slot scale.offset y.slot y.offset "
                     "rstd.slot rstd.offset"),
    # dx (outer, n) and dscale (n) from x, scale, the saved rstd and dy
    (37, "rms_norm_grad", "dtype outer n x.slot x.offset scale.slot scale.offset rstd.slot rstd.offset "
                          "dy.slot dy.offset dx.slot dx.offset dscale.slot dscale.offset"),
    # ---- format 2.3: plain SGD on the rows of a table that a gather read (an embedding), never a dense
    # gradient: p[o, idx[j], :] += -consts[lr] * g[o, j, :] for j in index order (libml_compile/passes.py
    # fold_sgd_into_scatter).  Tasks own blocks of columns, so repeated indices apply in the same order for
    # any thread count; an index outside [-n, n) stops the run with ERR_INDEX before anything is written.
    (38, "scatter_sgd", "dtype outer n inner nidx lr g.slot g.offset idx.slot idx.offset p.slot p.offset"),
    # ---- format 2.3: live indices of GatherElements / GatherND (libml_compile/ops_index.py).  out (int64, one
    # per position r of the row-major iteration space pos_dims) = sum_d coord_d(r) * pos_strides[d] +
    # sum_j v_j * mult[j], v_j = idx[r * k + j] (int64) plus dims[j] when negative; a v_j outside [0, dims[j])
    # stops the run with ERR_INDEX, detail r * k + j (nothing is written past the positions before it).  The
    # result is a flat row position for gather (15) / scatter_add (16), which do the data movement.
    (40, "index_flat", "k ndim idx.slot idx.offset out.slot out.offset dims[k] mult[k] pos_dims[ndim] "
                       "pos_strides[ndim]"),
    # ---- format 2.3: softmax over the last axis of a masked score tensor (libml_compile/ops_attention.py:
    # attention's scores + mask -> Softmax, or Where(mask, scores, fill) -> Softmax, as one pass).  x and y
    # are contiguous of shape dims (the last dim is the softmax axis, K); m is read with element strides
    # m.stride (0 along broadcast dims: BERT's (B, 1, 1, S) mask).  Per row: v = x + m (mode 0),
    # v = m != 0 ? x : consts[fill] (mode 1), v = m != 0 ? consts[fill] : x (mode 2), written to y, then
    # y = softmax(v) in place, the softmax opcode's arithmetic (so the result equals the unfused add +
    # softmax bit for bit: an all -inf row gives NaN, a row of finfo.min fills the uniform distribution, as
    # PyTorch).  One task per row: the same result for any thread count.
    (44, "softmax_masked", "dtype mode ndim dims[ndim] x.slot x.offset m.slot m.offset m.stride[ndim] fill "
                           "y.slot y.offset"),
    # ---- format 2.3: convolution (libml_compile/ops_conv.py), NCHW.  x (N, C, H, W), w (M, C/G, kh, kw),
    # y (N, M, OH, OW); a 1-D conv is H = kh = 1.  Output pixel (oh, ow) reads input (oh*sh - ph + i*dh,
    # ow*sw - pw + j*dw); coordinates outside [0, H) x [0, W) read zero (the padding).  Per image and group
    # the conv is a GEMM W_g (M/G, Kc) @ col (Kc, OH*OW), Kc = (C/G)*kh*kw, over column panels of `panel`
    # output pixels: the kernel builds one panel of the im2col matrix at a time in one of `nslots` scratch
    # panels of Kc*panel elements (rounded up to 16), one per thread, so no full-size im2col buffer exists.
    # Every split depends on these fields only, never on the thread count (results bit-identical for
    # any number of threads).  The three opcodes share this geometry prefix (same field offsets).
    # Format 2.4: algo 0 is that im2col + BLAS path; algo 1 the tiled path (kernels_conv.h): per task one
    # block of `rb` output rows (conv_grad_input: rows of dx; stride 1 only) whose input is copied into a
    # zero-padded, stride-phase-split tile so every tap is a constant offset, then register-blocked
    # microkernels; `panel` is then the elements of one thread's scratch slot (the runtime checks it
    # against the geometry and refuses a smaller one), `nslots` the slots.  2.3 plans with convolutions do
    # not load (their instructions are two fields shorter): recompile them.
    # Format 2.5: algo 2 (conv only), the channel-vector forward (kernels_conv.h lm_conv_ocv): per task one
    # block of `rb` output rows whose input is copied into a zero-padded tile (no phase split); vectors run
    # over 16 output channels and each pixel's inputs are broadcast, so no junk columns are computed;
    # `panel` is one thread's slot (tile + the block's pixel-major output), checked by the runtime.  2.5
    # also adds the residual operand `res` to conv (two fields: a 2.4 plan with a conv is refused by its
    # instruction length, recompile it).
    # The epilogue, per output value v of channel m while its panel is in cache: v = v * scale[m] (scale.slot
    # -1: none; an eval-mode BatchNorm's per-channel factor, passes.fuse_conv_epilogues), v = v + b[m] (b.slot
    # -1: no bias), then pre[.] = v when pre.slot >= 0 (the activation's input, kept for a gradient that
    # reads it; 2.5: after v = v + res[.] when res.slot >= 0, a residual of y's shape added before it, as a
    # ResNet block's conv -> Add(shortcut) -> ReLU), then the activation: act 0 none, 1 relu, 3 the VM step
    # epi.vm (format.VM) with operands
    # epi.b / epi.c (0 unused, k < 0 the immediate consts[-k-1]: HardSigmoid's alpha / beta, Clip's
    # min / max), as gemm_ex's epilogue.  G > 1 with C/G = 1 (depthwise, or a channel multiplier M/G) runs a
    # direct loop and uses no scratch.
    (48, "conv", _CONV_GEOM + " act epi.vm epi.b epi.c x.slot x.offset w.slot w.offset b.slot b.offset "
     "scale.slot scale.offset y.slot y.offset pre.slot pre.offset res.slot res.offset scratch.slot scratch.offset"),
    # ---- format 2.7: conv with a pointwise shortcut in its reduction (ops_conv.fuse_conv_shortcuts: a ResNet
    # block's conv -> Add(1x1 strided conv of the block's input) -> ReLU).  conv's fields, then x2 (N, C2,
    # H2, W2) and w2 (M, C2): before the epilogue the accumulator of output (n, m, oh, ow) also sums
    # w2[m, c] * x2[n, c, oh * s2h, ow * s2w] over c < C2, after conv's own taps (the kernel's reduction
    # runs over K = C/G*kh*kw + C2 values, the shortcut's last), so the shortcut's output is never
    # stored.  G = 1, algo 1 or 2 (the tiled kernels; the validator refuses the rest); the scratch slot
    # holds the shortcut's C2 channels beside the tile (conv_layout), and res.slot must be -1.
    (58, "conv_shortcut", _CONV_GEOM + " act epi.vm epi.b epi.c x.slot x.offset w.slot w.offset b.slot b.offset "
     "scale.slot scale.offset y.slot y.offset pre.slot pre.offset res.slot res.offset scratch.slot scratch.offset "
     "C2 H2 W2 s2h s2w x2.slot x2.offset w2.slot w2.offset"),
    # dx from w and dy: per (image, group, block of `cblock` input channels) one task owning its dx
    # channels, which accumulates the col2im of W_g[:, block]^T @ dy over the panels in order
    (49, "conv_grad_input", _CONV_GEOM + " cblock w.slot w.offset dy.slot dy.offset dx.slot dx.offset "
     "scratch.slot scratch.offset"),
    # dw from x and dy: the (image, panel) items split into `nchunks` fixed chunks, each summing
    # dy_panel @ col^T into a private partial dw (in scratch after the panels), then the partials added
    # in chunk order.  sgd 1 (plain SGD folded into the kernel, passes.fold_sgd_into_conv): dw is the
    # param p itself and, with the sum s of the partials, p -= consts[lr] * (s + consts[weight_decay] * p)
    # (the sgd_update kernel's arithmetic), so no gradient buffer exists; sgd 0: dw = s (lr and
    # weight_decay unread)
    (50, "conv_grad_weight", _CONV_GEOM + " nchunks sgd lr weight_decay x.slot x.offset dy.slot dy.offset "
     "dw.slot dw.offset scratch.slot scratch.offset"),
    # ---- format 2.3: pooling (libml_compile/ops_pool.py), NCHW planes of H x W (1-D: H = kh = 1).  Window
    # (oh, ow) covers input rows oh*sh - ph + i*dh (i < kh) and columns likewise; eh / ew are the end pads
    # (only AveragePool's count_include_pad reads them: taps before H + eh count).  One task per (n, c)
    # plane, outputs in order: results do not depend on the thread count.
    # max_pool: y = the window's maximum (NaN wins, PyTorch's rule; the first of equal maxima), idx (int64)
    # its flat index into x (ONNX Indices: row-major, or with order 1 column-major within the plane,
    # storage_order); -1 and y = -inf for a window with no input element
    (51, "max_pool", _POOL_GEOM + " order x.slot x.offset y.slot y.offset idx.slot idx.offset"),
    # dx = 0; dx[idx] += dy per output in order (idx as max_pool wrote it: an index outside the output's
    # own plane is refused with ERR_INDEX, -1 skipped)
    (52, "max_pool_grad", _POOL_GEOM + " order dy.slot dy.offset idx.slot idx.offset dx.slot dx.offset"),
    # y = the window's mean: over its taps inside the input (include_pad 0), or inside the padded
    # input H + eh, W + ew (include_pad 1)
    (53, "avg_pool", _POOL_GEOM + " include_pad x.slot x.offset y.slot y.offset"),
    (54, "avg_pool_grad", _POOL_GEOM + " include_pad dy.slot dy.offset dx.slot dx.offset"),
    # ---- format 2.3: resize (libml_compile/ops_resize.py: ONNX Resize / Upsample, PyTorch F.interpolate),
    # separable over the last two axes: x is P planes of H x W, y P planes of OH x OW.  The compiler's
    # per-axis tables are in the constant pool from consts[tab] on: ih[OH * kh] (row indices, as doubles),
    # wh[OH * kh] (their weights), then iw[OW * kw], ww[OW * kw] for the columns; y[p, oh, ow] = sum_i wh[oh, i]
    # * (sum_j ww[ow, j] * x[p, ih[oh, i], iw[ow, j]]) (i, j in order, in double precision).  Nearest modes
    # are one tap of weight 1 (a copy).  extrap >= 0 (tf_crop_and_resize): an output whose row's first index
    # ih[oh * kh] or column's first index iw[ow * kw] is -1 is consts[extrap].  Every other index must lie
    # in [0, H) / [0, W): the kernel checks the table before it writes (ERR_INDEX, detail its position
    # after tab).  Output rows are independent: any thread count gives the same bits.
    (56, "resize", _RESIZE_GEOM + " x.slot x.offset y.slot y.offset"),
    # its transpose: dx = 0, then dx[p, ih[oh, i], iw[ow, j]] += ww[ow, j] * (wh[oh, i] * dy[p, oh, ow]) over
    # (oh, ow, i, j) in order, extrapolated outputs skipped; one task per plane p (owning its dx plane), so
    # the scatter-adds have a fixed order for any thread count
    (57, "resize_grad", _RESIZE_GEOM + " dy.slot dy.offset dx.slot dx.offset"),
    # ---- format 2.3: batch normalisation in training mode (libml_compile/ops_batchnorm.py).  x is a
    # contiguous (N, C, S) array (S: the spatial dims' product); per channel c, over its M = N * S elements,
    # one task computes mean and the biased variance var (fixed-order double sums: any thread count gives
    # the same bits), rstd = 1 / sqrt(var + consts[eps]), y = (x - mean) * rstd * scale + bias (flags & 4:
    # then max(y, 0)), mean / rstd per channel; nmean = (1 - mom) * rmean + mom * mean and nvar = (1 - mom) *
    # rvar + mom * (flags & 2 ? var * M / (M - 1) : var), mom = consts[momentum]; flags & 1: nmean / nvar are
    # also written over rmean / rvar (the running statistics, updated in place).
    (64, "batch_norm", "dtype N C S flags eps momentum x.slot x.offset scale.slot scale.offset bias.slot "
                       "bias.offset rmean.slot rmean.offset rvar.slot rvar.offset y.slot y.offset mean.slot "
                       "mean.offset rstd.slot rstd.offset nmean.slot nmean.offset nvar.slot nvar.offset"),
    # dx (N, C, S), dscale and dbias (C) from x, scale, the saved mean / rstd and dy; flags & 4: dy is taken
    # as 0 where y (the fused BN + ReLU output) is not > 0.  Per channel: dbias = sum dy, dscale = sum dy *
    # xh (xh = (x - mean) * rstd), dx = scale * rstd * (dy - dbias / M - xh * dscale / M).
    (65, "batch_norm_grad", "dtype N C S flags x.slot x.offset scale.slot scale.offset mean.slot mean.offset "
                            "rstd.slot rstd.offset dy.slot dy.offset y.slot y.offset dx.slot dx.offset "
                            "dscale.slot dscale.offset dbias.slot dbias.offset"),
    # ---- data-parallel collectives (libml_compile/distributed.py, runtime/libml_runtime/_mpi.pxi).  MPI is
    # not a build dependency: the runtime calls MPI_Iallreduce / MPI_Wait / MPI_Test through function
    # pointers taken at run time from the libmpi that mpi4py loaded, handed to the Executable once (a plan
    # never holds an address); every call runs with the GIL released.  `req` names one of the executable's
    # request slots; plan.validate proves every start is followed, in the same entry, by one wait of the same
    # slot before that slot starts again, and that no request is pending when the entry ends.
    # allreduce_start: the parts' elements (part[i].n each, contiguous at src) are copied one after the other
    # into buf (n = the sum of part[].n, below 2^31: MPI's int count), then a non-blocking in-place
    # MPI_Iallreduce (MPI_SUM over the float type of dtype) of buf's n elements over the executable's
    # communicator is started into request `req`.  Nothing may touch buf until the matching wait (the
    # compiler keeps it live: the wait reads it).  Between instructions the runtime calls MPI_Test on the
    # pending requests, so the reduction progresses while later instructions (the rest of the backward) run.
    (66, "allreduce_start", "dtype req n buf.slot buf.offset nparts part[nparts]{src.slot src.offset n}"),
    # allreduce_wait: MPI_Wait(request `req`), then the parts of buf are copied out in order, each element
    # multiplied by consts[scale] (1 / world size: the sum of the ranks' gradients becomes their mean): part
    # i's n elements to dst.  A sum of two ranks is the same bits on both (a + b = b + a); scale 1/2 is exact.
    (67, "allreduce_wait", "dtype req n scale buf.slot buf.offset nparts part[nparts]{dst.slot dst.offset n}"),
]

#: the ``kind`` field of the reduce / arg_reduce instructions
REDUCE_KINDS = {"max": 0, "min": 1, "prod": 2, "logsumexp": 3}
ARG_REDUCE_KINDS = {"argmax": 0, "argmin": 1}

OP_NAMES = {code: name for code, name, _ in OPCODES}
OP_GEMM_EX = 29
OP_CODE = {name: code for code, name, _ in OPCODES}
(OP_EW, OP_GEMM, OP_SOFTMAX, OP_XENT, OP_XENT_GRAD, OP_CAST, OP_INT_EW, OP_COPY, OP_STRIDED_COPY, OP_SGD,
 OP_ADAM, OP_CHECK_FINITE, OP_ADAM_APPLY, OP_COPY_ND, OP_GATHER, OP_SCATTER_ADD, OP_REDUCE, OP_ARG_REDUCE,
 OP_LOG_SOFTMAX) = range(1, 20)
OP_SELECT = 23

# ---------------------------------------------------------------------------------------------------
# the register VM of fused elementwise kernels.  A program step is VM_WIDTH int64s: op dst a b c.  `a` is
# a register; `b` and `c` are registers or, when negative, the constant consts[-v-1] (an immediate) --
# except a mask operand, always a register.  Each entry: (code, name, arity, C expression of x = a,
# y = b, z = c, mask operand or None).  Expressions are C over the kernel's element type: numeric
# literals are cast to it and the math functions in MATH_FUNCS become its float/double variants.
#
# The superinstructions FMA .. DIVMASK are formed by the lowering from a producer with a single use, so
# the intermediate never makes a round trip through the register file (each such trip costs about as
# much as a multiply).  A masked step multiplies by (mask > 0 ? 1 : 0), as a separate select of
# constants, which GCC vectorises (x * (m > 0) it does not).
VM = [
    (0, "COPY", 1, "x", None),
    (1, "ADD", 2, "x + y", None),
    (2, "SUB", 2, "x - y", None),
    (3, "MUL", 2, "x * y", None),
    (4, "DIV", 2, "x / y", None),
    (5, "RSUB", 2, "y - x", None),
    (6, "RDIV", 2, "y / x", None),
    (7, "NEG", 1, "-x", None),
    (8, "RELU", 1, "x < 0 ? 0 : x", None),  # relu(NaN) = NaN
    # exp overflows to +inf for very negative x, giving exactly 0, never NaN
    (9, "SIGMOID", 1, "1 / (1 + exp(-x))", None),
    (10, "EXP", 1, "exp(x)", None),
    # format 2.6: sigmoid of a multiply-add with a single use (a logistic gate, W4's sigmoid(x*a + b)):
    # the affine result never makes a trip through the register file; same operations, same bits
    (75, "FMA_SIGMOID", 3, "1 / (1 + exp(-(x * y + z)))", None),
    (11, "LOG", 1, "log(x)", None),
    (12, "STEP", 1, "x > 0 ? 1 : 0", None),
    (13, "FMA", 3, "x * y + z", None),
    (14, "FMS", 3, "x * y - z", None),
    (15, "FNMA", 3, "z - x * y", None),
    (16, "MULSUB", 3, "x * (y - z)", None),
    (17, "MASK", 2, "x", "b"),
    (18, "ADDRELU", 2, "x + y < 0 ? 0 : x + y", None),
    (19, "SUBRELU", 2, "x - y < 0 ? 0 : x - y", None),
    (20, "MULMASK", 3, "x * y", "c"),
    (21, "DIVMASK", 3, "x / y", "c"),
    # ---- format 2.1: the ONNX elementwise family (ops_ew.py).  *_GRAD steps compute the upstream
    # gradient x times the derivative, from y = the op's input (or its output, where noted) and z = its
    # parameter; NaN propagates as in NumPy/PyTorch (comparisons with NaN are false, so every select
    # below keeps the NaN in the branch it falls to).
    (22, "TANH", 1, "tanh(x)", None),
    (23, "TANH_GRAD", 2, "x * (1 - y * y)", None),                      # y = tanh output
    (24, "SQRT", 1, "sqrt(x)", None),
    (25, "SQRT_GRAD", 2, "x * 0.5 / y", None),                          # y = sqrt output
    (26, "RECIP", 1, "1 / x", None),
    (27, "RECIP_GRAD", 2, "-x * y * y", None),                          # y = 1/x output
    (28, "ABS", 1, "fabs(x)", None),
    (29, "ABS_GRAD", 2, "y > 0 ? x : (y < 0 ? -x : x * y)", None),      # 0 at 0, NaN at NaN
    (30, "ERF", 1, "erf(x)", None),
    (31, "ERF_GRAD", 2, "x * 1.1283791670955126 * exp(-y * y)", None),  # 2/sqrt(pi)
    (32, "SIN", 1, "sin(x)", None),
    (33, "SIN_GRAD", 2, "x * cos(y)", None),
    (34, "COS", 1, "cos(x)", None),
    (35, "COS_GRAD", 2, "-x * sin(y)", None),
    # log(1 + e^x) without overflow: x + log1p(e^-x) for x > 0
    (36, "SOFTPLUS", 1, "x > 0 ? x + log1p(exp(-x)) : log1p(exp(x))", None),
    (37, "SOFTPLUS_GRAD", 2, "x / (1 + exp(-y))", None),                # sigmoid(y)
    (38, "SOFTSIGN", 1, "x / (1 + fabs(x))", None),
    (39, "SOFTSIGN_GRAD", 2, "x / ((1 + fabs(y)) * (1 + fabs(y)))", None),
    (40, "ELU", 2, "x > 0 ? x : y * expm1(x)", None),                   # y = alpha
    (41, "ELU_GRAD", 3, "y > 0 ? x : x * z * exp(y)", None),
    (42, "CELU", 2, "x > 0 ? x : y * expm1(x / y)", None),
    (43, "CELU_GRAD", 3, "y > 0 ? x : x * exp(y / z)", None),
    (44, "LEAKYRELU", 2, "x < 0 ? y * x : x", None),                   # y = alpha (or PRelu's slope)
    (45, "LEAKYRELU_GRAD", 3, "y > 0 ? x : x * z", None),               # PyTorch: slope at 0
    (46, "PRELU_SLOPE_GRAD", 2, "y > 0 ? 0 : x * y", None),             # d/dslope
    (47, "THRELU", 2, "x > y ? x : 0", None),                           # ThresholdedRelu, y = alpha
    (48, "THRELU_GRAD", 3, "y > z ? x : 0", None),
    (49, "HARDSIGMOID", 3, "y * x + z < 0 ? 0 : (y * x + z > 1 ? 1 : y * x + z)", None),  # y alpha, z beta
    (50, "HARDSIGMOID_GRAD", 3, "y > 0 && y < 1 ? x * z : 0", None),    # y = output, z = alpha
    (51, "HARDSWISH", 1, "x * (x / 6 + 0.5 < 0 ? 0 : (x / 6 + 0.5 > 1 ? 1 : x / 6 + 0.5))", None),
    # PyTorch's subgradients at the kinks: 0 at -3, 1 at 3
    (52, "HARDSWISH_GRAD", 2, "y <= -3 ? 0 : (y < 3 ? x * (y / 3 + 0.5) : x)", None),
    (53, "MISH", 1, "x * tanh(x > 0 ? x + log1p(exp(-x)) : log1p(exp(x)))", None),
    (54, "MISH_GRAD", 2, "x * (tanh(y > 0 ? y + log1p(exp(-y)) : log1p(exp(y))) + y * (1 - "
                         "tanh(y > 0 ? y + log1p(exp(-y)) : log1p(exp(y))) * tanh(y > 0 ? y + log1p(exp(-y)) "
                         ": log1p(exp(y)))) / (1 + exp(-y)))", None),
    (55, "GELU", 1, "0.5 * x * (1 + erf(x * 0.7071067811865476))", None),
    (56, "GELU_GRAD", 2, "x * (0.5 * (1 + erf(y * 0.7071067811865476)) + y * 0.3989422804014327 * "
                         "exp(-0.5 * y * y))", None),
    (57, "GELU_TANH", 1, "0.5 * x * (1 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))", None),
    (58, "GELU_TANH_GRAD", 2, "x * (0.5 * (1 + tanh(0.7978845608028654 * (y + 0.044715 * y * y * y))) + 0.5 "
                              "* y * (1 - tanh(0.7978845608028654 * (y + 0.044715 * y * y * y)) * "
                              "tanh(0.7978845608028654 * (y + 0.044715 * y * y * y))) * 0.7978845608028654 * "
                              "(1 + 0.134145 * y * y))", None),
    # min(max(x, lo), hi) as np.clip/torch.clamp: hi where lo > hi, NaN if a bound is NaN (y = lo, z = hi)
    (59, "CLIP", 3, "y != y || z != z ? y + z : ((x < y ? y : x) > z ? z : (x < y ? y : x))", None),
    (60, "CLIP_MASK", 3, "x >= y && x <= z ? 1 : 0", None),              # PyTorch: grad flows at the bounds
    (61, "SIGN", 1, "x > 0 ? 1 : (x < 0 ? -1 : x)", None),
    (62, "FLOOR", 1, "floor(x)", None),
    (63, "CEIL", 1, "ceil(x)", None),
    (64, "ROUND", 1, "nearbyint(x)", None),                             # half to even, as ONNX/NumPy
    # max/min propagate NaN from either side (np.maximum); ties split the gradient (PyTorch)
    (65, "MAX", 2, "x != x || y != y ? x + y : (x < y ? y : x)", None),
    (66, "MIN", 2, "x != x || y != y ? x + y : (x > y ? y : x)", None),
    (67, "MAX_MASK", 2, "x > y ? 1 : (x == y ? 0.5 : 0)", None),        # d max(x, y) / dx
    (68, "MIN_MASK", 2, "x < y ? 1 : (x == y ? 0.5 : 0)", None),
    (69, "POW", 2, "pow(x, y)", None),
    (70, "POW_GRAD_BASE", 3, "z == 0 ? 0 : x * z * pow(y, z - 1)", None),   # (g, base, exponent)
    (71, "POW_GRAD_EXP", 3, "z == 0 && y <= 1 ? 0 : x * y * log(z)", None),  # (g, output, base)
    (72, "SQUARE", 1, "x * x", None),
    (73, "LOG1P", 1, "log1p(x)", None),
    (74, "EXPM1", 1, "expm1(x)", None),
    # ---- ewtests range 140-149
    (140, "ATAN", 1, "atan(x)", None),
    (141, "ATAN_GRAD", 2, "x / (1 + y * y)", None),                     # y = the op's input
    (142, "SIGMOID_GRAD", 2, "x * (y * (1 - y))", None),                # y = sigmoid output (2.2)
    # ---- ONNX import family (codes 150-159)
    (150, "SELU", 3, "x > 0 ? z * x : z * (y * expm1(x))", None),          # y = alpha, z = gamma
    # ---- format 2.1: the gradients of the reductions (ops_reduce.py)
    (100, "EQ_MASK", 2, "x == y ? 1 : 0", None),            # where x attains the reduced extremum y
    # d prod / dx from x = prod of the non-zero elements, y = the input, z = its count of zeros
    # (PyTorch's prod backward): p / x without zeros; at the only zero, the product of the others; else 0
    (101, "PROD_GRAD", 3, "z == 0 ? x / y : (z == 1 && y == 0 ? x : 0)", None),
    (102, "NONZERO_OR_ONE", 1, "x == 0 ? 1 : x", None),     # the factors of the product of non-zeros
    # ---- the logic family (ops_logic.py).  A bool inside a fused kernel is a 0/1 mask in the kernel's
    # float type (stored as one byte only where a group ends: a cast instruction), so comparisons fuse
    # with the float ops that produce their operands and WHERE with those that consume its result.
    # Comparisons with NaN are false (NE: true), as IEEE and NumPy.  AND/OR/XOR/NOT are only ever given
    # 0/1 masks (a bool entering a group is cast from its 0/1 byte), so they are arithmetic on {0, 1}.
    # The same codes name the integer kernel's ops (int_elementwise), which implements them in C per type.
    (120, "EQ", 2, "x == y ? 1 : 0", None),
    (121, "LT", 2, "x < y ? 1 : 0", None),
    (122, "LE", 2, "x <= y ? 1 : 0", None),
    (123, "GT", 2, "x > y ? 1 : 0", None),
    (124, "GE", 2, "x >= y ? 1 : 0", None),
    (125, "AND", 2, "x * y", None),
    (126, "OR", 2, "x + y - x * y", None),
    (127, "XOR", 2, "x != y ? 1 : 0", None),
    (128, "NOT", 1, "1 - x", None),
    (129, "ISNAN", 1, "x != x ? 1 : 0", None),
    (130, "ISINF", 1, "fabs(x) == INFINITY ? 1 : 0", None),
    (131, "ISPOSINF", 1, "x == INFINITY ? 1 : 0", None),
    (132, "ISNEGINF", 1, "x == -INFINITY ? 1 : 0", None),
    (133, "WHERE", 3, "x != 0 ? y : z", None),                          # x = the 0/1 condition mask
    # Mod: FMOD is C's fmod (sign of the dividend, ONNX fmod=1); MOD is NumPy's np.mod / Python's %
    # (sign of the divisor, ONNX fmod=0): fmod moved into the divisor's sign, a zero result signed as y
    (134, "FMOD", 2, "fmod(x, y)", None),
    (135, "MOD", 2, "fmod(x, y) == 0 ? copysign(0, y) : ((fmod(x, y) < 0) != (y < 0) ? fmod(x, y) + y : "
                    "fmod(x, y))", None),
]

#: C math functions an expression may call, each with its float variant (name + "f"); those in
#: MVEC_FUNCS have vector variants in glibc's libmvec and are declared `omp declare simd` (no
#: -ffast-math needed), the rest either inline to vector instructions (fabs, sqrt, floor, ...) or
#: are called per element.  MVEC_FUNCS_235: vector variants added in glibc 2.35 (declared only when the
#: build's glibc has them; older systems call the scalar function in the same loop).
MATH_FUNCS = ("exp", "log", "sqrt", "fabs", "tanh", "erf", "sin", "cos", "log1p", "expm1", "floor", "ceil",
              "nearbyint", "fmin", "fmax", "pow", "copysign", "atan", "fmod")
MVEC_FUNCS = ("exp", "log", "sin", "cos", "pow")
MVEC_FUNCS_235 = ("tanh", "erf", "log1p", "expm1", "atan")

VM_WIDTH = 5
VM_OPS = {name: code for code, name, _, _, _ in VM}
VM_ARITY = {code: arity for code, _, arity, _, _ in VM}
#: per VM opcode, the operand (1 = b, 2 = c) that must be a register even where immediates are allowed
VM_MASK_OPERAND = {code: {"b": 1, "c": 2}[m] for code, _, _, _, m in VM if m}

# ---------------------------------------------------------------------------------------------------
# limits of the runtime's kernels (compile-time sizes of C arrays)
LIMITS = {
    "LM_BLK": 128,       # elements per VM block: registers stay in L1/L2
    "LM_MAXD": 8,        # max dims of an elementwise iteration space (after collapsing)
    "LM_MAXIO": 32,      # max inputs / outputs of one fused group
    "LM_MAXREG": 64,     # max registers of one fused group
    "LM_MAXCHUNK": 16,   # fixed chunk count for reductions: results do not depend on threads
    "LM_MAXPROG": 4096,  # max steps of one VM program
}
LM_BLK, LM_MAXD, LM_MAXIO, LM_MAXREG, LM_MAXCHUNK, LM_MAXPROG = LIMITS.values()

# dtype codes (the index in DTYPES)
# (bool, format 2.1: one byte holding 0 or 1; appended, codes are never renumbered)
DTYPES = ["float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool"]
DTYPE_CODE = {d: i for i, d in enumerate(DTYPES)}
ITEMSIZE = [np.dtype(d).itemsize for d in DTYPES]

# slots
SLOTS = {"SLOT_ARENA": 0, "SLOT_STATE": 1, "SLOT_INPUT0": 2}
SLOT_ARENA, SLOT_STATE, SLOT_INPUT0 = SLOTS.values()

# run_plan error codes (executable.py turns them into exceptions)
ERRORS = {"ERR_MALFORMED": -1, "ERR_OPCODE": -2, "ERR_INT_DIV_ZERO": -3, "ERR_NOMEM": -4, "ERR_LABEL": -10,
          "ERR_INDEX": -11, "ERR_NONFINITE": -20}
ERR_MALFORMED, ERR_OPCODE, ERR_INT_DIV_ZERO, ERR_NOMEM, ERR_LABEL, ERR_INDEX, ERR_NONFINITE = ERRORS.values()

ALIGN = 64


# ---------------------------------------------------------------------------------------------------
# layouts: parsing, encoding and decoding by field name

_TOKEN = re.compile(r"\s*([A-Za-z_][\w.]*)(?:\[(\w+)\])?(\{)?|\s*(\})")


class Layout:
    """The parsed layout of one opcode: ``fields`` is a list of ``(name, count, sub)`` where count is None
    (a scalar), an int or the name of an earlier scalar field, and sub is None or a list of the record's
    fields (records hold scalars and arrays only)."""

    def __init__(self, code, name, text):
        self.code, self.name, self.text = code, name, text
        self.fields, rest = _parse(text, 0, name)
        if rest != len(text.rstrip()):
            raise ValueError(f"format: layout of {name!r}: unexpected text at {text[rest:]!r}")
        seen = set()
        for f, count, sub in self.fields:
            if isinstance(count, str) and count not in seen:
                raise ValueError(f"format: layout of {name!r}: count {count!r} of {f!r} is not an earlier field")
            if f in seen:
                raise ValueError(f"format: layout of {name!r}: field {f!r} repeats")
            seen.add(f)
            for g, c, s in sub or ():
                if s is not None or (isinstance(c, str) and c not in seen):
                    raise ValueError(f"format: layout of {name!r}: record field {f}.{g} must be a scalar or an "
                                     f"array counted by an earlier field")
        # fixed prefix: the scalar fields before the first variable-length one (their offsets are constant)
        self.prefix = []
        for f, count, sub in self.fields:
            if count is not None:
                break
            self.prefix.append(f)

    def _fast_encoder(self):
        """A Python function generated from the layout that flattens ``values`` without the checks of
        ``encode`` (the compiler's hot path: the validator decodes every instruction afterwards anyway,
        so a count that disagrees with an array's length is still refused, as a PlanError)."""
        lines = ["def enc(v):", "    out = []"]
        for f, count, sub in self.fields:
            if count is None:
                lines.append(f"    out.append(int(v[{f!r}]))")
            elif sub is None:
                lines.append(f"    out += map(int, v[{f!r}])")
            else:
                lines.append(f"    for r in v[{f!r}]:")
                for g, c, _ in sub:
                    lines.append(f"        out.append(int(r[{g!r}]))" if c is None else f"        out += map(int, r[{g!r}])")
        lines.append("    return out")
        ns = {}
        exec("\n".join(lines), ns)  # noqa: S102 - generated from the layout strings of this module
        return ns["enc"]

    def encode_fast(self, values: dict) -> list:
        try:
            return self._enc(values)
        except AttributeError:
            self._enc = self._fast_encoder()
            return self._enc(values)

    def encode(self, values: dict) -> list:
        """The fields as a list of ints, in layout order.  ``values`` maps every field name to an int
        (scalar), a list of ints (array) or a list of dicts (records); counts must agree with the
        arrays' lengths.  Raises KeyError/ValueError naming the opcode and field."""
        out = []
        for f, count, sub in self.fields:
            if f not in values:
                raise KeyError(f"format: {self.name} needs field {f!r}")
            v = values[f]
            if count is None:
                out.append(int(v))
                continue
            n = count if isinstance(count, int) else values[count]
            if len(v) != n:
                raise ValueError(f"format: {self.name}.{f} has {len(v)} entries, its count {count!r} is {n}")
            if sub is None:
                out += [int(x) for x in v]
                continue
            for k, rec in enumerate(v):
                for g, c, _ in sub:
                    if g not in rec:
                        raise KeyError(f"format: {self.name}.{f}[{k}] needs field {g!r}")
                    if c is None:
                        out.append(int(rec[g]))
                    else:
                        m = c if isinstance(c, int) else values[c]
                        if len(rec[g]) != m:
                            raise ValueError(f"format: {self.name}.{f}[{k}].{g} has {len(rec[g])} entries, "
                                             f"its count {c!r} is {m}")
                        out += [int(x) for x in rec[g]]
        return out

    def _fast_decoder(self):
        """``decode`` (values, not positions) as a Python function generated from the layout: the same
        checks and messages, unrolled (plan validation decodes millions of fields for a large program)."""
        L = ["def dec(code, pos, end, max_count):", "    d = {}"]

        def count_expr(c):
            return str(c) if isinstance(c, int) else f"d[{c!r}]"
        for f, count, sub in self.fields:
            if count is None:
                L += [f"    if pos >= end: raise ValueError('truncated while reading {f}')",
                      f"    d[{f!r}] = code[pos]", "    pos += 1"]
                continue
            L += [f"    n = {count_expr(count)}",
                  f"    if not 0 <= n <= max_count: raise ValueError(f'{count} = {{n}} is outside [0, {{max_count}}]')"]
            if sub is None:
                L += [f"    if pos + n > end: raise ValueError(f'truncated while reading {f}[{{n}}]')",
                      f"    d[{f!r}] = code[pos:pos + n]", "    pos += n"]
                continue
            width = " + ".join("1" if c is None else count_expr(c) for _, c, _ in sub)
            L += [f"    w = {width}",
                  f"    if pos + n * w > end: raise ValueError(f'truncated while reading {f}[{{n}}] ({{w}} fields each)')",
                  "    recs = []", "    for _ in range(n):", "        r = {}"]
            for g, c, _ in sub:
                if c is None:
                    L += [f"        r[{g!r}] = code[pos]", "        pos += 1"]
                else:
                    L += [f"        m = {count_expr(c)}", f"        r[{g!r}] = code[pos:pos + m]", "        pos += m"]
            L += ["        recs.append(r)", f"    d[{f!r}] = recs"]
        L.append("    return d, pos")
        ns = {}
        exec("\n".join(L), ns)  # noqa: S102 - generated from the layout strings of this module
        return ns["dec"]

    def decode(self, code, pos, end, max_count=1 << 20, positions=False):
        if not positions:
            try:
                return self._dec(code, pos, end, max_count)
            except AttributeError:
                self._dec = self._fast_decoder()
                return self._dec(code, pos, end, max_count)
        return self.decode_generic(code, pos, end, max_count, positions)

    def decode_generic(self, code, pos, end, max_count=1 << 20, positions=False):
        """The fields in ``code[pos:end]`` as a dict (arrays as lists, records as lists of dicts) and
        the position after them.  ``code`` is a list of ints.  Raises ValueError naming the first field
        that is missing (the code ends) or whose count is negative or above ``max_count``.
        positions: give each field's index in ``code`` instead of its value (tests that edit a field)."""
        d, val = {}, {}  # d: what is returned; val: scalar values (the counts)
        for f, count, sub in self.fields:
            if count is None:
                if pos >= end:
                    raise ValueError(f"truncated while reading {f}")
                val[f] = code[pos]
                d[f] = pos if positions else code[pos]
                pos += 1
                continue
            n = count if isinstance(count, int) else val[count]
            if not 0 <= n <= max_count:
                raise ValueError(f"{count} = {n} is outside [0, {max_count}]")
            if sub is None:
                if pos + n > end:
                    raise ValueError(f"truncated while reading {f}[{n}]")
                d[f] = list(range(pos, pos + n)) if positions else code[pos:pos + n]
                pos += n
                continue
            width = sum(1 if c is None else (c if isinstance(c, int) else val[c]) for _, c, _ in sub)
            if pos + n * width > end:
                raise ValueError(f"truncated while reading {f}[{n}] ({width} fields each)")
            recs = []
            for _ in range(n):
                r = {}
                for g, c, _ in sub:
                    if c is None:
                        r[g] = pos if positions else code[pos]
                        pos += 1
                    else:
                        m = c if isinstance(c, int) else val[c]
                        r[g] = list(range(pos, pos + m)) if positions else code[pos:pos + m]
                        pos += m
                recs.append(r)
            d[f] = recs
        return d, pos


def _parse(text, i, name, depth=0):
    fields = []
    while True:
        m = _TOKEN.match(text, i)
        if not m or (m.group(4) and depth == 0):
            return fields, i
        if m.group(4):  # closing brace
            return fields, m.end()
        f, count, brace = m.group(1), m.group(2), m.group(3)
        i = m.end()
        if count is not None and count.isdigit():
            count = int(count)
        sub = None
        if brace:
            if depth:
                raise ValueError(f"format: layout of {name!r}: records do not nest")
            sub, i = _parse(text, i, name, depth + 1)
        fields.append((f, count, sub))


LAYOUTS = {name: Layout(code, name, text) for code, name, text in OPCODES}


def encode(opname, node_id, values, check=True) -> list:
    """One whole instruction (header + fields) of opcode ``opname``.  check=False: the generated fast
    encoder (no count checks; for a caller whose output is validated afterwards, as the compiler's)."""
    fields = LAYOUTS[opname].encode(values) if check else LAYOUTS[opname].encode_fast(values)
    return [OP_CODE[opname], HEADER + len(fields), int(node_id)] + fields


def decode(code, pc):
    """(opcode name, node id, fields dict) of the instruction at ``pc`` of a well-formed code list."""
    op, ln, node = code[pc], code[pc + 1], code[pc + 2]
    name = OP_NAMES[op]
    d, _ = LAYOUTS[name].decode(code, pc + HEADER, pc + ln)
    return name, node, d


def locate(code, pc):
    """(opcode name, {field: index in code}) of the instruction at ``pc``: where each field lives, for
    tools and tests that edit one field of a plan by name."""
    code = code.tolist() if hasattr(code, "tolist") else list(code)
    name = OP_NAMES[code[pc]]
    d, _ = LAYOUTS[name].decode(code, pc + HEADER, pc + code[pc + 1], positions=True)
    return name, d


def instructions(code):
    """[(pc, opcode name, node id, fields dict)] of a well-formed (validated) code array or list."""
    code = code.tolist() if hasattr(code, "tolist") else list(code)
    out, pc = [], 0
    while pc < len(code):
        name, node, d = decode(code, pc)
        out.append((pc, name, node, d))
        pc += code[pc + 1]
    return out


def table_lines():
    """Every fact of the format as text lines ``kind name value``: the build embeds them in the module,
    and ``check_build`` compares the two."""
    lines = [f"version {MAJOR}.{MINOR}", f"header {HEADER}", f"vm_width {VM_WIDTH}", f"align {ALIGN}"]
    lines += [f"opcode {name} {code} {' '.join(text.split())}" for code, name, text in OPCODES]
    lines += [f"vm {name} {code} {arity} {mask or '-'} {expr}" for code, name, arity, expr, mask in VM]
    lines += [f"limit {k} {v}" for k, v in LIMITS.items()]
    lines += [f"dtype {d} {i} {ITEMSIZE[i]}" for i, d in enumerate(DTYPES)]
    lines += [f"slot {k} {v}" for k, v in SLOTS.items()]
    lines += [f"error {k} {v}" for k, v in ERRORS.items()]
    return lines


class FormatMismatch(ImportError):
    """The compiled runtime was built from a different format table than this format.py."""


def check_build(built_text, lines=None):
    """Raise FormatMismatch naming the first entry where the table compiled into the runtime
    (``built_text``, from ``_exec.format_table()``) and this module's table differ."""
    want = table_lines() if lines is None else lines
    got = built_text.split("\n") if built_text else []
    if got == want:
        return
    key = lambda ln: " ".join(ln.split(" ")[:2])  # noqa: E731  (kind name)
    gmap, wmap = {key(x): x for x in got}, {key(x): x for x in want}
    for k in list(wmap) + list(gmap):
        if gmap.get(k) != wmap.get(k):
            raise FormatMismatch(
                f"libml_runtime: the compiled module was built from a different plan format table: entry "
                f"{k!r} is {gmap.get(k, '(absent)')!r} in the build and {wmap.get(k, '(absent)')!r} in "
                f"format.py.  Rebuild the runtime (pip install .) so that both agree.")
    raise FormatMismatch("libml_runtime: the compiled format table lists the same entries in another order; "
                         "rebuild the runtime (pip install .)")


def _self_check():
    codes = [c for c, _, _ in OPCODES]
    vcodes = [c for c, _, _, _, _ in VM]
    for what, cs in (("opcode", codes), ("VM opcode", vcodes)):
        if len(set(cs)) != len(cs):
            raise ValueError(f"format: a {what} code is used twice")
    for code, name, arity, expr, mask in VM:
        if arity not in (1, 2, 3) or (mask and {"b": 2, "c": 3}[mask] > arity):
            raise ValueError(f"format: VM opcode {name}: bad arity {arity} or mask operand {mask!r}")
        used = set(re.findall(r"\b[xyz]\b", expr))  # noqa: W605
        if not used <= set("xyz"[:arity]):
            raise ValueError(f"format: VM opcode {name} reads {sorted(used)} beyond its arity {arity}")

    # the kernels read an operand as (slot, offset) from one pointer (_exec.pyx's _ptr): adjacent fields
    for L in LAYOUTS.values():
        for fields in [L.fields] + [sub for _, _, sub in L.fields if sub]:
            names = [f for f, _, _ in fields]
            for k, f in enumerate(names):
                if f == "slot" or f.endswith(".slot"):
                    want = f[:-4] + "offset"
                    if k + 1 >= len(names) or names[k + 1] != want:
                        raise ValueError(f"format: {L.name}: {f} must be followed by {want}")
    # log_softmax runs softmax's driver, which reads softmax's field offsets
    if LAYOUTS["log_softmax"].text != LAYOUTS["softmax"].text:
        raise ValueError("format: log_softmax must have softmax's layout")
    # gemm_ex runs gemm's kernel, which reads gemm's field offsets
    if not LAYOUTS["gemm_ex"].text.startswith(LAYOUTS["gemm"].text):
        raise ValueError("format: gemm_ex must start with gemm's layout")
    if not LAYOUTS["gemm_ex_keep"].text.startswith(LAYOUTS["gemm_ex"].text):
        raise ValueError("format: gemm_ex_keep must start with gemm_ex's layout")
    if not LAYOUTS["gemm_strided"].text.startswith(LAYOUTS["gemm"].text):
        raise ValueError("format: gemm_strided must start with gemm's layout")
    # the convolution drivers read the geometry of all three opcodes at conv's field offsets
    if not LAYOUTS["conv_shortcut"].text.startswith(LAYOUTS["conv"].text):
        raise ValueError("format: conv_shortcut must start with conv's layout")
    for nm in ("conv_grad_input", "conv_grad_weight"):
        if not LAYOUTS[nm].text.startswith(_CONV_GEOM):
            raise ValueError(f"format: {nm} must start with the convolution geometry")
    for nm in ("max_pool_grad", "avg_pool", "avg_pool_grad"):
        if not LAYOUTS[nm].text.startswith(_POOL_GEOM):
            raise ValueError(f"format: {nm} must start with the pooling geometry")
    if not LAYOUTS["resize_grad"].text.startswith(_RESIZE_GEOM):
        raise ValueError("format: resize_grad must start with the resize geometry")
    # adam_apply runs adam_update's kernel with adam_update's field offsets
    if LAYOUTS["adam_apply"].text != LAYOUTS["adam_update"].text:
        raise ValueError("format: adam_apply must have adam_update's layout")


_self_check()
