/* The weights of cpu/blocks.c back to rows, for products of many rows of x: there torch's GEMM on the widened
   weight (oneDNN's bfloat16 or float32 blocking) beats the byte products, which quantize x per block and redo a
   tile's unpacking for every 4 rows (kernels.quantized_linear picks by row count).

   w (n, k) row-major, bfloat16 (w_bf16) or float32: 4-bit (bits 4) w = d * q + mn, 8-bit (bits 8) w = ws * (u - 128),
   codes and scales as cpu/blocks.c lays them out. OpenMP over tiles of 8 rows; each block of a tile is gathered
   into 8 rows of 32 floats, then stored (bfloat16: rounded to nearest even). */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <stdint.h>

#include "bf16.h"

#define QBLOCK 32
#define TILE 8

#if defined(__AVX512F__) || defined(__AVX2__) && defined(__FMA__)
#define VECTOR 1
/* 16 unsigned bytes u -> d * u + mn, stored at w + at (16 bfloat16, rounded to nearest even, or 16 float32) */
#ifdef __AVX512F__
static inline void emit16(__m128i u, float d, float mn, void *w, int64_t at, int64_t w_bf16) {
    const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(u));
    const __m512 v = _mm512_fmadd_ps(q, _mm512_set1_ps(d), _mm512_set1_ps(mn));
    if (!w_bf16) {
        _mm512_storeu_ps((float *)w + at, v);
        return;
    }
    const __m512i b = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
    _mm256_storeu_si256((__m256i *)((uint16_t *)w + at), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}
#else
static inline __m256i round_bf16(__m256 v) {  /* 8 float32 -> their bfloat16 in the low half of each 32-bit lane */
    const __m256i b = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd));
    return _mm256_srli_epi32(r, 16);
}

static inline void emit16(__m128i u, float d, float mn, void *w, int64_t at, int64_t w_bf16) {
    const __m256 dv = _mm256_set1_ps(d), mv = _mm256_set1_ps(mn);
    const __m256 a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(u)), dv, mv);
    const __m256 b = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(u, 8))), dv, mv);
    if (!w_bf16) {
        _mm256_storeu_ps((float *)w + at, a);
        _mm256_storeu_ps((float *)w + at + 8, b);
        return;
    }
    const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(round_bf16(a), round_bf16(b)), 0xD8);
    _mm256_storeu_si256((__m256i *)((uint16_t *)w + at), p);
}
#endif

/* row i's bytes 4i..4i+3 of 4 chunks of 32 bytes at b */
static inline __m128i row_bytes(const uint8_t *b, int i) {
    return _mm_setr_epi32(*(const int32_t *)(b + 4 * i), *(const int32_t *)(b + 32 + 4 * i),
                          *(const int32_t *)(b + 64 + 4 * i), *(const int32_t *)(b + 96 + 4 * i));
}
#else
#define VECTOR 0
#endif

static inline void store_row(const float *v, void *w, int64_t at, int64_t w_bf16) {
    if (w_bf16) {
        uint16_t *o = (uint16_t *)w + at;
        for (int e = 0; e < QBLOCK; e++) o[e] = f2bf16(v[e]);
    } else {
        float *o = (float *)w + at;
        for (int e = 0; e < QBLOCK; e++) o[e] = v[e];
    }
}

int dequantize_blocks(const uint8_t *codes, const void *scales, void *w, int64_t bits, int64_t n, int64_t k,
                      int64_t w_bf16) {
    if (bits != 4 && bits != 8) return -1;
    const int64_t nb = k / QBLOCK, tiles = (n + TILE - 1) / TILE, bytes = bits == 4 ? 128 : 256;
    #pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        for (int64_t g = 0; g < nb; g++) {
            const uint8_t *b = codes + (t * nb + g) * bytes;
#if VECTOR
            const int rows = n - t * TILE < TILE ? (int)(n - t * TILE) : TILE;
            for (int i = 0; i < rows; i++) {
                const int64_t at = (t * TILE + i) * k + g * QBLOCK;
                if (bits == 4) {
                    const uint16_t *s = (const uint16_t *)scales + (t * nb + g) * 2 * TILE;
                    const float d = f16f(s[i]), mn = f16f(s[TILE + i]);
                    const __m128i u = row_bytes(b, i), low = _mm_set1_epi8(0x0F);
                    emit16(_mm_and_si128(u, low), d, mn, w, at, w_bf16);
                    emit16(_mm_and_si128(_mm_srli_epi16(u, 4), low), d, mn, w, at + 16, w_bf16);
                } else {
                    const float ws = ((const float *)scales)[t * TILE + i];
                    emit16(row_bytes(b, i), ws, -128.f * ws, w, at, w_bf16);
                    emit16(row_bytes(b + 128, i), ws, -128.f * ws, w, at + 16, w_bf16);
                }
            }
#else
            float v[TILE][QBLOCK];
            if (bits == 4) {  /* byte 4i + j of chunk c: row i's element 4c + j (low nibble), 16 + 4c + j (high) */
                const uint16_t *s = (const uint16_t *)scales + (t * nb + g) * 2 * TILE;
                for (int i = 0; i < TILE; i++) {
                    const float d = f16f(s[i]), mn = f16f(s[TILE + i]);
                    for (int c = 0; c < 4; c++)
                        for (int j = 0; j < 4; j++) {
                            const uint8_t u = b[32 * c + 4 * i + j];
                            v[i][4 * c + j] = d * (float)(u & 0x0F) + mn;
                            v[i][16 + 4 * c + j] = d * (float)(u >> 4) + mn;
                        }
                }
            } else {  /* byte 4i + j of chunk c: row i's element 4c + j, plus 128 */
                const float *ws = (const float *)scales + t * TILE;
                for (int i = 0; i < TILE; i++)
                    for (int c = 0; c < 8; c++)
                        for (int j = 0; j < 4; j++)
                            v[i][4 * c + j] = ws[i] * (float)((int)b[32 * c + 4 * i + j] - 128);
            }
            for (int i = 0; i < TILE && t * TILE + i < n; i++)
                store_row(v[i], w, (t * TILE + i) * k + g * QBLOCK, w_bf16);
#endif
        }
    }
    return 0;
}
