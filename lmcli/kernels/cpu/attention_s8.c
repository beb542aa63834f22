/* Decode attention over the 8-bit paged KV cache (kernels/kv8.py), reading the bytes and scales in place.

   As paged_decode_attention (attention.c), with each cache a pair: codes (blocks, kv_heads, block_size, dim)
   int8 and scales (blocks, kv_heads, block_size) float16, a row being codes * scale. A key's scale multiplies its
   scores (q . (s k) = s (q . k)), a value's scale its probabilities, so rows are only widened, never scaled. One
   task per (sequence, kv head) serves the kv head's group of query heads in one pass, online softmax per block,
   float32 throughout. AVX2 widens 8 bytes at a time (also at the avx512 level); the portable body is plain loops. */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define S8_GROUP 8
#define S8_DIM 256
#define S8_BLOCK 256

#if defined(__AVX2__) && defined(__FMA__)
static inline __m256 widen8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const void *)p)));
}
#endif

static void attend_s8(const float *qf, const int8_t *k, const uint16_t *ks, const int8_t *v, const uint16_t *vs,
                      const int64_t *table, int64_t len, int64_t h, int64_t group, int64_t kv_heads, int64_t dim,
                      int64_t block_size, uint16_t **out) {
    float acc[S8_GROUP * S8_DIM], sc[S8_GROUP][S8_BLOCK], mx[S8_GROUP], sum[S8_GROUP];
    for (int64_t g = 0; g < group; g++) mx[g] = -FLT_MAX, sum[g] = 0.f;  /* finite: built with -ffast-math */
    memset(acc, 0, sizeof(float) * group * dim);
    for (int64_t start = 0; start < len; start += block_size) {
        const int64_t n = len - start < block_size ? len - start : block_size;
        const int64_t row0 = (table[start / block_size] * kv_heads + h) * block_size;
        const int8_t *kb = k + row0 * dim, *vb = v + row0 * dim;
        for (int64_t l = 0; l < n; l++) {  /* scores: each key row widened once for the group */
            const float s = f16f(ks[row0 + l]);
            int64_t j = 0;
            float dot[S8_GROUP] = {0.f};
#if defined(__AVX2__) && defined(__FMA__)
            __m256 a[S8_GROUP];
            for (int64_t g = 0; g < group; g++) a[g] = _mm256_setzero_ps();
            for (; j + 8 <= dim; j += 8) {
                const __m256 kv = widen8(kb + l * dim + j);
                for (int64_t g = 0; g < group; g++) a[g] = _mm256_fmadd_ps(_mm256_loadu_ps(qf + g * dim + j), kv, a[g]);
            }
            for (int64_t g = 0; g < group; g++) dot[g] = hsum8(a[g]);
#endif
            for (; j < dim; j++)
                for (int64_t g = 0; g < group; g++) dot[g] += qf[g * dim + j] * (float)kb[l * dim + j];
            for (int64_t g = 0; g < group; g++) sc[g][l] = s * dot[g];
        }
        for (int64_t g = 0; g < group; g++) {
            float m = mx[g];  /* a new maximum rescales what was summed so far */
            for (int64_t l = 0; l < n; l++) m = sc[g][l] > m ? sc[g][l] : m;
            if (m > mx[g]) {
                const float r = expf(mx[g] - m);
                sum[g] *= r;
                for (int64_t d = 0; d < dim; d++) acc[g * dim + d] *= r;
                mx[g] = m;
            }
            for (int64_t l = 0; l < n; l++) {
                const float p = expf(sc[g][l] - m);
                sum[g] += p;
                sc[g][l] = p * f16f(vs[row0 + l]);  /* the value's scale folded into its weight */
            }
        }
        for (int64_t l = 0; l < n; l++) {  /* acc[g] += p[g][l] * v_l: each value row widened once */
            int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
            for (; j + 8 <= dim; j += 8) {
                const __m256 vv = widen8(vb + l * dim + j);
                for (int64_t g = 0; g < group; g++)
                    _mm256_storeu_ps(acc + g * dim + j, _mm256_fmadd_ps(_mm256_set1_ps(sc[g][l]), vv,
                                                                       _mm256_loadu_ps(acc + g * dim + j)));
            }
#endif
            for (; j < dim; j++)
                for (int64_t g = 0; g < group; g++) acc[g * dim + j] += sc[g][l] * (float)vb[l * dim + j];
        }
    }
    for (int64_t g = 0; g < group; g++)
        for (int64_t d = 0; d < dim; d++) out[g][d] = f2bf16(sum[g] > 0.f ? acc[g * dim + d] / sum[g] : 0.f);
}

/* q (seqs, heads, dim) bfloat16, q_stride elements a sequence; out (seqs, heads, dim) bfloat16. 0 on success, -1
   for sizes beyond this kernel (more than 8 query heads a kv head, head_dim or block over 256). */
int paged_decode_attention_s8(const uint16_t *q, const int8_t *k, const uint16_t *ks, const int8_t *v,
                              const uint16_t *vs, const int64_t *block_tables, const int64_t *lens, uint16_t *out,
                              int64_t q_stride, int64_t seqs, int64_t heads, int64_t kv_heads, int64_t dim,
                              int64_t block_size, int64_t max_blocks, float scale) {
    const int64_t group = heads / kv_heads;
    if (group > S8_GROUP || dim > S8_DIM || block_size > S8_BLOCK) return -1;
    #pragma omp parallel for schedule(dynamic)
    for (int64_t task = 0; task < seqs * kv_heads; task++) {
        const int64_t s = task / kv_heads, h = task % kv_heads;
        float qf[S8_GROUP * S8_DIM];
        uint16_t *o[S8_GROUP];
        const uint16_t *qb = q + s * q_stride + h * group * dim;
        for (int64_t g = 0; g < group; g++) {
            for (int64_t d = 0; d < dim; d++) qf[g * dim + d] = scale * bf16f(qb[g * dim + d]);
            o[g] = out + (s * heads + h * group + g) * dim;
        }
        attend_s8(qf, k, ks, v, vs, block_tables + s * max_blocks, lens[s], h, group, kv_heads, dim, block_size, o);
    }
    return 0;
}
