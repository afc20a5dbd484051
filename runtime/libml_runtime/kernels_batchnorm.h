/* ---- batch normalisation in training mode (format 2.3: batch_norm, batch_norm_grad) -------------------
 * Part of the type-generic template: kernels_tmpl.h includes it once per (ISA, element type) copy, with
 * LM_T / LM_SFX defined (no include guard, by design).  libml_compile/ops_batchnorm.py is the compiler side.
 *
 * x is a contiguous (N, C, S) array; channel c owns the N rows x[(n * C + c) * S .. + S).  One call handles
 * one channel, entirely: its statistics are sums over the channel's M = N * S elements in a fixed order
 * (LM_BN_LANES double lanes across each row's blocked part, combined in lane order, plus one running tail
 * sum), so a channel's result depends on neither the thread count (the caller splits by channel) nor the
 * ISA.  float32 channels of millions of elements keep double accuracy in their statistics. */
#ifndef LM_BN_LANES
#define LM_BN_LANES 16
#endif

/* OUT = sum of EXPR over the M elements of channel c; EXPR is an expression of the element offset o */
#define LM_BN_SUM(OUT, N, C, S, c, EXPR)                                                             \
    do {                                                                                            \
        double acc_[LM_BN_LANES] = {0}, t_ = 0, s_ = 0;                                             \
        int64_t n_, j_, l_;                                                                         \
        const int64_t nb_ = (S) / LM_BN_LANES * LM_BN_LANES;                                        \
        for (n_ = 0; n_ < (N); n_++) {                                                              \
            const int64_t r_ = (n_ * (C) + (c)) * (S);                                              \
            for (j_ = 0; j_ < nb_; j_ += LM_BN_LANES) {                                             \
                _Pragma("omp simd")                                                                 \
                for (l_ = 0; l_ < LM_BN_LANES; l_++) { const int64_t o = r_ + j_ + l_; acc_[l_] += (EXPR); } \
            }                                                                                       \
            for (j_ = nb_; j_ < (S); j_++) { const int64_t o = r_ + j_; t_ += (EXPR); }             \
        }                                                                                           \
        for (l_ = 0; l_ < LM_BN_LANES; l_++) s_ += acc_[l_];                                        \
        (OUT) = s_ + t_;                                                                            \
    } while (0)

/* the forward of channel c (see format.py, opcode 64): mean and biased variance (two passes: no
 * cancellation), y = (x - mean) * (rstd * scale) + bias [relu], the saved mean / rstd, and the new running
 * statistics nmean / nvar (flags & 1: written over rmean / rvar too; rmean[c] is read first) */
static void LM_SFX(lm_batch_norm_channel)(int64_t N, int64_t C, int64_t S, int64_t c, int64_t flags, double eps,
                                          double mom, const LM_T *restrict x, const LM_T *scale,
                                          const LM_T *bias, LM_T *rmean, LM_T *rvar, LM_T *restrict y,
                                          LM_T *mean_out, LM_T *rstd_out, LM_T *nmean, LM_T *nvar)
{
    const int64_t M = N * S;
    double s, v;
    LM_BN_SUM(s, N, C, S, c, (double)x[o]);
    const double mean = M ? s / (double)M : NAN;
    LM_BN_SUM(v, N, C, S, c, ((double)x[o] - mean) * ((double)x[o] - mean));
    const double var = M ? v / (double)M : NAN;
    const double rstd = 1.0 / sqrt(var + eps);
    const LM_T m = (LM_T)mean, a = (LM_T)rstd * scale[c], b = bias[c];
    int64_t n, j;
    for (n = 0; n < N; n++) {
        const LM_T *restrict xr = x + (n * C + c) * S;
        LM_T *restrict yr = y + (n * C + c) * S;
        if (flags & 4) {
            #pragma omp simd
            for (j = 0; j < S; j++) {
                const LM_T t = (xr[j] - m) * a + b;
                yr[j] = t < 0 ? (LM_T)0 : t;  /* relu(NaN) = NaN, as the VM's RELU */
            }
        } else {
            #pragma omp simd
            for (j = 0; j < S; j++) yr[j] = (xr[j] - m) * a + b;
        }
    }
    mean_out[c] = m;
    rstd_out[c] = (LM_T)rstd;
    /* PyTorch's update: running = (1 - momentum) * running + momentum * batch statistic, the variance
     * optionally unbiased (M / (M - 1); the compiler refuses M = 1 there) */
    const double vb = (flags & 2) && M > 1 ? var * (double)M / (double)(M - 1) : var;
    const LM_T nm = (LM_T)((1.0 - mom) * (double)rmean[c] + mom * mean);
    const LM_T nv = (LM_T)((1.0 - mom) * (double)rvar[c] + mom * vb);
    nmean[c] = nm;
    nvar[c] = nv;
    if (flags & 1) {
        rmean[c] = nm;
        rvar[c] = nv;
    }
}

/* the backward of channel c (opcode 65), two passes: dbias = sum dy', dscale = sum dy' * xh, then
 * dx = scale * rstd * (dy' - dbias / M - xh * dscale / M), xh = (x - mean) * rstd; dy' = dy, or (flags & 4,
 * the fused BN + ReLU) dy where y > 0 and 0 elsewhere */
static void LM_SFX(lm_batch_norm_grad_channel)(int64_t N, int64_t C, int64_t S, int64_t c, int64_t flags,
                                               const LM_T *restrict x, const LM_T *scale, const LM_T *mean,
                                               const LM_T *rstd, const LM_T *restrict dy, const LM_T *restrict y,
                                               LM_T *restrict dx, LM_T *dscale, LM_T *dbias)
{
    const int64_t M = N * S;
    const LM_T m = mean[c], r = rstd[c];
    const int relu = (flags & 4) != 0;
    double sb, sx;
    LM_BN_SUM(sb, N, C, S, c, (double)(relu && !(y[o] > 0) ? (LM_T)0 : dy[o]));
    LM_BN_SUM(sx, N, C, S, c, (double)(relu && !(y[o] > 0) ? (LM_T)0 : dy[o]) * (double)((x[o] - m) * r));
    dbias[c] = (LM_T)sb;
    dscale[c] = (LM_T)sx;
    const LM_T k = scale[c] * r, c1 = (LM_T)(M ? sb / (double)M : 0), c2 = (LM_T)(M ? sx / (double)M : 0);
    int64_t n, j;
    for (n = 0; n < N; n++) {
        const int64_t r0 = (n * C + c) * S;
        const LM_T *restrict xr = x + r0, *restrict dr = dy + r0, *restrict yr = y + r0;
        LM_T *restrict out = dx + r0;
        if (relu) {
            #pragma omp simd
            for (j = 0; j < S; j++) {
                const LM_T g = yr[j] > 0 ? dr[j] : (LM_T)0;
                out[j] = k * (g - c1 - (xr[j] - m) * r * c2);
            }
        } else {
            #pragma omp simd
            for (j = 0; j < S; j++) out[j] = k * (dr[j] - c1 - (xr[j] - m) * r * c2);
        }
    }
}
#undef LM_BN_SUM
