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
 * unsigned by signed bytes, so the activations are stored as q + 128 and 128 * sum(w) is taken back.
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

int quant_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni");
}

static inline float load_x(const void *x, long i, int bf16) {
    if (!bf16) return ((const float *)x)[i];
    uint32_t u = (uint32_t)((const uint16_t *)x)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

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

/* Scratch floats/bytes one activation row needs (the caller allocates rows * this many bytes). */
long quant_row_scratch_bytes(long k, long group) {
    return k                       /* activations as bytes, in the kernel's order */
           + (k / 4) * 4           /* dx per lane: 16 floats a chunk of 64 */
           + (k / group + 16) * 4  /* T per group (+ room for a masked vector load) */
           + 64;                   /* alignment */
}

/* One activation row: q (in the order the weights' lanes read), dx per lane, T per group. */
static void quantize_row(const void *x, int bf16, long k, long group, int bits, int8_t *q, float *dx_lanes,
                         float *t) {
    long groups = k / group;
    for (long g = 0; g < groups + 16; g++) t[g] = 0.0f;
    for (long c = 0; c < k; c += CHUNK) {
        for (int b = 0; b < 2; b++) {
            long start = c + b * BLOCK;
            float amax = 0.0f;
            for (int i = 0; i < BLOCK; i++) amax = fmaxf(amax, fabsf(load_x(x, start + i, bf16)));
            float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
            for (int i = 0; i < BLOCK; i++) {
                long col = start + i;
                int v = (int)nearbyintf(load_x(x, col, bf16) * id);
                v = v > 127 ? 127 : v < -127 ? -127 : v;
                t[col / group] += d * (float)v;
                long at;
                if (bits == 4) /* even inputs of the chunk first, then odd */
                    at = c + (i % 2) * BLOCK + b * (BLOCK / 2) + i / 2;
                else
                    at = col;
                q[at] = bits == 4 ? (int8_t)v : (int8_t)(uint8_t)(v + 128);
            }
            for (int l = 0; l < 16; l++) {
                int lane_block = bits == 4 ? (l / 4) % 2 : l / 8;
                if (lane_block == b) dx_lanes[(c / CHUNK) * 16 + l] = d;
            }
        }
    }
}

/* The weight scales of one chunk, one per lane (see the lane layout above). */
TARGET static inline __m512 chunk_scales(const float *s, long c, long group, int bits) {
    if (group >= CHUNK) return _mm512_set1_ps(s[c / group]);
    if (group == BLOCK) {
        __m512 two = _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double *)(s + c / BLOCK))));
        const __m512i idx = bits == 4 ? _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0)
                                      : _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        return _mm512_permutexvar_ps(idx, two);
    }
    /* group 16 (int8 only): four groups a chunk, four lanes each */
    __m512 four = _mm512_castps128_ps512(_mm_loadu_ps(s + c / 16));
    const __m512i idx = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    return _mm512_permutexvar_ps(idx, four);
}

/* One chunk's 64 weight values as bytes in lane order (int4: low nibbles, then high ones). */
TARGET static inline __m512i chunk_values(const uint8_t *w, long at, int bits) {
    if (bits == 8) return _mm512_loadu_si512((const void *)(w + at));
    __m256i packed = _mm256_loadu_si256((const __m256i *)(w + at / 2));
    return _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(packed), _mm256_srli_epi16(packed, 4), 1),
                            _mm512_set1_epi8(0x0f));
}

/* Up to ROW_GROUP activation rows (`count`, a constant once inlined) times one weight row: each chunk of
 * the weight is loaded, unpacked and scaled once and used for every row, one accumulator a row. */
#define ROW_GROUP 4
TARGET static inline __attribute__((always_inline)) void rows_dot(const uint8_t *w, const float *s,
                                                                  const uint8_t *scratch, long row_bytes, long k,
                                                                  long group, int bits, const int count, float *y) {
    const __m512i c128 = _mm512_set1_epi8((char)0x80);
    const int8_t *q[ROW_GROUP];
    const float *dx[ROW_GROUP];
    __m512 acc[ROW_GROUP];
    for (int c = 0; c < count; c++) {
        q[c] = (const int8_t *)(scratch + c * row_bytes);
        dx[c] = (const float *)(((uintptr_t)(scratch + c * row_bytes + k) + 63) & ~(uintptr_t)63);
        acc[c] = _mm512_setzero_ps();
    }
    long chunks = k / CHUNK;
    for (long j = 0; j < chunks; j++) {
        long at = j * CHUNK;
        __m512i wq = chunk_values(w, at, bits), taken = _mm512_setzero_si512();
        if (bits == 8) taken = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c128, wq); /* 128 * sum(w) per lane */
        __m512 scale = chunk_scales(s, at, group, bits);
        for (int c = 0; c < count; c++) {
            __m512i xq = _mm512_loadu_si512((const void *)(q[c] + at)), sums;
            if (bits == 4)
                sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq, xq);
            else
                sums = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), xq, wq), taken);
            acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(scale, _mm512_loadu_ps(dx[c] + j * 16)),
                                     acc[c]);
        }
    }
    for (int c = 0; c < count; c++) y[c] = _mm512_reduce_add_ps(acc[c]);
}

TARGET static inline float mins_dot(const float *m, const float *t, long groups) {
    __m512 acc = _mm512_setzero_ps();
    for (long g = 0; g < groups; g += 16) {
        __mmask16 keep = groups - g >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (groups - g)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(keep, m + g), _mm512_maskz_loadu_ps(keep, t + g), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

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
        __m512i wq = chunk_values(w, at, bits);
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

/* Up to ROW_GROUP rows of one weight row's products, by the kernel of the activations' dtype. */
TARGET static void group_dots(int f32, const uint8_t *w, const float *s, const float *m, const uint8_t *rows_at,
                              long row_bytes, long k, long group, int bits, long count, float *y) {
    const float *xf = (const float *)rows_at;
    switch (count * 2 + f32) { /* each case inlines its kernel with a constant row count */
        case 2: rows_dot(w, s, rows_at, row_bytes, k, group, bits, 1, y); break;
        case 3: rows_dot_f32(w, s, m, xf, k, group, bits, 1, y); break;
        case 4: rows_dot(w, s, rows_at, row_bytes, k, group, bits, 2, y); break;
        case 5: rows_dot_f32(w, s, m, xf, k, group, bits, 2, y); break;
        case 6: rows_dot(w, s, rows_at, row_bytes, k, group, bits, 3, y); break;
        case 7: rows_dot_f32(w, s, m, xf, k, group, bits, 3, y); break;
        case 8: rows_dot(w, s, rows_at, row_bytes, k, group, bits, 4, y); break;
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
    long row_bytes = bf16 ? quant_row_scratch_bytes(k, group) : 4 * k, groups = k / group;
    long weight_row = bits == 4 ? k / 2 : k;
    for (long r = 0; r < rows; r++) {
        uint8_t *base = scratch + r * row_bytes;
        if (bf16) {
            float *dx_lanes = (float *)(((uintptr_t)(base + k) + 63) & ~(uintptr_t)63);
            quantize_row((const uint16_t *)x + r * x_stride, 1, k, group, bits, (int8_t *)base, dx_lanes,
                         dx_lanes + k / 4);
        } else {
            reorder_row((const float *)x + r * x_stride, k, bits, (float *)base);
        }
    }
#pragma omp parallel num_threads(threads)
    {
        int team = omp_get_num_threads(), me = omp_get_thread_num();
        long first = n * me / team, last = n * (me + 1) / team;
        float y[ROW_GROUP];
        for (long o = first; o < last; o++) {
            const uint8_t *w = qweight + o * weight_row;
            const float *s = scales + o * groups, *m = mins ? mins + o * groups : 0;
            for (long r0 = 0; r0 < rows; r0 += ROW_GROUP) {
                long count = rows - r0 >= ROW_GROUP ? ROW_GROUP : rows - r0;
                group_dots(!bf16, w, s, m, scratch + r0 * row_bytes, row_bytes, k, group, bits, count, y);
                for (long r = r0; r < r0 + count; r++) {
                    float v = y[r - r0];
                    if (bf16 && m) { /* the minimums' term, from the activation row's sums per group */
                        const uint8_t *base = scratch + r * row_bytes;
                        v += mins_dot(m, (const float *)(((uintptr_t)(base + k) + 63) & ~(uintptr_t)63) + k / 4,
                                      groups);
                    }
                    store_y(out, r * out_stride + o, v, bf16);
                }
            }
        }
    }
}

/* The reference's weight, rounded once to bf16 (bf16 = 1) or kept in float32: w = q * scale + min per
 * group, as format.dequantize computes it in float32 (product and sum rounded apart, no FMA), for
 * prompt chunks that run a bf16 or float32 GEMM over it. */
void quant_dequantize(const uint8_t *qweight, const float *scales, const float *mins, long n, long k, int bits,
                      long group, void *out, int bf16, int threads) {
    long groups = k / group, weight_row = bits == 4 ? k / 2 : k;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long o = 0; o < n; o++) {
        const uint8_t *w = qweight + o * weight_row;
        for (long i = 0; i < k; i++) {
            int q = bits == 4 ? (w[i / 2] >> (4 * (i & 1))) & 0x0f : (int)(int8_t)w[i];
            float product = (float)q * scales[o * groups + i / group];
            float v = mins ? product + mins[o * groups + i / group] : product;
            store_y(out, o * k + i, v, bf16);
        }
    }
}
#endif
