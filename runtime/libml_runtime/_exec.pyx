# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The plan interpreter: one call runs a whole flat instruction list with the GIL released.

A plan is an int64 code array of instructions, a float64 constant pool and a list of buffers
(slot 0: the arena of intermediates, slot 1: the persistent state — params and optimizer state —,
slots 2..: the fed inputs).  Every operand is (slot, byte offset).  Instruction header:
``[opcode, length, node_id]`` followed by ``length - 3`` opcode-specific fields (see ``format.py``).

Nothing here checks bounds: ``plan.validate`` has proved every operand extent against the buffer sizes
before ``run_plan`` is ever called (for compiled and loaded plans alike).  Threading: elementwise work,
reductions, softmax and the optimizer use OpenMP (prange); GEMM uses BLAS's own pool, sized by the caller
(threadpoolctl), and is never called from inside an OpenMP region.
"""
cimport numpy as cnp
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, free, calloc
from libc.string cimport memcpy, memset
from libc.math cimport sqrt, pow, ceil
from cython cimport floating
from cython.parallel cimport prange, parallel, threadid
from openmp cimport omp_get_wtime
from scipy.linalg.cython_blas cimport sgemm, dgemm, sgemv, dgemv

cnp.import_array()

cdef extern from "kernels.h" nogil:
    ctypedef struct lm_ew:
        int64_t dtype, ndim, n_in, n_out, n_regs, n_prog, mode, nchunks, scratch_slot, scratch_off
        int64_t rows, inner, nblk, items, red_total
        int64_t dims[8]
        const int64_t *out
        int64_t red_numel[32]
    int lm_ew_decode(const int64_t *c, int64_t n, lm_ew *e)
    enum: LM_MW
    int64_t lm_ew_microprog(const lm_ew *e, int64_t *mp, int fold)
    int lm_ew_lane_ok(const lm_ew *e, int64_t i)
    void lm_ew_span_f32(const lm_ew *e, char **bases, const double *consts, const int64_t *mpf,
                        const int64_t *mpf_end, const int64_t *mpp, const int64_t *mpp_end, int64_t it0,
                        int64_t it1, float *regs, float *partial, float *lanes, int64_t aot)
    void lm_ew_span_f64(const lm_ew *e, char **bases, const double *consts, const int64_t *mpf,
                        const int64_t *mpf_end, const int64_t *mpp, const int64_t *mpp_end, int64_t it0,
                        int64_t it1, double *regs, double *partial, double *lanes, int64_t aot)
    int64_t lm_aot_find(const lm_ew *e, const int64_t *mp, int64_t m)
    const char *lm_aot_name(int64_t k)
    int lm_gemm_own_f32(int ta, int tb, int64_t m, int64_t n, int64_t k, float alpha, const float *A,
                        int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc)
    void lm_ew_combine_f32(const lm_ew *e, char **bases, const double *consts, const float *partial)
    void lm_ew_combine_f64(const lm_ew *e, char **bases, const double *consts, const double *partial)
    void lm_softmax_outer_f32(int64_t K, int64_t inner, const float *x, float *y, float *tmp)
    void lm_softmax_outer_f64(int64_t K, int64_t inner, const double *x, double *y, double *tmp)
    float lm_xent_f32(int64_t B, int64_t C, const float *z, int64_t ldt, const char *lab)
    double lm_xent_f64(int64_t B, int64_t C, const double *z, int64_t ldt, const char *lab)
    double lm_xent_grad_row_f32(int64_t C, const float *r, int64_t y, float gscale, float *o)
    double lm_xent_grad_row_f64(int64_t C, const double *r, int64_t y, double gscale, double *o)
    void lm_gemv_rows_f32(int64_t K, int64_t N, const float *x, const float *W, int64_t ldw, float *y,
                          float alpha, float beta)
    void lm_gemv_rows_f64(int64_t K, int64_t N, const double *x, const double *W, int64_t ldw, double *y,
                          double alpha, double beta)
    void lm_epilogue_row_f32(int64_t N, float *c, const float *bias, int64_t act)
    void lm_epilogue_row_f64(int64_t N, double *c, const double *bias, int64_t act)
    ctypedef struct lm_epi:
        int64_t vm, b, c
        double bv, cv
    void lm_vm_epilogue_row_f32(const lm_epi *e, int64_t N, float *row, const float *bias, const float *aux,
                                float *cs, float *out)
    void lm_vm_epilogue_row_f64(const lm_epi *e, int64_t N, double *row, const double *bias, const double *aux,
                                double *cs, double *out)
    void lm_mask_row_f32(int64_t N, float *c, const float *m, float *cs)
    void lm_mask_row_f64(int64_t N, double *c, const double *m, double *cs)
    void lm_sgd_f32(int64_t n, float *p, const float *g, float *v, float lr, float mom, float wd)
    void lm_sgd_f64(int64_t n, double *p, const double *g, double *v, double lr, double mom, double wd)
    void lm_adam_f32(int64_t n, float *p, const float *g, float *m, float *v, float lr, float b1, float b2,
                     float eps, float wd, float step_size, float inv_sqrt_bc2)
    void lm_adam_f64(int64_t n, double *p, const double *g, double *m, double *v, double lr, double b1,
                     double b2, double eps, double wd, double step_size, double inv_sqrt_bc2)
    void lm_reduce_cols_f32(int64_t kind, int64_t K, int64_t inner, int64_t i0, int64_t ni, const float *x,
                            float *y, float *acc)
    void lm_reduce_cols_f64(int64_t kind, int64_t K, int64_t inner, int64_t i0, int64_t ni, const double *x,
                            double *y, double *acc)
    void lm_arg_reduce_cols_f32(int64_t kind, int64_t last, int64_t K, int64_t inner, int64_t i0, int64_t ni,
                                const float *x, int64_t *y, float *acc)
    void lm_arg_reduce_cols_f64(int64_t kind, int64_t last, int64_t K, int64_t inner, int64_t i0, int64_t ni,
                                const double *x, int64_t *y, double *acc)
    void lm_log_softmax_outer_f32(int64_t K, int64_t inner, const float *x, float *y, float *tmp)
    void lm_log_softmax_outer_f64(int64_t K, int64_t inner, const double *x, double *y, double *tmp)
    void lm_layer_norm_row_f32(int64_t n, const float *x, const float *scale, const float *bias, double eps,
                               float *y, float *mean, float *rstd)
    void lm_layer_norm_row_f64(int64_t n, const double *x, const double *scale, const double *bias, double eps,
                               double *y, double *mean, double *rstd)
    void lm_layer_norm_grad_row_f32(int64_t n, const float *x, const float *scale, float mean, float rstd,
                                    const float *dy, float *dx)
    void lm_layer_norm_grad_row_f64(int64_t n, const double *x, const double *scale, double mean, double rstd,
                                    const double *dy, double *dx)
    void lm_layer_norm_grad_cols_f32(int64_t rows, int64_t n, int64_t j0, int64_t nj, const float *x,
                                     const float *mean, const float *rstd, const float *dy, float *dscale,
                                     float *dbias)
    void lm_layer_norm_grad_cols_f64(int64_t rows, int64_t n, int64_t j0, int64_t nj, const double *x,
                                     const double *mean, const double *rstd, const double *dy, double *dscale,
                                     double *dbias)
    void lm_rms_norm_row_f32(int64_t n, const float *x, const float *scale, double eps, float *y, float *rstd)
    void lm_rms_norm_row_f64(int64_t n, const double *x, const double *scale, double eps, double *y, double *rstd)
    void lm_rms_norm_grad_row_f32(int64_t n, const float *x, const float *scale, float rstd, const float *dy,
                                  float *dx)
    void lm_rms_norm_grad_row_f64(int64_t n, const double *x, const double *scale, double rstd, const double *dy,
                                  double *dx)
    void lm_rms_norm_grad_cols_f32(int64_t rows, int64_t n, int64_t j0, int64_t nj, const float *x,
                                   const float *rstd, const float *dy, float *dscale)
    void lm_rms_norm_grad_cols_f64(int64_t rows, int64_t n, int64_t j0, int64_t nj, const double *x,
                                   const double *rstd, const double *dy, double *dscale)
    void lm_dropout_f32(int64_t i0, int64_t n, uint64_t seed, uint64_t step, uint32_t thresh, float scale,
                        const float *x, float *y)
    void lm_dropout_f64(int64_t i0, int64_t n, uint64_t seed, uint64_t step, uint32_t thresh, double scale,
                        const double *x, double *y)
    void lm_conv_tile_f32(int64_t Mp, int64_t Co, int64_t Qp, int64_t K, const float *w, int64_t ldw,
                          int64_t K2, const float *w2, int64_t ldw2, const int64_t *off, const float *tile,
                          float *out, int64_t ldo)
    void lm_conv_tile_f64(int64_t Mp, int64_t Co, int64_t Qp, int64_t K, const double *w, int64_t ldw,
                          int64_t K2, const double *w2, int64_t ldw2, const int64_t *off, const double *tile,
                          double *out, int64_t ldo)
    void lm_conv_build_f32(const float *src, int64_t Ci, int64_t Hi, int64_t Wi, int64_t sh, int64_t sw,
                           int64_t R0, int64_t Rq, int64_t cmin, int64_t Wq, int64_t tile_n, float *tile)
    void lm_conv_build_f64(const double *src, int64_t Ci, int64_t Hi, int64_t Wi, int64_t sh, int64_t sw,
                           int64_t R0, int64_t Rq, int64_t cmin, int64_t Wq, int64_t tile_n, double *tile)
    void lm_conv_dw_tile_f32(int64_t Mv, int64_t Kp, int64_t Q, const float *dyT, const int64_t *off,
                             const float *tile, float *acc)
    void lm_conv_dw_tile_f64(int64_t Mv, int64_t Kp, int64_t Q, const double *dyT, const int64_t *off,
                             const double *tile, double *acc)
    void lm_conv_ocv_f32(int64_t Mv, int64_t P, int64_t V, int64_t sh, int64_t sw, int64_t Wt, int64_t K,
                         const float *wt, const int64_t *off, const float *tile, float *outT)
    void lm_conv_ocv_f64(int64_t Mv, int64_t P, int64_t V, int64_t sh, int64_t sw, int64_t Wt, int64_t K,
                         const double *wt, const int64_t *off, const double *tile, double *outT)
    void lm_conv_build_pad_f32(const float *src, int64_t Ci, int64_t Hi, int64_t Wi, int64_t r0, int64_t Rt,
                               int64_t pw, int64_t Wt, int64_t tile_n, float *tile)
    void lm_conv_build_pad_f64(const double *src, int64_t Ci, int64_t Hi, int64_t Wi, int64_t r0, int64_t Rt,
                               int64_t pw, int64_t Wt, int64_t tile_n, double *tile)
    void lm_conv_ocv_unpack_f32(int64_t Mv, int64_t Co, int64_t P, const float *src, float *dst, int64_t ldd)
    void lm_conv_ocv_unpack_f64(int64_t Mv, int64_t Co, int64_t P, const double *src, double *dst, int64_t ldd)
    void lm_batch_norm_channel_f32(int64_t N, int64_t C, int64_t S, int64_t c, int64_t flags, double eps,
                                   double mom, const float *x, const float *scale, const float *bias, float *rmean,
                                   float *rvar, float *y, float *mean, float *rstd, float *nmean, float *nvar)
    void lm_batch_norm_channel_f64(int64_t N, int64_t C, int64_t S, int64_t c, int64_t flags, double eps,
                                   double mom, const double *x, const double *scale, const double *bias,
                                   double *rmean, double *rvar, double *y, double *mean, double *rstd,
                                   double *nmean, double *nvar)
    void lm_batch_norm_grad_channel_f32(int64_t N, int64_t C, int64_t S, int64_t c, int64_t flags, const float *x,
                                        const float *scale, const float *mean, const float *rstd, const float *dy,
                                        const float *y, float *dx, float *dscale, float *dbias)
    void lm_batch_norm_grad_channel_f64(int64_t N, int64_t C, int64_t S, int64_t c, int64_t flags,
                                        const double *x, const double *scale, const double *mean,
                                        const double *rstd, const double *dy, const double *y, double *dx,
                                        double *dscale, double *dbias)
    int lm_nonfinite_f32(int64_t n, const float *x)
    int lm_nonfinite_f64(int64_t n, const double *x)
    int lm_int_binary_row(int64_t dt, int64_t op, int64_t n, const char *a, int64_t sa,
                          const char *b, int64_t sb, char *o)
    int64_t lm_int_out_itemsize(int64_t dt, int64_t op)
    const int64_t lm_itemsize[]
    void lm_select_row(int64_t isz, int64_t n, const unsigned char *c, int64_t sc, const char *a, int64_t sa,
                       const char *b, int64_t sb, char *o)
    int lm_cast(int64_t sdt, int64_t ddt, int64_t n, const char *src, char *dst)
    void lm_copy_row(int64_t isz, int64_t n, const char *src, int64_t s, char *dst)
    void lm_copy_row2(int64_t isz, int64_t n, const char *src, int64_t s, char *dst, int64_t ds)
    int64_t lm_load_as_i64(int64_t dt, const char *p, int64_t i)
    int64_t lm_bad_label(int64_t dt, const char *lab, int64_t B, int64_t C)
    int64_t lm_copy_labels(int64_t dt, const char *lab, int64_t B, int64_t C, int64_t *out)
    enum: LM_DT_I64
    int lm_isa_init(const char *name)
    const char *lm_isa_name()

# opcodes, error codes, limits and every instruction field's offset (LM_F_<OP>_<field>): generated from
# format.py by format_codegen.py at build time
include "format_gen.pxi"

# below this many elements an instruction runs on the calling thread: an OpenMP region costs more
DEF PAR_MIN = 32768


cdef inline int _threads(int64_t work, int nthreads) noexcept nogil:
    return nthreads if work >= PAR_MIN else 1


cdef inline char* _ptr(char **bases, const int64_t *f) noexcept nogil:
    return bases[f[0]] + f[1]


cdef inline int64_t _unravel(int64_t ndim, const int64_t *dims, int64_t row, const int64_t *s) noexcept nogil:
    """element offset of the first element of `row` (row-major over dims[0..ndim-2])"""
    cdef int64_t off = 0, d, q
    d = ndim - 2
    while d >= 0:
        q = row // dims[d]
        off += (row - q * dims[d]) * s[d]
        row = q
        d -= 1
    return off


# ------------------------------------------------------------------------------------------------
# fused elementwise / reduction

# 0: no column sum is fused into its step (tests compare the bits both ways; set_ew_fold)
cdef int _ew_fold = 1
# 0: no ahead-of-time kernel (vm_aot.py) replaces the VM (tests compare both ways; set_ew_aot)
cdef int _ew_aot = 1
# micro-program records (steps + outputs) of one instruction held on _ew's stack; larger ones are malloc'd
cdef enum:
    EW_STACK_RECORDS = 48


cdef int _ew(floating dummy, const int64_t *f, int64_t nf, char **bases, const double *consts,
             int nthreads) noexcept nogil:
    cdef lm_ew e
    cdef int64_t it, c, lo, hi, nt, nmf, npp, unit, nlane, per, aot
    cdef int t
    cdef const int64_t *o
    cdef int64_t *mp
    cdef int64_t *mpp
    cdef int64_t *mp_heap = NULL
    cdef int64_t mp_stack[2 * EW_STACK_RECORDS * LM_MW]
    cdef floating zero
    cdef floating *dst
    cdef floating *regs
    cdef floating *ws
    cdef floating *partial = NULL
    cdef int k
    if lm_ew_decode(f, nf, &e) != 0:
        return ERR_MALFORMED
    if e.items == 0:
        # an empty iteration space: reductions are sums over nothing, i.e. zeros, times their scale (the
        # arena is reused, so leaving them unwritten would return stale values).  A mean over nothing
        # has scale NaN (as NumPy's mean of an empty array is NaN), so 0 * scale gives it.
        if e.mode != 0:
            for k in range(e.n_out):
                o = e.out + k * (5 + e.ndim)
                if o[3 + e.ndim]:
                    zero = <floating>(0.0 * consts[o[4 + e.ndim]]) if o[4 + e.ndim] >= 0 else 0
                    dst = <floating*>(bases[o[0]] + o[1])
                    for it in range(e.red_numel[k]):
                        dst[it] = zero
        return 0
    nt = _threads(e.items * LM_BLK if e.nblk > 1 else e.rows * e.inner, nthreads)
    # the micro-programs (kernels.h, lm_ew_microprog): for whole blocks with the column sums fused into
    # their steps, for partial blocks without; built once, shared read-only by the threads
    # (on the stack for programs of up to EW_STACK_RECORDS steps and outputs: no allocation on the hot
    # path of small plans; the heap beyond)
    mp = mp_stack
    if e.n_prog + e.n_out > EW_STACK_RECORDS:
        mp = mp_heap = <int64_t*>malloc(2 * (e.n_prog + e.n_out) * LM_MW * sizeof(int64_t))
        if mp == NULL:
            return ERR_NOMEM
    mpp = mp + (e.n_prog + e.n_out) * LM_MW
    nmf = lm_ew_microprog(&e, mp, _ew_fold)
    npp = lm_ew_microprog(&e, mpp, 0)
    if nmf < 0 or npp < 0:
        free(mp_heap)
        return ERR_MALFORMED
    # a program compiled ahead of time (vm_aot.txt) runs its whole blocks as one loop
    aot = lm_aot_find(&e, mp, nmf) if _ew_aot else -1
    if e.mode == 2:
        # general reductions: a fixed number of chunks (independent of the thread count) accumulate
        # private partial sums, combined afterwards in chunk order -> bit-identical for any nthreads
        partial = <floating*>(bases[e.scratch_slot] + e.scratch_off)
        nt = nt if e.nchunks > 1 else 1
    # one checked allocation for every thread's registers and lane rows (kernels.h, lm_ew_lane_ok: the
    # whole sums fused into their steps), before the region (a malloc failing inside it could not stop
    # the step)
    nlane = 0
    if e.mode == 2 and _ew_fold:
        for k in range(e.n_out):
            nlane += lm_ew_lane_ok(&e, k)
    per = e.n_regs * LM_BLK + nlane * e.nblk * LM_BLK
    ws = <floating*>malloc(nt * per * sizeof(floating))
    if ws == NULL:
        free(mp_heap)
        return ERR_NOMEM
    if nt == 1 and e.mode != 2:
        _ew_span(&e, bases, consts, mp, nmf, mpp, npp, 0, e.items, ws, <floating*>NULL, <floating*>NULL, aot)
    elif e.mode != 2:
        # mode 0: contiguous runs of blocks; mode 1 (reductions along the innermost dim only): of whole
        # rows, each row's blocks summed in order
        unit = e.nblk if e.mode == 1 else 1
        with parallel(num_threads=nt):
            t = threadid()
            lo = ((e.items // unit) * t) // nt
            hi = ((e.items // unit) * (t + 1)) // nt
            _ew_span(&e, bases, consts, mp, nmf, mpp, npp, lo * unit, hi * unit,
                     ws + t * per, <floating*>NULL, <floating*>NULL, aot)
    else:
        with parallel(num_threads=nt):
            regs = ws + threadid() * per
            for c in prange(e.nchunks, schedule="static"):
                memset(partial + c * e.red_total, 0, e.red_total * sizeof(floating))
                lo = (e.items * c) // e.nchunks
                hi = (e.items * (c + 1)) // e.nchunks
                _ew_span(&e, bases, consts, mp, nmf, mpp, npp, lo, hi, regs, partial + c * e.red_total,
                         regs + e.n_regs * LM_BLK if nlane > 0 else <floating*>NULL, aot)
    free(ws)
    free(mp_heap)
    if e.mode == 2:
        if floating is float:
            lm_ew_combine_f32(&e, bases, consts, partial)
        else:
            lm_ew_combine_f64(&e, bases, consts, partial)
    return 0


cdef inline void _ew_span(const lm_ew *e, char **bases, const double *consts, const int64_t *mpf, int64_t nf,
                          const int64_t *mpp, int64_t npp, int64_t it0, int64_t it1, floating *regs,
                          floating *partial, floating *lanes, int64_t aot) noexcept nogil:
    if floating is float:
        lm_ew_span_f32(e, bases, consts, mpf, mpf + nf * LM_MW, mpp, mpp + npp * LM_MW, it0, it1, regs, partial,
                       lanes, aot)
    else:
        lm_ew_span_f64(e, bases, consts, mpf, mpf + nf * LM_MW, mpp, mpp + npp * LM_MW, it0, it1, regs, partial,
                       lanes, aot)


# ------------------------------------------------------------------------------------------------
# GEMM through BLAS (row-major wrapper: C^T = B^T A^T in BLAS's column-major terms)
# fields: dtype M N K transA transB A(2) B(2) C(2) alpha_c beta_c bias(2) act bdim bdims sA sB sC
#         mask(2) colsum(2)   (act 0 none, 1 relu, 2 relu-backward: C *= mask > 0; slot -1 = absent)
#
# One thread pool only: BLAS runs single-threaded (the caller pins it with threadpoolctl) and the
# runtime splits each GEMM into per-thread panels inside its own OpenMP region -- two pools spinning
# on the same cores cost 10-40x on a 2-core machine (measured: W2 step 6 ms -> 256 ms).  The bias /
# activation epilogue runs on each panel right after BLAS wrote it, while it is still in cache.

DEF GEMM_PAR_FLOPS = 4000000   # below this a GEMM runs on the calling thread, in one piece
DEF GEMV_PAR_ELEMS = 131072   # a GEMV is memory-bound: split it once the matrix is this large
DEF GEMV_KPARTS = 2           # ... into this many contiguous blocks of K rows (see _gemv_ksplit)
DEF GEMV_KSPLIT_MIN_K = 64    # ... when K has at least this many rows (else into column panels)
DEF GEMM_PANELS = 4            # panels of a very large GEMM (a multiple of the usual 1-2-4 thread counts)
DEF GEMM_PANELS_MID = 2        # ... of a GEMM under GEMM_BIG_FLOPS: each panel re-packs the shared operand,
DEF GEMM_BIG_FLOPS = 1.5e9     # so fewer panels win there (W2, W5 at batch 1024: ~7%) and lose on W3 (~5%)

cdef inline void _blas(floating dummy, char ta, char tb, int m, int n, int k, floating alpha,
                       floating *A, int lda, floating *B, int ldb, floating beta, floating *C, int ldc) noexcept nogil:
    # row-major C(m,n) = op(A)(m,k) op(B)(k,n)  ==  column-major C^T = op(B)^T op(A)^T
    cdef int one = 1
    cdef char gt
    cdef int gm, gn
    if m == 1 and tb == b'N':
        # a row vector times a row-major matrix: our own register-tiled kernel streams B row by row
        # (memory-bound; W5 at batch 1: run_plan 42 -> 30 us against OpenBLAS's sgemv in the same panels)
        if floating is float:
            lm_gemv_rows_f32(k, n, A, B, ldb, C, alpha, beta)
        else:
            lm_gemv_rows_f64(k, n, A, B, ldb, C, alpha, beta)
        return
    if m == 1:
        # a row vector times a matrix is a GEMV (memory-bound; BLAS's GEMM path is several times slower).
        # C^T (n) = op(B)^T (n x k) a (k): transposed storage (n,k) is column-major (k,n) with ld k -> 'T'.
        gt = b'T' if tb == b'T' else b'N'
        gm = k if tb == b'T' else n
        gn = n if tb == b'T' else k
        if floating is float:
            sgemv(&gt, &gm, &gn, &alpha, B, &ldb, A, &one, &beta, C, &one)
        else:
            dgemv(&gt, &gm, &gn, &alpha, B, &ldb, A, &one, &beta, C, &one)
        return
    if floating is float:
        # the AVX-512 copy's own SGEMM where it beats single-threaded OpenBLAS (kernels_gemm.h: small-M
        # panels); -1 from every other copy and size, which run BLAS
        if lm_gemm_own_f32(ta == b'T', tb == b'T', m, n, k, alpha, A, lda, B, ldb, beta, C, ldc) == 0:
            return
        sgemm(&tb, &ta, &n, &m, &k, &alpha, B, &ldb, A, &lda, &beta, C, &ldc)
    else:
        dgemm(&tb, &ta, &n, &m, &k, &alpha, B, &ldb, A, &lda, &beta, C, &ldc)


cdef inline void _panel(floating dummy, int part, int nparts, bint split_m, int M, int N, int K, bint ta, bint tb,
                        floating alpha, floating *A, int lda, floating *B, int ldb, floating beta,
                        floating *C, int ldc, floating *bias, int64_t act,
                        floating *mask=NULL, floating *colsum=NULL, const lm_epi *epi=NULL,
                        floating *Y=NULL) noexcept nogil:
    """Panel ``part`` of ``nparts`` of one GEMM (rows of C if split_m, else columns), then its epilogue.

    Backward epilogue (act 2): C *= (mask > 0) -- relu's gradient from its output -- and, with colsum,
    the column sums of the result (the bias gradient), in row order.  Column sums need whole columns,
    so the caller splits such GEMMs by columns only: each panel owns its columns, no partials.
    act 3: the VM-step epilogue ``epi`` (gemm_ex) on each row, after the bias, with ``mask`` as its
    auxiliary operand and ``colsum`` as above; with ``Y`` (gemm_ex_keep) the epilogue's result goes to Y
    (same layout as C) and C keeps the GEMM + bias value."""
    cdef int total = M if split_m else N
    cdef int step = ((total + nparts - 1) // nparts + 15) // 16 * 16
    cdef int lo = part * step, hi = lo + step, i
    cdef char cta = b'T' if ta else b'N'
    cdef char ctb = b'T' if tb else b'N'
    if hi > total:
        hi = total
    if lo >= hi:
        return
    if split_m:
        # rows lo..hi of op(A): row-major (M,K) -> +lo*lda ; transposed storage (K,M) -> +lo
        _blas(dummy, cta, ctb, hi - lo, N, K, alpha, A + (lo if ta else <int64_t>lo * lda), lda, B, ldb,
              beta, C + <int64_t>lo * ldc, ldc)
        if act == 3:  # (never with colsum: those are split by columns)
            for i in range(lo, hi):
                _vm_epi_row(dummy, epi, N, C + <int64_t>i * ldc, bias,
                            mask + <int64_t>i * ldc if mask != NULL else NULL, <floating*>NULL,
                            Y + <int64_t>i * ldc if Y != NULL else NULL)
        elif act == 2:  # (never with colsum: those are split by columns)
            for i in range(lo, hi):
                _mask_row(dummy, N, C + <int64_t>i * ldc, mask + <int64_t>i * ldc, <floating*>NULL)
        elif bias != NULL or act != 0:
            for i in range(lo, hi):
                _epi_row(dummy, N, C + <int64_t>i * ldc, bias, act)
    else:
        # columns lo..hi of op(B): row-major (K,N) -> +lo ; transposed storage (N,K) -> +lo*ldb
        _blas(dummy, cta, ctb, M, hi - lo, K, alpha, A, lda, B + (<int64_t>lo * ldb if tb else lo), ldb,
              beta, C + lo, ldc)
        _columns_epilogue(dummy, lo, hi, M, ldc, C, bias, act, mask, colsum, epi, Y)


cdef inline void _columns_epilogue(floating dummy, int lo, int hi, int M, int ldc, floating *C, floating *bias,
                                   int64_t act, floating *mask, floating *colsum, const lm_epi *epi,
                                   floating *Y) noexcept nogil:
    """The epilogue of columns lo..hi of C (M rows, row stride ldc), which this caller owns whole."""
    cdef int i
    if act == 3:
        if colsum != NULL:
            memset(colsum + lo, 0, (hi - lo) * sizeof(floating))
        for i in range(M):
            _vm_epi_row(dummy, epi, hi - lo, C + <int64_t>i * ldc + lo, bias + lo if bias != NULL else NULL,
                        mask + <int64_t>i * ldc + lo if mask != NULL else NULL,
                        colsum + lo if colsum != NULL else NULL, Y + <int64_t>i * ldc + lo if Y != NULL else NULL)
    elif act == 2:
        if colsum != NULL:
            memset(colsum + lo, 0, (hi - lo) * sizeof(floating))
        for i in range(M):
            _mask_row(dummy, hi - lo, C + <int64_t>i * ldc + lo, mask + <int64_t>i * ldc + lo,
                      colsum + lo if colsum != NULL else NULL)
    elif bias != NULL or act != 0:
        for i in range(M):
            _epi_row(dummy, hi - lo, C + <int64_t>i * ldc + lo, bias + lo if bias != NULL else NULL, act)


cdef inline void _vm_epi_row(floating dummy, const lm_epi *e, int64_t n, floating *c, floating *bias, floating *aux,
                             floating *cs, floating *out) noexcept nogil:
    if floating is float:
        lm_vm_epilogue_row_f32(e, n, c, bias, aux, cs, out)
    else:
        lm_vm_epilogue_row_f64(e, n, c, bias, aux, cs, out)


cdef inline void _mask_row(floating dummy, int64_t n, floating *c, floating *m, floating *cs) noexcept nogil:
    if floating is float:
        lm_mask_row_f32(n, c, m, cs)
    else:
        lm_mask_row_f64(n, c, m, cs)


cdef inline void _epi_row(floating dummy, int64_t n, floating *c, floating *bias, int64_t act) noexcept nogil:
    if floating is float:
        lm_epilogue_row_f32(n, c, bias, act)
    else:
        lm_epilogue_row_f64(n, c, bias, act)


cdef int _gemm(floating dummy, const int64_t *f, int64_t nf, char **bases, const double *consts,
               int nthreads, bint ex=False, bint keep=False, bint strided=False) noexcept nogil:
    """gemm, and gemm_ex (ex): the same fields, then the VM-step epilogue's (act 3); gemm_ex_keep (keep):
    then the epilogue's destination Y (C keeps the GEMM + bias value); gemm_strided (strided): gemm's
    fields, then the leading dimensions lda, ldb, ldc (operands read and written in place as views)."""
    cdef int M = <int>f[LM_F_GEMM_M], N = <int>f[LM_F_GEMM_N], K = <int>f[LM_F_GEMM_K]
    cdef bint ta = f[LM_F_GEMM_transA] != 0, tb = f[LM_F_GEMM_transB] != 0
    cdef floating alpha = <floating>consts[f[LM_F_GEMM_alpha]]
    cdef floating beta = <floating>consts[f[LM_F_GEMM_beta]]
    cdef int64_t bdim = f[LM_F_GEMM_batch_ndim], nbatch = 1, bi, d, q, rem, i
    cdef const int64_t *bd = f + LM_F_GEMM_batch_dims
    cdef const int64_t *sA = f + LM_F_GEMM_A_batch_stride(f)
    cdef const int64_t *sB = f + LM_F_GEMM_B_batch_stride(f)
    cdef const int64_t *sC = f + LM_F_GEMM_C_batch_stride(f)
    cdef floating *A = <floating*>_ptr(bases, f + LM_F_GEMM_A_slot)
    cdef floating *B = <floating*>_ptr(bases, f + LM_F_GEMM_B_slot)
    cdef floating *C = <floating*>_ptr(bases, f + LM_F_GEMM_C_slot)
    cdef floating *bias = <floating*>_ptr(bases, f + LM_F_GEMM_bias_slot) if f[LM_F_GEMM_bias_slot] >= 0 else NULL
    cdef int64_t act = f[LM_F_GEMM_act]
    cdef floating *mask = <floating*>_ptr(bases, f + LM_F_GEMM_mask_slot(f)) if f[LM_F_GEMM_mask_slot(f)] >= 0 else NULL
    cdef floating *colsum = <floating*>_ptr(bases, f + LM_F_GEMM_colsum_slot(f)) if f[LM_F_GEMM_colsum_slot(f)] >= 0 else NULL
    cdef lm_epi epi
    cdef floating *Y = <floating*>_ptr(bases, f + LM_F_GEMM_EX_KEEP_y_slot(f)) if keep else NULL
    epi.vm, epi.b, epi.c, epi.bv, epi.cv = -1, 0, 0, 0, 0
    if ex:
        epi.vm = f[LM_F_GEMM_EX_epi_vm(f)]
        epi.b = f[LM_F_GEMM_EX_epi_b(f)]
        epi.c = f[LM_F_GEMM_EX_epi_c(f)]
        if epi.b < 0:
            epi.bv = consts[-epi.b - 1]
        if epi.c < 0:
            epi.cv = consts[-epi.c - 1]
    cdef int lda = (M if ta else K), ldb = (K if tb else N), ldc = N
    cdef int nt, part, nparts
    cdef bint split_m, big
    cdef double flops
    cdef int64_t offA, offB, offC
    if lda < 1: lda = 1
    if ldb < 1: ldb = 1
    if ldc < 1: ldc = 1
    if strided:  # (plan.validate checked them against M, N, K and the buffers)
        lda = <int>f[LM_F_GEMM_STRIDED_lda(f)]
        ldb = <int>f[LM_F_GEMM_STRIDED_ldb(f)]
        ldc = <int>f[LM_F_GEMM_STRIDED_ldc(f)]
    for d in range(bdim):
        nbatch *= bd[d]
    if M == 0 or N == 0 or nbatch == 0:
        return 0
    if K == 0:  # BLAS would leave C untouched for beta = 0 on some implementations
        if beta == 0:
            for bi in range(nbatch):
                for i in range(M):  # (rows of ldc: a strided C is written only where it is C)
                    memset(C + _boff(bi, bdim, bd, sC) + <int64_t>i * ldc, 0, <size_t>N * sizeof(floating))
        if colsum != NULL:
            memset(colsum, 0, <size_t>N * sizeof(floating))
        # the epilogue still applies to the (zero) product: bias, activation, mask, column sums
        if act == 3:
            for bi in range(nbatch):
                for i in range(M):
                    _vm_epi_row(dummy, &epi, N, C + _boff(bi, bdim, bd, sC) + <int64_t>i * N, bias,
                                mask + <int64_t>i * N if mask != NULL else NULL, colsum,
                                Y + _boff(bi, bdim, bd, sC) + <int64_t>i * N if Y != NULL else NULL)
        elif act == 2:
            for i in range(M):
                _mask_row(dummy, N, C + <int64_t>i * N, mask + <int64_t>i * N, colsum)
        elif bias != NULL or act != 0:
            for bi in range(nbatch):
                for i in range(M):
                    _epi_row(dummy, N, C + _boff(bi, bdim, bd, sC) + <int64_t>i * ldc, bias, act)
        return 0
    # Panels depend on the problem size only, never on the thread count: BLAS may pick different
    # micro-kernels for different panel shapes, so a thread-dependent split would make results differ
    # between 1 and 2 threads.  With a fixed split, 1 thread runs the same panels one after another.
    flops = 2.0 * M * N * K * nbatch
    big = flops >= GEMM_PAR_FLOPS or (M == 1 and <double>N * K >= GEMV_PAR_ELEMS)
    nt = nthreads if big else 1
    nparts = (GEMM_PANELS if flops >= GEMM_BIG_FLOPS else GEMM_PANELS_MID) if big else 1
    if nbatch > 1 and big:
        for bi in prange(nbatch, num_threads=nt, schedule="static"):
            _panel(dummy, 0, 1, True, M, N, K, ta, tb, alpha, A + _boff(bi, bdim, bd, sA), lda,
                   B + _boff(bi, bdim, bd, sB), ldb, beta, C + _boff(bi, bdim, bd, sC), ldc, bias, act, mask, colsum, &epi,
                   Y + _boff(bi, bdim, bd, sC) if Y != NULL else NULL)
        return 0
    if M == 1 and not tb and (not ta or lda == 1) and nbatch == 1 and big and K >= GEMV_KSPLIT_MIN_K:
        if _gemv_ksplit(dummy, N, K, alpha, A, B, ldb, beta, C, nt) != 0:
            return ERR_NOMEM
        _columns_epilogue(dummy, 0, N, 1, ldc, C, bias, act, mask, colsum, &epi, Y)
        return 0
    split_m = M >= N and colsum == NULL
    for bi in range(nbatch):
        offA = _boff(bi, bdim, bd, sA)
        offB = _boff(bi, bdim, bd, sB)
        offC = _boff(bi, bdim, bd, sC)
        if nparts == 1:
            _panel(dummy, 0, 1, split_m, M, N, K, ta, tb, alpha, A + offA, lda, B + offB, ldb, beta,
                   C + offC, ldc, bias, act, mask, colsum, &epi, Y + offC if Y != NULL else NULL)
        else:
            for part in prange(nparts, num_threads=nt, schedule="static"):
                _panel(dummy, part, nparts, split_m, M, N, K, ta, tb, alpha, A + offA, lda, B + offB, ldb, beta,
                       C + offC, ldc, bias, act, mask, colsum, &epi, Y + offC if Y != NULL else NULL)
    return 0


cdef int _gemv_ksplit(floating dummy, int N, int K, floating alpha, floating *A, floating *B, int ldb,
                      floating beta, floating *C, int nt) noexcept nogil:
    """C(1, N) = alpha * A(1, K) . B(K, N; row stride ldb) + beta * C as GEMV_KPARTS partial products over
    contiguous blocks of K rows, added in block order.  Why rows, not column panels: a column panel of a
    row-major B is a strided slice (half of every row) and maps onto half the cache's sets -- on a Xeon
    with 2 MB of L2 per core W5's two weight halves (1.3 MB per core) did not stay in L2 that way and
    streamed from L3 at ~33 GB/s per core (C harness: the whole MLP forward 40 us split by columns, 18 us
    by rows).  The blocks depend on K only, so 1 or 2 threads compute the same bits."""
    cdef floating *part = <floating*>malloc(<size_t>GEMV_KPARTS * N * sizeof(floating))
    cdef int p, j
    cdef int64_t k0, k1
    cdef floating acc
    if part == NULL:
        return ERR_NOMEM
    for p in prange(GEMV_KPARTS, num_threads=nt, schedule="static"):
        k0 = <int64_t>K * p // GEMV_KPARTS
        k1 = <int64_t>K * (p + 1) // GEMV_KPARTS
        if floating is float:
            lm_gemv_rows_f32(k1 - k0, N, A + k0, B + k0 * ldb, ldb, part + <int64_t>p * N, 1, 0)
        else:
            lm_gemv_rows_f64(k1 - k0, N, A + k0, B + k0 * ldb, ldb, part + <int64_t>p * N, 1, 0)
    for j in range(N):
        acc = part[j]
        for p in range(1, GEMV_KPARTS):
            acc = acc + part[<int64_t>p * N + j]
        C[j] = alpha * acc if beta == 0 else alpha * acc + beta * C[j]
    free(part)
    return 0


cdef inline int64_t _boff(int64_t bi, int64_t bdim, const int64_t *bd, const int64_t *s) noexcept nogil:
    """element offset of batch index ``bi`` (row-major over bd) for batch strides ``s``"""
    return _unravel(bdim + 1, bd, bi, s)  # bd is the leading dims of a (bdim + 1)-dim iteration


# ------------------------------------------------------------------------------------------------
# softmax, cross-entropy

cdef int _softmax(floating dummy, const int64_t *f, char **bases, int nthreads, bint log=False) noexcept nogil:
    """softmax, and log_softmax (log): the same fields (format.py asserts the layouts are equal)."""
    cdef int64_t outer = f[LM_F_SOFTMAX_outer], K = f[LM_F_SOFTMAX_K], inner = f[LM_F_SOFTMAX_inner], o
    cdef floating *x = <floating*>_ptr(bases, f + LM_F_SOFTMAX_x_slot)
    cdef floating *y = <floating*>_ptr(bases, f + LM_F_SOFTMAX_y_slot)
    cdef floating *tmp
    cdef floating *ws
    cdef int nt = _threads(outer * K * inner, nthreads)
    if outer * K * inner == 0:
        return 0
    ws = <floating*>malloc(nt * (2 * inner + 1) * sizeof(floating))
    if ws == NULL:
        return ERR_NOMEM
    with parallel(num_threads=nt):
        tmp = ws + threadid() * (2 * inner + 1)
        for o in prange(outer, schedule="static"):
            if floating is float:
                if log:
                    lm_log_softmax_outer_f32(K, inner, x + o * K * inner, y + o * K * inner, tmp)
                else:
                    lm_softmax_outer_f32(K, inner, x + o * K * inner, y + o * K * inner, tmp)
            else:
                if log:
                    lm_log_softmax_outer_f64(K, inner, x + o * K * inner, y + o * K * inner, tmp)
                else:
                    lm_softmax_outer_f64(K, inner, x + o * K * inner, y + o * K * inner, tmp)
    free(ws)
    return 0


# ------------------------------------------------------------------------------------------------
# layer normalisation: rows of n, one row per task (the statistics of a row never depend on the split)

DEF LN_COLS = 128  # columns per task of the scale/bias gradients (each task sums all rows of its columns)


cdef int _layer_norm(floating dummy, const int64_t *f, char **bases, const double *consts,
                     int nthreads) noexcept nogil:
    cdef int64_t outer = f[LM_F_LAYER_NORM_outer], n = f[LM_F_LAYER_NORM_n], o
    cdef double eps = consts[f[LM_F_LAYER_NORM_eps]]
    cdef floating *x = <floating*>_ptr(bases, f + LM_F_LAYER_NORM_x_slot)
    cdef floating *sc = <floating*>_ptr(bases, f + LM_F_LAYER_NORM_scale_slot)
    cdef floating *bi = <floating*>_ptr(bases, f + LM_F_LAYER_NORM_bias_slot)
    cdef floating *y = <floating*>_ptr(bases, f + LM_F_LAYER_NORM_y_slot)
    cdef floating *mean = <floating*>_ptr(bases, f + LM_F_LAYER_NORM_mean_slot)
    cdef floating *rstd = <floating*>_ptr(bases, f + LM_F_LAYER_NORM_rstd_slot)
    cdef int nt = _threads(outer * n, nthreads)
    for o in prange(outer, num_threads=nt, schedule="static"):
        if floating is float:
            lm_layer_norm_row_f32(n, x + o * n, sc, bi, eps, y + o * n, mean + o, rstd + o)
        else:
            lm_layer_norm_row_f64(n, x + o * n, sc, bi, eps, y + o * n, mean + o, rstd + o)
    return 0


cdef int _layer_norm_grad(floating dummy, const int64_t *f, char **bases, int nthreads) noexcept nogil:
    cdef int64_t outer = f[LM_F_LAYER_NORM_GRAD_outer], n = f[LM_F_LAYER_NORM_GRAD_n], o, cb
    cdef int64_t ncb = (n + LN_COLS - 1) // LN_COLS
    cdef floating *x = <floating*>_ptr(bases, f + LM_F_LAYER_NORM_GRAD_x_slot)
    cdef floating *sc = <floating*>_ptr(bases, f + LM_F_LAYER_NORM_GRAD_scale_slot)
    cdef floating *mean = <floating*>_ptr(bases, f + LM_F_LAYER_NORM_GRAD_mean_slot)
    cdef floating *rstd = <floating*>_ptr(bases, f + LM_F_LAYER_NORM_GRAD_rstd_slot)
    cdef floating *dy = <floating*>_ptr(bases, f + LM_F_LAYER_NORM_GRAD_dy_slot)
    cdef floating *dx = <floating*>_ptr(bases, f + LM_F_LAYER_NORM_GRAD_dx_slot)
    cdef floating *dsc = <floating*>_ptr(bases, f + LM_F_LAYER_NORM_GRAD_dscale_slot)
    cdef floating *dbi = <floating*>_ptr(bases, f + LM_F_LAYER_NORM_GRAD_dbias_slot)
    cdef int nt = _threads(outer * n, nthreads)
    for o in prange(outer, num_threads=nt, schedule="static"):
        if floating is float:
            lm_layer_norm_grad_row_f32(n, x + o * n, sc, mean[o], rstd[o], dy + o * n, dx + o * n)
        else:
            lm_layer_norm_grad_row_f64(n, x + o * n, sc, mean[o], rstd[o], dy + o * n, dx + o * n)
    for cb in prange(ncb, num_threads=<int>min(<int64_t>nt, ncb), schedule="static"):
        if floating is float:
            lm_layer_norm_grad_cols_f32(outer, n, cb * LN_COLS, min(LN_COLS, n - cb * LN_COLS), x, mean, rstd,
                                        dy, dsc, dbi)
        else:
            lm_layer_norm_grad_cols_f64(outer, n, cb * LN_COLS, min(LN_COLS, n - cb * LN_COLS), x, mean, rstd,
                                        dy, dsc, dbi)
    return 0


cdef int _rms_norm(floating dummy, const int64_t *f, char **bases, const double *consts,
                   int nthreads) noexcept nogil:
    cdef int64_t outer = f[LM_F_RMS_NORM_outer], n = f[LM_F_RMS_NORM_n], o
    cdef double eps = consts[f[LM_F_RMS_NORM_eps]]
    cdef floating *x = <floating*>_ptr(bases, f + LM_F_RMS_NORM_x_slot)
    cdef floating *sc = <floating*>_ptr(bases, f + LM_F_RMS_NORM_scale_slot)
    cdef floating *y = <floating*>_ptr(bases, f + LM_F_RMS_NORM_y_slot)
    cdef floating *rstd = <floating*>_ptr(bases, f + LM_F_RMS_NORM_rstd_slot)
    cdef int nt = _threads(outer * n, nthreads)
    for o in prange(outer, num_threads=nt, schedule="static"):
        if floating is float:
            lm_rms_norm_row_f32(n, x + o * n, sc, eps, y + o * n, rstd + o)
        else:
            lm_rms_norm_row_f64(n, x + o * n, sc, eps, y + o * n, rstd + o)
    return 0


cdef int _rms_norm_grad(floating dummy, const int64_t *f, char **bases, int nthreads) noexcept nogil:
    cdef int64_t outer = f[LM_F_RMS_NORM_GRAD_outer], n = f[LM_F_RMS_NORM_GRAD_n], o, cb
    cdef int64_t ncb = (n + LN_COLS - 1) // LN_COLS
    cdef floating *x = <floating*>_ptr(bases, f + LM_F_RMS_NORM_GRAD_x_slot)
    cdef floating *sc = <floating*>_ptr(bases, f + LM_F_RMS_NORM_GRAD_scale_slot)
    cdef floating *rstd = <floating*>_ptr(bases, f + LM_F_RMS_NORM_GRAD_rstd_slot)
    cdef floating *dy = <floating*>_ptr(bases, f + LM_F_RMS_NORM_GRAD_dy_slot)
    cdef floating *dx = <floating*>_ptr(bases, f + LM_F_RMS_NORM_GRAD_dx_slot)
    cdef floating *dsc = <floating*>_ptr(bases, f + LM_F_RMS_NORM_GRAD_dscale_slot)
    cdef int nt = _threads(outer * n, nthreads)
    for o in prange(outer, num_threads=nt, schedule="static"):
        if floating is float:
            lm_rms_norm_grad_row_f32(n, x + o * n, sc, rstd[o], dy + o * n, dx + o * n)
        else:
            lm_rms_norm_grad_row_f64(n, x + o * n, sc, rstd[o], dy + o * n, dx + o * n)
    for cb in prange(ncb, num_threads=<int>min(<int64_t>nt, ncb), schedule="static"):
        if floating is float:
            lm_rms_norm_grad_cols_f32(outer, n, cb * LN_COLS, min(LN_COLS, n - cb * LN_COLS), x, rstd, dy, dsc)
        else:
            lm_rms_norm_grad_cols_f64(outer, n, cb * LN_COLS, min(LN_COLS, n - cb * LN_COLS), x, rstd, dy, dsc)
    return 0


# ------------------------------------------------------------------------------------------------
# dropout (training mode): Philox4x32-10 masks keyed by (seed, step), regenerated wherever they are needed

DEF DROP_CHUNK = 16384  # elements per task: a multiple of 32, so no task splits a group of Philox blocks


cdef int _dropout(floating dummy, const int64_t *f, char **bases, const double *consts,
                  int nthreads) noexcept nogil:
    """y = x * (keep ? scale : 0), keep = Philox word >= ceil(p * 2^32) (kernels_tmpl.h lm_dropout).  The
    mask depends on (seed, step, element index) only, so the chunks may run on any number of threads."""
    cdef int64_t n = f[LM_F_DROPOUT_n], c, lo
    cdef double p = consts[f[LM_F_DROPOUT_p]], scale = consts[f[LM_F_DROPOUT_scale]], t
    cdef uint64_t seed = <uint64_t>f[LM_F_DROPOUT_seed]
    cdef uint64_t step = <uint64_t>(<int64_t*>_ptr(bases, f + LM_F_DROPOUT_step_slot))[0]
    cdef floating *x = <floating*>_ptr(bases, f + LM_F_DROPOUT_x_slot)
    cdef floating *y = <floating*>_ptr(bases, f + LM_F_DROPOUT_y_slot)
    cdef uint32_t thresh
    cdef int64_t nch = (n + DROP_CHUNK - 1) // DROP_CHUNK
    if not (p >= 0 and p <= 1):  # (NaN too) a constant the validator cannot see: refused here
        return ERR_MALFORMED
    t = ceil(p * 4294967296.0)
    if t >= 4294967296.0:  # no word reaches the threshold: nothing is kept, y = x * 0 (PyTorch's p = 1)
        thresh, scale = 0, 0.0
    else:
        thresh = <uint32_t>t
    for c in prange(nch, num_threads=_threads(n, nthreads), schedule="static"):
        lo = c * DROP_CHUNK
        if floating is float:
            lm_dropout_f32(lo, min(DROP_CHUNK, n - lo), seed, step, thresh, <float>scale, <float*>x, <float*>y)
        else:
            lm_dropout_f64(lo, min(DROP_CHUNK, n - lo), seed, step, thresh, scale, <double*>x, <double*>y)
    return 0


cdef inline void _counter_next(const int64_t *f, char **bases) noexcept nogil:
    # out = counter; counter += 1 (wrapping, as unsigned: never undefined)
    cdef int64_t *cnt = <int64_t*>_ptr(bases, f + LM_F_COUNTER_NEXT_counter_slot)
    (<int64_t*>_ptr(bases, f + LM_F_COUNTER_NEXT_out_slot))[0] = cnt[0]
    cnt[0] = <int64_t>(<uint64_t>cnt[0] + 1)


# ------------------------------------------------------------------------------------------------
# batch normalisation (training mode): one task per channel, so a channel's statistics never depend on the
# thread count (kernels_batchnorm.h)

cdef int _batch_norm(floating dummy, const int64_t *f, char **bases, const double *consts,
                     int nthreads) noexcept nogil:
    cdef int64_t N = f[LM_F_BATCH_NORM_N], C = f[LM_F_BATCH_NORM_C], S = f[LM_F_BATCH_NORM_S], c
    cdef int64_t flags = f[LM_F_BATCH_NORM_flags]
    cdef double eps = consts[f[LM_F_BATCH_NORM_eps]], mom = consts[f[LM_F_BATCH_NORM_momentum]]
    cdef floating *x = <floating*>_ptr(bases, f + LM_F_BATCH_NORM_x_slot)
    cdef floating *sc = <floating*>_ptr(bases, f + LM_F_BATCH_NORM_scale_slot)
    cdef floating *bi = <floating*>_ptr(bases, f + LM_F_BATCH_NORM_bias_slot)
    cdef floating *rm = <floating*>_ptr(bases, f + LM_F_BATCH_NORM_rmean_slot)
    cdef floating *rv = <floating*>_ptr(bases, f + LM_F_BATCH_NORM_rvar_slot)
    cdef floating *y = <floating*>_ptr(bases, f + LM_F_BATCH_NORM_y_slot)
    cdef floating *mean = <floating*>_ptr(bases, f + LM_F_BATCH_NORM_mean_slot)
    cdef floating *rstd = <floating*>_ptr(bases, f + LM_F_BATCH_NORM_rstd_slot)
    cdef floating *nm = <floating*>_ptr(bases, f + LM_F_BATCH_NORM_nmean_slot)
    cdef floating *nv = <floating*>_ptr(bases, f + LM_F_BATCH_NORM_nvar_slot)
    cdef int nt = <int>min(<int64_t>_threads(N * C * S, nthreads), max(C, 1))
    for c in prange(C, num_threads=nt, schedule="static"):
        if floating is float:
            lm_batch_norm_channel_f32(N, C, S, c, flags, eps, mom, x, sc, bi, rm, rv, y, mean, rstd, nm, nv)
        else:
            lm_batch_norm_channel_f64(N, C, S, c, flags, eps, mom, x, sc, bi, rm, rv, y, mean, rstd, nm, nv)
    return 0


cdef int _batch_norm_grad(floating dummy, const int64_t *f, char **bases, int nthreads) noexcept nogil:
    cdef int64_t N = f[LM_F_BATCH_NORM_GRAD_N], C = f[LM_F_BATCH_NORM_GRAD_C], S = f[LM_F_BATCH_NORM_GRAD_S], c
    cdef int64_t flags = f[LM_F_BATCH_NORM_GRAD_flags]
    cdef floating *x = <floating*>_ptr(bases, f + LM_F_BATCH_NORM_GRAD_x_slot)
    cdef floating *sc = <floating*>_ptr(bases, f + LM_F_BATCH_NORM_GRAD_scale_slot)
    cdef floating *mean = <floating*>_ptr(bases, f + LM_F_BATCH_NORM_GRAD_mean_slot)
    cdef floating *rstd = <floating*>_ptr(bases, f + LM_F_BATCH_NORM_GRAD_rstd_slot)
    cdef floating *dy = <floating*>_ptr(bases, f + LM_F_BATCH_NORM_GRAD_dy_slot)
    cdef floating *y = <floating*>_ptr(bases, f + LM_F_BATCH_NORM_GRAD_y_slot)
    cdef floating *dx = <floating*>_ptr(bases, f + LM_F_BATCH_NORM_GRAD_dx_slot)
    cdef floating *dsc = <floating*>_ptr(bases, f + LM_F_BATCH_NORM_GRAD_dscale_slot)
    cdef floating *dbi = <floating*>_ptr(bases, f + LM_F_BATCH_NORM_GRAD_dbias_slot)
    cdef int nt = <int>min(<int64_t>_threads(N * C * S, nthreads), max(C, 1))
    for c in prange(C, num_threads=nt, schedule="static"):
        if floating is float:
            lm_batch_norm_grad_channel_f32(N, C, S, c, flags, x, sc, mean, rstd, dy, y, dx, dsc, dbi)
        else:
            lm_batch_norm_grad_channel_f64(N, C, S, c, flags, x, sc, mean, rstd, dy, y, dx, dsc, dbi)
    return 0


# ------------------------------------------------------------------------------------------------
# reductions over the middle axis of (outer, K, inner): max/min/prod/logsumexp, argmax/argmin, log_softmax

DEF RED_COLS = 512  # output columns per task when inner > 1 (a task's accumulators stay in L1)


cdef int _reduce(floating dummy, const int64_t *f, char **bases, int nthreads, bint arg) noexcept nogil:
    """One task = (outer index, block of RED_COLS output columns); tasks depend on the shape only and each
    output element is reduced by one task in a fixed order, so any thread count gives the same bits."""
    cdef int64_t outer, K, inner, kind, last = 0, ncb, ntask, t, o, cb, i0, ni
    cdef floating *x
    cdef char *y
    cdef floating *ws
    cdef floating *acc
    cdef int nt
    if arg:
        outer, K, inner = f[LM_F_ARG_REDUCE_outer], f[LM_F_ARG_REDUCE_K], f[LM_F_ARG_REDUCE_inner]
        kind, last = f[LM_F_ARG_REDUCE_kind], f[LM_F_ARG_REDUCE_select_last]
        x = <floating*>_ptr(bases, f + LM_F_ARG_REDUCE_x_slot)
        y = _ptr(bases, f + LM_F_ARG_REDUCE_y_slot)
    else:
        outer, K, inner = f[LM_F_REDUCE_outer], f[LM_F_REDUCE_K], f[LM_F_REDUCE_inner]
        kind = f[LM_F_REDUCE_kind]
        x = <floating*>_ptr(bases, f + LM_F_REDUCE_x_slot)
        y = _ptr(bases, f + LM_F_REDUCE_y_slot)
    if outer * inner == 0:
        return 0
    ncb = (inner + RED_COLS - 1) // RED_COLS
    ntask = outer * ncb
    nt = _threads(outer * (K if K > 0 else 1) * inner, nthreads)
    if nt > ntask:
        nt = <int>ntask
    ws = <floating*>malloc(nt * RED_COLS * sizeof(floating))
    if ws == NULL:
        return ERR_NOMEM
    with parallel(num_threads=nt):
        acc = ws + threadid() * RED_COLS
        for t in prange(ntask, schedule="static"):
            o = t // ncb
            cb = t - o * ncb
            i0 = cb * RED_COLS
            ni = inner - i0 if inner - i0 < RED_COLS else RED_COLS
            if arg:
                if floating is float:
                    lm_arg_reduce_cols_f32(kind, last, K, inner, i0, ni, <float*>x + o * K * inner,
                                           <int64_t*>y + o * inner, <float*>acc)
                else:
                    lm_arg_reduce_cols_f64(kind, last, K, inner, i0, ni, <double*>x + o * K * inner,
                                           <int64_t*>y + o * inner, <double*>acc)
            else:
                if floating is float:
                    lm_reduce_cols_f32(kind, K, inner, i0, ni, <float*>x + o * K * inner, <float*>y + o * inner,
                                       <float*>acc)
                else:
                    lm_reduce_cols_f64(kind, K, inner, i0, ni, <double*>x + o * K * inner, <double*>y + o * inner,
                                       <double*>acc)
    free(ws)
    return 0


cdef int _xent(floating dummy, const int64_t *f, char **bases, int64_t *detail) noexcept nogil:
    cdef int64_t B = f[LM_F_SOFTMAX_XENT_B], C = f[LM_F_SOFTMAX_XENT_C], bad
    cdef floating *z = <floating*>_ptr(bases, f + LM_F_SOFTMAX_XENT_logits_slot)
    cdef char *lab = _ptr(bases, f + LM_F_SOFTMAX_XENT_labels_slot)
    cdef floating *out = <floating*>_ptr(bases, f + LM_F_SOFTMAX_XENT_out_slot)
    # the labels are copied, then checked and used from the copy: fed memory is read once
    cdef int64_t *y = <int64_t*>malloc(max(B, 1) * sizeof(int64_t))
    if y == NULL:
        return ERR_NOMEM
    bad = lm_copy_labels(f[LM_F_SOFTMAX_XENT_labels_dtype], lab, B, C, y)
    if bad >= 0:
        free(y)
        detail[0] = bad
        return ERR_LABEL
    if floating is float:
        out[0] = lm_xent_f32(B, C, z, LM_DT_I64, <char*>y)
    else:
        out[0] = lm_xent_f64(B, C, z, LM_DT_I64, <char*>y)
    free(y)
    return 0


cdef int _xent_grad(floating dummy, const int64_t *f, char **bases, int nthreads, int64_t *detail) noexcept nogil:
    # loss.slot -1: no loss output
    # With a loss operand this is forward and backward of softmax cross-entropy in one pass: each row's
    # log-sum-exp gives both its loss and its gradient; row losses are summed in row order (double).
    cdef int64_t B = f[LM_F_XENT_GRAD_B], C = f[LM_F_XENT_GRAD_C], b, bad
    cdef floating *z = <floating*>_ptr(bases, f + LM_F_XENT_GRAD_logits_slot)
    cdef char *lab = _ptr(bases, f + LM_F_XENT_GRAD_labels_slot)
    cdef int64_t ldt = f[LM_F_XENT_GRAD_labels_dtype]
    cdef floating *g = <floating*>_ptr(bases, f + LM_F_XENT_GRAD_g_slot)
    cdef floating *out = <floating*>_ptr(bases, f + LM_F_XENT_GRAD_out_slot)
    cdef floating *loss = <floating*>_ptr(bases, f + LM_F_XENT_GRAD_loss_slot) if f[LM_F_XENT_GRAD_loss_slot] >= 0 else NULL
    cdef double *rows = NULL
    cdef double total = 0
    cdef floating gs
    # labels copied, checked and used from the copy (fed memory is read once); row losses after them
    cdef int64_t *y = <int64_t*>malloc(max(B, 1) * (sizeof(int64_t) + sizeof(double)))
    if y == NULL:
        return ERR_NOMEM
    bad = lm_copy_labels(ldt, lab, B, C, y)
    if bad >= 0:
        free(y)
        detail[0] = bad
        return ERR_LABEL
    if loss != NULL:
        rows = <double*>(y + max(B, 1))
    gs = g[0] / B
    for b in prange(B, num_threads=_threads(B * C, nthreads), schedule="static"):
        if floating is float:
            _row_loss(rows, b, lm_xent_grad_row_f32(C, z + b * C, y[b], gs, out + b * C))
        else:
            _row_loss(rows, b, lm_xent_grad_row_f64(C, z + b * C, y[b], gs, out + b * C))
    if loss != NULL:
        for b in range(B):
            total += rows[b]
        loss[0] = <floating>(total / B)
    free(y)
    return 0


cdef inline void _row_loss(double *rows, int64_t b, double v) noexcept nogil:
    if rows != NULL:
        rows[b] = v


# ------------------------------------------------------------------------------------------------
# optimizers: one instruction updates every param

cdef int _sgd(floating dummy, const int64_t *f, char **bases, const double *consts, int nthreads) noexcept nogil:
    # per param: v.slot -1 = no momentum; g.slot -1 (only with v): a momentum GEMM already accumulated
    # the gradient into v
    cdef int64_t npar = f[LM_F_SGD_UPDATE_nparams], i, c, nch, lo, hi, n
    cdef floating lr = <floating>consts[f[LM_F_SGD_UPDATE_lr]], mom = <floating>consts[f[LM_F_SGD_UPDATE_momentum]]
    cdef floating wd = <floating>consts[f[LM_F_SGD_UPDATE_weight_decay]]
    cdef const int64_t *q
    cdef floating *v
    cdef floating *g
    for i in range(npar):
        q = f + LM_F_SGD_UPDATE_param + LM_W_SGD_UPDATE_param(f) * i
        n = q[LM_R_SGD_UPDATE_param_n(f)]
        v = <floating*>_ptr(bases, q + LM_R_SGD_UPDATE_param_v_slot(f)) if q[LM_R_SGD_UPDATE_param_v_slot(f)] >= 0 else NULL
        g = <floating*>_ptr(bases, q + LM_R_SGD_UPDATE_param_g_slot(f)) if q[LM_R_SGD_UPDATE_param_g_slot(f)] >= 0 else NULL
        nch = (n + 16383) // 16384
        for c in prange(nch, num_threads=_threads(n, nthreads), schedule="static"):
            lo = c * 16384
            hi = lo + 16384 if lo + 16384 < n else n
            if floating is float:
                lm_sgd_f32(hi - lo, <float*>_ptr(bases, q + LM_R_SGD_UPDATE_param_p_slot(f)) + lo, (<float*>g + lo) if g != NULL else NULL,
                           (<float*>v + lo) if v != NULL else NULL, lr, mom, wd)
            else:
                lm_sgd_f64(hi - lo, <double*>_ptr(bases, q + LM_R_SGD_UPDATE_param_p_slot(f)) + lo, (<double*>g + lo) if g != NULL else NULL,
                           (<double*>v + lo) if v != NULL else NULL, lr, mom, wd)
    return 0


cdef int _adam(floating dummy, const int64_t *f, char **bases, const double *consts, int nthreads,
               bint advance) noexcept nogil:
    # step: the float64 step counter.  adam_apply has adam_update's layout (format.py; asserted below)
    # OP_ADAM advances t, then updates; OP_ADAM_APPLY only reads t: a plan whose updates are split over
    # several instructions advances t once, with an OP_ADAM of no params scheduled before them all
    cdef int64_t npar = f[LM_F_ADAM_UPDATE_nparams], i, c, nch, lo, hi, n
    cdef double lr = consts[f[LM_F_ADAM_UPDATE_lr]], b1 = consts[f[LM_F_ADAM_UPDATE_beta1]]
    cdef double b2 = consts[f[LM_F_ADAM_UPDATE_beta2]], eps = consts[f[LM_F_ADAM_UPDATE_eps]]
    cdef double wd = consts[f[LM_F_ADAM_UPDATE_weight_decay]]
    cdef double *t = <double*>_ptr(bases, f + LM_F_ADAM_UPDATE_step_slot)
    cdef const int64_t *fp
    cdef const int64_t *fg
    cdef const int64_t *fm
    cdef const int64_t *fv
    cdef double bc1, bc2
    cdef floating step_size, isb
    cdef const int64_t *q
    if advance:
        t[0] += 1
    if npar == 0:
        return 0
    bc1 = 1 - pow(b1, t[0])
    bc2 = 1 - pow(b2, t[0])
    step_size = <floating>(lr / bc1)
    isb = <floating>(1 / sqrt(bc2))
    for i in range(npar):
        q = f + LM_F_ADAM_UPDATE_param + LM_W_ADAM_UPDATE_param(f) * i
        n = q[LM_R_ADAM_UPDATE_param_n(f)]
        fp, fg = q + LM_R_ADAM_UPDATE_param_p_slot(f), q + LM_R_ADAM_UPDATE_param_g_slot(f)
        fm, fv = q + LM_R_ADAM_UPDATE_param_m_slot(f), q + LM_R_ADAM_UPDATE_param_v_slot(f)
        nch = (n + 16383) // 16384
        for c in prange(nch, num_threads=_threads(n, nthreads), schedule="static"):
            lo = c * 16384
            hi = lo + 16384 if lo + 16384 < n else n
            if floating is float:
                lm_adam_f32(hi - lo, <float*>_ptr(bases, fp) + lo, <float*>_ptr(bases, fg) + lo,
                            <float*>_ptr(bases, fm) + lo, <float*>_ptr(bases, fv) + lo,
                            <float>lr, <float>b1, <float>b2, <float>eps, <float>wd, step_size, isb)
            else:
                lm_adam_f64(hi - lo, <double*>_ptr(bases, fp) + lo, <double*>_ptr(bases, fg) + lo,
                            <double*>_ptr(bases, fm) + lo, <double*>_ptr(bases, fv) + lo,
                            lr, b1, b2, eps, wd, step_size, isb)
    return 0


# ------------------------------------------------------------------------------------------------
# dtype-generic data movement

cdef int _int_ew(const int64_t *f, char **bases) noexcept nogil:
    cdef int64_t dt = f[LM_F_INT_ELEMENTWISE_dtype], op = f[LM_F_INT_ELEMENTWISE_op]
    cdef int64_t nd = f[LM_F_INT_ELEMENTWISE_ndim], rows = 1, r, d, rc
    cdef const int64_t *dims = f + LM_F_INT_ELEMENTWISE_dims
    cdef const int64_t *fa = f + LM_F_INT_ELEMENTWISE_a_slot(f)
    cdef const int64_t *sa = f + LM_F_INT_ELEMENTWISE_a_stride(f)
    cdef const int64_t *fb = f + LM_F_INT_ELEMENTWISE_b_slot(f)
    cdef const int64_t *sb = f + LM_F_INT_ELEMENTWISE_b_stride(f)
    cdef const int64_t *fo = f + LM_F_INT_ELEMENTWISE_out_slot(f)
    cdef int64_t isz = lm_itemsize[dt]
    cdef int64_t osz = lm_int_out_itemsize(dt, op)  # comparisons write one bool byte
    cdef int64_t inner = dims[nd - 1] if nd > 0 else 1
    for d in range(nd - 1):
        rows *= dims[d]
    for r in range(rows if nd > 0 else 1):
        rc = lm_int_binary_row(dt, op, inner,
                               _ptr(bases, fa) + isz * _unravel(nd, dims, r, sa), sa[nd - 1] if nd > 0 else 0,
                               _ptr(bases, fb) + isz * _unravel(nd, dims, r, sb), sb[nd - 1] if nd > 0 else 0,
                               _ptr(bases, fo) + osz * r * inner)
        if rc != 0:
            return ERR_INT_DIV_ZERO if rc == -3 else ERR_MALFORMED
    return 0


cdef int _select(const int64_t *f, char **bases) noexcept nogil:
    # Where(cond, a, b) for values outside the float VM (integers, bools): out = cond ? a : b, row by row
    cdef int64_t isz = f[LM_F_SELECT_itemsize], nd = f[LM_F_SELECT_ndim], rows = 1, r, d
    cdef const int64_t *dims = f + LM_F_SELECT_dims
    cdef const int64_t *fc = f + LM_F_SELECT_cond_slot(f)
    cdef const int64_t *sc = f + LM_F_SELECT_cond_stride(f)
    cdef const int64_t *fa = f + LM_F_SELECT_a_slot(f)
    cdef const int64_t *sa = f + LM_F_SELECT_a_stride(f)
    cdef const int64_t *fb = f + LM_F_SELECT_b_slot(f)
    cdef const int64_t *sb = f + LM_F_SELECT_b_stride(f)
    cdef const int64_t *fo = f + LM_F_SELECT_out_slot(f)
    cdef int64_t inner = dims[nd - 1] if nd > 0 else 1
    for d in range(nd - 1):
        rows *= dims[d]
    for r in range(rows if nd > 0 else 1):
        lm_select_row(isz, inner,
                      <const unsigned char*>(_ptr(bases, fc) + _unravel(nd, dims, r, sc)), sc[nd - 1] if nd > 0 else 0,
                      _ptr(bases, fa) + isz * _unravel(nd, dims, r, sa), sa[nd - 1] if nd > 0 else 0,
                      _ptr(bases, fb) + isz * _unravel(nd, dims, r, sb), sb[nd - 1] if nd > 0 else 0,
                      _ptr(bases, fo) + isz * r * inner)
    return 0


cdef int _copy_rows(int64_t isz, int64_t nd, const int64_t *dims, char *src, const int64_t *ss, char *dst,
                    const int64_t *ds, int nthreads=1) noexcept nogil:
    """Copy a dims-shaped block between strided layouts (element strides ss, ds); ds NULL: dst is
    contiguous.  Moves only, no arithmetic, so splitting the rows over threads changes no bit (a
    transpose of attention heads is a few MB: one core's copy bandwidth was the limit)."""
    cdef int64_t rows = 1, r, d, inner
    cdef int nt
    if nd == 0:
        memcpy(dst, src, <size_t>isz)
        return 0
    for d in range(nd):
        if dims[d] == 0:
            return 0
    for d in range(nd - 1):
        rows *= dims[d]
    inner = dims[nd - 1]
    nt = _threads(rows * inner, nthreads) if rows > 1 else 1
    if nt > 1:  # (a parallel region costs more than a small copy: small ones stay on this thread)
        for r in prange(rows, num_threads=nt, schedule="static"):
            _copy_one_row(isz, nd, dims, r, inner, src, ss, dst, ds)
    else:
        for r in range(rows):
            _copy_one_row(isz, nd, dims, r, inner, src, ss, dst, ds)
    return 0


cdef inline void _copy_one_row(int64_t isz, int64_t nd, const int64_t *dims, int64_t r, int64_t inner, char *src,
                               const int64_t *ss, char *dst, const int64_t *ds) noexcept nogil:
    if ds == NULL:
        lm_copy_row(isz, inner, src + isz * _unravel(nd, dims, r, ss), ss[nd - 1], dst + isz * r * inner)
    else:
        lm_copy_row2(isz, inner, src + isz * _unravel(nd, dims, r, ss), ss[nd - 1],
                     dst + isz * _unravel(nd, dims, r, ds), ds[nd - 1])


cdef int _strided_copy(const int64_t *f, char **bases, int nthreads) noexcept nogil:
    # dst contiguous
    return _copy_rows(f[LM_F_STRIDED_COPY_itemsize], f[LM_F_STRIDED_COPY_ndim], f + LM_F_STRIDED_COPY_dims,
                      _ptr(bases, f + LM_F_STRIDED_COPY_src_slot(f)), f + LM_F_STRIDED_COPY_src_stride(f),
                      _ptr(bases, f + LM_F_STRIDED_COPY_dst_slot(f)), NULL, nthreads)


cdef int _copy_nd(const int64_t *f, char **bases, int nthreads) noexcept nogil:
    # Concat writes each input into its part of the output, slice reads a part.
    return _copy_rows(f[LM_F_COPY_ND_itemsize], f[LM_F_COPY_ND_ndim], f + LM_F_COPY_ND_dims,
                      _ptr(bases, f + LM_F_COPY_ND_src_slot(f)), f + LM_F_COPY_ND_src_stride(f),
                      _ptr(bases, f + LM_F_COPY_ND_dst_slot(f)), f + LM_F_COPY_ND_dst_stride(f), nthreads)


cdef inline int64_t _index(const int64_t *idx, int64_t j, int64_t n) noexcept nogil:
    """idx[j] as a position in [0, n) (negative counts from the end, as in ONNX), or -1 if out of range"""
    cdef int64_t k = idx[j]
    if k < 0:
        k += n
    return k if 0 <= k < n else -1


cdef int _gather(const int64_t *f, char **bases, int64_t *detail) noexcept nogil:
    # dst[o, j, :] = src[o, idx[j], :]; idx int64 (read once per use, range-checked there)
    cdef int64_t isz = f[LM_F_GATHER_itemsize], outer = f[LM_F_GATHER_outer], n = f[LM_F_GATHER_n]
    cdef int64_t inner = f[LM_F_GATHER_inner], nidx = f[LM_F_GATHER_nidx], o, j, k
    cdef const char *src = _ptr(bases, f + LM_F_GATHER_src_slot)
    cdef const int64_t *idx = <const int64_t*>_ptr(bases, f + LM_F_GATHER_idx_slot)
    cdef char *dst = _ptr(bases, f + LM_F_GATHER_dst_slot)
    for j in range(nidx):
        k = _index(idx, j, n)
        if k < 0:
            detail[0] = j
            return ERR_INDEX
        for o in range(outer):
            memcpy(dst + isz * (o * nidx + j) * inner, src + isz * (o * n + k) * inner, <size_t>(isz * inner))
    return 0


DEF SA_COLS = 64  # columns per scatter-add task: a task adds its columns of every index's row, in index order


cdef int _scatter_add(floating dummy, const int64_t *f, char **bases, int64_t *detail, int nthreads) noexcept nogil:
    # dst = 0; dst[o, idx[j], :] += g[o, j, :] -- gather's gradient.  Tasks own blocks of columns and add
    # the rows in index order, so repeated indices sum in the same order for any thread count (no atomics).
    cdef int64_t outer = f[LM_F_SCATTER_ADD_outer], n = f[LM_F_SCATTER_ADD_n], inner = f[LM_F_SCATTER_ADD_inner]
    cdef int64_t nidx = f[LM_F_SCATTER_ADD_nidx], j, t
    cdef int64_t ncb = (inner + SA_COLS - 1) // SA_COLS
    cdef const floating *g = <const floating*>_ptr(bases, f + LM_F_SCATTER_ADD_g_slot)
    cdef const int64_t *idx = <const int64_t*>_ptr(bases, f + LM_F_SCATTER_ADD_idx_slot)
    cdef floating *dst = <floating*>_ptr(bases, f + LM_F_SCATTER_ADD_dst_slot)
    cdef int nt = _threads(outer * nidx * inner, nthreads) if outer * ncb > 1 else 1
    for j in range(nidx):
        if _index(idx, j, n) < 0:
            detail[0] = j
            return ERR_INDEX
    memset(dst, 0, <size_t>(outer * n * inner * sizeof(floating)))
    if nt > 1:
        for t in prange(outer * ncb, num_threads=nt, schedule="static"):
            _scatter_cols(dst, g, idx, n, nidx, inner, t // ncb, (t % ncb) * SA_COLS)
    else:
        for t in range(outer * ncb):
            _scatter_cols(dst, g, idx, n, nidx, inner, t // ncb, (t % ncb) * SA_COLS)
    return 0


cdef int _scatter_sgd(floating dummy, const int64_t *f, char **bases, const double *consts, int64_t *detail,
                      int nthreads) noexcept nogil:
    # p[o, idx[j], :] += -lr * g[o, j, :], j in index order per block of columns (as _scatter_add, whose
    # result the dense SGD would subtract; here only the rows the gather read are touched)
    cdef int64_t outer = f[LM_F_SCATTER_SGD_outer], n = f[LM_F_SCATTER_SGD_n], inner = f[LM_F_SCATTER_SGD_inner]
    cdef int64_t nidx = f[LM_F_SCATTER_SGD_nidx], j, t
    cdef int64_t ncb = (inner + SA_COLS - 1) // SA_COLS
    cdef floating alpha = <floating>(-consts[f[LM_F_SCATTER_SGD_lr]])
    cdef const floating *g = <const floating*>_ptr(bases, f + LM_F_SCATTER_SGD_g_slot)
    cdef const int64_t *idx = <const int64_t*>_ptr(bases, f + LM_F_SCATTER_SGD_idx_slot)
    cdef floating *p = <floating*>_ptr(bases, f + LM_F_SCATTER_SGD_p_slot)
    cdef int nt = _threads(outer * nidx * inner, nthreads) if outer * ncb > 1 else 1
    for j in range(nidx):
        if _index(idx, j, n) < 0:
            detail[0] = j
            return ERR_INDEX
    if nt > 1:
        for t in prange(outer * ncb, num_threads=nt, schedule="static"):
            _scatter_cols_scaled(p, g, idx, n, nidx, inner, t // ncb, (t % ncb) * SA_COLS, alpha)
    else:
        for t in range(outer * ncb):
            _scatter_cols_scaled(p, g, idx, n, nidx, inner, t // ncb, (t % ncb) * SA_COLS, alpha)
    return 0


cdef inline void _scatter_cols_scaled(floating *dst, const floating *g, const int64_t *idx, int64_t n,
                                      int64_t nidx, int64_t inner, int64_t o, int64_t c0,
                                      floating alpha) noexcept nogil:
    cdef int64_t c1 = min(c0 + SA_COLS, inner), j, i, k
    cdef floating *d
    cdef const floating *s
    for j in range(nidx):
        k = _index(idx, j, n)
        d = dst + (o * n + k) * inner
        s = g + (o * nidx + j) * inner
        for i in range(c0, c1):
            d[i] += alpha * s[i]


cdef inline void _scatter_cols(floating *dst, const floating *g, const int64_t *idx, int64_t n, int64_t nidx,
                               int64_t inner, int64_t o, int64_t c0) noexcept nogil:
    cdef int64_t c1 = min(c0 + SA_COLS, inner), j, i, k
    cdef floating *d
    cdef const floating *s
    for j in range(nidx):
        k = _index(idx, j, n)
        d = dst + (o * n + k) * inner
        s = g + (o * nidx + j) * inner
        for i in range(c0, c1):
            d[i] += s[i]


cdef int _index_flat(const int64_t *f, char **bases, int64_t *detail) noexcept nogil:
    # format 2.3: flat row positions from live GatherElements / GatherND indices (format.py, opcode 40).
    # One pass in position order: the first bad index (lowest r * k + j) is the one reported, for any
    # thread count; the work is a few integer operations per index, small beside the gather it feeds.
    cdef int64_t k = f[LM_F_INDEX_FLAT_k], nd = f[LM_F_INDEX_FLAT_ndim], rows = 1, r, j, d, rem, base, v
    cdef const int64_t *dims = f + LM_F_INDEX_FLAT_dims
    cdef const int64_t *mult = f + LM_F_INDEX_FLAT_mult(f)
    cdef const int64_t *pdims = f + LM_F_INDEX_FLAT_pos_dims(f)
    cdef const int64_t *pstr = f + LM_F_INDEX_FLAT_pos_strides(f)
    cdef const int64_t *idx = <const int64_t*>_ptr(bases, f + LM_F_INDEX_FLAT_idx_slot)
    cdef int64_t *out = <int64_t*>_ptr(bases, f + LM_F_INDEX_FLAT_out_slot)
    for d in range(nd):
        rows *= pdims[d]
    for r in range(rows):
        rem = r
        base = 0
        d = nd - 1
        while d >= 0:  # (rows > 0: every pos_dims[d] >= 1)
            base += (rem % pdims[d]) * pstr[d]
            rem = rem // pdims[d]
            d -= 1
        for j in range(k):
            v = idx[r * k + j]
            if v < 0:
                v += dims[j]
            if v < 0 or v >= dims[j]:
                detail[0] = r * k + j
                return ERR_INDEX
            base += v * mult[j]
        out[r] = base
    return 0


cdef int _check_finite(const int64_t *f, char **bases) noexcept nogil:
    cdef int64_t n = f[LM_F_CHECK_FINITE_n]
    cdef char *x = _ptr(bases, f + LM_F_CHECK_FINITE_x_slot)
    if f[LM_F_CHECK_FINITE_dtype] == 0:
        return ERR_NONFINITE if lm_nonfinite_f32(n, <float*>x) else 0
    return ERR_NONFINITE if lm_nonfinite_f64(n, <double*>x) else 0


# ------------------------------------------------------------------------------------------------
# convolution (format 2.3): conv, conv_grad_input, conv_grad_weight

include "_conv.pxi"

# ------------------------------------------------------------------------------------------------
# pooling (format 2.3): max_pool, max_pool_grad, avg_pool, avg_pool_grad

include "_pool.pxi"

# ------------------------------------------------------------------------------------------------
# resize (format 2.3): resize, resize_grad

include "_resize.pxi"


# ------------------------------------------------------------------------------------------------
# attention (format 2.3): softmax_masked
include "_attention.pxi"


# ------------------------------------------------------------------------------------------------
# data-parallel collectives: allreduce_start, allreduce_wait (MPI through run-time function pointers)

include "_mpi.pxi"


# ------------------------------------------------------------------------------------------------
# the interpreter loop

cdef int _run(const int64_t *code, int64_t ncode, const double *consts, char **bases, int nthreads,
              int64_t *bad_instr, int64_t *detail, double *times, lm_mpi *mpi) noexcept nogil:
    """Run the instructions in order. ``times`` (NULL, or one double per instruction): each
    instruction's wall seconds are added to its entry -- the profiler's only hook, one branch per
    instruction when off.  ``mpi``: the collectives' context (NULL for a plan without them); while a
    reduction is in flight each instruction is followed by one MPI_Test of the pending requests."""
    cdef int64_t pc = 0, idx = 0, op, ln
    cdef const int64_t *f
    cdef int rc = 0
    cdef float f32 = 0
    cdef double f64 = 0, t0 = 0
    while pc < ncode:
        if times != NULL:
            t0 = omp_get_wtime()
        op = code[pc]
        ln = code[pc + 1]
        f = code + pc + LM_HEADER
        # every float kernel's first field is its dtype (0 float32, 1 float64: plan.validate checks it)
        if op == LM_OP_FUSED_ELEMENTWISE:
            rc = _ew(f32, f, ln - LM_HEADER, bases, consts, nthreads) if f[LM_F_FUSED_ELEMENTWISE_dtype] == 0 \
                else _ew(f64, f, ln - LM_HEADER, bases, consts, nthreads)
        elif op == LM_OP_GEMM:
            rc = _gemm(f32, f, ln - LM_HEADER, bases, consts, nthreads) if f[LM_F_GEMM_dtype] == 0 \
                else _gemm(f64, f, ln - LM_HEADER, bases, consts, nthreads)
        elif op == LM_OP_GEMM_EX:
            rc = _gemm(f32, f, ln - LM_HEADER, bases, consts, nthreads, True) if f[LM_F_GEMM_dtype] == 0 \
                else _gemm(f64, f, ln - LM_HEADER, bases, consts, nthreads, True)
        elif op == LM_OP_GEMM_EX_KEEP:
            rc = _gemm(f32, f, ln - LM_HEADER, bases, consts, nthreads, True, True) if f[LM_F_GEMM_dtype] == 0 \
                else _gemm(f64, f, ln - LM_HEADER, bases, consts, nthreads, True, True)
        elif op == LM_OP_GEMM_STRIDED:
            rc = _gemm(f32, f, ln - LM_HEADER, bases, consts, nthreads, False, False, True) \
                if f[LM_F_GEMM_dtype] == 0 else _gemm(f64, f, ln - LM_HEADER, bases, consts, nthreads, False, False, True)
        elif op == LM_OP_SOFTMAX:
            rc = _softmax(f32, f, bases, nthreads) if f[LM_F_SOFTMAX_dtype] == 0 else _softmax(f64, f, bases, nthreads)
        elif op == LM_OP_SOFTMAX_XENT:
            rc = _xent(f32, f, bases, detail) if f[LM_F_SOFTMAX_XENT_dtype] == 0 else _xent(f64, f, bases, detail)
        elif op == LM_OP_XENT_GRAD:
            rc = _xent_grad(f32, f, bases, nthreads, detail) if f[LM_F_XENT_GRAD_dtype] == 0 \
                else _xent_grad(f64, f, bases, nthreads, detail)
        elif op == LM_OP_CAST:
            rc = lm_cast(f[LM_F_CAST_src_dtype], f[LM_F_CAST_dst_dtype], f[LM_F_CAST_n],
                         _ptr(bases, f + LM_F_CAST_src_slot), _ptr(bases, f + LM_F_CAST_dst_slot))
        elif op == LM_OP_INT_ELEMENTWISE:
            rc = _int_ew(f, bases)
        elif op == LM_OP_SELECT:
            rc = _select(f, bases)
        elif op == LM_OP_COPY:
            memcpy(_ptr(bases, f + LM_F_COPY_dst_slot), _ptr(bases, f + LM_F_COPY_src_slot), <size_t>f[LM_F_COPY_nbytes])
        elif op == LM_OP_STRIDED_COPY:
            rc = _strided_copy(f, bases, nthreads)
        elif op == LM_OP_SGD_UPDATE:
            rc = _sgd(f32, f, bases, consts, nthreads) if f[LM_F_SGD_UPDATE_dtype] == 0 \
                else _sgd(f64, f, bases, consts, nthreads)
        elif op == LM_OP_ADAM_UPDATE or op == LM_OP_ADAM_APPLY:
            rc = _adam(f32, f, bases, consts, nthreads, op == LM_OP_ADAM_UPDATE) if f[LM_F_ADAM_UPDATE_dtype] == 0 \
                else _adam(f64, f, bases, consts, nthreads, op == LM_OP_ADAM_UPDATE)
        elif op == LM_OP_CHECK_FINITE:
            rc = _check_finite(f, bases)
        elif op == LM_OP_COPY_ND:
            rc = _copy_nd(f, bases, nthreads)
        elif op == LM_OP_GATHER:
            rc = _gather(f, bases, detail)
        elif op == LM_OP_SCATTER_ADD:
            rc = _scatter_add(f32, f, bases, detail, nthreads) if f[LM_F_SCATTER_ADD_dtype] == 0 \
                else _scatter_add(f64, f, bases, detail, nthreads)
        elif op == LM_OP_SCATTER_SGD:
            rc = _scatter_sgd(f32, f, bases, consts, detail, nthreads) if f[LM_F_SCATTER_SGD_dtype] == 0 \
                else _scatter_sgd(f64, f, bases, consts, detail, nthreads)
        elif op == LM_OP_INDEX_FLAT:
            rc = _index_flat(f, bases, detail)
        elif op == LM_OP_REDUCE:
            rc = _reduce(f32, f, bases, nthreads, False) if f[LM_F_REDUCE_dtype] == 0 \
                else _reduce(f64, f, bases, nthreads, False)
        elif op == LM_OP_ARG_REDUCE:
            rc = _reduce(f32, f, bases, nthreads, True) if f[LM_F_ARG_REDUCE_dtype] == 0 \
                else _reduce(f64, f, bases, nthreads, True)
        elif op == LM_OP_LAYER_NORM:
            rc = _layer_norm(f32, f, bases, consts, nthreads) if f[LM_F_LAYER_NORM_dtype] == 0 \
                else _layer_norm(f64, f, bases, consts, nthreads)
        elif op == LM_OP_LAYER_NORM_GRAD:
            rc = _layer_norm_grad(f32, f, bases, nthreads) if f[LM_F_LAYER_NORM_GRAD_dtype] == 0 \
                else _layer_norm_grad(f64, f, bases, nthreads)
        elif op == LM_OP_RMS_NORM:
            rc = _rms_norm(f32, f, bases, consts, nthreads) if f[LM_F_RMS_NORM_dtype] == 0 \
                else _rms_norm(f64, f, bases, consts, nthreads)
        elif op == LM_OP_RMS_NORM_GRAD:
            rc = _rms_norm_grad(f32, f, bases, nthreads) if f[LM_F_RMS_NORM_GRAD_dtype] == 0 \
                else _rms_norm_grad(f64, f, bases, nthreads)
        elif op == LM_OP_DROPOUT:
            rc = _dropout(f32, f, bases, consts, nthreads) if f[LM_F_DROPOUT_dtype] == 0 \
                else _dropout(f64, f, bases, consts, nthreads)
        elif op == LM_OP_COUNTER_NEXT:
            _counter_next(f, bases)
        elif op == LM_OP_CONV:
            rc = _conv(f32, f, bases, consts, nthreads) if f[LM_F_CONV_dtype] == 0 \
                else _conv(f64, f, bases, consts, nthreads)
        elif op == LM_OP_CONV_SHORTCUT:
            rc = _conv(f32, f, bases, consts, nthreads, True) if f[LM_F_CONV_dtype] == 0 \
                else _conv(f64, f, bases, consts, nthreads, True)
        elif op == LM_OP_CONV_GRAD_INPUT:
            rc = _conv_grad_input(f32, f, bases, nthreads) if f[LM_F_CONV_dtype] == 0 \
                else _conv_grad_input(f64, f, bases, nthreads)
        elif op == LM_OP_CONV_GRAD_WEIGHT:
            rc = _conv_grad_weight(f32, f, bases, consts, nthreads) if f[LM_F_CONV_dtype] == 0 \
                else _conv_grad_weight(f64, f, bases, consts, nthreads)
        elif op == LM_OP_MAX_POOL:
            rc = _max_pool(f32, f, bases, nthreads) if f[LM_F_MAX_POOL_dtype] == 0 else _max_pool(f64, f, bases, nthreads)
        elif op == LM_OP_MAX_POOL_GRAD:
            rc = _max_pool_grad(f32, f, bases, detail, nthreads) if f[LM_F_MAX_POOL_dtype] == 0 \
                else _max_pool_grad(f64, f, bases, detail, nthreads)
        elif op == LM_OP_AVG_POOL:
            rc = _avg_pool(f32, f, bases, nthreads) if f[LM_F_MAX_POOL_dtype] == 0 else _avg_pool(f64, f, bases, nthreads)
        elif op == LM_OP_AVG_POOL_GRAD:
            rc = _avg_pool_grad(f32, f, bases, nthreads) if f[LM_F_MAX_POOL_dtype] == 0 \
                else _avg_pool_grad(f64, f, bases, nthreads)
        elif op == LM_OP_RESIZE:
            rc = _resize(f32, f, bases, consts, detail, nthreads) if f[LM_F_RESIZE_dtype] == 0 \
                else _resize(f64, f, bases, consts, detail, nthreads)
        elif op == LM_OP_RESIZE_GRAD:
            rc = _resize_grad(f32, f, bases, consts, detail, nthreads) if f[LM_F_RESIZE_dtype] == 0 \
                else _resize_grad(f64, f, bases, consts, detail, nthreads)
        elif op == LM_OP_BATCH_NORM:
            rc = _batch_norm(f32, f, bases, consts, nthreads) if f[LM_F_BATCH_NORM_dtype] == 0 \
                else _batch_norm(f64, f, bases, consts, nthreads)
        elif op == LM_OP_BATCH_NORM_GRAD:
            rc = _batch_norm_grad(f32, f, bases, nthreads) if f[LM_F_BATCH_NORM_GRAD_dtype] == 0 \
                else _batch_norm_grad(f64, f, bases, nthreads)
        elif op == LM_OP_SOFTMAX_MASKED:
            rc = _softmax_masked(f32, f, bases, consts, nthreads) if f[LM_F_SOFTMAX_MASKED_dtype] == 0 \
                else _softmax_masked(f64, f, bases, consts, nthreads)
        elif op == LM_OP_LOG_SOFTMAX:
            rc = _softmax(f32, f, bases, nthreads, True) if f[LM_F_SOFTMAX_dtype] == 0 \
                else _softmax(f64, f, bases, nthreads, True)
        elif op == LM_OP_ALLREDUCE_START:
            rc = _allreduce_start(f32, f, bases, mpi) if f[LM_F_ALLREDUCE_START_dtype] == 0 \
                else _allreduce_start(f64, f, bases, mpi)
        elif op == LM_OP_ALLREDUCE_WAIT:
            rc = _allreduce_wait(f32, f, bases, consts, mpi) if f[LM_F_ALLREDUCE_WAIT_dtype] == 0 \
                else _allreduce_wait(f64, f, bases, consts, mpi)
        else:
            rc = ERR_OPCODE
        if rc != 0:
            bad_instr[0] = idx
            if rc == ERR_NONFINITE:
                detail[0] = code[pc + 2]
            return rc
        if times != NULL:
            times[idx] += omp_get_wtime() - t0
        if mpi != NULL and mpi.npending > 0:
            _mpi_progress(mpi)
        pc += ln
        idx += 1
    return 0


def run_plan(const int64_t[::1] code not None, const double[::1] consts not None, list buffers not None,
             int nthreads=1, double[::1] times=None, MPIContext mpi=None):
    """Execute a validated plan once. ``buffers``: C-contiguous ndarrays, one per slot.

    Returns ``(rc, instruction_index, detail)``; rc 0 is success, negative values are the error codes
    that ``format.raise_for`` turns into exceptions.  The GIL is released for the whole run.
    ``times`` (profiling): float64, at least one entry per instruction; each instruction's wall
    seconds are added to its entry.  ``mpi``: the MPIContext a plan with collectives runs with.
    """
    cdef Py_ssize_t nb = len(buffers), i
    cdef char **bases = NULL
    cdef cnp.ndarray a
    cdef int64_t bad = -1, detail = -1
    cdef int rc
    cdef double zero = 0
    cdef const double *cp = &consts[0] if consts.shape[0] > 0 else &zero
    cdef int64_t ncode = code.shape[0]
    cdef const int64_t *cc = &code[0] if ncode > 0 else NULL
    cdef double *tp = NULL
    cdef int64_t pc = 0, count = 0
    cdef lm_mpi *mp = &mpi.c if mpi is not None else NULL
    if times is not None:
        while pc < ncode:  # the plan is validated: lengths are positive and tile the code
            pc += code[pc + 1]
            count += 1
        if times.shape[0] < count:
            raise ValueError(f"times has {times.shape[0]} entries for {count} instructions")
        tp = &times[0] if count > 0 else NULL
    bases = <char**>malloc((nb + 1) * sizeof(char*))
    if bases == NULL:
        raise MemoryError()
    try:
        for i in range(nb):
            a = buffers[i]
            if not cnp.PyArray_IS_C_CONTIGUOUS(a):
                raise ValueError(f"buffer {i} is not C-contiguous")
            bases[i] = <char*>cnp.PyArray_DATA(a)
        if nthreads < 1:
            nthreads = 1
        with nogil:
            rc = _run(cc, ncode, cp, bases, nthreads, &bad, &detail, tp, mp) if ncode > 0 else 0
    finally:
        free(bases)
    return rc, bad, detail


def format_table():
    """The plan format table this module was compiled from (format_gen.h), one entry per line:
    ``format.check_build`` compares it with format.py at import."""
    return (<bytes>LM_FORMAT_TABLE).decode()


def first_bad_label(cnp.ndarray labels not None, int64_t dtype_code, int64_t num_classes):
    """Index of the first label outside [0, num_classes), or -1 (C loop: ~100x cheaper than min+max)."""
    if not cnp.PyArray_IS_C_CONTIGUOUS(labels):
        raise ValueError("labels must be C-contiguous")
    return lm_bad_label(dtype_code, <char*>cnp.PyArray_DATA(labels), labels.size, num_classes)


def _isa_init(str name):
    """Select the kernels' ISA table (kernels_isa.h); isa.py calls it once at import. 0, -1 unknown name,
    -2 not supported by this CPU, -3 a forced ISA in a build without dispatch."""
    return lm_isa_init(name.encode())


def _isa_name():
    """The ISA whose kernel copies run: 'baseline', 'avx2', 'avx512', or 'native' (no-dispatch build)."""
    return lm_isa_name().decode()


# the format table compiled in (format_gen.h) must be format.py's: a build older than an edit of the
# format refuses to import, naming the entry, instead of running plans it would misread
from .format import check_build as _check_build
_check_build(format_table())

from .isa import _apply_env as _isa_apply_env
_isa_apply_env(_isa_init)  # LIBML_ISA, or the CPU's best, before any plan can run


def set_ew_fold(int on):
    """Testing: fuse column sums and whole sums into their steps (1, the default) or run them as passes of
    their own (0).  Returns the previous setting.  Column sums get the same bits either way; whole sums
    (kernels.h, lm_ew_lane_ok) are added in another order when fused."""
    global _ew_fold
    cdef int old = _ew_fold
    _ew_fold = 1 if on else 0
    return old


def own_sgemm(bint ta, bint tb, float alpha, float[:, :] A not None, float[:, :] B not None, float beta,
              float[:, :] C not None):
    """Row-major C = alpha * op(A) op(B) + beta * C through the AVX-512 copy's own SGEMM (kernels_gemm.h),
    for tests: True if it ran, False if it declined (another ISA copy, or sizes it leaves to BLAS; C is
    then untouched).  Rows may be padded (a leading dimension above the row length); elements contiguous."""
    cdef int64_t m = C.shape[0], n = C.shape[1]
    cdef int r
    cdef int64_t k = A.shape[0] if ta else A.shape[1]
    if (A.shape[1] if ta else A.shape[0]) != m or (B.shape[0] if tb else B.shape[1]) != n \
            or (B.shape[1] if tb else B.shape[0]) != k:
        raise ValueError(f"own_sgemm: shapes A ({A.shape[0]}, {A.shape[1]}), B ({B.shape[0]}, {B.shape[1]}), "
                         f"C ({m}, {n}) do not match (ta={ta}, tb={tb})")
    if A.strides[1] != 4 or B.strides[1] != 4 or C.strides[1] != 4 or A.strides[0] % 4 or B.strides[0] % 4 \
            or C.strides[0] % 4 or A.strides[0] < A.shape[1] * 4 or B.strides[0] < B.shape[1] * 4 \
            or C.strides[0] < n * 4:
        raise ValueError("own_sgemm: A, B and C need contiguous elements and non-overlapping rows")
    with nogil:
        r = lm_gemm_own_f32(ta, tb, m, n, k, alpha, &A[0, 0], A.strides[0] // 4, &B[0, 0], B.strides[0] // 4,
                            beta, &C[0, 0], C.strides[0] // 4)
    return r == 0


def set_ew_aot(int on):
    """Whether fused elementwise instructions whose program is compiled ahead of time (vm_aot.txt) run
    that kernel (1, the default) or the VM (0); returns the previous setting.  For tests and A/B runs."""
    global _ew_aot
    cdef int old = _ew_aot
    _ew_aot = 1 if on else 0
    return old


cdef int64_t *_decoded_microprog(const int64_t[::1] code, int64_t pc, int fold, str who, lm_ew *e,
                                 int64_t *n) except NULL:
    """The fused_elementwise instruction at code[pc] decoded into e, and its micro-program (kernels.h,
    lm_ew_microprog; malloc'd, the caller frees it) of n[0] records.  ValueError naming ``who`` for
    anything else at pc."""
    cdef int64_t *mp
    if pc < 0 or pc + LM_HEADER > code.shape[0] or code[pc] != LM_OP_FUSED_ELEMENTWISE \
            or code[pc + 1] < LM_HEADER or pc + code[pc + 1] > code.shape[0]:
        raise ValueError(f"{who}: no fused_elementwise instruction at {pc}")
    if lm_ew_decode(&code[pc + LM_HEADER], code[pc + 1] - LM_HEADER, e) != 0:
        raise ValueError(f"{who}: malformed fused_elementwise instruction at {pc}")
    mp = <int64_t*>malloc((e.n_prog + e.n_out) * LM_MW * sizeof(int64_t))
    if mp == NULL:
        raise MemoryError()
    n[0] = lm_ew_microprog(e, mp, fold)
    if n[0] < 0:
        free(mp)
        raise ValueError(f"{who}: an opcode outside the VM table at {pc}")
    return mp


def ew_aot(const int64_t[::1] code not None, int64_t pc):
    """The name of the ahead-of-time kernel (vm_aot.txt) that runs the whole blocks of the
    fused_elementwise instruction at code[pc] with the column sums fused (set_ew_fold's default), or None
    when the VM runs them (whatever set_ew_aot says)."""
    cdef lm_ew e
    cdef int64_t n, k
    cdef int64_t *mp = _decoded_microprog(code, pc, 1, "ew_aot", &e, &n)
    try:
        k = lm_aot_find(&e, mp, n)
        return None if k < 0 else lm_aot_name(k).decode()
    finally:
        free(mp)


def ew_microprog(const int64_t[::1] code not None, int64_t pc, int fold):
    """The micro-program the fused_elementwise instruction at code[pc] runs per whole block (fold=1) or
    partial block (fold=0): a list of (kind, vm opcode, dst, a, b, c, output), kind one of "step",
    "step+colsum", "colsum-only step", "step+sum", "sum-only step" (a whole sum in a lane row), "store",
    "sum", "rowsum", "colsum" (kernels.h, lm_ew_microprog, lm_ew_lane_ok).
    For tests and for reading a plan; the plan must be valid (plan.validate)."""
    cdef lm_ew e
    cdef int64_t n, k
    cdef int64_t *mp = _decoded_microprog(code, pc, fold, "ew_microprog", &e, &n)
    try:
        out = []
        for k in range(n):
            op = mp[k * LM_MW]
            rec = tuple(mp[k * LM_MW + i] for i in range(1, LM_MW))
            red = "sum" if op >= 256 and op < 768 and lm_ew_lane_ok(&e, rec[4]) else "colsum"
            if op < 256:
                out.append(("step", op) + rec)
            elif op < 512:
                out.append((f"step+{red}", op - 256) + rec)
            elif op < 768:
                out.append((f"{red}-only step", op - 512) + rec)
            else:
                out.append(({768: "store", 769: "sum", 770: "rowsum", 771: "colsum"}[op], -1) + rec)
        return out
    finally:
        free(mp)
