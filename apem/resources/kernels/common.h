/* Shared by the kernels in this folder (apem/nn/native.py builds them into one library). */
#ifndef APEM_KERNEL_COMMON_H
#define APEM_KERNEL_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>

typedef int64_t i64;

/* exp(x) for the softmax's x <= 0 (after the max is subtracted), Cephes' expf: a 2^n scale and a
 * degree-6 polynomial on |r| <= ln2 / 2, relative error ~1e-7; branch-free so that it vectorises. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* Eq. 13, f_D(x) = 0.5 + u (1.5 - 2 u^2) with u = clamp(x / gamma, -1/2, 1/2): the same operations, in the same
 * order, as apem.nn.selection.dynamic_activation, so that z is exactly 0 or 1 where it is there. */
static inline float dynamic_activation(float x, float gamma) {
    float u = x / gamma;
    u = u < -0.5f ? -0.5f : (u > 0.5f ? 0.5f : u);
    return 0.5f + u * (1.5f - 2.0f * u * u);
}

/* The AVX2 + FMA loops, unless APEM_GENERIC_KERNEL asks for the portable ones (which the tests compare). */
#if defined(__AVX2__) && defined(__FMA__) && !defined(APEM_GENERIC_KERNEL)
#define APEM_AVX2 1
#include <immintrin.h>

/* r[i] = the sum of the 8 lanes of v[i], for 8 vectors at once. */
static inline __m256 lane_sums8(const __m256 *v) {
    __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
    __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
    t0 = _mm256_hadd_ps(t0, t1);
    t1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

/* r[i] = the maximum of the 8 lanes of v[i], for 8 vectors at once: lane_sums8 with each pairwise add a max. */
static inline __m256 lane_max8(const __m256 *v) {
#define APEM_PAIR_MAX(a, b) _mm256_max_ps(_mm256_shuffle_ps(a, b, 0x88), _mm256_shuffle_ps(a, b, 0xDD))
    __m256 t0 = APEM_PAIR_MAX(v[0], v[1]), t1 = APEM_PAIR_MAX(v[2], v[3]);
    __m256 t2 = APEM_PAIR_MAX(v[4], v[5]), t3 = APEM_PAIR_MAX(v[6], v[7]);
    t0 = APEM_PAIR_MAX(t0, t1);
    t1 = APEM_PAIR_MAX(t2, t3);
#undef APEM_PAIR_MAX
    return _mm256_max_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

static inline float lane_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#else
#define APEM_AVX2 0
#endif

#endif
