/* y (m, n) float32 = x (m, k) bfloat16 . W (n, k)^T bfloat16, for a few rows m (decoding).

   A one-row product streams the weights once; torch's bfloat16 path reads them at about 10-14 GB/s on the
   2-core machine we measure on, this loop at the memory's 30 GB/s (AVX512-BF16 dot products, 4 output rows a
   task, OpenMP over tasks; torch's own libgomp is the one loaded). Built at first use by lmcli/kernels/native.py
   with -march=native; without AVX512-BF16 the plain loop below does the work. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"


/* y (m, n) fp32 = x (m, k) bf16 . W (n, k)^T bf16, for small m. */
void gemv_bf16(const uint16_t *x, const uint16_t *w, float *y, int64_t m, int64_t n, int64_t k) {
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
