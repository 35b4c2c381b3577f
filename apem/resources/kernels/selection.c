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

/* counts[c] <- how many of the n rows keep point c of C: f_D(x) != 0, i.e. not x / gamma <= -1/2
 * (apem.nn.selection.deselected; a NaN keeps), for rows of C logits at row_stride. Inference orders the points a
 * batch keeps by it (apem.nn.native_pools.kept_points): in torch the boolean count over the batch took ~1 ms a
 * batch of 2048 (L' K = 256). */
void kept_counts(i64 n, i64 C, const float *logits, i64 row_stride, float gamma, i64 *counts) {
    for (i64 c = 0; c < C; ++c) counts[c] = 0;
    for (i64 r = 0; r < n; ++r) {
        const float *restrict x = logits + r * row_stride;
        for (i64 c = 0; c < C; ++c) counts[c] += !(x[c] / gamma <= -0.5f);
    }
}
