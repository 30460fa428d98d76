/* What blockmm.c and decode.c share: the instruction set they are written for, and a horizontal
 * sum. Without AVX2, FMA and F16C the kernels compile to stubs and block_mm_simd() says 0, so
 * native.py uses torch's kernels instead. */
#ifndef HERD_SIMD_H
#define HERD_SIMD_H

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define HERD_SIMD 1
#include <immintrin.h>

/* The sum of the 8 floats of v. */
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#else
#define HERD_SIMD 0
#endif

/* Fewer rows than this are dequantized on the calling thread (kq_rows_dequantize: a prompt's
 * embeddings, the output's refined rows, ~0.5 ms for 256 rows of 576; block_dequantize). Waking the team
 * costs more on a busy machine (a time slice of the other core: milliseconds) than it saves on an
 * idle one. */
#define ROWS_ALONE 512

#endif
