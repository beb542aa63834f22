/* Causal attention of one sequence's chunk of new tokens over its whole context, read in place from the paged
   KV cache (a first prompt, a later chunk of it, or an interactive turn after a long history), bfloat16.

   The L new tokens sit at the last L of S context positions and each sees the keys up to its own position (window
   > 0: its last `window` keys only). For
   each kv head, the rows are its query heads of each token, token-major (row = token * group + head): tiles of
   16 rows, one row per vector lane, so the softmax needs no horizontal sums. Per 32 keys: scores by dpbf16
   products (q pairs of 16 rows against a broadcast k pair), online softmax in float32 with a vector exp2, P
   rounded to bfloat16 and paired along the keys, V rows interleaved in pairs, P.V by dpbf16 (as GPU flash
   attention, P in the input precision). Built by lmcli/kernels/native.py. */
#include <float.h>
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define MAX_DIM 256

#if defined(__AVX512BF16__)
static inline uint32_t pair_at(const uint16_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}
#endif

/* q (L tokens, q_stride elements apart, heads * dim each); caches (blocks, kv_heads, block_size, dim); table:
   the sequence's blocks; out (L tokens, out_stride apart) bfloat16. 0 on success, -1 where the kernel does not
   apply (no AVX512-BF16, head_dim not a multiple of 32 or over 256): the caller then uses another path. */
int prefill_attention(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache, const int64_t *table,
                      uint16_t *out, int64_t L, int64_t S, int64_t heads, int64_t kv_heads, int64_t dim,
                      int64_t block_size, int64_t q_stride, int64_t out_stride, int64_t window, float scale) {
#if defined(__AVX512BF16__)
    if (dim % 32 || dim > MAX_DIM || L > S || L < 1 || heads % kv_heads) return -1;
    const int64_t group = heads / kv_heads, rows = L * group, tiles = (rows + 15) / 16, dp_n = dim / 2,
                  dv = dim / 16;
    const float c = scale * 1.44269504f;  /* scores in base 2 */
    __m512i lo_idx, hi_idx, pair_idx;
    {
        int16_t lo[32], hi[32], pr[32];
        for (int i = 0; i < 16; i++) {
            lo[2 * i] = (int16_t)i, lo[2 * i + 1] = (int16_t)(32 + i);
            hi[2 * i] = (int16_t)(16 + i), hi[2 * i + 1] = (int16_t)(48 + i);
            pr[2 * i] = (int16_t)i, pr[2 * i + 1] = (int16_t)(16 + i);
        }
        lo_idx = _mm512_loadu_si512(lo), hi_idx = _mm512_loadu_si512(hi), pair_idx = _mm512_loadu_si512(pr);
    }
    #pragma omp parallel for schedule(dynamic)
    for (int64_t task = 0; task < kv_heads * tiles; task++) {
        const int64_t h = task % kv_heads, r0 = (tiles - 1 - task / kv_heads) * 16;  /* the longest tiles first */
        const int64_t nr = rows - r0 < 16 ? rows - r0 : 16;
        uint32_t qt[MAX_DIM / 2][16], pt[16][16];
        int32_t lim[16], low[16];
        float corr[16];
        __m512 acc[16][MAX_DIM / 16], vt[16][MAX_DIM / 16];
        for (int lane = 0; lane < 16; lane++) {  /* a short tile repeats its last row in the spare lanes */
            const int64_t r = r0 + (lane < nr ? lane : nr - 1), i = r / group, g = r % group;
            const uint16_t *qr = q + i * q_stride + (h * group + g) * dim;
            lim[lane] = (int32_t)(S - L + i);
            low[lane] = window > 0 ? lim[lane] - (int32_t)window + 1 : 0;  /* the first key the row sees */
            for (int64_t dp = 0; dp < dp_n; dp++) qt[dp][lane] = pair_at(qr + 2 * dp);
            for (int64_t j = 0; j < dv; j++) acc[lane][j] = _mm512_setzero_ps();
        }
        const __m512i limit = _mm512_loadu_si512(lim), lowest = _mm512_loadu_si512(low);
        const int64_t top = lim[nr - 1];
        __m512 m = _mm512_set1_ps(-FLT_MAX), l = _mm512_setzero_ps();
        for (int64_t s0 = low[0] > 0 ? low[0] : 0; s0 <= top; s0 += 32) {
            const int64_t n = S - s0 < 32 ? S - s0 : 32;
            const uint16_t *kr[32], *vr[32];
            for (int64_t j = 0; j < 32; j++) {
                const int64_t s = s0 + (j < n ? j : 0);
                const int64_t at = ((table[s / block_size] * kv_heads + h) * block_size + s % block_size) * dim;
                kr[j] = k_cache + at, vr[j] = v_cache + at;
            }
            __m512 sc[32];
            __mmask16 ok[32];
            for (int64_t j = 0; j < 32; j += 4) {
                __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                for (int64_t dp = 0; dp < dp_n; dp++) {
                    const __m512bh qv = (__m512bh)_mm512_loadu_si512(qt[dp]);
                    a0 = _mm512_dpbf16_ps(a0, qv, (__m512bh)_mm512_set1_epi32((int)pair_at(kr[j] + 2 * dp)));
                    a1 = _mm512_dpbf16_ps(a1, qv, (__m512bh)_mm512_set1_epi32((int)pair_at(kr[j + 1] + 2 * dp)));
                    a2 = _mm512_dpbf16_ps(a2, qv, (__m512bh)_mm512_set1_epi32((int)pair_at(kr[j + 2] + 2 * dp)));
                    a3 = _mm512_dpbf16_ps(a3, qv, (__m512bh)_mm512_set1_epi32((int)pair_at(kr[j + 3] + 2 * dp)));
                }
                sc[j] = a0, sc[j + 1] = a1, sc[j + 2] = a2, sc[j + 3] = a3;
            }
            __m512 mn = m;
            for (int64_t j = 0; j < 32; j++) {  /* keys after a row's position (or past the context) are out, and
                                                   those before its window */
                const __m512i key = _mm512_set1_epi32((int)(s0 + j));
                ok[j] = _mm512_cmple_epi32_mask(key, limit) & _mm512_cmpge_epi32_mask(key, lowest);
                sc[j] = _mm512_mask_mul_ps(_mm512_set1_ps(-FLT_MAX), ok[j], sc[j], _mm512_set1_ps(c));
                mn = _mm512_max_ps(mn, sc[j]);
            }
            const __m512 r = exp2v(_mm512_sub_ps(m, mn));
            _mm512_storeu_ps(corr, r);
            m = mn, l = _mm512_mul_ps(l, r);
            for (int64_t j = 0; j < 32; j += 2) {
                const __m512 p0 = _mm512_maskz_mov_ps(ok[j], exp2v(_mm512_sub_ps(sc[j], m)));
                const __m512 p1 = _mm512_maskz_mov_ps(ok[j + 1], exp2v(_mm512_sub_ps(sc[j + 1], m)));
                l = _mm512_add_ps(l, _mm512_add_ps(p0, p1));
                const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(p1, p0);  /* p0 in the low half */
                _mm512_storeu_si512(pt[j / 2], _mm512_permutexvar_epi16(pair_idx, both));
                for (int64_t x = 0; x < dim / 32; x++) {  /* v rows j and j + 1 interleaved: dpbf16 pairs */
                    const __m512i a = j < n ? _mm512_loadu_si512(vr[j] + 32 * x) : _mm512_setzero_si512();
                    const __m512i b = j + 1 < n ? _mm512_loadu_si512(vr[j + 1] + 32 * x) : _mm512_setzero_si512();
                    vt[j / 2][2 * x] = (__m512)_mm512_permutex2var_epi16(a, lo_idx, b);
                    vt[j / 2][2 * x + 1] = (__m512)_mm512_permutex2var_epi16(a, hi_idx, b);
                }
            }
            for (int64_t lane = 0; lane < nr; lane++) {
                const __m512 cr = _mm512_set1_ps(corr[lane]);
                __m512 a[MAX_DIM / 16];
                for (int64_t x = 0; x < dv; x++) a[x] = _mm512_mul_ps(acc[lane][x], cr);
                for (int64_t jp = 0; jp < 16; jp++) {
                    const __m512bh pb = (__m512bh)_mm512_set1_epi32((int)pt[jp][lane]);
                    for (int64_t x = 0; x < dv; x++) a[x] = _mm512_dpbf16_ps(a[x], pb, (__m512bh)vt[jp][x]);
                }
                for (int64_t x = 0; x < dv; x++) acc[lane][x] = a[x];
            }
        }
        float sums[16];
        _mm512_storeu_ps(sums, l);
        for (int64_t lane = 0; lane < nr; lane++) {
            const int64_t r = r0 + lane, i = r / group, g = r % group;
            uint16_t *o = out + i * out_stride + (h * group + g) * dim;
            const __m512 inv = _mm512_set1_ps(1.f / sums[lane]);
            for (int64_t x = 0; x < dv; x++)
                _mm256_storeu_si256((__m256i *)(o + 16 * x),
                                    (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[lane][x], inv)));
        }
    }
    return 0;
#else
    (void)q, (void)k_cache, (void)v_cache, (void)table, (void)out, (void)L, (void)S, (void)heads, (void)kv_heads,
        (void)dim, (void)block_size, (void)q_stride, (void)out_stride, (void)window, (void)scale;
    return -1;
#endif
}
