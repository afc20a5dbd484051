/* Convolution microkernels over "shifted-row" tiles (template part, included by kernels_tmpl.h once per
 * element type and ISA copy; _conv.pxi builds the tiles and drives them).
 *
 * Why: im2col + BLAS moved Kc x P values through memory per image (9x the input for a 3x3 conv) and ran
 * GEMMs with M = 16..64 output channels, where OpenBLAS's packing dominates (35-75 GFLOP/s on 2 cores for
 * W6's layers).  Here the input of one block of output rows is copied once into a zero-padded, stride-
 * phase-split tile (tile[ch][phase][row][col], rows of width Wq), so that every kernel tap (ch, i, j) of
 * output pixel q (a "virtual" pixel: row-major over the block's rows of width Wq, the columns past the
 * output width are junk the caller drops) reads tile[off[k] + q]: a contiguous vector load at a constant
 * offset per tap.  The accumulators of MR output channels x NV vectors of pixels stay in registers for the
 * whole K = channels x taps reduction (the register-blocked GEMM oneDNN's direct convolutions use).
 *
 * Sum order: k = 0..K-1, one FMA per (m, q, k), the same for every thread count and tile position;
 * vector width and FMA contraction differ between ISA copies (so, as for any kernel here, bits may differ
 * between LIBML_ISA settings, never between thread counts).
 *
 * Register budget: AVX-512 32 zmm (MR 4 x NV 6 accumulators), AVX2 / baseline 16 ymm (4 x 3). */

#if defined(__AVX512F__)
#define LM_CV_BYTES 64
#define LM_CV_NVMAX 6
#define LM_CV_DW_MV 1
#define LM_CV_DW_KR 12
#else
#define LM_CV_BYTES 32
#define LM_CV_NVMAX 3
#define LM_CV_DW_MV 2
#define LM_CV_DW_KR 6
#endif
/* output channels per forward microkernel (the plan pads the packed weights to a multiple of it) */
#define LM_CV_MR 4

typedef LM_T LM_SFX(lm_cv_vec) __attribute__((vector_size(LM_CV_BYTES), aligned(sizeof(LM_T)), may_alias));
#define LM_CV_V LM_SFX(lm_cv_vec)
#define LM_CV_VL ((int64_t)(LM_CV_BYTES / sizeof(LM_T)))

/* The k loop of a microkernel over K taps: acc[m][v] += w_m[k] * tile[off[k] + v*VL ..] */
#define LM_CV_MK_SEG(NV, K, w, off)                                                                      \
    {                                                                                                    \
        const LM_T *restrict w0 = w[0], *restrict w1 = w[1], *restrict w2 = w[2], *restrict w3 = w[3];   \
        for (int64_t k = 0; k < K; k++) {                                                                \
            const LM_T *t = tile + off[k];                                                               \
            LM_CV_V xv[NV];                                                                              \
            for (int v = 0; v < NV; v++) xv[v] = *(const LM_CV_V *)(t + v * LM_CV_VL);                   \
            for (int v = 0; v < NV; v++) acc[0][v] += xv[v] * w0[k];                                     \
            for (int v = 0; v < NV; v++) acc[1][v] += xv[v] * w1[k];                                     \
            for (int v = 0; v < NV; v++) acc[2][v] += xv[v] * w2[k];                                     \
            for (int v = 0; v < NV; v++) acc[3][v] += xv[v] * w3[k];                                     \
        }                                                                                                \
    }

/* out[m*ldo + q] = sum_k w_m[k] * tile[off[k] + q] + sum_k s_m[k] * tile[off[K + k] + q], m < MR (w_m:
 * MR weight rows of K, s_m: MR rows of K2 -- conv_shortcut's channels, K2 = 0 otherwise), q < NV*VL */
#define LM_CV_MK(NV)                                                                                     \
static inline void LM_SFX(lm_cv_mk##NV)(int64_t K, const LM_T *restrict const *w, int64_t K2,            \
                                        const LM_T *restrict const *s, const int64_t *restrict off,      \
                                        const LM_T *restrict tile, LM_T *restrict out, int64_t ldo)      \
{                                                                                                        \
    LM_CV_V acc[LM_CV_MR][NV];                                                                            \
    for (int m = 0; m < LM_CV_MR; m++)                                                                   \
        for (int v = 0; v < NV; v++) acc[m][v] = (LM_CV_V){0};                                           \
    LM_CV_MK_SEG(NV, K, w, off)                                                                          \
    LM_CV_MK_SEG(NV, K2, s, (off + K))                                                                   \
    for (int m = 0; m < LM_CV_MR; m++)                                                                   \
        for (int v = 0; v < NV; v++) *(LM_CV_V *)(out + m * ldo + v * LM_CV_VL) = acc[m][v];            \
}
LM_CV_MK(1)
LM_CV_MK(2)
LM_CV_MK(3)
#if LM_CV_NVMAX > 3
LM_CV_MK(4)
LM_CV_MK(5)
LM_CV_MK(6)
#endif
#undef LM_CV_MK
#undef LM_CV_MK_SEG

/* The one-vector tail with 8 weight rows: 8 accumulators hide the FMA latency that leaves lm_cv_mk1 (4
 * accumulators) at half speed; the same sum order per output. */
static inline void LM_SFX(lm_cv_mk1x8)(int64_t K, const LM_T *restrict const *w, int64_t K2,
                                       const LM_T *restrict const *s, const int64_t *restrict off,
                                       const LM_T *restrict tile, LM_T *restrict out, int64_t ldo)
{
    LM_CV_V acc[8];
    for (int m = 0; m < 8; m++) acc[m] = (LM_CV_V){0};
    for (int64_t k = 0; k < K; k++) {
        LM_CV_V xv = *(const LM_CV_V *)(tile + off[k]);
        for (int m = 0; m < 8; m++) acc[m] += xv * w[m][k];
    }
    for (int64_t k = 0; k < K2; k++) {
        LM_CV_V xv = *(const LM_CV_V *)(tile + off[K + k]);
        for (int m = 0; m < 8; m++) acc[m] += xv * s[m][k];
    }
    for (int m = 0; m < 8; m++) *(LM_CV_V *)(out + m * ldo) = acc[m];
}

/* The forward product of one tile: out[m*ldo + q] for m < Mp (a multiple of LM_CV_MR) and q < Qp (a
 * multiple of 16 elements, so of every ISA's vector length), from the weight rows w + m*ldw (K each;
 * rows m >= Co read row Co - 1 and their outputs are junk), then (conv_shortcut) the rows w2 + m*ldw2
 * (K2 each) over the taps off[K ..].  No packing: the four rows stream side by side.  tile must be
 * readable up to the largest off[k] + Qp. */
static void LM_SFX(lm_conv_tile)(int64_t Mp, int64_t Co, int64_t Qp, int64_t K, const LM_T *w, int64_t ldw,
                                 int64_t K2, const LM_T *w2, int64_t ldw2, const int64_t *off, const LM_T *tile,
                                 LM_T *out, int64_t ldo)
{
    const int64_t NR = LM_CV_NVMAX * LM_CV_VL;
    for (int64_t m0 = 0; m0 < Mp; m0 += LM_CV_MR) {
        const LM_T *wr[LM_CV_MR], *sr[LM_CV_MR];
        for (int l = 0; l < LM_CV_MR; l++) {
            int64_t mm = m0 + l < Co ? m0 + l : Co - 1;
            wr[l] = w + mm * ldw;
            sr[l] = K2 > 0 ? w2 + mm * ldw2 : w;
        }
        LM_T *o = out + m0 * ldo;
        int64_t q0 = 0;
        for (; q0 + NR <= Qp; q0 += NR)
#if LM_CV_NVMAX > 3
            LM_SFX(lm_cv_mk6)(K, wr, K2, sr, off, tile + q0, o + q0, ldo);
#else
            LM_SFX(lm_cv_mk3)(K, wr, K2, sr, off, tile + q0, o + q0, ldo);
#endif
        switch ((Qp - q0) / LM_CV_VL) {
        case 0: break;
        case 1:   /* pairs of row blocks run lm_cv_mk1x8 below */
            if (m0 + 2 * LM_CV_MR > Mp || (m0 / LM_CV_MR) % 2 == 1) {
                if ((m0 / LM_CV_MR) % 2 == 0)
                    LM_SFX(lm_cv_mk1)(K, wr, K2, sr, off, tile + q0, o + q0, ldo);
                else {
                    const LM_T *w8[8], *s8[8];
                    for (int l = 0; l < 8; l++) {
                        int64_t mm = m0 - LM_CV_MR + l;
                        mm = mm < Co ? mm : Co - 1;
                        w8[l] = w + mm * ldw;
                        s8[l] = K2 > 0 ? w2 + mm * ldw2 : w;
                    }
                    LM_SFX(lm_cv_mk1x8)(K, w8, K2, s8, off, tile + q0, out + (m0 - LM_CV_MR) * ldo + q0, ldo);
                }
            }
            break;
        case 2: LM_SFX(lm_cv_mk2)(K, wr, K2, sr, off, tile + q0, o + q0, ldo); break;
#if LM_CV_NVMAX > 3
        case 3: LM_SFX(lm_cv_mk3)(K, wr, K2, sr, off, tile + q0, o + q0, ldo); break;
        case 4: LM_SFX(lm_cv_mk4)(K, wr, K2, sr, off, tile + q0, o + q0, ldo); break;
        default: LM_SFX(lm_cv_mk5)(K, wr, K2, sr, off, tile + q0, o + q0, ldo); break;
#else
        default: break;
#endif
        }
    }
}

/* The tile of one block of rows: tile[ch][a][b][R][col] = src[ch, (R0 + R)*sh + a, (cmin + col)*sw + b]
 * (0 outside [0, Hi) x [0, Wi)), every phase, then zeros up to tile_n.  Here rather than in Cython so the
 * row copies (stride sw reads) vectorise with restrict pointers. */
static void LM_SFX(lm_conv_build)(const LM_T *restrict src, int64_t Ci, int64_t Hi, int64_t Wi, int64_t sh,
                                  int64_t sw, int64_t R0, int64_t Rq, int64_t cmin, int64_t Wq, int64_t tile_n,
                                  LM_T *restrict tile)
{
    LM_T *restrict row = tile;
    for (int64_t ch = 0; ch < Ci; ch++)
        for (int64_t a = 0; a < sh; a++)
            for (int64_t b = 0; b < sw; b++) {
                /* the columns col with 0 <= (cmin + col)*sw + b < Wi: [lo, hi) */
                int64_t first = cmin * sw + b, lo = 0, hi;
                if (first < 0) lo = (-first + sw - 1) / sw;
                hi = first > Wi - 1 ? 0 : (Wi - 1 - first) / sw + 1;
                if (hi > Wq) hi = Wq;
                if (lo > hi) lo = hi;
                for (int64_t R = 0; R < Rq; R++, row += Wq) {
                    int64_t ih = (R0 + R) * sh + a;
                    if (ih < 0 || ih >= Hi) {
                        memset(row, 0, (size_t)Wq * sizeof(LM_T));
                        continue;
                    }
                    const LM_T *restrict sr = src + (ch * Hi + ih) * Wi + first;
                    for (int64_t c = 0; c < lo; c++) row[c] = 0;
                    if (sw == 1)
                        memcpy(row + lo, sr + lo, (size_t)(hi - lo) * sizeof(LM_T));
                    else if (sw == 2)
                        for (int64_t c = lo; c < hi; c++) row[c] = sr[2 * c];
                    else
                        for (int64_t c = lo; c < hi; c++) row[c] = sr[c * sw];
                    for (int64_t c = hi; c < Wq; c++) row[c] = 0;
                }
            }
    memset(row, 0, (size_t)(tile_n - (row - tile)) * sizeof(LM_T));
}

/* The weight gradient's product of one tile, accumulated: acc[k*Mv + m] += sum_q dyT[q*Mv + m] *
 * tile[off[k] + q] for k < Kp (a multiple of 12), m < Mv (a multiple of 16 elements), q = 0..Q-1 in
 * order.  dyT is the output gradient of the tile's virtual pixels, pixel-major (zero at junk pixels and
 * padded channels). */
static void LM_SFX(lm_conv_dw_tile)(int64_t Mv, int64_t Kp, int64_t Q, const LM_T *restrict dyT,
                                    const int64_t *restrict off, const LM_T *restrict tile,
                                    LM_T *restrict acc)
{
    const int64_t MB = LM_CV_DW_MV * LM_CV_VL;
    for (int64_t k0 = 0; k0 < Kp; k0 += LM_CV_DW_KR) {
        const LM_T *tk[LM_CV_DW_KR];
        for (int r = 0; r < LM_CV_DW_KR; r++) tk[r] = tile + off[k0 + r];
        for (int64_t m0 = 0; m0 < Mv; m0 += MB) {
            LM_CV_V a[LM_CV_DW_KR][LM_CV_DW_MV];
            LM_T *c = acc + k0 * Mv + m0;
            for (int r = 0; r < LM_CV_DW_KR; r++)
                for (int v = 0; v < LM_CV_DW_MV; v++) a[r][v] = *(const LM_CV_V *)(c + r * Mv + v * LM_CV_VL);
            for (int64_t q = 0; q < Q; q++) {
                LM_CV_V d[LM_CV_DW_MV];
                const LM_T *dq = dyT + q * Mv + m0;
                for (int v = 0; v < LM_CV_DW_MV; v++) d[v] = *(const LM_CV_V *)(dq + v * LM_CV_VL);
                for (int r = 0; r < LM_CV_DW_KR; r++) {
                    LM_T x = tk[r][q];
                    for (int v = 0; v < LM_CV_DW_MV; v++) a[r][v] += d[v] * x;
                }
            }
            for (int r = 0; r < LM_CV_DW_KR; r++)
                for (int v = 0; v < LM_CV_DW_MV; v++) *(LM_CV_V *)(c + r * Mv + v * LM_CV_VL) = a[r][v];
        }
    }
}

/* algo 2, the channel-vector forward (for small images and strided convs, where algo 1's padded-width
 * junk columns, stride phases and short rows cost most): vectors run over 16 output channels, each output
 * pixel's input values are broadcast, so any pixel can be computed without its neighbours -- no junk
 * columns, no phase split.  outT[q*Mv + m] = sum_k tile[base(q) + off[k]] * wt[k*Mv + m] for q < P, m < Mv
 * (a multiple of 16), base(q) = (q / V)*sh*Wt + (q % V)*sw: the tile is the block's zero-padded input
 * (tile[ch][row][col], rows of width Wt) and off[k] = (ch*Rt + i*dh)*Wt + j*dw.  Pixels go in groups of
 * LM_PB_MR; the last group's missing pixels repeat pixel P-1 (outT has rows up to a multiple of 24, the
 * common multiple of every copy's group size).  Sum order k = 0..K-1, one FMA per (q, m, k). */
#define LM_PB_NV ((int)(16 / LM_CV_VL))
#if defined(__AVX512F__)
/* AVX-512: 12 pixels x 32 channels (two 16-channel blocks, float) or x 16 (double, or a float remainder
 * block).  24 pixels x 16 channels -- the first AVX-512 choice -- needed 24 live pixel pointers: GCC
 * spilled them, one more load per broadcast, and W8's algo-2 layers ran at 76-93 GFLOP/s on a Xeon whose
 * GEMM probe is 319. */
#define LM_PB_MR 12
#define LM_PB_CB2 (LM_PB_NV == 1)
#else
#define LM_PB_MR (12 / LM_PB_NV)
#define LM_PB_CB2 0
#endif
/* CB blocks of 16 channels from m0 (a compile-time 1 or 2 where inlined) */
static inline __attribute__((always_inline)) void LM_SFX(lm_conv_ocv_blk)(
    const int CB, int64_t m0, int64_t Mv, int64_t P, int64_t V, int64_t sh, int64_t sw, int64_t Wt, int64_t K,
    const LM_T *restrict wt, const int64_t *restrict off, const LM_T *restrict tile, LM_T *restrict outT)
{
    const LM_T *restrict wm = wt + m0 * K;
    int64_t r = 0, c = 0;   /* (row, column) of pixel q0, stepped instead of divided */
    for (int64_t q0 = 0; q0 < P; q0 += LM_PB_MR) {
        const LM_T *px[LM_PB_MR];
        for (int p = 0; p < LM_PB_MR; p++) {
            if (q0 + p >= P) {   /* past the last pixel: repeat it (its rows of outT are never read) */
                px[p] = px[p - 1];
                continue;
            }
            px[p] = tile + r * sh * Wt + c * sw;
            if (++c == V) { c = 0; r++; }
        }
        LM_CV_V acc[LM_PB_MR][2 * LM_PB_NV];
        for (int p = 0; p < LM_PB_MR; p++)
            for (int v = 0; v < CB * LM_PB_NV; v++) acc[p][v] = (LM_CV_V){0};
        const LM_T *restrict wk = wm;
        for (int64_t k = 0; k < K; k++, wk += 16) {
            LM_CV_V wv[2 * LM_PB_NV];
            const int64_t o = off[k];
            for (int b = 0; b < CB; b++)
                for (int v = 0; v < LM_PB_NV; v++) wv[b * LM_PB_NV + v] = *(const LM_CV_V *)(wk + b * 16 * K + v * LM_CV_VL);
            for (int p = 0; p < LM_PB_MR; p++) {
                LM_T x = px[p][o];
                for (int v = 0; v < CB * LM_PB_NV; v++) acc[p][v] += wv[v] * x;
            }
        }
        for (int p = 0; p < LM_PB_MR; p++)
            for (int v = 0; v < CB * LM_PB_NV; v++)
                *(LM_CV_V *)(outT + (q0 + p) * Mv + m0 + v * LM_CV_VL) = acc[p][v];
    }
}

static void LM_SFX(lm_conv_ocv)(int64_t Mv, int64_t P, int64_t V, int64_t sh, int64_t sw, int64_t Wt,
                                int64_t K, const LM_T *restrict wt, const int64_t *restrict off,
                                const LM_T *restrict tile, LM_T *restrict outT)
{
    /* wt is packed per block of 16 channels: wt[(m0/16)*K*16 + k*16 + (m - m0)], one contiguous stream
     * per block (two side by side where CB = 2) */
    int64_t m0 = 0;
    if (LM_PB_CB2)
        for (; m0 + 32 <= Mv; m0 += 32) LM_SFX(lm_conv_ocv_blk)(2, m0, Mv, P, V, sh, sw, Wt, K, wt, off, tile, outT);
    for (; m0 < Mv; m0 += 16) LM_SFX(lm_conv_ocv_blk)(1, m0, Mv, P, V, sh, sw, Wt, K, wt, off, tile, outT);
}
#undef LM_PB_NV
#undef LM_PB_MR
#undef LM_PB_CB2

/* algo 2's output block back to channel-major: dst[m*ldd + q] = src[q*Mv + m] for m < Co, q < P (src:
 * lm_conv_ocv's pixel-major outT).  4 x 4 blocks transposed in registers (8 shuffles for 16 values instead
 * of 16 scalar loads and stores); a copy, so no bit changes. */
static void LM_SFX(lm_conv_ocv_unpack)(int64_t Mv, int64_t Co, int64_t P, const LM_T *restrict src,
                                       LM_T *restrict dst, int64_t ldd)
{
    typedef LM_T v4 __attribute__((vector_size(4 * sizeof(LM_T)), aligned(sizeof(LM_T)), may_alias));
    int64_t q0 = 0;
    for (; q0 + 4 <= P; q0 += 4) {
        int64_t m0 = 0;
        for (; m0 + 4 <= Co; m0 += 4) {
            const LM_T *sp = src + q0 * Mv + m0;
            v4 r0 = *(const v4 *)sp, r1 = *(const v4 *)(sp + Mv), r2 = *(const v4 *)(sp + 2 * Mv),
               r3 = *(const v4 *)(sp + 3 * Mv);
            v4 t0 = __builtin_shufflevector(r0, r1, 0, 4, 1, 5), t1 = __builtin_shufflevector(r0, r1, 2, 6, 3, 7);
            v4 t2 = __builtin_shufflevector(r2, r3, 0, 4, 1, 5), t3 = __builtin_shufflevector(r2, r3, 2, 6, 3, 7);
            LM_T *dp = dst + m0 * ldd + q0;
            *(v4 *)dp = __builtin_shufflevector(t0, t2, 0, 1, 4, 5);
            *(v4 *)(dp + ldd) = __builtin_shufflevector(t0, t2, 2, 3, 6, 7);
            *(v4 *)(dp + 2 * ldd) = __builtin_shufflevector(t1, t3, 0, 1, 4, 5);
            *(v4 *)(dp + 3 * ldd) = __builtin_shufflevector(t1, t3, 2, 3, 6, 7);
        }
        for (; m0 < Co; m0++)
            for (int64_t i = 0; i < 4; i++) dst[m0 * ldd + q0 + i] = src[(q0 + i) * Mv + m0];
    }
    for (; q0 < P; q0++)
        for (int64_t m = 0; m < Co; m++) dst[m * ldd + q0] = src[q0 * Mv + m];
}

/* algo 2's tile: tile[ch][R][C] = src[ch, r0 + R, C - pw] (0 outside [0, Hi) x [0, Wi)) for R < Rt,
 * C < Wt, then zeros up to tile_n. */
static void LM_SFX(lm_conv_build_pad)(const LM_T *restrict src, int64_t Ci, int64_t Hi, int64_t Wi, int64_t r0,
                                      int64_t Rt, int64_t pw, int64_t Wt, int64_t tile_n, LM_T *restrict tile)
{
    int64_t lo = pw < Wt ? pw : Wt, hi = pw + Wi < Wt ? pw + Wi : Wt;
    LM_T *restrict row = tile;
    for (int64_t ch = 0; ch < Ci; ch++)
        for (int64_t R = 0; R < Rt; R++, row += Wt) {
            int64_t ih = r0 + R;
            if (ih < 0 || ih >= Hi || hi <= lo) {
                memset(row, 0, (size_t)Wt * sizeof(LM_T));
                continue;
            }
            for (int64_t c = 0; c < lo; c++) row[c] = 0;
            memcpy(row + lo, src + (ch * Hi + ih) * Wi + (lo - pw), (size_t)(hi - lo) * sizeof(LM_T));
            for (int64_t c = hi; c < Wt; c++) row[c] = 0;
        }
    memset(row, 0, (size_t)(tile_n - (row - tile)) * sizeof(LM_T));
}

#undef LM_CV_V
#undef LM_CV_VL
#undef LM_CV_BYTES
#undef LM_CV_NVMAX
#undef LM_CV_DW_MV
#undef LM_CV_DW_KR
#undef LM_CV_MR
