/* y (m, n) float32 = x (m, k) float32 . W (n, k)^T bfloat16, for many rows (prefill chunks, batched decodes) on CPUs
   without native bfloat16 products, where torch's bfloat16 GEMM is emulated and slow, and widening the whole
   weight to float32 for each product costs a write and a read of twice its bytes. Here each weight row is widened
   in registers: tiles of 4 rows of x by 3 rows of W (12 accumulators of 8 lanes along k, summed at the end), rows
   of x taken in blocks that stay in L2 while every W panel passes by. Built by lmcli/kernels/native.py; 0 if it
   ran, -1 where this level has no body (the caller then widens and calls torch). */
#include <stdint.h>

#include "bf16.h"

#if defined(__AVX2__) && defined(__FMA__)
#define MR 4
#define NR 3

/* One tile: rows r0..r0+rn-1 of x by W rows j0..j0+jn-1 (rn <= MR, jn <= NR). Missing rows repeat the last one,
   so that the loop is always the full tile; only the real results are stored. */
static void tile(const float *x, const uint16_t *w, float *y, int64_t n, int64_t k, int64_t r0, int64_t rn,
                 int64_t j0, int64_t jn) {
    const float *xr[MR];
    const uint16_t *wr[NR];
    for (int r = 0; r < MR; r++) xr[r] = x + (r0 + (r < rn ? r : rn - 1)) * k;
    for (int c = 0; c < NR; c++) wr[c] = w + (j0 + (c < jn ? c : jn - 1)) * k;
    __m256 acc[MR][NR];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < NR; c++) acc[r][c] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
        __m256 wv[NR];
        for (int c = 0; c < NR; c++) wv[c] = load8_bf16(wr[c] + i);
        for (int r = 0; r < MR; r++) {
            const __m256 xv = _mm256_loadu_ps(xr[r] + i);
            for (int c = 0; c < NR; c++) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
        }
    }
    for (int r = 0; r < rn; r++)
        for (int c = 0; c < jn; c++) {
            float s = hsum8(acc[r][c]);
            for (int64_t t = i; t < k; t++) s += xr[r][t] * bf16f(wr[c][t]);
            y[(r0 + r) * n + j0 + c] = s;
        }
}
#endif

int gemm_f32_bf16(const float *x, const uint16_t *w, float *y, int64_t m, int64_t n, int64_t k) {
#if defined(__AVX2__) && defined(__FMA__)
    int64_t rows = (65536 / (k > 0 ? k : 1)) / MR * MR;  /* a block of x: about 256 KB of float32 */
    if (rows < MR) rows = MR;
    const int64_t panels = (n + NR - 1) / NR;
    for (int64_t b = 0; b < m; b += rows) {
        const int64_t bn = m - b < rows ? m - b : rows;
        #pragma omp parallel for schedule(static)
        for (int64_t p = 0; p < panels; p++) {
            const int64_t j0 = p * NR, jn = n - j0 < NR ? n - j0 : NR;
            for (int64_t r0 = b; r0 < b + bn; r0 += MR)
                tile(x, w, y, n, k, r0, b + bn - r0 < MR ? b + bn - r0 : MR, j0, jn);
        }
    }
    return 0;
#else
    (void)x; (void)w; (void)y; (void)m; (void)n; (void)k;
    return -1;
#endif
}
