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
 *
 * Training runs pattern_pool_forward and pattern_pool_backward (at the end of this file): the same per-sample
 * steps followed by the Pattern Selector's attention (eq. 18) over the sample's Y while it is in cache;
 * gathered_pool_forward and gathered_pool_backward serve the paths without eq. 18 after them.
 */
#include <math.h>
#include <stdint.h>
#include <omp.h>
#include <string.h>

#include "common.h"
#include "pattern_attention.h"
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

/* A thread's scratch for forward_sample, carved out of gathered_pool_work_floats() floats. */
typedef struct {
    float *w, *mx, *inv;  /* (S, M K), (M K) twice */
    float *x, *queries_t;  /* (D, K) each */
    float *mean, *rs;      /* (K) each */
} ForwardScratch;

/* The scratch of a thread's row range, with the queries transposed. */
static ForwardScratch forward_scratch(const PoolLayer *L, float *work) {
    const i64 MK = L->M * L->K, DK = L->D * L->K;
    ForwardScratch s;
    s.w = work;
    s.mx = s.w + L->S * MK;
    s.inv = s.mx + MK;
    s.x = s.inv + MK;
    s.queries_t = s.x + DK;
    s.mean = s.queries_t + DK;
    s.rs = s.mean + L->K;
    transpose(L->queries, L->K, L->D, s.queries_t);
    return s;
}

/* Eq. 14-17 for sample b of a range ending at row_end, after asking for the next sample's table rows: sc->x (D, K)
 * <- Y = LayerNorm(O + I (.) z_K), transposed (the loops run over the K points); with `normalized`, the normalised
 * X (B, D, K) and its 1 / sigma (B, K) are saved for the backward. */
static inline void forward_sample(const PoolLayer *L, const float *restrict exp_table, i64 b, i64 row_end,
                                  const ForwardScratch *sc, float *restrict normalized, float *restrict rstd) {
    const i64 S = L->S, M = L->M, K = L->K, D = L->D;
    const i64 *restrict idx = L->index + b * S;
    const float *restrict z = L->mask + b * L->mask_stride, *restrict queries_t = sc->queries_t;
    float *restrict x = sc->x;
    if (b + 1 < row_end) prefetch_sample(L, L->score_table, idx + S);
    sample_weights(L, exp_table, idx, z, K, sc->w, sc->mx, sc->inv);
    pool_row(L->value_table, idx, sc->w, S, M, K, D, x);  /* x (D, K): O transposed */
    /* eq. 17: X = O + I (.) z_K, then the LayerNorm over D, for all K points at once */
    normalize_columns_over_rows(x, z, queries_t, K, D, K, L->eps, sc->mean, sc->rs);
    if (normalized) {
        memcpy(normalized + b * D * K, x, sizeof(float) * D * K);
        memcpy(rstd + b * K, sc->rs, sizeof(float) * K);
    }
    layer_norm_affine(x, D, K, L->norm_weight, L->norm_bias);  /* while the points are contiguous */
}

/* Y = LayerNorm(O + I (.) z_K) for rows [row_begin, row_end) into out (B, K, D); with `normalized`, also
 * the normalised X (B, D, K) (transposed: the backward runs over the points) and 1 / sigma (B, K). */
static void forward_rows(const PoolLayer *L, i64 row_begin, i64 row_end, float *restrict out,
                         float *restrict normalized, float *restrict rstd, float *restrict work) {
    const ForwardScratch sc = forward_scratch(L, work);
    for (i64 b = row_begin; b < row_end; ++b) {
        forward_sample(L, NULL, b, row_end, &sc, normalized, rstd);
        transpose(sc.x, L->D, L->K, out + b * L->K * L->D);
    }
}

/* A thread's scratch for backward_sample, carved out of gathered_pool_work_floats() floats (see backward_rows). */
typedef struct {
    float *w, *gw, *mx, *inv;  /* (S, M K) twice, (M K) twice */
    float *queries_t;          /* (D, K) */
    /* (D, K) each: the range's running sums for the queries, the norm's weight and bias, and the value bias */
    float *grad_queries_t, *sum_nw, *sum_nb, *sum_vb;
    float *m1, *m2;            /* (K) each */
} BackwardScratch;

/* The scratch of a thread's row range, with the queries transposed and the running sums zeroed. */
static BackwardScratch backward_scratch(const PoolLayer *L, float *work) {
    const i64 MK = L->M * L->K, DK = L->D * L->K;
    BackwardScratch s;
    s.w = work;
    s.gw = s.w + L->S * MK;
    s.mx = s.gw + L->S * MK;
    s.inv = s.mx + MK;
    s.queries_t = s.inv + MK;
    s.grad_queries_t = s.queries_t + DK;
    s.sum_nw = s.grad_queries_t + DK;
    s.sum_nb = s.sum_nw + DK;
    s.sum_vb = s.sum_nb + DK;
    s.m1 = s.sum_vb + DK;
    s.m2 = s.m1 + L->K;
    transpose(L->queries, L->K, L->D, s.queries_t);
    memset(s.grad_queries_t, 0, sizeof(float) * 4 * DK);  /* and sum_nw, sum_nb, sum_vb */
    return s;
}

/* Sample b's row of grad_mask, zeroed, after asking for the next sample's table rows (row_end: the range's end). */
static inline float *begin_backward_sample(const PoolLayer *L, i64 b, i64 row_end, float *grad_mask,
                                           i64 grad_mask_stride) {
    if (b + 1 < row_end) prefetch_sample(L, L->score_table, L->index + (b + 1) * L->S);
    float *restrict gm = grad_mask + b * grad_mask_stride;
    for (i64 k = 0; k < L->K; ++k) gm[k] = 0.0f;
    return gm;
}

/* The backward of forward_sample and the affine for sample b, from go_t (D, K), the gradient of Y transposed
 * (overwritten): adds into the thread's gradient slot (gathered_pool_slot_floats) and its running sums, and adds the
 * sample's d/d z_K into gm (K). */
static inline void backward_sample(const PoolLayer *L, const float *restrict exp_table, i64 b,
                                   const float *restrict normalized,
                                   const float *restrict rstd, float *restrict go_t, float *restrict gm,
                                   float *restrict slot, const BackwardScratch *sc) {
    const i64 S = L->S, M = L->M, K = L->K, D = L->D, MK = M * K, DK = D * K;
    float *restrict grad_score_table = slot, *restrict grad_value_table = slot + L->U * MK;
    float *restrict w = sc->w, *restrict gw = sc->gw, *restrict dot = sc->mx;  /* mx: reused once the softmax is done */
    const float *restrict queries_t = sc->queries_t;
    float *restrict grad_queries_t = sc->grad_queries_t, *restrict sum_vb = sc->sum_vb;
    const i64 *restrict idx = L->index + b * S;
    const float *restrict z = L->mask + b * L->mask_stride;
    sample_weights(L, exp_table, idx, z, K, w, sc->mx, sc->inv);
    layer_norm_backward(go_t, normalized + b * DK, rstd + b * K, L->norm_weight, D, K, sc->sum_nw, sc->sum_nb, sc->m1,
                        sc->m2);  /* go_t: d/dX */
    pool_row_backward(L->value_table, idx, w, go_t, S, M, K, D, gw, grad_value_table);
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

/* The range's running sums into the slot's queries (K, D), norm weight, norm bias and value bias (D each). */
static void finish_backward(const PoolLayer *L, const BackwardScratch *sc, float *restrict slot) {
    const i64 K = L->K, D = L->D;
    float *restrict grad_queries = slot + L->U * L->M * (K + D), *restrict grad_norm_weight = grad_queries + K * D;
    float *restrict grad_norm_bias = grad_norm_weight + D, *restrict grad_value_bias = grad_norm_bias + D;
    for (i64 j = 0; j < D; ++j) {
        float a = 0.0f, c = 0.0f, e = 0.0f;
        for (i64 k = 0; k < K; ++k) {
            grad_queries[k * D + j] += sc->grad_queries_t[j * K + k];
            a += sc->sum_nw[j * K + k];
            c += sc->sum_nb[j * K + k];
            e += sc->sum_vb[j * K + k];
        }
        grad_norm_weight[j] += a;
        grad_norm_bias[j] += c;
        grad_value_bias[j] += e;
    }
}

/* The backward of forward_rows for rows [row_begin, row_end) from grad_y (B, K, D): adds into the
 * thread's gradient slot (gathered_pool_slot_floats) and writes grad_mask (B, K) rows. */
static void backward_rows(const PoolLayer *L, i64 row_begin, i64 row_end, const float *restrict grad_y,
                          const float *restrict normalized, const float *restrict rstd, float *restrict grad_mask,
                          i64 grad_mask_stride, float *restrict slot, float *restrict work) {
    const i64 K = L->K, D = L->D;
    const BackwardScratch sc = backward_scratch(L, work);
    float *restrict go_t = sc.m2 + K;  /* this row's gradient of Y, then of X, (D, K) */
    for (i64 b = row_begin; b < row_end; ++b) {
        float *restrict gm = begin_backward_sample(L, b, row_end, grad_mask, grad_mask_stride);
        transpose(grad_y + b * K * D, K, D, go_t);
        backward_sample(L, NULL, b, normalized, rstd, go_t, gm, slot, &sc);
    }
    finish_backward(L, &sc, slot);
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

/* ---- Training: eq. 14-17 fused with the Pattern Selector's attention (eq. 18) over the layer's rows ----
 *
 * Per sample, Y (D, K) stays in cache from the LayerNorm to eq. 18, and in backward eq. 18's gradient of Y goes
 * straight into eq. 17's backward: Y is neither written out (B, K, D) nor read back, padded or transposed (the
 * two kernels in turn, gathered_pool_* and row_attention_pool.c's, are the path where eq. 18 does not follow).
 * The backward rebuilds Y from the saved normalised X. Eq. 18's row weights: none (a plain softmax), `counts`
 * (K) shared by every sample (the uniform reading's dropped points, counted once each), or z_K itself (the
 * "contributes nothing" reading, whose gradient then has both shares). */
typedef struct {
    PoolLayer pool;
    i64 Q;
    const float *factor;   /* (D, Q): eq. 18's query-side factor (scaled) */
    i64 weighting;         /* eq. 18's row weights: 0 none, 1 counts, 2 the sample's z_K (the pool's mask) */
    const float *counts;   /* (K), weighting 1 */
    const float *exp_table;  /* (U, M K) exp(score_table - its column maxima), or NULL: see sample_weights */
} PatternPoolLayer;

/* Scratch per thread: gathered_pool_work_floats() for eq. 14-17, then Y (D, K), eq. 18's d/d weights and the
 * unsaved q (Q, K each), the pooled gradient transposed (D, Q) and a sample's share of the factor's gradient (Q, D). */
i64 pattern_pool_work_floats(const PatternPoolLayer *L) {
    const i64 D = L->pool.D, K = L->pool.K, Q = L->Q;
    return gathered_pool_work_floats(&L->pool) + D * K + 2 * Q * K + 2 * D * Q;
}

/* Per-thread gradient slot: gathered_pool_slot_floats()'s, then eq. 18's factor (D, Q). */
i64 pattern_pool_slot_floats(const PatternPoolLayer *L) {
    return gathered_pool_slot_floats(&L->pool) + L->pool.D * L->Q;
}

static const float *row_weights_of(const PatternPoolLayer *L, i64 b) {
    return L->weighting == 0 ? NULL : L->weighting == 1 ? L->counts : L->pool.mask + b * L->pool.mask_stride;
}

/* Rows [row_begin, row_end): pooled (B, Q, D), eq. 18's weights (B, Q, K), and q (B, Q, K) under weighting 2;
 * the normalised X (B, D, K) and 1 / sigma (B, K) for the backward. */
static void pattern_forward_rows(const PatternPoolLayer *PL, i64 row_begin, i64 row_end, float *restrict pooled,
                                 float *restrict normalized, float *restrict rstd, float *restrict weights,
                                 float *restrict q_out, float *restrict work) {
    const PoolLayer *L = &PL->pool;
    const i64 K = L->K, D = L->D, Q = PL->Q;
    const ForwardScratch sc = forward_scratch(L, work);
    float *restrict x = sc.x, *restrict q_scratch = work + gathered_pool_work_floats(L);
    for (i64 b = row_begin; b < row_end; ++b) {
        forward_sample(L, PL->exp_table, b, row_end, &sc, normalized, rstd);  /* x: Y (D, K) */
        const float *restrict rw = row_weights_of(PL, b);
        float *restrict wb = weights + b * Q * K, *restrict qb = q_out ? q_out + b * Q * K : q_scratch;
        eq18_scores(x, PL->factor, D, Q, K, wb);
        softmax_queries(wb, qb, rw, Q, K);
        query_row_dots(wb, x, Q, D, K, NULL, pooled + b * Q * D);
    }
}

/* gy (D, K) <- w^T g + t^T factor^T, the gradient of eq. 18's rows through the pooling and through the scores, from
 * w and t (Q, K), g_t and factor (D, Q). */
static void d_rows_generic(const float *restrict w, const float *restrict t, const float *restrict g_t,
                           const float *restrict factor, i64 D, i64 Q, i64 K, float *restrict gy) {
    for (i64 j = 0; j < D; ++j) {
        float *restrict gyj = gy + j * K;
        for (i64 k = 0; k < K; ++k) gyj[k] = 0.0f;
        for (i64 iq = 0; iq < Q; ++iq) {
            const float gv = g_t[j * Q + iq], fv = factor[j * Q + iq];
            const float *restrict wq = w + iq * K, *restrict tq = t + iq * K;
            for (i64 k = 0; k < K; ++k) gyj[k] += wq[k] * gv + tq[k] * fv;
        }
    }
}

#if APEM_AVX2
/* d_rows_generic for NQ <= 8 queries (a constant at each call): 8 points at a time, their w and t columns held in
 * registers over the D rows, and each output vector stored once. */
static inline __attribute__((always_inline)) void d_rows_block(const float *restrict w, const float *restrict t,
                                                               const float *restrict g_t, const float *restrict factor,
                                                               i64 D, i64 K, const int NQ, float *restrict gy) {
    for (i64 k0 = 0; k0 < K; k0 += 8) {
        __m256 wv[8], tv[8];
        for (int q = 0; q < NQ; ++q) {
            wv[q] = _mm256_loadu_ps(w + q * K + k0);
            tv[q] = _mm256_loadu_ps(t + q * K + k0);
        }
        for (i64 j = 0; j < D; ++j) {
            __m256 acc = _mm256_setzero_ps();
            for (int q = 0; q < NQ; ++q) {
                acc = _mm256_fmadd_ps(wv[q], _mm256_broadcast_ss(g_t + j * NQ + q), acc);
                acc = _mm256_fmadd_ps(tv[q], _mm256_broadcast_ss(factor + j * NQ + q), acc);
            }
            _mm256_storeu_ps(gy + j * K + k0, acc);
        }
    }
}
#endif

static void d_rows(const float *restrict w, const float *restrict t, const float *restrict g_t,
                   const float *restrict factor, i64 D, i64 Q, i64 K, float *restrict gy) {
#if APEM_AVX2
    if (K % 8 == 0) {
        switch (Q) {
        case 1: d_rows_block(w, t, g_t, factor, D, K, 1, gy); return;
        case 2: d_rows_block(w, t, g_t, factor, D, K, 2, gy); return;
        case 3: d_rows_block(w, t, g_t, factor, D, K, 3, gy); return;
        case 4: d_rows_block(w, t, g_t, factor, D, K, 4, gy); return;
        case 5: d_rows_block(w, t, g_t, factor, D, K, 5, gy); return;
        case 6: d_rows_block(w, t, g_t, factor, D, K, 6, gy); return;
        case 7: d_rows_block(w, t, g_t, factor, D, K, 7, gy); return;
        case 8: d_rows_block(w, t, g_t, factor, D, K, 8, gy); return;
        default: break;
        }
    }
#endif
    d_rows_generic(w, t, g_t, factor, D, Q, K, gy);
}

/* Eq. 18's backward for one sample over Y (D, K) with weights w (Q, K) and the pooled gradient g (Q, D): gy (D, K)
 * <- d/d Y (through the pooling and the scores); adds the factor's share into grad_factor (D, Q) and, with q, d/d
 * row weights into grw (K); t (Q, K), g_t (D, Q) and rows (Q, D) are scratch. */
static void pattern_attention_backward(const float *restrict y, const float *restrict factor, const float *restrict w,
                                       const float *restrict q, const float *restrict g, i64 D, i64 Q, i64 K,
                                       float *restrict gy, float *restrict grad_factor, float *restrict grw,
                                       float *restrict t, float *restrict g_t, float *restrict rows) {
    for (i64 iq = 0; iq < Q; ++iq)
        for (i64 j = 0; j < D; ++j) g_t[j * Q + iq] = g[iq * D + j];
    eq18_scores(y, g_t, D, Q, K, t);  /* d/d weights: t[q, k] = g[q] . Y[:, k] */
    float means[Q];
    paired_row_dots(w, t, Q, K, means);  /* softmax backward: w (t - sum_k w t) */
    for (i64 iq = 0; iq < Q; ++iq) {
        const float *restrict wq = w + iq * K;
        float *restrict tq = t + iq * K;
        for (i64 k = 0; k < K; ++k) tq[k] -= means[iq];
        if (q)  /* weights = q z: d/d z_k = sum over the queries of q_k t_k */
            for (i64 k = 0; k < K; ++k) grw[k] += q[iq * K + k] * tq[k];
        for (i64 k = 0; k < K; ++k) tq[k] *= wq[k];  /* t: d/d scores */
    }
    d_rows(w, t, g_t, factor, D, Q, K, gy);
    query_row_dots(t, y, Q, D, K, NULL, rows);  /* the factor's share: t Y^T, (Q, D) */
    for (i64 iq = 0; iq < Q; ++iq)
        for (i64 j = 0; j < D; ++j) grad_factor[j * Q + iq] += rows[iq * D + j];
}

static void pattern_backward_rows(const PatternPoolLayer *PL, i64 row_begin, i64 row_end,
                                  const float *restrict grad_pooled, const float *restrict normalized,
                                  const float *restrict rstd, const float *restrict weights, const float *restrict q,
                                  float *restrict grad_mask, i64 grad_mask_stride, float *restrict slot,
                                  float *restrict work) {
    const PoolLayer *L = &PL->pool;
    const i64 K = L->K, D = L->D, DK = D * K, Q = PL->Q;
    const BackwardScratch sc = backward_scratch(L, work);
    float *restrict go_t = sc.m2 + K;  /* d/d Y, then d/d X, (D, K) */
    float *restrict y = work + gathered_pool_work_floats(L), *restrict t = y + DK, *restrict g_t = t + 2 * Q * K;
    float *restrict rows = g_t + D * Q;
    float *restrict grad_factor = slot + gathered_pool_slot_floats(L);
    for (i64 b = row_begin; b < row_end; ++b) {
        float *restrict gm = begin_backward_sample(L, b, row_end, grad_mask, grad_mask_stride);
        const float *restrict xh = normalized + b * DK;
        for (i64 j = 0; j < D; ++j)  /* Y again, from the saved normalised X (eq. 17's affine) */
            for (i64 k = 0; k < K; ++k) y[j * K + k] = xh[j * K + k] * L->norm_weight[j] + L->norm_bias[j];
        pattern_attention_backward(y, PL->factor, weights + b * Q * K, PL->weighting == 2 ? q + b * Q * K : NULL,
                                   grad_pooled + b * Q * D, D, Q, K, go_t, grad_factor, gm, t, g_t, rows);
        backward_sample(L, PL->exp_table, b, normalized, rstd, go_t, gm, slot, &sc);
    }
    finish_backward(L, &sc, slot);
}

/* pooled (B, Q, D) <- eq. 18's pooled rows over the layer's Y; saves what pattern_pool_backward reads: normalized
 * (B, D, K), rstd (B, K), weights (B, Q, K) and, under weighting 2, q (B, Q, K) (else NULL). */
void pattern_pool_forward(const PatternPoolLayer *L, i64 B, i64 threads, float *pooled, float *normalized,
                          float *rstd, float *weights, float *q, float *work) {
    const i64 work_floats = pattern_pool_work_floats(L);
#pragma omp parallel num_threads(threads)
    {
        const i64 t = omp_get_thread_num(), n = omp_get_num_threads();
        pattern_forward_rows(L, B * t / n, B * (t + 1) / n, pooled, normalized, rstd, weights, q,
                             work + t * work_floats);
    }
}

/* From grad_pooled (B, Q, D): thread t adds into slots + t * pattern_pool_slot_floats(L) (zeroed by the caller,
 * who sums them), and grad_mask (B, K) rows are written (under weighting 2 with eq. 18's share of d/d z_K). */
void pattern_pool_backward(const PatternPoolLayer *L, i64 B, i64 threads, const float *grad_pooled,
                           const float *normalized, const float *rstd, const float *weights, const float *q,
                           float *grad_mask, i64 grad_mask_stride, float *slots, float *work) {
    const i64 work_floats = pattern_pool_work_floats(L), slot_floats = pattern_pool_slot_floats(L);
#pragma omp parallel num_threads(threads)
    {
        const i64 t = omp_get_thread_num(), n = omp_get_num_threads();
        pattern_backward_rows(L, B * t / n, B * (t + 1) / n, grad_pooled, normalized, rstd, weights, q, grad_mask,
                              grad_mask_stride, slots + t * slot_floats, work + t * work_floats);
    }
}
