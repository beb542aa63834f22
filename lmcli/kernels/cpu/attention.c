/* Decode attention over the paged KV cache, reading K and V in place (no gathered copy of each context).

   One query token per sequence. q (seqs, heads, dim) bfloat16; caches (blocks, kv_heads, block_size, dim)
   bfloat16; block_tables (seqs, max_blocks); lens (seqs,): keys 0..len-1 are attended; out (seqs, heads, dim)
   float32. OpenMP over (sequence, kv head); scores in float32; two passes: scores and their softmax, then the
   weighted sum of values. Built by lmcli/kernels/native.py. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

void paged_decode_attention(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache,
                            const int64_t *block_tables, const int64_t *lens, float *out,
                            int64_t seqs, int64_t heads, int64_t kv_heads, int64_t dim, int64_t block_size,
                            int64_t max_blocks, float scale) {
    const int64_t group = heads / kv_heads;
    #pragma omp parallel for schedule(dynamic)
    for (int64_t task = 0; task < seqs * kv_heads; task++) {
        const int64_t s = task / kv_heads, h = task % kv_heads, len = lens[s];
        const int64_t *table = block_tables + s * max_blocks;
        float *scores = malloc(sizeof(float) * group * len);
        float *qf = malloc(sizeof(float) * group * dim);
        for (int64_t g = 0; g < group; g++)
            for (int64_t d = 0; d < dim; d++) qf[g * dim + d] = bf16f(q[(s * heads + h * group + g) * dim + d]);
        for (int64_t l = 0; l < len; l++) {
            const uint16_t *k = k_cache + ((table[l / block_size] * kv_heads + h) * block_size + l % block_size) * dim;
            float kf[dim];
            for (int64_t d = 0; d < dim; d++) kf[d] = bf16f(k[d]);
            for (int64_t g = 0; g < group; g++) {
                float acc = 0.f;
                for (int64_t d = 0; d < dim; d++) acc += qf[g * dim + d] * kf[d];
                scores[g * len + l] = acc * scale;
            }
        }
        for (int64_t g = 0; g < group; g++) {
            float *sc = scores + g * len, mx = -INFINITY, sum = 0.f;
            for (int64_t l = 0; l < len; l++) mx = sc[l] > mx ? sc[l] : mx;
            for (int64_t l = 0; l < len; l++) { sc[l] = expf(sc[l] - mx); sum += sc[l]; }
            float *o = out + (s * heads + h * group + g) * dim;
            for (int64_t d = 0; d < dim; d++) o[d] = 0.f;
            for (int64_t l = 0; l < len; l++) {
                const uint16_t *v = v_cache + ((table[l / block_size] * kv_heads + h) * block_size + l % block_size) * dim;
                const float p = sc[l] / sum;
                for (int64_t d = 0; d < dim; d++) o[d] += p * bf16f(v[d]);
            }
        }
        free(scores);
        free(qf);
    }
}
