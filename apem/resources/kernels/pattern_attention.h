/* Eq. 18's per-sample pieces over a sample's rows laid out (D, R), so that every loop runs over the R rows: the
 * scores of the Q queries, their softmax over the rows (with row weights or none) and the pooling's dot products.
 * Shared by fused_predict.c (inference), gathered_pool.c (training, fused with eq. 14-17) and
 * row_attention_pool.c (the softmax, over rows laid out (R, D)). */
#ifndef APEM_KERNEL_PATTERN_ATTENTION_H
#define APEM_KERNEL_PATTERN_ATTENTION_H

#include <float.h>
#include <math.h>

#include "common.h"

/* out (Q, D) <- a y^T, out[q, j] = scale[q] sum_p a[q, p] y[j, p], for the Q rows of a (Q, PC) and the D rows of
 * y (D, PC) (scale NULL: 1): eq. 18's pooling and its gradient's share of the factor. Per query the rows go 8 at a
 * time (one load of a per 8 products, the 8 sums reduced together by lane_sums8); the (query, row) pairs of the rows
 * after the last 8 go 8 pairs at a time: at d = 18, the last two rows' 12 pairs one at a time, each with its own
 * 16-lane horizontal sum (gathered_pool.c's width), had cost ~9% of a training step (inference's 8-lane loops
 * measured no difference). */
static inline void query_row_dots(const float *restrict a, const float *restrict y, i64 Q, i64 D, i64 PC,
                                  const float *restrict scale, float *restrict out) {
    i64 blocked = 0;
#if APEM_AVX2
    if (PC % 8 == 0) {
        blocked = D - D % 8;
        for (i64 q = 0; q < Q; ++q)
            for (i64 j = 0; j < blocked; j += 8) {
                __m256 t[8];
                for (int jj = 0; jj < 8; ++jj) t[jj] = _mm256_setzero_ps();
                for (i64 p = 0; p < PC; p += 8) {
                    const __m256 av = _mm256_loadu_ps(a + q * PC + p);
                    for (int jj = 0; jj < 8; ++jj)
                        t[jj] = _mm256_fmadd_ps(av, _mm256_loadu_ps(y + (j + jj) * PC + p), t[jj]);
                }
                _mm256_storeu_ps(out + q * D + j, _mm256_mul_ps(lane_sums8(t), _mm256_set1_ps(scale ? scale[q] : 1.0f)));
            }
        const i64 rest = D - blocked, pairs = Q * rest;
        for (i64 first = 0; first < pairs; first += 8) {
            const float *ar[8], *yr[8];
            __m256 t[8];
            for (int i = 0; i < 8; ++i) {  /* past the last pair: the first one again, its sum unused */
                const i64 pair = first + i < pairs ? first + i : first;
                ar[i] = a + pair / rest * PC;
                yr[i] = y + (blocked + pair % rest) * PC;
                t[i] = _mm256_setzero_ps();
            }
            for (i64 p = 0; p < PC; p += 8)
                for (int i = 0; i < 8; ++i)
                    t[i] = _mm256_fmadd_ps(_mm256_loadu_ps(ar[i] + p), _mm256_loadu_ps(yr[i] + p), t[i]);
            float sums[8];
            _mm256_storeu_ps(sums, lane_sums8(t));
            for (i64 i = 0; i < 8 && first + i < pairs; ++i) {
                const i64 q = (first + i) / rest, j = blocked + (first + i) % rest;
                out[q * D + j] = sums[i] * (scale ? scale[q] : 1.0f);
            }
        }
        return;
    }
#endif
    for (i64 q = 0; q < Q; ++q)
        for (i64 j = blocked; j < D; ++j) {
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (i64 p = 0; p < PC; ++p) acc += a[q * PC + p] * y[j * PC + p];
            out[q * D + j] = acc * (scale ? scale[q] : 1.0f);
        }
}

#if APEM_AVX2
/* eq18_scores for NQ <= 8 queries, a constant at each call (so that the accumulators stay in registers): the
 * NQ scores of 8 rows at a time, one load of y per column. */
static inline __attribute__((always_inline)) void eq18_scores_block(const float *restrict y,
                                                                    const float *restrict factor, i64 D, i64 PC,
                                                                    const int NQ, float *restrict sc) {
    i64 p = 0;
    for (; p + 16 <= PC; p += 16) {  /* 16 rows: each broadcast of the factor feeds two products */
        __m256 a[8], b[8];
        for (int q = 0; q < NQ; ++q) a[q] = b[q] = _mm256_setzero_ps();
        for (i64 j = 0; j < D; ++j) {
            const __m256 yv = _mm256_loadu_ps(y + j * PC + p), yw = _mm256_loadu_ps(y + j * PC + p + 8);
            for (int q = 0; q < NQ; ++q) {
                const __m256 f = _mm256_broadcast_ss(factor + j * NQ + q);
                a[q] = _mm256_fmadd_ps(f, yv, a[q]);
                b[q] = _mm256_fmadd_ps(f, yw, b[q]);
            }
        }
        for (int q = 0; q < NQ; ++q) {
            _mm256_storeu_ps(sc + q * PC + p, a[q]);
            _mm256_storeu_ps(sc + q * PC + p + 8, b[q]);
        }
    }
    for (; p < PC; p += 8) {
        __m256 a[8];
        for (int q = 0; q < NQ; ++q) a[q] = _mm256_setzero_ps();
        for (i64 j = 0; j < D; ++j) {
            const __m256 yv = _mm256_loadu_ps(y + j * PC + p);
            for (int q = 0; q < NQ; ++q) a[q] = _mm256_fmadd_ps(_mm256_broadcast_ss(factor + j * NQ + q), yv, a[q]);
        }
        for (int q = 0; q < NQ; ++q) _mm256_storeu_ps(sc + q * PC + p, a[q]);
    }
}
#endif

/* sc (Q, PC) <- factor (D, Q) transposed times y (D, PC): eq. 18's scores of every row. */
static inline void eq18_scores(const float *restrict y, const float *restrict factor, i64 D, i64 Q, i64 PC,
                        float *restrict sc) {
#if APEM_AVX2
    if (PC % 8 == 0) {
        switch (Q) {
        case 1: eq18_scores_block(y, factor, D, PC, 1, sc); return;
        case 2: eq18_scores_block(y, factor, D, PC, 2, sc); return;
        case 3: eq18_scores_block(y, factor, D, PC, 3, sc); return;
        case 4: eq18_scores_block(y, factor, D, PC, 4, sc); return;
        case 5: eq18_scores_block(y, factor, D, PC, 5, sc); return;
        case 6: eq18_scores_block(y, factor, D, PC, 6, sc); return;
        case 7: eq18_scores_block(y, factor, D, PC, 7, sc); return;
        case 8: eq18_scores_block(y, factor, D, PC, 8, sc); return;
        default: break;
        }
    }
#endif
    for (i64 q = 0; q < Q; ++q) {
        float *restrict s = sc + q * PC;
        for (i64 p = 0; p < PC; ++p) s[p] = 0.0f;
        for (i64 j = 0; j < D; ++j)
            for (i64 p = 0; p < PC; ++p) s[p] += factor[j * Q + q] * y[j * PC + p];
    }
}

/* out[q] = a[q] . b[q] for the Q rows of a and b (Q, R): 8 rows' sums reduced together (lane_sums8), as
 * query_row_dots' pairs. */
static inline void paired_row_dots(const float *restrict a, const float *restrict b, i64 Q, i64 R,
                                   float *restrict out) {
#if APEM_AVX2
    if (R % 8 == 0) {
        for (i64 q0 = 0; q0 < Q; q0 += 8) {
            const i64 n = Q - q0 < 8 ? Q - q0 : 8;
            __m256 acc[8];
            float sums[8];
            for (int i = 0; i < 8; ++i) {  /* past the last row: zero, unused */
                acc[i] = _mm256_setzero_ps();
                if (i < n)
                    for (i64 r = 0; r < R; r += 8)
                        acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(a + (q0 + i) * R + r),
                                                 _mm256_loadu_ps(b + (q0 + i) * R + r), acc[i]);
            }
            _mm256_storeu_ps(sums, lane_sums8(acc));
            for (i64 i = 0; i < n; ++i) out[q0 + i] = sums[i];
        }
        return;
    }
#endif
    for (i64 q = 0; q < Q; ++q) {
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (i64 r = 0; r < R; ++r) total += a[q * R + r] * b[q * R + r];
        out[q] = total;
    }
}

/* w[0:R] <- w / total, its softmax once w holds the exps; with row weights z, weights = q z with q = e / sum_r(z e)
 * written to qq, total being sum_r(z e) (weighted_softmax's reading: all-zero row weights give all-zero weights). */
static inline void normalize_softmax_row(float *restrict w, float *restrict qq, const float *restrict z, i64 R,
                                         float total) {
    if (z) {
        const float scale = 1.0f / (total > FLT_MIN ? total : FLT_MIN);
        for (i64 r = 0; r < R; ++r) {
            qq[r] = w[r] * scale;
            w[r] = qq[r] * z[r];
        }
    } else {
        const float scale = 1.0f / total;
        for (i64 r = 0; r < R; ++r) w[r] *= scale;
    }
}

/* top[i] <- max_r w[i, r] for the n <= 8 rows of w (n, R): under AVX2 (R a multiple of 8) the 8 rows' maxima
 * reduced together (lane_max8), where one reduction per row (a chain of scalar maxima) cost as much as its row's
 * exps. */
static inline void block_maxima(const float *restrict w, i64 n, i64 R, float *restrict top) {
#if APEM_AVX2
    if (R % 8 == 0) {
        __m256 acc[8];
        float tops[8];
        for (int i = 0; i < 8; ++i) {  /* past the last row: -inf, unused */
            acc[i] = _mm256_set1_ps(-INFINITY);
            if (i < n)
                for (i64 r = 0; r < R; r += 8) acc[i] = _mm256_max_ps(acc[i], _mm256_loadu_ps(w + i * R + r));
        }
        _mm256_storeu_ps(tops, lane_max8(acc));
        for (i64 i = 0; i < n; ++i) top[i] = tops[i];
        return;
    }
#endif
    for (i64 i = 0; i < n; ++i) {
        float t = -INFINITY;
#pragma omp simd reduction(max : t)
        for (i64 r = 0; r < R; ++r) t = w[i * R + r] > t ? w[i * R + r] : t;
        top[i] = t;
    }
}

/* total[i] <- sum_r w[i, r] z[r] (z NULL: 1) for the n <= 8 rows of w (n, R), as block_maxima (lane_sums8). */
static inline void block_totals(const float *restrict w, const float *restrict z, i64 n, i64 R,
                                float *restrict total) {
#if APEM_AVX2
    if (R % 8 == 0) {
        __m256 acc[8];
        float totals[8];
        for (int i = 0; i < 8; ++i) {  /* past the last row: zero, unused */
            acc[i] = _mm256_setzero_ps();
            if (i < n)
                for (i64 r = 0; r < R; r += 8) {
                    const __m256 e = _mm256_loadu_ps(w + i * R + r);
                    acc[i] = z ? _mm256_fmadd_ps(e, _mm256_loadu_ps(z + r), acc[i]) : _mm256_add_ps(acc[i], e);
                }
        }
        _mm256_storeu_ps(totals, lane_sums8(acc));
        for (i64 i = 0; i < n; ++i) total[i] = totals[i];
        return;
    }
#endif
    for (i64 i = 0; i < n; ++i) {
        float t = 0.0f;
#pragma omp simd reduction(+ : t)
        for (i64 r = 0; r < R; ++r) t += z ? w[i * R + r] * z[r] : w[i * R + r];
        total[i] = t;
    }
}

/* w (Q, R) <- the softmax over r of each of its Q rows; with row weights z, weights = q z with q = e / sum_r(z e)
 * written to qq (Q, R) (normalize_softmax_row). The queries' maxima and totals go 8 at a time (block_maxima,
 * block_totals). */
static inline void softmax_queries(float *restrict w, float *restrict qq, const float *restrict z, i64 Q, i64 R) {
    for (i64 q0 = 0; q0 < Q; q0 += 8) {
        const i64 n = Q - q0 < 8 ? Q - q0 : 8;
        float top[8], total[8];
        block_maxima(w + q0 * R, n, R, top);
        for (i64 i = 0; i < n; ++i) {
            float *restrict wq = w + (q0 + i) * R;
            for (i64 r = 0; r < R; ++r) wq[r] = exp_nonpositive(wq[r] - top[i]);
        }
        block_totals(w + q0 * R, z, n, R, total);
        for (i64 i = 0; i < n; ++i)
            normalize_softmax_row(w + (q0 + i) * R, qq ? qq + (q0 + i) * R : NULL, z, R, total[i]);
    }
}

#endif
