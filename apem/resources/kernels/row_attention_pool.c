/* One layer of APEM's Pattern Selector attention (paper eq. 18) per sample: the scores of the Q
 * learnt queries over the sample's R rows, their softmax over the rows, and the pooling, and in
 * backward every product with the sample's rows, the attention factor's gradient included. Each is a
 * (6 x 64 x 18) product at Table 2's sizes, where torch's batched matmul spends most of its time in
 * per-matrix overhead. Built and loaded by
 * apem/nn/native.py and called by apem/nn/native_pools.py; the torch path
 * (apem.nn.attention.row_attention_pool) is the reference, and tests/nn/test_native_pool.py keeps
 * the two equal.
 *
 * Shapes (row-major float32), for one layer:
 *   factor (D, Q)      the query-side factor (scaled); scores[q, r] = shared[b, r] . factor[:, q]
 *   weights (Q, B, R)  the softmax weights over r; with row weights z (B, R): weights = q z with
 *   q (Q, B, R)        q = e / sum_r(z e) (all-zero row weights give all-zero weights)
 *   shared (B, R, D)   the rows attended over
 *   pooled (B, Q, D)   sum_r weights[q, b, r] shared[b, r]
 * A sample's weights for query q are at weights + (q B + b) R: the per-sample helpers take
 * w = weights + b R and the query stride B R. They work on copies of the sample's rows padded with
 * zeros to DP = D rounded up to 8 columns (DP = 24 for D = 18), so that the AVX2 loops have no
 * scalar tail (a tail of 2 columns cost as much as the 16 before it). Each call splits the batch
 * into `threads` sample ranges run by OpenMP (see gathered_pool.c); thread t uses `work` + t *
 * row_attention_pool_work_floats() floats.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <omp.h>
#include <string.h>

#include "common.h"
#include "pattern_attention.h"

static i64 padded(i64 D) { return (D + 7) / 8 * 8; }

/* The backward's scratch (the larger): the padded rows and their gradient (R, DP) each, the padded factor
 * and pooled gradient (Q, DP) each, and d/d weights and d/d scores (Q, R) each; the forward uses its first
 * R DP + 2 Q DP. */
i64 row_attention_pool_work_floats(i64 R, i64 Q, i64 D) {
    const i64 DP = padded(D);
    return 2 * R * DP + 2 * Q * DP + 2 * Q * R;
}

/* Each thread's slot of the factor's gradient, transposed and padded: (Q, DP). */
i64 row_attention_pool_factor_slot_floats(i64 Q, i64 D) { return Q * padded(D); }

/* a_p (n, DP) <- a (n, D) with zero columns D..DP. */
static void pad_rows(const float *restrict a, i64 n, i64 D, i64 DP, float *restrict a_p) {
    for (i64 r = 0; r < n; ++r) {
        for (i64 j = 0; j < D; ++j) a_p[r * DP + j] = a[r * D + j];
        for (i64 j = D; j < DP; ++j) a_p[r * DP + j] = 0.0f;
    }
}

static void unpad_rows(const float *restrict a_p, i64 n, i64 D, i64 DP, float *restrict a) {
    for (i64 r = 0; r < n; ++r)
        for (i64 j = 0; j < D; ++j) a[r * D + j] = a_p[r * DP + j];
}

/* w[q, r] (query stride q_stride) <- f[q] . x[r]: f (Q, DP), x (R, DP). */
static void scores_sample_generic(const float *restrict f, const float *restrict x, i64 Q, i64 R, i64 DP,
                                  float *restrict w, i64 q_stride) {
    for (i64 iq = 0; iq < Q; ++iq)
        for (i64 r = 0; r < R; ++r) {
            float total = 0.0f;
            for (i64 j = 0; j < DP; ++j) total += f[iq * DP + j] * x[r * DP + j];
            w[iq * q_stride + r] = total;
        }
}

/* out (Q, DP) (+)= sum_r w[q, r] x[r]. */
static void pool_sample_generic(const float *restrict w, i64 q_stride, const float *restrict x, i64 Q, i64 R,
                                i64 DP, int accumulate, float *restrict out) {
    if (!accumulate) memset(out, 0, sizeof(float) * Q * DP);
    for (i64 iq = 0; iq < Q; ++iq)
        for (i64 r = 0; r < R; ++r) {
            const float wr = w[iq * q_stride + r];
            for (i64 j = 0; j < DP; ++j) out[iq * DP + j] += wr * x[r * DP + j];
        }
}

/* gx (R, DP) (+)= sum_q w[q, r] g[q]. */
static void pool_grad_generic(const float *restrict w, i64 q_stride, const float *restrict g, i64 Q, i64 R, i64 DP,
                              int accumulate, float *restrict gx) {
    if (!accumulate) memset(gx, 0, sizeof(float) * R * DP);
    for (i64 iq = 0; iq < Q; ++iq)
        for (i64 r = 0; r < R; ++r) {
            const float wr = w[iq * q_stride + r];
            for (i64 j = 0; j < DP; ++j) gx[r * DP + j] += wr * g[iq * DP + j];
        }
}

#if APEM_AVX2
/* NQ queries' pooled rows for columns [j0, j0 + 8), in registers; NQ is a constant at each call. */
static inline __attribute__((always_inline)) void pool_block(const float *restrict w, i64 q_stride,
                                                             const float *restrict x, i64 R, i64 DP, i64 j0,
                                                             const int NQ, int accumulate, float *restrict out) {
    __m256 acc[6];
    for (int q = 0; q < NQ; ++q) acc[q] = accumulate ? _mm256_loadu_ps(out + q * DP + j0) : _mm256_setzero_ps();
    for (i64 r = 0; r < R; ++r) {
        const __m256 xv = _mm256_loadu_ps(x + r * DP + j0);
        for (int q = 0; q < NQ; ++q) acc[q] = _mm256_fmadd_ps(_mm256_broadcast_ss(w + q * q_stride + r), xv, acc[q]);
    }
    for (int q = 0; q < NQ; ++q) _mm256_storeu_ps(out + q * DP + j0, acc[q]);
}

static void pool_sample(const float *restrict w, i64 q_stride, const float *restrict x, i64 Q, i64 R, i64 DP,
                        int accumulate, float *restrict out) {
    for (i64 j0 = 0; j0 < DP; j0 += 8) {
        i64 q0 = 0;
        for (; q0 + 6 <= Q; q0 += 6)
            pool_block(w + q0 * q_stride, q_stride, x, R, DP, j0, 6, accumulate, out + q0 * DP);
        for (; q0 < Q; ++q0) pool_block(w + q0 * q_stride, q_stride, x, R, DP, j0, 1, accumulate, out + q0 * DP);
    }
}

/* gx[r, j0:j0+8] (+)= sum over NQ queries of w[q, r] g[q, j0:j0+8], the g blocks in registers. */
static inline __attribute__((always_inline)) void pool_grad_block(const float *restrict w, i64 q_stride,
                                                                  const float *restrict g, i64 R, i64 DP, i64 j0,
                                                                  const int NQ, int accumulate, float *restrict gx) {
    __m256 gv[6];
    for (int q = 0; q < NQ; ++q) gv[q] = _mm256_loadu_ps(g + q * DP + j0);
    for (i64 r = 0; r < R; ++r) {
        __m256 acc = accumulate ? _mm256_loadu_ps(gx + r * DP + j0) : _mm256_setzero_ps();
        for (int q = 0; q < NQ; ++q) acc = _mm256_fmadd_ps(_mm256_broadcast_ss(w + q * q_stride + r), gv[q], acc);
        _mm256_storeu_ps(gx + r * DP + j0, acc);
    }
}

static void pool_grad(const float *restrict w, i64 q_stride, const float *restrict g, i64 Q, i64 R, i64 DP,
                      int accumulate, float *restrict gx) {
    for (i64 j0 = 0; j0 < DP; j0 += 8) {
        i64 q0 = 0;
        for (; q0 + 6 <= Q; q0 += 6)
            pool_grad_block(w + q0 * q_stride, q_stride, g + q0 * DP, R, DP, j0, 6, accumulate || q0 > 0, gx);
        for (; q0 < Q; ++q0)
            pool_grad_block(w + q0 * q_stride, q_stride, g + q0 * DP, R, DP, j0, 1, accumulate || q0 > 0, gx);
    }
}

/* w[q, r] <- f[q] . x[r], 8 rows' dot products reduced together (lane_sums8). */
static void scores_sample(const float *restrict f, const float *restrict x, i64 Q, i64 R, i64 DP,
                          float *restrict w, i64 q_stride) {
    if (R % 8) {
        scores_sample_generic(f, x, Q, R, DP, w, q_stride);
        return;
    }
    for (i64 iq = 0; iq < Q; ++iq)
        for (i64 r0 = 0; r0 < R; r0 += 8) {
            __m256 prods[8];
            for (int rr = 0; rr < 8; ++rr) {
                const float *restrict xr = x + (r0 + rr) * DP;
                __m256 p = _mm256_setzero_ps();
                for (i64 j0 = 0; j0 < DP; j0 += 8)
                    p = _mm256_fmadd_ps(_mm256_loadu_ps(f + iq * DP + j0), _mm256_loadu_ps(xr + j0), p);
                prods[rr] = p;
            }
            _mm256_storeu_ps(w + iq * q_stride + r0, lane_sums8(prods));
        }
}
#else
#define pool_sample pool_sample_generic
#define pool_grad pool_grad_generic
#define scores_sample scores_sample_generic
#endif

/* f_p (Q, DP) <- factor (D, Q) transposed and zero-padded. */
static void padded_factor(const float *restrict factor, i64 Q, i64 D, i64 DP, float *restrict f_p) {
    for (i64 iq = 0; iq < Q; ++iq)
        for (i64 j = 0; j < DP; ++j) f_p[iq * DP + j] = j < D ? factor[j * Q + iq] : 0.0f;
}

static void forward_samples(i64 row_begin, i64 row_end, i64 B, i64 R, i64 Q, i64 D, const float *restrict factor,
                            float *restrict weights, float *restrict q_out, const float *restrict row_weights,
                            const float *restrict shared, float *restrict pooled, float *restrict work) {
    const i64 DP = padded(D);
    float *restrict x_p = work, *restrict f_p = x_p + R * DP, *restrict out_p = f_p + Q * DP;
    padded_factor(factor, Q, D, DP, f_p);
    for (i64 b = row_begin; b < row_end; ++b) {
        pad_rows(shared + b * R * D, R, D, DP, x_p);
        scores_sample(f_p, x_p, Q, R, DP, weights + b * R, B * R);
        for (i64 iq = 0; iq < Q; ++iq)
            softmax_queries(weights + (iq * B + b) * R, q_out ? q_out + (iq * B + b) * R : NULL,
                            row_weights ? row_weights + b * R : NULL, 1, R);
        pool_sample(weights + b * R, B * R, x_p, Q, R, DP, 0, out_p);
        unpad_rows(out_p, Q, D, DP, pooled + b * Q * D);
    }
}

/* Writes, for its samples, grad_shared (B, R, D) (through the pooling and through the scores) and, with q,
 * grad_row_weights (B, R); the factor's gradient (transposed, (Q, DP)) summed over them into grad_factor_t: each
 * sample's share, its scores' gradient times its rows, is taken while both are in cache (as one GEMM over the
 * batch it measured ~1 ms a layer, a (6 x 65536) x (65536 x 18) product, and the (Q, B, R) gradient went out
 * and back through memory). */
static void backward_samples(i64 row_begin, i64 row_end, i64 B, i64 R, i64 Q, i64 D, const float *restrict factor,
                             const float *restrict weights, const float *restrict q, const float *restrict shared,
                             const float *restrict grad_pooled, float *restrict grad_shared,
                             float *restrict grad_factor_t, float *restrict grad_row_weights, float *restrict work) {
    const i64 DP = padded(D);
    float *restrict x_p = work, *restrict f_p = x_p + R * DP, *restrict g_p = f_p + Q * DP;
    float *restrict gx_p = g_p + Q * DP, *restrict t = gx_p + R * DP, *restrict gs = t + Q * R;  /* (R, DP), (Q, R) each */
    padded_factor(factor, Q, D, DP, f_p);
    memset(grad_factor_t, 0, sizeof(float) * Q * DP);
    for (i64 b = row_begin; b < row_end; ++b) {
        pad_rows(shared + b * R * D, R, D, DP, x_p);
        pad_rows(grad_pooled + b * Q * D, Q, D, DP, g_p);
        pool_grad(weights + b * R, B * R, g_p, Q, R, DP, 0, gx_p);  /* through the pooling */
        scores_sample(g_p, x_p, Q, R, DP, t, R);                     /* d/d weights = G x^T */
        for (i64 iq = 0; iq < Q; ++iq) {  /* softmax backward: w (t - sum_r w t) */
            const float *restrict w = weights + (iq * B + b) * R;
            float *restrict tq = t + iq * R, *restrict gsq = gs + iq * R;
            float mean = 0.0f;
#pragma omp simd reduction(+ : mean)
            for (i64 r = 0; r < R; ++r) mean += w[r] * tq[r];
            for (i64 r = 0; r < R; ++r) {
                tq[r] -= mean;
                gsq[r] = tq[r] * w[r];
            }
        }
        pool_grad(gs, R, f_p, Q, R, DP, 1, gx_p);           /* through the scores: gs^T factor^T */
        pool_sample(gs, R, x_p, Q, R, DP, 1, grad_factor_t);  /* the factor's share: gs x */
        unpad_rows(gx_p, R, D, DP, grad_shared + b * R * D);
        if (q) {  /* weights = q z: d/d z_r = sum over the queries of q_r t_r */
            float *restrict grw = grad_row_weights + b * R;
            for (i64 r = 0; r < R; ++r) grw[r] = 0.0f;
            for (i64 iq = 0; iq < Q; ++iq) {
                const float *restrict qq = q + (iq * B + b) * R;
                for (i64 r = 0; r < R; ++r) grw[r] += qq[r] * t[iq * R + r];
            }
        }
    }
}

void row_attention_pool_forward(i64 B, i64 threads, i64 R, i64 Q, i64 D, const float *factor, float *weights,
                                float *q_out, const float *row_weights, const float *shared, float *pooled,
                                float *work) {
    const i64 work_floats = row_attention_pool_work_floats(R, Q, D);
#pragma omp parallel num_threads(threads)
    {
        const i64 t = omp_get_thread_num(), n = omp_get_num_threads();
        forward_samples(B * t / n, B * (t + 1) / n, B, R, Q, D, factor, weights, q_out, row_weights, shared, pooled,
                        work + t * work_floats);
    }
}

/* Thread t writes its samples' share of the factor's gradient to grad_factor_slots + t *
 * row_attention_pool_factor_slot_floats(Q, D), which the caller sums. */
void row_attention_pool_backward(i64 B, i64 threads, i64 R, i64 Q, i64 D, const float *factor, const float *weights,
                                 const float *q, const float *shared, const float *grad_pooled, float *grad_shared,
                                 float *grad_factor_slots, float *grad_row_weights, float *work) {
    const i64 work_floats = row_attention_pool_work_floats(R, Q, D);
#pragma omp parallel num_threads(threads)
    {
        const i64 t = omp_get_thread_num(), n = omp_get_num_threads();
        backward_samples(B * t / n, B * (t + 1) / n, B, R, Q, D, factor, weights, q, shared, grad_pooled, grad_shared,
                         grad_factor_slots + t * row_attention_pool_factor_slot_floats(Q, D), grad_row_weights,
                         work + t * work_floats);
    }
}
