/* Weights in tiles of 8 output rows times activations in signed bytes per block of 32 (kernels/int4.py and
   kernels/int8.py): y (m, n) = x (m, k) . W (n, k)^T, x and y in bfloat16 or float32. One vector holds a tile's 8
   outputs, so there are no horizontal sums and a block's weight scales are a vector too.

   x is quantized per block of 32 to -127..127 (scale xs = the block's largest magnitude / 127, and xsum = xs * its
   byte sum). Byte products run 4 a lane: unsigned weight bytes times signed x bytes with vpdpbusd (AVX-VNNI or
   AVX512-VNNI); without VNNI vpmaddubsw then vpmaddwd, 8-bit weights then signed (|x| times the weight with x's
   sign: 8-bit activations with no 16-bit saturation; 7-bit ones cost SmolLM2 1.15% perplexity against 0.42%);
   plain loops at the portable level. A
   tile's weights are loaded once for up to 4 rows of x (two tiles: up to WIDE); OpenMP over tiles.

   4-bit (gemm_q4): blocks of 32 along k as GGUF's Q4_1, w = d * q + mn, q in 0..15, d and mn float16. Tile T,
   block g is 128 bytes, 4 chunks c of 32 bytes; byte 4i + b of chunk c holds row 8T + i's element 32g + 4c + b in
   its low nibble and 32g + 16 + 4c + b in its high one (one mask and one shift unpack 8 chunks of 4 elements).
   Scales (tiles, blocks, 2, 8) float16: the 8 rows' d, then their mn. Block g adds d * xs * (q . xq) + mn * xsum.
   Above 4 rows of x, with AVX512-VNNI, two tiles at once in 512-bit vectors (tile_pair_rows_q4): on an Intel Xeon
   with AVX-512 the 120 projections of SmolLM2 at 512 rows 510 against 959 ms, 64 rows 63 against 96, 8 rows 11.9
   against 16.5; not at one row (an AMD EPYC, whose 512-bit operations are two 256-bit halves, ran them slower
   there: 6.1 against 4.4 ms).

   8-bit (gemm_s8): per output row w = ws * q, q in -127..127 kept as q + 128 (unsigned). Tile T, block g is 256
   bytes, 8 chunks c of 32 bytes; byte 4i + b of chunk c holds row 8T + i's element 32g + 4c + b. Row j's sum is
   ws[j] * (sum over blocks of xs * (u . xq) - 128 * sum of xsum): the offset's share is the same for every row
   (and 0 where the weights are taken back to signed bytes, SIGNED_S8). */
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
/* Two tiles a task (tile_pair_rows_*): up to WIDE_MAX_ROWS rows of x, WIDE rows a pass over the task's weights
   (their sums partly spilled to the stack), else ROWS a pass; the weights PREFETCH blocks ahead. On an AMD EPYC
   (Zen 5), the 120 projections of SmolLM2 at 16 rows, 4-bit weights: 4 rows a pass 7.3-7.5 ms, 16 rows 5.7-6.0, 16
   rows and the prefetch 5.4; at 32 rows 16 a pass lost (13.4 against 11.8) */
#define WIDE 16
#define WIDE_MAX_ROWS 24
#define PREFETCH 12
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) || defined(__AVXVNNI__)
#define VNNI 1
#else
#define VNNI 0
#endif
/* AVX2 without VNNI: 8-bit weights as signed bytes (vpmaddubsw takes |x| and the weight with x's sign), so that
   16-bit pair sums stay below 2 * 127 * 127 and need no offset */
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !VNNI
#define SIGNED_S8 1
#else
#define SIGNED_S8 0
#endif

/* A row of x (bfloat16 or float32) quantized per block to -127..127: xq (k), xs and xsum (k / 32). */
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
/* A block of a tile (8 chunks of weight bytes, chunk c against x's bytes 4c..4c+3) against one row's block of x:
   the 8 rows' int32 sums. small: unsigned weights below 16 (4-bit codes), so that without VNNI the 16-bit pair
   sums of all 8 chunks stay below 32768 and are widened once; else the weights are unsigned with VNNI and signed
   without (SIGNED_S8). */
static inline __m256i dot_chunks(const __m256i w[8], const int8_t *xb, const int small) {
#if VNNI
    __m256i a = _mm256_setzero_si256(), b = _mm256_setzero_si256();  /* two chains: half the latency */
    for (int c = 0; c < 4; c++) {
        a = _mm256_dpbusd_epi32(a, w[c], _mm256_set1_epi32(*(const int32_t *)(xb + 4 * c)));
        b = _mm256_dpbusd_epi32(b, w[c + 4], _mm256_set1_epi32(*(const int32_t *)(xb + 16 + 4 * c)));
    }
    (void)small;
    return _mm256_add_epi32(a, b);
#else
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc = _mm256_setzero_si256();
    if (small) {
        for (int c = 0; c < 8; c++)
            acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(w[c], _mm256_set1_epi32(*(const int32_t *)(xb + 4 * c))));
        return _mm256_madd_epi16(acc, ones);
    }
    for (int c = 0; c < 8; c++) {  /* signed weights (SIGNED_S8): |x| times w with x's sign */
        const __m256i xv = _mm256_set1_epi32(*(const int32_t *)(xb + 4 * c));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(xv),
                                                                           _mm256_sign_epi8(w[c], xv)), ones));
    }
    return acc;
#endif
}
#endif

static void tile_rows_q4(const uint8_t *codes, const uint16_t *scales, const int8_t *xq, const float *xs,
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
            const __m256i p = dot_chunks(w, xq + r * nb * QBLOCK + g * QBLOCK, 1);
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

static void tile_rows_s8(const uint8_t *codes, const int8_t *xq, const float *xs, int64_t rn, int64_t nb,
                         float out[ROWS][TILE]) {
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    __m256 acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < nb; g++) {
        __m256i w[8];
        for (int c = 0; c < 8; c++) {
            w[c] = _mm256_loadu_si256((const void *)(codes + g * 256 + 32 * c));
            if (SIGNED_S8) w[c] = _mm256_xor_si256(w[c], _mm256_set1_epi8((char)0x80));  /* q + 128 -> q */
        }
        for (int64_t r = 0; r < rn; r++) {
            const __m256i p = dot_chunks(w, xq + r * nb * QBLOCK + g * QBLOCK, 0);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(xs[r * nb + g]), acc[r]);
        }
    }
    for (int64_t r = 0; r < rn; r++) _mm256_storeu_ps(out[r], acc[r]);
#else
    float acc[ROWS][TILE] = {{0.f}};
    for (int64_t g = 0; g < nb; g++) {
        const uint8_t *cb = codes + g * 256;
        for (int64_t r = 0; r < rn; r++) {
            const int8_t *xb = xq + r * nb * QBLOCK + g * QBLOCK;
            int32_t dot[TILE] = {0};
            for (int c = 0; c < 8; c++)
                for (int i = 0; i < TILE; i++)
                    for (int b = 0; b < 4; b++) dot[i] += (int32_t)cb[32 * c + 4 * i + b] * xb[4 * c + b];
            for (int i = 0; i < TILE; i++) acc[r][i] += xs[r * nb + g] * (float)dot[i];
        }
    }
    for (int64_t r = 0; r < rn; r++)
        for (int i = 0; i < TILE; i++) out[r][i] = acc[r][i];
#endif
}

#if defined(__AVX512VL__) && VNNI
#define PAIRS 1
/* Two tiles at once (32 vector registers): each broadcast of x serves 16 output rows. */
static inline __attribute__((always_inline)) void pair_s8(const uint8_t *codes, int64_t stride, const int8_t *xq,
        const float *xs, const int64_t rn, int64_t nb, float out[WIDE][2 * TILE]) {
    __m256 acc[WIDE][2];
    for (int r = 0; r < rn; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < nb; g++) {
        __m256i w[2][8];
        for (int line = 0; line < 256; line += 64) {
            _mm_prefetch((const char *)codes + (g + PREFETCH) * 256 + line, _MM_HINT_T0);
            _mm_prefetch((const char *)codes + stride + (g + PREFETCH) * 256 + line, _MM_HINT_T0);
        }
        for (int c = 0; c < 8; c++) {
            w[0][c] = _mm256_loadu_si256((const void *)(codes + g * 256 + 32 * c));
            w[1][c] = _mm256_loadu_si256((const void *)(codes + stride + g * 256 + 32 * c));
        }
        for (int64_t r = 0; r < rn; r++) {
            const int8_t *xb = xq + r * nb * QBLOCK + g * QBLOCK;
            __m256i p0 = _mm256_setzero_si256(), p1 = _mm256_setzero_si256();
            for (int c = 0; c < 8; c++) {
                const __m256i xv = _mm256_set1_epi32(*(const int32_t *)(xb + 4 * c));
                p0 = _mm256_dpbusd_epi32(p0, w[0][c], xv);
                p1 = _mm256_dpbusd_epi32(p1, w[1][c], xv);
            }
            const __m256 sx = _mm256_set1_ps(xs[r * nb + g]);
            acc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), sx, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), sx, acc[r][1]);
        }
    }
    for (int64_t r = 0; r < rn; r++) {
        _mm256_storeu_ps(out[r], acc[r][0]);
        _mm256_storeu_ps(out[r] + TILE, acc[r][1]);
    }
}
static void tile_pair_rows_s8(const uint8_t *codes, int64_t stride, const int8_t *xq, const float *xs, int64_t rn,
                              int64_t nb, float out[WIDE][2 * TILE]) {
    if (rn == WIDE)  /* constant counts: loops the compiler unrolls, the sums in registers where they fit */
        pair_s8(codes, stride, xq, xs, WIDE, nb, out);
    else if (rn == ROWS)
        pair_s8(codes, stride, xq, xs, ROWS, nb, out);
    else
        pair_s8(codes, stride, xq, xs, rn, nb, out);
}
#else
#define PAIRS 0
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define PAIRS_Q4 1
/* 4-bit, two tiles at once in 512-bit vectors (tile t's 8 rows in the low half, t + 1's in the high half): each
   broadcast of x and each dpbusd serves 16 output rows. */
static inline __attribute__((always_inline)) void pair_q4(const uint8_t *codes, const uint16_t *scales, int64_t stride,
        const int8_t *xq, const float *xs, const float *xsum, const int64_t rn, int64_t nb, float out[WIDE][2 * TILE]) {
    __m512 acc[WIDE], mins[WIDE];
    for (int r = 0; r < rn; r++) acc[r] = mins[r] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int64_t g = 0; g < nb; g++) {
        const uint8_t *c0 = codes + g * 128, *c1 = codes + stride * 128 + g * 128;
        for (int line = 0; line < 128; line += 64) {  /* past the task's end: the next task's weights */
            _mm_prefetch((const char *)c0 + PREFETCH * 128 + line, _MM_HINT_T0);
            _mm_prefetch((const char *)c1 + PREFETCH * 128 + line, _MM_HINT_T0);
        }
        __m512i w[8];
        for (int c = 0; c < 4; c++) {
            const __m512i b = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const void *)(c0 + 32 * c))),
                                                 _mm256_loadu_si256((const void *)(c1 + 32 * c)), 1);
            w[c] = _mm512_and_si512(b, low);
            w[c + 4] = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
        }
        const uint16_t *s0 = scales + g * 16, *s1 = scales + stride * 16 + g * 16;
        const __m512 d = _mm512_cvtph_ps(_mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadu_si128((const void *)s0)), _mm_loadu_si128((const void *)s1), 1));
        const __m512 mn = _mm512_cvtph_ps(_mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadu_si128((const void *)(s0 + 8))), _mm_loadu_si128((const void *)(s1 + 8)), 1));
        for (int64_t r = 0; r < rn; r++) {
            const int8_t *xb = xq + r * nb * QBLOCK + g * QBLOCK;
            __m512i a = _mm512_setzero_si512(), b = _mm512_setzero_si512();
            for (int c = 0; c < 4; c++) {
                a = _mm512_dpbusd_epi32(a, w[c], _mm512_set1_epi32(*(const int32_t *)(xb + 4 * c)));
                b = _mm512_dpbusd_epi32(b, w[c + 4], _mm512_set1_epi32(*(const int32_t *)(xb + 16 + 4 * c)));
            }
            const __m512 p = _mm512_cvtepi32_ps(_mm512_add_epi32(a, b));
            acc[r] = _mm512_fmadd_ps(p, _mm512_mul_ps(d, _mm512_set1_ps(xs[r * nb + g])), acc[r]);
            mins[r] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xsum[r * nb + g]), mins[r]);
        }
    }
    for (int64_t r = 0; r < rn; r++) _mm512_storeu_ps(out[r], _mm512_add_ps(acc[r], mins[r]));
}
static void tile_pair_rows_q4(const uint8_t *codes, const uint16_t *scales, int64_t stride, const int8_t *xq,
                              const float *xs, const float *xsum, int64_t rn, int64_t nb,
                              float out[WIDE][2 * TILE]) {
    if (rn == WIDE)
        pair_q4(codes, scales, stride, xq, xs, xsum, WIDE, nb, out);
    else if (rn == ROWS)
        pair_q4(codes, scales, stride, xq, xs, xsum, ROWS, nb, out);
    else
        pair_q4(codes, scales, stride, xq, xs, xsum, rn, nb, out);
}
#else
#define PAIRS_Q4 0
#endif

int gemm_amx(int bits, const void *x, const uint8_t *codes, const void *scales, void *y, int64_t m, int64_t n,
             int64_t k, int64_t x_bf16, int64_t y_bf16);  /* amx.c: -1 where it does not apply */

/* The shared driver: AMX where it applies (amx.c: enough rows of x, a CPU and kernel that run it), else x
   quantized, then tiles (OpenMP) times row groups (ROWS or WIDE). Returns -1 if out of memory. */
static int gemm_blocks(int bits, const void *x, const uint8_t *codes, const void *scales, void *y, int64_t m,
                       int64_t n, int64_t k, int64_t x_bf16, int64_t y_bf16) {
    if (gemm_amx(bits, x, codes, scales, y, m, n, k, x_bf16, y_bf16) == 0) return 0;
    const int64_t nb = k / QBLOCK, tiles = (n + TILE - 1) / TILE;
    int8_t *xq = malloc((size_t)(m * k));
    float *xs = malloc(sizeof(float) * (size_t)(m * nb)), *xsum = malloc(sizeof(float) * (size_t)(m * nb));
    float *offset = malloc(sizeof(float) * (size_t)m);  /* 8-bit: 128 * the row's sum of xsum */
    if (!xq || !xs || !xsum || !offset) {
        free(xq), free(xs), free(xsum), free(offset);
        return -1;
    }
    #pragma omp parallel
    {
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < m; r++) {
            quantize_row((const char *)x + r * k * (x_bf16 ? 2 : 4), (int)x_bf16, xq + r * k, xs + r * nb, xsum + r * nb,
                         k);
            float total = 0.f;
            for (int64_t g = 0; g < nb; g++) total += xsum[r * nb + g];
            offset[r] = SIGNED_S8 ? 0.f : 128.f * total;
        }
        /* two tiles a task where the level has the registers (8-bit: AVX512-VL) or the 512-bit products (4-bit:
           AVX512-VNNI) for it and x has more than a row group (for fewer rows, one tile's two dependency chains are
           faster: 8-bit 3.6 against 5.5 ms at one row, the 120 projections of SmolLM2; at 512 rows 273 against
           378); an odd last tile alone */
        const int64_t step = (bits == 8 ? PAIRS : PAIRS_Q4) && m > ROWS ? 2 : 1, tasks = (tiles + step - 1) / step;
        #pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; task++) {
            const int64_t t = task * step, width = (t + step <= tiles ? step : 1) * TILE;
            const int64_t group = width == 2 * TILE && m <= WIDE_MAX_ROWS ? WIDE : ROWS;
            for (int64_t r0 = 0; r0 < m; r0 += group) {
                const int64_t rn = m - r0 < group ? m - r0 : group;
                float out[WIDE][2 * TILE], one[ROWS][TILE];
                if (width == 2 * TILE) {
#if PAIRS_Q4
                    if (bits == 4)
                        tile_pair_rows_q4(codes + t * nb * 128, (const uint16_t *)scales + t * nb * 16, nb, xq + r0 * k,
                                          xs + r0 * nb, xsum + r0 * nb, rn, nb, out);
#endif
#if PAIRS
                    if (bits == 8)
                        tile_pair_rows_s8(codes + t * nb * 256, nb * 256, xq + r0 * k, xs + r0 * nb, rn, nb, out);
#endif
                } else {
                    if (bits == 4)
                        tile_rows_q4(codes + t * nb * 128, (const uint16_t *)scales + t * nb * 16, xq + r0 * k,
                                     xs + r0 * nb, xsum + r0 * nb, rn, nb, one);
                    else
                        tile_rows_s8(codes + t * nb * 256, xq + r0 * k, xs + r0 * nb, rn, nb, one);
                    for (int64_t r = 0; r < rn; r++) memcpy(out[r], one[r], sizeof(one[r]));
                }
                for (int64_t r = 0; r < rn; r++)
                    for (int64_t i = 0; i < width && t * TILE + i < n; i++) {
                        const int64_t j = t * TILE + i, at = (r0 + r) * n + j;
                        const float v = bits == 4 ? out[r][i] : ((const float *)scales)[j] * (out[r][i] - offset[r0 + r]);
                        if (y_bf16)
                            ((uint16_t *)y)[at] = f2bf16(v);
                        else
                            ((float *)y)[at] = v;
                    }
            }
        }
    }
    free(xq), free(xs), free(xsum), free(offset);
    return 0;
}

/* x (m, k), k a multiple of 32 -> y (m, n); codes and scales as above for n rounded up to tiles of 8. x_bf16,
   y_bf16: whether x and y are bfloat16 (else float32). Return -1 if out of memory. */
int gemm_q4(const void *x, const uint8_t *codes, const uint16_t *scales, void *y, int64_t m, int64_t n, int64_t k,
            int64_t x_bf16, int64_t y_bf16) {
    return gemm_blocks(4, x, codes, scales, y, m, n, k, x_bf16, y_bf16);
}

/* ws: (n,) float32, each row's weight scale. */
int gemm_s8(const void *x, const uint8_t *codes, const float *ws, void *y, int64_t m, int64_t n, int64_t k,
            int64_t x_bf16, int64_t y_bf16) {
    return gemm_blocks(8, x, codes, ws, y, m, n, k, x_bf16, y_bf16);
}
