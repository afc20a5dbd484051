/* W4's whole training step as one hand-fused, straight-line C loop: the reference point for libml's VM.
 *
 *   y = sigmoid(x*a + b) / (1 + relu(x - c)),  loss = mean(y),  then SGD on a, b, c (each (C,))
 *
 * It reads x once, keeps every intermediate in registers, and performs the divisions a compiler would
 * emit without reassociation: 1/(1+e) in the sigmoid, s/d, s(1-s)/d and y/d.  Column partial sums are
 * per thread over a fixed row split, combined in thread order.  Built by benchmarks/worker.py with
 * `cc -O3 -march=native -fopenmp -fno-math-errno -fno-trapping-math` and linked to libmvec: with
 * `omp declare simd` on expf, GCC calls glibc's vector expf.  -fno-trapping-math only lets GCC if-convert
 * the relu select (FP exception flags are not observed); NaN and Inf values propagate as without it.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#pragma omp declare simd notinbranch
extern float expf(float);

static void w4_rows(int64_t r0, int64_t r1, int64_t C, const float *restrict x, const float *restrict a,
                    const float *restrict b, const float *restrict c, float *restrict ga,
                    float *restrict gb, float *restrict gc, float *restrict ly)
{
    for (int64_t i = r0; i < r1; i++) {
        const float *restrict xr = x + i * C;
        #pragma omp simd
        for (int64_t j = 0; j < C; j++) {
            float xv = xr[j];
            float s = 1.0f / (1.0f + expf(-(xv * a[j] + b[j])));
            float r = xv - c[j];
            float st = r > 0.0f ? 1.0f : 0.0f;
            float d = 1.0f + (r < 0.0f ? 0.0f : r);
            float y = s / d;
            float gz = s * (1.0f - s) / d;   /* d y / d z */
            ly[j] += y;
            ga[j] += gz * xv;
            gb[j] += gz;
            gc[j] += (y / d) * st;           /* d y / d c = (y / d) step(x - c) */
        }
    }
}

/* One step: returns the loss (mean of y before the update); a, b, c updated in place.
 * scratch: nthreads * 4 * C floats. */
double w4_step(const float *x, int64_t R, int64_t C, float *a, float *b, float *c, float lr,
               int nthreads, float *scratch)
{
    memset(scratch, 0, sizeof(float) * 4 * C * nthreads);
    #pragma omp parallel num_threads(nthreads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        float *p = scratch + (int64_t)t * 4 * C;
        w4_rows(R * t / nt, R * (t + 1) / nt, C, x, a, b, c, p, p + C, p + 2 * C, p + 3 * C);
    }
    for (int t = 1; t < nthreads; t++)
        for (int64_t j = 0; j < 4 * C; j++) scratch[j] += scratch[(int64_t)t * 4 * C + j];
    const float inv = 1.0f / (float)(R * C);
    double loss = 0;
    for (int64_t j = 0; j < C; j++) {
        loss += scratch[3 * C + j];
        a[j] -= lr * inv * scratch[j];
        b[j] -= lr * inv * scratch[C + j];
        c[j] -= lr * inv * scratch[2 * C + j];
    }
    return loss / (double)(R * C);
}
