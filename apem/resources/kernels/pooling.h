/* The forward pieces of eq. 14-17 shared by gathered_pool.c (training) and fused_predict.c (inference):
 * the softmax over a sample's S source rows, column by column, the pooling of the value rows by those
 * weights, and the LayerNorm before its affine. */
#ifndef APEM_KERNEL_POOLING_H
#define APEM_KERNEL_POOLING_H

#include "common.h"

/* A layer's inputs to the ASRG kernels (apem.nn.native_pools.PoolLayer mirrors this struct). */
typedef struct {
    i64 U, S, M, K, D;
    const float *score_table;  /* (U, M K) */
    const float *value_table;  /* (U, M D), bias / M included */
    const i64 *index;          /* (B, S) */
    const float *mask;         /* (B, K), row stride mask_stride */
    i64 mask_stride;
    const float *queries;      /* (K, D) */
    const float *norm_weight;  /* (D): eq. 17's LayerNorm */
    const float *norm_bias;    /* (D) */
    float eps;
} PoolLayer;

/* w (S, C) <- each column of w divided by its sum over s; uses inv (C). */
static inline void normalize_columns(float *restrict w, i64 S, i64 C, float *restrict inv) {
    for (i64 c = 0; c < C; ++c) inv[c] = 0.0f;
    for (i64 s = 0; s < S; ++s)
        for (i64 c = 0; c < C; ++c) inv[c] += w[s * C + c];
    for (i64 c = 0; c < C; ++c) inv[c] = 1.0f / inv[c];
    for (i64 s = 0; s < S; ++s) {
        float *restrict ws = w + s * C;
        for (i64 c = 0; c < C; ++c) ws[c] *= inv[c];
    }
}

/* w (S, C) <- the softmax over s of each column of w, given its column maxima mx (C); uses inv (C). */
static inline void softmax_columns(float *restrict w, i64 S, i64 C, const float *restrict mx, float *restrict inv) {
    for (i64 s = 0; s < S; ++s) {
        float *restrict ws = w + s * C;
        for (i64 c = 0; c < C; ++c) ws[c] = exp_nonpositive(ws[c] - mx[c]);
    }
    normalize_columns(w, S, C, inv);
}

/* w (S, M W) <- softmax over s of mask[k] * table[idx[s], (m, k)] for the first W <= K columns of each head of the
 * table (U, M K); uses mx, inv (M W each). */
static inline void row_softmax(const float *restrict table, const i64 *restrict idx, const float *restrict mask,
                               i64 S, i64 M, i64 K, i64 W, float *restrict w, float *restrict mx,
                               float *restrict inv) {
    const i64 MW = M * W;
    for (i64 c = 0; c < MW; ++c) mx[c] = -INFINITY;
    for (i64 s = 0; s < S; ++s) {
        const float *restrict t = table + idx[s] * M * K;
        float *restrict ws = w + s * MW;
        for (i64 m = 0; m < M; ++m)
            for (i64 k = 0; k < W; ++k) {
                float v = mask[k] * t[m * K + k];
                ws[m * W + k] = v;
                mx[m * W + k] = v > mx[m * W + k] ? v : mx[m * W + k];
            }
    }
    softmax_columns(w, S, MW, mx, inv);
}

#if APEM_AVX2
/* total (N vectors) <- the sums over the S rows `rows` of their N 8-float vectors from column c: N independent chains
 * in registers. N is a constant at each call. */
static inline __attribute__((always_inline)) void column_block_sums(const float *const *restrict rows, i64 S, i64 c,
                                                                   const int N, __m256 *restrict total) {
    for (int i = 0; i < N; ++i) total[i] = _mm256_setzero_ps();
    for (i64 s = 0; s < S; ++s)
        for (int i = 0; i < N; ++i) total[i] = _mm256_add_ps(total[i], _mm256_loadu_ps(rows[s] + c + 8 * i));
}
#endif

/* table_weights for a binary z: each column's sum over the S rows first (S where z = 0), then each weight read and
 * scaled once; written in one pass, where a copy, the sums and the scaling had each passed over w (~10% of the
 * inference kernel, half of it in stores). Uses inv and scale (M W each). Under AVX2 the rows' addresses are taken
 * once per field (they had been multiplied out per block of 8 columns), 4 blocks' sums run side by side, and each
 * weight is one product-sum (it had been a compare, a blend and a product): predict ~0.98x in A/B runs. */
static inline void binary_table_weights(const float *restrict exp_table, const i64 *restrict idx,
                                        const float *restrict z, i64 S, i64 M, i64 K, i64 W, float *restrict w,
                                        float *restrict inv, float *restrict scale) {
    const i64 MK = M * K, MW = M * W;
#if APEM_AVX2
    if (W % 8 == 0) {
        /* with z binary each weight is e z inv + (1 - z) inv, from scale = z inv and inv = (1 - z) inv: for z = 0
         * or 1 the same value as e, or 1, times inv */
        const float *rows[S];
        for (i64 s = 0; s < S; ++s) rows[s] = exp_table + idx[s] * MK;
        const __m256 ones = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps(), count = _mm256_set1_ps((float)S);
        for (i64 m = 0; m < M; ++m)
            for (i64 k = 0; k < W; k += 32) {
                __m256 total[4];
                const i64 n = W - k < 32 ? (W - k) / 8 : 4;
                switch (n) {
                case 1: column_block_sums(rows, S, m * K + k, 1, total); break;
                case 2: column_block_sums(rows, S, m * K + k, 2, total); break;
                case 3: column_block_sums(rows, S, m * K + k, 3, total); break;
                default: column_block_sums(rows, S, m * K + k, 4, total); break;
                }
                for (i64 i = 0; i < n; ++i) {
                    const __m256 zk = _mm256_loadu_ps(z + k + 8 * i);
                    const __m256 off = _mm256_cmp_ps(zk, zero, _CMP_EQ_OQ);
                    const __m256 r = _mm256_div_ps(ones, _mm256_blendv_ps(total[i], count, off));
                    _mm256_storeu_ps(scale + m * W + k + 8 * i, _mm256_mul_ps(zk, r));
                    _mm256_storeu_ps(inv + m * W + k + 8 * i, _mm256_mul_ps(_mm256_sub_ps(ones, zk), r));
                }
            }
        for (i64 s = 0; s < S; ++s)
            for (i64 m = 0; m < M; ++m)
                for (i64 k = 0; k < W; k += 8) {
                    const i64 c = m * W + k;
                    _mm256_storeu_ps(w + s * MW + c, _mm256_fmadd_ps(_mm256_loadu_ps(rows[s] + m * K + k),
                                                                     _mm256_loadu_ps(scale + c),
                                                                     _mm256_loadu_ps(inv + c)));
                }
        return;
    }
#endif
    (void)scale;
    for (i64 c = 0; c < MW; ++c) inv[c] = 0.0f;
    for (i64 s = 0; s < S; ++s)
        for (i64 m = 0; m < M; ++m)
            for (i64 k = 0; k < W; ++k) inv[m * W + k] += z[k] == 0.0f ? 1.0f : exp_table[idx[s] * MK + m * K + k];
    for (i64 c = 0; c < MW; ++c) inv[c] = 1.0f / inv[c];
    for (i64 s = 0; s < S; ++s)
        for (i64 m = 0; m < M; ++m)
            for (i64 k = 0; k < W; ++k)
                w[s * MW + m * W + k] = (z[k] == 0.0f ? 1.0f : exp_table[idx[s] * MK + m * K + k]) * inv[m * W + k];
}

/* row_softmax's weights from the exp table: a column with z = 1 weighs exp(score - its table maximum), the same
 * softmax once normalised; one with z = 0 weighs 1 (all-zero scores); the rare fractional z (gamma not
 * yet at its floor, `fractional` of them) takes its exps here. The first W of each head's K columns. */
static inline void table_weights(const PoolLayer *L, const float *restrict exp_table, const i64 *restrict idx,
                                 const float *restrict z, i64 fractional, i64 W, float *restrict w,
                                 float *restrict top, float *restrict inv) {
    const i64 S = L->S, M = L->M, K = L->K, MK = M * K, MW = M * W;
    if (fractional == 0) {
        binary_table_weights(exp_table, idx, z, S, M, K, W, w, inv, top);
        return;
    }
    for (i64 s = 0; s < S; ++s) {
        const float *restrict e = exp_table + idx[s] * MK;
        float *restrict ws = w + s * MW;
        for (i64 m = 0; m < M; ++m)
            for (i64 p = 0; p < W; ++p) ws[m * W + p] = z[p] == 0.0f ? 1.0f : e[m * K + p];
    }
    for (i64 p = 0; p < W && fractional > 0; ++p) {
        if (z[p] == 0.0f || z[p] == 1.0f) continue;
        --fractional;
        for (i64 m = 0; m < M; ++m) {
            const i64 c = m * W + p;
            top[c] = -INFINITY;
            for (i64 s = 0; s < S; ++s) {
                w[s * MW + c] = z[p] * L->score_table[idx[s] * MK + m * K + p];
                top[c] = w[s * MW + c] > top[c] ? w[s * MW + c] : top[c];
            }
            for (i64 s = 0; s < S; ++s) w[s * MW + c] = exp_nonpositive(w[s * MW + c] - top[c]);
        }
    }
    normalize_columns(w, S, MW, inv);
}

/* w (S, M W) <- the softmax weights of eq. 14-15 for a sample's fields idx and z_K, at the first W of the K points
 * (all K in training; inference computes a sample's points up to its last kept one): from exp_table (U, M K) (exps
 * of L's score table less its column maxima, or NULL) where z is binary or has a few fractional entries (at most
 * an eighth, each fixed up by table_weights): no exp per field; else through row_softmax. Uses mx, inv (M W
 * each). */
static inline void sample_weights(const PoolLayer *L, const float *restrict exp_table, const i64 *restrict idx,
                                  const float *restrict z, i64 W, float *restrict w, float *restrict mx,
                                  float *restrict inv) {
    i64 fractional = 0;
    if (exp_table)  /* one pass without branches: most samples have none */
        for (i64 k = 0; k < W; ++k) fractional += (z[k] != 0.0f) & (z[k] != 1.0f);
    if (exp_table && fractional * 8 <= W)
        table_weights(L, exp_table, idx, z, fractional, W, w, mx, inv);
    else
        row_softmax(L->score_table, idx, z, L->S, L->M, L->K, W, w, mx, inv);
}

/* Asks for the table rows idx[0..S) (row_floats floats each) to be brought into cache. */
static inline void prefetch_rows(const float *table, const i64 *idx, i64 S, i64 row_floats) {
    for (i64 s = 0; s < S; ++s) {
        const char *row = (const char *)(table + idx[s] * row_floats);
        for (i64 byte = 0; byte < row_floats * (i64)sizeof(float); byte += 64) __builtin_prefetch(row + byte);
    }
}

/* Asks for a sample's rows (its index row idx) of a (U, M K) score table (score_rows: L's score table, or a table
 * laid out as it, such as fused_predict's exps) and of L's value table: a sample's rows are scattered over tables
 * larger than L2, and nothing else can predict them, so each sample's loop asks for the next sample's rows
 * before it starts its own work. */
static inline void prefetch_sample(const PoolLayer *L, const float *score_rows, const i64 *idx) {
    prefetch_rows(score_rows, idx, L->S, L->M * L->K);
    prefetch_rows(L->value_table, idx, L->S, L->M * L->D);
}

/* a_t[c * ld_t + r] <- a[r * ld + c] for r < rows, c < cols: one strided element at a time. */
static inline void transpose_strided(const float *restrict a, i64 rows, i64 cols, i64 ld, float *restrict a_t,
                                     i64 ld_t) {
    for (i64 c = 0; c < cols; ++c)
        for (i64 r = 0; r < rows; ++r) a_t[c * ld_t + r] = a[r * ld + c];
}

#if APEM_AVX2
/* The 8 x 8 block at a (row stride ld) into a_t (row stride ld_t), in registers: element-wise, a strided
 * gather of 8 floats costs as much as the block (a sample's (K, D) gradient is 1152 such reads). */
static inline void transpose8x8(const float *restrict a, i64 ld, float *restrict a_t, i64 ld_t) {
    __m256 r[8], t[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(a + i * ld);
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(a_t + i * ld_t, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
        _mm256_storeu_ps(a_t + (i + 4) * ld_t, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
    }
}
#endif

/* a_t (cols, rows) <- a (rows, cols). */
static inline void transpose(const float *restrict a, i64 rows, i64 cols, float *restrict a_t) {
    i64 r8 = 0, c8 = 0;
#if APEM_AVX2
    r8 = rows - rows % 8;
    c8 = cols - cols % 8;
    for (i64 r = 0; r < r8; r += 8)
        for (i64 c = 0; c < c8; c += 8) transpose8x8(a + r * cols + c, cols, a_t + c * rows + r, rows);
#endif
    transpose_strided(a + c8, r8, cols - c8, cols, a_t + c8 * rows, rows);  /* the columns past the blocks */
    transpose_strided(a + r8 * cols, rows - r8, cols, cols, a_t + r8, rows);  /* the rows past the blocks */
}

/* x (D, C) <- x + z (.) qt, eq. 17's residual (qt (D, C) with row stride ldq, z (C); qt NULL: none), and then each
 * column of x less its mean over the D rows; rs (C) <- 1 / sqrt(var + eps): eq. 17's LayerNorm is then x rs, before
 * its affine; uses mean (C). Under AVX2, with C a multiple of 8, 8 columns at a time with their sums in registers:
 * the generic loops' sums live in mean and rs, a store and a load per row and column on each sum's chain, and they
 * pass over x three times (predict measured 0.94-0.96x in A/B runs). The same operations in the same order. */
static inline void residual_centre_columns(float *restrict x, const float *restrict z, const float *restrict qt,
                                           i64 ldq, i64 D, i64 C, float eps, float *restrict mean,
                                           float *restrict rs) {
#if APEM_AVX2
    if (C % 8 == 0) {
        const __m256 rows = _mm256_set1_ps((float)D), e = _mm256_set1_ps(eps), one = _mm256_set1_ps(1.0f);
        for (i64 c = 0; c < C; c += 8) {
            __m256 sum = _mm256_setzero_ps(), squares = _mm256_setzero_ps();
            if (qt) {
                const __m256 zc = _mm256_loadu_ps(z + c);
                for (i64 j = 0; j < D; ++j) {
                    const __m256 v = _mm256_fmadd_ps(_mm256_loadu_ps(qt + j * ldq + c), zc,
                                                     _mm256_loadu_ps(x + j * C + c));
                    _mm256_storeu_ps(x + j * C + c, v);
                    sum = _mm256_add_ps(sum, v);
                }
            } else {
                for (i64 j = 0; j < D; ++j) sum = _mm256_add_ps(sum, _mm256_loadu_ps(x + j * C + c));
            }
            const __m256 m = _mm256_div_ps(sum, rows);
            for (i64 j = 0; j < D; ++j) {
                const __m256 centred = _mm256_sub_ps(_mm256_loadu_ps(x + j * C + c), m);
                _mm256_storeu_ps(x + j * C + c, centred);
                squares = _mm256_fmadd_ps(centred, centred, squares);
            }
            _mm256_storeu_ps(mean + c, m);
            const __m256 variance = _mm256_div_ps(squares, rows);
            _mm256_storeu_ps(rs + c, _mm256_div_ps(one, _mm256_sqrt_ps(_mm256_add_ps(variance, e))));
        }
        return;
    }
#endif
    if (qt)
        for (i64 j = 0; j < D; ++j)
            for (i64 c = 0; c < C; ++c) x[j * C + c] += qt[j * ldq + c] * z[c];
    for (i64 c = 0; c < C; ++c) mean[c] = rs[c] = 0.0f;
    for (i64 j = 0; j < D; ++j)
        for (i64 c = 0; c < C; ++c) mean[c] += x[j * C + c];
    for (i64 c = 0; c < C; ++c) mean[c] /= (float)D;
    for (i64 j = 0; j < D; ++j)
        for (i64 c = 0; c < C; ++c) {
            const float centred = x[j * C + c] - mean[c];
            x[j * C + c] = centred;
            rs[c] += centred * centred;
        }
    for (i64 c = 0; c < C; ++c) rs[c] = 1.0f / sqrtf(rs[c] / (float)D + eps);
}

/* x (D, C) <- x + z (.) qt (residual_centre_columns' residual; qt NULL: none), each column then normalised over its
 * D rows, (x - mean) / sqrt(var + eps) (eq. 17's LayerNorm before its affine); rs (C) <- 1 / sqrt(var + eps); uses
 * mean (C). */
static inline void normalize_columns_over_rows(float *restrict x, const float *restrict z, const float *restrict qt,
                                               i64 ldq, i64 D, i64 C, float eps, float *restrict mean,
                                               float *restrict rs) {
    residual_centre_columns(x, z, qt, ldq, D, C, eps, mean, rs);
    for (i64 j = 0; j < D; ++j)
        for (i64 c = 0; c < C; ++c) x[j * C + c] *= rs[c];
}

/* x (D, C) <- x nw[j] + nb[j] on each row j: eq. 17's (and eq. 19's) LayerNorm affine, after
 * normalize_columns_over_rows. */
static inline void layer_norm_affine(float *restrict x, i64 D, i64 C, const float *restrict nw,
                                     const float *restrict nb) {
    for (i64 j = 0; j < D; ++j)
        for (i64 c = 0; c < C; ++c) x[j * C + c] = x[j * C + c] * nw[j] + nb[j];
}

/* The backward of normalize_columns_over_rows and then layer_norm_affine, for x (D, C): g (D, C), the gradient of the
 * affine's output, becomes that of x, rstd (g nw - mean_j(g nw) - xh mean_j(g nw xh)) per column with xh (D, C) the
 * normalised x and rstd (C) its 1 / sigma; the affine's gradients, g xh and g, are added into sum_nw and sum_nb
 * (D, C, summed over the columns by the caller); uses m1 and m2 (C). */
static inline void layer_norm_backward(float *restrict g, const float *restrict xh, const float *restrict rstd,
                                       const float *restrict nw, i64 D, i64 C, float *restrict sum_nw,
                                       float *restrict sum_nb, float *restrict m1, float *restrict m2) {
#if APEM_AVX2
    if (C % 8 == 0) {  /* as residual_centre_columns: 8 columns at a time, the two means in registers (training
                        * ~0.96-0.975x in A/B runs), the same operations in the same order */
        const __m256 rows = _mm256_set1_ps((float)D);
        for (i64 c = 0; c < C; c += 8) {
            __m256 s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps();
            for (i64 j = 0; j < D; ++j) {
                const i64 at = j * C + c;
                const __m256 gy = _mm256_loadu_ps(g + at), x = _mm256_loadu_ps(xh + at);
                const __m256 gx = _mm256_mul_ps(gy, _mm256_set1_ps(nw[j]));
                _mm256_storeu_ps(sum_nw + at, _mm256_fmadd_ps(gy, x, _mm256_loadu_ps(sum_nw + at)));
                _mm256_storeu_ps(sum_nb + at, _mm256_add_ps(_mm256_loadu_ps(sum_nb + at), gy));
                _mm256_storeu_ps(g + at, gx);
                s1 = _mm256_add_ps(s1, gx);
                s2 = _mm256_fmadd_ps(gx, x, s2);
            }
            s1 = _mm256_div_ps(s1, rows);
            s2 = _mm256_div_ps(s2, rows);
            const __m256 r = _mm256_loadu_ps(rstd + c);
            for (i64 j = 0; j < D; ++j) {
                const i64 at = j * C + c;
                const __m256 centred = _mm256_sub_ps(_mm256_loadu_ps(g + at), s1);
                _mm256_storeu_ps(g + at, _mm256_mul_ps(r, _mm256_fnmadd_ps(_mm256_loadu_ps(xh + at), s2, centred)));
            }
        }
        return;
    }
#endif
    for (i64 c = 0; c < C; ++c) m1[c] = m2[c] = 0.0f;
    for (i64 j = 0; j < D; ++j)
        for (i64 c = 0; c < C; ++c) {
            const float gy = g[j * C + c], gx = gy * nw[j];
            sum_nw[j * C + c] += gy * xh[j * C + c];
            sum_nb[j * C + c] += gy;
            g[j * C + c] = gx;
            m1[c] += gx;
            m2[c] += gx * xh[j * C + c];
        }
    for (i64 c = 0; c < C; ++c) {
        m1[c] /= (float)D;
        m2[c] /= (float)D;
    }
    for (i64 j = 0; j < D; ++j)
        for (i64 c = 0; c < C; ++c) g[j * C + c] = rstd[c] * (g[j * C + c] - m1[c] - xh[j * C + c] * m2[c]);
}

/* acc (D, K) <- sum_{s, m} value_table[idx[s], m, j] w[s, m, k]: the pooled rows O, transposed so that
 * the inner loops run over the K points. */
static inline void pool_row_generic(const float *restrict value_table, const i64 *restrict idx, const float *restrict w,
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

#if APEM_AVX2
#define POOL_BLOCK 6 /* output columns per register block: 6 broadcasts, each feeding NC weight vectors */

/* One (POOL_BLOCK columns j0.., NC * 8 points kc..) block of pool_row: NC * POOL_BLOCK accumulators in registers,
 * over the S M value rows `rows`; NC is a constant at each call, so that the loops unroll. */
static inline __attribute__((always_inline)) void pool_block(const float *const *restrict rows, const float *restrict w,
                                                             i64 SM, i64 K, i64 kc, i64 j0, const int NC,
                                                             float *restrict acc) {
    __m256 a[2][POOL_BLOCK];
    for (int c = 0; c < NC; ++c)
        for (int jj = 0; jj < POOL_BLOCK; ++jj) a[c][jj] = _mm256_setzero_ps();
    for (i64 r = 0; r < SM; ++r) {
        const float *restrict v = rows[r] + j0;
        __m256 wv[2];
        for (int c = 0; c < NC; ++c) wv[c] = _mm256_loadu_ps(w + r * K + kc + 8 * c);
        for (int jj = 0; jj < POOL_BLOCK; ++jj) {
            const __m256 vb = _mm256_broadcast_ss(v + jj);
            for (int c = 0; c < NC; ++c) a[c][jj] = _mm256_fmadd_ps(vb, wv[c], a[c][jj]);
        }
    }
    for (int c = 0; c < NC; ++c)
        for (int jj = 0; jj < POOL_BLOCK; ++jj) _mm256_storeu_ps(acc + (j0 + jj) * K + kc + 8 * c, a[c][jj]);
}

/* pool_row_generic with the accumulators in registers (the generic loop stores every partial sum): blocks of
 * 6 columns by 16 points, 12 independent accumulators, each broadcast value feeding two of them. */
static inline void pool_row(const float *restrict value_table, const i64 *restrict idx, const float *restrict w,
                            i64 S, i64 M, i64 K, i64 D, float *restrict acc) {
    if (K % 8) {
        pool_row_generic(value_table, idx, w, S, M, K, D, acc);
        return;
    }
    const i64 SM = S * M;
    const float *rows[SM];  /* the sample's value rows, (field, head) order as the weights */
    for (i64 s = 0; s < S; ++s)
        for (i64 m = 0; m < M; ++m) rows[s * M + m] = value_table + (idx[s] * M + m) * D;
    i64 j0 = 0;
    for (; j0 + POOL_BLOCK <= D; j0 += POOL_BLOCK) {
        i64 kc = 0;
        for (; kc + 16 <= K; kc += 16) pool_block(rows, w, SM, K, kc, j0, 2, acc);
        if (kc < K) pool_block(rows, w, SM, K, kc, j0, 1, acc);
    }
    for (; j0 < D; ++j0)
        for (i64 kc = 0; kc < K; kc += 8) {
            __m256 a = _mm256_setzero_ps();
            for (i64 r = 0; r < SM; ++r)
                a = _mm256_fmadd_ps(_mm256_broadcast_ss(rows[r] + j0), _mm256_loadu_ps(w + r * K + kc), a);
            _mm256_storeu_ps(acc + j0 * K + kc, a);
        }
}

#else
#define pool_row pool_row_generic
#endif

#endif
