/* Matmuls over packed int4/int8 weights for CPU decode steps (llmrun/quant/format.py's QuantWeight):
 * the activations are quantized to int8 per block of 32 inputs (scale = max|x| / 127, as llama.cpp's
 * Q8_0 does) and multiplied with AVX-512 VNNI integer dot products (VPDPBUSD: 64 byte products a
 * vector, summed in 32-bit integers), so a weight is read once in its packed form and never expanded.
 *
 * Weight forms (per output row o, groups of `group` inputs along k):
 *   bits 4: qweight uint8 [n][k / 2], low nibble = input 2j, high nibble = input 2j + 1, values 0..15
 *   bits 8: qweight int8  [n][k]
 *   w[o][i] = q * scales[o][i / group] + mins[o][i / group]   (mins may be absent)
 * so out[r][o] = sum over blocks b of 32 inputs of dx[b] * (scale(b) * sum_i q_w q_x
 *                                                          + min(b) * sum_i q_x)
 * where dx[b] is the activation block's scale; the min term is one dot product per output of the
 * mins with T[g] = sum over the group's inputs of dx * q_x, computed once per activation row.
 *
 * The product, in one order whatever company a row keeps: per unit of inputs (32, or 16 where groups
 * are 16) S = the exact integer sum of q_w q_x; lane u % 16 of an output's float32 accumulator takes
 * S * (weight scale * dx) by one FMA, unit by unit, then min * T group by group (lane g % 16), and
 * reduce4 sums the 16 lanes. Here S comes from VPDPBUSD lanes, reduced as integers (any order is
 * exact); quant_amx_int.c takes S from AMX tiles for steps of several rows and the same float steps,
 * and quant_gemm_vnni.c (steps of PANEL_ROWS bf16 rows or more, units of 32) takes S from VNNI lanes
 * that each hold one output and the same float steps in 16 accumulators, so a row's bits do not depend
 * on the rows beside it or on which kernel ran.
 *
 * Lane layout: a VNNI lane sums 4 adjacent bytes. An int4 chunk of 64 inputs is 32 bytes; its low
 * nibbles (the even inputs) fill the first 32 bytes of a vector and its high nibbles (the odd ones)
 * the last 32, so lanes 0-3 and 8-11 hold block 0's inputs, 4-7 and 12-15 block 1's. The activations
 * are stored in that same order (per chunk: even inputs, then odd), so no nibble is shuffled in the
 * inner loop. An int8 chunk is 64 bytes in input order (lanes 0-7: block 0); VPDPBUSD multiplies
 * unsigned by signed bytes, so the weights are read as w + 128 (one XOR) and 128 * sum(q_x) per unit,
 * computed once per activation row, is taken back.
 *
 * The sums are float32 in another order than a dequantize-then-matmul, and the activations are
 * rounded to int8: results differ from that reference within a bound kernels/quant_cpu.py checks on
 * every weight shape before use. Built by kernels/native.py's builder with -fopenmp (ATen's threads).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#include <omp.h>

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define CHUNK 64
#define BLOCK 32

/* AVX-512 with byte/word operations: what the vector dequantize needs. */
static int has_avx512bw(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}

int quant_supported(void) { return has_avx512bw() && __builtin_cpu_supports("avx512vnni"); }

static inline void store_y(void *out, long i, float v, int bf16) {
    if (!bf16) {
        ((float *)out)[i] = v;
        return;
    }
    uint32_t u;
    memcpy(&u, &v, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) u = 0x7fc00000u;
    else u += 0x7fffu + ((u >> 16) & 1u);
    ((uint16_t *)out)[i] = (uint16_t)(u >> 16);
}

/* One activation row's scratch (bf16 rows), 64-byte aligned: q [k] int8 in the order the weights'
 * lanes read, then per unit (unit_size: 32 inputs, 16 where groups are 16; padded with 16 zeros)
 * dx [units + 16] floats (the unit's block scale) and xs [units + 16] int32 (128 * the unit's sum of
 * q, the int8 weights' offset), then T [k / group + 16] floats (sum of dx * q per group, for the
 * minimums). */
static long padded_units(long k) { return k / 16 + 16; }
static long row_stride(long k, long group) { return (k + 8 * padded_units(k) + 4 * (k / group + 16) + 63) / 64 * 64; }
static float *row_dx(const uint8_t *row, long k) { return (float *)(row + k); }
static int32_t *row_xs(const uint8_t *row, long k) { return (int32_t *)(row + k + 4 * padded_units(k)); }
static float *row_t(const uint8_t *row, long k) { return (float *)(row + k + 8 * padded_units(k)); }
const float *quant_row_dx(const uint8_t *row, long k) { return row_dx(row, k); } /* (for quant_amx_int.c) */
const float *quant_row_t(const uint8_t *row, long k) { return row_t(row, k); }
const int32_t *quant_row_xs(const uint8_t *row, long k) { return row_xs(row, k); } /* (quant_gemm_vnni.c) */

/* Scratch bytes one activation row needs (the caller allocates rows * this many bytes, which leaves
 * room to align the first row). */
long quant_row_scratch_bytes(long k, long group) { return row_stride(k, group) + 64; }

/* 16 bf16 values widened to float32. */
TARGET static inline __m512 load_bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* One bf16 activation row into its scratch row: each block of 32 rounded to int8 with scale
 * max|x| / 127 (to nearest even, as nearbyintf), stored per chunk of 64 in the weights' lane order. */
TARGET static void quantize_row(const uint16_t *x, long k, long group, int bits, uint8_t *row) {
    int8_t *q = (int8_t *)row;
    float *dx = row_dx(row, k), *t = row_t(row, k);
    int32_t *xs = row_xs(row, k);
    const __m512i low = _mm512_set1_epi32(-127), high = _mm512_set1_epi32(127);
    long unit = group == 16 ? 16 : BLOCK, units = k / unit;
    for (long g = 0; g < k / group + 16; g++) t[g] = 0.0f;
    for (long u = units; u < units + 16; u++) dx[u] = 0.0f, xs[u] = 0;
    for (long c = 0; c < k; c += CHUNK) {
        __m128i bytes[4];
        float d[2];
        for (int b = 0; b < 2; b++) {
            long start = c + b * BLOCK;
            __m512 lo = load_bf16x16(x + start), hi = load_bf16x16(x + start + 16);
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
            float id = amax > 0.0f ? 127.0f / amax : 0.0f;
            d[b] = amax / 127.0f;
            __m512i vlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, _mm512_set1_ps(id)));
            __m512i vhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, _mm512_set1_ps(id)));
            vlo = _mm512_min_epi32(_mm512_max_epi32(vlo, low), high);
            vhi = _mm512_min_epi32(_mm512_max_epi32(vhi, low), high);
            int sum_lo = _mm512_reduce_add_epi32(vlo), sum_hi = _mm512_reduce_add_epi32(vhi);
            if (group == 16) { /* two groups (units) a block */
                t[start / 16] += d[b] * (float)sum_lo;
                t[start / 16 + 1] += d[b] * (float)sum_hi;
                dx[start / 16] = dx[start / 16 + 1] = d[b];
                xs[start / 16] = 128 * sum_lo, xs[start / 16 + 1] = 128 * sum_hi;
            } else {
                t[start / group] += d[b] * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(vlo, vhi));
                dx[start / BLOCK] = d[b];
                xs[start / BLOCK] = 128 * (sum_lo + sum_hi);
            }
            bytes[2 * b] = _mm512_cvtepi32_epi8(vlo);
            bytes[2 * b + 1] = _mm512_cvtepi32_epi8(vhi);
        }
        __m512i chunk = _mm512_inserti32x4(_mm512_castsi128_si512(bytes[0]), bytes[1], 1);
        chunk = _mm512_inserti32x4(_mm512_inserti32x4(chunk, bytes[2], 2), bytes[3], 3);
        if (bits == 4) /* even inputs first (the low nibbles' lanes), then odd */
            chunk = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi16_epi8(chunk)),
                                       _mm512_cvtepi16_epi8(_mm512_srli_epi16(chunk, 8)), 1);
        _mm512_storeu_si512((void *)(q + c), chunk);
    }
}

/* bf16 activation rows quantized into scratch (64-byte aligned) as quant_matmul does it, for
 * quant_amx_int.c; returns the bytes between rows. */
TARGET long quant_quantize_rows(const uint16_t *x, long x_stride, long rows, long k, long group, int bits,
                                uint8_t *scratch) {
    for (long r = 0; r < rows; r++) quantize_row(x + r * x_stride, k, group, bits, scratch + r * row_stride(k, group));
    return row_stride(k, group);
}

/* The 64 weight values from input `at` on, as bytes in lane order (int4: low nibbles, then high ones). */
TARGET static inline __attribute__((always_inline)) __m512i chunk_bytes(const uint8_t *w, long at, const int bits) {
    if (bits == 8) return _mm512_loadu_si512((const void *)(w + at));
    __m256i packed = _mm256_loadu_si256((const __m256i *)(w + at / 2));
    return _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(packed), _mm256_srli_epi16(packed, 4), 1),
                            _mm512_set1_epi8(0x0f));
}

/* Chunk j's values as the unsigned bytes VPDPBUSD reads (int8: w + 128, taken back through xs). */
TARGET static inline __attribute__((always_inline)) __m512i chunk_values(const uint8_t *w, long j, const int bits) {
    __m512i bytes = chunk_bytes(w, j * CHUNK, bits);
    return bits == 8 ? _mm512_xor_si512(bytes, _mm512_set1_epi8((char)0x80)) : bytes;
}

/* Chunk j's values stored to out (64 bytes), for quant_gemm_vnni.c's panels. */
TARGET void quant_chunk_values_to(const uint8_t *w, long j, int bits, uint8_t *out) {
    _mm512_storeu_si512((void *)out, chunk_values(w, j, bits));
}

/* The sums of four vectors' lanes, in one order whatever the vectors are (so an output's bits do
 * not depend on which outputs or rows are computed beside it). */
TARGET static inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
#define HALVES(v) \
    _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)))
    __m256 ab = _mm256_hadd_ps(HALVES(a), HALVES(b)), cd = _mm256_hadd_ps(HALVES(c), HALVES(d));
#undef HALVES
    __m256 abcd = _mm256_hadd_ps(ab, cd);
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

/* reduce4 for quant_layer.c's attention scores. */
TARGET __m128 quant_lane_sums4(__m512 a, __m512 b, __m512 c, __m512 d) { return reduce4(a, b, c, d); }

#define PREFETCH 8192 /* bytes ahead in a weight row's stream */

/* Sums of adjacent 32-bit lanes of two vectors: per 128-bit lane, [a0 + a2, b0 + b2, a1 + a3, b1 + b3]. */
TARGET static inline __m512i pair_sums32(__m512i a, __m512i b) {
    return _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
}

/* pair_sums32's results of four vectors v0..v3 summed again: 128-bit lane l holds [v0, v1, v2, v3]'s
 * sums of their 128-bit lane l. */
TARGET static inline __m512i lane_sums4(__m512i v01, __m512i v23) {
    return _mm512_add_epi32(_mm512_unpacklo_epi64(v01, v23), _mm512_unpackhi_epi64(v01, v23));
}

/* The exact sums of 16 units (in order) from the VPDPBUSD lanes of the n chunks that hold them (n 1,
 * 2, 4 or 8, a constant once inlined; units past the last chunk are 0): chunks of two units of 32
 * (int4: lanes 0-3 and 8-11 the first unit, int8: lanes 0-7), or of four units of 16 (int8 groups of
 * 16: lanes 4l..4l+3 unit l). Integer sums: any order is exact. */
TARGET static inline __attribute__((always_inline)) __m512i unit_sums(const __m512i v[8], const int bits,
                                                                     const int unit, const int n) {
    const __m512i z = _mm512_setzero_si512();
    __m512i qa = lane_sums4(pair_sums32(v[0], n > 1 ? v[1] : z), n > 2 ? pair_sums32(v[2], v[3]) : z);
    if (unit == 16) /* unit 4c + l at lane 4l + c */
        return _mm512_permutexvar_epi32(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), qa);
    __m512i qb = n > 4 ? lane_sums4(pair_sums32(v[4], v[5]), pair_sums32(v[6], v[7])) : z;
    __m512i x = bits == 4 ? _mm512_shuffle_i32x4(qa, qb, 0x44) : _mm512_shuffle_i32x4(qa, qb, 0x88);
    __m512i y = bits == 4 ? _mm512_shuffle_i32x4(qa, qb, 0xEE) : _mm512_shuffle_i32x4(qa, qb, 0xDD);
    /* lanes 0-3: units 0, 2, 4, 6; 4-7: 1, 3, 5, 7; 8-11: 8, 10, 12, 14; 12-15: 9, 11, 13, 15 */
    return _mm512_permutexvar_epi32(_mm512_set_epi32(15, 11, 14, 10, 13, 9, 12, 8, 7, 3, 6, 2, 5, 1, 4, 0),
                                    _mm512_add_epi32(x, y));
}

/* Where the weight scales of each span of 16 units lie, SPAN_WORDS int32 a span: the span's first
 * group, a mask of the groups from there it reads, and each unit's group counted from the first (0
 * past the last unit); built once a call. (quant_amx_int.c looks each unit's group up itself.) */
#define SPAN_WORDS 18
static long span_words(long k) { return (k / 16 / 16 + 1) * SPAN_WORDS; }

static void unit_spans(long k, long group, int32_t *spans) {
    long unit = group == 16 ? 16 : BLOCK, units = k / unit, groups = k / group;
    for (long span = 0; span * 16 < units; span++) {
        int32_t *at = spans + span * SPAN_WORDS;
        long u0 = span * 16, g0 = u0 * unit / group, count = groups - g0 < 16 ? groups - g0 : 16;
        at[0] = (int32_t)g0;
        at[1] = (int32_t)((1u << count) - 1);
        for (long i = 0; i < 16; i++) at[2 + i] = (int32_t)(u0 + i < units ? (u0 + i) * unit / group - g0 : 0);
    }
}

/* The weight scales of span `span`'s 16 units, one a lane (0 past the last unit's group). */
TARGET static inline __m512 span_scales(const float *s, const int32_t *spans, long span) {
    const int32_t *at = spans + span * SPAN_WORDS;
    return _mm512_permutexvar_ps(_mm512_loadu_si512((const void *)(at + 2)), _mm512_maskz_loadu_ps((__mmask16)at[1], s + at[0]));
}

/* acc[o * NA + a] += one span's terms (16 units from chunk c0 on, `left` of its n chunks there; n a
 * constant once inlined) of weight row o and activation row a, for NO weight rows and NA activation
 * rows: each weight chunk unpacked once for the NA rows. */
TARGET static inline __attribute__((always_inline)) void span_dots(const uint8_t *w0, long w_row, const float *s0,
                                                                  long groups, const int32_t *spans,
                                                                  const uint8_t *x0, long x_row, long k, long c0,
                                                                  long span, long left, const int bits,
                                                                  const int unit, const int n, const int NO,
                                                                  const int NA, __m512 *acc) {
    __m512 dx[4];
#pragma GCC unroll 4
    for (int a = 0; a < NA; a++) dx[a] = _mm512_loadu_ps(row_dx(x0 + a * x_row, k) + span * 16);
#pragma GCC unroll 4
    for (int o = 0; o < NO; o++) {
        const uint8_t *w = w0 + o * w_row;
        __m512i wq[8];
#pragma GCC unroll 8
        for (int c = 0; c < n; c++) {
            if (c >= left) {
                wq[c] = _mm512_setzero_si512();
                continue;
            }
            _mm_prefetch((const char *)(w + (c0 + c) * (bits == 4 ? CHUNK / 2 : CHUNK)) + PREFETCH, _MM_HINT_T0);
            wq[c] = chunk_values(w, c0 + c, bits);
        }
        __m512 ws = span_scales(s0 + o * groups, spans, span);
#pragma GCC unroll 4
        for (int a = 0; a < NA; a++) {
            const uint8_t *row = x0 + a * x_row;
            __m512i v[8];
#pragma GCC unroll 8
            for (int c = 0; c < n; c++)
                v[c] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq[c],
                                           c < left ? _mm512_loadu_si512((const void *)(row + (c0 + c) * CHUNK))
                                                    : _mm512_setzero_si512());
            __m512i sums = unit_sums(v, bits, unit, n);
            if (bits == 8)
                sums = _mm512_sub_epi32(sums, _mm512_loadu_si512((const void *)(row_xs(row, k) + span * 16)));
            acc[o * NA + a] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(ws, dx[a]), acc[o * NA + a]);
        }
    }
}

/* y[o * NA + a] = weight row o . activation row a, for NO weight rows and NA activation rows (NO * NA
 * <= 4, constants once inlined, so every accumulator stays in a register). The quantized product: per
 * unit u, S = its exact integer sum of q_w q_x; lane u % 16 of an output's accumulator takes S * (the
 * unit's weight scale * dx) by one FMA, in unit order, then the minimums' terms (lane g % 16: min * T
 * of group g, in group order); the 16 lanes are summed by reduce4. quant_amx_int.c computes the same S
 * with AMX tiles and takes the same float steps: the same bits. */
TARGET static inline __attribute__((always_inline)) void tile_dots(const uint8_t *w0, long w_row, const float *s0,
                                                                  const float *m0, long groups, const uint8_t *x0,
                                                                  long x_row, long k, const int32_t *spans,
                                                                  const int bits, const int unit, const int NO,
                                                                  const int NA, float *y) {
    __m512 acc[4];
#pragma GCC unroll 4
    for (int i = 0; i < NO * NA; i++) acc[i] = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int o = 0; o < NO; o++) /* the scales and minimums 32 rows on (software prefetch: the hardware's
                                  * alone left a cold matrix at ~13 GB/s) */
        for (long at = 0; at < groups; at += 16) {
            _mm_prefetch((const char *)(s0 + (o + 32) * groups + at), _MM_HINT_T0);
            if (m0) _mm_prefetch((const char *)(m0 + (o + 32) * groups + at), _MM_HINT_T0);
        }
    const int per = unit == 16 ? 4 : 8; /* chunks a span of 16 units */
    long chunks = k / CHUNK, c0 = 0, span = 0;
    for (; c0 + per <= chunks; c0 += per, span++)
        span_dots(w0, w_row, s0, groups, spans, x0, x_row, k, c0, span, per, bits, unit, per, NO, NA, acc);
    long left = chunks - c0;
#define SPAN(n) span_dots(w0, w_row, s0, groups, spans, x0, x_row, k, c0, span, left, bits, unit, n, NO, NA, acc)
    if (left == 1) /* the last span's chunks, reduced as 1, 2, 4 (or 8) */
        SPAN(1);
    else if (left == 2)
        SPAN(2);
    else if (left > 2 && (left <= 4 || unit == 16))
        SPAN(4);
    else if (left > 4)
        SPAN(8);
#undef SPAN
    if (m0) /* the minimums' term: sum over groups of min * T */
        for (long g = 0; g < groups; g += 16) {
            __mmask16 keep = groups - g >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (groups - g)) - 1);
            __m512 t[4];
#pragma GCC unroll 4
            for (int a = 0; a < NA; a++) t[a] = _mm512_maskz_loadu_ps(keep, row_t(x0 + a * x_row, k) + g);
#pragma GCC unroll 4
            for (int o = 0; o < NO; o++) {
                __m512 mins = _mm512_maskz_loadu_ps(keep, m0 + o * groups + g);
#pragma GCC unroll 4
                for (int a = 0; a < NA; a++) acc[o * NA + a] = _mm512_fmadd_ps(mins, t[a], acc[o * NA + a]);
            }
        }
    const int count = NO * NA;
    float sums[4];
    _mm_storeu_ps(sums, reduce4(acc[0], acc[count > 1 ? 1 : 0], acc[count > 2 ? 2 : 0], acc[count > 3 ? 3 : 0]));
#pragma GCC unroll 4
    for (int i = 0; i < count; i++) y[i] = sums[i];
}

/* Outputs [first, last) of `rows` quantized activation rows, for one weight format (constants once
 * inlined): one row: four weight rows a tile; two: two by two; more: a weight row by up to four rows
 * (and a thread's last outputs one weight row at a time). */
TARGET static inline __attribute__((always_inline)) void int_dots(const uint8_t *qweight, const float *scales,
                                                                 const float *mins, long first, long last,
                                                                 const uint8_t *xq, long x_row, long rows, long k,
                                                                 const int32_t *spans, const int bits,
                                                                 const int unit, long groups, uint16_t *out,
                                                                 long out_stride) {
    long w_row = bits == 4 ? k / 2 : k;
    float y[4];
#define TILE(o, r, NO, NA)                                                                                      \
    tile_dots(qweight + (o) * w_row, w_row, scales + (o) * groups, mins ? mins + (o) * groups : 0, groups,     \
              xq + (r) * x_row, x_row, k, spans, bits, unit, NO, NA, y)
    long o = first;
    if (rows == 1)
        for (; o + 4 <= last; o += 4) {
            TILE(o, 0, 4, 1);
            for (int i = 0; i < 4; i++) store_y(out, o + i, y[i], 1);
        }
    if (rows == 2)
        for (; o + 2 <= last; o += 2) {
            TILE(o, 0, 2, 2);
            for (int i = 0; i < 4; i++) store_y(out, (i % 2) * out_stride + o + i / 2, y[i], 1);
        }
    for (; o < last; o++)
        for (long r = 0; r < rows; r += 4) {
            long count = rows - r >= 4 ? 4 : rows - r;
            switch (count) {
                case 1: TILE(o, r, 1, 1); break;
                case 2: TILE(o, r, 1, 2); break;
                case 3: TILE(o, r, 1, 3); break;
                default: TILE(o, r, 1, 4); break;
            }
            for (long a = 0; a < count; a++) store_y(out, (r + a) * out_stride + o, y[a], 1);
        }
#undef TILE
}

#define ROW_GROUP 4
/* float32 activations keep float32: the weight is dequantized in registers (w = q * scale + min, one
 * FMA) and multiplied by x in float32, so the result is the reference's within float32 rounding. x is
 * stored per chunk in the weight's lane order (int4: even inputs, then odd). Four segments of 16
 * inputs a chunk, each within one group (int4 segments: even inputs of block 0, of block 1, odd
 * inputs of block 0, of block 1; int8 segments: 16 inputs in order). */
static void reorder_row(const float *x, long k, int bits, float *xf) {
    for (long c = 0; c < k; c += CHUNK)
        for (int i = 0; i < CHUNK; i++)
            xf[c + (bits == 4 ? (i % 2) * BLOCK + i / 2 : i)] = x[c + i];
}

TARGET static inline __attribute__((always_inline)) void rows_dot_f32(const uint8_t *w, const float *s,
                                                                      const float *m, const float *xf, long k,
                                                                      long group, int bits, const int count,
                                                                      float *y) {
    __m512 acc[ROW_GROUP];
    for (int c = 0; c < count; c++) acc[c] = _mm512_setzero_ps();
    for (long at = 0; at < k; at += CHUNK) {
        __m512i wq = chunk_bytes(w, at, bits);
        for (int seg = 0; seg < 4; seg++) {
            long first = bits == 4 ? at + (seg % 2) * BLOCK : at + 16 * seg; /* an input of the segment */
            long g = first / group;
            __m128i bytes = _mm512_extracti32x4_epi32(wq, 0);
            switch (seg) { /* the lane must be a constant */
                case 1: bytes = _mm512_extracti32x4_epi32(wq, 1); break;
                case 2: bytes = _mm512_extracti32x4_epi32(wq, 2); break;
                case 3: bytes = _mm512_extracti32x4_epi32(wq, 3); break;
                default: break;
            }
            __m512i ints = bits == 4 ? _mm512_cvtepu8_epi32(bytes) : _mm512_cvtepi8_epi32(bytes);
            __m512 wf = m ? _mm512_fmadd_ps(_mm512_cvtepi32_ps(ints), _mm512_set1_ps(s[g]), _mm512_set1_ps(m[g]))
                          : _mm512_mul_ps(_mm512_cvtepi32_ps(ints), _mm512_set1_ps(s[g]));
            for (int c = 0; c < count; c++)
                acc[c] = _mm512_fmadd_ps(wf, _mm512_loadu_ps(xf + c * k + at + 16 * seg), acc[c]);
        }
    }
    for (int c = 0; c < count; c++) y[c] = _mm512_reduce_add_ps(acc[c]);
}

/* Up to ROW_GROUP float32 rows of one weight row's products. */
TARGET static void f32_dots(const uint8_t *w, const float *s, const float *m, const float *xf, long k, long group,
                            int bits, long count, float *y) {
    switch (count) { /* each case inlines its kernel with a constant row count */
        case 1: rows_dot_f32(w, s, m, xf, k, group, bits, 1, y); break;
        case 2: rows_dot_f32(w, s, m, xf, k, group, bits, 2, y); break;
        case 3: rows_dot_f32(w, s, m, xf, k, group, bits, 3, y); break;
        default: rows_dot_f32(w, s, m, xf, k, group, bits, 4, y); break;
    }
}

/* quant_gemm_vnni.c: int_dots's products and order of sums, 16 outputs a vector (a panel laid out once a
 * call, every row of the step against it): the same bits, fewer instructions from PANEL_ROWS rows. */
#define PANEL_ROWS 8 /* bf16 rows from which it runs them (measured: at 4 rows int_dots is as fast) */
int quant_panels_in_decode_order(const uint8_t *xq, long x_row, long rows, long k, const uint8_t *qweight,
                                 const float *scales, const float *mins, long n, int bits, long group,
                                 uint16_t *out, long out_stride, int threads);

/* out[r][o] (row stride out_stride, in x's dtype) = x[r] @ W.T for rows r < rows, outputs o < n; x
 * [rows][k] (row stride x_stride): bf16 rows (bf16 = 1) rounded to int8 per block of 32 for VNNI,
 * float32 rows kept in float32 (the weight dequantized in registers). k a multiple of 64; group 16 or
 * 32 (int4: 32), or a multiple of 64 (or k itself when that is one). `scratch`: rows *
 * quant_row_scratch_bytes (bf16) or rows * k floats (float32). */
TARGET void quant_matmul(const void *x, long x_stride, int bf16, long rows, long k, const uint8_t *qweight,
                         const float *scales, const float *mins, long n, int bits, long group, void *out,
                         long out_stride, uint8_t *scratch, int threads) {
    long groups = k / group, weight_row = bits == 4 ? k / 2 : k;
    long x_row = bf16 ? row_stride(k, group) : 4 * k;
    uint8_t *xq = bf16 ? (uint8_t *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63) : scratch;
    int32_t spans[bf16 ? span_words(k) : 1];
    for (long r = 0; r < rows; r++) {
        if (bf16)
            quantize_row((const uint16_t *)x + r * x_stride, k, group, bits, xq + r * x_row);
        else
            reorder_row((const float *)x + r * x_stride, k, bits, (float *)(xq + r * x_row));
    }
    if (bf16 && rows >= PANEL_ROWS && group != 16 &&
        quant_panels_in_decode_order(xq, x_row, rows, k, qweight, scales, mins, n, bits, group, out, out_stride,
                                     threads) == 0)
        return; /* (the bits int_dots gives, faster from PANEL_ROWS rows) */
    if (bf16) unit_spans(k, group, spans);
#pragma omp parallel num_threads(threads)
    {
        int team = omp_get_num_threads(), me = omp_get_thread_num();
        long first = n * me / team, last = n * (me + 1) / team;
        if (bf16) {
            /* one inlined copy of the kernel per form: int4, int8 in units of 32, int8 in groups of 16 */
            if (bits == 4)
                int_dots(qweight, scales, mins, first, last, xq, x_row, rows, k, spans, 4, 32, groups, out, out_stride);
            else if (group == 16)
                int_dots(qweight, scales, mins, first, last, xq, x_row, rows, k, spans, 8, 16, groups, out, out_stride);
            else
                int_dots(qweight, scales, mins, first, last, xq, x_row, rows, k, spans, 8, 32, groups, out, out_stride);
        } else {
            float y[ROW_GROUP];
            for (long o = first; o < last; o++) {
                const uint8_t *w = qweight + o * weight_row;
                const float *s = scales + o * groups, *m = mins ? mins + o * groups : 0;
                for (long r0 = 0; r0 < rows; r0 += ROW_GROUP) {
                    long count = rows - r0 >= ROW_GROUP ? ROW_GROUP : rows - r0;
                    f32_dots(w, s, m, (const float *)(xq + r0 * x_row), k, group, bits, count, y);
                    for (long r = r0; r < r0 + count; r++) store_y(out, r * out_stride + o, y[r - r0], 0);
                }
            }
        }
    }
}

/* 16 floats stored as float32 or rounded to bf16 as store_y does (to nearest even, NaN made quiet). */
TARGET static inline void store16(void *out, long i, __m512 v, int bf16) {
    if (!bf16) {
        _mm512_storeu_ps((float *)out + i, v);
        return;
    }
    __m512i u = _mm512_castps_si512(v);
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000));
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc00000));
    _mm256_storeu_si256((__m256i *)((uint16_t *)out + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}

/* n floats rounded to bf16 as store_y rounds them, 16 at a time, for quant_layer.c and quant_amx_int.c. */
TARGET void quant_store_bf16(const float *in, uint16_t *out, long n) {
    long i = 0;
    for (; i + 16 <= n; i += 16) store16(out, i, _mm512_loadu_ps(in + i), 1);
    for (; i < n; i++) store_y(out, i, in[i], 1);
}

/* One weight row dequantized 16 inputs at a time (group a multiple of 16, so each 16 share a group). */
TARGET static void dequantize_row16(const uint8_t *w, const float *s, const float *m, long k, int bits, long group,
                                    void *out, long at, int bf16) {
    for (long g = 0, i = 0; i < k; g++) {
        __m512 scale = _mm512_set1_ps(s[g]), min = _mm512_set1_ps(m ? m[g] : 0.0f);
        for (long end = i + group; i < end; i += 16) {
            __m512i ints;
            if (bits == 4) {
                __m128i packed = _mm_loadl_epi64((const __m128i *)(w + i / 2)), nibble = _mm_set1_epi8(0x0f);
                __m128i lo = _mm_and_si128(packed, nibble), hi = _mm_and_si128(_mm_srli_epi16(packed, 4), nibble);
                ints = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)); /* inputs i, i + 1, ... in order */
            } else {
                ints = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + i)));
            }
            __m512 product = _mm512_mul_ps(_mm512_cvtepi32_ps(ints), scale);
            store16(out, at + i, m ? _mm512_add_ps(product, min) : product, bf16);
        }
    }
}

/* An int4 row in bf16 through a 16-entry table a group: the table holds store16's roundings of
 * q * scale + min for q = 0..15 (computed as dequantize_row16 computes them), so every value has the
 * bits it has there, for one table lookup (vpermw) per 32 inputs instead of the arithmetic and the
 * rounding per 16. Groups of a multiple of 32 inputs. */
TARGET static void dequantize_int4_row_bf16(const uint8_t *w, const float *s, const float *m, long k, long group,
                                            uint16_t *out) {
    const __m512 levels = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m128i nibble = _mm_set1_epi8(0x0f);
    uint16_t values[16];
    for (long g = 0, i = 0; i < k; g++) {
        __m512 product = _mm512_mul_ps(levels, _mm512_set1_ps(s[g]));
        store16(values, 0, m ? _mm512_add_ps(product, _mm512_set1_ps(m[g])) : product, 1);
        __m512i table = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)values));
        for (long end = i + group; i < end; i += 32) {
            __m128i packed = _mm_loadu_si128((const __m128i *)(w + i / 2)); /* inputs i .. i + 31 */
            __m128i lo = _mm_and_si128(packed, nibble), hi = _mm_and_si128(_mm_srli_epi16(packed, 4), nibble);
            __m256i q = _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi)); /* in order */
            _mm512_storeu_si512(out + i, _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(q), table));
        }
    }
}

/* The reference's weight, rounded once to bf16 (bf16 = 1) or kept in float32: w = q * scale + min per
 * group, as format.dequantize computes it in float32 (product and sum rounded apart, no FMA), for
 * prompt chunks that run a bf16 or float32 GEMM over it. 16 values at a time where the CPU has
 * AVX-512 (the same roundings, so the same bits), one at a time elsewhere. */
void quant_dequantize(const uint8_t *qweight, const float *scales, const float *mins, long n, long k, int bits,
                      long group, void *out, int bf16, int threads) {
    long groups = k / group, weight_row = bits == 4 ? k / 2 : k;
    int wide = has_avx512bw() && group % 16 == 0;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long o = 0; o < n; o++) {
        const uint8_t *w = qweight + o * weight_row;
        const float *s = scales + o * groups, *m = mins ? mins + o * groups : 0;
        if (wide && bits == 4 && bf16 && group % 32 == 0) {
            dequantize_int4_row_bf16(w, s, m, k, group, (uint16_t *)out + o * k);
            continue;
        }
        if (wide) {
            dequantize_row16(w, s, m, k, bits, group, out, o * k, bf16);
            continue;
        }
        for (long i = 0; i < k; i++) {
            int q = bits == 4 ? (w[i / 2] >> (4 * (i & 1))) & 0x0f : (int)(int8_t)w[i];
            float product = (float)q * s[i / group];
            float v = m ? product + m[i / group] : product;
            store_y(out, o * k + i, v, bf16);
        }
    }
}
#endif
