/* Causal attention of a prompt's tokens over themselves, bfloat16, for one kv head at a time (a sequence's first
   prefill chunk; torch's CPU flash kernel stays in use for chunks after a cached context, where it was faster).

   The L queries sit at the last L of S context positions and each sees keys up to its own position. K comes as
   dpbf16 pairs along head_dim, kt (dim/2, S_pad, 2); V as pairs along the keys, vp (S_pad/2, dim, 2); S_pad a
   multiple of 32. Tiles of 4 query rows x 32 keys: scores by dpbf16 products with each K tile read once for 4
   rows, online softmax in float32, P rounded to bfloat16 for the P.V products (as GPU flash attention does).
   Built by lmcli/kernels/native.py. */
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_DIM 256

/* q (kv_heads, rows, dim) with rows = group * L, row g * L + i being query i of head g; kt (kv_heads, dim/2,
   s_pad, 2); vp (kv_heads, s_pad/2, dim, 2); out (kv_heads, rows, dim) float32. 0 on success, -1 when the shape
   is beyond this kernel (the caller then uses another path). */
int prefill_attention(const uint16_t *q, const uint16_t *kt, const uint16_t *vp, float *out, int64_t kv_heads,
                      int64_t rows, int64_t L, int64_t S, int64_t s_pad, int64_t dim, float scale) {
#if defined(__AVX512BF16__)
    if (dim % 32 || dim > MAX_DIM || s_pad % 32 || s_pad < S || L > S) return -1;
    const int64_t tiles = (rows + 3) / 4, dp_n = dim / 2, dv = dim / 16;
    #pragma omp parallel for schedule(dynamic)
    for (int64_t task = 0; task < kv_heads * tiles; task++) {
        const int64_t h = task / tiles, r0 = task % tiles * 4;
        const uint16_t *kh = kt + h * dp_n * s_pad * 2, *vh = vp + h * (s_pad / 2) * dim * 2;
        int64_t row[4], limit[4], top = 0;
        float m[4], l[4];
        __m512 acc[4][MAX_DIM / 16];
        for (int i = 0; i < 4; i++) {
            row[i] = r0 + i < rows ? r0 + i : rows - 1;  /* a short last tile repeats its last row */
            limit[i] = S - L + row[i] % L;  /* the last key this row sees */
            top = limit[i] > top ? limit[i] : top;
            m[i] = -FLT_MAX, l[i] = 0.f;
            for (int64_t j = 0; j < dv; j++) acc[i][j] = _mm512_setzero_ps();
        }
        const uint16_t *qh = q + h * rows * dim;
        const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        for (int64_t s0 = 0; s0 <= top; s0 += 32) {
            __m512 sc[4][2];
            for (int i = 0; i < 4; i++) sc[i][0] = sc[i][1] = _mm512_setzero_ps();
            for (int64_t dp = 0; dp < dp_n; dp++) {
                const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kh + (dp * s_pad + s0) * 2);
                const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kh + (dp * s_pad + s0 + 16) * 2);
                for (int i = 0; i < 4; i++) {
                    uint32_t pair;
                    memcpy(&pair, qh + row[i] * dim + 2 * dp, 4);
                    const __m512bh qb = (__m512bh)_mm512_set1_epi32((int)pair);
                    sc[i][0] = _mm512_dpbf16_ps(sc[i][0], qb, k0);
                    sc[i][1] = _mm512_dpbf16_ps(sc[i][1], qb, k1);
                }
            }
            const __m512i k0i = _mm512_add_epi32(lane, _mm512_set1_epi32((int)s0));
            const __m512i k1i = _mm512_add_epi32(k0i, _mm512_set1_epi32(16));
            for (int i = 0; i < 4; i++) {  /* keys after this row's position count for nothing */
                const __m512i lim = _mm512_set1_epi32((int)limit[i]);
                const __mmask16 ok0 = _mm512_cmple_epi32_mask(k0i, lim), ok1 = _mm512_cmple_epi32_mask(k1i, lim);
                const __m512 lowest = _mm512_set1_ps(-FLT_MAX);
                const __m512 a = _mm512_mask_mul_ps(lowest, ok0, sc[i][0], _mm512_set1_ps(scale));
                const __m512 b = _mm512_mask_mul_ps(lowest, ok1, sc[i][1], _mm512_set1_ps(scale));
                const float nm = fmaxf(m[i], fmaxf(_mm512_reduce_max_ps(a), _mm512_reduce_max_ps(b)));
                const float r = expf(m[i] - nm);
                m[i] = nm;
                float e[32];
                _mm512_storeu_ps(e, _mm512_sub_ps(a, _mm512_set1_ps(nm)));
                _mm512_storeu_ps(e + 16, _mm512_sub_ps(b, _mm512_set1_ps(nm)));
                float sum = 0.f;
                for (int t = 0; t < 32; t++) {
                    e[t] = e[t] < -80.f ? 0.f : expf(e[t]);
                    sum += e[t];
                }
                const __m512bh p = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(e + 16), _mm512_loadu_ps(e));
                uint32_t pairs[16];
                _mm512_storeu_si512(pairs, (__m512i)p);
                l[i] = l[i] * r + sum;
                const __m512 rv = _mm512_set1_ps(r);
                for (int64_t j = 0; j < dv; j++) acc[i][j] = _mm512_mul_ps(acc[i][j], rv);
                for (int kp = 0; kp < 16; kp++) {
                    if (!pairs[kp]) continue;  /* both keys masked or negligible */
                    const __m512bh pv = (__m512bh)_mm512_set1_epi32((int)pairs[kp]);
                    const uint16_t *vrow = vh + (s0 / 2 + kp) * dim * 2;
                    for (int64_t j = 0; j < dv; j++)
                        acc[i][j] = _mm512_dpbf16_ps(acc[i][j], pv, (__m512bh)_mm512_loadu_si512(vrow + j * 32));
                }
            }
        }
        for (int i = 0; i < 4 && r0 + i < rows; i++) {
            float *o = out + (h * rows + r0 + i) * dim;
            const __m512 inv = _mm512_set1_ps(1.f / l[i]);
            for (int64_t j = 0; j < dv; j++) _mm512_storeu_ps(o + 16 * j, _mm512_mul_ps(acc[i][j], inv));
        }
    }
    return 0;
#else
    (void)q, (void)kt, (void)vp, (void)out, (void)kv_heads, (void)rows, (void)L, (void)S, (void)s_pad, (void)dim,
        (void)scale;
    return -1;
#endif
}
