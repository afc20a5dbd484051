/* An own SGEMM for the AVX-512 copy (template part, included by kernels_tmpl.h once per element type and
 * ISA copy; only the float copy under __AVX512F__ computes, every other copy returns -1 and the caller
 * runs BLAS).
 *
 * Why: libml splits a GEMM into per-thread panels (one thread pool, sizes-only splits), and single-
 * threaded OpenBLAS (SkylakeX kernels) is slow on the small-M panels that training steps make: on a Xeon
 * with AVX-512, 2 threads, one panel each (C harness, alternating): 64x512x784 own 218 vs OpenBLAS 173
 * GFLOP/s, 64x512x512 240 vs 177, 128x1024x4096 211 vs 118, 392x512x128 (A transposed) 297 vs 250,
 * 512x512x784 297 vs 277; at 1024x4096x4096 OpenBLAS is as fast and at 2048x4096x4096 faster (293 vs
 * 255), so panels above LM_GEMM_OWN_MAX multiply-adds stay with BLAS.
 *
 * Row-major C(m x n) = alpha * op(A) op(B) + beta * C (BLAS semantics: beta == 0 never reads C).  The
 * BLIS loop nest: blocks of NC columns, KC values of k (balanced: k = 784 runs 4 blocks of 196), MC rows;
 * op(B)'s KC x NC block packed in NR-column slivers (stays in L2), op(A)'s MC x KC block in MR-row
 * slivers, and a 12 x 32 microkernel (24 zmm accumulators, two B vectors and 12 broadcasts per k).  Sum
 * order of C[i][j]: k blocks in order, each a chain k = k0 .. k0+kc-1 in one accumulator, then
 * alpha * that added to C (beta * C first) -- fixed by (m, n, k) and the ISA, so the same for any thread
 * count (the callers' panels are sizes-only).  The workspace (packed blocks, ~1.2 MB) is per thread,
 * allocated on a thread's first call and kept (lm_gemm_ws, kernels.h). */

#if defined(__AVX512F__)
#define LM_GO_ON (sizeof(LM_T) == 4)
#else
#define LM_GO_ON 0
#endif
#define LM_GO_MR 12
#define LM_GO_NR 32
#define LM_GO_KC 256
#define LM_GO_MC 144
#define LM_GO_NC 1024
#define LM_GO_FAR 1024   /* a leading dimension (floats) whose rows lie a 4 KB page or more apart */
#define LM_GO_ROWS_WALK 131072   /* kc x nc values of a B block (512 KB) above which the C-row walk runs */

#if defined(__AVX512F__)
typedef float LM_SFX(lm_go_v16) __attribute__((vector_size(64), aligned(64)));
typedef float LM_SFX(lm_go_v16u) __attribute__((vector_size(64), aligned(4), may_alias));
#define LM_GO_V LM_SFX(lm_go_v16)
#define LM_GO_VU LM_SFX(lm_go_v16u)

/* C[0:mr, 0:nr] (+)= alpha * the kc-long product of sliver a (MR x kc, k-major) and sliver b (kc x NR) */
__attribute__((unused)) static inline void LM_SFX(lm_go_kernel)(int64_t kc, const float *restrict a, const float *restrict b,
                                        float *restrict c, int64_t ldc, float alpha, float beta, int first,
                                        int64_t mr, int64_t nr)
{
    LM_GO_V acc[LM_GO_MR][2];
    for (int i = 0; i < LM_GO_MR; i++) {
        acc[i][0] = acc[i][1] = (LM_GO_V){0};
        if (i < mr) {  /* the C tile's lines, while the product runs (they are read at the end) */
            __builtin_prefetch(c + i * ldc, 1, 3);
            __builtin_prefetch(c + i * ldc + 16, 1, 3);
        }
    }
    #pragma GCC unroll 4
    for (int64_t k = 0; k < kc; k++) {
        const LM_GO_V b0 = *(const LM_GO_V *)(b + LM_GO_NR * k), b1 = *(const LM_GO_V *)(b + LM_GO_NR * k + 16);
        const float *ak = a + LM_GO_MR * k;
        for (int i = 0; i < LM_GO_MR; i++) {
            const float av = ak[i];
            acc[i][0] += b0 * av;
            acc[i][1] += b1 * av;
        }
    }
    if (mr == LM_GO_MR && nr == LM_GO_NR) {
        for (int i = 0; i < LM_GO_MR; i++) {
            LM_GO_VU *cr = (LM_GO_VU *)(c + i * ldc);
            for (int v = 0; v < 2; v++) {
                LM_GO_V r = acc[i][v] * alpha;
                if (!first) r += cr[v];
                else if (beta != 0) r += cr[v] * beta;
                cr[v] = r;
            }
        }
        return;
    }
    float t[LM_GO_MR * LM_GO_NR] __attribute__((aligned(64)));
    for (int i = 0; i < LM_GO_MR; i++) {
        *(LM_GO_V *)(t + i * LM_GO_NR) = acc[i][0];
        *(LM_GO_V *)(t + i * LM_GO_NR + 16) = acc[i][1];
    }
    for (int64_t i = 0; i < mr; i++)   /* the same operations as the full tile's, lane by lane */
        for (int64_t j = 0; j < nr; j++) {
            float r = t[i * LM_GO_NR + j] * alpha;
            if (!first) r += c[i * ldc + j];
            else if (beta != 0) r += c[i * ldc + j] * beta;
            c[i * ldc + j] = r;
        }
}

/* ap[s][k][i] = op(A)[i0 + s*MR + i][p0 + k], rows past mc zero.  A stored transposed (K x M) with rows a
 * page or more apart is read a k row at a time (mc contiguous values), as pack_b does B */
__attribute__((unused)) static void LM_SFX(lm_go_pack_a)(int ta, const float *A, int64_t lda, int64_t i0, int64_t mc, int64_t p0,
                                 int64_t kc, float *restrict ap)
{
    if (ta && lda >= LM_GO_FAR) {
        for (int64_t k = 0; k < kc; k++) {
            const float *src = A + (p0 + k) * lda + i0;
            for (int64_t s = 0; s < mc; s += LM_GO_MR) {
                const int64_t mr = mc - s < LM_GO_MR ? mc - s : LM_GO_MR;
                float *restrict o = ap + s * kc + k * LM_GO_MR;
                int64_t i = 0;
                for (; i < mr; i++) o[i] = src[s + i];
                for (; i < LM_GO_MR; i++) o[i] = 0;
            }
        }
        return;
    }
    for (int64_t s = 0; s < mc; s += LM_GO_MR) {
        const int64_t mr = mc - s < LM_GO_MR ? mc - s : LM_GO_MR;
        float *restrict o = ap + s * kc;
        if (ta) {   /* rows within a page or two of each other: sliver by sliver writes ap in order */
            for (int64_t k = 0; k < kc; k++) {
                const float *src = A + (p0 + k) * lda + i0 + s;
                int64_t i = 0;
                for (; i < mr; i++) o[k * LM_GO_MR + i] = src[i];
                for (; i < LM_GO_MR; i++) o[k * LM_GO_MR + i] = 0;
            }
            continue;
        }
        const float *rows[LM_GO_MR];
        for (int64_t i = 0; i < LM_GO_MR; i++) rows[i] = A + (i0 + s + (i < mr ? i : 0)) * lda + p0;
        for (int64_t k = 0; k < kc; k++) {
            int64_t i = 0;
            for (; i < mr; i++) o[k * LM_GO_MR + i] = rows[i][k];
            for (; i < LM_GO_MR; i++) o[k * LM_GO_MR + i] = 0;
        }
    }
}

/* bp[s][k][j] = op(B)[p0 + k][j0 + s*NR + j], columns past nc zero.  op(B) = B^T: 8 x 8 blocks transposed
 * in registers (one scalar store per element, strided by NR, made this packing a third of a 64-row
 * panel's time) */
__attribute__((unused)) static void LM_SFX(lm_go_pack_b)(int tb, const float *B, int64_t ldb, int64_t p0, int64_t kc, int64_t j0,
                                 int64_t nc, float *restrict bp)
{
    if (!tb && ldb >= LM_GO_FAR) {
        /* a k row at a time: each row of B read once, contiguously.  Sliver by sliver reads 32 values per
         * row, rows ldb apart -- here a page or more, where the prefetchers do not follow (W3's 4096-wide
         * weights); for narrower B that walk writes bp in order (W2, with both switches at every size: 2 % slower) */
        for (int64_t k = 0; k < kc; k++) {
            const float *src = B + (p0 + k) * ldb + j0;
            int64_t s = 0;
            for (; s + LM_GO_NR <= nc; s += LM_GO_NR) {
                float *restrict o = bp + s * kc + k * LM_GO_NR;
                *(LM_GO_V *)o = *(const LM_GO_VU *)(src + s);
                *(LM_GO_V *)(o + 16) = *(const LM_GO_VU *)(src + s + 16);
            }
            if (s < nc) {
                float *restrict o = bp + s * kc + k * LM_GO_NR;
                int64_t j = 0;
                for (; j < nc - s; j++) o[j] = src[s + j];
                for (; j < LM_GO_NR; j++) o[j] = 0;
            }
        }
        return;
    }
    for (int64_t s = 0; s < nc; s += LM_GO_NR) {
        const int64_t nr = nc - s < LM_GO_NR ? nc - s : LM_GO_NR;
        float *restrict o = bp + s * kc;
        if (!tb) {   /* rows within a page or two of each other: sliver by sliver writes bp in order */
            for (int64_t k = 0; k < kc; k++) {
                const float *src = B + (p0 + k) * ldb + j0 + s;
                int64_t j = 0;
                if (nr == LM_GO_NR) {
                    *(LM_GO_V *)(o + k * LM_GO_NR) = *(const LM_GO_VU *)src;
                    *(LM_GO_V *)(o + k * LM_GO_NR + 16) = *(const LM_GO_VU *)(src + 16);
                    continue;
                }
                for (; j < nr; j++) o[k * LM_GO_NR + j] = src[j];
                for (; j < LM_GO_NR; j++) o[k * LM_GO_NR + j] = 0;
            }
        } else if (nr == LM_GO_NR) {
            int64_t k = 0;
            for (; k + 8 <= kc; k += 8)
                for (int64_t jb = 0; jb < LM_GO_NR; jb += 8) {
                    const float *src = B + (j0 + s + jb) * ldb + p0 + k;
                    const __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + ldb),
                                 r2 = _mm256_loadu_ps(src + 2 * ldb), r3 = _mm256_loadu_ps(src + 3 * ldb),
                                 r4 = _mm256_loadu_ps(src + 4 * ldb), r5 = _mm256_loadu_ps(src + 5 * ldb),
                                 r6 = _mm256_loadu_ps(src + 6 * ldb), r7 = _mm256_loadu_ps(src + 7 * ldb);
                    const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1),
                                 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3),
                                 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
                                 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
                    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
                                 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
                                 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
                                 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
                    float *d = o + k * LM_GO_NR + jb;
                    _mm256_storeu_ps(d + 0 * LM_GO_NR, _mm256_permute2f128_ps(u0, u4, 0x20));
                    _mm256_storeu_ps(d + 1 * LM_GO_NR, _mm256_permute2f128_ps(u1, u5, 0x20));
                    _mm256_storeu_ps(d + 2 * LM_GO_NR, _mm256_permute2f128_ps(u2, u6, 0x20));
                    _mm256_storeu_ps(d + 3 * LM_GO_NR, _mm256_permute2f128_ps(u3, u7, 0x20));
                    _mm256_storeu_ps(d + 4 * LM_GO_NR, _mm256_permute2f128_ps(u0, u4, 0x31));
                    _mm256_storeu_ps(d + 5 * LM_GO_NR, _mm256_permute2f128_ps(u1, u5, 0x31));
                    _mm256_storeu_ps(d + 6 * LM_GO_NR, _mm256_permute2f128_ps(u2, u6, 0x31));
                    _mm256_storeu_ps(d + 7 * LM_GO_NR, _mm256_permute2f128_ps(u3, u7, 0x31));
                }
            for (; k < kc; k++)
                for (int64_t j = 0; j < LM_GO_NR; j++) o[k * LM_GO_NR + j] = B[(j0 + s + j) * ldb + p0 + k];
        } else {
            for (int64_t j = 0; j < LM_GO_NR; j++) {
                if (j < nr) {
                    const float *src = B + (j0 + s + j) * ldb + p0;
                    for (int64_t k = 0; k < kc; k++) o[k * LM_GO_NR + j] = src[k];
                } else
                    for (int64_t k = 0; k < kc; k++) o[k * LM_GO_NR + j] = 0;
            }
        }
    }
}
#undef LM_GO_V
#undef LM_GO_VU
#endif

/* 0: C computed; -1: not this copy's job (not float + AVX-512, or outside the sizes it wins at, or
 * alpha == 0, which BLAS treats as "do not read A and B"), the caller runs BLAS.  Never partly done. */
static int LM_SFX(lm_gemm_own)(int ta, int tb, int64_t m, int64_t n, int64_t k, LM_T alpha, const LM_T *A,
                               int64_t lda, const LM_T *B, int64_t ldb, LM_T beta, LM_T *C, int64_t ldc)
{
    if (!LM_GO_ON || m < LM_GO_MR || n < LM_GO_NR || k < 16 || alpha == 0
        || (double)m * (double)n * (double)k > LM_GEMM_OWN_MAX)
        return -1;
#if defined(__AVX512F__)
    float *ws = (float *)lm_gemm_ws((size_t)(LM_GO_KC * LM_GO_NC + LM_GO_MC * LM_GO_KC) * sizeof(float));
    if (ws == NULL) return -1;
    const float *a = (const float *)A, *b = (const float *)B;
    float *c = (float *)C;
    float *bp = ws, *ap = ws + LM_GO_KC * LM_GO_NC;
    const int64_t nkb = (k + LM_GO_KC - 1) / LM_GO_KC, KC = (k + nkb - 1) / nkb;
    for (int64_t jc = 0; jc < n; jc += LM_GO_NC) {
        const int64_t nc = n - jc < LM_GO_NC ? n - jc : LM_GO_NC;
        for (int64_t pc = 0; pc < k; pc += KC) {
            const int64_t kc = k - pc < KC ? k - pc : KC;
            LM_SFX(lm_go_pack_b)(tb, b, ldb, pc, kc, jc, nc, bp);
            for (int64_t ic = 0; ic < m; ic += LM_GO_MC) {
                const int64_t mc = m - ic < LM_GO_MC ? m - ic : LM_GO_MC;
                LM_SFX(lm_go_pack_a)(ta, a, lda, ic, mc, pc, kc, ap);
                /* Two walks, the same sums.  A small B block (W2's panels: <= 256 KB) keeps B's sliver (kc x
                 * NR) in L1 while A's slivers stream by.  A large one (W3's: 1 MB) walks a row of C tiles
                 * per A sliver instead: that sliver (12 KB) stays in L1, B's slivers stream from L2, and
                 * the C tiles follow C's rows, a stream the prefetchers track (the weight updates' beta = 1
                 * reads C from memory).  C harness, 2 threads, rows walk / B-sliver walk: W3's panels
                 * 4096 x 4096 x 256 (A^T) 290 / 255 GFLOP/s, the whole step's GEMMs 132 / 140 ms; W2's
                 * 128 x 512 x 512 panels 268 / 277 */
                const int rows = nc * kc > LM_GO_ROWS_WALK;   /* one call site: two inlined kernels ran 2-3 % slower */
                const int64_t no = rows ? mc : nc, so = rows ? LM_GO_MR : LM_GO_NR;
                const int64_t ni = rows ? nc : mc, si = rows ? LM_GO_NR : LM_GO_MR;
                for (int64_t x = 0; x < no; x += so)
                    for (int64_t y = 0; y < ni; y += si) {
                        const int64_t ir = rows ? x : y, jr = rows ? y : x;
                        LM_SFX(lm_go_kernel)(kc, ap + ir * kc, bp + jr * kc, c + (ic + ir) * ldc + jc + jr, ldc,
                                             (float)alpha, (float)beta, pc == 0,
                                             mc - ir < LM_GO_MR ? mc - ir : LM_GO_MR,
                                             nc - jr < LM_GO_NR ? nc - jr : LM_GO_NR);
                    }
            }
        }
    }
    return 0;
#else
    (void)ta; (void)tb; (void)A; (void)lda; (void)B; (void)ldb; (void)beta; (void)C; (void)ldc;
    return -1;
#endif
}
#undef LM_GO_ON
#undef LM_GO_MR
#undef LM_GO_NR
#undef LM_GO_KC
#undef LM_GO_MC
#undef LM_GO_NC
#undef LM_GO_ROWS_WALK
#undef LM_GO_FAR
