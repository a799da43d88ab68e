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
 * Lane layout: a VNNI lane sums 4 adjacent bytes. An int4 chunk of 64 inputs is 32 bytes; its low
 * nibbles (the even inputs) fill the first 32 bytes of a vector and its high nibbles (the odd ones)
 * the last 32, so lanes 0-3 and 8-11 hold block 0's inputs, 4-7 and 12-15 block 1's. The activations
 * are stored in that same order (per chunk: even inputs, then odd), so no nibble is shuffled in the
 * inner loop. An int8 chunk is 64 bytes in input order (lanes 0-7: block 0); VPDPBUSD multiplies
 * unsigned by signed bytes, so the weights are read as w + 128 (one XOR) and 128 * sum(q_x) per lane,
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

/* n floats rounded to bf16 (to nearest even), for quant_layer.c. */
void quant_store_bf16(const float *in, uint16_t *out, long n) {
    for (long i = 0; i < n; i++) store_y(out, i, in[i], 1);
}

/* One activation row's scratch (bf16 rows), 64-byte aligned: q [k] int8 in the order the weights'
 * lanes read, dx [k / 4] floats (each lane's block scale), xs [k / 4] int32 (each lane's 128 * sum q,
 * the int8 weights' offset), T [k / group + 16] floats (sum of dx * q per group, for the minimums). */
static long row_stride(long k, long group) { return 3 * k + ((k / group + 16) * 4 + 63) / 64 * 64; }

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
    float *dx = (float *)(row + k), *t = (float *)(row + 3 * k);
    int32_t *xs = (int32_t *)(row + 2 * k);
    const __m512i low = _mm512_set1_epi32(-127), high = _mm512_set1_epi32(127);
    for (long g = 0; g < k / group + 16; g++) t[g] = 0.0f;
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
            if (group == 16) { /* two groups a block */
                t[start / 16] += d[b] * (float)_mm512_reduce_add_epi32(vlo);
                t[start / 16 + 1] += d[b] * (float)_mm512_reduce_add_epi32(vhi);
            } else {
                t[start / group] += d[b] * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(vlo, vhi));
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
        __mmask16 second = bits == 4 ? 0xF0F0 : 0xFF00; /* the lanes of the chunk's second block */
        _mm512_storeu_ps(dx + c / 4, _mm512_mask_blend_ps(second, _mm512_set1_ps(d[0]), _mm512_set1_ps(d[1])));
        _mm512_storeu_si512((void *)(xs + c / 4),
                            _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8((char)0x80), chunk));
    }
}

/* The weight scales of chunk j, one per lane, for groups of 16 or 32 (see the lane layout above). */
TARGET static inline __attribute__((always_inline)) __m512 chunk_scales(const float *s, long j, const int group,
                                                                        const int bits) {
    if (group == BLOCK) {
        __m512 two = _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double *)(s + 2 * j))));
        const __m512i idx = bits == 4 ? _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0)
                                      : _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        return _mm512_permutexvar_ps(idx, two);
    }
    /* group 16 (int8 only): four groups a chunk, four lanes each */
    __m512 four = _mm512_castps128_ps512(_mm_loadu_ps(s + 4 * j));
    const __m512i idx = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    return _mm512_permutexvar_ps(idx, four);
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

/* y[o * NA + a] = weight row o . activation row a, for NO weight rows and NA activation rows
 * (NO, NA <= 4, constants once inlined, so every accumulator stays in a register): each chunk of a
 * weight row is unpacked once for all NA rows, each activation chunk loaded once for all NO rows.
 * group: 16, 32, or 64 for any multiple of 64 (then `per` chunks a group). */
TARGET static inline __attribute__((always_inline)) void tile(const uint8_t *w0, long w_row, const float *s0,
                                                             const float *m0, long groups, const uint8_t *x0,
                                                             long x_row, long k, const int bits, const int group,
                                                             long per, const int NO, const int NA, float *y) {
    __m512 acc[16];
#pragma GCC unroll 16
    for (int i = 0; i < NO * NA; i++) acc[i] = _mm512_setzero_ps();
    long chunks = k / CHUNK, j = 0;
#pragma GCC unroll 4
    for (int o = 0; o < NO; o++) { /* the scales and minimums 32 weight rows on (software prefetch: the
                                     * hardware's alone left a cold matrix at ~13 GB/s, ~20 with these) */
        for (long at = 0; at < groups; at += 16) {
            _mm_prefetch((const char *)(s0 + (o + 32) * groups + at), _MM_HINT_T0);
            if (m0) _mm_prefetch((const char *)(m0 + (o + 32) * groups + at), _MM_HINT_T0);
        }
    }
    for (long g = 0; j < chunks; g++) {
        long end = group == 64 ? j + per : j + 1;
        __m512 sc[4];
#pragma GCC unroll 4
        for (int o = 0; o < NO; o++)
            sc[o] = group == 64 ? _mm512_set1_ps(s0[o * groups + g]) : chunk_scales(s0 + o * groups, j, group, bits);
        for (; j < end; j++) {
            __m512i xq[4], xs[4];
            __m512 dx[4];
#pragma GCC unroll 4
            for (int a = 0; a < NA; a++) {
                const uint8_t *row = x0 + a * x_row;
                xq[a] = _mm512_loadu_si512((const void *)(row + j * CHUNK));
                dx[a] = _mm512_loadu_ps((const float *)(row + k) + j * 16);
                if (bits == 8) xs[a] = _mm512_loadu_si512((const void *)((const int32_t *)(row + 2 * k) + j * 16));
            }
#pragma GCC unroll 4
            for (int o = 0; o < NO; o++) {
                _mm_prefetch((const char *)(w0 + o * w_row + j * (bits == 4 ? CHUNK / 2 : CHUNK)) + PREFETCH,
                             _MM_HINT_T0);
                __m512i wq = chunk_values(w0 + o * w_row, j, bits);
#pragma GCC unroll 4
                for (int a = 0; a < NA; a++) {
                    __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq, xq[a]);
                    if (bits == 8) sums = _mm512_sub_epi32(sums, xs[a]);
                    acc[o * NA + a] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(sc[o], dx[a]),
                                                      acc[o * NA + a]);
                }
            }
        }
    }
    if (m0) /* the minimums' term: sum over groups of min * T */
        for (long g = 0; g < groups; g += 16) {
            __mmask16 keep = groups - g >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (groups - g)) - 1);
#pragma GCC unroll 4
            for (int a = 0; a < NA; a++) {
                __m512 t = _mm512_maskz_loadu_ps(keep, (const float *)(x0 + a * x_row + 3 * k) + g);
#pragma GCC unroll 4
                for (int o = 0; o < NO; o++)
                    acc[o * NA + a] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(keep, m0 + o * groups + g), t,
                                                      acc[o * NA + a]);
            }
        }
    int count = NO * NA;
#pragma GCC unroll 4
    for (int i = 0; i < count; i += 4) {
        float sums[4];
        _mm_storeu_ps(sums, reduce4(acc[i], acc[i + 1 < count ? i + 1 : i], acc[i + 2 < count ? i + 2 : i],
                                    acc[i + 3 < count ? i + 3 : i]));
        for (int j = 0; j < 4 && i + j < count; j++) y[i + j] = sums[j];
    }
}

/* Outputs [first, last) of `rows` quantized activation rows, for one weight format (constants once
 * inlined): tiles of four weight rows and up to four activation rows (the last outputs of a thread's
 * share one weight row at a time). */
TARGET static inline __attribute__((always_inline)) void int_dots(const uint8_t *qweight, const float *scales,
                                                                 const float *mins, long first, long last,
                                                                 const uint8_t *xq, long x_row, long rows, long k,
                                                                 const int bits, const int group, long per,
                                                                 long groups, uint16_t *out, long out_stride) {
    long w_row = bits == 4 ? k / 2 : k;
    float y[16];
#define TILE(o, r, NO, NA)                                                                                     \
    tile(qweight + (o) * w_row, w_row, scales + (o) * groups, mins ? mins + (o) * groups : 0, groups,        \
         xq + (r) * x_row, x_row, k, bits, group, per, NO, NA, y)
    /* NO weight rows (a constant) by every row, four rows a tile: y[oi * NA + a] is output o + oi of row r + a */
#define TILES(NO)                                                                                              \
    for (long r = 0; r < rows; r += 4) {                                                                       \
        long count = rows - r >= 4 ? 4 : rows - r;                                                             \
        switch (count) {                                                                                       \
            case 1: TILE(o, r, NO, 1); break;                                                                  \
            case 2: TILE(o, r, NO, 2); break;                                                                  \
            case 3: TILE(o, r, NO, 3); break;                                                                  \
            default: TILE(o, r, NO, 4); break;                                                                 \
        }                                                                                                      \
        for (long a = 0; a < count; a++)                                                                       \
            for (int oi = 0; oi < NO; oi++) store_y(out, (r + a) * out_stride + o + oi, y[oi * count + a], 1); \
    }
    long o = first;
    for (; o + 4 <= last; o += 4) TILES(4)
    for (; o < last; o++) TILES(1)
#undef TILES
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
    for (long r = 0; r < rows; r++) {
        if (bf16)
            quantize_row((const uint16_t *)x + r * x_stride, k, group, bits, xq + r * x_row);
        else
            reorder_row((const float *)x + r * x_stride, k, bits, (float *)(xq + r * x_row));
    }
#pragma omp parallel num_threads(threads)
    {
        int team = omp_get_num_threads(), me = omp_get_thread_num();
        long first = n * me / team, last = n * (me + 1) / team;
        if (bf16) {
            long per = group >= CHUNK ? group / CHUNK : 1;
            /* one inlined copy of the kernel per format */
            if (bits == 4 && group == 32)
                int_dots(qweight, scales, mins, first, last, xq, x_row, rows, k, 4, 32, per, groups, out, out_stride);
            else if (bits == 4)
                int_dots(qweight, scales, mins, first, last, xq, x_row, rows, k, 4, 64, per, groups, out, out_stride);
            else if (group == 16)
                int_dots(qweight, scales, mins, first, last, xq, x_row, rows, k, 8, 16, per, groups, out, out_stride);
            else if (group == 32)
                int_dots(qweight, scales, mins, first, last, xq, x_row, rows, k, 8, 32, per, groups, out, out_stride);
            else
                int_dots(qweight, scales, mins, first, last, xq, x_row, rows, k, 8, 64, per, groups, out, out_stride);
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
