/* bfloat16 <-> float32 for the CPU kernels (a bfloat16 is the top half of a float32), float16 <-> float32, and
   what the two decode attention kernels share: a vector 2^x, a 16-way transposed sum, a lane mask, BY_COUNT. */
#ifndef LMCLI_BF16_H
#define LMCLI_BF16_H
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf16f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

static inline uint16_t f2bf16(float f) {  /* round to nearest even; inf and nan truncated (no branch: vectorizes) */
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t rounded = u + 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(((u & 0x7F800000u) == 0x7F800000u ? u : rounded) >> 16);
}

static inline float f16f(uint16_t h) {  /* IEEE half -> float, any compiler */
    const uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    uint32_t u;
    if (e == 0) {
        float f = (float)m * (1.0f / 16777216.0f);  /* zero or subnormal: m * 2^-24 */
        memcpy(&u, &f, 4);
        u |= s;
    } else if (e == 31) {
        u = s | 0x7F800000u | (m << 13);
    } else {
        u = s | ((e + 112) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* call(G) with G the constant equal to count (1..8; more: 8), so that G-sized loops unroll into registers */
#define BY_COUNT(count, call) switch (count) { case 1: call(1); break; case 2: call(2); break; \
    case 3: call(3); break; case 4: call(4); break; case 5: call(5); break; case 6: call(6); break; \
    case 7: call(7); break; default: call(8); break; }

static inline uint16_t f2f16(float f) {  /* float -> IEEE half, round to nearest even (finite values) */
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    u &= 0x7FFFFFFFu;
    if (u >= 0x477FF000u) return sign | 0x7C00u;  /* 65520 and up: infinity */
    if (u < 0x38800000u) {  /* below 2^-14: a subnormal half, m * 2^-24 */
        float a;
        memcpy(&a, &u, 4);
        return sign | (uint16_t)rintf(a * 16777216.0f);
    }
    uint32_t h = (u - 0x38000000u) >> 13;  /* the exponent rebiased, the mantissa's top 10 bits */
    const uint32_t rest = u & 0x1FFFu;
    h += rest > 0x1000u || (rest == 0x1000u && (h & 1u));
    return sign | (uint16_t)h;
}

#ifdef __AVX2__
#include <immintrin.h>
static inline __m256 load8_bf16(const uint16_t *p) {  /* 8 bfloat16 -> 8 float32 */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const void *)p)), 16));
}

static inline float hsum8(__m256 v) {
    const __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
}

static inline int32_t hsum8_epi32(__m256i v) {
    const __m128i a = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    const __m128i b = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(b, _mm_shuffle_epi32(b, 0xB1)));
}
#endif

#ifdef __AVX512F__
static inline __m512 exp2v(__m512 x) {  /* 2^x (x >= -127): a degree-5 polynomial on the fraction, scaled */
    x = _mm512_max_ps(x, _mm512_set1_ps(-127.f));
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(1.3333558e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* Lane 4k + j of the result is the sum of v[4j + k]'s lanes (a 4x4 transpose of the order: callers place key i
   in slot SLOT(i), so that lane i holds key i). About 45 instructions for 16 sums instead of about 130. */
#define SLOT(i) ((((i) & 3) << 2) | ((i) >> 2))
static inline __m512 hsum16(const __m512 *v) {
    __m512 t[8], u[4], w[2];
    for (int i = 0; i < 8; i++)
        t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; i++)
        u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++)
        w[i] = _mm512_add_ps(_mm512_unpacklo_ps(u[2 * i], u[2 * i + 1]), _mm512_unpackhi_ps(u[2 * i], u[2 * i + 1]));
    const __m512d a = _mm512_castps_pd(w[0]), b = _mm512_castps_pd(w[1]);
    return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
}

static inline __mmask16 first_lanes(int64_t n) {  /* lanes 0..n-1 of 16 */
    return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
}

static inline __m512 widen_bf16(__m256i h) {  /* 16 bfloat16 -> float32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __m512 load16(const uint16_t *p) {  /* 16 bfloat16 -> 16 float32 */
    return widen_bf16(_mm256_loadu_si256((const void *)p));
}

/* 16 float32 -> 16 bfloat16, rounded to nearest even as f2bf16 (with AVX512-BF16 one instruction, which keeps a
   nan a nan where f2bf16 truncates it, and flushes float32 subnormals to zero) */
static inline __m256i round16(__m512 v) {
#ifdef __AVX512BF16__
    return (__m256i)_mm512_cvtneps_pbh(v);
#else
    const __m512i u = _mm512_castps_si512(v), one = _mm512_set1_epi32(1), exp = _mm512_set1_epi32(0x7F800000);
    const __m512i up = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                                            _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
    const __mmask16 special = _mm512_cmpeq_epi32_mask(_mm512_and_si512(u, exp), exp);
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_mask_mov_epi32(up, special, u), 16));
#endif
}


static inline void store16(uint16_t *p, __m512 v) { _mm256_storeu_si256((void *)p, round16(v)); }

static inline __m512 bf16_round(__m512 v) { return widen_bf16(round16(v)); }  /* v rounded to bfloat16 */

static inline __m512 widen16(const int8_t *p) {  /* 16 signed bytes -> 16 float32 */
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const void *)p)));
}

/* acc[g][j:j+16C] += p[g * stride + l] * v[l][j:j+16C] over the n value rows at v (bfloat16, or signed bytes where
   bytes is 1): G * C accumulators in registers, each value row widened once for the group (G <= 6 with C = 4,
   G <= 8 with C = 2) */
static inline __attribute__((always_inline)) void pv16(const float *p, int64_t stride, const void *v, const int bytes,
                                                       int64_t n, int64_t dim, int64_t j, const int G, const int C,
                                                       float *acc) {
    __m512 a[8][4];
    for (int g = 0; g < G; g++)
        for (int c = 0; c < C; c++) a[g][c] = _mm512_loadu_ps(acc + g * dim + j + 16 * c);
    for (int64_t l = 0; l < n; l++) {
        __m512 vv[4];
        for (int c = 0; c < C; c++)
            vv[c] = bytes == 1 ? widen16((const int8_t *)v + l * dim + j + 16 * c)
                               : load16((const uint16_t *)v + l * dim + j + 16 * c);
        for (int g = 0; g < G; g++) {
            const __m512 pg = _mm512_set1_ps(p[g * stride + l]);
            for (int c = 0; c < C; c++) a[g][c] = _mm512_fmadd_ps(pg, vv[c], a[g][c]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int c = 0; c < C; c++) _mm512_storeu_ps(acc + g * dim + j + 16 * c, a[g][c]);
}

/* The online softmax's running maximum of one head raised to include top (base 2): what was summed so far (sum and
   the dim accumulators) is rescaled. Returns the new maximum. */
static inline float raise_max(float top, float *mx, float *sum, float *acc, int64_t dim) {
    const float m = top > *mx ? top : *mx;
    if (m > *mx) {
        const __m512 r = exp2v(_mm512_set1_ps(*mx - m));
        *sum *= _mm512_cvtss_f32(r);
        for (int64_t d = 0; d < dim; d += 16) _mm512_storeu_ps(acc + d, _mm512_mul_ps(_mm512_loadu_ps(acc + d), r));
        *mx = m;
    }
    return m;
}
#endif
#endif
