/* Decode attention over the 8-bit paged KV cache (kernels/kv8.py), reading the bytes and scales in place.

   As paged_decode_attention (attention.c), with each cache a pair: codes (blocks, kv_heads, block_size, dim)
   int8 and scales (blocks, kv_heads, block_size) float16, a row being codes * scale. A key's scale multiplies its
   scores (q . (s k) = s (q . k)), a value's scale its probabilities, so rows are only widened, never scaled. One
   task per (sequence, kv head) serves the kv head's group of query heads in one pass, online softmax per block,
   float32 throughout. With AVX-512 (head_dim a multiple of 16) as attention.c's body: scores 16 keys a vector (each
   key row widened once for the group, its per-head sums added across lanes 16 at a time), a vector softmax in base
   2, P.V with the rows widened once for the group. AVX2 widens 8 bytes at a time; the portable body is plain
   loops. */
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

#ifdef __AVX512F__
#define SC (S8_BLOCK + 16)  /* the stride of a head's scores */

/* The 16 float16 scales at s, lanes from n on zero (read only below n) */
static inline __m512 scales16(const uint16_t *s, int64_t n) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first_lanes(n), s));
}

/* G (<= 8) query heads (qf: scaled by scale * log2(e)) of kv head h over one sequence's keys first..len-1 */
static inline __attribute__((always_inline)) void attend512_s8(const float *qf, const int8_t *k, const uint16_t *ks,
        const int8_t *v, const uint16_t *vs, const int64_t *table, int64_t first, int64_t len, int64_t h, const int G,
        int64_t kv_heads, int64_t dim, int64_t block_size, uint16_t **out) {
    float acc[S8_GROUP * S8_DIM], sc[S8_GROUP * SC], mx[S8_GROUP], sum[S8_GROUP];
    __m512 part[S8_GROUP][16];  /* a chunk's per-key sums, each head's 16 then added across lanes at once */
    for (int g = 0; g < G; g++) mx[g] = -1e30f, sum[g] = 0.f;
    memset(acc, 0, sizeof(float) * G * dim);
    for (int64_t start = first, n; start < len; start += n) {  /* block by block (the first from its offset) */
        const int64_t off = start % block_size;
        n = len - start < block_size - off ? len - start : block_size - off;
        const int64_t chunks = (n + 15) / 16, row0 = (table[start / block_size] * kv_heads + h) * block_size + off;
        const int8_t *kb = k + row0 * dim, *vb = v + row0 * dim;
        for (int64_t i = 0; i < chunks; i++) {  /* scores: each key row widened once for the group */
            for (int r = 0; r < 16; r++) {
                __m512 a[8];
                for (int g = 0; g < G; g++) a[g] = _mm512_setzero_ps();
                if (16 * i + r < n)
                    for (int64_t j = 0; j < dim; j += 16) {
                        const __m512 kv = widen16(kb + (16 * i + r) * dim + j);
                        for (int g = 0; g < G; g++) a[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qf + g * dim + j), kv, a[g]);
                    }
                for (int g = 0; g < G; g++) part[g][SLOT(r)] = a[g];
            }
            const __m512 s = scales16(ks + row0 + 16 * i, n - 16 * i);
            for (int g = 0; g < G; g++)
                _mm512_storeu_ps(sc + g * SC + 16 * i, _mm512_mask_mul_ps(_mm512_set1_ps(-1e30f),
                                                                       first_lanes(n - 16 * i), hsum16(part[g]), s));
        }
        for (int g = 0; g < G; g++) {
            float *p = sc + g * SC;
            __m512 top = _mm512_set1_ps(-1e30f);
            for (int64_t i = 0; i < chunks; i++) top = _mm512_max_ps(top, _mm512_loadu_ps(p + 16 * i));
            const float m = raise_max(_mm512_reduce_max_ps(top), mx + g, sum + g, acc + g * dim, dim);
            __m512 total = _mm512_setzero_ps();
            for (int64_t i = 0; i < chunks; i++) {
                const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(p + 16 * i), _mm512_set1_ps(m));
                const __m512 e = _mm512_maskz_mov_ps(first_lanes(n - 16 * i), exp2v(d));
                total = _mm512_add_ps(total, e);  /* the value's scale folded into its weight, not the sum */
                _mm512_storeu_ps(p + 16 * i, _mm512_mul_ps(e, scales16(vs + row0 + 16 * i, n - 16 * i)));
            }
            sum[g] += _mm512_reduce_add_ps(total);
        }
        int64_t j = 0;
        if (G <= 6)
            for (; j + 64 <= dim; j += 64) pv16(sc, SC, vb, 1, n, dim, j, G, 4, acc);
        for (; j + 32 <= dim; j += 32) pv16(sc, SC, vb, 1, n, dim, j, G, 2, acc);
        for (; j < dim; j += 16) pv16(sc, SC, vb, 1, n, dim, j, G, 1, acc);
    }
    for (int g = 0; g < G; g++)
        for (int64_t d = 0; d < dim; d++) out[g][d] = f2bf16(sum[g] > 0.f ? acc[g * dim + d] / sum[g] : 0.f);
}
#endif

static void attend_s8(const float *qf, const int8_t *k, const uint16_t *ks, const int8_t *v, const uint16_t *vs,
                      const int64_t *table, int64_t first, int64_t len, int64_t h, int64_t group, int64_t kv_heads,
                      int64_t dim, int64_t block_size, uint16_t **out) {
    float acc[S8_GROUP * S8_DIM], sc[S8_GROUP][S8_BLOCK], mx[S8_GROUP], sum[S8_GROUP];
    for (int64_t g = 0; g < group; g++) mx[g] = -FLT_MAX, sum[g] = 0.f;  /* finite: built with -ffast-math */
    memset(acc, 0, sizeof(float) * group * dim);
    for (int64_t start = first, n; start < len; start += n) {
        const int64_t off = start % block_size;
        n = len - start < block_size - off ? len - start : block_size - off;
        const int64_t row0 = (table[start / block_size] * kv_heads + h) * block_size + off;
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

/* q (seqs, heads, dim) bfloat16, q_stride elements a sequence; out (seqs, heads, dim) bfloat16; window > 0: each
   sequence attends its last `window` keys only. 0 on success, -1 for sizes beyond this kernel (more than 8 query
   heads a kv head, head_dim or block over 256). */
int paged_decode_attention_s8(const uint16_t *q, const int8_t *k, const uint16_t *ks, const int8_t *v,
                              const uint16_t *vs, const int64_t *block_tables, const int64_t *lens, uint16_t *out,
                              int64_t q_stride, int64_t seqs, int64_t heads, int64_t kv_heads, int64_t dim,
                              int64_t block_size, int64_t max_blocks, int64_t window, float scale) {
    const int64_t group = heads / kv_heads;
    if (group > S8_GROUP || dim > S8_DIM || block_size > S8_BLOCK) return -1;
#ifdef __AVX512F__
    const int vector = dim % 16 == 0;
#else
    const int vector = 0;
#endif
    const float c = vector ? scale * 1.44269504f : scale;  /* the AVX-512 body scores in base 2 */
    #pragma omp parallel for schedule(dynamic)
    for (int64_t task = 0; task < seqs * kv_heads; task++) {
        const int64_t s = task / kv_heads, h = task % kv_heads;
        const int64_t first = window > 0 && lens[s] > window ? lens[s] - window : 0;
        float qf[S8_GROUP * S8_DIM];
        uint16_t *o[S8_GROUP];
        const uint16_t *qb = q + s * q_stride + h * group * dim;
        for (int64_t g = 0; g < group; g++) {
            for (int64_t d = 0; d < dim; d++) qf[g * dim + d] = c * bf16f(qb[g * dim + d]);
            o[g] = out + (s * heads + h * group + g) * dim;
        }
#ifdef __AVX512F__
        if (vector) {
#define ATTEND(G) attend512_s8(qf, k, ks, v, vs, block_tables + s * max_blocks, first, lens[s], h, G, kv_heads, \
                               dim, block_size, o)
            BY_COUNT(group, ATTEND)
            continue;
        }
#endif
        attend_s8(qf, k, ks, v, vs, block_tables + s * max_blocks, first, lens[s], h, group, kv_heads, dim, block_size,
                  o);
    }
    return 0;
}
