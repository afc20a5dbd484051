/* libml runtime kernels: the per-block inner loops, in C so that GCC vectorises them.
 *
 * Why C and not Cython loops: GCC cannot prove that Cython's pointer loops do not alias, so they stay
 * scalar (measured: 42 ms vs 2.5 ms for the fused W4 step).  Here every inner loop takes `restrict`
 * pointers and carries `#pragma omp simd`.  The parallel loops (prange) and the instruction dispatch
 * live in _exec.pyx; these functions are called from inside them, one block at a time.
 *
 * The math functions the VM calls are re-declared `omp declare simd` (format_gen.h) so that GCC calls
 * glibc's vector variants (libmvec, linked by setup.py) without -ffast-math, keeping NaN/Inf semantics.
 */
#ifndef LIBML_KERNELS_H
#define LIBML_KERNELS_H

#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stdlib.h>

/* opcodes, VM opcodes, limits, dtype codes, error codes, field offsets and the libmvec declarations:
 * generated from format.py (format_codegen.py, run by setup.py) */
#include "format_gen.h"

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
    int64_t in_w, out_w, out_reg, out_red, out_scale;  /* record widths and in-record field offsets */
    int64_t rows, inner, nblk, items;
    int64_t red_numel[LM_MAXIO], red_off[LM_MAXIO], red_total;  /* reduce outputs: partial layout */
} lm_ew;

/* a VM-step GEMM epilogue (lm_vm_epilogue_row): VM opcode, operands b and c (0 unused, 1 the auxiliary
 * row, < 0 an immediate) and the immediates' values */
typedef struct { int64_t vm, b, c; double bv, cv; } lm_epi;

/* the kernels address a record's operand as d[0], d[1] with strides at d + 2 (inputs and outputs alike) and
 * a program step as p[0..4] = op dst a b c: a layout edit in format.py that moves them fails here */
_Static_assert(LM_R_FUSED_ELEMENTWISE_input_slot(0) == 0 && LM_R_FUSED_ELEMENTWISE_input_offset(0) == 1
               && LM_R_FUSED_ELEMENTWISE_input_stride(0) == 2 && LM_R_FUSED_ELEMENTWISE_output_slot(0) == 0
               && LM_R_FUSED_ELEMENTWISE_output_offset(0) == 1 && LM_R_FUSED_ELEMENTWISE_output_stride(0) == 2,
               "format.py: fused_elementwise records must start with slot offset stride[ndim]");
_Static_assert(LM_R_FUSED_ELEMENTWISE_prog_op(0) == 0 && LM_R_FUSED_ELEMENTWISE_prog_dst(0) == 1
               && LM_R_FUSED_ELEMENTWISE_prog_a(0) == 2 && LM_R_FUSED_ELEMENTWISE_prog_b(0) == 3
               && LM_R_FUSED_ELEMENTWISE_prog_c(0) == 4 && LM_W_FUSED_ELEMENTWISE_prog(0) == LM_VMW,
               "format.py: a VM program step must be op dst a b c");

/* Decode; returns 0 or a negative error.  `n` is the number of int64 fields available. */
static int lm_ew_decode(const int64_t *c, int64_t n, lm_ew *e)
{
    int64_t i, d;
    if (n < 2) return -1;
    e->dtype = c[LM_F_FUSED_ELEMENTWISE_dtype]; e->ndim = c[LM_F_FUSED_ELEMENTWISE_ndim];
    if (e->ndim < 1 || e->ndim > LM_MAXD || LM_F_FUSED_ELEMENTWISE_input(c) > n) return -1;
    for (d = 0; d < e->ndim; d++) {
        e->dims[d] = c[LM_F_FUSED_ELEMENTWISE_dims + d];
        if (e->dims[d] < 0) return -1;
    }
    e->n_in = c[LM_F_FUSED_ELEMENTWISE_n_in(c)]; e->n_out = c[LM_F_FUSED_ELEMENTWISE_n_out(c)];
    e->n_regs = c[LM_F_FUSED_ELEMENTWISE_n_regs(c)]; e->n_prog = c[LM_F_FUSED_ELEMENTWISE_n_prog(c)];
    e->mode = c[LM_F_FUSED_ELEMENTWISE_mode(c)]; e->nchunks = c[LM_F_FUSED_ELEMENTWISE_nchunks(c)];
    e->scratch_slot = c[LM_F_FUSED_ELEMENTWISE_scratch_slot(c)];
    e->scratch_off = c[LM_F_FUSED_ELEMENTWISE_scratch_offset(c)];
    if (e->n_in < 0 || e->n_in > LM_MAXIO || e->n_out < 1 || e->n_out > LM_MAXIO) return -1;
    if (e->n_regs < e->n_in || e->n_regs > LM_MAXREG || e->n_prog < 0 || e->mode < 0 || e->mode > 2) return -1;
    if (e->nchunks < 1 || e->nchunks > LM_MAXCHUNK) return -1;
    if (LM_F_FUSED_ELEMENTWISE_prog(c) + e->n_prog * LM_W_FUSED_ELEMENTWISE_prog(c) > n) return -1;
    e->in = c + LM_F_FUSED_ELEMENTWISE_input(c);
    e->out = c + LM_F_FUSED_ELEMENTWISE_output(c);
    e->prog = c + LM_F_FUSED_ELEMENTWISE_prog(c);
    e->in_w = LM_W_FUSED_ELEMENTWISE_input(c);
    e->out_w = LM_W_FUSED_ELEMENTWISE_output(c);
    e->out_reg = LM_R_FUSED_ELEMENTWISE_output_reg(c);
    e->out_red = LM_R_FUSED_ELEMENTWISE_output_is_reduce(c);
    e->out_scale = LM_R_FUSED_ELEMENTWISE_output_scale(c);
    e->inner = e->dims[e->ndim - 1];
    e->rows = 1;
    for (d = 0; d < e->ndim - 1; d++) e->rows *= e->dims[d];
    e->nblk = (e->inner + LM_BLK - 1) / LM_BLK;
    e->items = e->rows * e->nblk;
    e->red_total = 0;
    for (i = 0; i < e->n_out; i++) {
        const int64_t *o = e->out + i * e->out_w;
        e->red_numel[i] = 0; e->red_off[i] = e->red_total;
        if (o[e->out_red]) {  /* reduce output: numel = product of dims with non-zero stride */
            int64_t m = 1;
            for (d = 0; d < e->ndim; d++) if (o[LM_R_FUSED_ELEMENTWISE_output_stride(c) + d] != 0) m *= e->dims[d];
            e->red_numel[i] = m; e->red_total += m;
        }
    }
    return 0;
}

/* The micro-program a fused elementwise instruction runs per block (kernels_tmpl.h, lm_ew_exec_*): the
 * plan's steps, then one op per output -- records of LM_MW fields `op dst a b c out` (the plan's five,
 * then the output index for the ops that write one).  op < 256: a VM step; LM_MOP_STORE_ACC + op /
 * LM_MOP_ACC + op: the step also / only adds its result into output `out`'s column partial sums (built
 * when fold != 0: a mode-2 column-sum output, or a whole sum in a lane row (lm_ew_lane_ok), whose
 * register's last writer is a step -- "only" when no
 * later step or other output reads that register -- absorbed into that step); LM_MOP_OUT_*: an output's
 * store (dst = its register), its sum into its partial sum (mode 2), into the row's sum (mode 1), or into
 * its column partial sums.  mp holds n_prog + n_out records.  Returns the number of records, or -1 for
 * a step whose opcode is not in format.py's VM table (never run: its label would be lm_vm_bad). */
#define LM_MW 6
#define LM_MOP_STORE_ACC 256
#define LM_MOP_ACC 512
#define LM_MOP_OUT_STORE 768
#define LM_MOP_OUT_SUM 769
#define LM_MOP_OUT_ROWSUM 770
#define LM_MOP_OUT_COLSUM 771
#define LM_MOP_N 772
/* A mode-2 whole-tensor sum (every stride of the output 0: a mean loss) over rows of at most LM_LANE_MAX
 * elements is fused like a column sum when fold != 0: into a "lane" row of partial sums, one per column,
 * that lm_ew_span keeps per call and adds up in column order when it ends.  (The order of the additions
 * differs from the unfused block sums, so the bits of such a sum depend on `fold`; for any thread count
 * they are the same, the spans being the fixed chunks.)  The VM step then costs no pass of its own. */
#define LM_LANE_MAX 8192
static inline int lm_ew_lane_ok(const lm_ew *e, int64_t i)
{
    const int64_t *d = e->out + i * e->out_w;
    int64_t k;
    if (e->mode != 2 || !d[e->out_red] || e->inner > LM_LANE_MAX) return 0;
    for (k = 0; k < e->ndim; k++)
        if (d[2 + k] != 0) return 0;
    return 1;
}
static int64_t lm_ew_microprog(const lm_ew *e, int64_t *mp, int fold)
{
    static const char is_vm[256] = {LM_VM_OPLIST};
    const int64_t nd = e->ndim;
    int64_t i, i2, k, m = e->n_prog;
    for (k = 0; k < e->n_prog; k++) {
        const int64_t *p = e->prog + LM_VMW * k;
        if (p[0] < 0 || p[0] >= 256 || !is_vm[p[0]]) return -1;
        memcpy(mp + LM_MW * k, p, LM_VMW * sizeof(int64_t));
        mp[LM_MW * k + 5] = 0;
    }
    for (i = 0; i < e->n_out; i++) {
        const int64_t *d = e->out + i * e->out_w;
        const int64_t r = d[e->out_reg];
        const int64_t kind = !d[e->out_red] ? LM_MOP_OUT_STORE
                           : d[2 + nd - 1] != 0 ? LM_MOP_OUT_COLSUM
                           : e->mode == 1 ? LM_MOP_OUT_ROWSUM : LM_MOP_OUT_SUM;
        int64_t *q;
        if (fold && e->mode == 2 && (kind == LM_MOP_OUT_COLSUM || (kind == LM_MOP_OUT_SUM && lm_ew_lane_ok(e, i)))) {
            int64_t last = -1, read_later = 0;
            for (k = 0; k < e->n_prog; k++) if (mp[LM_MW * k + 1] == r) last = k;
            if (last >= 0 && mp[LM_MW * last] < 256) {  /* a step writes it, and is not fused yet */
                for (k = last + 1; k < e->n_prog; k++) {
                    const int64_t *pk = mp + LM_MW * k;
                    if (pk[2] == r || pk[3] == r || pk[4] == r) read_later = 1;
                }
                for (i2 = 0; i2 < e->n_out; i2++)
                    if (i2 != i && e->out[i2 * e->out_w + e->out_reg] == r) read_later = 1;
                mp[LM_MW * last] += read_later ? LM_MOP_STORE_ACC : LM_MOP_ACC;
                mp[LM_MW * last + 5] = i;
                continue;
            }
        }
        q = mp + LM_MW * m++;
        q[0] = kind; q[1] = r; q[2] = q[3] = q[4] = 0; q[5] = i;
    }
    return m;
}

/* The ahead-of-time kernels (vm_aot.py: one C loop per program listed in vm_aot.txt): lm_aot_find gives
 * the index of the listed program that micro-program mp (m records, lm_ew_microprog) is, or -1.  A
 * record's signature: constants as -1, the operands its op does not take as 0, a plain step's output
 * field 0 (vm_aot.normalise is the same rule in Python).  The index selects LM_SFX(lm_aot_tbl)[k] in
 * every ISA copy and element type alike; lm_ew_span runs it for whole blocks. */
#define LM_AOT_SIGNATURES
#include "vm_aot_gen.h"
#undef LM_AOT_SIGNATURES
static int64_t lm_aot_find(const lm_ew *e, const int64_t *mp, int64_t m)
{
    const int64_t *s = lm_aot_sigs;
    int64_t k, i;
    for (k = 0; s[0] >= 0; k++) {
        const int64_t n = s[1];
        const int64_t *r = s + 2;
        int ok = s[0] == e->n_in && n == m;
        for (i = 0; ok && i < n; i++) {
            const int64_t *q = mp + LM_MW * i, *w = r + 6 * i;
            const int64_t op = q[0];
            int64_t a = q[2], b = q[3], c = q[4], o = q[5];
            if (op >= LM_MOP_OUT_STORE) {  /* an output record: its register and output index only */
                a = b = c = 0;
            } else {
                const int ar = lm_vm_arity[op & 255];
                b = ar < 2 ? 0 : (b < 0 ? -1 : b);
                c = ar < 3 ? 0 : (c < 0 ? -1 : c);
                o = op >= 256 ? o : 0;
            }
            ok = op == w[0] && q[1] == w[1] && a == w[2] && b == w[3] && c == w[4] && o == w[5];
        }
        if (ok) return k;
        s = r + 6 * n;
    }
    return -1;
}

static const char *lm_aot_name(int64_t k) { return k >= 0 && k < LM_AOT_N ? lm_aot_names[k] : 0; }

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

static const int64_t lm_itemsize[DT_NTYPES] = {4, 8, 1, 2, 4, 8, 1, 2, 4, 8, 1};  /* ..., bool: one byte */

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
    case DT_BOOL: return ((const uint8_t *)p)[i] != 0;
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
    case DT_BOOL: return ((const uint8_t *)p)[i] != 0;
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

/* ---- Philox4x32-10, the counter-based generator of dropout's masks (format 2.2: dropout) ----
 * J. K. Salmon, M. A. Moraes, R. O. Dror, D. E. Shaw, "Parallel random numbers: as easy as 1, 2, 3"
 * (SC 2011), with the multipliers, Weyl constants and round function of its reference implementation
 * (Random123's philox.h): one round maps the counter (c0, c1, c2, c3) and key (k0, k1) to
 * (hi(M1*c2) ^ c1 ^ k0, lo(M1*c2), hi(M0*c0) ^ c3 ^ k1, lo(M0*c0)); the key is bumped by (W0, W1) before
 * every round but the first.  Checked against Random123's known-answer vectors (tests/test_dropout.py).
 * Macros (not functions): they are expanded inside each ISA copy of the template, where GCC vectorises
 * them; c0..c3 are uint32_t lvalues, updated in place. */
#define LM_PHILOX_M0 0xD2511F53u
#define LM_PHILOX_M1 0xCD9E8D57u
#define LM_PHILOX_W0 0x9E3779B9u
#define LM_PHILOX_W1 0xBB67AE85u
#define LM_PHILOX_ROUND(c0, c1, c2, c3, k0, k1)                                                         \
    do {                                                                                                \
        const uint32_t h0_ = (uint32_t)(((uint64_t)LM_PHILOX_M0 * (c0)) >> 32), l0_ = LM_PHILOX_M0 * (c0); \
        const uint32_t h1_ = (uint32_t)(((uint64_t)LM_PHILOX_M1 * (c2)) >> 32), l1_ = LM_PHILOX_M1 * (c2); \
        (c0) = h1_ ^ (c1) ^ (k0);                                                                       \
        (c1) = l1_;                                                                                     \
        (c2) = h0_ ^ (c3) ^ (k1);                                                                       \
        (c3) = l0_;                                                                                     \
    } while (0)
#define LM_PHILOX4X32_10(c0, c1, c2, c3, key0, key1)                                                    \
    do {                                                                                                \
        uint32_t k0_ = (key0), k1_ = (key1);                                                            \
        int r_;                                                                                         \
        LM_PHILOX_ROUND(c0, c1, c2, c3, k0_, k1_);                                                      \
        for (r_ = 1; r_ < 10; r_++) {                                                                   \
            k0_ += LM_PHILOX_W0;                                                                        \
            k1_ += LM_PHILOX_W1;                                                                        \
            LM_PHILOX_ROUND(c0, c1, c2, c3, k0_, k1_);                                                  \
        }                                                                                               \
    } while (0)
/* the AVX2 copies generate 8 Philox blocks per step with intrinsics (GCC's own vectorisation of the
 * macros above is half as fast): the intrinsics are declared here, usable in the `#pragma GCC target`
 * regions of kernels_isa.h, where __AVX2__ is defined */
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

/* The own SGEMM's (kernels_gemm.h) per-thread workspace: allocated on a thread's first call, kept for the
 * thread's life (the runtime's OpenMP pool lives as long as the process; a malloc of ~1.2 MB per call
 * would map and fault it in every time).  NULL if the allocation fails (the caller then runs BLAS). */
static __thread void *lm_gemm_ws_ptr = NULL;
static void *lm_gemm_ws(size_t bytes)
{
    if (lm_gemm_ws_ptr == NULL) lm_gemm_ws_ptr = aligned_alloc(64, (bytes + 63) / 64 * 64);
    return lm_gemm_ws_ptr;
}
/* panels of more multiply-adds than this run BLAS (measured: at 1024x4096x4096 per panel OpenBLAS is as
 * fast, at 2048x4096x4096 faster; see kernels_gemm.h) */
#define LM_GEMM_OWN_MAX 1073741824.0

/* ---- the type-generic kernels, once per float type and (dispatching builds) once per ISA ----
 *
 * Portable builds (the default, see setup.py) compile this translation unit for baseline x86-64 and
 * compile the hot kernels of kernels_tmpl.h three times inside `#pragma GCC target` regions:
 * baseline (SSE2), "avx2" (arch=x86-64-v3: AVX2+FMA) and "avx512" (arch=x86-64-v4).  The baseline copy
 * keeps the plain names (lm_ew_span_f32, ...); the others get a suffix (lm_ew_span_f32_avx2).  The names
 * in LM_DISPATCHED are then #defined to entries of the table `lm_isa`, which lm_isa_init() fills once at
 * import from the CPU's features (or LIBML_ISA), so every call from _exec.pyx goes through one indirect
 * call per block/row -- the template functions are never inlined into Cython code anyway.  A kernel
 * added to the template but not to LM_DISPATCHED still works: it runs the baseline copy.
 * With LM_NO_DISPATCH (LIBML_MARCH=native or any explicit -march) only the plain copy is compiled. */
#define LM_SFX_F32(name) name##_f32
#define LM_SFX_F64(name) name##_f64
#include "kernels_inst.h"
#undef LM_SFX_F32
#undef LM_SFX_F64

#include "kernels_isa.h"

/* ---- integer elementwise (forward only; ONNX/NumPy semantics: wrap-around, division truncates) ----
 * + - * are done in uint64_t: signed overflow is undefined behaviour in C (and uint16 * uint16 promotes
 * to int, which overflows), unsigned arithmetic wraps, and its low bits converted back are the
 * two's-complement result NumPy gives.
 * Division by -1 is a (wrapping) negation: MIN / -1 traps (SIGFPE) on x86 for 32 and 64 bits, and its
 * wrapped result, MIN, is what NumPy returns; likewise MIN % -1 traps and is 0.
 * Comparisons (EQ..GE) write one bool byte (0/1) per element; the others write T.  AND/OR/XOR take any
 * non-zero as true (the bool dtype runs the uint8 copy).  FMOD is C's % (sign of the dividend, ONNX
 * fmod=1), MOD moves a non-zero remainder into the divisor's sign (Python's %, ONNX fmod=0). */

/* b^e by squaring, wrapping mod 2^64 (truncated to T by the caller: NumPy's integer power) */
static inline uint64_t lm_upow(uint64_t b, uint64_t e)
{
    uint64_t r = 1;
    while (e) {
        if (e & 1) r *= b;
        b *= b;
        e >>= 1;
    }
    return r;
}

#define LM_INT_LOOP(T, BODY) for (i = 0; i < n; i++) { const T x = a[i * sa], y = b[i * sb]; BODY; }
#define LM_INT_BINARY(T, NAME)                                                                     \
static int NAME(int64_t op, int64_t n, const T *a, int64_t sa, const T *b, int64_t sb, char *out)   \
{                                                                                                     \
    int64_t i;                                                                                        \
    T *o = (T *)out;                                                                                  \
    uint8_t *m = (uint8_t *)out;                                                                      \
    switch (op) {                                                                                     \
    case VM_ADD: LM_INT_LOOP(T, o[i] = (T)((uint64_t)x + (uint64_t)y)) break;                           \
    case VM_SUB: LM_INT_LOOP(T, o[i] = (T)((uint64_t)x - (uint64_t)y)) break;                           \
    case VM_MUL: LM_INT_LOOP(T, o[i] = (T)((uint64_t)x * (uint64_t)y)) break;                           \
    case VM_MAX: LM_INT_LOOP(T, o[i] = x < y ? y : x) break;                                            \
    case VM_MIN: LM_INT_LOOP(T, o[i] = x > y ? y : x) break;                                            \
    case VM_DIV:                                                                                      \
        LM_INT_LOOP(T, if (y == 0) return -3;                                                            \
                    o[i] = ((T)-1 < 0 && y == (T)-1) ? (T)((uint64_t)0 - (uint64_t)x) : (T)(x / y))   \
        break;                                                                                        \
    case VM_FMOD:                                                                                     \
        LM_INT_LOOP(T, if (y == 0) return -3; o[i] = ((T)-1 < 0 && y == (T)-1) ? (T)0 : (T)(x % y))      \
        break;                                                                                        \
    case VM_MOD:                                                                                      \
        LM_INT_LOOP(T, if (y == 0) return -3;                                                            \
                    T r = ((T)-1 < 0 && y == (T)-1) ? (T)0 : (T)(x % y);                              \
                    o[i] = (r != 0 && ((r < (T)0) != (y < (T)0))) ? (T)(r + y) : r)                   \
        break;                                                                                        \
    case VM_EQ: LM_INT_LOOP(T, m[i] = x == y) break;                                                     \
    case VM_LT: LM_INT_LOOP(T, m[i] = x < y) break;                                                      \
    case VM_LE: LM_INT_LOOP(T, m[i] = x <= y) break;                                                     \
    case VM_GT: LM_INT_LOOP(T, m[i] = x > y) break;                                                      \
    case VM_GE: LM_INT_LOOP(T, m[i] = x >= y) break;                                                     \
    case VM_AND: LM_INT_LOOP(T, o[i] = (T)(x != 0 && y != 0)) break;                                     \
    case VM_OR: LM_INT_LOOP(T, o[i] = (T)(x != 0 || y != 0)) break;                                      \
    case VM_XOR: LM_INT_LOOP(T, o[i] = (T)((x != 0) != (y != 0))) break;                                 \
    case VM_POW: /* a negative exponent: 1 / x^k truncated toward zero, as integer division */         \
        LM_INT_LOOP(T, if ((T)-1 < 0 && y < (T)0) { if (x == 0) return -3;                              \
                           o[i] = x == 1 ? (T)1 : (x == (T)-1 ? ((y & 1) ? (T)-1 : (T)1) : (T)0); }     \
                       else o[i] = (T)lm_upow((uint64_t)x, (uint64_t)y)) break;                         \
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
#undef LM_INT_LOOP

enum { LM_DT_I64 = DT_I64 };  /* for the Cython side */

/* bytes per element of the integer kernel's output: comparisons write bool */
static inline int64_t lm_int_out_itemsize(int64_t dt, int64_t op)
{
    return (op >= VM_EQ && op <= VM_GE) ? 1 : lm_itemsize[dt];
}

/* one row of an integer binary op; returns 0, -1 bad op/dtype, -3 division by zero */
static int lm_int_binary_row(int64_t dt, int64_t op, int64_t n, const char *a, int64_t sa,
                             const char *b, int64_t sb, char *o)
{
    switch (dt) {
    case DT_I8: return lm_ibin_i8(op, n, (const int8_t *)a, sa, (const int8_t *)b, sb, o);
    case DT_I16: return lm_ibin_i16(op, n, (const int16_t *)a, sa, (const int16_t *)b, sb, o);
    case DT_I32: return lm_ibin_i32(op, n, (const int32_t *)a, sa, (const int32_t *)b, sb, o);
    case DT_I64: return lm_ibin_i64(op, n, (const int64_t *)a, sa, (const int64_t *)b, sb, o);
    case DT_U8: case DT_BOOL: return lm_ibin_u8(op, n, (const uint8_t *)a, sa, (const uint8_t *)b, sb, o);
    case DT_U16: return lm_ibin_u16(op, n, (const uint16_t *)a, sa, (const uint16_t *)b, sb, o);
    case DT_U32: return lm_ibin_u32(op, n, (const uint32_t *)a, sa, (const uint32_t *)b, sb, o);
    case DT_U64: return lm_ibin_u64(op, n, (const uint64_t *)a, sa, (const uint64_t *)b, sb, o);
    }
    return -1;
}

/* one row of Where over items of isz bytes: o = c ? a : b (c: bool bytes; element strides sc, sa, sb).
 * Branch-free, as a bitwise blend of unsigned words (items are moved, never interpreted): with a random
 * mask a branch per element mispredicts half the time, and GCC kept the branch even under `omp simd`
 * (4M int32, random mask: 37 ms branchy, 2.6 ms with an all-true mask). */
#define LM_SELECT(T) {                                                                                \
    const T *restrict A = (const T *)a, *restrict B = (const T *)b; T *restrict O = (T *)o;           \
    if (sc == 1 && sa == 1 && sb == 1) {                                                              \
        _Pragma("omp simd") for (i = 0; i < n; i++) {                                                 \
            const T m = (T)0 - (T)(c[i] != 0); O[i] = (A[i] & m) | (B[i] & (T)~m); }                  \
    } else {                                                                                          \
        _Pragma("omp simd") for (i = 0; i < n; i++) {                                                 \
            const T m = (T)0 - (T)(c[i * sc] != 0); O[i] = (A[i * sa] & m) | (B[i * sb] & (T)~m); }   \
    } }
static void lm_select_row(int64_t isz, int64_t n, const uint8_t *restrict c, int64_t sc, const char *a, int64_t sa,
                          const char *b, int64_t sb, char *o)
{
    int64_t i;
    switch (isz) {
    case 1: LM_SELECT(uint8_t); break;
    case 2: LM_SELECT(uint16_t); break;
    case 4: LM_SELECT(uint32_t); break;
    case 8: LM_SELECT(uint64_t); break;
    }
}
#undef LM_SELECT

/* ---- casts between any two supported dtypes (contiguous) ---- */
static int lm_cast(int64_t sdt, int64_t ddt, int64_t n, const char *src, char *dst)
{
    int64_t i;
    int sfloat = sdt == DT_F32 || sdt == DT_F64;
    /* the float VM's 0/1 masks become bool bytes (and back) at every fused group's boundary: tight loops
       (the generic loop below switches per element) */
    if (ddt == DT_BOOL && sdt == DT_F32) {
        const float *restrict s = (const float *)src; uint8_t *restrict d = (uint8_t *)dst;
        #pragma omp simd
        for (i = 0; i < n; i++) d[i] = s[i] != 0;
        return 0;
    }
    if (ddt == DT_BOOL && sdt == DT_F64) {
        const double *restrict s = (const double *)src; uint8_t *restrict d = (uint8_t *)dst;
        #pragma omp simd
        for (i = 0; i < n; i++) d[i] = s[i] != 0;
        return 0;
    }
    if (sdt == DT_BOOL && ddt == DT_F32) {
        const uint8_t *restrict s = (const uint8_t *)src; float *restrict d = (float *)dst;
        #pragma omp simd
        for (i = 0; i < n; i++) d[i] = s[i] != 0 ? 1.0f : 0.0f;
        return 0;
    }
    if (sdt == DT_BOOL && ddt == DT_F64) {
        const uint8_t *restrict s = (const uint8_t *)src; double *restrict d = (double *)dst;
        #pragma omp simd
        for (i = 0; i < n; i++) d[i] = s[i] != 0 ? 1.0 : 0.0;
        return 0;
    }
    for (i = 0; i < n; i++) {
        if (ddt == DT_BOOL) {  /* x != 0: NaN is true, as NumPy's astype(bool) */
            ((uint8_t *)dst)[i] = sfloat ? lm_load_as_f64(sdt, src, i) != 0 : lm_load_as_i64(sdt, src, i) != 0;
            continue;
        }
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
