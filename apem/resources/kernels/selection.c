/* Eq. 13's dynamic activation f_D over a tensor, forward and backward, in one pass each: in torch its seven
 * elementwise ops and their backward each went over the (B, L K) selector logits (1 MB at batch 1024, Table 2's
 * sizes), ~3 ms a training step. apem.nn.selection.dynamic_activation is the reference; built and loaded by
 * apem/nn/native.py and called by apem/nn/native_pools.py (native_dynamic_activation), tests/nn/test_native_pool.py
 * keeps the two equal. */
#include <stdint.h>
#include <omp.h>

#include "common.h"

/* out[i] <- f_D(x[i]) for i < n. */
void dynamic_activation_forward(i64 n, const float *x, float gamma, i64 threads, float *out) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (i64 i = 0; i < n; ++i) out[i] = dynamic_activation(x[i], gamma);
}

/* grad_x[i] <- grad[i] f_D'(x[i]) = grad[i] (3/2 - 6 u^2) / gamma with u = x[i] / gamma inside [-1/2, 1/2] (where
 * the clamp passes, its ends included, as torch's clamp does; 3/2 - 6 u^2 is 0 there anyway), else 0 (a NaN too). */
void dynamic_activation_backward(i64 n, const float *x, float gamma, const float *grad, i64 threads, float *grad_x) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (i64 i = 0; i < n; ++i) {
        const float u = x[i] / gamma;
        grad_x[i] = u >= -0.5f && u <= 0.5f ? grad[i] * (1.5f - 6.0f * u * u) / gamma : 0.0f;
    }
}

/* For each of the L layers of K points, over n rows of L K logits at row_stride: counts (L, K) <- how many rows keep
 * each point (f_D(x) != 0, i.e. not x / gamma <= -1/2, apem.nn.selection.deselected; a NaN keeps), order (L, K) <- the
 * points by that count, most first, ties in point order (a stable sort), kept (L) <- how many points some row keeps
 * (the first kept[l] of order[l]) and most (L) <- the most points one row keeps (kept[l] where some row keeps them
 * all). Inference computes those points, in that order (apem.nn.native_pools.kept_points): in torch the boolean
 * count over the batch took ~1 ms a batch of 2048 (L K = 256), and the per-layer count, sort and check ~0.4 ms
 * more. */
void kept_order(i64 n, i64 L, i64 K, const float *logits, i64 row_stride, float gamma, i64 *counts, i64 *order,
                i64 *kept, i64 *most) {
    for (i64 c = 0; c < L * K; ++c) counts[c] = 0;
    for (i64 l = 0; l < L; ++l) most[l] = 0;
    for (i64 r = 0; r < n; ++r)
        for (i64 l = 0; l < L; ++l) {
            const float *restrict x = logits + r * row_stride + l * K;
            i64 *restrict count = counts + l * K, row_keeps = 0;
            for (i64 k = 0; k < K; ++k) {
                const i64 keep = !(x[k] / gamma <= -0.5f);
                count[k] += keep;
                row_keeps += keep;
            }
            most[l] = row_keeps > most[l] ? row_keeps : most[l];
        }
    for (i64 l = 0; l < L; ++l) {
        const i64 *restrict count = counts + l * K;
        i64 *restrict sorted = order + l * K;
        kept[l] = 0;
        for (i64 k = 0; k < K; ++k) {  /* insertion sort: after the points before k with a count >= k's */
            i64 at = k;
            while (at > 0 && count[sorted[at - 1]] < count[k]) {
                sorted[at] = sorted[at - 1];
                --at;
            }
            sorted[at] = k;
            kept[l] += count[k] > 0;
        }
    }
}
