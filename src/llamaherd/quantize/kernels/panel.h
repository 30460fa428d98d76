/* The int16 panel's inner loop, shared by blockmm.c (Q4_0, Q4_1, Q8_0) and kquant.c (a prompt of the
 * K-quants, Q5_0, Q5_1): the exact integer dot products of four rows of x at a time with a panel of
 * 16 output features, whose int16 code pairs for each pair of inputs q lie in two registers
 * (features 0..7, 8..15), block after block: `codes[(b * 16 + q) * 2 + h]`. x is blockmm.c's int16
 * blocks of 32 (block_quantize), read as int32 pairs. */
#ifndef HERD_PANEL_H
#define HERD_PANEL_H
#include <stdint.h>

#include "simd.h"

/* From this many rows of x on, the matmuls take the panel (a few rows' tiles would decode each
 * block of weights twice); the numbers are the same either way. */
#define PANEL_ROWS 9

#if HERD_SIMD
/* Pair q of a block for four rows of x (int32 pairs at x0, ld bytes apart): the panel's two code
 * registers, each row's pair broadcast, two madds and two adds a row into sums a0 .. a7. Written
 * in assembly because GCC 12 keeps the eight sums in registers only by copying each of them every
 * step (a third more instructions: the float32 path was as fast). */
#define PANEL_ROW(q, row, lo, hi)                                                                    \
    "vpbroadcastd " #q "*4(" row "), %%ymm14\n\t"                                                     \
    "vpmaddwd %%ymm14, %%ymm12, %%ymm15\n\tvpaddd %%ymm15, %[" lo "], %[" lo "]\n\t"                  \
    "vpmaddwd %%ymm14, %%ymm13, %%ymm14\n\tvpaddd %%ymm14, %[" hi "], %[" hi "]\n\t"
#define PANEL_STEP(q)                                                                                \
    "vmovdqa " #q "*64(%[c]), %%ymm12\n\tvmovdqa " #q "*64+32(%[c]), %%ymm13\n\t"                  \
    PANEL_ROW(q, "%[x0]", "a0", "a1") PANEL_ROW(q, "%[x0],%[ld]", "a2", "a3")                         \
    PANEL_ROW(q, "%[x0],%[ld],2", "a4", "a5") PANEL_ROW(q, "%[x0],%[ld3]", "a6", "a7")
#define PANEL_OPERANDS                                                                               \
    : [a0] "+x"(a0), [a1] "+x"(a1), [a2] "+x"(a2), [a3] "+x"(a3), [a4] "+x"(a4), [a5] "+x"(a5),       \
      [a6] "+x"(a6), [a7] "+x"(a7)                                                                   \
    : [c] "r"(c), [x0] "r"(x0), [ld] "r"(ld), [ld3] "r"(3 * ld)                                      \
    : "ymm12", "ymm13", "ymm14", "ymm15", "memory"

/* Block b's exact integer dot products over pairs q0 .. q0 + nq - 1 (nq: 16, the whole block, or 8,
 * its half: a Q6_K scale covers 16 weights) of rows m0 .. m0 + mt - 1 of x with the panel's 16
 * features (c: the block's codes): dot[r][0] features 0..7, dot[r][1] 8..15. */
static inline __attribute__((always_inline)) void panel_dots(const __m256i *c, const int16_t *xq, int64_t m0,
        int64_t nb, int64_t b, const int mt, const int q0, const int nq, __m256i dot[4][2]) {
    if (mt == 4) {
        const int32_t *x0 = (const int32_t *)(xq + (m0 * nb + b) * 32) + q0;
        const int64_t ld = nb * 32 * (int64_t)sizeof(int16_t);
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        c += 2 * q0;
        if (nq == 16)
            __asm__(PANEL_STEP(0) PANEL_STEP(1) PANEL_STEP(2) PANEL_STEP(3) PANEL_STEP(4) PANEL_STEP(5)
                    PANEL_STEP(6) PANEL_STEP(7) PANEL_STEP(8) PANEL_STEP(9) PANEL_STEP(10) PANEL_STEP(11)
                    PANEL_STEP(12) PANEL_STEP(13) PANEL_STEP(14) PANEL_STEP(15) PANEL_OPERANDS);
        else
            __asm__(PANEL_STEP(0) PANEL_STEP(1) PANEL_STEP(2) PANEL_STEP(3) PANEL_STEP(4) PANEL_STEP(5)
                    PANEL_STEP(6) PANEL_STEP(7) PANEL_OPERANDS);
        dot[0][0] = a0, dot[0][1] = a1, dot[1][0] = a2, dot[1][1] = a3;
        dot[2][0] = a4, dot[2][1] = a5, dot[3][0] = a6, dot[3][1] = a7;
        return;
    }
    for (int r = 0; r < mt; r++) dot[r][0] = dot[r][1] = _mm256_setzero_si256();
    for (int q = q0; q < q0 + nq; q++) { /* the last rows of x, fewer than four */
        const __m256i w0 = _mm256_load_si256(c + 2 * q), w1 = _mm256_load_si256(c + 2 * q + 1);
        for (int r = 0; r < mt; r++) {
            const __m256i xb = _mm256_set1_epi32(((const int32_t *)(xq + ((m0 + r) * nb + b) * 32))[q]);
            dot[r][0] = _mm256_add_epi32(dot[r][0], _mm256_madd_epi16(w0, xb));
            dot[r][1] = _mm256_add_epi32(dot[r][1], _mm256_madd_epi16(w1, xb));
        }
    }
}
#endif

#endif
