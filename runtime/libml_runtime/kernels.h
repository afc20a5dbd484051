/* libml runtime kernels: the per-block inner loops, in C so that GCC vectorises them.
 *
 * Why C and not Cython loops: GCC cannot prove that Cython's pointer loops do not alias, so they stay
 * scalar (measured: 42 ms vs 2.5 ms for the fused W4 step).  Here every inner loop takes `restrict`
 * pointers and carries `#pragma omp simd`.  The parallel loops (prange) and the instruction dispatch
 * live in _exec.pyx; these functions are called from inside them, one block at a time.
 *
 * exp/log are re-declared `omp declare simd` so that GCC calls glibc's vector variants (libmvec,
 * linked by setup.py) without -ffast-math, keeping NaN/Inf semantics.
 */
#ifndef LIBML_KERNELS_H
#define LIBML_KERNELS_H

#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stdlib.h>

#if defined(__GNUC__) && defined(_OPENMP) && defined(__linux__) && defined(__x86_64__)
#pragma omp declare simd notinbranch
extern float expf(float);
#pragma omp declare simd notinbranch
extern double exp(double);
#pragma omp declare simd notinbranch
extern float logf(float);
#pragma omp declare simd notinbranch
extern double log(double);
#endif

#define LM_BLK 128          /* elements per VM block: registers stay in L1/L2 */
#define LM_MAXD 8           /* max dims of an elementwise iteration space (after collapsing) */
#define LM_MAXIO 32         /* max inputs / outputs of one fused group */
#define LM_MAXREG 64        /* max registers of one fused group */
#define LM_MAXCHUNK 16      /* fixed chunk count for reductions: results do not depend on threads */

/* VM opcodes (keep in sync with libml_compile/lower.py VM_OPS) */
enum { VM_COPY = 0, VM_ADD, VM_SUB, VM_MUL, VM_DIV, VM_RSUB, VM_RDIV, VM_NEG, VM_RELU, VM_SIGMOID,
       VM_EXP, VM_LOG, VM_STEP, VM_FMA, VM_FMS, VM_FNMA, VM_MULSUB, VM_MASK, VM_ADDRELU, VM_SUBRELU,
       VM_MULMASK, VM_DIVMASK, VM_NOPS };
#define LM_VMW 5  /* int64s per program step: op dst a b c */

/* A decoded EW (fused elementwise / reduction) instruction.  Field layout in the int64 code array:
 *   dtype ndim dims[ndim] n_in n_out n_regs n_prog mode nchunks scratch_slot scratch_off
 *   inputs  x n_in : slot off strides[ndim]
 *   outputs x n_out: slot off strides[ndim] reg is_reduce scale_const
 *   program x n_prog: op dst a b c      (b, c < 0: the constant consts[-v-1]; see format.py)
 * mode 0: no reductions; 1: reductions along the innermost dim only (rows independent);
 * 2: general reductions into per-chunk partial sums in scratch, combined in fixed chunk order. */
typedef struct {
    int64_t dtype, ndim, n_in, n_out, n_regs, n_prog, mode, nchunks, scratch_slot, scratch_off;
    int64_t dims[LM_MAXD];
    const int64_t *in, *out, *prog;
    int64_t rows, inner, nblk, items;
    int64_t red_numel[LM_MAXIO], red_off[LM_MAXIO], red_total;  /* reduce outputs: partial layout */
} lm_ew;

/* Decode; returns 0 or a negative error.  `n` is the number of int64 fields available. */
static int lm_ew_decode(const int64_t *c, int64_t n, lm_ew *e)
{
    int64_t p = 0, i, d;
    if (n < 2) return -1;
    e->dtype = c[p++]; e->ndim = c[p++];
    if (e->ndim < 1 || e->ndim > LM_MAXD || p + e->ndim + 8 > n) return -1;
    for (d = 0; d < e->ndim; d++) { e->dims[d] = c[p++]; if (e->dims[d] < 0) return -1; }
    e->n_in = c[p++]; e->n_out = c[p++]; e->n_regs = c[p++]; e->n_prog = c[p++];
    e->mode = c[p++]; e->nchunks = c[p++]; e->scratch_slot = c[p++]; e->scratch_off = c[p++];
    if (e->n_in < 0 || e->n_in > LM_MAXIO || e->n_out < 1 || e->n_out > LM_MAXIO) return -1;
    if (e->n_regs < e->n_in || e->n_regs > LM_MAXREG || e->n_prog < 0 || e->mode < 0 || e->mode > 2) return -1;
    if (e->nchunks < 1 || e->nchunks > LM_MAXCHUNK) return -1;
    if (p + e->n_in * (2 + e->ndim) + e->n_out * (5 + e->ndim) + e->n_prog * LM_VMW > n) return -1;
    e->in = c + p; p += e->n_in * (2 + e->ndim);
    e->out = c + p; p += e->n_out * (5 + e->ndim);
    e->prog = c + p;
    e->inner = e->dims[e->ndim - 1];
    e->rows = 1;
    for (d = 0; d < e->ndim - 1; d++) e->rows *= e->dims[d];
    e->nblk = (e->inner + LM_BLK - 1) / LM_BLK;
    e->items = e->rows * e->nblk;
    e->red_total = 0;
    for (i = 0; i < e->n_out; i++) {
        const int64_t *o = e->out + i * (5 + e->ndim);
        e->red_numel[i] = 0; e->red_off[i] = e->red_total;
        if (o[2 + e->ndim + 1]) {  /* reduce output: numel = product of dims with non-zero stride */
            int64_t m = 1;
            for (d = 0; d < e->ndim; d++) if (o[2 + d] != 0) m *= e->dims[d];
            e->red_numel[i] = m; e->red_total += m;
        }
    }
    return 0;
}

/* element offset of the first element of `row` (row-major over dims[0..ndim-2]) for strides s */
static inline int64_t lm_row_offset(const lm_ew *e, int64_t row, const int64_t *s)
{
    int64_t off = 0, d;
    for (d = e->ndim - 2; d >= 0; d--) {
        int64_t q = row / e->dims[d];
        off += (row - q * e->dims[d]) * s[d];
        row = q;
    }
    return off;
}

/* dtype codes (keep in sync with format.py) */
enum { DT_F32 = 0, DT_F64, DT_I8, DT_I16, DT_I32, DT_I64, DT_U8, DT_U16, DT_U32, DT_U64, DT_NTYPES };
static const int64_t lm_itemsize[DT_NTYPES] = {4, 8, 1, 2, 4, 8, 1, 2, 4, 8};

static inline double lm_load_as_f64(int64_t dt, const char *p, int64_t i)
{
    switch (dt) {
    case DT_F32: return ((const float *)p)[i];
    case DT_F64: return ((const double *)p)[i];
    case DT_I8: return ((const int8_t *)p)[i];
    case DT_I16: return ((const int16_t *)p)[i];
    case DT_I32: return ((const int32_t *)p)[i];
    case DT_I64: return (double)((const int64_t *)p)[i];
    case DT_U8: return ((const uint8_t *)p)[i];
    case DT_U16: return ((const uint16_t *)p)[i];
    case DT_U32: return ((const uint32_t *)p)[i];
    case DT_U64: return (double)((const uint64_t *)p)[i];
    }
    return 0;
}

static inline int64_t lm_load_as_i64(int64_t dt, const char *p, int64_t i)
{
    switch (dt) {
    case DT_I8: return ((const int8_t *)p)[i];
    case DT_I16: return ((const int16_t *)p)[i];
    case DT_I32: return ((const int32_t *)p)[i];
    case DT_I64: return ((const int64_t *)p)[i];
    case DT_U8: return ((const uint8_t *)p)[i];
    case DT_U16: return ((const uint16_t *)p)[i];
    case DT_U32: return ((const uint32_t *)p)[i];
    case DT_U64: return (int64_t)((const uint64_t *)p)[i];
    }
    return 0;
}

static inline void lm_unravel_row(const lm_ew *e, int64_t row, int64_t *idx)
{
    int64_t d;
    for (d = e->ndim - 2; d >= 0; d--) {
        int64_t q = row / e->dims[d];
        idx[d] = row - q * e->dims[d];
        row = q;
    }
}

static inline int64_t lm_dot(int64_t n, const int64_t *idx, const int64_t *s)
{
    int64_t off = 0, d;
    for (d = 0; d < n; d++) off += idx[d] * s[d];
    return off;
}

/* ---- the type-generic kernels, once per float type and (dispatching builds) once per ISA ----
 *
 * Portable builds (the default, see setup.py) compile this translation unit for baseline x86-64 and
 * compile the hot kernels of kernels_tmpl.h three times inside `#pragma GCC target` regions:
 * baseline (SSE2), "avx2" (arch=x86-64-v3: AVX2+FMA) and "avx512" (arch=x86-64-v4).  The baseline copy
 * keeps the plain names (lm_ew_block_f32, ...); the others get a suffix (lm_ew_block_f32_avx2).  The names
 * in LM_DISPATCHED are then #defined to entries of the table `lm_isa`, which lm_isa_init() fills once at
 * import from the CPU's features (or LIBML_ISA), so every call from _exec.pyx goes through one indirect
 * call per block/row -- the template functions are never inlined into Cython code anyway.  A kernel
 * added to the template but not to LM_DISPATCHED still works: it runs the baseline copy.
 * With LM_NO_DISPATCH (LIBML_MARCH=native or any explicit -march) only the plain copy is compiled. */
#define LM_T float
#define LM_SFX(name) name##_f32
#define LM_EXP expf
#define LM_LOG logf
#define LM_SQRT sqrtf
#include "kernels_tmpl.h"
#undef LM_T
#undef LM_SFX
#undef LM_EXP
#undef LM_LOG
#undef LM_SQRT

#define LM_T double
#define LM_SFX(name) name##_f64
#define LM_EXP exp
#define LM_LOG log
#define LM_SQRT sqrt
#include "kernels_tmpl.h"
#undef LM_T
#undef LM_SFX
#undef LM_EXP
#undef LM_LOG
#undef LM_SQRT

#include "kernels_isa.h"

/* ---- integer elementwise (forward only; ONNX/NumPy semantics: wrap-around, division truncates) ----
 * + - * are done in uint64_t: signed overflow is undefined behaviour in C (and uint16 * uint16 promotes
 * to int, which overflows), unsigned arithmetic wraps, and its low bits converted back are the
 * two's-complement result NumPy gives.
 * Division by -1 is a (wrapping) negation: MIN / -1 traps (SIGFPE) on x86 for 32 and 64 bits, and its
 * wrapped result, MIN, is what NumPy returns. */

#define LM_INT_BINARY(T, NAME)                                                                     \
static int NAME(int64_t op, int64_t n, const T *a, int64_t sa, const T *b, int64_t sb, T *o)         \
{                                                                                                     \
    int64_t i;                                                                                        \
    switch (op) {                                                                                     \
    case VM_ADD: for (i = 0; i < n; i++) o[i] = (T)((uint64_t)a[i * sa] + (uint64_t)b[i * sb]); break;              \
    case VM_SUB: for (i = 0; i < n; i++) o[i] = (T)((uint64_t)a[i * sa] - (uint64_t)b[i * sb]); break;              \
    case VM_MUL: for (i = 0; i < n; i++) o[i] = (T)((uint64_t)a[i * sa] * (uint64_t)b[i * sb]); break;              \
    case VM_DIV:                                                                                      \
        for (i = 0; i < n; i++) {                                                                     \
            T y = b[i * sb];                                                                          \
            if (y == 0) return -3;                                                                    \
            o[i] = ((T)-1 < 0 && y == (T)-1) ? (T)((uint64_t)0 - (uint64_t)a[i * sa]) : (T)(a[i * sa] / y);         \
        }                                                                                             \
        break;                                                                                        \
    default: return -1;                                                                               \
    }                                                                                                 \
    return 0;                                                                                         \
}
LM_INT_BINARY(int8_t, lm_ibin_i8)
LM_INT_BINARY(int16_t, lm_ibin_i16)
LM_INT_BINARY(int32_t, lm_ibin_i32)
LM_INT_BINARY(int64_t, lm_ibin_i64)
LM_INT_BINARY(uint8_t, lm_ibin_u8)
LM_INT_BINARY(uint16_t, lm_ibin_u16)
LM_INT_BINARY(uint32_t, lm_ibin_u32)
LM_INT_BINARY(uint64_t, lm_ibin_u64)

enum { LM_DT_I64 = DT_I64 };  /* for the Cython side */

/* one row of an integer binary op; returns 0, -1 bad op/dtype, -3 division by zero */
static int lm_int_binary_row(int64_t dt, int64_t op, int64_t n, const char *a, int64_t sa,
                             const char *b, int64_t sb, char *o)
{
    switch (dt) {
    case DT_I8: return lm_ibin_i8(op, n, (const int8_t *)a, sa, (const int8_t *)b, sb, (int8_t *)o);
    case DT_I16: return lm_ibin_i16(op, n, (const int16_t *)a, sa, (const int16_t *)b, sb, (int16_t *)o);
    case DT_I32: return lm_ibin_i32(op, n, (const int32_t *)a, sa, (const int32_t *)b, sb, (int32_t *)o);
    case DT_I64: return lm_ibin_i64(op, n, (const int64_t *)a, sa, (const int64_t *)b, sb, (int64_t *)o);
    case DT_U8: return lm_ibin_u8(op, n, (const uint8_t *)a, sa, (const uint8_t *)b, sb, (uint8_t *)o);
    case DT_U16: return lm_ibin_u16(op, n, (const uint16_t *)a, sa, (const uint16_t *)b, sb, (uint16_t *)o);
    case DT_U32: return lm_ibin_u32(op, n, (const uint32_t *)a, sa, (const uint32_t *)b, sb, (uint32_t *)o);
    case DT_U64: return lm_ibin_u64(op, n, (const uint64_t *)a, sa, (const uint64_t *)b, sb, (uint64_t *)o);
    }
    return -1;
}

/* ---- casts between any two supported dtypes (contiguous) ---- */
static int lm_cast(int64_t sdt, int64_t ddt, int64_t n, const char *src, char *dst)
{
    int64_t i;
    int sfloat = sdt == DT_F32 || sdt == DT_F64;
    for (i = 0; i < n; i++) {
        if (ddt == DT_F32) ((float *)dst)[i] = (float)lm_load_as_f64(sdt, src, i);
        else if (ddt == DT_F64) ((double *)dst)[i] = lm_load_as_f64(sdt, src, i);
        else {
            /* float -> int truncates toward zero (C cast semantics, as numpy astype); NaN/out of range
               values are undefined in C, so they are clamped to 0 here rather than left to the hardware */
            int64_t v;
            if (sfloat) {
                double x = lm_load_as_f64(sdt, src, i);
                v = (x == x && x > -9.2e18 && x < 9.2e18) ? (int64_t)x : 0;
            } else v = lm_load_as_i64(sdt, src, i);
            switch (ddt) {
            case DT_I8: ((int8_t *)dst)[i] = (int8_t)v; break;
            case DT_I16: ((int16_t *)dst)[i] = (int16_t)v; break;
            case DT_I32: ((int32_t *)dst)[i] = (int32_t)v; break;
            case DT_I64: ((int64_t *)dst)[i] = v; break;
            case DT_U8: ((uint8_t *)dst)[i] = (uint8_t)v; break;
            case DT_U16: ((uint16_t *)dst)[i] = (uint16_t)v; break;
            case DT_U32: ((uint32_t *)dst)[i] = (uint32_t)v; break;
            case DT_U64: ((uint64_t *)dst)[i] = (uint64_t)v; break;
            default: return -1;
            }
        }
    }
    return 0;
}

/* strided copy of one row of `n` items of `isz` bytes (transpose, broadcast_to for any dtype) */
static inline void lm_copy_row(int64_t isz, int64_t n, const char *src, int64_t s, char *dst)
{
    int64_t i;
    if (s == 1) { memcpy(dst, src, (size_t)(n * isz)); return; }
    switch (isz) {
    case 1: for (i = 0; i < n; i++) dst[i] = src[i * s]; break;
    case 2: for (i = 0; i < n; i++) ((int16_t *)dst)[i] = ((const int16_t *)src)[i * s]; break;
    case 4: for (i = 0; i < n; i++) ((int32_t *)dst)[i] = ((const int32_t *)src)[i * s]; break;
    case 8: for (i = 0; i < n; i++) ((int64_t *)dst)[i] = ((const int64_t *)src)[i * s]; break;
    }
}

/* n items of isz bytes from src (element stride s) to dst (element stride ds): copy_nd's rows */
static inline void lm_copy_row2(int64_t isz, int64_t n, const char *src, int64_t s, char *dst, int64_t ds)
{
    int64_t i;
    if (ds == 1) { lm_copy_row(isz, n, src, s, dst); return; }
    switch (isz) {
    case 1: for (i = 0; i < n; i++) dst[i * ds] = src[i * s]; break;
    case 2: for (i = 0; i < n; i++) ((int16_t *)dst)[i * ds] = ((const int16_t *)src)[i * s]; break;
    case 4: for (i = 0; i < n; i++) ((int32_t *)dst)[i * ds] = ((const int32_t *)src)[i * s]; break;
    case 8: for (i = 0; i < n; i++) ((int64_t *)dst)[i * ds] = ((const int64_t *)src)[i * s]; break;
    }
}

/* label range check for softmax cross-entropy: returns index of the first bad label or -1 */
/* Copy B labels of dtype dt into out (int64), reading each once, and check them there: the kernels then
 * index with the copy only, so another thread rewriting the fed array mid-step cannot make them read
 * or write out of bounds.  Returns the first bad row or -1. */
static int64_t lm_copy_labels(int64_t dt, const char *lab, int64_t B, int64_t C, int64_t *out)
{
    int64_t i;
    for (i = 0; i < B; i++) {
        int64_t y = lm_load_as_i64(dt, lab, i);
        if (dt == DT_U64 && (uint64_t)y > (uint64_t)INT64_MAX) return i;
        if (y < 0 || y >= C) return i;
        out[i] = y;
    }
    return -1;
}

static int64_t lm_bad_label(int64_t dt, const char *lab, int64_t B, int64_t C)
{
    int64_t i;
    for (i = 0; i < B; i++) {
        int64_t y = lm_load_as_i64(dt, lab, i);
        if (dt == DT_U64 && (uint64_t)((const uint64_t *)lab)[i] > (uint64_t)INT64_MAX) return i;
        if (y < 0 || y >= C) return i;
    }
    return -1;
}

#endif
