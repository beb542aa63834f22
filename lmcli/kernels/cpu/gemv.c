/* y (m, n) float32 = x (m, k) bfloat16 . W (n, k)^T bfloat16, for a few rows m (decoding).

   A one-row product streams the weights once; torch's bfloat16 path reads them at about 10-14 GB/s on the
   2-core machine we measure on, this loop at the memory's 30 GB/s (AVX512-BF16 dot products, 4 output rows a
   task, OpenMP over tasks; torch's own libgomp is the one loaded). Built at first use by lmcli/kernels/native.py
   once per instruction-set level: AVX512-BF16 dot products, else AVX2 + FMA on bfloat16 widened to float32 in
   registers (still half the bytes of float32 weights), else the plain loop below, which the compiler vectorizes. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"


#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512BF16__)
/* AVX2: x widened to float32 once (xf), then each weight row widened once and multiplied into up to 8 rows. */
static void gemv_bf16_avx2(const float *xf, const uint16_t *w, float *y, int64_t m, int64_t n, int64_t k) {
    #pragma omp parallel for schedule(static)
    for (int64_t j = 0; j < n; j++) {
        const uint16_t *wr = w + j * k;
        for (int64_t r0 = 0; r0 < m; r0 += 8) {
            const int64_t rn = m - r0 < 8 ? m - r0 : 8;
            __m256 acc[8];
            for (int64_t r = 0; r < 8; r++) acc[r] = _mm256_setzero_ps();
            int64_t i = 0;
            if (rn <= 4)  /* two FMA chains a row, so that few rows do not wait on the FMA's latency */
                for (; i + 16 <= k; i += 16) {
                    const __m256 w0 = load8_bf16(wr + i), w1 = load8_bf16(wr + i + 8);
                    for (int64_t r = 0; r < rn; r++) {
                        acc[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xf + (r0 + r) * k + i), acc[r]);
                        acc[r + 4] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xf + (r0 + r) * k + i + 8), acc[r + 4]);
                    }
                }
            for (; i + 8 <= k; i += 8) {
                const __m256 wv = load8_bf16(wr + i);
                for (int64_t r = 0; r < rn; r++)
                    acc[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xf + (r0 + r) * k + i), acc[r]);
            }
            for (int64_t r = 0; r < rn; r++) {
                float s = hsum8(rn <= 4 ? _mm256_add_ps(acc[r], acc[r + 4]) : acc[r]);
                for (int64_t t = i; t < k; t++) s += bf16f(wr[t]) * xf[(r0 + r) * k + t];
                y[(r0 + r) * n + j] = s;
            }
        }
    }
}
#endif

/* y (m, n) fp32 = x (m, k) bf16 . W (n, k)^T bf16, for small m. */
void gemv_bf16(const uint16_t *x, const uint16_t *w, float *y, int64_t m, int64_t n, int64_t k) {
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512BF16__)
    float *xf = malloc(sizeof(float) * m * k);
    if (xf) {
        for (int64_t i = 0; i < m * k; i++) xf[i] = bf16f(x[i]);
        gemv_bf16_avx2(xf, w, y, m, n, k);
        free(xf);
        return;
    }
#endif
    #pragma omp parallel for schedule(static)
    for (int64_t j0 = 0; j0 < n; j0 += 4) {
        int64_t jn = n - j0 < 4 ? n - j0 : 4;
        for (int64_t r = 0; r < m; r++) {
            const uint16_t *xr = x + r * k;
            for (int64_t j = j0; j < j0 + jn; j++) {
                const uint16_t *wr = w + j * k;
                int64_t i = 0;
                float s = 0.f;
#ifdef __AVX512BF16__
                __m512 acc = _mm512_setzero_ps();
                for (; i + 32 <= k; i += 32) {
                    __m512bh a = (__m512bh)_mm512_loadu_si512((const void *)(wr + i));
                    __m512bh b = (__m512bh)_mm512_loadu_si512((const void *)(xr + i));
                    acc = _mm512_dpbf16_ps(acc, a, b);
                }
                s = _mm512_reduce_add_ps(acc);
#endif
                for (; i < k; i++) s += bf16f(wr[i]) * bf16f(xr[i]);
                y[r * n + j] = s;
            }
        }
    }
}
