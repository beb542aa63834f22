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

/* The int8 layers' few-row product (kernels/int8.py): y (m, n) bfloat16 = (x . W^T) * xs[r] * ws[j], x (m, k) as
   unsigned bytes x + 128 (quantize_rows_u8), W (n, k) signed bytes with wsum[j] its row sums. With AVX512-VNNI
   64 byte products a step; the 128 * wsum[j] that the offset adds is taken back. With AVX2 but no VNNI, 32 a step
   as signed bytes: |x - 128| times w with x's sign (vpsignb), pairs summed in 16 bits (vpmaddubsw: at most
   2 * 127 * 127, no saturation), then in 32 (vpmaddwd). */
void gemv_s8(const uint8_t *x, const float *xs, const int8_t *w, const float *ws, const int32_t *wsum,
             uint16_t *y, int64_t m, int64_t n, int64_t k) {
    #pragma omp parallel for schedule(static)
    for (int64_t j0 = 0; j0 < n; j0 += 4) {
        int64_t jn = n - j0 < 4 ? n - j0 : 4;
        for (int64_t r = 0; r < m; r++) {
            const uint8_t *xr = x + r * k;
            for (int64_t j = j0; j < j0 + jn; j++) {
                const int8_t *wr = w + j * k;
                int64_t i = 0;
                int32_t s = 0, offset = 128 * wsum[j];  /* s - offset: the signed product */
#ifdef __AVX512VNNI__
                __m512i acc = _mm512_setzero_si512();
                for (; i + 64 <= k; i += 64)
                    acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512((const void *)(xr + i)),
                                              _mm512_loadu_si512((const void *)(wr + i)));
                s = _mm512_reduce_add_epi32(acc);
#elif defined(__AVX2__)
                const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
                __m256i acc = _mm256_setzero_si256();
                for (; i + 32 <= k; i += 32) {
                    const __m256i xv = _mm256_xor_si256(_mm256_loadu_si256((const void *)(xr + i)), flip);
                    const __m256i wv = _mm256_loadu_si256((const void *)(wr + i));
                    const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(xv, xv), _mm256_sign_epi8(wv, xv));
                    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
                }
                s = hsum8_epi32(acc);
                for (; i < k; i++) s += ((int32_t)xr[i] - 128) * (int32_t)wr[i];
                offset = 0;
#endif
                for (; i < k; i++) s += (int32_t)xr[i] * (int32_t)wr[i];
                y[r * n + j] = f2bf16((float)(s - offset) * xs[r] * ws[j]);
            }
        }
    }
}

/* x (rows, k) bfloat16 -> out = round(x / scale) + 128 as unsigned bytes, scale = the row's largest magnitude / 127
   (symmetric, per row: values -127..127 before the offset). */
void quantize_rows_u8(const uint16_t *x, uint8_t *out, float *scale, int64_t rows, int64_t k) {
    for (int64_t r = 0; r < rows; r++) {
        float m = 1e-12f;
        for (int64_t i = 0; i < k; i++) {
            const float v = bf16f(x[r * k + i]);
            m = v > m ? v : (-v > m ? -v : m);
        }
        scale[r] = m / 127.f;
        const float inv = 127.f / m;
        for (int64_t i = 0; i < k; i++) out[r * k + i] = (uint8_t)(lrintf(bf16f(x[r * k + i]) * inv) + 128);
    }
}
