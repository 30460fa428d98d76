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
 * Every row of x gets the same numbers whatever the number of rows (the few-row tiles and the
 * many-row panel differ in instructions, not in results), so a sequence's logits do not depend on
 * what it is batched with (continuous batching relies on it), nor a token's on whether it came in
 * a prompt or was decoded. Built at first use by quantize/native.py (-O3 -march=native -fopenmp)
 * against the OpenMP runtime torch ships, so torch.set_num_threads governs its threads too.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"
#include "panel.h"

/* The matmuls come in two forms. `block_mm`, `block_mm_dense` (called from Python) open their own
 * OpenMP parallel region. `block_mm_q`, `block_mm_dense_team` and kquant.c's functions only share
 * their loop among the threads of the region they are called in (orphaned `omp for nowait`: no
 * barrier at the end; outside a region one thread runs it all), so that decode.c runs a whole step
 * in one region, its own barriers between the matmuls (a fork/join a matmul cost a futex wake-up
 * each). Which thread computes a tile never changes its numbers. */

/* The other block types (K-quants, Q5_0, Q5_1, mixed projections) live in kquant.c. */
int kq_handles(int type);
void kq_mm(const int16_t *xq, const float *xd, const float *xs, const uint8_t *w, float *y, int64_t M, int64_t N,
           int64_t K, int type);
void kq_mm_dense(const float *x, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K, int type);
int kq_is_float(int type);
void kq_mm_float(const float *x, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K, int type);

#define QK 32
/* Each weight row is read 1 KB ahead of its use. The hardware prefetcher alone follows the NT
 * interleaved row streams badly: at batch 1 the kernel then waited on memory (a 30 MB Q8_0 output
 * projection ran at ~7 GB/s of the machine's ~26; with this, at ~29). */
#define PREFETCH 1024
#define MT 4 /* rows of x per tile: each weight block is decoded once for them */
#define NT 2 /* rows of W (output features) per tile: each activation block is loaded once for them */
enum { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 }; /* ggml's type ids */
enum { Q4_0_R8 = 102, Q4_1_R8 = 103, Q8_0_R8 = 108 }; /* the same, repacked eight rows at a time (tile8) */

/* Bytes of a block of 32 weights, and of what comes before its codes (d, and Q4_1's m). A group of
 * eight repacked rows holds eight times both, per block. */
static inline int64_t block_bytes(int type) { return type == Q4_0 ? 18 : type == Q4_1 ? 20 : 34; }
static inline int64_t head_bytes(int type) { return type == Q4_1 ? 4 : 2; }

/* OpenMP's thread count is per calling thread, and a thread not started by OpenMP (a Python
 * thread: the server's scheduler) starts with the machine's core count. native.py sets it to
 * torch's count in every thread that calls in. */
void herd_set_threads(int n) { omp_set_num_threads(n); }

int block_mm_simd(void) { return HERD_SIMD; }

#if HERD_SIMD
static inline float f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* x (n_blocks * 32 floats) -> int16 codes, each block's scale d, and d * (sum of its codes). One
 * thread: the callers share the blocks out. */
void block_quantize(const float *x, int16_t *xq, float *xd, float *xs, int64_t n_blocks) {
    for (int64_t i = 0; i < n_blocks; i++) {
        const float *v = x + i * QK;
        const __m256 sign = _mm256_set1_ps(-0.f);
        __m256 amax = _mm256_setzero_ps();
        for (int j = 0; j < QK; j += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + j)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        const float d = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4))) / 32767.f;
        const __m256 id = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
        __m256i q[4], sum = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) { /* round half to even, as lrintf */
            q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + 8 * j), id));
            sum = _mm256_add_epi32(sum, q[j]);
        }
        /* packs interleaves 128-bit lanes; the permute puts the 16 codes back in order */
        _mm256_storeu_si256((__m256i *)(xq + i * QK), _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8));
        _mm256_storeu_si256((__m256i *)(xq + i * QK + 16), _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xD8));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        xd[i] = d;
        xs[i] = d * (float)_mm_cvtsi128_si32(s4);
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

/* A tile of y: output features n .. n + nt - 1 (rows of W) for rows m0 .. m0 + mt - 1 of x.
 * Inlined with `type`, `nt` and `mt` constants so that the nt * mt accumulators live in registers
 * (2 x 4 of them, with the weight codes, fill AVX2's 16). Each activation block is loaded once for
 * the nt features and each weight block is decoded once for the mt rows. Every row of x gets the
 * same instructions in the same order whatever M is: rows stay independent of the batch. */
static inline __attribute__((always_inline)) void tile(const uint8_t *w, int64_t row_bytes, const int16_t *xq,
        const float *xd, const float *xs, float *y, int64_t n, int64_t m0, int64_t nb, int64_t N, const int nt,
        const int mt, const int type) {
    const int64_t bs = block_bytes(type);
    __m256 acc[NT][MT];
    float mins[NT][MT];
    for (int f = 0; f < nt; f++)
        for (int r = 0; r < mt; r++) {
            acc[f][r] = _mm256_setzero_ps();
            mins[f][r] = 0.f;
        }
    for (int64_t b = 0; b < nb; b++) {
        __m256i q[NT][2];
        __m256 d[NT];
        float m[NT];
        for (int f = 0; f < nt; f++) {
            const uint8_t *blk = w + (n + f) * row_bytes + b * bs;
            _mm_prefetch((const char *)blk + PREFETCH, _MM_HINT_T0);
            codes(blk + head_bytes(type), type, q[f]);
            d[f] = _mm256_set1_ps(f16(blk));
            m[f] = type == Q4_1 ? f16(blk + 2) : 0.f;
        }
        for (int r = 0; r < mt; r++) {
            const int64_t i = (m0 + r) * nb + b;
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + i * QK));
            const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + i * QK + 16));
            const __m256 s = _mm256_broadcast_ss(xd + i);
            for (int f = 0; f < nt; f++) {
                /* exact integer dot product of the 32 codes (|sum| < 2^31: 4 products of at most
                 * 128 * 32767 a lane), then scaled once in float */
                const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(q[f][0], x0), _mm256_madd_epi16(q[f][1], x1));
                acc[f][r] = _mm256_fmadd_ps(_mm256_mul_ps(d[f], s), _mm256_cvtepi32_ps(p), acc[f][r]);
                if (type == Q4_1) mins[f][r] += m[f] * xs[i];
            }
        }
    }
    for (int f = 0; f < nt; f++)
        for (int r = 0; r < mt; r++) y[(m0 + r) * N + n + f] = hsum(acc[f][r]) + mins[f][r];
}

/* The same product on weights repacked eight rows at a time (see linear.py `repack_rows8`): per
 * block of 32 inputs, the eight rows' scales d[8] (and Q4_1's mins m[8]) as f16, then the codes.
 * Q4: bytes 16t .. 16t + 15 hold, for rows i = 0..7 and e = 0, 1, code (i, 4t + e) in the low
 * nibble of byte 2i + e and code (i, 4t + 2 + e) in the high one; Q8_0: bytes 16j .. 16j + 15
 * hold each row's pair of codes (2j, 2j + 1). So a 16-byte load widens to a register of int16
 * pairs, a pair per row, and one `madd` with the broadcast pair of activations gives each row's
 * lane its own exact partial dot product: no horizontal sums, and the block's scaling is one
 * vector op for all eight rows. About half the instructions of `tile` a multiply-add. */

/* Group codes for k = 4t .. 4t + 3 as int16 pairs, a pair per row: lo (4t, 4t + 1), hi (4t + 2, 4t + 3);
 * Q4_0's less 8. Q4: one 16-byte load, low and high nibbles; Q8_0: two 16-byte loads of int8 pairs. */
static inline void codes8(const uint8_t *qs, int t, int type, __m256i *lo, __m256i *hi) {
    if (type == Q8_0) {
        *lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qs + 32 * t)));
        *hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qs + 32 * t + 16)));
        return;
    }
    const __m128i v = _mm_loadu_si128((const __m128i *)(qs + 16 * t)), low = _mm_set1_epi8(0x0F);
    *lo = _mm256_cvtepu8_epi16(_mm_and_si128(v, low));
    *hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), low));
    if (type == Q4_0) {
        *lo = _mm256_sub_epi16(*lo, _mm256_set1_epi16(8));
        *hi = _mm256_sub_epi16(*hi, _mm256_set1_epi16(8));
    }
}

#define MT8 8 /* rows of x per pass over a group's weights (their 8 int32 sums stay in registers) */
static inline __attribute__((always_inline)) void tile8(const uint8_t *w, const int16_t *xq, const float *xd,
        const float *xs, float *y, int64_t g, int64_t m0, int64_t nb, int64_t N, const int mt, const int type) {
    const int64_t bs = 8 * block_bytes(type);
    __m256 acc[MT8];
    for (int r = 0; r < mt; r++) acc[r] = _mm256_setzero_ps();
    const uint8_t *blk = w + g * nb * bs;
    for (int64_t b = 0; b < nb; b++, blk += bs) {
        _mm_prefetch((const char *)blk + PREFETCH, _MM_HINT_T0);
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));
        const uint8_t *qs = blk + 8 * head_bytes(type);
        __m256i dot[MT8];
        for (int r = 0; r < mt; r++) dot[r] = _mm256_setzero_si256();
        for (int t = 0; t < 8; t++) {
            __m256i lo, hi;
            codes8(qs, t, type, &lo, &hi);
            for (int r = 0; r < mt; r++) {
                const int32_t *xr = (const int32_t *)(xq + ((m0 + r) * nb + b) * QK);
                dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(lo, _mm256_set1_epi32(xr[2 * t])));
                dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(hi, _mm256_set1_epi32(xr[2 * t + 1])));
            }
        }
        for (int r = 0; r < mt; r++) { /* |dot| <= 32 * 15 * 32767 < 2^31: exact */
            const int64_t i = (m0 + r) * nb + b;
            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(xd[i])), _mm256_cvtepi32_ps(dot[r]), acc[r]);
            if (type == Q4_1)
                acc[r] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16))),
                                         _mm256_set1_ps(xs[i]), acc[r]);
        }
    }
    for (int r = 0; r < mt; r++) _mm256_storeu_ps(y + (m0 + r) * N + 8 * g, acc[r]);
}

#define TILE8(type)                                                                 \
    switch (mt) {                                                                   \
        case 1: tile8(w, xq, xd, xs, y, g, m0, nb, N, 1, type); break;              \
        case 2: tile8(w, xq, xd, xs, y, g, m0, nb, N, 2, type); break;              \
        case 3: tile8(w, xq, xd, xs, y, g, m0, nb, N, 3, type); break;              \
        case 4: tile8(w, xq, xd, xs, y, g, m0, nb, N, 4, type); break;              \
        case 5: tile8(w, xq, xd, xs, y, g, m0, nb, N, 5, type); break;              \
        case 6: tile8(w, xq, xd, xs, y, g, m0, nb, N, 6, type); break;              \
        case 7: tile8(w, xq, xd, xs, y, g, m0, nb, N, 7, type); break;              \
        default: tile8(w, xq, xd, xs, y, g, m0, nb, N, 8, type); break;             \
    }

#define TILE(nt, type)                                                                          \
    switch (mt) {                                                                               \
        case 1: tile(w, row_bytes, xq, xd, xs, y, n, m0, nb, N, nt, 1, type); break;            \
        case 2: tile(w, row_bytes, xq, xd, xs, y, n, m0, nb, N, nt, 2, type); break;            \
        case 3: tile(w, row_bytes, xq, xd, xs, y, n, m0, nb, N, nt, 3, type); break;            \
        default: tile(w, row_bytes, xq, xd, xs, y, n, m0, nb, N, nt, 4, type); break;           \
    }
#define TILES(type) if (n + 1 < N) TILE(2, type) else TILE(1, type)

/* The same product for many rows of x (a prompt), to tile8's bits: each thread expands 16 output
 * features (two groups of eight repacked rows) into a panel once — per block, per pair of inputs q,
 * the 16 features' int16 code pairs in two registers (tile8's `lo`, `hi` for q = 2t, 2t + 1), and
 * their scales and mins — then takes every row of x through it, four rows at a time:
 * per pair of inputs one broadcast and two `madd`s (16 multiply-adds each, an FMA does 8) a row,
 * and per block tile8's scaling in tile8's order. The integer sums are exact in any order, so a row
 * gets the numbers it gets from tile8 (decoding) whichever computes it, and the choice is speed
 * only: ~1.2-1.3x the float32 prompt path on SmolLM2's Q4_1 layers (its FMAs were at ~95% of peak),
 * where tile8, decoding each weight block again for every 8 rows, runs at ~0.9x. The inner loop,
 * `panel_dots`, is panel.h's. */
typedef struct {
    __m256i *codes; /* [nb][16 pairs q][2]: features 0..7, 8..15 (panel.h) */
    float *d, *m;   /* [nb][16] */
} Panel16;

/* Features 8 * g0 .. 8 * (g0 + ng) - 1 (ng = 1: the second half zero, N = 8 mod 16) into p. */
static void panel16_fill(const uint8_t *w, int64_t g0, int64_t ng, int64_t nb, int type, Panel16 *p) {
    const int64_t bs = 8 * block_bytes(type);
    for (int h = 0; h < 2; h++) {
        const uint8_t *blk = w + (g0 + (h < ng ? h : 0)) * nb * bs;
        for (int64_t b = 0; b < nb; b++, blk += bs) {
            for (int j = 0; j < 8; j++) {
                p->d[b * 16 + 8 * h + j] = h < ng ? f16(blk + 2 * j) : 0.f;
                p->m[b * 16 + 8 * h + j] = h < ng && type == Q4_1 ? f16(blk + 16 + 2 * j) : 0.f;
            }
            const uint8_t *qs = blk + 8 * head_bytes(type);
            for (int t = 0; t < 8; t++) {
                __m256i lo, hi;
                codes8(qs, t, type, &lo, &hi);
                if (h >= ng) lo = hi = _mm256_setzero_si256();
                p->codes[(b * 16 + 2 * t) * 2 + h] = lo;
                p->codes[(b * 16 + 2 * t + 1) * 2 + h] = hi;
            }
        }
    }
}

/* y[m0 .. m0 + mt - 1][n0 .. n0 + nn - 1] from the panel. */
static inline __attribute__((always_inline)) void panel16_tile(const Panel16 *p, const int16_t *xq, const float *xd,
        const float *xs, float *y, int64_t m0, int64_t n0, int64_t nb, int64_t N, int nn, const int mt,
        const int type) {
    __m256 acc[4][2];
    for (int r = 0; r < mt; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i dot[4][2];
        panel_dots(p->codes + b * 32, xq, m0, nb, b, mt, 0, 16, dot);
        const __m256 d0 = _mm256_load_ps(p->d + b * 16), d1 = _mm256_load_ps(p->d + b * 16 + 8);
        for (int r = 0; r < mt; r++) { /* tile8's scaling, in its order */
            const int64_t i = (m0 + r) * nb + b;
            const __m256 s = _mm256_set1_ps(xd[i]);
            acc[r][0] = _mm256_fmadd_ps(_mm256_mul_ps(d0, s), _mm256_cvtepi32_ps(dot[r][0]), acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(_mm256_mul_ps(d1, s), _mm256_cvtepi32_ps(dot[r][1]), acc[r][1]);
            if (type == Q4_1) {
                const __m256 sm = _mm256_set1_ps(xs[i]);
                acc[r][0] = _mm256_fmadd_ps(_mm256_load_ps(p->m + b * 16), sm, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(_mm256_load_ps(p->m + b * 16 + 8), sm, acc[r][1]);
            }
        }
    }
    for (int r = 0; r < mt; r++) {
        _mm256_storeu_ps(y + (m0 + r) * N + n0, acc[r][0]);
        if (nn > 8) _mm256_storeu_ps(y + (m0 + r) * N + n0 + 8, acc[r][1]);
    }
}

#define PANEL16(type)                                                                                \
    for (m0 = 0; m0 + 4 <= M; m0 += 4) panel16_tile(&p, xq, xd, xs, y, m0, n0, nb, N, nn, 4, type); \
    switch (M - m0) {                                                                                \
        case 1: panel16_tile(&p, xq, xd, xs, y, m0, n0, nb, N, nn, 1, type); break;                  \
        case 2: panel16_tile(&p, xq, xd, xs, y, m0, n0, nb, N, nn, 2, type); break;                  \
        case 3: panel16_tile(&p, xq, xd, xs, y, m0, n0, nb, N, nn, 3, type); break;                  \
        default: break;                                                                              \
    }

/* Whether many rows of this kernel type take this int16 panel (decode.c: a prompt's matmuls then
 * too; kquant.c's repacked types take its own, `kq_has_panel`). */
int block_mm_has_panel(int type) { return type == Q4_0_R8 || type == Q4_1_R8 || type == Q8_0_R8; }

/* y = x @ W^T, W repacked eight rows at a time (type: ggml's + 100), through panels shared among
 * the calling team. */
static void panel16_mm(const int16_t *xq, const float *xd, const float *xs, const uint8_t *w, float *y, int64_t M,
                       int64_t N, int64_t K, int type) {
    const int64_t nb = K / QK;
    const size_t scales = (size_t)nb * 16 * sizeof(float);
    Panel16 p = {aligned_alloc(32, (size_t)nb * 32 * sizeof(__m256i)), aligned_alloc(32, scales),
                 aligned_alloc(32, scales)};
    /* panels taken in turn (dynamic), as block_mm_dense_team's: a thread that loses its core for a
     * while leaves the rest to the other */
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t n0 = 0; n0 < N; n0 += 16) {
        const int nn = (int)(N - n0 < 16 ? N - n0 : 16);
        int64_t m0;
        panel16_fill(w, n0 / 8, nn / 8, nb, type - 100, &p);
        if (type == Q4_0_R8) { PANEL16(Q4_0) } else if (type == Q4_1_R8) { PANEL16(Q4_1) } else { PANEL16(Q8_0) }
    }
    free(p.codes);
    free(p.d);
    free(p.m);
}

/* y = x @ W^T from x's int16 blocks (block_quantize), the tiles shared among the calling team. */
void block_mm_q(const int16_t *xq, const float *xd, const float *xs, const uint8_t *w, float *y, int64_t M, int64_t N,
                int64_t K, int type) {
    const int64_t nb = K / QK, row_bytes = nb * block_bytes(type);
    if (kq_handles(type)) {
        kq_mm(xq, xd, xs, w, y, M, N, K, type);
        return;
    }
    if (block_mm_has_panel(type) && M >= PANEL_ROWS) {
        panel16_mm(xq, xd, xs, w, y, M, N, K, type);
        return;
    }
    if (type > 100) { /* repacked eight rows at a time */
#pragma omp for schedule(static) nowait
        for (int64_t g = 0; g < N / 8; g++)
            for (int64_t m0 = 0; m0 < M; m0 += MT8) {
                const int mt = (int)(M - m0 < MT8 ? M - m0 : MT8);
                if (type == Q4_0_R8) TILE8(Q4_0) else if (type == Q4_1_R8) TILE8(Q4_1) else TILE8(Q8_0)
            }
        return;
    }
#pragma omp for schedule(static) nowait
    for (int64_t n = 0; n < N; n += NT)
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            const int mt = (int)(M - m0 < MT ? M - m0 : MT);
            if (type == Q4_0) TILES(Q4_0) else if (type == Q4_1) TILES(Q4_1) else TILES(Q8_0)
        }
}

/* x: (M, K) float32; w: N rows of K/32 blocks; scratch: 2*M*K + 8*M*K/32 bytes; y: (M, N) float32. */
void block_mm(const float *x, const uint8_t *w, void *scratch, float *y, int64_t M, int64_t N, int64_t K,
              int type) {
    const int64_t nb = K / QK, n_blocks = M * nb;
    if (kq_is_float(type)) { /* float weights: float activations (kquant.c) */
#pragma omp parallel
        kq_mm_float(x, w, y, M, N, K, type);
        return;
    }
    int16_t *xq = (int16_t *)scratch;
    float *xd = (float *)(xq + M * K), *xs = xd + n_blocks;
    const int shared = n_blocks >= 256; /* a decode step's few blocks: not worth a barrier */
    if (!shared) block_quantize(x, xq, xd, xs, n_blocks);
#pragma omp parallel
    {
        if (shared) {
#pragma omp for schedule(static)
            for (int64_t i = 0; i < n_blocks; i++) block_quantize(x + i * QK, xq + i * QK, xd + i, xs + i, 1);
        }
        block_mm_q(xq, xd, xs, w, y, M, N, K, type);
    }
}

/* One row of nb blocks as float32: w = d * q (Q8_0), d * (q - 8) (Q4_0), d * q + m (Q4_1), rounded
 * as ggml and gguf-py round them (a multiply, then an add: never fused). */
__attribute__((optimize("fp-contract=off"), noinline)) static void dequantize_row(const uint8_t *w, float *o,
                                                                                 int64_t nb, int type) {
    const int64_t bs = block_bytes(type);
    for (int64_t b = 0; b < nb; b++, w += bs, o += QK) {
        const float d = f16(w);
        if (type == Q8_0) {
            for (int j = 0; j < QK; j++) o[j] = (float)(int8_t)w[2 + j] * d;
        } else if (type == Q4_0) {
            for (int j = 0; j < QK / 2; j++) {
                o[j] = d * (float)((w[2 + j] & 15) - 8);
                o[j + 16] = d * (float)((w[2 + j] >> 4) - 8);
            }
        } else {
            const float m = f16(w + 2);
            for (int j = 0; j < QK / 2; j++) {
                o[j] = d * (float)(w[4 + j] & 15) + m;
                o[j + 16] = d * (float)(w[4 + j] >> 4) + m;
            }
        }
    }
}

/* Rows ids[0 .. n-1] of weights repacked eight rows at a time (type: ggml's + 100) as float32 (n, K),
 * rounded as dequantize_row rounds them: an embedding lookup, the output's refinement. */
__attribute__((optimize("fp-contract=off"))) void rows8_dequantize(const uint8_t *w, const int64_t *ids, int64_t n,
                                                                   float *out, int64_t K, int type) {
    type -= 100;
    const int64_t nb = K / QK, bs = 8 * block_bytes(type);
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = ids[i] % 8;
        const uint8_t *blk = w + ids[i] / 8 * nb * bs;
        for (int64_t b = 0; b < nb; b++, blk += bs) {
            float *o = out + i * K + b * QK;
            const float d = f16(blk + 2 * r), m = type == Q4_1 ? f16(blk + 16 + 2 * r) : 0.f;
            const uint8_t *qs = blk + 8 * head_bytes(type);
            for (int k = 0; k < QK; k++) { /* k = 4t + 2h + e (Q4: byte 16t + 2r + e, nibble h) or 2j + e (Q8_0) */
                if (type == Q8_0) {
                    o[k] = (float)(int8_t)qs[16 * (k / 2) + 2 * r + k % 2] * d;
                } else {
                    const int q = (qs[16 * (k / 4) + 2 * r + k % 2] >> (4 * (k / 2 % 2))) & 15;
                    o[k] = type == Q4_0 ? d * (float)(q - 8) : d * (float)q + m;
                }
            }
        }
    }
}

/* N rows of GGUF blocks (Q4_0, Q4_1, Q8_0) into the layout of tile8: linear.py's `repack_rows8`,
 * which says the same in torch ops, ~20x slower (a third of a second of a 135M model's load).
 * dst may be src (in place: a group's eight rows take the bytes they held, copied aside first). */
void rows8_repack(const uint8_t *src, uint8_t *dst, int64_t N, int64_t K, int type) {
    const int64_t nb = K / QK, bs = block_bytes(type), head = head_bytes(type);
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < N / 8; g++) {
        uint8_t *rows = malloc((size_t)(8 * nb * bs));
        memcpy(rows, src + g * 8 * nb * bs, (size_t)(8 * nb * bs));
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *o = dst + (g * nb + b) * 8 * bs, *oq = o + 8 * head;
            for (int i = 0; i < 8; i++) {
                const uint8_t *blk = rows + (i * nb + b) * bs, *qs = blk + head;
                memcpy(o + 2 * i, blk, 2); /* d */
                if (type == Q4_1) memcpy(o + 16 + 2 * i, blk + 2, 2); /* m */
                if (type == Q8_0) { /* the pair (2j, 2j + 1) at byte 16j + 2i */
                    for (int j = 0; j < 16; j++) memcpy(oq + 16 * j + 2 * i, qs + 2 * j, 2);
                    continue;
                }
                for (int t = 0; t < 8; t++) /* codes 4t + e and 4t + 2 + e in byte 16t + 2i + e */
                    for (int e = 0; e < 2; e++) {
                        const int k0 = 4 * t + e, k1 = k0 + 2; /* code k: low nibble of byte k, high of k - 16 */
                        const int c0 = k0 < 16 ? qs[k0] & 15 : qs[k0 - 16] >> 4;
                        const int c1 = k1 < 16 ? qs[k1] & 15 : qs[k1 - 16] >> 4;
                        oq[16 * t + 2 * i + e] = (uint8_t)(c0 | c1 << 4);
                    }
            }
        }
        free(rows);
    }
}

/* The float32 weights (N, K) of N rows of blocks. */
void block_dequantize(const uint8_t *w, float *out, int64_t N, int64_t K, int type) {
    const int64_t nb = K / QK, row_bytes = nb * block_bytes(type);
#pragma omp parallel for schedule(static) if (N >= ROWS_ALONE)
    for (int64_t n = 0; n < N; n++) dequantize_row(w + n * row_bytes, out + n * K, nb, type);
}

/* The float32 path for many rows (a prompt, where no int16 panel serves): y = x @ W^T with W expanded to float32 one panel of
 * 16 output features at a time (k-major, in the thread's cache) and multiplied by a 6 x 16
 * register tile: per k, two loads of weights, six broadcasts of x and twelve multiply-adds, so the
 * FMA units, not the decoding, set the pace. Every y[m, n] is one chain of multiply-adds over
 * k = 0 .. K-1 from zero, whatever M is and wherever row m falls in a tile: rows stay independent
 * of the batch here too. N must be a multiple of 16. */
#define DN 16
#define DM 6
static inline __attribute__((always_inline)) void dense_tile(const float *x, const float *panel, float *y,
        int64_t ldy, int64_t m0, int64_t n0, int64_t K, int nn, const int mt) {
    __m256 acc[DM][2];
    for (int r = 0; r < mt; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        const __m256 w0 = _mm256_load_ps(panel + k * DN), w1 = _mm256_load_ps(panel + k * DN + 8);
        for (int r = 0; r < mt; r++) {
            const __m256 xb = _mm256_broadcast_ss(x + (m0 + r) * K + k);
            acc[r][0] = _mm256_fmadd_ps(xb, w0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(xb, w1, acc[r][1]);
        }
    }
    for (int r = 0; r < mt; r++) {
        float *out = y + (m0 + r) * ldy + n0, part[DN];
        if (nn < DN) out = part; /* a last panel of fewer rows: through a buffer */
        _mm256_storeu_ps(out, acc[r][0]);
        _mm256_storeu_ps(out + 8, acc[r][1]);
        if (nn < DN) memcpy(y + (m0 + r) * ldy + n0, part, (size_t)nn * sizeof(float));
    }
}

/* y[:, n0 .. n0 + nn - 1] (rows ldy apart) = x (M, K) @ one panel (K x DN, k-major, nn <= DN of
 * its columns wanted): the float32 prompt matmuls' inner loop, here and in kquant.c. */
void dense_panel(const float *x, const float *panel, float *y, int64_t ldy, int64_t M, int64_t K, int64_t n0,
                 int nn) {
    int64_t m0 = 0;
    for (; m0 + DM <= M; m0 += DM) dense_tile(x, panel, y, ldy, m0, n0, K, nn, DM);
    switch (M - m0) {
        case 1: dense_tile(x, panel, y, ldy, m0, n0, K, nn, 1); break;
        case 2: dense_tile(x, panel, y, ldy, m0, n0, K, nn, 2); break;
        case 3: dense_tile(x, panel, y, ldy, m0, n0, K, nn, 3); break;
        case 4: dense_tile(x, panel, y, ldy, m0, n0, K, nn, 4); break;
        case 5: dense_tile(x, panel, y, ldy, m0, n0, K, nn, 5); break;
        default: break;
    }
}

/* The float32 path for many rows: kquant.c's types (a prompt of repacked ones takes its int16
 * panel), and Q4_0, Q4_1, Q8_0 in the file's layout (repacked ones take block_mm_q's int16 panel,
 * which is faster and gives decoding's numbers). */
void block_mm_dense_team(const float *x, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K, int type) {
    if (kq_handles(type)) {
        kq_mm_dense(x, w, y, M, N, K, type);
        return;
    }
    const int64_t nb = K / QK, bs = block_bytes(type);
    /* each thread its own panel; panels taken in turn (dynamic): a thread that loses its core for a
     * while (a busy machine) or runs slower leaves the rest to the other, instead of holding the
     * team's next barrier for its whole static share. Whoever computes a panel, its numbers are the
     * same. */
    float *panel = aligned_alloc(32, (size_t)K * DN * sizeof(float)), *row = malloc((size_t)K * sizeof(float));
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t n0 = 0; n0 < N; n0 += DN) {
        for (int j = 0; j < DN; j++) {
            dequantize_row(w + (n0 + j) * nb * bs, row, nb, type);
            for (int64_t k = 0; k < K; k++) panel[k * DN + j] = row[k];
        }
        dense_panel(x, panel, y, N, M, K, n0, DN);
    }
    free(panel);
    free(row);
}

void block_mm_dense(const float *x, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K, int type) {
#pragma omp parallel
    block_mm_dense_team(x, w, y, M, N, K, type);
}
#else
int block_mm_has_panel(int type) { (void)type; return 0; }
void rows8_repack(const uint8_t *src, uint8_t *dst, int64_t N, int64_t K, int type) {
    (void)src; (void)dst; (void)N; (void)K; (void)type;
}
void rows8_dequantize(const uint8_t *w, const int64_t *ids, int64_t n, float *out, int64_t K, int type) {
    (void)w; (void)ids; (void)n; (void)out; (void)K; (void)type;
}
void block_mm_dense(const float *x, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K, int type) {
    (void)x; (void)w; (void)y; (void)M; (void)N; (void)K; (void)type;
}
void block_dequantize(const uint8_t *w, float *out, int64_t N, int64_t K, int type) {
    (void)w; (void)out; (void)N; (void)K; (void)type;
}
void block_mm(const float *x, const uint8_t *w, void *scratch, float *y, int64_t M, int64_t N, int64_t K,
              int type) {
    (void)x; (void)w; (void)scratch; (void)y; (void)M; (void)N; (void)K; (void)type;
}
#endif
