/* Inference of one APEM layer per sample, fused: ASRG (paper eq. 14-17) over the points a batch keeps,
 * and then the Pattern Selector's attention (eq. 18) over the resulting rows. Nothing per point is
 * written out: a sample's (points, D) rows stay in cache from the pooling to eq. 18. Built and loaded by
 * apem/nn/native.py and called by apem/nn/native_pools.py (fused_predict); the training path
 * (gathered_pool.c, then row_attention_pool.c, or their torch references in apem.nn.attention) is the
 * reference, and tests/nn/test_native_pool.py keeps the two equal.
 *
 * The caller drops the points that no sample of the batch keeps (z_k = 0 in every row) and passes the
 * other P, those kept by the most rows first, with the point behind each column; the score table has PC >= P
 * columns, zero past P (PredictLayer below holds the shapes). Per sample b, z = f_D(logits[b]) (eq. 13, computed
 * here as apem.nn.selection.dynamic_activation does, which the tests hold it to), and:
 * - each of the sample's columns runs eq. 14-17 as in gathered_pool.c: weights softmax_s(z_p score_table[x_s,
 *   (m, p)]), the pooled value rows, the residual z_p I_p and the LayerNorm, whose affine pattern_pool folds into
 *   eq. 18 (so the normalised rows are never written);
 * - a point with z = 0 has all-zero scores, so its row is LayerNorm(mean_s sum_m value_table[x_s, m]),
 *   the same for every such point. Under "uniform_attention" (uniform = 1) eq. 18 counts each row once, and
 *   the dropped points and the kept ones past the sample's columns, all with that row, at one of its de-selected
 *   points. Under "contributes_nothing" (uniform = 0) eq. 18 weighs each row by its z (weighted_softmax), so
 *   the dropped points, like any row with z = 0, weigh nothing.
 * A sample's columns run up to its last kept point (and, uniform, one more), in blocks of 8; columns past P are
 * padding that eq. 18 weighs 0. Each call splits the batch into `threads` row ranges run by OpenMP (see
 * gathered_pool.c): the rows stay in the caller's order, which puts rows sharing table rows side by side (scoring
 * a range grouped by column count instead measured 15% slower).
 */
/* The loops gcc vectorises itself here run over one sample's PC <= K columns, and their reductions end in a
 * lane-by-lane sum as wide as the vectors: with -march=native on an AVX-512 CPU that is 16 lanes, and preferring
 * 8-lane vectors made predict ~10% faster on an AMD EPYC (Zen 4), which splits 512-bit operations in two. Not in
 * gathered_pool.c or row_attention_pool.c: their loops are S K long and measured ~4% slower with 8 lanes. On CPUs
 * without AVX-512 this changes nothing. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("prefer-vector-width=256")
/* Its loops are short (a sample's columns, 8 at a time) and their trip counts vary with the batch: unrolled, predict
 * measured 0.954-0.960x in A/B runs (1 and 2 threads); the training kernels and the chain measured no difference. */
#pragma GCC optimize("unroll-loops")
#endif

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <omp.h>
#include <string.h>

#include "common.h"
#include "pattern_attention.h"
#include "pooling.h"

/* A layer's inputs (apem.nn.native_pools.PredictLayer mirrors this struct). */
typedef struct {
    PoolLayer pool;       /* the ASRG layer as gathered_pool.c reads it, over K = PC columns (a multiple of 8);
                           * its mask is unused (z comes from the logits below), and its queries are all the layer's
                           * points' (the kept ones read at `columns`) */
    i64 Q;
    const float *factor;  /* (D, Q): eq. 18's query-side factor (scaled) */
    i64 uniform;          /* 1: "uniform_attention", 0: "contributes_nothing" */
    i64 points;           /* P: the kept points, columns 0..P-1 */
    i64 rest;             /* the dropped points (their row under "uniform_attention": see predict_rows) */
    const float *exp_table;  /* (U, M PC) exp(score_table - its column maxima), or NULL (then every exp is
                              * taken per sample) */
    const float *logits;     /* (B, K) eq. 11's selector logits of the layer's K points, row stride logits_stride */
    i64 logits_stride;
    const i64 *columns;      /* (P): the point behind each kept column */
    float gamma;             /* eq. 13's gamma */
} PredictLayer;

/* Scratch per thread: weights (S, M PC), X and the inducing points transposed (D, PC each), column maxima and sums
 * (M PC each), eq. 18's scores (Q, PC), row counts, z and the kept columns' logits (PC each), eq. 18's factor
 * with eq. 17's scale folded in (D, Q) and its queries' normalisers (Q). */
i64 fused_predict_work_floats(const PredictLayer *L) {
    return (L->pool.S * L->pool.M + 2 * L->pool.D + 2 * L->pool.M + L->Q + 3) * L->pool.K + (L->pool.D + 1) * L->Q;
}

/* Eq. 18 for one sample over the LayerNorm's rows Y = xc rs nw + nb (eq. 17), from the centred X, xc (D, PC), and
 * its 1 / sigma, rs (PC), without writing Y: the scores Y^T factor are rs (xc^T (nw (.) factor)) plus a constant
 * per query, which the softmax over the rows cancels, and out (Q, D) <- sum_p a[q, p] Y[:, p] =
 * nw (.) sum_p (a[q, p] rs[p]) xc[:, p] + nb (the weights sum to 1), with a = count_p e^{score} / sum count
 * e^{score} over the rows of nonzero count (weighted_softmax's reading: all-zero counts give an all-zero output).
 * factor_nw is nw (.) factor, (D, Q). Every loop runs over the PC columns, so that it vectorises. */
static void pattern_pool(const float *restrict xc, const float *restrict rs, const float *restrict count,
                         const float *restrict factor_nw, const float *restrict nw, const float *restrict nb, i64 D,
                         i64 Q, i64 PC, float *restrict sc, float *restrict scale, float *restrict out) {
    eq18_scores(xc, factor_nw, D, Q, PC, sc);
    for (i64 q = 0; q < Q; ++q)
        for (i64 p = 0; p < PC; ++p) sc[q * PC + p] = count[p] > 0.0f ? sc[q * PC + p] * rs[p] : -INFINITY;
    for (i64 q0 = 0; q0 < Q; q0 += 8) {  /* each query's weights a[q, p] rs[p], up to its 1 / total in scale[q] */
        const i64 n = Q - q0 < 8 ? Q - q0 : 8;
        float top[8], total[8];
        block_maxima(sc + q0 * PC, n, PC, top);
        for (i64 i = 0; i < n; ++i) {
            float *restrict s = sc + (q0 + i) * PC;
            if (top[i] == -INFINITY)  /* no row counts: an all-zero output, below */
                for (i64 p = 0; p < PC; ++p) s[p] = 0.0f;
            else  /* -inf: clamped, times 0 */
                for (i64 p = 0; p < PC; ++p) s[p] = count[p] * exp_nonpositive(s[p] - top[i]);
        }
        block_totals(sc + q0 * PC, NULL, n, PC, total);
        for (i64 i = 0; i < n; ++i) {
            float *restrict s = sc + (q0 + i) * PC;
            for (i64 p = 0; p < PC; ++p) s[p] *= rs[p];
            scale[q0 + i] = top[i] == -INFINITY ? 0.0f : 1.0f / total[i];
        }
    }
    query_row_dots(sc, xc, Q, D, PC, scale, out);
    for (i64 q = 0; q < Q; ++q)
        for (i64 j = 0; j < D; ++j) out[q * D + j] = scale[q] != 0.0f ? out[q * D + j] * nw[j] + nb[j] : 0.0f;
}

/* The last of the first P columns with z != 0, or -1; z is zero from P up to the next multiple of 8. Under AVX2 8
 * columns at a time from the end (a sample keeps ~31 of the ~50 points its batch keeps, the last of them ~10 columns
 * before P: one compare per column, scanned down, had cost ~2% of the kernel). */
static inline i64 last_kept(const float *restrict z, i64 P) {
#if APEM_AVX2
    for (i64 p0 = (P - 1) / 8 * 8; p0 >= 0; p0 -= 8) {
        const int kept = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(z + p0), _mm256_setzero_ps(), _CMP_NEQ_UQ));
        if (kept) return p0 + 31 - __builtin_clz((unsigned)kept);
    }
    return -1;
#else
    i64 last = P - 1;
    while (last >= 0 && z[last] == 0.0f) --last;
    return last;
#endif
}

static void predict_rows(const PredictLayer *PL, i64 row_begin, i64 row_end, float *restrict pooled,
                         float *restrict work) {
    const PoolLayer *L = &PL->pool;
    const i64 S = L->S, M = L->M, PC = L->K, D = L->D, Q = PL->Q, MPC = M * PC, P = PL->points;
    float *restrict w = work, *restrict x = w + S * MPC, *restrict mx = x + D * PC, *restrict inv = mx + MPC;
    float *restrict sc = inv + MPC, *restrict count = sc + Q * PC, *restrict queries_t = count + PC;
    float *restrict z = queries_t + D * PC, *restrict factor_nw = z + PC, *restrict scale = factor_nw + D * Q;
    float *restrict kept_logits = scale + Q;
    for (i64 p = P; p < PC; ++p) kept_logits[p] = -INFINITY;  /* padding: z = f_D(-inf) = 0 exactly */
    for (i64 j = 0; j < D; ++j)  /* the kept points' queries, transposed; zero past them */
        for (i64 p = 0; p < PC; ++p) queries_t[j * PC + p] = p < P ? L->queries[PL->columns[p] * D + j] : 0.0f;
    for (i64 j = 0; j < D; ++j)  /* eq. 17's scale folded into eq. 18's factor (see pattern_pool) */
        for (i64 q = 0; q < Q; ++q) factor_nw[j * Q + q] = L->norm_weight[j] * PL->factor[j * Q + q];
    for (i64 b = row_begin; b < row_end; ++b) {
        const i64 *restrict idx = L->index + b * S;
        const float *restrict logits = PL->logits + b * PL->logits_stride;
        if (b + 1 < row_end) {
            prefetch_sample(L, PL->exp_table ? PL->exp_table : L->score_table, idx + S);
            for (i64 p = 0; p < P; p += 8) __builtin_prefetch(logits + PL->logits_stride + PL->columns[p]);
        }
        /* gathered first, so that f_D runs without branches over all PC columns (one branch per column, taken at
         * random, had cost ~6% of predict) */
        for (i64 p = 0; p < P; ++p) kept_logits[p] = logits[PL->columns[p]];
        for (i64 p = 0; p < PC; ++p) z[p] = dynamic_activation(kept_logits[p], PL->gamma);
        /* the sample's columns: up to its last kept point (apem.nn.native_pools.kept_points orders the columns by
         * how many rows keep them, so that a sample's last kept point tends to come early: 15% fewer columns on
         * the synthetic funnel, predict ~4% faster), and under the uniform reading one more, a de-selected point
         * for the row that every de-selected and dropped point outputs */
        const i64 last = last_kept(z, P);
        i64 width = (last + 1 + PL->uniform + 7) / 8 * 8;
        width = width < 8 ? 8 : (width > PC ? PC : width);
        sample_weights(L, PL->exp_table, idx, z, width, w, mx, inv);  /* binary z: no exp per field */
        pool_row(L->value_table, idx, w, S, M, width, D, x);  /* x (D, width): O transposed */
        /* eq. 17's residual z I, and inv (width) <- 1 / sigma */
        residual_centre_columns(x, z, queries_t, PC, D, width, L->eps, mx, inv);
        for (i64 p = 0; p < width; ++p) count[p] = p < P ? (PL->uniform ? 1.0f : z[p]) : 0.0f;
        /* the shared row counts the dropped points and the kept ones past the sample's columns (z = 0 there), at
         * its first de-selected point: column last + 1 at the latest, or, where the sample keeps the last column,
         * column P or a de-selected point before (apem.nn.native_pools.kept_points leaves one of them) */
        const i64 shared_count = PL->rest + (P > width ? P - width : 0);
        if (PL->uniform && shared_count > 0) {
            i64 shared = 0;
            while (shared < width && z[shared] != 0.0f) ++shared;
            if (shared < width) count[shared] += (float)shared_count;
        }
        pattern_pool(x, inv, count, factor_nw, L->norm_weight, L->norm_bias, D, Q, width, sc, scale,
                     pooled + b * Q * D);
    }
}

/* A layer's tables for fused_predict, per batch: scores (U, M C) <- rows (U, D) times eq. 15's score factor (D, M K)
 * at each head's `columns` (P of them, then C - P zero columns; NULL: all K, with C = K), and, when every column
 * spans at most max_range (so that no weight underflows), exps (U, M C) <- exp(scores - the column's maximum);
 * returns whether it wrote exps. One pass over the rows for both (torch's product, reductions and exp measured
 * ~1.3 us a row at batch 2048). Uses work: 2 M C floats, and D M C more with columns. */
i64 fused_predict_tables(const float *rows, i64 U, i64 D, const float *factor, i64 M, i64 K, const i64 *columns,
                         i64 P, i64 C, float max_range, float *scores, float *exps, float *work) {
    const i64 MC = M * C;
    float *restrict top = work, *restrict bottom = work + MC;
    if (columns) {  /* the kept columns, gathered */
        float *restrict kept = work + 2 * MC;
        for (i64 j = 0; j < D; ++j)
            for (i64 m = 0; m < M; ++m)
                for (i64 c = 0; c < C; ++c)
                    kept[j * MC + m * C + c] = c < P ? factor[(j * M + m) * K + columns[c]] : 0.0f;
        factor = kept;
    }
    for (i64 c = 0; c < MC; ++c) {
        top[c] = -INFINITY;
        bottom[c] = INFINITY;
    }
    for (i64 u = 0; u < U; ++u) {
        float *restrict out = scores + u * MC;
        const float *restrict r = rows + u * D;
        for (i64 c = 0; c < MC; ++c) out[c] = 0.0f;
        for (i64 j = 0; j < D; ++j)
            for (i64 c = 0; c < MC; ++c) out[c] += r[j] * factor[j * MC + c];
        for (i64 c = 0; c < MC; ++c) {
            top[c] = out[c] > top[c] ? out[c] : top[c];
            bottom[c] = out[c] < bottom[c] ? out[c] : bottom[c];
        }
    }
    for (i64 c = 0; c < MC; ++c)
        if (!(top[c] - bottom[c] <= max_range)) return 0;  /* also a NaN */
    for (i64 u = 0; u < U; ++u)
        for (i64 c = 0; c < MC; ++c) exps[u * MC + c] = exp_nonpositive(scores[u * MC + c] - top[c]);
    return 1;
}

/* pooled (B, Q, D) <- eq. 18's pooled rows of the layer (row_attention_pool's output for this layer). */
void fused_predict(const PredictLayer *L, i64 B, i64 threads, float *pooled, float *work) {
    const i64 work_floats = fused_predict_work_floats(L);
#pragma omp parallel num_threads(threads)
    {
        const i64 t = omp_get_thread_num(), n = omp_get_num_threads();
        predict_rows(L, B * t / n, B * (t + 1) / n, pooled, work + t * work_floats);
    }
}
