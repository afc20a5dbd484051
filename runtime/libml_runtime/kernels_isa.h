/* Run-time ISA dispatch of the hot kernels (included once, by kernels.h, after the baseline copies).
 *
 * Why: a module built with -march=native dies with SIGILL on an older CPU.  The translation unit is
 * compiled for baseline x86-64 (setup.py) and the template is compiled again for AVX2 and AVX-512 inside
 * `#pragma GCC target` regions.  The regions name ISA features, not `arch=`: GCC inlines a default-target
 * helper (lm_dot, lm_load_as_i64, ...) only into a caller of the same arch, and they sit on the per-block
 * path.  "avx2" is x86-64-v3's feature set (AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE); "avx512" adds
 * x86-64-v4's AVX512F/BW/CD/DQ/VL.  Both prefer 256-bit vectors, as GCC's tuning for the AVX-512 cores
 * does under -march=native (measured there: no zmm in the native build, and 512-bit EW blocks were not
 * faster -- see setup.py).  `omp declare simd` exp/log still call libmvec inside each region: the AVX2
 * variants _ZGVdN8v_expf/_ZGVdN4v_exp (with 256-bit vectors, also in the avx512 copy).
 *
 * lm_isa_init(name) picks the table once: "" or "auto" = the best the CPU supports
 * (__builtin_cpu_supports), or exactly "baseline" / "avx2" / "avx512"; returns 0, -1 for an unknown name,
 * -2 if the CPU lacks the ISA.  lm_isa_name() is the ISA in use ("native" for an LM_NO_DISPATCH build). */
#ifndef LIBML_KERNELS_ISA_H
#define LIBML_KERNELS_ISA_H

#if !defined(LM_NO_DISPATCH) && defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LM_DISPATCH 1
#endif

/* X(name, float-type-suffix): every template kernel _exec.pyx calls */
#define LM_DISPATCHED_T(X, S)                                                                         \
    X(lm_ew_span, S) X(lm_ew_row_store, S) X(lm_ew_combine, S) X(lm_softmax_outer, S) X(lm_xent, S)  \
    X(lm_xent_grad_row, S) X(lm_gemv_rows, S) X(lm_epilogue_row, S) X(lm_mask_row, S) X(lm_vm_epilogue_row, S) X(lm_sgd, S)    \
    X(lm_adam, S) X(lm_nonfinite, S) X(lm_reduce_cols, S) X(lm_arg_reduce_cols, S) X(lm_log_softmax_outer, S) \
    X(lm_layer_norm_row, S) X(lm_layer_norm_grad_row, S) X(lm_layer_norm_grad_cols, S) X(lm_dropout, S)    \
    X(lm_batch_norm_channel, S) X(lm_batch_norm_grad_channel, S)  \
    X(lm_conv_tile, S) X(lm_conv_dw_tile, S) X(lm_conv_build, S) \
    X(lm_conv_ocv, S) X(lm_conv_build_pad, S) X(lm_conv_ocv_unpack, S) X(lm_gemm_own, S)
#define LM_DISPATCHED(X) LM_DISPATCHED_T(X, f32) LM_DISPATCHED_T(X, f64)

#ifdef LM_DISPATCH

/* the template once more per (ISA, float type): LM_SFX appends the ISA suffix */
#pragma GCC push_options
#pragma GCC target("avx,avx2,bmi,bmi2,f16c,fma,lzcnt,movbe,xsave,prefer-vector-width=256")
#define LM_SFX_F32(name) name##_f32_avx2
#define LM_SFX_F64(name) name##_f64_avx2
#include "kernels_inst.h"
#undef LM_SFX_F32
#undef LM_SFX_F64
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx,avx2,bmi,bmi2,f16c,fma,lzcnt,movbe,xsave,avx512f,avx512bw,avx512cd,avx512dq,avx512vl,prefer-vector-width=256")
#define LM_SFX_F32(name) name##_f32_avx512
#define LM_SFX_F64(name) name##_f64_avx512
#define LM_MV_WIDE 1
#include "kernels_inst.h"
#undef LM_MV_WIDE
#undef LM_SFX_F32
#undef LM_SFX_F64
#pragma GCC pop_options

/* the table: one pointer per dispatched kernel, typed after its baseline copy */
#define LM_ISA_FIELD(f, S) __typeof__(&f##_##S) f##_##S;
typedef struct { const char *name; LM_DISPATCHED(LM_ISA_FIELD) } lm_isa_table;
#undef LM_ISA_FIELD
#define LM_ISA_INIT(f, S) f##_##S,
static const lm_isa_table lm_isa_baseline = {"baseline", LM_DISPATCHED(LM_ISA_INIT)};
/* baseline until lm_isa_init runs, so a call before it is still valid on every x86-64 CPU */
static lm_isa_table lm_isa = {"baseline", LM_DISPATCHED(LM_ISA_INIT)};
#undef LM_ISA_INIT
#define LM_ISA_INIT(f, S) f##_##S##_avx2,
static const lm_isa_table lm_isa_avx2 = {"avx2", LM_DISPATCHED(LM_ISA_INIT)};
#undef LM_ISA_INIT
#define LM_ISA_INIT(f, S) f##_##S##_avx512,
static const lm_isa_table lm_isa_avx512 = {"avx512", LM_DISPATCHED(LM_ISA_INIT)};
#undef LM_ISA_INIT


static int lm_cpu_has_avx2(void)
{
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi")
        && __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("movbe")
        && __builtin_cpu_supports("lzcnt");
}

static int lm_cpu_has_avx512(void)
{
    return lm_cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq")
        && __builtin_cpu_supports("avx512vl");
}

static int lm_isa_init(const char *name)
{
    const lm_isa_table *t;
    __builtin_cpu_init();
    if (name == NULL || name[0] == 0 || strcmp(name, "auto") == 0)
        t = lm_cpu_has_avx512() ? &lm_isa_avx512 : lm_cpu_has_avx2() ? &lm_isa_avx2 : &lm_isa_baseline;
    else if (strcmp(name, "baseline") == 0) t = &lm_isa_baseline;
    else if (strcmp(name, "avx2") == 0) { if (!lm_cpu_has_avx2()) return -2; t = &lm_isa_avx2; }
    else if (strcmp(name, "avx512") == 0) { if (!lm_cpu_has_avx512()) return -2; t = &lm_isa_avx512; }
    else return -1;
    lm_isa = *t;
    return 0;
}

static const char *lm_isa_name(void) { return lm_isa.name; }

/* from here on the plain names used by _exec.pyx are the table's entries */
#define lm_ew_span_f32 (lm_isa.lm_ew_span_f32)
#define lm_ew_span_f64 (lm_isa.lm_ew_span_f64)
#define lm_ew_row_store_f32 (lm_isa.lm_ew_row_store_f32)
#define lm_ew_row_store_f64 (lm_isa.lm_ew_row_store_f64)
#define lm_ew_combine_f32 (lm_isa.lm_ew_combine_f32)
#define lm_ew_combine_f64 (lm_isa.lm_ew_combine_f64)
#define lm_softmax_outer_f32 (lm_isa.lm_softmax_outer_f32)
#define lm_softmax_outer_f64 (lm_isa.lm_softmax_outer_f64)
#define lm_xent_f32 (lm_isa.lm_xent_f32)
#define lm_xent_f64 (lm_isa.lm_xent_f64)
#define lm_xent_grad_row_f32 (lm_isa.lm_xent_grad_row_f32)
#define lm_xent_grad_row_f64 (lm_isa.lm_xent_grad_row_f64)
#define lm_gemv_rows_f32 (lm_isa.lm_gemv_rows_f32)
#define lm_gemv_rows_f64 (lm_isa.lm_gemv_rows_f64)
#define lm_epilogue_row_f32 (lm_isa.lm_epilogue_row_f32)
#define lm_epilogue_row_f64 (lm_isa.lm_epilogue_row_f64)
#define lm_mask_row_f32 (lm_isa.lm_mask_row_f32)
#define lm_mask_row_f64 (lm_isa.lm_mask_row_f64)
#define lm_vm_epilogue_row_f32 (lm_isa.lm_vm_epilogue_row_f32)
#define lm_vm_epilogue_row_f64 (lm_isa.lm_vm_epilogue_row_f64)
#define lm_sgd_f32 (lm_isa.lm_sgd_f32)
#define lm_sgd_f64 (lm_isa.lm_sgd_f64)
#define lm_adam_f32 (lm_isa.lm_adam_f32)
#define lm_adam_f64 (lm_isa.lm_adam_f64)
#define lm_nonfinite_f32 (lm_isa.lm_nonfinite_f32)
#define lm_nonfinite_f64 (lm_isa.lm_nonfinite_f64)
#define lm_reduce_cols_f32 (lm_isa.lm_reduce_cols_f32)
#define lm_reduce_cols_f64 (lm_isa.lm_reduce_cols_f64)
#define lm_arg_reduce_cols_f32 (lm_isa.lm_arg_reduce_cols_f32)
#define lm_arg_reduce_cols_f64 (lm_isa.lm_arg_reduce_cols_f64)
#define lm_log_softmax_outer_f32 (lm_isa.lm_log_softmax_outer_f32)
#define lm_log_softmax_outer_f64 (lm_isa.lm_log_softmax_outer_f64)
#define lm_layer_norm_row_f32 (lm_isa.lm_layer_norm_row_f32)
#define lm_layer_norm_row_f64 (lm_isa.lm_layer_norm_row_f64)
#define lm_layer_norm_grad_row_f32 (lm_isa.lm_layer_norm_grad_row_f32)
#define lm_layer_norm_grad_row_f64 (lm_isa.lm_layer_norm_grad_row_f64)
#define lm_layer_norm_grad_cols_f32 (lm_isa.lm_layer_norm_grad_cols_f32)
#define lm_layer_norm_grad_cols_f64 (lm_isa.lm_layer_norm_grad_cols_f64)
#define lm_dropout_f32 (lm_isa.lm_dropout_f32)
#define lm_dropout_f64 (lm_isa.lm_dropout_f64)
#define lm_batch_norm_channel_f32 (lm_isa.lm_batch_norm_channel_f32)
#define lm_batch_norm_channel_f64 (lm_isa.lm_batch_norm_channel_f64)
#define lm_batch_norm_grad_channel_f32 (lm_isa.lm_batch_norm_grad_channel_f32)
#define lm_batch_norm_grad_channel_f64 (lm_isa.lm_batch_norm_grad_channel_f64)
#define lm_conv_tile_f32 (lm_isa.lm_conv_tile_f32)
#define lm_conv_tile_f64 (lm_isa.lm_conv_tile_f64)
#define lm_conv_dw_tile_f32 (lm_isa.lm_conv_dw_tile_f32)
#define lm_conv_dw_tile_f64 (lm_isa.lm_conv_dw_tile_f64)
#define lm_conv_build_f32 (lm_isa.lm_conv_build_f32)
#define lm_conv_build_f64 (lm_isa.lm_conv_build_f64)
#define lm_conv_ocv_f32 (lm_isa.lm_conv_ocv_f32)
#define lm_conv_ocv_f64 (lm_isa.lm_conv_ocv_f64)
#define lm_conv_build_pad_f32 (lm_isa.lm_conv_build_pad_f32)
#define lm_conv_build_pad_f64 (lm_isa.lm_conv_build_pad_f64)
#define lm_conv_ocv_unpack_f32 (lm_isa.lm_conv_ocv_unpack_f32)
#define lm_conv_ocv_unpack_f64 (lm_isa.lm_conv_ocv_unpack_f64)
#define lm_gemm_own_f32 (lm_isa.lm_gemm_own_f32)
#define lm_gemm_own_f64 (lm_isa.lm_gemm_own_f64)

#else  /* no dispatch: the one copy, compiled for whatever -march the build chose */

static int lm_isa_init(const char *name)
{
    if (name == NULL || name[0] == 0 || strcmp(name, "auto") == 0 || strcmp(name, "native") == 0) return 0;
    if (strcmp(name, "baseline") == 0 || strcmp(name, "avx2") == 0 || strcmp(name, "avx512") == 0) return -3;
    return -1;
}

static const char *lm_isa_name(void) { return "native"; }

#endif
#endif
