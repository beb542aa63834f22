/* 4-bit weights (kernels/int4.py): y (m, n) = x (m, k) . W (n, k)^T, x and y in bfloat16 or float32.

   W in blocks of 32 along k, as GGUF's Q4_1: w = d * q + mn, q in 0..15, d and mn in float16. The codes are kept
   in tiles of 8 output rows, so that one vector holds the 8 rows' sums and a block's scales are a vector too (no
   horizontal sums, no broadcast per row): tile T, block g is 128 bytes, 4 chunks c of 32 bytes; byte 4i + b of
   chunk c holds row 8T + i's element 32g + 4c + b in its low nibble and 32g + 16 + 4c + b in its high one. The
   scales, (tiles, blocks, 2, 8) float16: the 8 rows' d, then their mn.

   x is quantized to signed bytes per block of 32 (scale xs, and xsum = xs * the block's byte sum), so block g
   adds d * xs * (q . xq) + mn * xsum. The byte products run as unsigned codes times signed bytes, 4 a lane: with
   AVX-VNNI or AVX512-VNNI (vpdpbusd) one instruction a chunk, else vpmaddubsw (at most 2 * 15 * 127 a pair;
   the 8 pairs of a block at most 30480, no saturation in 16 bits) and one vpmaddwd a block. A tile's codes are
   unpacked once for up to 4 rows of x; OpenMP over tiles. (Two tiles at once in 512-bit vectors ran no faster on
   an AMD EPYC with AVX-512: 6.1 against 4.4 ms at one row, 57 against 71 at 64, before the two chains below.) The portable body is plain loops over the same layout. */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define QBLOCK 32
#define TILE 8
#define ROWS 4

/* Row r of x (bfloat16 or float32) quantized per block: xq (k), xs and xsum (k / 32). */
static void quantize_row(const void *x, int bf16, int8_t *xq, float *xs, float *xsum, int64_t k) {
    float v[QBLOCK];
    for (int64_t g = 0; g < k / QBLOCK; g++) {
        for (int t = 0; t < QBLOCK; t++)
            v[t] = bf16 ? bf16f(((const uint16_t *)x)[g * QBLOCK + t]) : ((const float *)x)[g * QBLOCK + t];
        float amax = 0.f;
        for (int t = 0; t < QBLOCK; t++) amax = fabsf(v[t]) > amax ? fabsf(v[t]) : amax;
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        int32_t sum = 0;
        for (int t = 0; t < QBLOCK; t++) {
            const int32_t q = (int32_t)nearbyintf(v[t] * inv);
            xq[g * QBLOCK + t] = (int8_t)q;
            sum += q;
        }
        xs[g] = amax / 127.f;
        xsum[g] = xs[g] * (float)sum;
    }
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
/* One block of a tile against one row's block of x: the 8 rows' int32 sums q . xq. */
static inline __m256i dot_tile(const __m256i w[8], const int8_t *xb) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) || defined(__AVXVNNI__)
    __m256i a = _mm256_setzero_si256(), b = _mm256_setzero_si256();  /* two chains: half the latency */
    for (int c = 0; c < 4; c++) {
        a = _mm256_dpbusd_epi32(a, w[c], _mm256_set1_epi32(*(const int32_t *)(xb + 4 * c)));
        b = _mm256_dpbusd_epi32(b, w[c + 4], _mm256_set1_epi32(*(const int32_t *)(xb + 16 + 4 * c)));
    }
    return _mm256_add_epi32(a, b);
#else
    __m256i acc = _mm256_setzero_si256();
    for (int c = 0; c < 4; c++) {
        acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(w[c], _mm256_set1_epi32(*(const int32_t *)(xb + 4 * c))));
        acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(w[c + 4],
                                                         _mm256_set1_epi32(*(const int32_t *)(xb + 16 + 4 * c))));
    }
    return _mm256_madd_epi16(acc, _mm256_set1_epi16(1));
#endif
}
#endif

static void tile_rows(const uint8_t *codes, const uint16_t *scales, const int8_t *xq, const float *xs,
                      const float *xsum, int64_t rn, int64_t nb, float out[ROWS][TILE]) {
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    __m256 acc[ROWS], mins[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = mins[r] = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int64_t g = 0; g < nb; g++) {
        const uint8_t *cb = codes + g * 128;
        __m256i w[8];
        for (int c = 0; c < 4; c++) {
            const __m256i b = _mm256_loadu_si256((const void *)(cb + 32 * c));
            w[c] = _mm256_and_si256(b, low);
            w[c + 4] = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const void *)(scales + g * 16)));
        const __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128((const void *)(scales + g * 16 + 8)));
        for (int64_t r = 0; r < rn; r++) {
            const __m256i p = dot_tile(w, xq + r * nb * QBLOCK + g * QBLOCK);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(d, _mm256_set1_ps(xs[r * nb + g])), acc[r]);
            mins[r] = _mm256_fmadd_ps(mn, _mm256_set1_ps(xsum[r * nb + g]), mins[r]);
        }
    }
    for (int64_t r = 0; r < rn; r++) _mm256_storeu_ps(out[r], _mm256_add_ps(acc[r], mins[r]));
#else
    float acc[ROWS][TILE] = {{0.f}};
    for (int64_t g = 0; g < nb; g++) {
        const uint8_t *cb = codes + g * 128;
        int16_t u[QBLOCK][TILE];  /* element e of the block for the 8 rows: loops the compiler vectorizes */
        for (int c = 0; c < 4; c++)
            for (int i = 0; i < TILE; i++)
                for (int b = 0; b < 4; b++) {
                    u[4 * c + b][i] = cb[32 * c + 4 * i + b] & 0x0F;
                    u[16 + 4 * c + b][i] = cb[32 * c + 4 * i + b] >> 4;
                }
        float d[TILE], mn[TILE];
        for (int i = 0; i < TILE; i++) d[i] = f16f(scales[g * 16 + i]), mn[i] = f16f(scales[g * 16 + 8 + i]);
        for (int64_t r = 0; r < rn; r++) {
            const int8_t *xb = xq + r * nb * QBLOCK + g * QBLOCK;
            int32_t dot[TILE] = {0};
            for (int e = 0; e < QBLOCK; e++)
                for (int i = 0; i < TILE; i++) dot[i] += (int32_t)u[e][i] * xb[e];
            const float sx = xs[r * nb + g], sm = xsum[r * nb + g];
            for (int i = 0; i < TILE; i++) acc[r][i] += d[i] * sx * (float)dot[i] + mn[i] * sm;
        }
    }
    for (int64_t r = 0; r < rn; r++)
        for (int i = 0; i < TILE; i++) out[r][i] = acc[r][i];
#endif
}

/* x (m, k), k a multiple of 32 -> y (m, n); codes and scales as above for n rounded up to tiles of 8.
   x_bf16, y_bf16: whether x and y are bfloat16 (else float32). Returns -1 if out of memory. */
int gemm_q4(const void *x, const uint8_t *codes, const uint16_t *scales, void *y, int64_t m, int64_t n, int64_t k,
            int64_t x_bf16, int64_t y_bf16) {
    const int64_t nb = k / QBLOCK, tiles = (n + TILE - 1) / TILE;
    int8_t *xq = malloc((size_t)(m * k));
    float *xs = malloc(sizeof(float) * (size_t)(m * nb)), *xsum = malloc(sizeof(float) * (size_t)(m * nb));
    if (!xq || !xs || !xsum) {
        free(xq), free(xs), free(xsum);
        return -1;
    }
    #pragma omp parallel
    {
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < m; r++)
            quantize_row((const char *)x + r * k * (x_bf16 ? 2 : 4), (int)x_bf16, xq + r * k, xs + r * nb,
                         xsum + r * nb, k);
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            for (int64_t r0 = 0; r0 < m; r0 += ROWS) {
                const int64_t rn = m - r0 < ROWS ? m - r0 : ROWS;
                float out[ROWS][TILE];
                tile_rows(codes + t * nb * 128, scales + t * nb * 16, xq + r0 * k, xs + r0 * nb, xsum + r0 * nb,
                          rn, nb, out);
                for (int64_t r = 0; r < rn; r++)
                    for (int64_t i = 0; i < TILE && t * TILE + i < n; i++) {
                        const int64_t at = (r0 + r) * n + t * TILE + i;
                        if (y_bf16)
                            ((uint16_t *)y)[at] = f2bf16(out[r][i]);
                        else
                            ((float *)y)[at] = out[r][i];
                    }
            }
        }
    }
    free(xq), free(xs), free(xsum);
    return 0;
}
