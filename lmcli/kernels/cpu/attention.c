/* Decode attention over the paged KV cache, reading K and V in place (no gathered copy of each context).

   One query token per sequence. q (seqs, heads, dim) bfloat16, q_stride elements from one sequence's row to the
   next; caches (blocks, kv_heads, block_size, dim) bfloat16; block_tables (seqs, max_blocks); lens (seqs,): keys
   0..len-1 are attended (window > 0: the last `window` of them only); out (seqs, heads, dim) bfloat16. OpenMP over (sequence, kv head): each task serves the
   kv head's group of query heads in one pass over its keys and values, block by block with an online softmax
   (each K and V row is read once, while it is in L1, for the whole group). Scores and sums in float32. With
   AVX-512 (head_dim a multiple of 32): a block's keys and values are prefetched as it starts, scores come 16 keys
   a vector, the softmax is a vector one in base 2, and P.V keeps up to 24 accumulators in registers (64 sequences,
   9 query and 3 kv heads of 64, 30 layers from memory: 17-22 ms against 20-27 at 128 keys, 31-40 against 47-50 at
   256, on an Intel Xeon). Built by lmcli/kernels/native.py. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <float.h>
#include <string.h>

#include "bf16.h"

#define MAX_GROUP 16
#define MAX_DIM 256
#define MAX_BLOCK 256
#define SC (MAX_BLOCK + 16)  /* the stride of a head's scores */


#ifdef __AVX512F__
/* Scores of the n (<= 16) key rows at k for one query head, key i in lane i, times c; lanes from n on: -1e30
   (q: dim float32, or bfloat16 pairs with AVX512-BF16) */
static inline __m512 scores16(const float *qf, const uint16_t *qb, const uint16_t *k, int64_t n, int64_t dim,
                              float c) {
    __m512 acc[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; i++) {
        __m512 a = _mm512_setzero_ps();
        if (i < n) {
            const uint16_t *row = k + i * dim;
#ifdef __AVX512BF16__
            for (int64_t j = 0; j < dim; j += 32)
                a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(qb + j), (__m512bh)_mm512_loadu_si512(row + j));
            (void)qf;
#else
            for (int64_t j = 0; j < dim; j += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(qf + j), load16(row + j), a);
            (void)qb;
#endif
        }
        acc[SLOT(i)] = a;
    }
    return _mm512_mask_mul_ps(_mm512_set1_ps(-1e30f), first_lanes(n), hsum16(acc), _mm512_set1_ps(c));
}

/* AVX-512, head_dim a multiple of 32: G (<= 8) query heads of one kv head over one sequence's keys first..len-1, as
   attend below. Per block: each head's scores 16 keys a vector, a vector online softmax in base 2, then P.V. */
static inline __attribute__((always_inline)) void attend512(const float *qf, const uint16_t *qb,
        const uint16_t *k_cache, const uint16_t *v_cache, const int64_t *table, int64_t first, int64_t len,
        int64_t h, const int G, int64_t kv_heads, int64_t dim, int64_t block_size, float scale, uint16_t **out) {
    float acc[8 * MAX_DIM], sc[8 * SC], mx[8], sum[8];
#ifdef __AVX512BF16__
    const float c = scale * 1.44269504f;  /* raw bfloat16 q: the scale applies to the scores */
#else
    const float c = 1.44269504f;  /* qf is scaled already */
#endif
    for (int g = 0; g < G; g++) mx[g] = -1e30f, sum[g] = 0.f;
    memset(acc, 0, sizeof(float) * G * dim);
    for (int64_t start = first, n; start < len; start += n) {  /* block by block (the first from its offset) */
        const int64_t off = start % block_size;
        n = len - start < block_size - off ? len - start : block_size - off;
        const int64_t chunks = (n + 15) / 16;
        const int64_t base = ((table[start / block_size] * kv_heads + h) * block_size + off) * dim;
        const uint16_t *kb = k_cache + base, *vb = v_cache + base;
        for (int64_t b = 0; b < n * dim * 2; b += 64) __builtin_prefetch((const char *)kb + b);
        for (int64_t b = 0; b < n * dim * 2; b += 64) __builtin_prefetch((const char *)vb + b);
        for (int g = 0; g < G; g++) {
            float *s = sc + g * SC;
            __m512 top = _mm512_set1_ps(-1e30f);
            for (int64_t i = 0; i < chunks; i++) {
                const __m512 v = scores16(qf + g * dim, qb + g * dim, kb + 16 * i * dim, n - 16 * i, dim, c);
                _mm512_storeu_ps(s + 16 * i, v);
                top = _mm512_max_ps(top, v);
            }
            const float m = raise_max(_mm512_reduce_max_ps(top), mx + g, sum + g, acc + g * dim, dim);
            __m512 total = _mm512_setzero_ps();
            for (int64_t i = 0; i < chunks; i++) {
                const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(s + 16 * i), _mm512_set1_ps(m));
                const __m512 e = _mm512_maskz_mov_ps(first_lanes(n - 16 * i), exp2v(d));
                _mm512_storeu_ps(s + 16 * i, e);
                total = _mm512_add_ps(total, e);
            }
            sum[g] += _mm512_reduce_add_ps(total);
        }
        int64_t j = 0;
        if (G <= 6)
            for (; j + 64 <= dim; j += 64) pv16(sc, SC, vb, 2, n, dim, j, G, 4, acc);
        for (; j < dim; j += 32) pv16(sc, SC, vb, 2, n, dim, j, G, 2, acc);
    }
    for (int g = 0; g < G; g++)
        for (int64_t d = 0; d < dim; d++) out[g][d] = f2bf16(sum[g] > 0.f ? acc[g * dim + d] / sum[g] : 0.f);
}
#endif

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define AVX2_BODY 1
/* AVX2: s[g][l] = qf[g] . k_l for the n key rows at k, each row widened once for the whole group of G query heads
   (G a constant in each call below, so that the accumulators stay in registers); dim a multiple of 8. */
static inline __attribute__((always_inline)) void dots_avx2(const float *qf, const uint16_t *k, int64_t n,
                                                             int64_t dim, const int G, float *sc) {
    for (int64_t l = 0; l < n; l++) {
        __m256 a[8];
        for (int g = 0; g < G; g++) a[g] = _mm256_setzero_ps();
        for (int64_t j = 0; j < dim; j += 8) {
            const __m256 kv = load8_bf16(k + l * dim + j);
            for (int g = 0; g < G; g++) a[g] = _mm256_fmadd_ps(_mm256_loadu_ps(qf + g * dim + j), kv, a[g]);
        }
        for (int g = 0; g < G; g++) sc[g * SC + l] = hsum8(a[g]);
    }
}

/* acc[g][j:j+8] += p[g][l] * v[l][j:j+8] over the n value rows at v, each read once for the group */
static inline __attribute__((always_inline)) void pv_avx2(const float *sc, const uint16_t *v, int64_t n,
                                                           int64_t dim, const int G, float *acc) {
    for (int64_t j = 0; j < dim; j += 8) {
        __m256 a[8];
        for (int g = 0; g < G; g++) a[g] = _mm256_loadu_ps(acc + g * dim + j);
        for (int64_t l = 0; l < n; l++) {
            const __m256 vv = load8_bf16(v + l * dim + j);
            for (int g = 0; g < G; g++) a[g] = _mm256_fmadd_ps(_mm256_set1_ps(sc[g * SC + l]), vv, a[g]);
        }
        for (int g = 0; g < G; g++) _mm256_storeu_ps(acc + g * dim + j, a[g]);
    }
}

#endif

/* One task: the group of query heads q[g] (scaled float32 qf) over one sequence's keys first..len-1
   of one kv head; out[g] = softmax(q[g] . K) V. */
static void attend(const float *qf, const uint16_t *k_cache, const uint16_t *v_cache, const int64_t *table,
                   int64_t first, int64_t len, int64_t h, int64_t group, int64_t kv_heads, int64_t dim,
                   int64_t block_size, uint16_t **out) {
    float acc[MAX_GROUP * MAX_DIM], sc[MAX_GROUP * SC], mx[MAX_GROUP], sum[MAX_GROUP];
    for (int64_t g = 0; g < group; g++) mx[g] = -FLT_MAX, sum[g] = 0.f;  /* finite: built with -ffast-math */
    memset(acc, 0, sizeof(float) * group * dim);
    for (int64_t start = first, n; start < len; start += n) {
        const int64_t off = start % block_size;
        n = len - start < block_size - off ? len - start : block_size - off;
        const int64_t base = ((table[start / block_size] * kv_heads + h) * block_size + off) * dim;
        const uint16_t *kb = k_cache + base, *vb = v_cache + base;
#ifdef AVX2_BODY
        const int avx2 = dim % 8 == 0 && group <= 8;
        if (avx2) {
#define DOTS(G) dots_avx2(qf, kb, n, dim, G, sc)
            BY_COUNT(group, DOTS)
        }
#else
        const int avx2 = 0;
#endif
        for (int64_t g = 0; g < group; g++) {
            float *s = sc + g * SC;
            if (avx2) {
                /* the whole group's scores were computed above */
            } else
            for (int64_t l = 0; l < n; l++) {
                float a = 0.f;
                for (int64_t d = 0; d < dim; d++) a += qf[g * dim + d] * bf16f(kb[l * dim + d]);
                s[l] = a;
            }
            float m = mx[g];  /* a new maximum rescales what was summed so far */
            for (int64_t l = 0; l < n; l++) m = s[l] > m ? s[l] : m;
            if (m > mx[g]) {
                const float r = expf(mx[g] - m);
                sum[g] *= r;
                for (int64_t d = 0; d < dim; d++) acc[g * dim + d] *= r;
                mx[g] = m;
            }
            float total = 0.f;
            for (int64_t l = 0; l < n; l++) {
                s[l] = expf(s[l] - m);
                total += s[l];
            }
            sum[g] += total;
        }
#ifdef AVX2_BODY
        if (avx2) {
#define PV(G) pv_avx2(sc, vb, n, dim, G, acc)
            BY_COUNT(group, PV)
            continue;
        }
#endif
        for (int64_t j = 0; j < dim; j += 16) {  /* acc[g][j:j+16] += p[g][l] * v[l][j:j+16], each v read once */
            const int64_t w = dim - j < 16 ? dim - j : 16;
            for (int64_t l = 0; l < n; l++)
                for (int64_t g = 0; g < group; g++)
                    for (int64_t d = j; d < j + w; d++) acc[g * dim + d] += sc[g * SC + l] * bf16f(vb[l * dim + d]);
        }
    }
    for (int64_t g = 0; g < group; g++)
        for (int64_t d = 0; d < dim; d++) out[g][d] = f2bf16(sum[g] > 0.f ? acc[g * dim + d] / sum[g] : 0.f);
}

/* 0 on success; -1 if a size is beyond this kernel's limits (the caller then uses another path) */
int paged_decode_attention(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache,
                           const int64_t *block_tables, const int64_t *lens, uint16_t *out, int64_t q_stride,
                           int64_t seqs, int64_t heads, int64_t kv_heads, int64_t dim, int64_t block_size,
                           int64_t max_blocks, int64_t window, float scale) {
    const int64_t group = heads / kv_heads;
    if (group > MAX_GROUP || dim > MAX_DIM || block_size > MAX_BLOCK) return -1;
    #pragma omp parallel for schedule(dynamic)
    for (int64_t task = 0; task < seqs * kv_heads; task++) {
        const int64_t s = task / kv_heads, h = task % kv_heads;
        const int64_t first = window > 0 && lens[s] > window ? lens[s] - window : 0;
        float qf[MAX_GROUP * MAX_DIM];
        uint16_t *o[MAX_GROUP];
        const uint16_t *qb = q + s * q_stride + h * group * dim;
        for (int64_t g = 0; g < group; g++) {
            for (int64_t d = 0; d < dim; d++) qf[g * dim + d] = scale * bf16f(qb[g * dim + d]);
            o[g] = out + (s * heads + h * group + g) * dim;
        }
#ifdef __AVX512F__
        if (dim % 32 == 0) {  /* up to 8 query heads at a time */
            for (int64_t g0 = 0; g0 < group; g0 += 8) {
#define ATTEND512(G) attend512(qf + g0 * dim, qb + g0 * dim, k_cache, v_cache, block_tables + s * max_blocks, \
                               first, lens[s], h, G, kv_heads, dim, block_size, scale, o + g0)
                BY_COUNT(group - g0, ATTEND512)
            }
            continue;
        }
#endif
        attend(qf, k_cache, v_cache, block_tables + s * max_blocks, first, lens[s], h, group, kv_heads, dim,
               block_size, o);
    }
    return 0;
}
