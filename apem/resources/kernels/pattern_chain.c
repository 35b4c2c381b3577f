/* Eq. 19's chain of LayerNorms per sample, forward and backward (apem.nn.attention.PatternSelector.chain is the
 * reference): T = LayerNorm_1(F^1), then T = LayerNorm_l(T + F^l) for the layers after it, over the task parts
 * F (L, B, N, D), to T^L (B, N, D); at inference also from eq. 18's pooled rows, eq. 16's W^V W^O per task taken on
 * the way (pattern_chain_pooled). On (B, N, 18) tensors torch spends most of the chain in per-op overhead: its
 * LayerNorm backward measured ~0.5 ms a layer at batch 1024 in a training step. Built and loaded by
 * apem/nn/native.py and called by apem/nn/native_pools.py; tests/nn/test_native_pool.py keeps both directions equal
 * to the reference. Each call splits the batch into `threads` row ranges run by OpenMP (see gathered_pool.c).
 */
/* 8-lane vectors, as in fused_predict.c: the forward's loops run over blocks of rows (chain_rows), the backward's
 * over one row's D = 18 entries (the backward over (D, 8) blocks of rows measured 2-4% slower in training A/B runs,
 * its transposes and per-layer sums outweighing the vectorised reductions). */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("prefer-vector-width=256")
#endif

#include <math.h>
#include <stdint.h>
#include <omp.h>
#include <string.h>

#include "common.h"
#include "pooling.h"

/* Rows [first, first + C) of the B N rows, C <= 32, as the columns of one (D, C) block through every layer, so that the
 * LayerNorm's sums run across the rows, 8 lanes wide, instead of over one row's D entries one after another
 * (predict A/B 0.91-0.97: eq. 19's chain had been ~5% of APEM's predict). 32 rows rather than 8: with one vector per
 * row of the block, each of the LayerNorm's sums over the D rows was a chain of dependent adds (chain at batch 2048,
 * 4 layers, 3 tasks: 0.30 ms against 0.63 ms with 8 rows, 0.39 ms with 16). */
#define CHAIN_BLOCK 32

/* Layer l's task parts for rows [first, first + C) as a (D, C) block f, from eq. 18's pooled rows (L, B N, H), each
 * task's heads side by side (H = M D): F = pooled combined + bias, eq. 16's W^V W^O per task (combined (H, D) and
 * bias (D), the layer's). The rows are transposed into p_t (H, C) first, so that the products run across the rows,
 * 16 at a time (torch's batched product over the (L, B N, H) rows before the chain had cost ~4% of APEM's predict;
 * with it here, predict measured 0.95-0.96x in A/B runs). */
static void pooled_parts(const float *restrict rows, i64 C, i64 H, i64 D, const float *restrict combined,
                         const float *restrict bias, float *restrict p_t, float *restrict f) {
#if APEM_AVX2
    if (C % 16 == 0 && D >= 6) {
        transpose(rows, C, H, p_t);
        for (i64 j0 = 0; j0 < D; j0 += 6) {
            const i64 j = j0 + 6 <= D ? j0 : D - 6;  /* past the last 6: the last 6 again, overlapping */
            for (i64 c = 0; c < C; c += 16) {  /* 16 rows: each broadcast feeds two products */
                __m256 a[6], b[6];
                for (int jj = 0; jj < 6; ++jj) a[jj] = b[jj] = _mm256_set1_ps(bias[j + jj]);
                for (i64 i = 0; i < H; ++i) {
                    const __m256 p = _mm256_loadu_ps(p_t + i * C + c), q = _mm256_loadu_ps(p_t + i * C + c + 8);
                    for (int jj = 0; jj < 6; ++jj) {
                        const __m256 w = _mm256_broadcast_ss(combined + i * D + j + jj);
                        a[jj] = _mm256_fmadd_ps(w, p, a[jj]);
                        b[jj] = _mm256_fmadd_ps(w, q, b[jj]);
                    }
                }
                for (int jj = 0; jj < 6; ++jj) {
                    _mm256_storeu_ps(f + (j + jj) * C + c, a[jj]);
                    _mm256_storeu_ps(f + (j + jj) * C + c + 8, b[jj]);
                }
            }
        }
        return;
    }
#endif
    (void)p_t;
    for (i64 j = 0; j < D; ++j)
        for (i64 c = 0; c < C; ++c) f[j * C + c] = bias[j];
    for (i64 i = 0; i < H; ++i)
        for (i64 j = 0; j < D; ++j)
            for (i64 c = 0; c < C; ++c) f[j * C + c] += combined[i * D + j] * rows[c * H + i];
}

/* The chain of rows [first, first + C) through every layer, from parts (L, B N, D), or, with combined, from pooled
 * rows (parts then being (L, B N, H), see pooled_parts; f and p_t its scratch). */
static inline __attribute__((always_inline)) void chain_rows(
    i64 L, i64 BN, i64 D, i64 first, i64 C, const float *restrict parts, i64 H, const float *restrict combined,
    const float *restrict bias, const float *restrict norm_weight, const float *restrict norm_bias, float eps,
    float *restrict out, float *restrict xhat, float *restrict rstd, float *restrict t, float *restrict mean,
    float *restrict rs, float *restrict f, float *restrict p_t) {
    for (i64 l = 0; l < L; ++l) {
        if (combined) {
            pooled_parts(parts + (l * BN + first) * H, C, H, D, combined + l * H * D, bias + l * D, p_t, f);
            for (i64 k = 0; k < D * C; ++k) t[k] = l ? t[k] + f[k] : f[k];
        } else {
            const float *restrict fl = parts + (l * BN + first) * D;
            for (i64 c = 0; c < C; ++c)
                for (i64 j = 0; j < D; ++j) t[j * C + c] = l ? t[j * C + c] + fl[c * D + j] : fl[c * D + j];
        }
        normalize_columns_over_rows(t, NULL, NULL, 0, D, C, eps, mean, rs);
        if (xhat) {
            for (i64 c = 0; c < C; ++c) {
                for (i64 j = 0; j < D; ++j) xhat[(l * BN + first + c) * D + j] = t[j * C + c];
                rstd[l * BN + first + c] = rs[c];
            }
        }
        layer_norm_affine(t, D, C, norm_weight + l * D, norm_bias + l * D);
    }
    for (i64 c = 0; c < C; ++c)
        for (i64 j = 0; j < D; ++j) out[(first + c) * D + j] = t[j * C + c];
}

/* The chain over the B N rows in blocks of CHAIN_BLOCK, on `threads` OpenMP threads: from parts (L, B, N, D), or,
 * with combined, from pooled rows (L, B, N, H) (chain_rows). */
static void chain_blocks(i64 L, i64 B, i64 N, i64 D, const float *parts, i64 H, const float *combined,
                         const float *bias, const float *norm_weight, const float *norm_bias, float eps, i64 threads,
                         float *out, float *xhat, float *rstd) {
    const i64 BN = B * N, blocks = (BN + CHAIN_BLOCK - 1) / CHAIN_BLOCK;
#pragma omp parallel num_threads(threads)
    {
        float t[D * CHAIN_BLOCK], mean[CHAIN_BLOCK], rs[CHAIN_BLOCK], f[D * CHAIN_BLOCK], p_t[H * CHAIN_BLOCK];
#pragma omp for schedule(static)
        for (i64 block = 0; block < blocks; ++block) {
            const i64 first = block * CHAIN_BLOCK, C = BN - first < CHAIN_BLOCK ? BN - first : CHAIN_BLOCK;
            if (C == CHAIN_BLOCK)  /* a constant block width, so that the loops over it unroll */
                chain_rows(L, BN, D, first, CHAIN_BLOCK, parts, H, combined, bias, norm_weight, norm_bias, eps, out,
                           xhat, rstd, t, mean, rs, f, p_t);
            else
                chain_rows(L, BN, D, first, C, parts, H, combined, bias, norm_weight, norm_bias, eps, out, xhat, rstd,
                           t, mean, rs, f, p_t);
        }
    }
}

/* out (B, N, D) <- T^L from parts F (L, B, N, D); norm_weight and norm_bias are (L, D). With xhat (L, B, N, D) and
 * rstd (L, B, N) (both NULL at inference), also each layer's normalised rows and 1 / sigma, for
 * pattern_chain_backward. */
void pattern_chain(i64 L, i64 B, i64 N, i64 D, const float *parts, const float *norm_weight, const float *norm_bias,
                   float eps, i64 threads, float *out, float *xhat, float *rstd) {
    chain_blocks(L, B, N, D, parts, 1, NULL, NULL, norm_weight, norm_bias, eps, threads, out, xhat, rstd);
}

/* Inference: out (B, N, D) <- T^L from eq. 18's pooled rows (L, B, N, H) (row_attention_pool's output, each task's
 * H = M D heads side by side), each layer's parts F^l = pooled combined[l] + bias[l] taken per block of rows
 * (pooled_parts; combined (L, H, D), bias (L, D)) on their way into the chain. */
void pattern_chain_pooled(i64 L, i64 B, i64 N, i64 D, i64 H, const float *pooled, const float *combined,
                          const float *bias, const float *norm_weight, const float *norm_bias, float eps, i64 threads,
                          float *out) {
    chain_blocks(L, B, N, D, pooled, H, combined, bias, norm_weight, norm_bias, eps, threads, out, NULL, NULL);
}

/* Each thread's slot of the norm's gradients: weight and bias, (L, D) each. */
i64 pattern_chain_slot_floats(i64 L, i64 D) { return 2 * L * D; }

/* grad_parts (L, B, N, D) <- the gradient of the parts from grad_out (B, N, D), given pattern_chain's xhat and rstd.
 * Per sample, from the last layer down, with g the gradient of T^l: the LayerNorm's backward (layer_norm_backward)
 * gives the gradient of T^{l-1} + F^l, so of F^l and (through the residual) of T^{l-1}. Thread t adds its samples' weight and bias gradients into
 * slots + t * pattern_chain_slot_floats(L, D), which the caller zeroes beforehand and sums afterwards. */
void pattern_chain_backward(i64 L, i64 B, i64 N, i64 D, const float *norm_weight, const float *xhat,
                            const float *rstd, const float *grad_out, i64 threads, float *grad_parts, float *slots) {
#pragma omp parallel num_threads(threads)
    {
        const i64 t = omp_get_thread_num(), n_threads = omp_get_num_threads();
        float *restrict grad_weight = slots + t * pattern_chain_slot_floats(L, D), *restrict grad_bias = grad_weight + L * D;
        float g[D];
        for (i64 b = B * t / n_threads; b < B * (t + 1) / n_threads; ++b)
            for (i64 n = 0; n < N; ++n) {
                memcpy(g, grad_out + (b * N + n) * D, sizeof(float) * D);
                for (i64 l = L - 1; l >= 0; --l) {
                    const i64 row = (l * B + b) * N + n;
                    float m1, m2;
                    layer_norm_backward(g, xhat + row * D, rstd + row, norm_weight + l * D, D, 1,  /* one column */
                                        grad_weight + l * D, grad_bias + l * D, &m1, &m2);
                    memcpy(grad_parts + row * D, g, sizeof(float) * D);
                }
            }
    }
}
