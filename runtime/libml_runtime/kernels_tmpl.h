/* Type-generic kernels, included twice by kernels.h: LM_T = float (suffix _f32) and double (_f64).
 * Every loop over a block is `omp simd` with restrict pointers; none allocates; none takes the GIL. */

/* ---- the fused elementwise VM (format.py: fused_elementwise) ----
 * A step's loop over one block of `n` elements.  LM_ST(v) stores element j of the result: into D, or, in
 * the fused variants of the threaded VM below, also (or only) into the column partial sums P. */
#ifndef LM_ST
#define LM_ST(v) D[j] = (v)
#endif
/* a step's loop with pragma SIMD; the _WITH forms take it as a parameter, so the plain steps and the
 * libmvec-calling ones (below) are one definition */
#define LM_STEP_LOOP(SIMD, ...) SIMD for (j = 0; j < n; j++) { __VA_ARGS__ }
#define LM_UNARY_WITH(SIMD, EXPR) LM_STEP_LOOP(SIMD, LM_T x = A[j]; LM_ST(EXPR);)
#define LM_BINARY_WITH(SIMD, EXPR)                                                                       \
        if (bi < 0) { LM_STEP_LOOP(SIMD, LM_T x = A[j], y = bc; LM_ST(EXPR);) }                          \
        else { LM_STEP_LOOP(SIMD, LM_T x = A[j], y = B[j]; LM_ST(EXPR);) }
#define LM_TERNARY_WITH(SIMD, EXPR)                                                                      \
        if (bi < 0 && ci < 0) { LM_STEP_LOOP(SIMD, LM_T x = A[j], y = bc, z = cc; LM_ST(EXPR);) }        \
        else if (bi < 0) { LM_STEP_LOOP(SIMD, LM_T x = A[j], y = bc, z = C[j]; LM_ST(EXPR);) }           \
        else if (ci < 0) { LM_STEP_LOOP(SIMD, LM_T x = A[j], y = B[j], z = cc; LM_ST(EXPR);) }           \
        else { LM_STEP_LOOP(SIMD, LM_T x = A[j], y = B[j], z = C[j]; LM_ST(EXPR);) }
#define LM_SIMD _Pragma("omp simd")
#define LM_UNARY(EXPR) LM_UNARY_WITH(LM_SIMD, EXPR)
#define LM_BINARY(EXPR) LM_BINARY_WITH(LM_SIMD, EXPR)
#define LM_TERNARY(EXPR) LM_TERNARY_WITH(LM_SIMD, EXPR)
/* The same loops for steps that call a libmvec function (exp, log, ...), with LM_SIMD_MV's pragma
 * (kernels_inst.h): in the AVX-512 copy `omp simd simdlen(16 floats / 8 doubles)`, so GCC calls the
 * 512-bit variant (_ZGVeN16v_expf) while every other loop keeps 256-bit vectors.  Why: a sigmoid over 128
 * floats, one core of a Xeon, 3.83 ns per 8 elements through _ZGVdN8v_expf, 2.55 through _ZGVeN16v_expf
 * (C loop, /tmp); divisions and loads are no faster at 512 bits, exp is. */
#define LM_UNARY_MV(EXPR) LM_UNARY_WITH(LM_SIMD_MV, EXPR)
#define LM_BINARY_MV(EXPR) LM_BINARY_WITH(LM_SIMD_MV, EXPR)
#define LM_TERNARY_MV(EXPR) LM_TERNARY_WITH(LM_SIMD_MV, EXPR)
#define LM_MASKED_MV(EXPR, M) LM_MASKED(EXPR, M)
/* the step as a separate select of constants: GCC vectorises that, not x*(y>0?1:0) */
#define LM_MASKED(EXPR, M)                                                                                 \
        if (bi < 0) {                                                                                      \
            _Pragma("omp simd") for (j = 0; j < n; j++) {                                                  \
                LM_T x = A[j], y = bc, st = (M)[j] > 0 ? (LM_T)1 : (LM_T)0; LM_ST((EXPR) * st); }          \
        } else {                                                                                           \
            _Pragma("omp simd") for (j = 0; j < n; j++) {                                                  \
                LM_T x = A[j], y = B[j], st = (M)[j] > 0 ? (LM_T)1 : (LM_T)0; LM_ST((EXPR) * st); }        \
        }

/* One block through the micro-program (kernels.h, lm_ew_microprog), as threaded code: every step's
 * label ends in its own indirect jump to the next step's label.  Why: with one `switch` the only
 * indirect branch site sees every step in turn and mispredicts at most of them; W4's step, one thread,
 * through the instruction decoded from the plan (a C harness over this template, alternating binaries):
 * 8.6 ms with the switch, 7.2 ms threaded.  Per step the operands are re-read from the program (p), so
 * the restrict pointers are block-scoped, as the loops need.  out_row[i]: output i's row (a store
 * output) or its partial-sum row (a reduction; mode 2), j0 the block's first column; acc: mode 1's row
 * sums.  The table covers every index a micro-program can hold; lm_ew_microprog admits only VM opcodes
 * of format.py's table, so lm_vm_bad is unreachable from a decoded program. */
#define LM_VM_OPERANDS                                                                                     \
        LM_T *restrict D = R[p[1]];                                                                        \
        const LM_T *restrict A = R[p[2]];                                                                  \
        const int64_t bi = p[3], ci = p[4];                                                                \
        const LM_T bc = bi < 0 ? (LM_T)consts[-bi - 1] : 0, cc = ci < 0 ? (LM_T)consts[-ci - 1] : 0;      \
        const LM_T *restrict B = bi >= 0 ? R[bi] : A;                                                      \
        const LM_T *restrict C = ci >= 0 ? R[ci] : A;                                                      \
        LM_T *restrict P = LM_FOLD_P;                                                                      \
        (void)D; (void)B; (void)C; (void)bc; (void)cc; (void)P;
#define LM_VM_NEXT p += LM_MW; if (p == pend) return; goto *tbl[p[0]]
#define LM_VM_OUTPUTS                                                                                      \
    lm_o_store: {                                                                                          \
        const LM_T *restrict r = R[p[1]];                                                                  \
        LM_T *dst = out_row[p[5]] + j0;                                                                    \
        if (dst != r) memmove(dst, r, (size_t)n * sizeof(LM_T));                                           \
    } LM_VM_NEXT;                                                                                          \
    lm_o_sum: {                                                                                            \
        const LM_T *restrict r = R[p[1]];                                                                  \
        LM_T sum = 0;                                                                                      \
        _Pragma("omp simd reduction(+:sum)") for (j = 0; j < n; j++) sum += r[j];                          \
        out_row[p[5]][0] += sum;                                                                           \
    } LM_VM_NEXT;                                                                                          \
    lm_o_rowsum: {                                                                                         \
        const LM_T *restrict r = R[p[1]];                                                                  \
        LM_T sum = 0;                                                                                      \
        _Pragma("omp simd reduction(+:sum)") for (j = 0; j < n; j++) sum += r[j];                          \
        acc[p[5]] += sum;                                                                                  \
    } LM_VM_NEXT;                                                                                          \
    lm_o_colsum: {                                                                                         \
        const LM_T *restrict r = R[p[1]];                                                                  \
        LM_T *restrict Q = out_row[p[5]] + j0;                                                             \
        _Pragma("omp simd") for (j = 0; j < n; j++) Q[j] += r[j];                                          \
    } LM_VM_NEXT;
#define LM_VM_OUTPUT_TABLE                                                                                 \
    [LM_MOP_OUT_STORE] = &&lm_o_store, [LM_MOP_OUT_SUM] = &&lm_o_sum, [LM_MOP_OUT_ROWSUM] = &&lm_o_rowsum, \
    [LM_MOP_OUT_COLSUM] = &&lm_o_colsum

/* The shared frame of the two executors: the jump table (the plain steps, the fused copies given as
 * the arguments -- table entries with a trailing comma -- and the outputs), the first jump, the plain
 * steps' labels (LM_FOLD_P is NULL there); LM_VM_END: the outputs' labels and the unreachable bad one. */
#define LM_FOLD_P NULL
#define LM_VM_BEGIN(...)                                                                                   \
    static const void *const tbl[LM_MOP_N] = {[0 ... LM_MOP_N - 1] = &&lm_vm_bad, LM_VM_TABLE(lm_v_, 0),    \
                                              __VA_ARGS__ LM_VM_OUTPUT_TABLE};                             \
    int64_t j;                                                                                             \
    if (p == pend) return;                                                                                 \
    goto *tbl[p[0]];                                                                                       \
    LM_VM_THREADED(lm_v_)
#define LM_VM_END                                                                                          \
    LM_VM_OUTPUTS                                                                                          \
lm_vm_bad:                                                                                                 \
    return;

/* a block of n < LM_BLK elements (the last of a row): plain steps only (its micro-program is built
 * without fused steps, lm_ew_microprog(..., 0)) */
static void LM_SFX(lm_ew_exec_n)(const int64_t *p, const int64_t *pend, const double *consts, const int64_t n,
                                 LM_T **R, LM_T **out_row, int64_t j0, LM_T *acc)
{
    LM_VM_BEGIN()
    LM_VM_END
}

/* a whole block (n == LM_BLK, a compile-time trip count: the loops are unrolled without remainder code;
 * 7.4 vs 8.4 ms on W4 when this was measured for the switch VM).  Two more copies of every step: with
 * LM_MOP_STORE_ACC + op it also adds its result into output p[5]'s column partial sums, with
 * LM_MOP_ACC + op it only adds them (its register is read by no later step or output) -- the column sum
 * then costs no pass of its own and no reload of the register; same additions, same order, same bits. */
static void LM_SFX(lm_ew_exec_full)(const int64_t *p, const int64_t *pend, const double *consts, LM_T **R,
                                    LM_T **out_row, int64_t j0, LM_T *acc)
{
    const int64_t n = LM_BLK;
    LM_VM_BEGIN(LM_VM_TABLE(lm_s_, LM_MOP_STORE_ACC), LM_VM_TABLE(lm_a_, LM_MOP_ACC),)
#undef LM_FOLD_P
#define LM_FOLD_P (out_row[p[5]] + j0)
#undef LM_ST
#define LM_ST(v) do { const LM_T v_ = (v); D[j] = v_; P[j] += v_; } while (0)
    LM_VM_THREADED(lm_s_)
#undef LM_ST
#define LM_ST(v) P[j] += (v)
    LM_VM_THREADED(lm_a_)
#undef LM_ST
#define LM_ST(v) D[j] = (v)
#undef LM_FOLD_P
#define LM_FOLD_P NULL
    LM_VM_END
}

/* the ahead-of-time kernels of the programs in vm_aot.txt (vm_aot.py) and their table LM_SFX(lm_aot_tbl):
 * each runs one whole block, as lm_ew_exec_full would, in one loop */
#include "vm_aot_gen.h"

/* mode 1: store a finished row's sums */
static void LM_SFX(lm_ew_row_store)(const lm_ew *e, char **bases, const double *consts, int64_t row, const LM_T *acc)
{
    int64_t i;
    for (i = 0; i < e->n_out; i++) {
        const int64_t *d = e->out + i * e->out_w;
        if (!d[e->out_red]) continue;
        LM_T scale = d[e->out_scale] >= 0 ? (LM_T)consts[d[e->out_scale]] : (LM_T)1;
        ((LM_T *)(bases[d[0]] + d[1]))[lm_row_offset(e, row, d + 2)] = acc[i] * scale;
    }
}

/* Run items [it0, it1) of a fused elementwise instruction (item = block b of row r, it = r * nblk + b),
 * in order.  mpf / mpp: the micro-programs for whole and partial blocks (lm_ew_microprog), ending at
 * mpf_end / mpp_end.  regs: this call's register file (n_regs * LM_BLK elements).  partial: mode 2, this
 * chunk's partial sums (red_total elements, zeroed by the caller); lanes: NULL, or (mode 2, micro-programs
 * built with fold) nblk * LM_BLK elements per whole-sum output (lm_ew_lane_ok), its lane row, added into
 * its partial sum when the call ends.  aot: -1, or the index of the ahead-of-time kernel (lm_aot_find)
 * that runs mpf's whole blocks.  Mode 1: [it0, it1) holds whole rows;
 * each row's sums are stored when it ends.  Operand addresses are computed once per row. */
static void LM_SFX(lm_ew_span)(const lm_ew *e, char **bases, const double *consts,
                               const int64_t *mpf, const int64_t *mpf_end, const int64_t *mpp, const int64_t *mpp_end,
                               int64_t it0, int64_t it1, LM_T *regs, LM_T *partial, LM_T *lanes, int64_t aot)
{
    LM_T *R[LM_MAXREG];
    const LM_T *in_row[LM_MAXIO];
    LM_T *out_row[LM_MAXIO];
    LM_T *lane[LM_MAXIO];
    LM_T acc[LM_MAXIO];
    const int64_t nd = e->ndim, lw = e->nblk * LM_BLK;
    int64_t it, i, j, row = -1, idx[LM_MAXD], nl = 0;
    for (i = 0; i < e->n_regs; i++) R[i] = regs + i * LM_BLK;
    for (i = 0; i < e->n_out; i++) {
        out_row[i] = NULL; acc[i] = 0;
        lane[i] = lanes != NULL && lm_ew_lane_ok(e, i) ? lanes + lw * nl++ : NULL;
        if (lane[i] != NULL) memset(lane[i], 0, (size_t)lw * sizeof(LM_T));
    }
    for (it = it0; it < it1; it++) {
        const int64_t r = it / e->nblk, b = it - r * e->nblk;
        if (r != row) {
            if (row >= 0 && e->mode == 1) LM_SFX(lm_ew_row_store)(e, bases, consts, row, acc);
            row = r;
            /* the row's multi-index once: operand offsets are then dot products (an integer division
               per operand per block was a measurable share of small-row kernels) */
            lm_unravel_row(e, row, idx);
            for (i = 0; i < e->n_in; i++) {
                const int64_t *d = e->in + i * e->in_w;
                in_row[i] = (const LM_T *)(bases[d[0]] + d[1]) + lm_dot(nd - 1, idx, d + 2);
            }
            for (i = 0; i < e->n_out; i++) {
                const int64_t *d = e->out + i * e->out_w;
                if (!d[e->out_red])
                    out_row[i] = (LM_T *)(bases[d[0]] + d[1]) + lm_dot(nd - 1, idx, d + 2);
                else if (e->mode == 2)
                    out_row[i] = lane[i] != NULL ? lane[i] : partial + e->red_off[i] + lm_dot(nd - 1, idx, d + 2);
                acc[i] = 0;
            }
        }
        const int64_t j0 = b * LM_BLK;
        const int64_t n = (e->inner - j0 < LM_BLK) ? e->inner - j0 : LM_BLK;
        for (i = 0; i < e->n_in; i++) {
            const int64_t si = e->in[i * e->in_w + 2 + nd - 1];
            const LM_T *src = in_row[i] + j0 * si;
            if (si == 1) {
                R[i] = (LM_T *)src;  /* read in place: input registers are never written */
            } else {
                LM_T *restrict rr = regs + i * LM_BLK;
                R[i] = rr;
                if (si == 0) {
                    const LM_T v = src[0];
                    #pragma omp simd
                    for (j = 0; j < n; j++) rr[j] = v;
                } else {
                    for (j = 0; j < n; j++) rr[j] = src[j * si];
                }
            }
        }
        if (n == LM_BLK && aot >= 0) LM_SFX(lm_aot_tbl)[aot](mpf, consts, R, out_row, j0);
        else if (n == LM_BLK) LM_SFX(lm_ew_exec_full)(mpf, mpf_end, consts, R, out_row, j0, acc);
        else LM_SFX(lm_ew_exec_n)(mpp, mpp_end, consts, n, R, out_row, j0, acc);
    }
    if (row >= 0 && e->mode == 1) LM_SFX(lm_ew_row_store)(e, bases, consts, row, acc);
    for (i = 0; i < e->n_out; i++) {
        if (lane[i] == NULL) continue;
        LM_T sum = 0;
        for (j = 0; j < e->inner; j++) sum += lane[i][j];  /* in column order */
        partial[e->red_off[i]] += sum;
    }
}

/* mode 2: combine the chunks' partial sums in fixed chunk order (deterministic for any thread count) */
static void LM_SFX(lm_ew_combine)(const lm_ew *e, char **bases, const double *consts, const LM_T *partial)
{
    int64_t i, k, c;
    for (i = 0; i < e->n_out; i++) {
        const int64_t *d = e->out + i * e->out_w;
        if (!d[e->out_red]) continue;
        LM_T scale = d[e->out_scale] >= 0 ? (LM_T)consts[d[e->out_scale]] : (LM_T)1;
        LM_T *restrict out = (LM_T *)(bases[d[0]] + d[1]);
        const int64_t m = e->red_numel[i];
        for (k = 0; k < m; k++) out[k] = partial[e->red_off[i] + k];
        for (c = 1; c < e->nchunks; c++) {
            const LM_T *restrict P = partial + c * e->red_total + e->red_off[i];
            #pragma omp simd
            for (k = 0; k < m; k++) out[k] += P[k];
        }
        if (scale != (LM_T)1) {
            #pragma omp simd
            for (k = 0; k < m; k++) out[k] *= scale;
        }
    }
}

/* softmax over the middle axis of a contiguous (outer, K, inner) tensor, for one `o` */
static void LM_SFX(lm_softmax_outer)(int64_t K, int64_t inner, const LM_T *x, LM_T *y, LM_T *tmp)
{
    int64_t k, i;
    if (inner == 1) {
        LM_T m = x[0], s = 0;
        for (k = 1; k < K; k++) m = x[k] > m ? x[k] : m;
        #pragma omp simd reduction(+:s)
        for (k = 0; k < K; k++) { LM_T v = LM_EXP(x[k] - m); y[k] = v; s += v; }
        LM_T inv = (LM_T)1 / s;
        #pragma omp simd
        for (k = 0; k < K; k++) y[k] *= inv;
        return;
    }
    LM_T *restrict m = tmp, *restrict s = tmp + inner;
    for (i = 0; i < inner; i++) { m[i] = x[i]; s[i] = 0; }
    for (k = 1; k < K; k++) {
        const LM_T *restrict xr = x + k * inner;
        #pragma omp simd
        for (i = 0; i < inner; i++) m[i] = xr[i] > m[i] ? xr[i] : m[i];
    }
    for (k = 0; k < K; k++) {
        const LM_T *restrict xr = x + k * inner;
        LM_T *restrict yr = y + k * inner;
        #pragma omp simd
        for (i = 0; i < inner; i++) { LM_T v = LM_EXP(xr[i] - m[i]); yr[i] = v; s[i] += v; }
    }
    for (k = 0; k < K; k++) {
        LM_T *restrict yr = y + k * inner;
        #pragma omp simd
        for (i = 0; i < inner; i++) yr[i] /= s[i];
    }
}

/* mean over rows of logsumexp(z_b) - z_b[y_b]; labels already range-checked. Summed in double. */
static LM_T LM_SFX(lm_xent)(int64_t B, int64_t C, const LM_T *z, int64_t ldt, const char *lab)
{
    double total = 0;
    int64_t b, k;
    for (b = 0; b < B; b++) {
        const LM_T *restrict r = z + b * C;
        LM_T m = r[0], s = 0;
        for (k = 1; k < C; k++) m = r[k] > m ? r[k] : m;
        #pragma omp simd reduction(+:s)
        for (k = 0; k < C; k++) s += LM_EXP(r[k] - m);
        total += (double)(m + LM_LOG(s)) - (double)r[lm_load_as_i64(ldt, lab, b)];
    }
    return (LM_T)(total / (double)B);
}

/* d/dz of g * mean xent = g/B * (softmax(z_b) - onehot(y_b)), one row; returns the row's loss
 * logsumexp(z_b) - z_b[y] (the same formula lm_xent sums) */
static double LM_SFX(lm_xent_grad_row)(int64_t C, const LM_T *r, int64_t y, LM_T gscale, LM_T *o)
{
    int64_t k;
    LM_T m = r[0], s = 0;
    for (k = 1; k < C; k++) m = r[k] > m ? r[k] : m;
    #pragma omp simd reduction(+:s)
    for (k = 0; k < C; k++) { LM_T v = LM_EXP(r[k] - m); o[k] = v; s += v; }
    LM_T f = gscale / s;
    #pragma omp simd
    for (k = 0; k < C; k++) o[k] *= f;
    o[y] -= gscale;
    return (double)(m + LM_LOG(s)) - (double)r[y];
}

/* Row vector times row-major matrix, y(N) = alpha * x(K) . W(K, N; row stride ldw) + beta * y.
 * The M = 1 GEMM (W5 at batch 1) is memory-bound: it reads each weight once, so the kernel is judged by the
 * bytes per second it streams.  Tiles of 8 SIMD vectors of columns keep their sums in registers while W
 * streams through row by row (GCC keeps an `omp simd` accumulator array in memory here, a store per FMA,
 * so the tiles use vector types explicitly); the vectors are the ISA copy's full width (zmm in the avx512
 * copy: 103 -> 142 GB/s from L2 for a 392 x 512 block on a Xeon with AVX-512, C harness).  Columns left
 * over (fewer than 8 vectors) run one vector at a time with four accumulators over k (one would be an FMA
 * latency chain: 512 rows, ~2000 cycles), the last < VL columns as a partial vector read over the row's
 * end where that stays inside W (the extra lanes are dropped) and scalar for the few last rows.
 * Sum order, per column: 8-vector tiles in order over k; the narrower tails in four interleaved partial
 * sums (k mod 4) added as (s0 + s1) + (s2 + s3), then in order over the k % 4 last rows.  It depends on
 * (K, N, ISA) only: the caller's split of K is fixed by the problem size, so results do not depend on the
 * thread count.  beta == 0 never reads y (BLAS semantics). */
#if defined(__AVX512F__)
#define LM_GV_BYTES 64
#else
#define LM_GV_BYTES 32
#endif
typedef LM_T LM_SFX(lm_vec) __attribute__((vector_size(LM_GV_BYTES), aligned(sizeof(LM_T)), may_alias));
#define LM_VL ((int64_t)(LM_GV_BYTES / sizeof(LM_T)))
static inline void LM_SFX(lm_gemv_store)(int64_t n, LM_T *restrict y, const LM_T *restrict acc, LM_T alpha,
                                          LM_T beta)
{
    int64_t j;
    if (beta == 0)
        for (j = 0; j < n; j++) y[j] = alpha * acc[j];
    else
        for (j = 0; j < n; j++) y[j] = alpha * acc[j] + beta * y[j];
}

/* one vector of columns at W + t (lanes past the columns wanted are computed and dropped by the caller):
 * rows 0..kv-1 read whole vectors, four partial sums over k; rows kv..K-1 (a partial tile's last rows,
 * where a whole vector would read past W) add lane by lane for the first `nl` lanes */
static inline LM_SFX(lm_vec) LM_SFX(lm_gemv_vec)(int64_t K, int64_t kv, int64_t nl, const LM_T *restrict x,
                                                  const LM_T *restrict w, int64_t ldw)
{
    typedef LM_SFX(lm_vec) V;
    V s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    int64_t k = 0, j;
    for (; k + 4 <= kv; k += 4, w += 4 * ldw) {
        s0 += x[k] * *(const V *)w;
        s1 += x[k + 1] * *(const V *)(w + ldw);
        s2 += x[k + 2] * *(const V *)(w + 2 * ldw);
        s3 += x[k + 3] * *(const V *)(w + 3 * ldw);
    }
    s0 = (s0 + s1) + (s2 + s3);
    for (; k < kv; k++, w += ldw) s0 += x[k] * *(const V *)w;
    for (; k < K; k++, w += ldw)
        for (j = 0; j < nl; j++) s0[j] += x[k] * w[j];
    return s0;
}

static void LM_SFX(lm_gemv_rows)(int64_t K, int64_t N, const LM_T *restrict x, const LM_T *restrict W,
                                 int64_t ldw, LM_T *restrict y, LM_T alpha, LM_T beta)
{
    typedef LM_SFX(lm_vec) V;
    int64_t t = 0, k;
    LM_T acc[8 * LM_VL];
    for (; t + 8 * LM_VL <= N; t += 8 * LM_VL) {
        V a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
        const LM_T *w = W + t;
        for (k = 0; k < K; k++, w += ldw) {
            const LM_T xk = x[k];
            a0 += xk * *(const V *)(w + 0 * LM_VL); a1 += xk * *(const V *)(w + 1 * LM_VL);
            a2 += xk * *(const V *)(w + 2 * LM_VL); a3 += xk * *(const V *)(w + 3 * LM_VL);
            a4 += xk * *(const V *)(w + 4 * LM_VL); a5 += xk * *(const V *)(w + 5 * LM_VL);
            a6 += xk * *(const V *)(w + 6 * LM_VL); a7 += xk * *(const V *)(w + 7 * LM_VL);
        }
        *(V *)(acc + 0 * LM_VL) = a0; *(V *)(acc + 1 * LM_VL) = a1; *(V *)(acc + 2 * LM_VL) = a2;
        *(V *)(acc + 3 * LM_VL) = a3; *(V *)(acc + 4 * LM_VL) = a4; *(V *)(acc + 5 * LM_VL) = a5;
        *(V *)(acc + 6 * LM_VL) = a6; *(V *)(acc + 7 * LM_VL) = a7;
        LM_SFX(lm_gemv_store)(8 * LM_VL, y + t, acc, alpha, beta);
    }
    for (; t + LM_VL <= N; t += LM_VL) {
        *(V *)acc = LM_SFX(lm_gemv_vec)(K, K, LM_VL, x, W + t, ldw);
        LM_SFX(lm_gemv_store)(LM_VL, y + t, acc, alpha, beta);
    }
    if (t < N && K > 0) {
        /* rows whose whole vector at column t ends inside W, whose last element is W[(K-1)*ldw + N-1] */
        const int64_t r = N - t, end = (K - 1) * ldw + N;
        int64_t kv = end - t - LM_VL < 0 ? 0 : (end - t - LM_VL) / ldw + 1;
        if (kv > K) kv = K;
        *(V *)acc = LM_SFX(lm_gemv_vec)(K, kv, r, x, W + t, ldw);
        LM_SFX(lm_gemv_store)(r, y + t, acc, alpha, beta);
    } else if (t < N) {
        for (k = 0; k < LM_VL; k++) acc[k] = 0;
        LM_SFX(lm_gemv_store)(N - t, y + t, acc, alpha, beta);
    }
}
#undef LM_VL
#undef LM_GV_BYTES

/* GEMM epilogue on rows of C (N columns): c = act(c + bias) */
static void LM_SFX(lm_epilogue_row)(int64_t N, LM_T *restrict c, const LM_T *restrict bias, int64_t act)
{
    int64_t j;
    if (bias && act == 1) {
        #pragma omp simd
        for (j = 0; j < N; j++) { LM_T v = c[j] + bias[j]; c[j] = v < 0 ? (LM_T)0 : v; }
    } else if (bias) {
        #pragma omp simd
        for (j = 0; j < N; j++) c[j] += bias[j];
    } else if (act == 1) {
        #pragma omp simd
        for (j = 0; j < N; j++) c[j] = c[j] < 0 ? (LM_T)0 : c[j];
    }
}

/* A GEMM epilogue that is any VM step (format.py's VM table): per row of C, after the bias,
 * c = op(c, b, c') with b / c' each an auxiliary row of C's shape (e->b == 1 / e->c == 1: `aux`, e.g. the
 * saved input of an activation whose gradient this GEMM's result is multiplied by), an immediate
 * (e->b < 0: consts[-b-1], e.g. LeakyRelu's alpha) or unused (0); then, if cs, the column sums cs += c
 * (a bias gradient).  Runs on blocks of LM_BLK through a stack buffer (the VM loops take restrict
 * pointers, and the destination is the operand here). */
__attribute__((noinline))
static void LM_SFX(lm_vm_epilogue_row)(const lm_epi *e, int64_t N, LM_T *restrict row, const LM_T *restrict bias,
                                       const LM_T *restrict aux, LM_T *restrict cs, LM_T *restrict out)
{
    /* out: where the result goes (gemm_ex_keep: row keeps the GEMM + bias value, the op's input that a
       gradient reads); NULL: back into row */
    LM_T *restrict dst = out ? out : row;
    LM_T buf[LM_BLK];
    const int64_t bi = e->b < 0 ? -1 : 0, ci = e->c < 0 ? -1 : 0;
    const LM_T bc = (LM_T)e->bv, cc = (LM_T)e->cv;
    int64_t j0, j;
    for (j0 = 0; j0 < N; j0 += LM_BLK) {
        const int64_t n = N - j0 < LM_BLK ? N - j0 : LM_BLK;
        LM_T *restrict D = buf;
        const LM_T *restrict A = row + j0;
        const LM_T *restrict B = e->b == 1 ? aux + j0 : A;
        const LM_T *restrict C = e->c == 1 ? aux + j0 : A;
        if (bias) {
            #pragma omp simd
            for (j = 0; j < n; j++) row[j0 + j] += bias[j0 + j];
        }
        switch (e->vm) {
        LM_VM_CASES
        }
        if (cs) {
            #pragma omp simd
            for (j = 0; j < n; j++) { dst[j0 + j] = buf[j]; cs[j0 + j] += buf[j]; }
        } else {
            #pragma omp simd
            for (j = 0; j < n; j++) dst[j0 + j] = buf[j];
        }
    }
}

/* relu-backward GEMM epilogue on one row: c = c * (m > 0 ? 1 : 0) -- exactly mul(g, step(relu_out)) --
 * and, if cs, the column sums cs += c (the bias gradient, accumulated in row order) */
__attribute__((noinline))  /* inlined into the Cython GEMM driver it lost `restrict` and ran scalar */
static void LM_SFX(lm_mask_row)(int64_t N, LM_T *restrict c, const LM_T *restrict m, LM_T *restrict cs)
{
    int64_t j;
    /* (the step is a separate select of constants: GCC vectorises that, not `c * (m > 0 ? 1 : 0)`) */
    if (cs) {
        #pragma omp simd
        for (j = 0; j < N; j++) { LM_T st = m[j] > 0 ? (LM_T)1 : (LM_T)0; LM_T v = c[j] * st; c[j] = v; cs[j] += v; }
    } else {
        #pragma omp simd
        for (j = 0; j < N; j++) { LM_T st = m[j] > 0 ? (LM_T)1 : (LM_T)0; c[j] = c[j] * st; }
    }
}

/* SGD (PyTorch semantics, dampening 0): d = g + wd*p; v = mom*v + d; p -= lr*v   (v NULL: p -= lr*d;
 * g NULL: v already holds mom*v + g) */
static void LM_SFX(lm_sgd)(int64_t n, LM_T *restrict p, const LM_T *restrict g, LM_T *restrict v,
                           LM_T lr, LM_T mom, LM_T wd)
{
    int64_t j;
    if (v && !g) {
        /* the weight-gradient GEMM already made v = mom*v + g (a momentum_gemm): add the decay, step */
        #pragma omp simd
        for (j = 0; j < n; j++) { LM_T vv = v[j] + wd * p[j]; v[j] = vv; p[j] -= lr * vv; }
    } else if (v) {
        #pragma omp simd
        for (j = 0; j < n; j++) { LM_T d = g[j] + wd * p[j]; LM_T vv = mom * v[j] + d; v[j] = vv; p[j] -= lr * vv; }
    } else {
        #pragma omp simd
        for (j = 0; j < n; j++) { LM_T d = g[j] + wd * p[j]; p[j] -= lr * d; }
    }
}

/* AdamW (PyTorch semantics): p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
 * p -= (lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps) */
static void LM_SFX(lm_adam)(int64_t n, LM_T *restrict p, const LM_T *restrict g, LM_T *restrict m,
                            LM_T *restrict v, LM_T lr, LM_T b1, LM_T b2, LM_T eps, LM_T wd,
                            LM_T step_size, LM_T inv_sqrt_bc2)
{
    int64_t j;
    const LM_T decay = (LM_T)1 - lr * wd;
    #pragma omp simd
    for (j = 0; j < n; j++) {
        LM_T gj = g[j];
        LM_T mj = b1 * m[j] + ((LM_T)1 - b1) * gj;
        LM_T vj = b2 * v[j] + ((LM_T)1 - b2) * gj * gj;
        m[j] = mj; v[j] = vj;
        p[j] = p[j] * decay - step_size * mj / (LM_SQRT(vj) * inv_sqrt_bc2 + eps);
    }
}

/* 1 if any element is NaN or Inf (numerical guard) */
static int LM_SFX(lm_nonfinite)(int64_t n, const LM_T *restrict x)
{
    int64_t j;
    int bad = 0;
    #pragma omp simd reduction(|:bad)
    for (j = 0; j < n; j++) bad |= !(x[j] - x[j] == 0);
    return bad;
}

/* ---- reductions over the middle axis of a contiguous (outer, K, inner) array (format.py: reduce,
 * arg_reduce, log_softmax).  One call computes `ni` consecutive output columns [i0, i0 + ni) of one
 * outer index: the caller splits the work into such tasks by problem size only, and every output
 * element is reduced in the same fixed order whatever thread runs it -- bit-identical for any thread
 * count.  NaN propagates as in NumPy (np.max, np.min: NaN wins; ONNX's reference is NumPy).
 *
 * inner == 1 (reducing the contiguous last axis): LM_RL independent lane accumulators run over the
 * row (vectorised), then combine in lane order; inner > 1: each column's accumulator runs over k in
 * order, the loop over columns vectorised. */
#define LM_RL 16

/* the first NaN of a row known to hold one (NumPy returns that element) */
static inline LM_T LM_SFX(lm_first_nan)(int64_t K, const LM_T *restrict x)
{
    int64_t k;
    for (k = 0; k < K; k++) if (x[k] != x[k]) return x[k];
    return x[0];
}

/* max / min of a contiguous row: plain compare-selects in LM_RL lanes (a NaN never enters them) and a
 * NaN flag beside them -- measured 1.5x faster than a NaN-propagating select in the lanes (AVX2) */
static inline LM_T LM_SFX(lm_row_max)(int64_t K, const LM_T *restrict x)
{
    LM_T lane[LM_RL];
    int64_t k, j;
    int nan = 0;
    for (j = 0; j < LM_RL; j++) lane[j] = -(LM_T)INFINITY;
    for (k = 0; k + LM_RL <= K; k += LM_RL) {
        #pragma omp simd reduction(|:nan)
        for (j = 0; j < LM_RL; j++) { LM_T v = x[k + j]; lane[j] = v > lane[j] ? v : lane[j]; nan |= v != v; }
    }
    for (j = 0; k + j < K; j++) { LM_T v = x[k + j]; lane[j] = v > lane[j] ? v : lane[j]; nan |= v != v; }
    if (nan) return LM_SFX(lm_first_nan)(K, x);
    LM_T m = lane[0];
    for (j = 1; j < LM_RL; j++) m = lane[j] > m ? lane[j] : m;
    return m;
}

static inline LM_T LM_SFX(lm_row_min)(int64_t K, const LM_T *restrict x)
{
    LM_T lane[LM_RL];
    int64_t k, j;
    int nan = 0;
    for (j = 0; j < LM_RL; j++) lane[j] = (LM_T)INFINITY;
    for (k = 0; k + LM_RL <= K; k += LM_RL) {
        #pragma omp simd reduction(|:nan)
        for (j = 0; j < LM_RL; j++) { LM_T v = x[k + j]; lane[j] = v < lane[j] ? v : lane[j]; nan |= v != v; }
    }
    for (j = 0; k + j < K; j++) { LM_T v = x[k + j]; lane[j] = v < lane[j] ? v : lane[j]; nan |= v != v; }
    if (nan) return LM_SFX(lm_first_nan)(K, x);
    LM_T m = lane[0];
    for (j = 1; j < LM_RL; j++) m = lane[j] < m ? lane[j] : m;
    return m;
}

/* the shift of a logsumexp: the max, or 0 where it is infinite (PyTorch's logsumexp: a row of -inf gives
 * -inf, a row holding +inf gives +inf, never inf - inf = NaN) */
static inline LM_T LM_SFX(lm_lse_shift)(LM_T m)
{
    return (m - m == 0) ? m : (LM_T)0;
}

/* kind: 0 max, 1 min, 2 prod, 3 logsumexp.  x points at x[o, 0, 0], y at y[o, 0]; columns [i0, i0+ni).
 * acc: ni scratch elements (inner > 1). */
static void LM_SFX(lm_reduce_cols)(int64_t kind, int64_t K, int64_t inner, int64_t i0, int64_t ni,
                                   const LM_T *x, LM_T *y, LM_T *acc)
{
    int64_t k, i, j;
    if (inner == 1) {
        const LM_T *restrict r = x;
        LM_T v;
        if (kind == 0) v = LM_SFX(lm_row_max)(K, r);
        else if (kind == 1) v = LM_SFX(lm_row_min)(K, r);
        else if (kind == 2) {
            LM_T lane[LM_RL];
            for (j = 0; j < LM_RL; j++) lane[j] = 1;
            for (k = 0; k + LM_RL <= K; k += LM_RL) {
                #pragma omp simd
                for (j = 0; j < LM_RL; j++) lane[j] *= r[k + j];
            }
            for (j = 0; k + j < K; j++) lane[j] *= r[k + j];
            v = lane[0];
            for (j = 1; j < LM_RL; j++) v *= lane[j];
        } else {
            LM_T m = LM_SFX(lm_row_max)(K, r), sh = LM_SFX(lm_lse_shift)(m), s = 0;
            LM_T lane[LM_RL];
            for (j = 0; j < LM_RL; j++) lane[j] = 0;
            for (k = 0; k + LM_RL <= K; k += LM_RL) {
                #pragma omp simd
                for (j = 0; j < LM_RL; j++) lane[j] += LM_EXP(r[k + j] - sh);
            }
            for (j = 0; k + j < K; j++) lane[j] += LM_EXP(r[k + j] - sh);
            for (j = 0; j < LM_RL; j++) s += lane[j];
            v = LM_LOG(s) + sh;
        }
        y[0] = v;
        return;
    }
    {
        LM_T *restrict a = acc;
        const LM_T init = kind == 0 ? -(LM_T)INFINITY : kind == 1 ? (LM_T)INFINITY : kind == 2 ? (LM_T)1
                          : -(LM_T)INFINITY;
        for (i = 0; i < ni; i++) a[i] = init;
        if (kind != 2) {
            /* max / min: plain compare-selects and one NaN flag for the task (as lm_row_max); a column
               holding a NaN gets its first NaN afterwards */
            int nan = 0;
            if (kind == 1) {
                for (k = 0; k < K; k++) {
                    const LM_T *restrict r = x + k * inner + i0;
                    #pragma omp simd reduction(|:nan)
                    for (i = 0; i < ni; i++) { LM_T v = r[i]; a[i] = v < a[i] ? v : a[i]; nan |= v != v; }
                }
            } else {
                for (k = 0; k < K; k++) {
                    const LM_T *restrict r = x + k * inner + i0;
                    #pragma omp simd reduction(|:nan)
                    for (i = 0; i < ni; i++) { LM_T v = r[i]; a[i] = v > a[i] ? v : a[i]; nan |= v != v; }
                }
            }
            if (nan) {
                for (i = 0; i < ni; i++)
                    for (k = 0; k < K; k++)
                        if (x[k * inner + i0 + i] != x[k * inner + i0 + i]) { a[i] = x[k * inner + i0 + i]; break; }
            }
        } else {
            for (k = 0; k < K; k++) {
                const LM_T *restrict r = x + k * inner + i0;
                #pragma omp simd
                for (i = 0; i < ni; i++) a[i] *= r[i];
            }
        }
        if (kind != 3) {
            LM_T *restrict o = y + i0;
            for (i = 0; i < ni; i++) o[i] = a[i];
            return;
        }
        /* logsumexp: a holds the max; sums go to y, then y = log(y) + shift */
        {
            LM_T *restrict o = y + i0;
            #pragma omp simd
            for (i = 0; i < ni; i++) { a[i] = LM_SFX(lm_lse_shift)(a[i]); o[i] = 0; }
            for (k = 0; k < K; k++) {
                const LM_T *restrict r = x + k * inner + i0;
                #pragma omp simd
                for (i = 0; i < ni; i++) o[i] += LM_EXP(r[i] - a[i]);
            }
            #pragma omp simd
            for (i = 0; i < ni; i++) o[i] = LM_LOG(o[i]) + a[i];
        }
    }
}

/* the first (last: the last) k with x[k] == m -- or, m NaN, with x[k] NaN -- in a row holding it.
 * Blocks of LM_FB elements are tested with a vectorised any-equal, then the hit block is scanned.  Two
 * passes (lm_row_max, then this) measured 2.4x faster than one pass carrying (value, index) lanes. */
#define LM_FB 64
#define LM_FIND(HIT)                                                                                   \
    for (b = 0; b < nb; b++) {                                                                         \
        const int64_t kb = (last ? nb - 1 - b : b) * LM_FB, n = K - kb < LM_FB ? K - kb : LM_FB;       \
        int hit = 0;                                                                                   \
        _Pragma("omp simd reduction(|:hit)") for (j = 0; j < n; j++) hit |= HIT(x[kb + j]);            \
        if (!hit) continue;                                                                            \
        if (last) { for (j = n - 1; j >= 0; j--) if (HIT(x[kb + j])) return kb + j; }                  \
        else { for (j = 0; j < n; j++) if (HIT(x[kb + j])) return kb + j; }                            \
    }
static inline int64_t LM_SFX(lm_find)(int64_t K, const LM_T *restrict x, LM_T m, int64_t last)
{
    const int64_t nb = (K + LM_FB - 1) / LM_FB;
    int64_t b, j;
#define LM_IS_M(v) ((v) == m)
#define LM_IS_NAN(v) ((v) != (v))
    if (m == m) { LM_FIND(LM_IS_M) }
    else { LM_FIND(LM_IS_NAN) }
#undef LM_IS_M
#undef LM_IS_NAN
    return 0;
}
#undef LM_FIND
#undef LM_FB

/* arg max/min over K for columns [i0, i0+ni) of one outer index; y int64.  NumPy's semantics: the first
 * NaN wins (as the largest and as the smallest); select_last: the last occurrence of the extremum (the
 * last NaN).  inner == 1: the extremum, then lm_find; inner > 1: each column tracks its extremum and
 * index over k. */
static void LM_SFX(lm_arg_reduce_cols)(int64_t kind, int64_t last, int64_t K, int64_t inner, int64_t i0,
                                       int64_t ni, const LM_T *x, int64_t *y, LM_T *acc)
{
    int64_t k, i;
    if (inner == 1) {
        y[0] = LM_SFX(lm_find)(K, x, kind == 0 ? LM_SFX(lm_row_max)(K, x) : LM_SFX(lm_row_min)(K, x), last);
        return;
    }
    {
        LM_T *restrict a = acc;
        int64_t *restrict o = y + i0;
        const LM_T *restrict r0 = x + i0;
        for (i = 0; i < ni; i++) { a[i] = r0[i]; o[i] = 0; }
        for (k = 1; k < K; k++) {
            const LM_T *restrict r = x + k * inner + i0;
            /* take element k when it beats the current extremum (or ties it, with select_last), unless
               the current one is NaN (a NaN is kept: the first one, or with select_last the last one) */
            if (kind == 0 && !last) {
                #pragma omp simd
                for (i = 0; i < ni; i++) { LM_T v = r[i], c = a[i];
                    int t = (v > c || (v != v && c == c)); a[i] = t ? v : c; o[i] = t ? k : o[i]; }
            } else if (kind == 0) {
                #pragma omp simd
                for (i = 0; i < ni; i++) { LM_T v = r[i], c = a[i];
                    int t = (v >= c && c == c) || v != v; a[i] = t ? v : c; o[i] = t ? k : o[i]; }
            } else if (!last) {
                #pragma omp simd
                for (i = 0; i < ni; i++) { LM_T v = r[i], c = a[i];
                    int t = (v < c || (v != v && c == c)); a[i] = t ? v : c; o[i] = t ? k : o[i]; }
            } else {
                #pragma omp simd
                for (i = 0; i < ni; i++) { LM_T v = r[i], c = a[i];
                    int t = (v <= c && c == c) || v != v; a[i] = t ? v : c; o[i] = t ? k : o[i]; }
            }
        }
    }
}

/* log_softmax over the middle axis, for one outer index: y = x - m - log(sum(exp(x - m))), m = the max
 * (unguarded, as ONNX's reference and PyTorch: a +inf or an all -inf slice gives NaN, as softmax does).
 * tmp: 2 * inner elements. */
static void LM_SFX(lm_log_softmax_outer)(int64_t K, int64_t inner, const LM_T *x, LM_T *y, LM_T *tmp)
{
    int64_t k, i, j;
    if (inner == 1) {
        const LM_T sh = LM_SFX(lm_row_max)(K, x);
        LM_T lane[LM_RL], s = 0;
        for (j = 0; j < LM_RL; j++) lane[j] = 0;
        for (k = 0; k + LM_RL <= K; k += LM_RL) {
            #pragma omp simd
            for (j = 0; j < LM_RL; j++) lane[j] += LM_EXP(x[k + j] - sh);
        }
        for (j = 0; k + j < K; j++) lane[j] += LM_EXP(x[k + j] - sh);
        for (j = 0; j < LM_RL; j++) s += lane[j];
        const LM_T c = sh + LM_LOG(s);
        #pragma omp simd
        for (k = 0; k < K; k++) y[k] = x[k] - c;
        return;
    }
    {
        LM_T *restrict m = tmp, *restrict s = tmp + inner;
        LM_SFX(lm_reduce_cols)(0, K, inner, 0, inner, x, m, s);  /* the max of each column, into m */
        for (i = 0; i < inner; i++) s[i] = 0;
        for (k = 0; k < K; k++) {
            const LM_T *restrict xr = x + k * inner;
            #pragma omp simd
            for (i = 0; i < inner; i++) s[i] += LM_EXP(xr[i] - m[i]);
        }
        #pragma omp simd
        for (i = 0; i < inner; i++) s[i] = m[i] + LM_LOG(s[i]);
        for (k = 0; k < K; k++) {
            const LM_T *restrict xr = x + k * inner;
            LM_T *restrict yr = y + k * inner;
            #pragma omp simd
            for (i = 0; i < inner; i++) yr[i] = xr[i] - s[i];
        }
    }
}
#undef LM_RL

#undef LM_BINARY
#undef LM_UNARY
#undef LM_MASKED
#undef LM_TERNARY
#undef LM_UNARY_MV
#undef LM_BINARY_MV
#undef LM_TERNARY_MV
#undef LM_MASKED_MV
#undef LM_UNARY_WITH
#undef LM_BINARY_WITH
#undef LM_TERNARY_WITH
#undef LM_STEP_LOOP
#undef LM_SIMD

/* ---- layer normalisation (format 2.2: layer_norm, layer_norm_grad) ----------------------------------
 * Row sums run in LM_LN_LANES fixed lanes of double, combined in lane order, then the tail: the result
 * depends on neither the thread count nor the vector width (the ISA), and float32 rows of thousands of
 * elements keep double accuracy in their statistics. */
#ifndef LM_LN_LANES
#define LM_LN_LANES 16
#endif

/* sum of f(j) over a row of n, in lanes (a macro: f is an expression of j) */
#define LM_LN_SUM(OUT, n, EXPR)                                                                      \
    do {                                                                                            \
        double acc_[LM_LN_LANES] = {0};                                                             \
        int64_t j_, l_, nb_ = (n) / LM_LN_LANES * LM_LN_LANES;                                      \
        for (j_ = 0; j_ < nb_; j_ += LM_LN_LANES) {                                                 \
            _Pragma("omp simd")                                                                     \
            for (l_ = 0; l_ < LM_LN_LANES; l_++) { const int64_t j = j_ + l_; acc_[l_] += (EXPR); } \
        }                                                                                           \
        double s_ = 0;                                                                              \
        for (l_ = 0; l_ < LM_LN_LANES; l_++) s_ += acc_[l_];                                        \
        for (j_ = nb_; j_ < (n); j_++) { const int64_t j = j_; s_ += (EXPR); }                      \
        (OUT) = s_;                                                                                 \
    } while (0)

/* one row of n >= 1: mean, biased variance of (x - mean) (two passes: no cancellation), rstd =
 * 1/sqrt(var + eps); y = (x - mean) * rstd * scale + bias */
static void LM_SFX(lm_layer_norm_row)(int64_t n, const LM_T *restrict x, const LM_T *restrict scale,
                                      const LM_T *restrict bias, double eps, LM_T *restrict y,
                                      LM_T *restrict mean_out, LM_T *restrict rstd_out)
{
    double s, v;
    LM_LN_SUM(s, n, (double)x[j]);
    const double mean = s / (double)n;
    LM_LN_SUM(v, n, ((double)x[j] - mean) * ((double)x[j] - mean));
    const double rstd = 1.0 / sqrt(v / (double)n + eps);
    const LM_T m = (LM_T)mean, r = (LM_T)rstd;
    int64_t j;
    #pragma omp simd
    for (j = 0; j < n; j++) y[j] = (x[j] - m) * r * scale[j] + bias[j];
    *mean_out = m;
    *rstd_out = r;
}

/* dx of one row: with xh = (x - mean) * rstd and gs = dy * scale,
 * dx = rstd * (gs - mean(gs) - xh * mean(gs * xh)) */
static void LM_SFX(lm_layer_norm_grad_row)(int64_t n, const LM_T *restrict x, const LM_T *restrict scale,
                                           LM_T mean, LM_T rstd, const LM_T *restrict dy, LM_T *restrict dx)
{
    double a, b;
    LM_LN_SUM(a, n, (double)(dy[j] * scale[j]));
    LM_LN_SUM(b, n, (double)(dy[j] * scale[j]) * (double)((x[j] - mean) * rstd));
    const LM_T c1 = (LM_T)(a / (double)n), c2 = (LM_T)(b / (double)n);
    int64_t j;
    #pragma omp simd
    for (j = 0; j < n; j++) dx[j] = rstd * (dy[j] * scale[j] - c1 - (x[j] - mean) * rstd * c2);
}

/* dscale[j] = sum over rows of dy * xh, dbias[j] = sum over rows of dy, for columns [j0, j0 + nj): rows
 * summed in order, so each column's result is the same for any split of the columns among threads */
static void LM_SFX(lm_layer_norm_grad_cols)(int64_t rows, int64_t n, int64_t j0, int64_t nj,
                                            const LM_T *restrict x, const LM_T *restrict mean,
                                            const LM_T *restrict rstd, const LM_T *restrict dy,
                                            LM_T *restrict dscale, LM_T *restrict dbias)
{
    int64_t r, j;
    for (j = j0; j < j0 + nj; j++) { dscale[j] = 0; dbias[j] = 0; }
    for (r = 0; r < rows; r++) {
        const LM_T *restrict xr = x + r * n, *restrict dr = dy + r * n;
        const LM_T m = mean[r], rs = rstd[r];
        #pragma omp simd
        for (j = j0; j < j0 + nj; j++) { dscale[j] += dr[j] * ((xr[j] - m) * rs); dbias[j] += dr[j]; }
    }
}

/* ---- RMS normalisation (format 2.3: rms_norm, rms_norm_grad): layer_norm without centring or bias.
 * rstd = 1/sqrt(sum(x^2) / n + eps) (the lanes above: thread- and ISA-independent), y = x * rstd * scale */
static void LM_SFX(lm_rms_norm_row)(int64_t n, const LM_T *restrict x, const LM_T *restrict scale, double eps,
                                    LM_T *restrict y, LM_T *restrict rstd_out)
{
    double v;
    LM_LN_SUM(v, n, (double)x[j] * (double)x[j]);
    const LM_T r = (LM_T)(1.0 / sqrt(v / (double)n + eps));
    int64_t j;
    #pragma omp simd
    for (j = 0; j < n; j++) y[j] = x[j] * r * scale[j];
    *rstd_out = r;
}

/* dx of one row: with xh = x * rstd and gs = dy * scale, dx = rstd * (gs - xh * mean(gs * xh)) */
static void LM_SFX(lm_rms_norm_grad_row)(int64_t n, const LM_T *restrict x, const LM_T *restrict scale,
                                         LM_T rstd, const LM_T *restrict dy, LM_T *restrict dx)
{
    double b;
    LM_LN_SUM(b, n, (double)(dy[j] * scale[j]) * (double)(x[j] * rstd));
    const LM_T c2 = (LM_T)(b / (double)n);
    int64_t j;
    #pragma omp simd
    for (j = 0; j < n; j++) dx[j] = rstd * (dy[j] * scale[j] - x[j] * rstd * c2);
}

/* dscale[j] = sum over rows of dy * xh for columns [j0, j0 + nj), rows in order (any column split) */
static void LM_SFX(lm_rms_norm_grad_cols)(int64_t rows, int64_t n, int64_t j0, int64_t nj,
                                          const LM_T *restrict x, const LM_T *restrict rstd,
                                          const LM_T *restrict dy, LM_T *restrict dscale)
{
    int64_t r, j;
    for (j = j0; j < j0 + nj; j++) dscale[j] = 0;
    for (r = 0; r < rows; r++) {
        const LM_T *restrict xr = x + r * n, *restrict dr = dy + r * n;
        const LM_T rs = rstd[r];
        #pragma omp simd
        for (j = j0; j < j0 + nj; j++) dscale[j] += dr[j] * (xr[j] * rs);
    }
}
#undef LM_LN_SUM

/* ---- dropout (format 2.2: dropout) ---------------------------------------------------------------------
 * Element i of the tensor takes word (i / 8) mod 4 of the Philox4x32-10 block whose counter is
 * (b as 64 bits, step as 64 bits), b = (i / 32) * 8 + i mod 8, key = seed (low word first): a group of 32
 * elements is 8 blocks, and word k of those 8 blocks covers its 8 elements 8k .. 8k + 7, so a vector of 8
 * generated blocks lines up with 8 contiguous elements (no transposition).  keep = (r >= thresh), i.e.
 * r / 2^32 >= p with thresh = ceil(p * 2^32); y = x * (keep ? scale : 0), as PyTorch (x * mask / (1 - p):
 * a NaN or Inf stays NaN where it is dropped).  The bits depend on (seed, step, i) only. */
#ifndef LM_DROP_GROUPS
#define LM_DROP_GROUPS 16  /* groups of 32 elements generated per batch: 128 blocks, 2 KB of words in L1 */
#endif

/* words r[k][j] of the blocks blk0 + j, j < nblk (a multiple of 8; blk0 too) */
#if defined(__AVX2__)
static inline __attribute__((always_inline)) void LM_SFX(lm_mulhilo8)(__m256i a, __m256i m, __m256i *hi,
                                                                      __m256i *lo)
{
    /* 32 x 32 -> 64-bit products of the even lanes, then of the odd lanes; blends reassemble the halves */
    const __m256i pe = _mm256_mul_epu32(a, m), po = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
    *lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
    *hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
}
#endif

static inline void LM_SFX(lm_philox_fill)(uint64_t blk0, int64_t nblk, uint32_t k0, uint32_t k1, uint32_t s0,
                                          uint32_t s1, uint32_t r[4][8 * LM_DROP_GROUPS])
{
    int64_t j;
#if defined(__AVX2__)
    const __m256i m0 = _mm256_set1_epi32((int)LM_PHILOX_M0), m1 = _mm256_set1_epi32((int)LM_PHILOX_M1);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (j = 0; j < nblk; j += 8) {
        /* blk0 + j is a multiple of 8: its 8 blocks share the high word (2^32 is a multiple of 8) */
        const uint64_t b = blk0 + (uint64_t)j;
        __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32((int)(uint32_t)b), lane);
        __m256i c1 = _mm256_set1_epi32((int)(uint32_t)(b >> 32));
        __m256i c2 = _mm256_set1_epi32((int)s0), c3 = _mm256_set1_epi32((int)s1), h0, l0, h1, l1;
        uint32_t a0 = k0, a1 = k1;
        int q;
        for (q = 0; q < 10; q++) {
            if (q) {
                a0 += LM_PHILOX_W0;
                a1 += LM_PHILOX_W1;
            }
            LM_SFX(lm_mulhilo8)(c0, m0, &h0, &l0);
            LM_SFX(lm_mulhilo8)(c2, m1, &h1, &l1);
            c0 = _mm256_xor_si256(_mm256_xor_si256(h1, c1), _mm256_set1_epi32((int)a0));
            c1 = l1;
            c2 = _mm256_xor_si256(_mm256_xor_si256(h0, c3), _mm256_set1_epi32((int)a1));
            c3 = l0;
        }
        _mm256_storeu_si256((__m256i *)(r[0] + j), c0);
        _mm256_storeu_si256((__m256i *)(r[1] + j), c1);
        _mm256_storeu_si256((__m256i *)(r[2] + j), c2);
        _mm256_storeu_si256((__m256i *)(r[3] + j), c3);
    }
#else
    #pragma omp simd
    for (j = 0; j < nblk; j++) {
        const uint64_t b = blk0 + (uint64_t)j;
        uint32_t c0 = (uint32_t)b, c1 = (uint32_t)(b >> 32), c2 = s0, c3 = s1;
        LM_PHILOX4X32_10(c0, c1, c2, c3, k0, k1);
        r[0][j] = c0;
        r[1][j] = c1;
        r[2][j] = c2;
        r[3][j] = c3;
    }
#endif
}

/* y[i] = x[i] * (keep(i) ? scale : 0) for i in [i0, i0 + n); i0 is a multiple of 32 (x, y: the whole
 * tensors).  A chunk boundary never splits a group, so chunks can run on any threads in any order. */
static void LM_SFX(lm_dropout)(int64_t i0, int64_t n, uint64_t seed, uint64_t step, uint32_t thresh, LM_T scale,
                               const LM_T *restrict x, LM_T *restrict y)
{
    const uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32), s0 = (uint32_t)step, s1 = (uint32_t)(step >> 32);
    uint32_t r[4][8 * LM_DROP_GROUPS];
    int64_t e = i0, g, q, l;
    const int64_t end = i0 + n;
    int k;
    while (e < end) {
        const int64_t left = (end - e + 31) / 32, ng = left < LM_DROP_GROUPS ? left : LM_DROP_GROUPS;
        const int64_t e1 = e + 32 * ng < end ? e + 32 * ng : end;
        LM_SFX(lm_philox_fill)((uint64_t)(e / 32) * 8, 8 * ng, k0, k1, s0, s1, r);
        if (e1 - e == 32 * ng) {
            for (g = 0; g < ng; g++)
                for (k = 0; k < 4; k++) {
                    const LM_T *restrict xs = x + e + 32 * g + 8 * k;
                    LM_T *restrict ys = y + e + 32 * g + 8 * k;
                    const uint32_t *restrict rs = r[k] + 8 * g;
                    #pragma omp simd
                    for (l = 0; l < 8; l++) ys[l] = xs[l] * (rs[l] >= thresh ? scale : (LM_T)0);
                }
        } else {  /* the tensor's last, partial group */
            for (q = 0; q < e1 - e; q++)
                y[e + q] = x[e + q] * (r[(q / 8) % 4][8 * (q / 32) + q % 8] >= thresh ? scale : (LM_T)0);
        }
        e = e1;
    }
}

/* batch normalisation (format 2.3): a file of its own, part of this template */
#include "kernels_batchnorm.h"

/* convolution microkernels over shifted-row tiles (format 2.3 conv algo 1): a file of its own, part of this template */
#include "kernels_conv.h"

/* the own SGEMM of the AVX-512 copy (small-M panels, where single-threaded OpenBLAS is slow) */
#include "kernels_gemm.h"
