/* Structured output's token masks on float32 logits: a 32-bit word per 32 tokens, bit t % 32 of word t / 32 set
   where token t is allowed; the others become -inf. torch has no bit unpacking, and its way round it (a lookup
   table, then masked_fill) took 20 ms for 64 rows of 49152 logits on an Intel Xeon. Built by
   lmcli/kernels/native.py. */
#include <stdint.h>

/* Row rows[i] of x (rows of n floats) keeps what mask row i (words 32-bit words) allows. -inf is written as its
   bits: the library is built with -ffast-math, under which the compiler may assume no infinities. */
void mask_logits_f32(float *x, const int32_t *mask, const int64_t *rows, int64_t nrows, int64_t n,
                     int64_t words) {
    #pragma omp parallel for schedule(static) if (nrows * n >= 262144)
    for (int64_t i = 0; i < nrows; i++) {
        uint32_t *row = (uint32_t *)(x + rows[i] * n);
        const uint32_t *m = (const uint32_t *)(mask + i * words);
        for (int64_t w = 0; w * 32 < n; w++) {  /* no branch: a random mask would mispredict every other token */
            uint32_t bits = m[w], *out = row + w * 32;
            if (n - w * 32 >= 32) {
                for (int j = 0; j < 32; j++) {
                    uint32_t keep = 0u - ((bits >> j) & 1u);
                    out[j] = (out[j] & keep) | (0xFF800000u & ~keep);
                }
            } else {
                for (int j = 0; j < n - w * 32; j++) {
                    uint32_t keep = 0u - ((bits >> j) & 1u);
                    out[j] = (out[j] & keep) | (0xFF800000u & ~keep);
                }
            }
        }
    }
}
