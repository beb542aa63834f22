/* RMS norm with the residual add before it, in one pass over bfloat16 rows (one call instead of seven small
   torch ops, 60 a decode step). Numerics follow the PyTorch reference (the sum of squares may add up in another
   order: about 1 output in 100,000 differs by one bfloat16 step): the sum x + residual rounded to
   bfloat16, statistics in float32, the normalized row rounded to bfloat16, then times the weight, rounded.
   Built by lmcli/kernels/native.py. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

/* out = rms_norm(x (+ residual)) * weight; with a residual, sum <- x + residual. Rows of dim values. */
void add_rms_norm_bf16(const uint16_t *x, const uint16_t *residual, const uint16_t *weight, uint16_t *out,
                       uint16_t *sum, int64_t rows, int64_t dim, float eps) {
    #pragma omp parallel for schedule(static) if (rows * dim >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * dim;
        uint16_t *s = residual ? sum + r * dim : (uint16_t *)xr;
        float ss = 0.f;
        for (int64_t d = 0; d < dim; d++) {
            float v = bf16f(xr[d]);
            if (residual) {
                const uint16_t h = f2bf16(v + bf16f(residual[r * dim + d]));
                s[d] = h;
                v = bf16f(h);
            }
            ss += v * v;
        }
        const float inv = 1.f / sqrtf(ss / (float)dim + eps);
        uint16_t *o = out + r * dim;
        for (int64_t d = 0; d < dim; d++) o[d] = f2bf16(bf16f(weight[d]) * bf16f(f2bf16(bf16f(s[d]) * inv)));
    }
}
