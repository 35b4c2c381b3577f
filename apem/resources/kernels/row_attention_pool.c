/* The per-sample part of one layer of APEM's Pattern Selector attention (paper eq. 18), fused per
 * sample: the softmax over the R rows, the pooling, and in backward the products with the pooled
 * gradient. Each is a (6 x 64 x 18) product at Table 2's sizes, where torch's batched matmul spends
 * most of its time in per-matrix overhead. The score GEMM and the products with the attention factor
 * stay in torch (one large GEMM per layer). Built and loaded by apem/nn/native.py; the torch path
 * (apem.nn.attention.row_attention_pool) is the reference, and tests/nn/test_native_pool.py keeps
 * the two equal.
 *
 * Shapes (row-major float32), for one layer:
 *   scores (Q, B, R)   in forward the raw scores, replaced by the softmax weights
 *   q (Q, B, R)        with row weights z (B, R): e / sum_r(z e), so that weights = q z; else unused
 *   shared (B, R, D)   the rows attended over
 *   pooled (B, Q, D)   sum_r weights[q, b, r] shared[b, r]
 * A sample's weights for query q are at weights + (q B + b) R: the per-sample helpers below take
 * w = weights + b R and the query stride B R. Each call splits the batch into `threads` sample ranges
 * run by OpenMP (see gathered_pool.c); thread t uses `work` + t * row_attention_pool_work_floats().
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <omp.h>
#include <string.h>

#include "common.h"

i64 row_attention_pool_work_floats(i64 R, i64 Q) { return Q * R; }

/* out (Q, D) <- sum_r w[q, r] x[r]. */
static void pool_sample_generic(const float *restrict w, i64 q_stride, const float *restrict x, i64 Q, i64 R, i64 D,
                                float *restrict out) {
    memset(out, 0, sizeof(float) * Q * D);
    for (i64 iq = 0; iq < Q; ++iq)
        for (i64 r = 0; r < R; ++r) {
            const float wr = w[iq * q_stride + r];
            for (i64 j = 0; j < D; ++j) out[iq * D + j] += wr * x[r * D + j];
        }
}

/* gx (R, D) <- sum_q w[q, r] g[q] (through the pooling); t (Q, R) <- g[q] . x[r] (d/d weights). */
static void pool_sample_backward_generic(const float *restrict w, i64 q_stride, const float *restrict x,
                                         const float *restrict g, i64 Q, i64 R, i64 D, float *restrict gx,
                                         float *restrict t) {
    memset(gx, 0, sizeof(float) * R * D);
    for (i64 iq = 0; iq < Q; ++iq)
        for (i64 r = 0; r < R; ++r) {
            const float wr = w[iq * q_stride + r];
            float total = 0.0f;
            for (i64 j = 0; j < D; ++j) {
                gx[r * D + j] += wr * g[iq * D + j];
                total += g[iq * D + j] * x[r * D + j];
            }
            t[iq * R + r] = total;
        }
}

#if APEM_AVX2
/* The AVX2 loops run over the full blocks of 8 columns (D8 of them); the rest (D % 8 columns) is a
 * scalar tail: masked loads and stores (vmaskmovps) measured several times slower on AMD Zen. */

/* NQ queries' pooled rows for columns [j0, j0 + 8), in registers; NQ is a constant at each call. */
static inline __attribute__((always_inline)) void pool_block(const float *restrict w, i64 q_stride,
                                                             const float *restrict x, i64 R, i64 D, i64 j0,
                                                             const int NQ, float *restrict out) {
    __m256 acc[6];
    for (int q = 0; q < NQ; ++q) acc[q] = _mm256_setzero_ps();
    for (i64 r = 0; r < R; ++r) {
        const __m256 xv = _mm256_loadu_ps(x + r * D + j0);
        for (int q = 0; q < NQ; ++q) acc[q] = _mm256_fmadd_ps(_mm256_broadcast_ss(w + q * q_stride + r), xv, acc[q]);
    }
    for (int q = 0; q < NQ; ++q) _mm256_storeu_ps(out + q * D + j0, acc[q]);
}

static void pool_sample(const float *restrict w, i64 q_stride, const float *restrict x, i64 Q, i64 R, i64 D,
                        float *restrict out) {
    const i64 d8 = D - D % 8;
    for (i64 j0 = 0; j0 < d8; j0 += 8) {
        i64 q0 = 0;
        for (; q0 + 6 <= Q; q0 += 6) pool_block(w + q0 * q_stride, q_stride, x, R, D, j0, 6, out + q0 * D);
        for (; q0 < Q; ++q0) pool_block(w + q0 * q_stride, q_stride, x, R, D, j0, 1, out + q0 * D);
    }
    for (i64 iq = 0; iq < Q; ++iq)
        for (i64 j = d8; j < D; ++j) {
            float total = 0.0f;
            for (i64 r = 0; r < R; ++r) total += w[iq * q_stride + r] * x[r * D + j];
            out[iq * D + j] = total;
        }
}

/* gx[r, j0:j0+8] (+)= sum over NQ queries of w[q, r] g[q, j0:j0+8], the g blocks in registers. */
static inline __attribute__((always_inline)) void pool_grad_block(const float *restrict w, i64 q_stride,
                                                                  const float *restrict g, i64 R, i64 D, i64 j0,
                                                                  const int NQ, int accumulate, float *restrict gx) {
    __m256 gv[6];
    for (int q = 0; q < NQ; ++q) gv[q] = _mm256_loadu_ps(g + q * D + j0);
    for (i64 r = 0; r < R; ++r) {
        __m256 acc = accumulate ? _mm256_loadu_ps(gx + r * D + j0) : _mm256_setzero_ps();
        for (int q = 0; q < NQ; ++q) acc = _mm256_fmadd_ps(_mm256_broadcast_ss(w + q * q_stride + r), gv[q], acc);
        _mm256_storeu_ps(gx + r * D + j0, acc);
    }
}

static void pool_sample_backward(const float *restrict w, i64 q_stride, const float *restrict x,
                                 const float *restrict g, i64 Q, i64 R, i64 D, float *restrict gx,
                                 float *restrict t) {
    if (R % 8) {
        pool_sample_backward_generic(w, q_stride, x, g, Q, R, D, gx, t);
        return;
    }
    const i64 d8 = D - D % 8;
    for (i64 j0 = 0; j0 < d8; j0 += 8) {
        i64 q0 = 0;
        for (; q0 + 6 <= Q; q0 += 6) pool_grad_block(w + q0 * q_stride, q_stride, g + q0 * D, R, D, j0, 6, q0 > 0, gx);
        for (; q0 < Q; ++q0) pool_grad_block(w + q0 * q_stride, q_stride, g + q0 * D, R, D, j0, 1, q0 > 0, gx);
    }
    for (i64 r = 0; r < R; ++r)
        for (i64 j = d8; j < D; ++j) {
            float total = 0.0f;
            for (i64 iq = 0; iq < Q; ++iq) total += w[iq * q_stride + r] * g[iq * D + j];
            gx[r * D + j] = total;
        }
    for (i64 iq = 0; iq < Q; ++iq)  /* t[q, r] = g[q] . x[r]: 8 rows' dot products reduced together */
        for (i64 r0 = 0; r0 < R; r0 += 8) {
            __m256 prods[8];
            for (int rr = 0; rr < 8; ++rr) {
                const float *restrict xr = x + (r0 + rr) * D;
                __m256 p = _mm256_setzero_ps();
                for (i64 j0 = 0; j0 < d8; j0 += 8)
                    p = _mm256_fmadd_ps(_mm256_loadu_ps(g + iq * D + j0), _mm256_loadu_ps(xr + j0), p);
                float tail = 0.0f;
                for (i64 j = d8; j < D; ++j) tail += g[iq * D + j] * xr[j];
                prods[rr] = _mm256_add_ps(p, _mm256_setr_ps(tail, 0, 0, 0, 0, 0, 0, 0));
            }
            _mm256_storeu_ps(t + iq * R + r0, lane_sums8(prods));
        }
}
#else
#define pool_sample pool_sample_generic
#define pool_sample_backward pool_sample_backward_generic
#endif

/* w[0:R] <- the softmax over r of w; with row weights z, weights = q z with q = e / sum_r(z e) written to qq
 * (weighted_softmax's reading: all-zero row weights give all-zero weights). */
static void softmax_over_rows(float *restrict w, float *restrict qq, const float *restrict z, i64 R) {
    float top = -INFINITY, total = 0.0f;
#pragma omp simd reduction(max : top)
    for (i64 r = 0; r < R; ++r) top = w[r] > top ? w[r] : top;
    for (i64 r = 0; r < R; ++r) w[r] = exp_nonpositive(w[r] - top);
    if (z) {
#pragma omp simd reduction(+ : total)
        for (i64 r = 0; r < R; ++r) total += w[r] * z[r];
        const float scale = 1.0f / (total > FLT_MIN ? total : FLT_MIN);
        for (i64 r = 0; r < R; ++r) {
            qq[r] = w[r] * scale;
            w[r] = qq[r] * z[r];
        }
    } else {
#pragma omp simd reduction(+ : total)
        for (i64 r = 0; r < R; ++r) total += w[r];
        const float scale = 1.0f / total;
        for (i64 r = 0; r < R; ++r) w[r] *= scale;
    }
}

static void forward_samples(i64 row_begin, i64 row_end, i64 B, i64 R, i64 Q, i64 D, float *restrict scores,
                            float *restrict q_out, const float *restrict row_weights,
                            const float *restrict shared, float *restrict pooled) {
    for (i64 b = row_begin; b < row_end; ++b) {
        for (i64 iq = 0; iq < Q; ++iq)
            softmax_over_rows(scores + (iq * B + b) * R, q_out ? q_out + (iq * B + b) * R : NULL,
                              row_weights ? row_weights + b * R : NULL, R);
        pool_sample(scores + b * R, B * R, shared + b * R * D, Q, R, D, pooled + b * Q * D);
    }
}

/* Writes, for its samples: grad_shared (B, R, D) through the pooling, grad_scores (Q, B, R) (the
 * softmax's input gradient) and, with q, grad_row_weights (B, R). */
static void backward_samples(i64 row_begin, i64 row_end, i64 B, i64 R, i64 Q, i64 D,
                             const float *restrict weights, const float *restrict q, const float *restrict shared,
                             const float *restrict grad_pooled, float *restrict grad_shared,
                             float *restrict grad_scores, float *restrict grad_row_weights,
                             float *restrict work) {
    float *restrict t = work;  /* (Q, R) */
    for (i64 b = row_begin; b < row_end; ++b) {
        pool_sample_backward(weights + b * R, B * R, shared + b * R * D, grad_pooled + b * Q * D, Q, R, D,
                             grad_shared + b * R * D, t);
        for (i64 iq = 0; iq < Q; ++iq) {  /* softmax backward: w (t - sum_r w t) */
            const float *restrict w = weights + (iq * B + b) * R;
            float *restrict tq = t + iq * R, *restrict gs = grad_scores + (iq * B + b) * R;
            float mean = 0.0f;
#pragma omp simd reduction(+ : mean)
            for (i64 r = 0; r < R; ++r) mean += w[r] * tq[r];
            for (i64 r = 0; r < R; ++r) {
                tq[r] -= mean;
                gs[r] = tq[r] * w[r];
            }
        }
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

void row_attention_pool_forward(i64 B, i64 threads, i64 R, i64 Q, i64 D, float *scores, float *q_out,
                                const float *row_weights, const float *shared, float *pooled) {
#pragma omp parallel num_threads(threads)
    {
        const i64 t = omp_get_thread_num(), n = omp_get_num_threads();
        forward_samples(B * t / n, B * (t + 1) / n, B, R, Q, D, scores, q_out, row_weights, shared, pooled);
    }
}

void row_attention_pool_backward(i64 B, i64 threads, i64 R, i64 Q, i64 D, const float *weights, const float *q,
                                 const float *shared, const float *grad_pooled, float *grad_shared,
                                 float *grad_scores, float *grad_row_weights, float *work) {
    const i64 work_floats = row_attention_pool_work_floats(R, Q);
#pragma omp parallel num_threads(threads)
    {
        const i64 t = omp_get_thread_num(), n = omp_get_num_threads();
        backward_samples(B * t / n, B * (t + 1) / n, B, R, Q, D, weights, q, shared, grad_pooled, grad_shared,
                         grad_scores, grad_row_weights, work + t * work_floats);
    }
}
