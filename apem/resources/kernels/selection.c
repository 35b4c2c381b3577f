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
