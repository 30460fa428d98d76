/* y = x @ W^T with W read straight from its GGUF blocks (Q4_0, Q4_1 or Q8_0: 32 weights a block).
 *
 * The CPU matmul of llamaherd's quantized layers, in the manner of ggml: the activations are
 * quantized in blocks of 32, each block's dot product with a weight block is computed exactly in
 * integers (AVX2 madd: 16 multiply-adds in one instruction) and scaled once in float. The weights
 * are the file's own bytes, never converted or copied. Unlike ggml, which rounds activations to
 * int8, they are rounded to int16 (scale max|x| / 32767): 8 more bits for a few more instructions,
 * so that the result stays within float rounding of the exact product (with int8, greedy choices
 * of SmolLM2-135M differed from the exact ones at 2.6% of positions; with int16, as rarely as
 * with bf16 activations).
 *
 *   Q4_0  {f16 d; u8 qs[16]}          w = d * (q - 8)   byte j: weight j (low nibble), j + 16 (high)
 *   Q4_1  {f16 d; f16 m; u8 qs[16]}   w = d * q + m
 *   Q8_0  {f16 d; i8 qs[32]}          w = d * q
 *
 * Every row of x is computed by the same instructions in the same order whatever the number of
 * rows, so a sequence's logits do not depend on what it is batched with (continuous batching relies
 * on it). Built at first use by quantize/native.py (-O3 -march=native -fopenmp) against the OpenMP
 * runtime torch ships, so torch.set_num_threads governs its threads too.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#endif

#define QK 32
#define MT 4 /* rows of x per pass over a row of W: each weight block is loaded once for them */
enum { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 }; /* ggml's type ids */

int block_mm_simd(void) {
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
static inline float f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* x (n_blocks * 32 floats) -> int16 codes, each block's scale d, and d * (sum of its codes). */
static void quantize_x(const float *x, int16_t *xq, float *xd, float *xs, int64_t n_blocks) {
#pragma omp parallel for schedule(static) if (n_blocks >= 256) /* a decode step's few blocks: not worth a fork */
    for (int64_t i = 0; i < n_blocks; i++) {
        const float *v = x + i * QK;
        float amax = 0.f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(v[j]));
        const float d = amax / 32767.f, id = d > 0.f ? 1.f / d : 0.f;
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            const int q = (int)lrintf(v[j] * id);
            xq[i * QK + j] = (int16_t)q;
            sum += q;
        }
        xd[i] = d;
        xs[i] = d * (float)sum;
    }
}

/* A weight block's 32 codes as int16 in two registers (weights 0..15, 16..31): 0..15 for Q4_1,
 * q - 8 for Q4_0, the signed codes for Q8_0. */
static inline void codes(const uint8_t *qs, int type, __m256i w[2]) {
    if (type == Q8_0) {
        w[0] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)qs));
        w[1] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qs + 16)));
        return;
    }
    const __m128i raw = _mm_loadu_si128((const __m128i *)qs), low = _mm_set1_epi8(0x0F);
    w[0] = _mm256_cvtepu8_epi16(_mm_and_si128(raw, low));
    w[1] = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), low));
    if (type == Q4_0) {
        w[0] = _mm256_sub_epi16(w[0], _mm256_set1_epi16(8));
        w[1] = _mm256_sub_epi16(w[1], _mm256_set1_epi16(8));
    }
}

/* Exact integer dot product of 32 weight codes with 32 activation codes, as 8 float partial sums
 * (|sum| < 2^31: 4 products of at most 128 * 32767 a lane). */
static inline __m256 dot(const __m256i w[2], const int16_t *xq) {
    const __m256i p0 = _mm256_madd_epi16(w[0], _mm256_loadu_si256((const __m256i *)xq));
    const __m256i p1 = _mm256_madd_epi16(w[1], _mm256_loadu_si256((const __m256i *)(xq + 16)));
    return _mm256_cvtepi32_ps(_mm256_add_epi32(p0, p1));
}

/* acc += the block's dot products with rows 0..mt-1 of x (whose blocks are i0, i0 + nb, ...). */
static inline __attribute__((always_inline)) void block_step(const uint8_t *blk, const int16_t *xq, const float *xd,
        const float *xs, int64_t i0, int64_t nb, __m256 *acc, float *mins, const int mt, const int type) {
    __m256i q[2];
    codes(blk + (type == Q4_1 ? 4 : 2), type, q);
    const float d = f16(blk);
    for (int r = 0; r < mt; r++) {
        const int64_t i = i0 + r * nb;
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * xd[i]), dot(q, xq + i * QK), acc[r]);
        if (type == Q4_1) mins[r] += f16(blk + 2) * xs[i];
    }
}

/* One output feature (a row of W) for rows m0 .. m0 + mt - 1 of x, written to y[(m0 + r) * N].
 * Inlined with `type` and `mt` constants so that the accumulators live in registers. Even and
 * odd blocks go to two accumulators so consecutive FMAs need not wait for each other; every row
 * gets the same split, so rows stay independent of M. */
static inline __attribute__((always_inline)) void row_dot(const uint8_t *row, const int16_t *xq, const float *xd,
        const float *xs, float *y, int64_t m0, int64_t nb, int64_t N, const int mt, const int type) {
    const int64_t bs = type == Q4_0 ? 18 : type == Q4_1 ? 20 : 34;
    __m256 even[MT], odd[MT];
    float mins_even[MT], mins_odd[MT];
    for (int r = 0; r < mt; r++) {
        even[r] = odd[r] = _mm256_setzero_ps();
        mins_even[r] = mins_odd[r] = 0.f;
    }
    int64_t b = 0;
    for (; b + 1 < nb; b += 2) {
        block_step(row + b * bs, xq, xd, xs, m0 * nb + b, nb, even, mins_even, mt, type);
        block_step(row + (b + 1) * bs, xq, xd, xs, m0 * nb + b + 1, nb, odd, mins_odd, mt, type);
    }
    if (b < nb) block_step(row + b * bs, xq, xd, xs, m0 * nb + b, nb, even, mins_even, mt, type);
    for (int r = 0; r < mt; r++)
        y[(m0 + r) * N] = hsum(_mm256_add_ps(even[r], odd[r])) + (mins_even[r] + mins_odd[r]);
}

#define ROWS(type)                                                                              \
    switch (mt) {                                                                               \
        case 1: row_dot(row, xq, xd, xs, y + n, m0, nb, N, 1, type); break;                     \
        case 2: row_dot(row, xq, xd, xs, y + n, m0, nb, N, 2, type); break;                     \
        case 3: row_dot(row, xq, xd, xs, y + n, m0, nb, N, 3, type); break;                     \
        default: row_dot(row, xq, xd, xs, y + n, m0, nb, N, 4, type); break;                    \
    }

/* x: (M, K) float32; w: N rows of K/32 blocks; scratch: 2*M*K + 8*M*K/32 bytes; y: (M, N) float32. */
void block_mm(const float *x, const uint8_t *w, void *scratch, float *y, int64_t M, int64_t N, int64_t K,
              int type) {
    const int64_t nb = K / QK, row_bytes = nb * (type == Q4_0 ? 18 : type == Q4_1 ? 20 : 34);
    int16_t *xq = (int16_t *)scratch;
    float *xd = (float *)(xq + M * K), *xs = xd + M * nb;
    quantize_x(x, xq, xd, xs, M * nb);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            const int mt = (int)(M - m0 < MT ? M - m0 : MT);
            const uint8_t *row = w + n * row_bytes;
            if (type == Q4_0) ROWS(Q4_0) else if (type == Q4_1) ROWS(Q4_1) else ROWS(Q8_0)
        }
}
#else
void block_mm(const float *x, const uint8_t *w, void *scratch, float *y, int64_t M, int64_t N, int64_t K,
              int type) {
    (void)x; (void)w; (void)scratch; (void)y; (void)M; (void)N; (void)K; (void)type;
}
#endif
