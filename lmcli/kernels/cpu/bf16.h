/* bfloat16 <-> float32 for the CPU kernels (a bfloat16 is the top half of a float32). */
#ifndef LMCLI_BF16_H
#define LMCLI_BF16_H
#include <stdint.h>
#include <string.h>

static inline float bf16f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

static inline uint16_t f2bf16(float f) {  /* round to nearest even (finite values) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7F800000u) == 0x7F800000u) return (uint16_t)(u >> 16);  /* inf, nan */
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
#endif
