/* One layer of APEM's inducing-point pooling (paper eq. 14-17) over a table of distinct source rows,
 * fused per sample: the (S, M, K) softmax weights of one row are computed, used and dropped while
 * they are in cache, forward and backward (the torch path writes them out per batch, ~32 KB a row
 * per layer, and reads them back a dozen times). Built and loaded by apem/nn/native.py; the torch
 * path (apem.nn.attention.gathered_pool) is the reference, and tests/nn/test_native_pool.py keeps
 * the two equal.
 *
 * Shapes (row-major float32; index int64):
 *   score_table (U, M K)  S_u (W^K_m I_m^T), columns (head m, point k)
 *   value_table (U, M D)  S_u (W^V_m W^O_m) + bias / M, columns (head m, out j)
 *   index (B, S)          the sample's source rows into the tables
 *   mask (B, K)           z_K of this layer, row stride mask_stride
 *   queries (K, D)        the inducing points I
 *   out (B, K, D)         O + I (.) z_K: O[b, k] = sum_{s, m} A[b, s, m, k] value_table[index[b, s], m]
 * with A = softmax over s of mask[b, k] * score_table[index[b, s], (m, k)].
 *
 * Each call splits the batch into `threads` row ranges run by OpenMP (the runtime torch's CPU build
 * runs its own ops on, so the two never compete for cores); thread t uses `work` + t *
 * gathered_pool_work_floats() floats of scratch, and the backward adds into gradient tables of its own
 * (slot t of each, strides given), which the caller sums.
 */
#include <math.h>
#include <stdint.h>
#include <omp.h>
#include <string.h>

#include "common.h"

i64 gathered_pool_work_floats(i64 S, i64 M, i64 K, i64 D) { return 2 * S * M * K + 2 * M * K + 3 * D * K; }

/* w (S, M K) <- softmax over s of mask[k] * table[idx[s], (m, k)]; uses mx, inv (M K each). */
static void row_softmax(const float *restrict table, const i64 *restrict idx, const float *restrict mask,
                        i64 S, i64 M, i64 K, float *restrict w, float *restrict mx, float *restrict inv) {
    const i64 MK = M * K;
    for (i64 c = 0; c < MK; ++c) mx[c] = -INFINITY;
    for (i64 s = 0; s < S; ++s) {
        const float *restrict t = table + idx[s] * MK;
        float *restrict ws = w + s * MK;
        for (i64 m = 0; m < M; ++m)
            for (i64 k = 0; k < K; ++k) {
                float v = mask[k] * t[m * K + k];
                ws[m * K + k] = v;
                mx[m * K + k] = v > mx[m * K + k] ? v : mx[m * K + k];
            }
    }
    for (i64 c = 0; c < MK; ++c) inv[c] = 0.0f;
    for (i64 s = 0; s < S; ++s) {
        float *restrict ws = w + s * MK;
        for (i64 c = 0; c < MK; ++c) {
            float e = exp_nonpositive(ws[c] - mx[c]);
            ws[c] = e;
            inv[c] += e;
        }
    }
    for (i64 c = 0; c < MK; ++c) inv[c] = 1.0f / inv[c];
    for (i64 s = 0; s < S; ++s) {
        float *restrict ws = w + s * MK;
        for (i64 c = 0; c < MK; ++c) ws[c] *= inv[c];
    }
}

/* acc (D, K) <- sum_{s, m} value_table[idx[s], m, j] w[s, m, k]: the pooled rows O, transposed so that
 * the inner loops run over the K points. */
static void pool_row_generic(const float *restrict value_table, const i64 *restrict idx, const float *restrict w,
                             i64 S, i64 M, i64 K, i64 D, float *restrict acc) {
    memset(acc, 0, sizeof(float) * D * K);
    for (i64 s = 0; s < S; ++s)
        for (i64 m = 0; m < M; ++m) {
            const float *restrict v = value_table + idx[s] * M * D + m * D;
            const float *restrict wk = w + (s * M + m) * K;
            for (i64 j = 0; j < D; ++j) {
                const float vj = v[j];
                float *restrict a = acc + j * K;
                for (i64 k = 0; k < K; ++k) a[k] += vj * wk[k];
            }
        }
}

/* Through the pooling: gw (S, M, K) <- d/d w = sum_j v[s, m, j] go_t[j, k], and adds d/d value rows
 * sum_k w[s, m, k] go_t[j, k] into grad_value_table[idx[s], m, j]. */
static void pool_row_backward_generic(const float *restrict value_table, const i64 *restrict idx,
                                      const float *restrict w, const float *restrict go_t, i64 S, i64 M, i64 K,
                                      i64 D, float *restrict gw, float *restrict grad_value_table) {
    for (i64 s = 0; s < S; ++s)
        for (i64 m = 0; m < M; ++m) {
            const float *restrict v = value_table + idx[s] * M * D + m * D;
            const float *restrict wk = w + (s * M + m) * K;
            float *restrict gv = grad_value_table + idx[s] * M * D + m * D;
            float *restrict gwk = gw + (s * M + m) * K;
            for (i64 k = 0; k < K; ++k) gwk[k] = 0.0f;
            for (i64 j = 0; j < D; ++j) {
                const float vj = v[j];
                const float *restrict g = go_t + j * K;
                float total = 0.0f;
#pragma omp simd reduction(+ : total)
                for (i64 k = 0; k < K; ++k) {
                    gwk[k] += vj * g[k];
                    total += wk[k] * g[k];
                }
                gv[j] += total;
            }
        }
}

#if APEM_AVX2
#define POOL_BLOCK 6 /* output columns per register block in the forward: 6 accumulators, 1 weight, 1 broadcast */

/* pool_row_generic with the accumulators in registers (the generic loop stores every partial sum). */
static void pool_row(const float *restrict value_table, const i64 *restrict idx, const float *restrict w,
                     i64 S, i64 M, i64 K, i64 D, float *restrict acc) {
    if (K % 8) {
        pool_row_generic(value_table, idx, w, S, M, K, D, acc);
        return;
    }
    const i64 MD = M * D;
    for (i64 kc = 0; kc < K; kc += 8) {
        i64 j0 = 0;
        for (; j0 + POOL_BLOCK <= D; j0 += POOL_BLOCK) {
            __m256 a[POOL_BLOCK];
            for (int jj = 0; jj < POOL_BLOCK; ++jj) a[jj] = _mm256_setzero_ps();
            for (i64 s = 0; s < S; ++s)
                for (i64 m = 0; m < M; ++m) {
                    const float *restrict v = value_table + idx[s] * MD + m * D + j0;
                    const __m256 wv = _mm256_loadu_ps(w + (s * M + m) * K + kc);
                    for (int jj = 0; jj < POOL_BLOCK; ++jj)
                        a[jj] = _mm256_fmadd_ps(_mm256_broadcast_ss(v + jj), wv, a[jj]);
                }
            for (int jj = 0; jj < POOL_BLOCK; ++jj) _mm256_storeu_ps(acc + (j0 + jj) * K + kc, a[jj]);
        }
        for (; j0 < D; ++j0) {
            __m256 a = _mm256_setzero_ps();
            for (i64 s = 0; s < S; ++s)
                for (i64 m = 0; m < M; ++m)
                    a = _mm256_fmadd_ps(_mm256_broadcast_ss(value_table + idx[s] * MD + m * D + j0),
                                        _mm256_loadu_ps(w + (s * M + m) * K + kc), a);
            _mm256_storeu_ps(acc + j0 * K + kc, a);
        }
    }
}

/* One block of NC * 8 points of pool_row_backward: gacc (the block of d/d w) in registers, and the
 * dot products of each go_t row with the block's weights added lane-wise into tv[j]. Called with a
 * constant NC, so that the loops over the vectors unroll and stay in registers. */
static inline __attribute__((always_inline)) void pool_block_backward(
        const float *restrict v, const float *restrict wk, const float *restrict go_t, i64 K, i64 D, i64 kc,
        const int NC, float *restrict gwk, __m256 *restrict tv) {
    __m256 gacc[4], wv[4];
    for (int c = 0; c < NC; ++c) {
        gacc[c] = _mm256_setzero_ps();
        wv[c] = _mm256_loadu_ps(wk + kc + 8 * c);
    }
    for (i64 j = 0; j < D; ++j) {
        const __m256 b = _mm256_broadcast_ss(v + j);
        const float *restrict g = go_t + j * K + kc;
        __m256 t = tv[j];
        for (int c = 0; c < NC; ++c) {
            const __m256 gc = _mm256_loadu_ps(g + 8 * c);
            gacc[c] = _mm256_fmadd_ps(b, gc, gacc[c]);
            t = _mm256_fmadd_ps(wv[c], gc, t);
        }
        tv[j] = t;
    }
    for (int c = 0; c < NC; ++c) _mm256_storeu_ps(gwk + kc + 8 * c, gacc[c]);
}

/* pool_row_backward_generic with one pass over j per (s, m) and block of 32 points: each go_t row
 * feeds both gradients from registers, and the K-long dot products are reduced eight at a time
 * (lane_sums8) instead of lane by lane. */
static void pool_row_backward(const float *restrict value_table, const i64 *restrict idx, const float *restrict w,
                              const float *restrict go_t, i64 S, i64 M, i64 K, i64 D, float *restrict gw,
                              float *restrict grad_value_table) {
    if (K % 8) {
        pool_row_backward_generic(value_table, idx, w, go_t, S, M, K, D, gw, grad_value_table);
        return;
    }
    __m256 tv[D];  /* per output column, the running dot product over the points, lane-wise */
    for (i64 s = 0; s < S; ++s)
        for (i64 m = 0; m < M; ++m) {
            const float *restrict v = value_table + idx[s] * M * D + m * D;
            const float *restrict wk = w + (s * M + m) * K;
            float *restrict gv = grad_value_table + idx[s] * M * D + m * D;
            float *restrict gwk = gw + (s * M + m) * K;
            for (i64 j = 0; j < D; ++j) tv[j] = _mm256_setzero_ps();
            i64 kc = 0;
            for (; kc + 32 <= K; kc += 32) pool_block_backward(v, wk, go_t, K, D, kc, 4, gwk, tv);
            for (; kc < K; kc += 8) pool_block_backward(v, wk, go_t, K, D, kc, 1, gwk, tv);
            i64 j = 0;
            for (; j + 8 <= D; j += 8)
                _mm256_storeu_ps(gv + j, _mm256_add_ps(_mm256_loadu_ps(gv + j), lane_sums8(tv + j)));
            for (; j < D; ++j) gv[j] += lane_sum(tv[j]);
        }
}
#else
#define pool_row pool_row_generic
#define pool_row_backward pool_row_backward_generic
#endif

static void forward_rows(i64 row_begin, i64 row_end, i64 S, i64 M, i64 K, i64 D,
                         const float *restrict score_table, const float *restrict value_table,
                         const i64 *restrict index, const float *restrict mask, i64 mask_stride,
                         const float *restrict queries, float *restrict out, float *restrict work) {
    const i64 MK = M * K;
    float *restrict w = work, *restrict mx = w + S * MK, *restrict inv = mx + MK, *restrict acc = inv + MK;
    for (i64 b = row_begin; b < row_end; ++b) {
        const i64 *restrict idx = index + b * S;
        const float *restrict z = mask + b * mask_stride;
        row_softmax(score_table, idx, z, S, M, K, w, mx, inv);
        pool_row(value_table, idx, w, S, M, K, D, acc);  /* acc (D, K): O transposed */
        float *restrict o = out + b * K * D;
        for (i64 k = 0; k < K; ++k)  /* eq. 17's residual Q_hat = I (.) z_K */
            for (i64 j = 0; j < D; ++j) o[k * D + j] = acc[j * K + k] + queries[k * D + j] * z[k];
    }
}

/* Adds this range's gradients into grad_score_table (U, M K), grad_value_table (U, M D) and
 * grad_queries (K, D); writes grad_mask (B, K) rows (stride grad_mask_stride) for its rows. */
static void backward_rows(i64 row_begin, i64 row_end, i64 S, i64 M, i64 K, i64 D,
                          const float *restrict score_table, const float *restrict value_table,
                          const i64 *restrict index, const float *restrict mask, i64 mask_stride,
                          const float *restrict queries, const float *restrict grad_out,
                          float *restrict grad_score_table, float *restrict grad_value_table,
                          float *restrict grad_mask, i64 grad_mask_stride, float *restrict grad_queries,
                          float *restrict work) {
    const i64 MK = M * K;
    float *restrict w = work, *restrict gw = w + S * MK, *restrict mx = gw + S * MK, *restrict inv = mx + MK;
    /* (D, K) each: this row's grad_out, and the range's queries and their gradient, transposed so that
     * every loop below runs over the K points */
    float *restrict go_t = inv + MK, *restrict queries_t = go_t + D * K, *restrict grad_queries_t = queries_t + D * K;
    float *restrict dot = mx;  /* reused once the softmax is done */
    for (i64 j = 0; j < D; ++j)
        for (i64 k = 0; k < K; ++k) {
            queries_t[j * K + k] = queries[k * D + j];
            grad_queries_t[j * K + k] = 0.0f;
        }
    for (i64 b = row_begin; b < row_end; ++b) {
        const i64 *restrict idx = index + b * S;
        const float *restrict z = mask + b * mask_stride;
        const float *restrict go = grad_out + b * K * D;
        float *restrict gm = grad_mask + b * grad_mask_stride;
        row_softmax(score_table, idx, z, S, M, K, w, mx, inv);
        for (i64 j = 0; j < D; ++j)
            for (i64 k = 0; k < K; ++k) go_t[j * K + k] = go[k * D + j];
        pool_row_backward(value_table, idx, w, go_t, S, M, K, D, gw, grad_value_table);
        for (i64 k = 0; k < K; ++k) gm[k] = 0.0f;
        for (i64 j = 0; j < D; ++j)  /* the residual I (.) z_K: its share of d/d z_K, and d/d I */
            for (i64 k = 0; k < K; ++k) {
                gm[k] += go_t[j * K + k] * queries_t[j * K + k];
                grad_queries_t[j * K + k] += z[k] * go_t[j * K + k];
            }
        for (i64 c = 0; c < MK; ++c) dot[c] = 0.0f;  /* softmax backward: g = w (gw - sum_s w gw) */
        for (i64 s = 0; s < S; ++s)
            for (i64 c = 0; c < MK; ++c) dot[c] += w[s * MK + c] * gw[s * MK + c];
        for (i64 s = 0; s < S; ++s) {  /* scores = z * table: d/d z and d/d table rows */
            const float *restrict t = score_table + idx[s] * MK;
            float *restrict gt = grad_score_table + idx[s] * MK;
            const float *restrict ws = w + s * MK, *restrict gws = gw + s * MK;
            for (i64 m = 0; m < M; ++m)
                for (i64 k = 0; k < K; ++k) {
                    const float g = ws[m * K + k] * (gws[m * K + k] - dot[m * K + k]);
                    gm[k] += g * t[m * K + k];
                    gt[m * K + k] += g * z[k];
                }
        }
    }
    for (i64 k = 0; k < K; ++k)
        for (i64 j = 0; j < D; ++j) grad_queries[k * D + j] += grad_queries_t[j * K + k];
}

void gathered_pool_forward(i64 B, i64 threads, i64 S, i64 M, i64 K, i64 D, const float *score_table,
                           const float *value_table, const i64 *index, const float *mask, i64 mask_stride,
                           const float *queries, float *out, float *work) {
    const i64 work_floats = gathered_pool_work_floats(S, M, K, D);
#pragma omp parallel num_threads(threads)
    {
        const i64 t = omp_get_thread_num(), n = omp_get_num_threads();
        forward_rows(B * t / n, B * (t + 1) / n, S, M, K, D, score_table, value_table, index, mask, mask_stride,
                     queries, out, work + t * work_floats);
    }
}

/* Thread t adds into grad_score_table + t * score_slot, grad_value_table + t * value_slot and
 * grad_queries + t * queries_slot, which the caller zeroes beforehand and sums afterwards. */
void gathered_pool_backward(i64 B, i64 threads, i64 S, i64 M, i64 K, i64 D, const float *score_table,
                            const float *value_table, const i64 *index, const float *mask, i64 mask_stride,
                            const float *queries, const float *grad_out, float *grad_score_table, i64 score_slot,
                            float *grad_value_table, i64 value_slot, float *grad_mask, i64 grad_mask_stride,
                            float *grad_queries, i64 queries_slot, float *work) {
    const i64 work_floats = gathered_pool_work_floats(S, M, K, D);
#pragma omp parallel num_threads(threads)
    {
        const i64 t = omp_get_thread_num(), n = omp_get_num_threads();
        backward_rows(B * t / n, B * (t + 1) / n, S, M, K, D, score_table, value_table, index, mask, mask_stride,
                      queries, grad_out, grad_score_table + t * score_slot, grad_value_table + t * value_slot,
                      grad_mask, grad_mask_stride, grad_queries + t * queries_slot, work + t * work_floats);
    }
}
