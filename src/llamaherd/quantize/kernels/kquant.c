/* The other GGUF block types multiplied from their own blocks: the K-quants Q4_K, Q5_K, Q6_K (256
 * weights a super-block, the Q4_K_M / Q5_K_M mixes) and Q5_0, Q5_1 (32 a block, what llama.cpp
 * gives a K-quant tensor whose rows are not a multiple of 256), plus Q4_0, Q4_1, Q8_0 when they
 * sit beside those in one fused projection ("mixed": wq, wk as Q4_K and wv as Q6_K in one wqkv).
 *
 * Every type is read 32 weights at a time, as w[i] = s[i / 16] * q[i] + mn: small integer codes q,
 * a float scale per 16 weights (equal halves but for Q6_K) and a float offset per 32 (Q4_1, Q5_1,
 * and the K-quants' sub-block minimum). So one kernel serves them all, in blockmm.c's manner: the
 * activations are the same int16 blocks of 32 (blockmm.c `quantize_x`: scale xd, xs = xd * sum of
 * codes), each block's dot product is exact in integers (AVX2 madd) and scaled once in float
 * (Q6_K: once a half), and the offset costs one multiply-add by xs: `row_dot`'s order, which every
 * kernel on repacked rows keeps, so a row's numbers never depend on which of them computes it (the
 * file layout's `tile` sums eight lanes apart: see there). No weight is
 * converted, copied or requantized: at load (`kq_repack`, in place) a projection's rows are
 * reordered eight at a time so that one madd serves eight rows (`r8_row`, ~1.5-2x as fast at batch
 * 1 and 8).
 *
 *   Q5_0 {f16 d; u32 qh; u8 qs[16]}          w = d * (q - 16), bit 4 of q[i] = bit i of qh
 *   Q5_1 {f16 d; f16 m; u32 qh; u8 qs[16]}   w = d * q + m
 *   Q4_K {f16 d, dmin; u8 scales[12]; u8 qs[128]}             8 sub-blocks of 32, 6-bit scale and min:
 *                                                             w = (d * sc) * q - (dmin * m)
 *   Q5_K {f16 d, dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}  Q4_K with bit 4 of q in qh (bit j: sub-block j)
 *   Q6_K {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}       16 sub-blocks of 16: w = (d * sc) * (q - 32)
 *
 * Dequantization (`kq_rows_dequantize`) rounds as gguf-py does, operation by operation (a multiply,
 * then an add, never fused), so it is bit-exact with `gguf.quants.dequantize`; the float32 path for
 * many rows (`kq_mm_dense`: a prompt of the file's layout, and Python's `block_mm_dense`) multiplies
 * those exact float32 weights. Many rows of repacked ones (a prompt, a wide decode step) take an
 * int16 panel (`mm_panel`, as blockmm.c's Q4/Q8 do) to the numbers the few-row kernels give. Each
 * row of x gets the same numbers whatever the number of rows (continuous batching relies on it), and
 * a prompt's tokens of repacked rows those they get decoded one at a time. Without AVX2 the same
 * loops run in plain C (`kq_mm`'s scalar path, also forced by `kq_force_scalar` in tests), to the
 * repacked rows' bits.
 *
 * The matmuls (`kq_mm`, `kq_mm_dense`, `kq_mm_float`) share their loops among the threads of the
 * OpenMP region they are called in (orphaned `omp for nowait`; see blockmm.c): the caller opens it.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "panel.h"
#include "simd.h"

enum { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30 };
#define MIXED 1000   /* kernel types MIXED + i: entry i of the table of mixed projections */
#define MAX_MIXED 8192  /* entries live as long as the process: a few per distinct model layout (~1.4 MB in all) */
#define MAX_PARTS 8
#define PREFETCH 1024

static int force_scalar = 0;
void kq_force_scalar(int on) { force_scalar = on; }

#define R8 200 /* kernel types R8 + t: rows of type t repacked eight at a time (`kq_repack`) */
static inline int base_type(int type) { return type >= R8 && type < R8 + 100 ? type - R8 : type; }
static int repackable(int type) {
    return type == Q4_0 || type == Q4_1 || type == Q5_0 || type == Q5_1 || type == Q8_0 || type == Q4_K ||
           type == Q5_K || type == Q6_K;
}
static inline int is_r8(int type) { return type >= R8 && type < R8 + 100 && repackable(type - R8); }

/* Weights a block, and bytes a block, of the types this file reads (0: not one of them); a repacked
 * type's are its own type's. */
static int64_t block_values(int type) {
    type = base_type(type);
    return type == Q4_K || type == Q5_K || type == Q6_K ? 256 : 32;
}
static int64_t block_bytes(int type) {
    if (type >= R8 && !is_r8(type)) return 0;
    switch (base_type(type)) {
        case Q4_0: return 18;
        case Q4_1: return 20;
        case Q5_0: return 22;
        case Q5_1: return 24;
        case Q8_0: return 34;
        case Q4_K: return 144;
        case Q5_K: return 176;
        case Q6_K: return 210;
        case F32: return 128; /* float weights: 32 of them a "block" */
        case F16: return 64;
        case BF16: return 64;
        default: return 0;
    }
}
static int is_float(int type) { return type == F32 || type == F16 || type == BF16; }
static int has_min(int type) { return type == Q4_1 || type == Q5_1 || type == Q4_K || type == Q5_K; }

int64_t kq_row_bytes(int64_t K, int type) {
    return block_bytes(type) ? K / block_values(type) * block_bytes(type) : 0;
}

/* -- mixed projections: parts of different types, rows stacked, each part's bytes after the last's -- */
typedef struct {
    int n;
    int64_t rows[MAX_PARTS];
    int types[MAX_PARTS];
    int64_t offsets[MAX_PARTS]; /* each part's first byte from the projection's pointer; -1: after the last part */
} mixed_t;
static mixed_t mixes[MAX_MIXED];
static int n_mixes = 0;

/* The kernel type of a projection whose parts have rows[i] rows of types[i], part i's bytes at
 * offsets[i] from the projection's pointer (offsets NULL: each part's bytes after the last's; given:
 * the parts where a GGUF file holds them, mapped, not copied): MIXED + an entry of the table (the
 * same entry for the same parts), or -1 when the table is full or a type is unknown. */
int kq_mixed(int n, const int64_t *rows, const int32_t *types, const int64_t *offsets) {
    if (n < 1 || n > MAX_PARTS) return -1;
    for (int i = 0; i < n; i++)
        if (!block_bytes(types[i]) || (offsets && offsets[i] < 0)) return -1;
    int found = -1;
#pragma omp critical(kq_mixes)
    {
        for (int e = 0; e < n_mixes && found < 0; e++) {
            int same = mixes[e].n == n;
            for (int i = 0; same && i < n; i++)
                same = mixes[e].rows[i] == rows[i] && mixes[e].types[i] == types[i] &&
                       mixes[e].offsets[i] == (offsets ? offsets[i] : -1);
            if (same) found = e;
        }
        if (found < 0 && n_mixes < MAX_MIXED) {
            mixes[n_mixes].n = n;
            for (int i = 0; i < n; i++)
                mixes[n_mixes].rows[i] = rows[i], mixes[n_mixes].types[i] = types[i],
                mixes[n_mixes].offsets[i] = offsets ? offsets[i] : -1;
            found = n_mixes++;
        }
    }
    return found < 0 ? -1 : MIXED + found;
}

/* Whether this file multiplies `type` (blockmm.c keeps Q4_0, Q4_1, Q8_0 alone and its repacked types). */
int kq_handles(int type) {
    return is_float(type) || type == Q5_0 || type == Q5_1 || type == Q4_K || type == Q5_K || type == Q6_K || is_r8(type) ||
           (type >= MIXED && type < MIXED + n_mixes);
}

/* The parts of a kernel type: one for a plain type. */
static mixed_t parts_of(int type) {
    if (type >= MIXED) return mixes[type - MIXED];
    mixed_t one = {1, {0}, {type}, {-1}};
    one.rows[0] = INT64_MAX;
    return one;
}

/* Where part i of `p` starts: at its offset from w, or (no offset) at `next`, after the last part. */
static inline const uint8_t *part_at(const mixed_t *p, int i, const uint8_t *w, const uint8_t *next) {
    return p->offsets[i] >= 0 ? w + p->offsets[i] : next;
}

/* -- decoding, in plain C --------------------------------------------------------------------- */

static float half(const uint8_t *p) { /* IEEE fp16 -> fp32, exact */
    const uint16_t h = (uint16_t)(p[0] | p[1] << 8);
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0 && man == 0) bits = sign;
    else if (exp == 0) { /* subnormal: normalise */
        exp = 113;
        while (!(man & 0x400)) man <<= 1, exp--;
        bits = sign | exp << 23 | (man & 0x3ff) << 13;
    } else if (exp == 31) bits = sign | 0x7f800000 | man << 13;
    else bits = sign | (exp + 112) << 23 | man << 13;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Sub-block j's 6-bit scale and min of a Q4_K / Q5_K super-block's 12 bytes (see ggml.py). */
static inline void scale_min(const uint8_t *s, int j, int *sc, int *m) {
    if (j < 4) {
        *sc = s[j] & 63, *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xF) | (s[j - 4] >> 6) << 4;
        *m = (s[j + 4] >> 4) | (s[j] >> 6) << 4;
    }
}

/* Block j (of 32 weights) of a row: its scales s[0] (weights 0..15) and s[1] (16..31), and its
 * offset mn, rounded as gguf-py rounds them (d * sc, dmin * m: one float multiply each). */
static inline void block_scales(const uint8_t *row, int64_t j, int type, float s[2], float *mn) {
    *mn = 0.f;
    if (type == Q4_K || type == Q5_K) {
        const uint8_t *b = row + j / 8 * block_bytes(type);
        int sc, m;
        scale_min(b + 4, (int)(j % 8), &sc, &m);
        s[0] = s[1] = half(b) * (float)sc;
        *mn = -(half(b + 2) * (float)m);
    } else if (type == Q6_K) {
        const uint8_t *b = row + j / 8 * 210;
        const int8_t *sc = (const int8_t *)(b + 192) + 2 * (j % 8);
        const float d = half(b + 208);
        s[0] = d * (float)sc[0], s[1] = d * (float)sc[1];
    } else {
        const uint8_t *b = row + j * block_bytes(type);
        s[0] = s[1] = half(b);
        if (type == Q4_1 || type == Q5_1) *mn = half(b + 2);
    }
}

/* Block j's 32 codes q (w = s * q + mn), offsets (-8, -16, -32) applied. */
static void block_codes(const uint8_t *row, int64_t j, int type, int16_t q[32]) {
    if (type == Q4_K || type == Q5_K) {
        const uint8_t *b = row + j / 8 * block_bytes(type);
        const int sub = (int)(j % 8), shift = 4 * (sub % 2);
        const uint8_t *qs = b + (type == Q4_K ? 16 : 48) + 32 * (sub / 2), *qh = b + 16;
        for (int i = 0; i < 32; i++)
            q[i] = (int16_t)(((qs[i] >> shift) & 15) | (type == Q5_K ? ((qh[i] >> sub) & 1) << 4 : 0));
    } else if (type == Q6_K) { /* half h of 128 weights; within it, row r of 32: ql low/high nibbles, qh 2-bit field r */
        const uint8_t *b = row + j / 8 * 210;
        const int sub = (int)(j % 8), h = sub / 4, r = sub % 4;
        const uint8_t *ql = b + 64 * h + 32 * (r % 2), *qh = b + 128 + 32 * h;
        for (int i = 0; i < 32; i++)
            q[i] = (int16_t)((((ql[i] >> (4 * (r / 2))) & 15) | ((qh[i] >> (2 * r)) & 3) << 4) - 32);
    } else if (type == Q8_0) {
        const uint8_t *b = row + j * 34;
        for (int i = 0; i < 32; i++) q[i] = (int8_t)b[2 + i];
    } else { /* Q4_0, Q4_1, Q5_0, Q5_1: byte i holds weight i (low nibble) and i + 16 (high) */
        const uint8_t *b = row + j * block_bytes(type);
        const int five = type == Q5_0 || type == Q5_1, head = 2 + 2 * has_min(type);
        const int off = type == Q4_0 ? 8 : type == Q5_0 ? 16 : 0;
        const uint8_t *qs = b + head + 4 * five;
        uint32_t qh = 0;
        if (five) qh = (uint32_t)b[head] | (uint32_t)b[head + 1] << 8 | (uint32_t)b[head + 2] << 16 | (uint32_t)b[head + 3] << 24;
        for (int i = 0; i < 16; i++) {
            q[i] = (int16_t)(((qs[i] & 15) | ((qh >> i) & 1) << 4) - off);
            q[i + 16] = (int16_t)(((qs[i] >> 4) | ((qh >> (i + 16)) & 1) << 4) - off);
        }
    }
}

/* A row of K weights as float32, bit-exact with gguf-py. */
static float bf16(const uint8_t *p) { /* bfloat16 -> fp32: the top half of its bits */
    const uint32_t bits = (uint32_t)(p[0] | p[1] << 8) << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Weight k of a row of float weights (F32, F16, BF16), exactly. */
static inline float float_weight(const uint8_t *row, int64_t k, int type) {
    if (type == F32) {
        float f;
        memcpy(&f, row + 4 * k, 4);
        return f;
    }
    return type == F16 ? half(row + 2 * k) : bf16(row + 2 * k);
}

__attribute__((optimize("fp-contract=off"))) static void dequantize_row(const uint8_t *row, float *o, int64_t K,
                                                                        int type) {
    if (is_float(type)) {
        for (int64_t k = 0; k < K; k++) o[k] = float_weight(row, k, type);
        return;
    }
    const int min = has_min(type);
    for (int64_t j = 0; j < K / 32; j++, o += 32) {
        int16_t q[32];
        float s[2], mn;
        block_scales(row, j, type, s, &mn);
        block_codes(row, j, type, q);
        for (int i = 0; i < 32; i++) o[i] = min ? s[i / 16] * (float)q[i] + mn : s[i / 16] * (float)q[i];
    }
}

/* -- rows repacked eight at a time (kernel types R8 + t): the decode kernel's layout -----------
 * Per group of eight rows and unit (a block of 32 weights, or a K-quant's super-block of 256), the
 * eight rows' bytes of the unit in another order, the same size (blockmm.c's tile8 layout, for
 * every type): first the scales, then for each block of 32 the codes c(i, k) of rows i = 0..7,
 * weights k = 4t + 2h + e of the block, without their offsets (-8, -16, -32):
 *
 *   scales  d[8] f16 (Q4_0, Q5_0, Q8_0, Q6_K), then m[8] (Q4_1, Q5_1) or dmin[8] (Q4_K, Q5_K);
 *           Q4_K, Q5_K: their 12 bytes of 6-bit scales as 12 planes of 8 (byte p of rows 0..7);
 *           Q6_K: its 16 int8 scales as 16 planes of 8
 *   codes   Q8_0: byte 32t + 16h + 2i + e = c(i, k);
 *           the others: 128 bytes of low nibbles, byte 16t + 2i + e = c(i, 4t + e) | c(i, 4t + 2 + e) << 4,
 *           then Q5_x: 32 bytes, 16-bit lane 2i + e, bit 2t + h = bit 4 of c(i, k) (inverted for
 *           Q5_0, so that c - 16 = low nibble - 16 * bit); Q6_K: 64 bytes, for t < 4 then t >= 4,
 *           16-bit lane 2i + e, bits 4 (t % 4) + 2h and up = bits 4 and 5 of c(i, k).
 *
 * So a 16-byte load widens to a register of int16 pairs, a pair per row, and one `madd` with the
 * broadcast pair of activations gives each row's lane its part of the dot product (see `r8_row`).
 * `kq_repack` makes the layout, `unrepack_row` gives a row back in the file's format. */
static int64_t r8_head(int t) {
    return t == Q4_K || t == Q5_K ? 128 : t == Q6_K ? 144 : t == Q4_1 || t == Q5_1 ? 32 : 16;
}
static int64_t r8_block(int t) { /* bytes of a block of 32 codes of the eight rows */
    return t == Q8_0 ? 256 : t == Q6_K ? 192 : t == Q5_0 || t == Q5_1 || t == Q5_K ? 160 : 128;
}
static int code_offset(int t) { return t == Q4_0 ? 8 : t == Q5_0 ? 16 : t == Q6_K ? 32 : 0; }

/* Code (i, k) of a block of eight repacked rows (its bytes q), without its offset (`r8_pack_block`
 * sets them). */
static int r8_code(const uint8_t *q, int i, int k, int t) {
    const int tt = k / 4, h = k / 2 % 2, e = k % 2, lane = 2 * (2 * i + e);
    if (t == Q8_0) return (int8_t)q[32 * tt + 16 * h + 2 * i + e];
    int c = (q[16 * tt + 2 * i + e] >> (4 * h)) & 15;
    if (t == Q5_0 || t == Q5_1 || t == Q5_K) {
        const int bit = 2 * tt + h;
        c |= (((q[128 + lane + bit / 8] >> (bit % 8)) & 1) ^ (t == Q5_0)) << 4;
    } else if (t == Q6_K) {
        const int bit = 4 * (tt % 4) + 2 * h;
        c |= ((q[128 + 32 * (tt / 4) + lane + bit / 8] >> (bit % 8)) & 3) << 4;
    }
    return c;
}
/* The scale bytes of one row's unit b to or from the repacked unit's scales u (row i); `back`: u to b. */
static void r8_scale_bytes(uint8_t *b, uint8_t *u, int i, int t, int back) {
    int n = 0, from[18], to[18]; /* byte pairs: b offset, u offset */
    if (t == Q6_K) {
        from[n] = 208, to[n++] = 2 * i, from[n] = 209, to[n++] = 2 * i + 1;
        for (int p = 0; p < 16; p++) from[n] = 192 + p, to[n++] = 16 + 8 * p + i;
    } else {
        from[n] = 0, to[n++] = 2 * i, from[n] = 1, to[n++] = 2 * i + 1;
        if (has_min(t)) from[n] = 2, to[n++] = 16 + 2 * i, from[n] = 3, to[n++] = 17 + 2 * i;
        if (t == Q4_K || t == Q5_K)
            for (int p = 0; p < 12; p++) from[n] = 4 + p, to[n++] = 32 + 8 * p + i;
    }
    for (int j = 0; j < n; j++) {
        if (back) b[from[j]] = u[to[j]];
        else u[to[j]] = b[from[j]];
    }
}

/* Block j's 32 codes (without offsets) into a row's bytes (zeroed first): block_codes' inverse. */
static void set_block_codes(uint8_t *row, int64_t j, int t, const int c[32]) {
    if (t == Q4_K || t == Q5_K) {
        uint8_t *b = row + j / 8 * block_bytes(t);
        const int sub = (int)(j % 8);
        uint8_t *qs = b + (t == Q4_K ? 16 : 48) + 32 * (sub / 2);
        for (int i = 0; i < 32; i++) {
            qs[i] |= (uint8_t)((c[i] & 15) << (4 * (sub % 2)));
            if (t == Q5_K) b[16 + i] |= (uint8_t)(((c[i] >> 4) & 1) << sub);
        }
    } else if (t == Q6_K) {
        uint8_t *b = row + j / 8 * 210;
        const int sub = (int)(j % 8), h = sub / 4, r = sub % 4;
        for (int i = 0; i < 32; i++) {
            b[64 * h + 32 * (r % 2) + i] |= (uint8_t)((c[i] & 15) << (4 * (r / 2)));
            b[128 + 32 * h + i] |= (uint8_t)(((c[i] >> 4) & 3) << (2 * r));
        }
    } else if (t == Q8_0) {
        for (int i = 0; i < 32; i++) row[j * 34 + 2 + i] = (uint8_t)c[i];
    } else {
        uint8_t *b = row + j * block_bytes(t);
        const int five = t == Q5_0 || t == Q5_1, head = 2 + 2 * has_min(t);
        uint8_t *qs = b + head + 4 * five;
        for (int i = 0; i < 16; i++) qs[i] = (uint8_t)((c[i] & 15) | (c[i + 16] & 15) << 4);
        if (five)
            for (int i = 0; i < 32; i++) b[head + i / 8] |= (uint8_t)(((c[i] >> 4) & 1) << (i % 8));
    }
}

/* The codes c[i][k] (offsets removed) of one block of eight rows into its repacked bytes q (zeroed
 * first), in straight loops: a model's load runs this on every weight. */
static inline __attribute__((always_inline)) void r8_pack_block(uint8_t *q, int c[8][32], const int t) {
    for (int i = 0; i < 8; i++)
        for (int tt = 0; tt < 8; tt++)
            for (int h = 0; h < 2; h++)
                for (int e = 0; e < 2; e++) {
                    const int v = c[i][4 * tt + 2 * h + e], lane = 2 * (2 * i + e);
                    if (t == Q8_0) {
                        q[32 * tt + 16 * h + 2 * i + e] = (uint8_t)v;
                        continue;
                    }
                    q[16 * tt + 2 * i + e] |= (uint8_t)((v & 15) << (4 * h));
                    if (t == Q5_0 || t == Q5_1 || t == Q5_K) {
                        const int bit = 2 * tt + h;
                        q[128 + lane + bit / 8] |= (uint8_t)((((v >> 4) & 1) ^ (t == Q5_0)) << (bit % 8));
                    } else if (t == Q6_K) {
                        const int bit = 4 * (tt % 4) + 2 * h;
                        q[128 + 32 * (tt / 4) + lane + bit / 8] |= (uint8_t)(((v >> 4) & 3) << (bit % 8));
                    }
                }
}

/* Rows of one type (N a multiple of 8) into the repacked layout, in place: each group of eight
 * rows is copied aside, then written back reordered. A small model's projections on one thread:
 * a fork and join each (~120 for SmolLM2-135M) cost more on a busy machine than they save. */
static void repack_part(uint8_t *w, int64_t N, int64_t K, int t) {
    const int64_t bs = block_bytes(t), nu = K / block_values(t), nsub = block_values(t) / 32;
#pragma omp parallel for schedule(static) if (N * K >= (1 << 24))
    for (int64_t g = 0; g < N / 8; g++) {
        uint8_t *src = malloc((size_t)(8 * nu * bs)), *dst = w + g * 8 * nu * bs;
        memcpy(src, dst, (size_t)(8 * nu * bs));
        memset(dst, 0, (size_t)(8 * nu * bs));
        for (int64_t u = 0; u < nu; u++) {
            uint8_t *o = dst + u * 8 * bs;
            for (int i = 0; i < 8; i++) r8_scale_bytes(src + i * nu * bs + u * bs, o, i, t, 0);
            for (int s = 0; s < nsub; s++) {
                int c[8][32];
                for (int i = 0; i < 8; i++) {
                    int16_t q[32];
                    block_codes(src + i * nu * bs, u * nsub + s, t, q);
                    for (int k = 0; k < 32; k++) c[i][k] = q[k] + code_offset(t);
                }
                switch (t) { /* each type's loops of its own */
                    case Q4_0: r8_pack_block(o + r8_head(t) + s * r8_block(t), c, Q4_0); break;
                    case Q4_1: r8_pack_block(o + r8_head(t) + s * r8_block(t), c, Q4_1); break;
                    case Q5_0: r8_pack_block(o + r8_head(t) + s * r8_block(t), c, Q5_0); break;
                    case Q5_1: r8_pack_block(o + r8_head(t) + s * r8_block(t), c, Q5_1); break;
                    case Q8_0: r8_pack_block(o + r8_head(t) + s * r8_block(t), c, Q8_0); break;
                    case Q4_K: r8_pack_block(o + r8_head(t) + s * r8_block(t), c, Q4_K); break;
                    case Q5_K: r8_pack_block(o + r8_head(t) + s * r8_block(t), c, Q5_K); break;
                    default: r8_pack_block(o + r8_head(t) + s * r8_block(t), c, Q6_K); break;
                }
            }
        }
        free(src);
    }
}

/* Row r of repacked rows of type t, in the file's format, into out (a row's bytes). */
static void unrepack_row(const uint8_t *w, int64_t r, int64_t K, int t, uint8_t *out) {
    const int64_t bs = block_bytes(t), nu = K / block_values(t), nsub = block_values(t) / 32;
    const int i = (int)(r % 8);
    memset(out, 0, (size_t)(nu * bs));
    for (int64_t u = 0; u < nu; u++) {
        uint8_t *unit = (uint8_t *)w + (r / 8 * nu + u) * 8 * bs;
        r8_scale_bytes(out + u * bs, unit, i, t, 1);
        for (int s = 0; s < nsub; s++) {
            int c[32];
            for (int k = 0; k < 32; k++) c[k] = r8_code(unit + r8_head(t) + s * r8_block(t), i, k, t);
            set_block_codes(out, u * nsub + s, t, c);
        }
    }
}

/* The rows of a projection of kernel type `type` (a plain type or a mixed one of N rows; every
 * part's rows a multiple of 8, of a repackable type) repacked in place, each part where it lies.
 * Returns 0, or -1 (nothing written) when a part cannot be. Its kernel type is then R8 + its type,
 * or a mixed one of its parts' R8 types at the same offsets (native.py asks `kq_mixed` for it). */
int kq_repack(uint8_t *w, int64_t N, int64_t K, int type) {
    const mixed_t p = parts_of(type);
    int64_t n0 = 0;
    for (int i = 0; i < p.n; i++) {
        const int64_t rows = i == p.n - 1 ? N - n0 : p.rows[i];
        if (!repackable(p.types[i]) || rows % 8 || rows < 0) return -1;
        n0 += rows;
    }
    uint8_t *at = w;
    n0 = 0;
    for (int i = 0; i < p.n; i++) {
        const int64_t rows = i == p.n - 1 ? N - n0 : p.rows[i];
        at = (uint8_t *)part_at(&p, i, w, at);
        repack_part(at, rows, K, p.types[i]);
        at += rows * kq_row_bytes(K, p.types[i]), n0 += rows;
    }
    return 0;
}

/* Where row r of a projection of kernel type `type` lies: its part's bytes (returned), the part's
 * own type (*row_type: R8 + t when repacked) and the row's index in the part (*at). */
static const uint8_t *row_at(const uint8_t *w, int64_t r, int64_t K, int type, int *row_type, int64_t *at_row) {
    const mixed_t p = parts_of(type);
    const uint8_t *at = w;
    for (int i = 0; i < p.n; i++) {
        at = part_at(&p, i, w, at);
        if (r < p.rows[i] || i == p.n - 1) {
            *row_type = p.types[i], *at_row = r;
            return at;
        }
        r -= p.rows[i];
        at += p.rows[i] * kq_row_bytes(K, p.types[i]);
    }
    return NULL;
}

#if HERD_SIMD
static void r8_panel(const uint8_t *g, int64_t K, float *panel, int dn, int j0, int t);
#endif

/* Rows ids[0..n-1] (NULL: rows 0..n-1) as float32 (n, K): an embedding lookup, a weight for tests
 * and for QLoRA's backward pass. A repacked row: its group of eight decoded as the float32 path's
 * panels are (the same rounding), or given back in the file's format on the plain-C path. */
void kq_rows_dequantize(const uint8_t *w, const int64_t *ids, int64_t n, float *out, int64_t K, int type) {
#pragma omp parallel for schedule(static) if (n >= ROWS_ALONE)
    for (int64_t i = 0; i < n; i++) {
        int t = type;
        int64_t r = 0;
        const uint8_t *part = row_at(w, ids ? ids[i] : i, K, type, &t, &r);
        if (!is_r8(t)) {
            dequantize_row(part + r * kq_row_bytes(K, t), out + i * K, K, t);
            continue;
        }
#if HERD_SIMD
        if (!force_scalar) {
            float *cols = aligned_alloc(32, (size_t)K * 8 * sizeof(float));
            r8_panel(part + r / 8 * 8 * kq_row_bytes(K, t), K, cols, 8, 0, base_type(t));
            for (int64_t k = 0; k < K; k++) out[i * K + k] = cols[8 * k + r % 8];
            free(cols);
            continue;
        }
#endif
        uint8_t *buf = malloc((size_t)kq_row_bytes(K, t));
        unrepack_row(part, r, K, base_type(t), buf);
        dequantize_row(buf, out + i * K, K, base_type(t));
        free(buf);
    }
}

/* -- y = x @ W^T on int16 activation blocks (decode) ----------------------------------------- */

/* One weight row against one activation row, in plain C: the scalar path, and the order the kernels
 * on repacked rows sum in (`block_step`, the panel): per block, its exact integer dot product
 * scaled once (Q6_K: each half of 16 weights by its own scale), then its offset, into one sum. */
static float row_dot(const uint8_t *row, const int16_t *xq, const float *xd, const float *xs, int64_t nb, int type) {
    float acc = 0.f;
    for (int64_t j = 0; j < nb; j++) {
        int16_t q[32];
        float s[2], mn;
        block_scales(row, j, type, s, &mn);
        block_codes(row, j, type, q);
        int32_t lo = 0, hi = 0;
        for (int i = 0; i < 16; i++) lo += q[i] * xq[32 * j + i], hi += q[i + 16] * xq[32 * j + 16 + i];
        if (type == Q6_K) {
            acc = fmaf(s[0] * xd[j], (float)lo, acc);
            acc = fmaf(s[1] * xd[j], (float)hi, acc);
        } else {
            acc = fmaf(s[0] * xd[j], (float)(lo + hi), acc);
        }
        if (has_min(type)) acc = fmaf(mn, xs[j], acc);
    }
    return acc;
}

#if HERD_SIMD
/* Block j's 32 codes as int16 in two registers (weights 0..15, 16..31): block_codes in AVX2. */
static inline __attribute__((always_inline)) void codes(const uint8_t *row, int64_t j, const int type, __m256i w[2]) {
    const __m256i nib = _mm256_set1_epi8(0x0F);
    __m256i v; /* the 32 codes as bytes, in order, before offsets */
    if (type == Q8_0) {
        const uint8_t *qs = row + j * 34 + 2;
        w[0] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)qs));
        w[1] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qs + 16)));
        return;
    }
    if (type == Q4_K || type == Q5_K) {
        const uint8_t *b = row + j / 8 * block_bytes(type);
        const int sub = (int)(j % 8);
        v = _mm256_loadu_si256((const __m256i *)(b + (type == Q4_K ? 16 : 48) + 32 * (sub / 2)));
        v = _mm256_and_si256(sub % 2 ? _mm256_srli_epi16(v, 4) : v, nib);
        if (type == Q5_K) {
            const __m256i bit = _mm256_set1_epi8((char)(1 << sub));
            const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_loadu_si256((const __m256i *)(b + 16)), bit), bit);
            v = _mm256_or_si256(v, _mm256_and_si256(set, _mm256_set1_epi8(16)));
        }
    } else if (type == Q6_K) {
        const uint8_t *b = row + j / 8 * 210;
        const int sub = (int)(j % 8), h = sub / 4, r = sub % 4;
        const __m256i ql = _mm256_loadu_si256((const __m256i *)(b + 64 * h + 32 * (r % 2)));
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
        const __m256i lo = _mm256_and_si256(r / 2 ? _mm256_srli_epi16(ql, 4) : ql, nib);
        const __m256i hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * r)), _mm256_set1_epi8(3));
        v = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
    } else { /* Q4_0, Q4_1, Q5_0, Q5_1 */
        const uint8_t *b = row + j * block_bytes(type);
        const int five = type == Q5_0 || type == Q5_1, head = 2 + 2 * has_min(type);
        const __m128i raw = _mm_loadu_si128((const __m128i *)(b + head + 4 * five));
        v = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), nib);
        if (five) { /* byte i of the block gets bit i of qh: byte i / 8 of it, tested against 1 << i % 8 */
            int32_t qh;
            memcpy(&qh, b + head, 4);
            const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(qh),
                _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
            const __m256i bits = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
            const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bits), bits);
            v = _mm256_or_si256(v, _mm256_and_si256(set, _mm256_set1_epi8(16)));
        }
    }
    w[0] = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(v));
    w[1] = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(v, 1));
    const int off = type == Q4_0 ? 8 : type == Q5_0 ? 16 : type == Q6_K ? 32 : 0;
    if (off) {
        w[0] = _mm256_sub_epi16(w[0], _mm256_set1_epi16((short)off));
        w[1] = _mm256_sub_epi16(w[1], _mm256_set1_epi16((short)off));
    }
}

#define NT 2 /* weight rows a tile: each activation block loaded once for them */
#define MT 4 /* activation rows a tile: each weight block decoded once for them */

static inline __attribute__((always_inline)) float f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* block_scales for every block of 32 of super-block sb (8 of them for the K-quants, 1 otherwise),
 * each scale and min unpacked once: s[j] (two halves) and mn[j]. */
static inline __attribute__((always_inline)) void super_scales(const uint8_t *row, int64_t sb, const int type,
                                                               float s[8][2], float mn[8]) {
    const uint8_t *b = row + sb * block_bytes(type);
    if (type == Q4_K || type == Q5_K) {
        const float d = f16(b), dmin = f16(b + 2);
        for (int j = 0; j < 8; j++) {
            int sc, m;
            scale_min(b + 4, j, &sc, &m);
            s[j][0] = s[j][1] = d * (float)sc;
            mn[j] = -(dmin * (float)m);
        }
    } else if (type == Q6_K) {
        const float d = f16(b + 208);
        const int8_t *sc = (const int8_t *)(b + 192);
        for (int j = 0; j < 8; j++) s[j][0] = d * (float)sc[2 * j], s[j][1] = d * (float)sc[2 * j + 1], mn[j] = 0.f;
    } else {
        s[0][0] = s[0][1] = f16(b);
        mn[0] = has_min(type) ? f16(b + 2) : 0.f;
    }
}

/* Output features n .. n + nt - 1 for activation rows m0 .. m0 + mt - 1 (see blockmm.c's `tile`), rows
 * in the file's layout: a register holds eight lanes of one row's block, so a block's dot product is
 * left in eight partial sums, each scaled in float into its own accumulator, and the accumulators
 * are summed at the end (`hsum`). Reducing every block to row_dot's one sum first cost ~1.5x here
 * (a horizontal sum a block, per feature and row): so a tensor kept in this layout (rows not a
 * multiple of eight, an output whose tied embedding is read otherwise) gets numbers within float
 * rounding of repacked rows', the same for any number of rows. */
static inline __attribute__((always_inline)) void tile(const uint8_t *w, int64_t row_bytes, const int16_t *xq,
        const float *xd, const float *xs, float *y, int64_t ldy, int64_t n, int64_t m0, int64_t nb, const int nt,
        const int mt, const int type) {
    const int nsub = (int)(block_values(type) / 32);
    __m256 acc[NT][MT];
    float mins[NT][MT];
    for (int f = 0; f < nt; f++)
        for (int r = 0; r < mt; r++) acc[f][r] = _mm256_setzero_ps(), mins[f][r] = 0.f;
    for (int64_t sb = 0; sb < nb / nsub; sb++) {
        float s[NT][8][2], mn[NT][8];
        for (int f = 0; f < nt; f++) {
            const uint8_t *row = w + (n + f) * row_bytes;
            for (int64_t at = 0; at < block_bytes(type); at += 64) /* every cache line, 1 KB ahead */
                _mm_prefetch((const char *)row + sb * block_bytes(type) + at + PREFETCH, _MM_HINT_T0);
            super_scales(row, sb, type, s[f], mn[f]);
        }
        for (int j = 0; j < nsub; j++) {
            const int64_t b = sb * nsub + j;
            __m256i q[NT][2];
            for (int f = 0; f < nt; f++) codes(w + (n + f) * row_bytes, b, type, q[f]);
            for (int r = 0; r < mt; r++) {
                const int64_t i = (m0 + r) * nb + b;
                const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + i * 32));
                const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + i * 32 + 16));
                for (int f = 0; f < nt; f++) {
                    /* exact integer dot products (|q| <= 128, |x| <= 32767: < 2^31 a lane), scaled once */
                    const __m256i p0 = _mm256_madd_epi16(q[f][0], x0), p1 = _mm256_madd_epi16(q[f][1], x1);
                    if (type == Q6_K) { /* two scales a block */
                        acc[f][r] = _mm256_fmadd_ps(_mm256_set1_ps(s[f][j][0] * xd[i]), _mm256_cvtepi32_ps(p0), acc[f][r]);
                        acc[f][r] = _mm256_fmadd_ps(_mm256_set1_ps(s[f][j][1] * xd[i]), _mm256_cvtepi32_ps(p1), acc[f][r]);
                    } else {
                        acc[f][r] = _mm256_fmadd_ps(_mm256_set1_ps(s[f][j][0] * xd[i]),
                                                    _mm256_cvtepi32_ps(_mm256_add_epi32(p0, p1)), acc[f][r]);
                    }
                    if (has_min(type)) mins[f][r] += mn[f][j] * xs[i];
                }
            }
        }
    }
    for (int f = 0; f < nt; f++)
        for (int r = 0; r < mt; r++) y[(m0 + r) * ldy + n + f] = hsum(acc[f][r]) + mins[f][r];
}

/* -- float weights (F32, F16, BF16: a Hugging Face checkpoint's as stored) ----------------------
 * y = x @ W^T with the activations kept float32 (nothing to gain from rounding them: the weights
 * are already 16 or 32 bits) and each weight widened to float32 as it is read, as llama.cpp runs an
 * F16 GGUF. Half the bytes of a float32 model a token, and no torch op between the matmuls. Each
 * y[m, n] is one chain of multiply-adds over k in 8 lanes, then `hsum`: the same for any M. */
static inline __attribute__((always_inline)) __m256 load8(const uint8_t *row, int64_t k, const int type) {
    if (type == F32) return _mm256_loadu_ps((const float *)row + k);
    const __m128i h = _mm_loadu_si128((const __m128i *)(row + 2 * k));
    if (type == F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); /* BF16 */
}

#define FNT 4 /* weight rows a tile */
#define FMT 2 /* activation rows a tile */

static inline __attribute__((always_inline)) void float_tile(const uint8_t *w, int64_t row_bytes, const float *x,
        float *y, int64_t ldy, int64_t n, int64_t m0, int64_t K, const int nt, const int mt, const int type) {
    __m256 acc[FNT][FMT];
    for (int f = 0; f < nt; f++)
        for (int r = 0; r < mt; r++) acc[f][r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
        __m256 wv[FNT];
        for (int f = 0; f < nt; f++) {
            const uint8_t *row = w + (n + f) * row_bytes;
            if (k % 32 == 0) _mm_prefetch((const char *)row + k * (row_bytes / K) + PREFETCH, _MM_HINT_T0);
            wv[f] = load8(row, k, type);
        }
        for (int r = 0; r < mt; r++) {
            const __m256 xv = _mm256_loadu_ps(x + (m0 + r) * K + k);
            for (int f = 0; f < nt; f++) acc[f][r] = _mm256_fmadd_ps(wv[f], xv, acc[f][r]);
        }
    }
    for (int f = 0; f < nt; f++)
        for (int r = 0; r < mt; r++) y[(m0 + r) * ldy + n + f] = hsum(acc[f][r]);
}

#define FTILE(nt, type)                                                                      \
    if (mt == 1) float_tile(w, row_bytes, x, y, ldy, n, m0, K, nt, 1, type);                 \
    else float_tile(w, row_bytes, x, y, ldy, n, m0, K, nt, 2, type);
#define FTILES(type)                                                                          \
    switch (nt) {                                                                             \
        case 1: FTILE(1, type) break;                                                         \
        case 2: FTILE(2, type) break;                                                         \
        case 3: FTILE(3, type) break;                                                         \
        default: FTILE(4, type) break;                                                        \
    }

static void float_mm_simd(const float *x, const uint8_t *w, float *y, int64_t ldy, int64_t M, int64_t N, int64_t K,
                          int type) {
    const int64_t row_bytes = kq_row_bytes(K, type);
#pragma omp for schedule(static) nowait
    for (int64_t n = 0; n < N; n += FNT) {
        const int nt = (int)(N - n < FNT ? N - n : FNT);
        for (int64_t m0 = 0; m0 < M; m0 += FMT) {
            const int mt = (int)(M - m0 < FMT ? M - m0 : FMT);
            if (type == F32) { FTILES(F32) } else if (type == F16) { FTILES(F16) } else { FTILES(BF16) }
        }
    }
}

/* dequantize_row in AVX2, to the same bits (a multiply, then an add: contraction off): the prompt
 * path's panels, which the scalar loop made cost more than the multiply itself. */
static inline __attribute__((always_inline)) void dequantize_row_t(const uint8_t *row, float *o, int64_t K,
                                                                   const int type) {
    const int nsub = (int)(block_values(type) / 32);
    for (int64_t sb = 0; sb < K / block_values(type); sb++) {
        float s[8][2], mn[8];
        super_scales(row, sb, type, s, mn);
        for (int j = 0; j < nsub; j++) {
            const int64_t b = sb * nsub + j;
            __m256i q[2];
            codes(row, b, type, q);
            for (int h = 0; h < 2; h++) {
                const __m256 sc = _mm256_set1_ps(s[j][h]), m = _mm256_set1_ps(mn[j]);
                const __m256i halves[2] = {_mm256_cvtepi16_epi32(_mm256_castsi256_si128(q[h])),
                                           _mm256_cvtepi16_epi32(_mm256_extracti128_si256(q[h], 1))};
                for (int e = 0; e < 2; e++) {
                    __m256 v = _mm256_mul_ps(sc, _mm256_cvtepi32_ps(halves[e]));
                    if (has_min(type)) v = _mm256_add_ps(v, m);
                    _mm256_storeu_ps(o + b * 32 + 16 * h + 8 * e, v);
                }
            }
        }
    }
}

__attribute__((optimize("fp-contract=off"))) static void dequantize_row_simd(const uint8_t *row, float *o,
                                                                            int64_t K, int type) {
    if (is_float(type)) {
        for (int64_t k = 0; k < K; k += 8) _mm256_storeu_ps(o + k, load8(row, k, type));
        return;
    }
    switch (type) {
        case Q4_0: dequantize_row_t(row, o, K, Q4_0); break;
        case Q4_1: dequantize_row_t(row, o, K, Q4_1); break;
        case Q5_0: dequantize_row_t(row, o, K, Q5_0); break;
        case Q5_1: dequantize_row_t(row, o, K, Q5_1); break;
        case Q8_0: dequantize_row_t(row, o, K, Q8_0); break;
        case Q4_K: dequantize_row_t(row, o, K, Q4_K); break;
        case Q5_K: dequantize_row_t(row, o, K, Q5_K); break;
        default: dequantize_row_t(row, o, K, Q6_K); break;
    }
}

#define TILE(nt, type)                                                                        \
    switch (mt) {                                                                             \
        case 1: tile(w, row_bytes, xq, xd, xs, y, ldy, n, m0, nb, nt, 1, type); break;        \
        case 2: tile(w, row_bytes, xq, xd, xs, y, ldy, n, m0, nb, nt, 2, type); break;        \
        case 3: tile(w, row_bytes, xq, xd, xs, y, ldy, n, m0, nb, nt, 3, type); break;        \
        default: tile(w, row_bytes, xq, xd, xs, y, ldy, n, m0, nb, nt, 4, type); break;       \
    }
#define TILES(type) { if (n + 1 < N) TILE(2, type) else TILE(1, type) } break;

static void mm_simd(const int16_t *xq, const float *xd, const float *xs, const uint8_t *w, float *y, int64_t ldy,
                    int64_t M, int64_t N, int64_t K, int type) {
    const int64_t nb = K / 32, row_bytes = kq_row_bytes(K, type);
#pragma omp for schedule(static) nowait
    for (int64_t n = 0; n < N; n += NT)
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            const int mt = (int)(M - m0 < MT ? M - m0 : MT);
            switch (type) {
                case Q4_0: TILES(Q4_0)
                case Q4_1: TILES(Q4_1)
                case Q5_0: TILES(Q5_0)
                case Q5_1: TILES(Q5_1)
                case Q8_0: TILES(Q8_0)
                case Q4_K: TILES(Q4_K)
                case Q5_K: TILES(Q5_K)
                default: TILES(Q6_K)
            }
        }
}

/* -- the decode product on repacked rows (see "rows repacked eight at a time") -----------------
 * row_dot's arithmetic, to the bit, eight rows at a time: a register holds one number of each of
 * the eight rows (a block's integer dot products, its scales, the sums). */
#define AI inline __attribute__((always_inline))

static AI __m256i shift16(__m256i v, const int s) { return s >= 0 ? _mm256_slli_epi16(v, s) : _mm256_srli_epi16(v, -s); }

/* The eight rows' codes k = 4t .. 4t + 3 of a repacked block (its codes q), offsets applied, as
 * int16 pairs a row: lo (4t, 4t + 1), hi (4t + 2, 4t + 3). hb: Q5_x's bit lanes, Q6_K's for t. */
static AI void r8_pairs(const uint8_t *q, const int t, const int type, const __m256i hb, __m256i *lo, __m256i *hi) {
    if (type == Q8_0) {
        *lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + 32 * t)));
        *hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + 32 * t + 16)));
        return;
    }
    const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(q + 16 * t)));
    __m256i a = _mm256_and_si256(w, _mm256_set1_epi16(15)), b = _mm256_srli_epi16(w, 4);
    if (type == Q5_0 || type == Q5_1 || type == Q5_K) { /* bits 2t, 2t + 1 of each lane to bit 4 */
        const __m256i bit = _mm256_set1_epi16(16);
        const __m256i ba = _mm256_and_si256(shift16(hb, 4 - 2 * t), bit), bb = _mm256_and_si256(shift16(hb, 3 - 2 * t), bit);
        if (type == Q5_0) a = _mm256_sub_epi16(a, ba), b = _mm256_sub_epi16(b, bb); /* inverted: c - 16 */
        else a = _mm256_or_si256(a, ba), b = _mm256_or_si256(b, bb);
    } else if (type == Q6_K) { /* bits 4 (t % 4), + 1 (lo) and + 2, + 3 (hi) to bits 4, 5 */
        const __m256i bits = _mm256_set1_epi16(0x30), off = _mm256_set1_epi16(32);
        a = _mm256_sub_epi16(_mm256_or_si256(a, _mm256_and_si256(shift16(hb, 4 - 4 * (t % 4)), bits)), off);
        b = _mm256_sub_epi16(_mm256_or_si256(b, _mm256_and_si256(shift16(hb, 2 - 4 * (t % 4)), bits)), off);
    } else if (type == Q4_0) {
        a = _mm256_sub_epi16(a, _mm256_set1_epi16(8)), b = _mm256_sub_epi16(b, _mm256_set1_epi16(8));
    }
    *lo = a, *hi = b;
}

/* Block j of a repacked unit: the eight rows' scales of its weights 0..15 (s0) and 16..31 (s1)
 * and its offset mn, the floats `super_scales` forms. */
static AI __m256i plane(const uint8_t *p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
static AI void r8_scales(const uint8_t *u, int j, const int type, __m256 *s0, __m256 *s1, __m256 *mn) {
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)u));
    *s0 = *s1 = d, *mn = _mm256_setzero_ps();
    if (type == Q4_1 || type == Q5_1) {
        *mn = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(u + 16)));
    } else if (type == Q4_K || type == Q5_K) { /* scale_min on planes of eight rows */
        const uint8_t *p = u + 32;
        __m256i sc, m;
        if (j < 4) {
            sc = _mm256_and_si256(plane(p + 8 * j), _mm256_set1_epi32(63));
            m = _mm256_and_si256(plane(p + 8 * (j + 4)), _mm256_set1_epi32(63));
        } else {
            const __m256i hi = plane(p + 8 * (j + 4));
            sc = _mm256_or_si256(_mm256_and_si256(hi, _mm256_set1_epi32(15)), _mm256_slli_epi32(_mm256_srli_epi32(plane(p + 8 * (j - 4)), 6), 4));
            m = _mm256_or_si256(_mm256_srli_epi32(hi, 4), _mm256_slli_epi32(_mm256_srli_epi32(plane(p + 8 * j), 6), 4));
        }
        const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(u + 16)));
        *s0 = *s1 = _mm256_mul_ps(d, _mm256_cvtepi32_ps(sc));
        *mn = _mm256_xor_ps(_mm256_mul_ps(dmin, _mm256_cvtepi32_ps(m)), _mm256_set1_ps(-0.f)); /* -(dmin * m) */
    } else if (type == Q6_K) {
        const uint8_t *p = u + 16 + 16 * j;
        *s0 = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))));
        *s1 = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)))));
    }
}

/* Block j of a unit's bit lanes for t (0..3, the first half) and t + 4. */
static AI void r8_bits(const uint8_t *q, const int type, __m256i *ha, __m256i *hb) {
    *ha = *hb = _mm256_setzero_si256();
    if (type == Q5_0 || type == Q5_1 || type == Q5_K) *ha = *hb = _mm256_loadu_si256((const __m256i *)(q + 128));
    if (type == Q6_K) {
        *ha = _mm256_loadu_si256((const __m256i *)(q + 128));
        *hb = _mm256_loadu_si256((const __m256i *)(q + 160));
    }
}

/* One block for one row of x (its int16 codes as pairs xp): the exact integer dot products of the
 * eight rows (pairs 0..7 are weights 0..15), scaled by f0 = s0 * xd (Q6_K: the halves by f0, f1),
 * then the offset mn times xs: row_dot's step, added to acc. */
static AI __m256 block_step(const __m256i c[16], const int32_t *xp, __m256 f0, __m256 f1, __m256 mn, float xs,
                            __m256 acc, const int type) {
    __m256i lo = _mm256_madd_epi16(c[0], _mm256_set1_epi32(xp[0]));
    __m256i hi = _mm256_madd_epi16(c[8], _mm256_set1_epi32(xp[8]));
#pragma GCC unroll 7
    for (int q = 1; q < 8; q++) {
        lo = _mm256_add_epi32(lo, _mm256_madd_epi16(c[q], _mm256_set1_epi32(xp[q])));
        hi = _mm256_add_epi32(hi, _mm256_madd_epi16(c[q + 8], _mm256_set1_epi32(xp[q + 8])));
    }
    if (type == Q6_K) {
        acc = _mm256_fmadd_ps(f0, _mm256_cvtepi32_ps(lo), acc);
        acc = _mm256_fmadd_ps(f1, _mm256_cvtepi32_ps(hi), acc);
    } else {
        acc = _mm256_fmadd_ps(f0, _mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi)), acc);
    }
    return has_min(type) ? _mm256_fmadd_ps(mn, _mm256_set1_ps(xs), acc) : acc;
}

/* A block's 16 registers of code pairs: c[2t] = lo, c[2t + 1] = hi of t. */
static AI void r8_codes(const uint8_t *q, const int type, __m256i c[16]) {
    __m256i ha, hb;
    r8_bits(q, type, &ha, &hb);
#pragma GCC unroll 8
    for (int t = 0; t < 8; t++) r8_pairs(q, t, type, t < 4 ? ha : hb, &c[2 * t], &c[2 * t + 1]);
}

/* Block j of a repacked unit (the eight rows' K-quant super-block, or their one block of another
 * type): its scales (`r8_scales`) and code pairs (`r8_codes`). */
static AI void r8_unit_block(const uint8_t *unit, int j, const int type, __m256 *s0, __m256 *s1, __m256 *mn,
                             __m256i c[16]) {
    r8_scales(unit, j, type, s0, s1, mn);
    r8_codes(unit + r8_head(type) + j * r8_block(type), type, c);
}

/* y[0..7] = the eight rows of group g against one row of x (blocks xq, xd, xs): row_dot's sums. */
static AI void r8_row(const uint8_t *g, int64_t nb, const int16_t *xq, const float *xd, const float *xs,
                      float *y, const int type) {
    const int nsub = (int)(block_values(type) / 32);
    const int64_t ub = 8 * block_bytes(type);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t u = 0; u < nb / nsub; u++) {
        const uint8_t *unit = g + u * ub;
        for (int64_t at = 0; at < ub; at += 64) _mm_prefetch((const char *)unit + at + PREFETCH, _MM_HINT_T0);
        for (int j = 0; j < nsub; j++) {
            const int64_t b = u * nsub + j;
            __m256 s0, s1, mn;
            __m256i c[16];
            r8_unit_block(unit, j, type, &s0, &s1, &mn, c);
            const __m256 xdv = _mm256_set1_ps(xd[b]);
            acc = block_step(c, (const int32_t *)(xq + 32 * b), _mm256_mul_ps(s0, xdv), _mm256_mul_ps(s1, xdv), mn,
                             xs[b], acc, type);
        }
    }
    _mm256_storeu_ps(y, acc);
}

/* The same for rows m0 .. m0 + mt - 1 of x (1 < mt <= R8M): each block of up to 8 (a K-quant's
 * unit) is decoded once into registers kept in L1, then multiplied by every row. (From PANEL_ROWS
 * rows on, kq_mm takes the panel instead.) */
#define R8M 8 /* rows of x a pass */
static AI void r8_rows(const uint8_t *g, int64_t nb, const int16_t *xq, const float *xd, const float *xs, float *y,
                       int64_t ldy, int64_t mt, const int type) {
    const int nsub = (int)(block_values(type) / 32);
    const int64_t ub = 8 * block_bytes(type);
    __m256 acc[R8M], s0[8], s1[8], mn[8];
    __m256i c[8][16];
    for (int r = 0; r < mt; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b0 = 0; b0 < nb; b0 += 8) {
        const int nbl = (int)(nb - b0 < 8 ? nb - b0 : 8);
        for (int j = 0; j < nbl; j++) {
            const int64_t b = b0 + j;
            const uint8_t *unit = g + b / nsub * ub;
            if (b % nsub == 0)
                for (int64_t at = 0; at < ub; at += 64) _mm_prefetch((const char *)unit + at + PREFETCH, _MM_HINT_T0);
            r8_unit_block(unit, (int)(b % nsub), type, &s0[j], &s1[j], &mn[j], c[j]);
        }
        for (int r = 0; r < mt; r++)
            for (int j = 0; j < nbl; j++) {
                const int64_t i = r * nb + b0 + j;
                const __m256 xdv = _mm256_set1_ps(xd[i]);
                acc[r] = block_step(c[j], (const int32_t *)(xq + 32 * i), _mm256_mul_ps(s0[j], xdv),
                                    _mm256_mul_ps(s1[j], xdv), mn[j], xs[i], acc[r], type);
            }
    }
    for (int r = 0; r < mt; r++) _mm256_storeu_ps(y + r * ldy, acc[r]);
}

#define R8TILE(t)                                                                                  \
    if (mt == 1) r8_row(grp, nb, xq + m0 * K, xd + m0 * nb, xs + m0 * nb, y + m0 * ldy + 8 * g, t);      \
    else r8_rows(grp, nb, xq + m0 * K, xd + m0 * nb, xs + m0 * nb, y + m0 * ldy + 8 * g, ldy, mt, t);    \
    break;

/* y (row stride ldy) = x @ W^T for the repacked parts of a projection, stacked: part i of type
 * types[i] (R8 + t) at at[i], its groups of eight rows from group first[i] (first[n]: all of them).
 * One loop over every part's groups, so a fused projection costs one fork and join, not one a part. */
static void mm_r8(const int16_t *xq, const float *xd, const float *xs, const uint8_t *const at[], const int types[],
                  const int64_t first[], int n, float *y, int64_t ldy, int64_t M, int64_t K) {
    const int64_t nb = K / 32;
#pragma omp for schedule(static) nowait
    for (int64_t g = 0; g < first[n]; g++) {
        int i = 0;
        while (g >= first[i + 1]) i++;
        const int t = base_type(types[i]);
        const uint8_t *grp = at[i] + (g - first[i]) * 8 * kq_row_bytes(K, t);
        for (int64_t m0 = 0; m0 < M; m0 += R8M) {
            const int64_t mt = M - m0 < R8M ? M - m0 : R8M;
            switch (t) {
                case Q4_0: R8TILE(Q4_0)
                case Q4_1: R8TILE(Q4_1)
                case Q5_0: R8TILE(Q5_0)
                case Q5_1: R8TILE(Q5_1)
                case Q8_0: R8TILE(Q8_0)
                case Q4_K: R8TILE(Q4_K)
                case Q5_K: R8TILE(Q5_K)
                default: R8TILE(Q6_K)
            }
        }
    }
}

/* -- many rows (a prompt, a wide decode step): the int16 panel (panel.h) ---------------------
 * Each thread expands 16 output features, two groups of eight repacked rows of any of these types,
 * into a panel once: per block of 32 their code pairs (`r8_codes`: offsets applied), the scales of
 * weights 0..15 and 16..31 and the offset (`r8_scales`); then takes every row of x through it four
 * rows at a time, as blockmm.c's panel does, each feature summed in row_dot's order: so a row gets
 * r8_row's numbers (decoding's) whichever computes it, and the choice is speed only (1.1-1.35x the
 * float32 path on SmolLM2's and Llama 3.2 1B's shapes, 1.5-2x r8_rows, which decodes each block of
 * weights again for every eight rows). */
typedef struct {
    __m256i *codes;       /* [nb][16 pairs q][2]: features 0..7, 8..15 */
    float *s0, *s1, *mn;  /* [nb][16]: the scales of weights 0..15 and 16..31, the offset */
} KqPanel;

/* Group h (0, 1) of the panel from the eight repacked rows grp of `type`. */
static AI void kq_panel_group_t(const uint8_t *grp, int64_t nb, int h, KqPanel *p, const int type) {
    const int nsub = (int)(block_values(type) / 32);
    const int64_t ub = 8 * block_bytes(type);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *unit = grp + b / nsub * ub;
        __m256 s0, s1, mn;
        __m256i c[16];
        r8_unit_block(unit, (int)(b % nsub), type, &s0, &s1, &mn, c);
        _mm256_store_ps(p->s0 + b * 16 + 8 * h, s0);
        _mm256_store_ps(p->s1 + b * 16 + 8 * h, s1);
        _mm256_store_ps(p->mn + b * 16 + 8 * h, mn);
        for (int q = 0; q < 16; q++) _mm256_store_si256(p->codes + (b * 16 + q) * 2 + h, c[q]);
    }
}

static void kq_panel_group(const uint8_t *grp, int64_t nb, int h, KqPanel *p, int type) {
    switch (type) {
        case Q4_0: kq_panel_group_t(grp, nb, h, p, Q4_0); break;
        case Q4_1: kq_panel_group_t(grp, nb, h, p, Q4_1); break;
        case Q5_0: kq_panel_group_t(grp, nb, h, p, Q5_0); break;
        case Q5_1: kq_panel_group_t(grp, nb, h, p, Q5_1); break;
        case Q8_0: kq_panel_group_t(grp, nb, h, p, Q8_0); break;
        case Q4_K: kq_panel_group_t(grp, nb, h, p, Q4_K); break;
        case Q5_K: kq_panel_group_t(grp, nb, h, p, Q5_K); break;
        default: kq_panel_group_t(grp, nb, h, p, Q6_K); break;
    }
}

/* How a group's blocks are scaled (block_step): one scale; one and an offset; a scale a half (Q6_K). */
enum { PLAIN, OFFSET, HALVES };
static int scaling(int type) { return type == Q6_K ? HALVES : has_min(type) ? OFFSET : PLAIN; }

/* y[m0 .. m0 + mt - 1][0 .. nn - 1] (rows ldy apart) from the panel, its groups scaled as k0, k1
 * (constants where the two are alike, so that the loop holds no test). With a group of halves
 * the panel sums the halves apart, and a group of one scale adds its two first. */
static AI void kq_panel_tile(const KqPanel *p, const int16_t *xq, const float *xd, const float *xs, float *y,
                             int64_t ldy, int64_t m0, int64_t nb, int nn, const int mt, const int k0, const int k1) {
    const int split = k0 == HALVES || k1 == HALVES;
    __m256 acc[4][2];
    for (int r = 0; r < mt; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const __m256i *c = p->codes + b * 32;
        __m256i lo[4][2], hi[4][2] = {{_mm256_setzero_si256()}}; /* hi: only read with a group of halves */
        panel_dots(c, xq, m0, nb, b, mt, 0, split ? 8 : 16, lo);
        if (split) panel_dots(c, xq, m0, nb, b, mt, 8, 8, hi);
        for (int h = 0; h < 2; h++) {
            const int k = h ? k1 : k0;
            const __m256 s0 = _mm256_load_ps(p->s0 + b * 16 + 8 * h), s1 = _mm256_load_ps(p->s1 + b * 16 + 8 * h);
            const __m256 mn = _mm256_load_ps(p->mn + b * 16 + 8 * h);
            for (int r = 0; r < mt; r++) { /* block_step's scaling */
                const int64_t i = (m0 + r) * nb + b;
                const __m256 xdv = _mm256_set1_ps(xd[i]);
                if (k == HALVES) {
                    acc[r][h] = _mm256_fmadd_ps(_mm256_mul_ps(s0, xdv), _mm256_cvtepi32_ps(lo[r][h]), acc[r][h]);
                    acc[r][h] = _mm256_fmadd_ps(_mm256_mul_ps(s1, xdv), _mm256_cvtepi32_ps(hi[r][h]), acc[r][h]);
                } else {
                    const __m256i dot = split ? _mm256_add_epi32(lo[r][h], hi[r][h]) : lo[r][h];
                    acc[r][h] = _mm256_fmadd_ps(_mm256_mul_ps(s0, xdv), _mm256_cvtepi32_ps(dot), acc[r][h]);
                }
                if (k == OFFSET) acc[r][h] = _mm256_fmadd_ps(mn, _mm256_set1_ps(xs[i]), acc[r][h]);
            }
        }
    }
    for (int r = 0; r < mt; r++) {
        _mm256_storeu_ps(y + (m0 + r) * ldy, acc[r][0]);
        if (nn > 8) _mm256_storeu_ps(y + (m0 + r) * ldy + 8, acc[r][1]);
    }
}

#define PANEL_ROWS_AS(k0, k1)                                                                             \
    for (m0 = 0; m0 + 4 <= M; m0 += 4) kq_panel_tile(p, xq, xd, xs, y, ldy, m0, nb, nn, 4, k0, k1);       \
    for (; m0 < M; m0++) kq_panel_tile(p, xq, xd, xs, y, ldy, m0, nb, nn, 1, k0, k1); /* fewer than four */

static void kq_panel_rows(const KqPanel *p, const int16_t *xq, const float *xd, const float *xs, float *y,
                          int64_t ldy, int64_t M, int64_t nb, int nn, const int types[2]) {
    const int k0 = scaling(types[0]), k1 = scaling(types[1]);
    int64_t m0;
    if (k0 != k1) { PANEL_ROWS_AS(k0, k1) } /* a panel across two parts of a mixed projection */
    else if (k0 == PLAIN) { PANEL_ROWS_AS(PLAIN, PLAIN) }
    else if (k0 == OFFSET) { PANEL_ROWS_AS(OFFSET, OFFSET) }
    else { PANEL_ROWS_AS(HALVES, HALVES) }
}

/* y (row stride ldy) = x @ W^T through panels, for the repacked parts of a projection (as mm_r8). */
static void mm_panel(const int16_t *xq, const float *xd, const float *xs, const uint8_t *const at[], const int types[],
                     const int64_t first[], int n, float *y, int64_t ldy, int64_t M, int64_t K) {
    const int64_t nb = K / 32, scales = nb * 16 * (int64_t)sizeof(float);
    KqPanel p = {aligned_alloc(32, (size_t)nb * 32 * sizeof(__m256i)), aligned_alloc(32, (size_t)scales),
                 aligned_alloc(32, (size_t)scales), aligned_alloc(32, (size_t)scales)};
    /* panels taken in turn (dynamic), as blockmm.c's */
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t g0 = 0; g0 < first[n]; g0 += 2) {
        int types_h[2] = {Q8_0, Q8_0};
        for (int h = 0; h < 2; h++) {
            const int64_t g = g0 + h;
            if (g >= first[n]) { /* N = 8 mod 16: the second half zero (and never stored) */
                for (int64_t j = 0; j < nb * 16; j++) p.codes[2 * j + 1] = _mm256_setzero_si256();
                for (int64_t j = 0; j < nb; j++) {
                    _mm256_store_ps(p.s0 + j * 16 + 8, _mm256_setzero_ps());
                    _mm256_store_ps(p.s1 + j * 16 + 8, _mm256_setzero_ps());
                    _mm256_store_ps(p.mn + j * 16 + 8, _mm256_setzero_ps());
                }
                types_h[1] = types_h[0]; /* scaled as the first (zeros) */
                break;
            }
            int i = 0;
            while (g >= first[i + 1]) i++;
            const int t = base_type(types[i]);
            kq_panel_group(at[i] + (g - first[i]) * 8 * kq_row_bytes(K, t), nb, h, &p, t);
            types_h[h] = t;
        }
        kq_panel_rows(&p, xq, xd, xs, y + 8 * g0, ldy, M, nb, g0 + 1 < first[n] ? 16 : 8, types_h);
    }
    free(p.codes);
    free(p.s0);
    free(p.s1);
    free(p.mn);
}

/* Eight repacked rows as float32 into columns j0 .. j0 + 7 of a dense panel (DN wide, k-major),
 * rounded as dequantize_row rounds them (a multiply, then an add). */
static AI void r8_panel_t(const uint8_t *g, int64_t nb, float *panel, int dn, int j0, const int type) {
    const int nsub = (int)(block_values(type) / 32);
    const int64_t ub = 8 * block_bytes(type);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *unit = g + b / nsub * ub;
        __m256 s0, s1, mn;
        __m256i c[16];
        r8_unit_block(unit, (int)(b % nsub), type, &s0, &s1, &mn, c);
        for (int t = 0; t < 8; t++)
            for (int h = 0; h < 2; h++) {
                const __m256i pair = c[2 * t + h]; /* k = 4t + 2h + e */
                const __m256i e[2] = {_mm256_srai_epi32(_mm256_slli_epi32(pair, 16), 16), _mm256_srai_epi32(pair, 16)};
                for (int k = 0; k < 2; k++) {
                    __m256 v = _mm256_mul_ps(t < 4 ? s0 : s1, _mm256_cvtepi32_ps(e[k]));
                    if (has_min(type)) v = _mm256_add_ps(v, mn);
                    _mm256_storeu_ps(panel + (b * 32 + 4 * t + 2 * h + k) * dn + j0, v);
                }
            }
    }
}

__attribute__((optimize("fp-contract=off"))) static void r8_panel(const uint8_t *g, int64_t K, float *panel, int dn,
                                                                  int j0, int t) {
    switch (t) {
        case Q4_0: r8_panel_t(g, K / 32, panel, dn, j0, Q4_0); break;
        case Q4_1: r8_panel_t(g, K / 32, panel, dn, j0, Q4_1); break;
        case Q5_0: r8_panel_t(g, K / 32, panel, dn, j0, Q5_0); break;
        case Q5_1: r8_panel_t(g, K / 32, panel, dn, j0, Q5_1); break;
        case Q8_0: r8_panel_t(g, K / 32, panel, dn, j0, Q8_0); break;
        case Q4_K: r8_panel_t(g, K / 32, panel, dn, j0, Q4_K); break;
        case Q5_K: r8_panel_t(g, K / 32, panel, dn, j0, Q5_K); break;
        default: r8_panel_t(g, K / 32, panel, dn, j0, Q6_K); break;
    }
}
#endif

/* One part: y[:, 0..N-1] (row stride ldy) = x @ W^T for N rows of one type. */
static void mm_part(const int16_t *xq, const float *xd, const float *xs, const uint8_t *w, float *y, int64_t ldy,
                    int64_t M, int64_t N, int64_t K, int type) {
#if HERD_SIMD
    if (!force_scalar) {
        if (is_r8(type)) {
            const int64_t first[2] = {0, N / 8};
            mm_r8(xq, xd, xs, &w, &type, first, 1, y, ldy, M, K);
        } else {
            mm_simd(xq, xd, xs, w, y, ldy, M, N, K, type);
        }
        return;
    }
#endif
    const int64_t nb = K / 32, row_bytes = kq_row_bytes(K, type);
#pragma omp for schedule(static) nowait
    for (int64_t n = 0; n < N; n++) {
        uint8_t *buf = is_r8(type) ? malloc((size_t)row_bytes) : NULL; /* a repacked row, given back */
        if (buf) unrepack_row(w, n, K, base_type(type), buf);
        for (int64_t m = 0; m < M; m++)
            y[m * ldy + n] = row_dot(buf ? buf : w + n * row_bytes, xq + m * K, xd + m * nb, xs + m * nb, nb,
                                     base_type(type));
        free(buf);
    }
}

#if HERD_SIMD
/* Whether every part of p is repacked (and the SIMD kernels on). */
static int all_r8(const mixed_t *p) {
    int all = !force_scalar;
    for (int i = 0; i < p->n; i++) all = all && is_r8(p->types[i]);
    return all;
}

/* Where each of p's parts starts (parts) and its first group of eight rows (first[n]: all of them). */
static void r8_parts(const mixed_t *p, const uint8_t *w, int64_t N, int64_t K, const uint8_t *parts[],
                     int64_t first[]) {
    const uint8_t *at = w;
    int64_t n0 = 0;
    first[0] = 0;
    for (int i = 0; i < p->n; i++) {
        const int64_t rows = i == p->n - 1 ? N - n0 : p->rows[i];
        parts[i] = at = part_at(p, i, w, at);
        at += rows * kq_row_bytes(K, p->types[i]);
        n0 += rows;
        first[i + 1] = n0 / 8;
    }
}
#endif

/* Whether many rows of this type (PANEL_ROWS or more: a prompt, a wide decode step) take the int16
 * panel: every part repacked. */
int kq_has_panel(int type) {
#if HERD_SIMD
    if (!kq_handles(type)) return 0;
    const mixed_t p = parts_of(type);
    return all_r8(&p);
#else
    (void)type;
    return 0;
#endif
}

/* y (M, N) = x @ W^T, x given as blockmm.c's int16 blocks (codes xq, scales xd, xd * sums xs). */
void kq_mm(const int16_t *xq, const float *xd, const float *xs, const uint8_t *w, float *y, int64_t M, int64_t N,
           int64_t K, int type) {
    const mixed_t p = parts_of(type);
    const uint8_t *at = w;
    int64_t n0 = 0;
#if HERD_SIMD
    if (all_r8(&p) && (p.n > 1 || M >= PANEL_ROWS)) { /* every part repacked (kq_repack): one loop over all
                                                         their groups */
        const uint8_t *parts[MAX_PARTS];
        int64_t first[MAX_PARTS + 1];
        r8_parts(&p, w, N, K, parts, first);
        if (M >= PANEL_ROWS) mm_panel(xq, xd, xs, parts, p.types, first, p.n, y, N, M, K);
        else mm_r8(xq, xd, xs, parts, p.types, first, p.n, y, N, M, K);
        return;
    }
#endif
    for (int i = 0; i < p.n; i++) {
        const int64_t rows = i == p.n - 1 ? N - n0 : p.rows[i];
        at = part_at(&p, i, w, at);
        mm_part(xq, xd, xs, at, y + n0, N, M, rows, K, p.types[i]);
        at += rows * kq_row_bytes(K, p.types[i]);
        n0 += rows;
    }
}

/* -- y = x @ W^T in float32 (prompts) ----------------------------------------------------------
 * Sixteen weight rows at a time are dequantized exactly into a k-major panel and multiplied by
 * blockmm.c's `dense_panel` (a 6 x 16 register tile): every y[m, n] is one chain of multiply-adds
 * over k from zero, whatever M is. Any N: a last panel of fewer rows is padded with zeros. */
#define DN 16 /* dense_panel's width */
#if HERD_SIMD
void dense_panel(const float *x, const float *panel, float *y, int64_t ldy, int64_t M, int64_t K, int64_t n0,
                 int nn);
#endif

static void dense_part(const float *x, const uint8_t *w, float *y, int64_t ldy, int64_t M, int64_t N, int64_t K,
                       int type) {
    const int64_t row_bytes = kq_row_bytes(K, type);
    { /* each thread its own panel */
        float *panel = aligned_alloc(32, (size_t)K * DN * sizeof(float)), *row = malloc((size_t)K * sizeof(float));
        uint8_t *orig = malloc((size_t)kq_row_bytes(K, Q8_0)); /* a repacked row given back (scalar path) */
#pragma omp for schedule(dynamic, 1) nowait /* panels taken in turn: see blockmm.c's dense path */
        for (int64_t n0 = 0; n0 < N; n0 += DN) {
            const int nn = (int)(N - n0 < DN ? N - n0 : DN);
#if HERD_SIMD
            if (is_r8(type) && !force_scalar) { /* eight rows at a time, from their groups (N: a multiple of 8) */
                for (int j0 = 0; j0 < DN; j0 += 8) {
                    if (j0 < nn) r8_panel(w + (n0 + j0) * row_bytes, K, panel, DN, j0, base_type(type));
                    else
                        for (int64_t k = 0; k < K; k++) memset(panel + k * DN + j0, 0, 8 * sizeof(float));
                }
            } else
#endif
            for (int j = 0; j < DN; j++) {
                const uint8_t *wrow = w + (n0 + j) * row_bytes;
                if (is_r8(type) && j < nn) { /* the scalar path: the row given back */
                    unrepack_row(w, n0 + j, K, base_type(type), orig);
                    wrow = orig;
                }
                if (j < nn) {
#if HERD_SIMD
                    if (!force_scalar) dequantize_row_simd(wrow, row, K, base_type(type));
                    else
#endif
                        dequantize_row(wrow, row, K, base_type(type));
                }
                for (int64_t k = 0; k < K; k++) panel[k * DN + j] = j < nn ? row[k] : 0.f;
            }
#if HERD_SIMD
            if (!force_scalar) {
                dense_panel(x, panel, y, ldy, M, K, n0, nn);
                continue;
            }
#endif
            for (int64_t m = 0; m < M; m++)
                for (int j = 0; j < nn; j++) {
                    float acc = 0.f;
                    for (int64_t k = 0; k < K; k++) acc += x[m * K + k] * panel[k * DN + j];
                    y[m * ldy + n0 + j] = acc;
                }
        }
        free(panel);
        free(orig);
        free(row);
    }
}

void kq_mm_dense(const float *x, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K, int type) {
    const mixed_t p = parts_of(type);
    const uint8_t *at = w;
    int64_t n0 = 0;
    for (int i = 0; i < p.n; i++) {
        const int64_t rows = i == p.n - 1 ? N - n0 : p.rows[i];
        at = part_at(&p, i, w, at);
        dense_part(x, at, y + n0, N, M, rows, K, p.types[i]);
        at += rows * kq_row_bytes(K, p.types[i]);
        n0 += rows;
    }
}

/* y (M, N) = x @ W^T for float weights (F32, F16, BF16), x float32 (M, K): decoding's path for them
 * (block_mm hands them over before quantizing x). */
int kq_is_float(int type) { return is_float(type); }
void kq_mm_float(const float *x, const uint8_t *w, float *y, int64_t M, int64_t N, int64_t K, int type) {
#if HERD_SIMD
    if (!force_scalar) {
        float_mm_simd(x, w, y, N, M, N, K, type);
        return;
    }
#endif
    const int64_t row_bytes = kq_row_bytes(K, type);
#pragma omp for schedule(static) nowait
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++) {
            float acc = 0.f;
            for (int64_t k = 0; k < K; k++) acc += x[m * K + k] * float_weight(w + n * row_bytes, k, type);
            y[m * N + n] = acc;
        }
}
