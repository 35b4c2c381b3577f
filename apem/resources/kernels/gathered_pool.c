/* One layer of APEM's inducing-point attention (paper eq. 14-17) over a table of distinct source rows,
 * fused per sample: the (S, M, K) softmax weights of one row are computed, used and dropped while
 * they are in cache, and so is eq. 17's LayerNorm, forward and backward (the torch path writes the
 * weights out per batch, ~32 KB a row per layer, and reads them back a dozen times). Built and loaded
 * by apem/nn/native.py and called by apem/nn/native_pools.py; the torch path
 * (apem.nn.attention.gathered_pool and the layer's StackedLayerNorm) is the reference, and
 * tests/nn/test_native_pool.py keeps the two equal.
 *
 * Per sample b and point k (PoolLayer below holds the shapes):
 *   A[s, m, k] = softmax over s of mask[b, k] * score_table[index[b, s], (m, k)]
 *   O[k] = sum_{s, m} A[s, m, k] value_table[index[b, s], m]        (eq. 15-16, W^V W^O folded in)
 *   Y[k] = LayerNorm(O[k] + I[k] mask[b, k]) over the D columns      (eq. 17 with eq. 14's Q_hat)
 *
 * Each call splits the batch into `threads` row ranges run by OpenMP (the runtime torch's CPU build
 * runs its own ops on, so the two never compete for cores); thread t uses `work` + t *
 * gathered_pool_work_floats() floats of scratch, and the backward adds into a gradient slot of its
 * own, which the caller sums.
 */
#include <math.h>
#include <stdint.h>
#include <omp.h>
#include <string.h>

#include "common.h"
#include "pooling.h"

/* Through the pooling, for one (field s, head m) pair: gwk (K) <- d/d w[s, m] = sum_j v[j] go_t[j, k], and
 * adds d/d value row sum_k w[s, m, k] go_t[j, k] into gv (D). */
static void pool_pair_backward_generic(const float *restrict v, const float *restrict wk, const float *restrict go_t,
                                       i64 K, i64 D, float *restrict gwk, float *restrict gv) {
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

#if APEM_AVX2
/* One block of NC * 8 points of pool_pair_backward: gacc (the block of d/d w) in registers, and the
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

/* pool_pair_backward_generic with one pass over j in blocks of 32 points: each go_t row feeds both
 * gradients from registers, and the K-long dot products are reduced eight at a time (lane_sums8)
 * instead of lane by lane. */
static void pool_pair_backward(const float *restrict v, const float *restrict wk, const float *restrict go_t,
                               i64 K, i64 D, float *restrict gwk, float *restrict gv) {
    if (K % 8) {
        pool_pair_backward_generic(v, wk, go_t, K, D, gwk, gv);
        return;
    }
    __m256 tv[D];  /* per output column, the running dot product over the points, lane-wise */
    for (i64 j = 0; j < D; ++j) tv[j] = _mm256_setzero_ps();
    i64 kc = 0;
    for (; kc + 32 <= K; kc += 32) pool_block_backward(v, wk, go_t, K, D, kc, 4, gwk, tv);
    for (; kc < K; kc += 8) pool_block_backward(v, wk, go_t, K, D, kc, 1, gwk, tv);
    i64 j = 0;
    for (; j + 8 <= D; j += 8)
        _mm256_storeu_ps(gv + j, _mm256_add_ps(_mm256_loadu_ps(gv + j), lane_sums8(tv + j)));
    for (; j < D; ++j) gv[j] += lane_sum(tv[j]);
}
#else
#define pool_pair_backward pool_pair_backward_generic
#endif

/* Through the pooling for one sample: gw (S, M, K) <- d/d w, and d/d value rows added into grad_value_table
 * (U, M D) at the sample's rows idx. */
static void pool_row_backward(const float *restrict value_table, const i64 *restrict idx, const float *restrict w,
                              const float *restrict go_t, i64 S, i64 M, i64 K, i64 D, float *restrict gw,
                              float *restrict grad_value_table) {
    for (i64 s = 0; s < S; ++s)
        for (i64 m = 0; m < M; ++m)
            pool_pair_backward(value_table + idx[s] * M * D + m * D, w + (s * M + m) * K, go_t, K, D,
                               gw + (s * M + m) * K, grad_value_table + idx[s] * M * D + m * D);
}

i64 gathered_pool_work_floats(const PoolLayer *L) {
    const i64 MK = L->M * L->K, DK = L->D * L->K;
    return 2 * L->S * MK + 2 * MK + 6 * DK + 2 * L->K;
}

/* Per-thread gradient slot: score table (U, M K) | value table (U, M D) | queries (K, D) | norm weight (D) |
 * norm bias (D) | the value bias (D). */
i64 gathered_pool_slot_floats(const PoolLayer *L) {
    return L->U * L->M * (L->K + L->D) + L->K * L->D + 3 * L->D;
}

/* Y = LayerNorm(O + I (.) z_K) for rows [row_begin, row_end) into out (B, K, D); with `normalized`, also
 * the normalised X (B, D, K) (transposed: the backward runs over the points) and 1 / sigma (B, K). */
static void forward_rows(const PoolLayer *L, i64 row_begin, i64 row_end, float *restrict out,
                         float *restrict normalized, float *restrict rstd, float *restrict work) {
    const i64 S = L->S, M = L->M, K = L->K, D = L->D, MK = M * K;
    float *restrict w = work, *restrict mx = w + S * MK, *restrict inv = mx + MK, *restrict x = inv + MK;
    float *restrict queries_t = x + D * K, *restrict mean = queries_t + D * K, *restrict rs = mean + K;
    const float *restrict nw = L->norm_weight, *restrict nb = L->norm_bias;
    transpose(L->queries, K, D, queries_t);
    for (i64 b = row_begin; b < row_end; ++b) {
        const i64 *restrict idx = L->index + b * S;
        const float *restrict z = L->mask + b * L->mask_stride;
        if (b + 1 < row_end) prefetch_sample(L, L->score_table, idx + S);
        row_softmax(L->score_table, idx, z, S, M, K, w, mx, inv);
        pool_row(L->value_table, idx, w, S, M, K, D, x);  /* x (D, K): O transposed */
        /* eq. 17: X = O + I (.) z_K, then the LayerNorm over D, for all K points at once */
        for (i64 j = 0; j < D; ++j)
            for (i64 k = 0; k < K; ++k) x[j * K + k] += queries_t[j * K + k] * z[k];
        normalize_columns_over_rows(x, D, K, L->eps, mean, rs);
        if (normalized) {
            memcpy(normalized + b * D * K, x, sizeof(float) * D * K);
            memcpy(rstd + b * K, rs, sizeof(float) * K);
        }
        layer_norm_affine(x, D, K, nw, nb);  /* while the points are contiguous, then out to (K, D) */
        transpose(x, D, K, out + b * K * D);
    }
}

/* The backward of forward_rows for rows [row_begin, row_end) from grad_y (B, K, D): adds into the
 * thread's gradient slot (gathered_pool_slot_floats) and writes grad_mask (B, K) rows. */
static void backward_rows(const PoolLayer *L, i64 row_begin, i64 row_end, const float *restrict grad_y,
                          const float *restrict normalized, const float *restrict rstd, float *restrict grad_mask,
                          i64 grad_mask_stride, float *restrict slot, float *restrict work) {
    const i64 S = L->S, M = L->M, K = L->K, D = L->D, MK = M * K, DK = D * K;
    float *restrict grad_score_table = slot, *restrict grad_value_table = slot + L->U * MK;
    float *restrict grad_queries = grad_value_table + L->U * M * D, *restrict grad_norm_weight = grad_queries + K * D;
    float *restrict grad_norm_bias = grad_norm_weight + D, *restrict grad_value_bias = grad_norm_bias + D;
    float *restrict w = work, *restrict gw = w + S * MK, *restrict mx = gw + S * MK, *restrict inv = mx + MK;
    /* (D, K) each, transposed so that every loop below runs over the K points: this row's gradient of X,
     * the queries, and the range's running sums for the queries, the norm's weight and bias, and the
     * value bias */
    float *restrict go_t = inv + MK, *restrict queries_t = go_t + DK, *restrict grad_queries_t = queries_t + DK;
    float *restrict sum_nw = grad_queries_t + DK, *restrict sum_nb = sum_nw + DK, *restrict sum_vb = sum_nb + DK;
    float *restrict m1 = sum_vb + DK, *restrict m2 = m1 + K;
    float *restrict dot = mx;  /* reused once the softmax is done */
    const float *restrict nw = L->norm_weight;
    transpose(L->queries, K, D, queries_t);
    memset(grad_queries_t, 0, sizeof(float) * 4 * DK);  /* and sum_nw, sum_nb, sum_vb */
    for (i64 b = row_begin; b < row_end; ++b) {
        const i64 *restrict idx = L->index + b * S;
        const float *restrict z = L->mask + b * L->mask_stride;
        if (b + 1 < row_end) prefetch_sample(L, L->score_table, idx + S);
        const float *restrict xh = normalized + b * DK, *restrict r = rstd + b * K;
        float *restrict gm = grad_mask + b * grad_mask_stride;
        row_softmax(L->score_table, idx, z, S, M, K, w, mx, inv);
        transpose(grad_y + b * K * D, K, D, go_t);
        layer_norm_backward(go_t, xh, r, nw, D, K, sum_nw, sum_nb, m1, m2);  /* go_t: d/dX */
        pool_row_backward(L->value_table, idx, w, go_t, S, M, K, D, gw, grad_value_table);
        for (i64 k = 0; k < K; ++k) gm[k] = 0.0f;
        for (i64 j = 0; j < D; ++j)  /* the residual I (.) z_K: its share of d/d z_K, and d/d I; and the value bias */
            for (i64 k = 0; k < K; ++k) {
                gm[k] += go_t[j * K + k] * queries_t[j * K + k];
                grad_queries_t[j * K + k] += z[k] * go_t[j * K + k];
                sum_vb[j * K + k] += go_t[j * K + k];
            }
        for (i64 c = 0; c < MK; ++c) dot[c] = 0.0f;  /* softmax backward: g = w (gw - sum_s w gw) */
        for (i64 s = 0; s < S; ++s)
            for (i64 c = 0; c < MK; ++c) dot[c] += w[s * MK + c] * gw[s * MK + c];
        for (i64 s = 0; s < S; ++s) {  /* scores = z * table: d/d z and d/d table rows */
            const float *restrict t = L->score_table + idx[s] * MK;
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
    for (i64 j = 0; j < D; ++j) {
        float a = 0.0f, c = 0.0f, e = 0.0f;
        for (i64 k = 0; k < K; ++k) {
            grad_queries[k * D + j] += grad_queries_t[j * K + k];
            a += sum_nw[j * K + k];
            c += sum_nb[j * K + k];
            e += sum_vb[j * K + k];
        }
        grad_norm_weight[j] += a;
        grad_norm_bias[j] += c;
        grad_value_bias[j] += e;
    }
}

void gathered_pool_forward(const PoolLayer *L, i64 B, i64 threads, float *out, float *normalized, float *rstd,
                           float *work) {
    const i64 work_floats = gathered_pool_work_floats(L);
#pragma omp parallel num_threads(threads)
    {
        const i64 t = omp_get_thread_num(), n = omp_get_num_threads();
        forward_rows(L, B * t / n, B * (t + 1) / n, out, normalized, rstd, work + t * work_floats);
    }
}

/* Thread t adds into slots + t * gathered_pool_slot_floats(L), which the caller zeroes beforehand and
 * sums afterwards. */
void gathered_pool_backward(const PoolLayer *L, i64 B, i64 threads, const float *grad_y, const float *normalized,
                            const float *rstd, float *grad_mask, i64 grad_mask_stride, float *slots, float *work) {
    const i64 work_floats = gathered_pool_work_floats(L), slot_floats = gathered_pool_slot_floats(L);
#pragma omp parallel num_threads(threads)
    {
        const i64 t = omp_get_thread_num(), n = omp_get_num_threads();
        backward_rows(L, B * t / n, B * (t + 1) / n, grad_y, normalized, rstd, grad_mask, grad_mask_stride,
                      slots + t * slot_floats, work + t * work_floats);
    }
}
