/* 4-bit and 8-bit block weights (blocks.c's tiles) times x on AMX (Intel Sapphire Rapids and later): the weights
   are widened to bfloat16 in registers, 16 output rows by one block of 32 at a time, and multiplied by AMX tiles
   (tdpbf16ps, float32 sums), so x stays in bfloat16 (not quantized to bytes) and no widened weight goes back to
   memory.

   x is taken XROWS rows at a time. A tiles (tmm4-5): 16 output rows times a block of 32 weights, row-major
   bfloat16, widened once for those rows of x for each pair of 8-row tiles and kept in a per-thread strip (k / 32
   tiles of 1 KB). B tiles: 16 rows of x by a block, as tdpbf16ps wants them (element pairs along k: row kk holds
   x[r][2kk], x[r][2kk + 1] for r = 0..15), prepared once. C tiles (tmm0-3): 16 output rows times 16 rows of x,
   float32, summed over all blocks; written to y transposed. Linux asks the kernel for the AMX state once
   (arch_prctl); anywhere it refuses, or without AMX-BF16 at build time, or for fewer than AMX_MIN_ROWS rows of
   x, gemm_amx returns -1 and the caller uses the byte products (as fast at 12 rows and faster below: the
   widening is paid per weight, the products per row; the 120 projections of SmolLM2 from int4 on an Intel Xeon,
   in-process pairs: 16 rows 12.2 against 13.7 ms, 24 rows 15.6 against 20.1, 64 rows 35.0 against 64.6). */
#define AMX_MIN_ROWS 16
#define XROWS 256
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define QBLOCK 32
#define TILE 8
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

static int amx_ready(void) {  /* 1 once the kernel lets this process use the AMX tiles */
    static int state = 0;     /* 0 unknown, 1 ready, -1 refused */
    if (state == 0) state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : -1;
    return state == 1;
}

/* lane 4i + c: row i's dword of chunk c (c = 0..3, rows 0..3; + 4 for rows 4..7); chunks 0-1 in a, 2-3 in b */
static const int32_t ROWS_0123[16] = {0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27};

/* One row's 32 weights, from its 16 bytes of 4-bit codes (low nibbles: elements 0..15, high: 16..31): the
   row's 16 possible values d * q + mn in bfloat16, looked up by the codes (vpermw) */
static inline __m512i widen_q4_row(__m128i b, float d, float mn) {
    const __m128i low = _mm_set1_epi8(0x0F);
    const __m512 q = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i values = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(
        _mm512_fmadd_ps(q, _mm512_set1_ps(d), _mm512_set1_ps(mn))));
    const __m256i codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), low), _mm_and_si128(b, low));
    return _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(codes), values);
}

/* One row's 32 weights from 16 + 16 bytes of q + 128 */
static inline __m512i widen_s8_row(__m128i lo8, __m128i hi8, float ws) {
    const __m128i flip = _mm_set1_epi8((char)0x80);
    const __m512 wv = _mm512_set1_ps(ws);
    const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_xor_si128(lo8, flip))), wv);
    const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_xor_si128(hi8, flip))), wv);
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

#define ROW4(out, r, call) do { \
    _mm512_storeu_si512((out) + 0 * 32, call(_mm512_extracti32x4_epi32(r, 0), 0)); \
    _mm512_storeu_si512((out) + 1 * 32, call(_mm512_extracti32x4_epi32(r, 1), 1)); \
    _mm512_storeu_si512((out) + 2 * 32, call(_mm512_extracti32x4_epi32(r, 2), 2)); \
    _mm512_storeu_si512((out) + 3 * 32, call(_mm512_extracti32x4_epi32(r, 3), 3)); } while (0)

/* 8 output rows (one tile) of block g as 8 rows of 32 bfloat16 at a */
static inline __attribute__((always_inline)) void widen_tile(int bits, const uint8_t *codes, const void *scales,
                                                             int64_t t, int64_t g, int64_t nb, int64_t n,
                                                             uint16_t *a) {
    const __m512i lo_rows = _mm512_loadu_si512(ROWS_0123), hi_rows = _mm512_add_epi32(lo_rows, _mm512_set1_epi32(4));
    if (bits == 4) {
        const uint8_t *cb = codes + (t * nb + g) * 128;
        float s[16];  /* d of the 8 rows, then their minimums */
        const uint16_t *sb = (const uint16_t *)scales + (t * nb + g) * 16;
        _mm512_storeu_ps(s, _mm512_cvtph_ps(_mm256_loadu_si256((const void *)sb)));
        const __m512i z0 = _mm512_loadu_si512(cb), z1 = _mm512_loadu_si512(cb + 64);
        for (int h = 0; h < 2; h++) {
            const __m512i r = _mm512_permutex2var_epi32(z0, h ? hi_rows : lo_rows, z1);
#define Q4(b, i) widen_q4_row(b, s[4 * h + (i)], s[8 + 4 * h + (i)])
            ROW4(a + 4 * h * 32, r, Q4);
#undef Q4
        }
    } else {
        const uint8_t *cb = codes + (t * nb + g) * 256;
        const float *ws = (const float *)scales;
        float s[8];
        for (int i = 0; i < 8; i++) s[i] = t * TILE + i < n ? ws[t * TILE + i] : 0.f;
        const __m512i z0 = _mm512_loadu_si512(cb), z1 = _mm512_loadu_si512(cb + 64);
        const __m512i z2 = _mm512_loadu_si512(cb + 128), z3 = _mm512_loadu_si512(cb + 192);
        for (int h = 0; h < 2; h++) {
            const __m512i p = _mm512_permutex2var_epi32(z0, h ? hi_rows : lo_rows, z1);  /* elements 0..15 */
            const __m512i q = _mm512_permutex2var_epi32(z2, h ? hi_rows : lo_rows, z3);  /* elements 16..31 */
#define S8(b, i) widen_s8_row(b, _mm512_extracti32x4_epi32(q, i), s[4 * h + (i)])
            ROW4(a + 4 * h * 32, p, S8);
#undef S8
        }
    }
}

/* v[i] lane j <- v[j] lane i: a 16 x 16 transpose of 32-bit values in 64 shuffles (within 128-bit lanes by 32 and
   64 bits, then across lanes) */
static inline void transpose16(__m512i *v) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
    }
    for (int b = 0; b < 4; b++) {  /* u[4b + c] lane L: column 4L + c of rows 4b..4b+3 */
        u[4 * b] = _mm512_unpacklo_epi64(t[4 * b], t[4 * b + 2]);
        u[4 * b + 1] = _mm512_unpackhi_epi64(t[4 * b], t[4 * b + 2]);
        u[4 * b + 2] = _mm512_unpacklo_epi64(t[4 * b + 1], t[4 * b + 3]);
        u[4 * b + 3] = _mm512_unpackhi_epi64(t[4 * b + 1], t[4 * b + 3]);
    }
    for (int c = 0; c < 4; c++) {
        const __m512i w0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44), w1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
        const __m512i w2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
        const __m512i w3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
        v[c] = _mm512_shuffle_i32x4(w0, w2, 0x88);
        v[4 + c] = _mm512_shuffle_i32x4(w0, w2, 0xDD);
        v[8 + c] = _mm512_shuffle_i32x4(w1, w3, 0x88);
        v[12 + c] = _mm512_shuffle_i32x4(w1, w3, 0xDD);
    }
}

/* x rows 16R..16R+15 (zeros past m), block g, as a B tile: pair kk of row r at dword kk * 16 + r (each row's 32
   values in bfloat16 are 16 pairs: the tile is their transpose) */
static void pack_x(const void *x, int x_bf16, int64_t m, int64_t k, int64_t R, int64_t g, uint32_t *b) {
    __m512i v[16];
    for (int64_t r = 0; r < 16; r++) {
        const int64_t row = 16 * R + r, at = row * k + g * QBLOCK;
        if (row >= m)
            v[r] = _mm512_setzero_si512();
        else if (x_bf16)
            v[r] = _mm512_loadu_si512((const uint16_t *)x + at);
        else
            v[r] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps((const float *)x + at + 16),
                                                 _mm512_loadu_ps((const float *)x + at));
    }
    transpose16(v);
    for (int kk = 0; kk < 16; kk++) _mm512_storeu_si512(b + kk * 16, v[kk]);
}

/* C tile c (16 output rows j by 16 rows r of x) into y[16R + r][16T + j]: the tile transposed, a row of y a store */
static void write_out(const float *c, void *y, int y_bf16, int64_t m, int64_t n, int64_t R, int64_t T) {
    const int64_t width = n - 16 * T < 16 ? n - 16 * T : 16;
    const __mmask16 live = (__mmask16)((1u << width) - 1);
    __m512i v[16];
    for (int j = 0; j < 16; j++) v[j] = _mm512_loadu_si512(c + 16 * j);
    transpose16(v);
    for (int64_t r = 0; r < 16 && 16 * R + r < m; r++) {
        const int64_t at = (16 * R + r) * n + 16 * T;
        if (y_bf16)
            _mm256_mask_storeu_epi16((uint16_t *)y + at, live, (__m256i)_mm512_cvtneps_pbh(_mm512_castsi512_ps(v[r])));
        else
            _mm512_mask_storeu_ps((float *)y + at, live, _mm512_castsi512_ps(v[r]));
    }
}

#define STEP(C, A, B, i) do { _tile_loadd(B, bt + ((R0 + (i)) * nb + g) * 256, 64); _tile_dpbf16ps(C, A, B); } while (0)
#define STORE(C) _tile_stored(C, c, 64)
#define ADD(C) do { \
    _tile_stored(C, part, 64); \
    for (int e = 0; e < 256; e += 16) \
        _mm512_storeu_ps(c + e, _mm512_add_ps(_mm512_loadu_ps(c + e), _mm512_loadu_ps(part + e))); \
} while (0)
#define OUT(i) write_out(c, y, (int)y_bf16, m, n, R0 + (i), T)

/* Up to XROWS rows of x: their B tiles (XROWS * k * 2 bytes) stay in L2 while every strip of weights passes */
static int gemm_amx_rows(int bits, const void *x, const uint8_t *codes, const void *scales, void *y, int64_t m,
                         int64_t n, int64_t k, int64_t x_bf16, int64_t y_bf16) {
    const int64_t nb = k / QBLOCK, tiles = (n + TILE - 1) / TILE, pairs = (tiles + 1) / 2, groups = (m + 15) / 16;
    uint32_t *bt = aligned_alloc(64, (size_t)(groups * nb * 1024));
    if (!bt) return -1;
    int failed = 0;
    #pragma omp parallel
    {
        tile_config cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.palette = 1;
        for (int i = 0; i < 8; i++) cfg.colsb[i] = 64, cfg.rows[i] = 16;
        _tile_loadconfig(&cfg);
        uint16_t *strip = aligned_alloc(64, (size_t)(nb * 1024));
        float c[256], part[256];
        #pragma omp for schedule(static)
        for (int64_t task = 0; task < groups * nb; task++)
            pack_x(x, (int)x_bf16, m, k, task / nb, task % nb, bt + task * 256);
        if (!strip) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t T = 0; T < pairs; T++) {
            if (!strip) continue;
            /* up to 4 groups of 16 rows of x at a time, one C tile each; fewer groups share out the 4 tiles over
               the blocks (two dependency chains or four, summed at the end) */
            for (int64_t R0 = 0; R0 < groups; R0 += 4) {
                const int64_t left = groups - R0;
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (int64_t g = 0; g < nb; g++) {
                    uint16_t *a = strip + g * 512;
                    if (R0 == 0) {  /* the strip is widened on the first pass, block by block, and then reused */
                        widen_tile(bits, codes, scales, 2 * T, g, nb, n, a);
                        if (2 * T + 1 < tiles)
                            widen_tile(bits, codes, scales, 2 * T + 1, g, nb, n, a + 256);
                        else
                            memset(a + 256, 0, 512);
                    }
                    /* tiles are not renamed: a load waits for the products that read the tile before, so
                       consecutive blocks alternate their A and B tiles where there are tiles to spare */
                    if (left == 1) {
                        if (g & 1) {
                            _tile_loadd(5, a, 64);
                            STEP(1, 5, 7, 0);
                        } else {
                            _tile_loadd(4, a, 64);
                            STEP(0, 4, 6, 0);
                        }
                    } else if (left == 2) {
                        if (g & 1) {
                            _tile_loadd(5, a, 64);
                            STEP(0, 5, 2, 0);
                            STEP(1, 5, 3, 1);
                        } else {
                            _tile_loadd(4, a, 64);
                            STEP(0, 4, 6, 0);
                            STEP(1, 4, 7, 1);
                        }
                    } else {
                        _tile_loadd(4, a, 64);
                        STEP(0, 4, 5, 0);
                        STEP(1, 4, 6, 1);
                        STEP(2, 4, 7, 2);
                        if (left > 3) STEP(3, 4, 5, 3);
                    }
                }
                if (left == 1) {
                    STORE(0);
                    ADD(1);
                    OUT(0);
                } else {
                    for (int i = 0; i < left && i < 4; i++) {
                        switch (i) {
                        case 0: STORE(0); break;
                        case 1: STORE(1); break;
                        case 2: STORE(2); break;
                        default: STORE(3); break;
                        }
                        OUT(i);
                    }
                }
            }
        }
        free(strip);
        _tile_release();
    }
    free(bt);
    return failed ? -1 : 0;
}

int gemm_amx(int bits, const void *x, const uint8_t *codes, const void *scales, void *y, int64_t m, int64_t n,
             int64_t k, int64_t x_bf16, int64_t y_bf16) {
    if (m < AMX_MIN_ROWS || !amx_ready() || k % QBLOCK) return -1;
    for (int64_t r = 0; r < m; r += XROWS) {  /* the weights are widened again for each XROWS rows */
        const int64_t rows = m - r < XROWS ? m - r : XROWS;
        if (gemm_amx_rows(bits, (const char *)x + r * k * (x_bf16 ? 2 : 4), codes, scales,
                          (char *)y + r * n * (y_bf16 ? 2 : 4), rows, n, k, x_bf16, y_bf16))
            return -1;
    }
    return 0;
}

/* The fewest rows of x that gemm_amx takes here; 0 where AMX does not run. */
int amx_rows(void) { return amx_ready() ? AMX_MIN_ROWS : 0; }
#else
int amx_rows(void) { return 0; }

int gemm_amx(int bits, const void *x, const uint8_t *codes, const void *scales, void *y, int64_t m, int64_t n,
             int64_t k, int64_t x_bf16, int64_t y_bf16) {
    (void)bits, (void)x, (void)codes, (void)scales, (void)y, (void)m, (void)n, (void)k, (void)x_bf16, (void)y_bf16;
    return -1;
}
#endif
