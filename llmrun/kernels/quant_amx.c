/* Prompt chunks over packed int4/int8 weights with AMX (kernels/quant_cpu.py's gemm): bf16 activations
 * times the weight dequantized 32 output rows at a time into a buffer the caches hold, multiplied with
 * AMX bf16 tiles (TDPBF16PS: a 16x32 by 32x16 product an instruction, summed in float32). A chunk thus
 * neither writes the whole dequantized weight to memory nor has oneDNN reorder a plain weight for
 * every call.
 *
 * A tile product is A (16 rows of 32 bf16) by B (32 x 16 in AMX's pair layout: B[p][2j + e] is input
 * 2p + e of column j) into C (16 x 16 float32). The activation rows are A tiles as they lie; the
 * weight is laid out as B tiles (dequantized row by row, int4 through a 16-entry table a group, then
 * each 16 x 16 block of input pairs transposed), either 32 outputs at a time in the call or whole,
 * once, for a step's prompt chunks to share (quant_amx_tile_weight). Two A and two B tiles make four
 * products a step of 32 inputs. Each output is summed over the inputs 32 at a time in order, so a
 * row's bits do not depend on the rows or outputs beside it, nor on which of the two weight forms ran
 * (tested). The weights are format.dequantize's values rounded once to bf16 (those of
 * quant_kernels.c's dequantize, which the GEMM this replaces ran over); the sums are float32 in
 * another order than the reference's, within what kernels/quant_check.py allows, checked before use.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define STEP 32 /* inputs a tile product */
#define TILE_VALUES 512 /* bf16 values a tile holds (16 x 64 bytes) */

/* Whether AMX bf16 tiles run here: the CPU has them, the kernel enables their state, and Linux lets
 * this process use it (asked once; the permission is the process's, for every thread). */
int quant_amx_ready(void) {
    static int ready = -1;
    if (ready >= 0) return ready;
    unsigned a, b, c, d;
    ready = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 22))) return ready;
    unsigned avx512 = (1u << 16) | (1u << 30) | (1u << 31); /* F, BW, VL */
    if ((b & avx512) != avx512 || !__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a & (1u << 5)))
        return ready; /* AVX-512 F, BW, VL and BF16 come with every AMX CPU; checked all the same */
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17)) return ready; /* XTILECFG and XTILEDATA enabled by the kernel */
    ready = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return ready;
}

struct tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* Every tile 16 rows of 64 bytes: C in 0-3 (rows of A i, outputs of B j in 2i + j), A in 4-5, B in 6-7. */
TARGET static void configure_tiles(void) {
    struct tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; t++) {
        config.colsb[t] = 64;
        config.rows[t] = 16;
    }
    _tile_loadconfig(&config);
}

/* Sixteen vectors of 16 32-bit values transposed in place (r[i][j] becomes r[j][i]). */
TARGET static void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* r[4i + e], 128-bit lane L: rows 4i..4i+3, element 4L + e */
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int e = 0; e < 4; e++) { /* 128-bit lanes regrouped: then each vector is one column */
        t[e] = _mm512_shuffle_f32x4(r[e], r[4 + e], 0x88);
        t[4 + e] = _mm512_shuffle_f32x4(r[e], r[4 + e], 0xDD);
        t[8 + e] = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0x88);
        t[12 + e] = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0xDD);
    }
    for (int e = 0; e < 4; e++) {
        r[e] = _mm512_shuffle_f32x4(t[e], t[8 + e], 0x88);
        r[8 + e] = _mm512_shuffle_f32x4(t[e], t[8 + e], 0xDD);
        r[4 + e] = _mm512_shuffle_f32x4(t[4 + e], t[12 + e], 0x88);
        r[12 + e] = _mm512_shuffle_f32x4(t[4 + e], t[12 + e], 0xDD);
    }
}

/* w = q * scale + min (product and sum rounded apart, as format.dequantize) for 16 values. */
TARGET static inline __m512 dequantized(__m512 q, float scale, const float *min) {
    __m512 product = _mm512_mul_ps(q, _mm512_set1_ps(scale));
    return min ? _mm512_add_ps(product, _mm512_set1_ps(*min)) : product;
}

/* Inputs at..at+31 of one weight row dequantized and rounded to bf16: format.dequantize's values
 * rounded once to nearest even (by VCVTNEPS2BF16, which takes a denormal value, below 1.2e-38, as
 * zero). g0, g1: the groups of inputs at..at+15 and at+16..at+31. int4 (group a multiple of 32, so
 * g0 = g1) looks the 16 values of the group up in a table (VPERMW: two lookups a 32-bit lane, the
 * pair's two nibbles); int8 (group a multiple of 16) computes them. */
TARGET static inline void dequantize_step(const uint8_t *w, const float *s, const float *m, long at, long g0, long g1,
                                          int bits, uint16_t *row) {
    if (bits == 4) {
        const __m512 ramp = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        __m256bh values = _mm512_cvtneps_pbh(dequantized(ramp, s[g0], m ? m + g0 : 0));
        __m512i table = _mm512_castsi256_si512((__m256i)values);
        __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w + at / 2)));
        /* lane j: low nibble (input at + 2j) in its low half, high nibble in its high half */
        __m512i index = _mm512_ternarylogic_epi32(bytes, _mm512_slli_epi32(bytes, 12),
                                                  _mm512_set1_epi32(0x000f000f), 0xA8); /* (a | b) & c */
        _mm512_storeu_si512((void *)(row + at), _mm512_permutexvar_epi16(index, table));
        return;
    }
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + at))));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + at + 16))));
    __m512bh both = _mm512_cvtne2ps_pbh(dequantized(hi, s[g1], m ? m + g1 : 0),
                                        dequantized(lo, s[g0], m ? m + g0 : 0));
    _mm512_storeu_si512((void *)(row + at), (__m512i)both);
}

/* One weight row's k values dequantized (dequantize_step's values; the groups counted, not divided). */
TARGET static void dequantize_row(const uint8_t *w, const float *s, const float *m, long k, int bits, long group,
                                  uint16_t *row) {
    long g = 0, left = group; /* inputs left in group g */
    for (long at = 0; at < k; at += STEP) {
        long g0 = g;
        if ((left -= 16) == 0) g++, left = group;
        long g1 = g;
        if ((left -= 16) == 0) g++, left = group;
        if (bits == 4)
            dequantize_step(w, s, m, at, g0, g1, 4, row);
        else
            dequantize_step(w, s, m, at, g0, g1, 8, row);
    }
}

/* Outputs o0..o0+15 of the packed weight (zero past n) as B tiles, one per step of 32 inputs:
 * tiles[s * 512 + 32 p + 2 c + e] = W[o0 + c][32 s + 2 p + e]. rows: 16 * k bf16 of scratch. */
TARGET static void tile_weight(const uint8_t *qweight, const float *scales, const float *mins, int bits, long group,
                               long n, long k, long o0, uint16_t *rows, uint16_t *tiles) {
    long groups = k / group, weight_row = bits == 4 ? k / 2 : k;
    for (long c = 0; c < 16; c++) {
        long o = o0 + c;
        if (o >= n)
            memset(rows + c * k, 0, k * sizeof(uint16_t));
        else
            dequantize_row(qweight + o * weight_row, scales + o * groups, mins ? mins + o * groups : 0, k, bits, group,
                           rows + c * k);
    }
    for (long s = 0; s < k / STEP; s++) {
        __m512 r[16];
        for (int c = 0; c < 16; c++) r[c] = _mm512_loadu_ps((const float *)(rows + c * k + s * STEP));
        transpose16(r);
        for (int p = 0; p < 16; p++) _mm512_storeu_ps((float *)(tiles + s * TILE_VALUES) + 16 * p, r[p]);
    }
}

/* The whole weight as B tiles (outputs in blocks of 16, the last zero-padded): block b at
 * tiled + b * (k / 32) * 512, as tile_weight lays it out; for prompt chunks that share a layer's
 * weights (kernels/quant_cpu.py's sharing_dequantized). tiled: ceil(n / 16) * 16 * k bf16. Needs no
 * AMX itself. */
TARGET void quant_amx_tile_weight(const uint8_t *qweight, const float *scales, const float *mins, int bits,
                                  long group, long n, long k, uint16_t *tiled, int threads) {
    long blocks = (n + 15) / 16;
#pragma omp parallel num_threads(threads)
    {
        uint16_t *rows = aligned_alloc(64, 16 * k * sizeof(uint16_t));
#pragma omp for schedule(static)
        for (long b = 0; b < blocks; b++)
            tile_weight(qweight, scales, mins, bits, group, n, k, b * 16, rows, tiled + b * 16 * k);
        free(rows);
    }
}

/* C tile t (0-3; the tile number must be a constant) stored to c, 16 rows of 64 bytes. */
TARGET static void store_c(int t, float *c) {
    switch (t) {
        case 0: _tile_stored(0, c, 64); break;
        case 1: _tile_stored(1, c, 64); break;
        case 2: _tile_stored(2, c, 64); break;
        default: _tile_stored(3, c, 64); break;
    }
}

/* A C tile (float32, 16 rows x 16 outputs) rounded to bf16 into out[r0 + j][o0 + i], plus the bias. */
TARGET static void store_tile(const float *c, long r0, long rows, long o0, long n, const uint16_t *bias,
                              uint16_t *out, long out_stride) {
    if (o0 >= n || r0 >= rows) return;
    long width = n - o0 < 16 ? n - o0 : 16;
    __mmask16 keep = (__mmask16)((1u << width) - 1);
    __m512 add = _mm512_setzero_ps();
    if (bias)
        add = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(keep, bias + o0)), 16));
    for (long j = 0; j < 16 && r0 + j < rows; j++) {
        __m256i bf = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_load_ps(c + 16 * j), add));
        _mm256_mask_storeu_epi16(out + (r0 + j) * out_stride + o0, keep, bf);
    }
}

/* C tiles 0-3 = A i . B j (tile 2i + j) summed over the steps of 32 inputs, from zero: A i is 16 rows
 * of 32 bf16 at a[i] + 32 s (row stride stride[i] values), B j the 512 values at b[j] + 512 s. */
TARGET static void products(const uint16_t *a[2], const long stride[2], const uint16_t *b[2], int two_a, int two_b,
                            long steps) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (long s = 0; s < steps; s++) {
        _tile_loadd(4, a[0] + s * STEP, stride[0] * sizeof(uint16_t));
        _tile_loadd(6, b[0] + s * TILE_VALUES, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (two_b) {
            _tile_loadd(7, b[1] + s * TILE_VALUES, 64);
            _tile_dpbf16ps(1, 4, 7);
        }
        if (two_a) {
            _tile_loadd(5, a[1] + s * STEP, stride[1] * sizeof(uint16_t));
            _tile_dpbf16ps(2, 5, 6);
            if (two_b) _tile_dpbf16ps(3, 5, 7);
        }
    }
}

/* The bf16 values of scratch quant_gemm_amx needs: the last rows padded to a tile, and each thread's
 * two blocks of B tiles and 16 weight rows. */
long quant_amx_scratch(long k, int threads) { return (16 + threads * 48L) * k; }

/* out[r][o] = x[r] . W[o] (+ bias[o]), rounded once to bf16, for rows r < rows and outputs o < n. x:
 * bf16 [rows][k], row stride x_stride, k a multiple of 32. W: `tiled` (quant_amx_tile_weight's
 * layout) where not NULL, else the packed weight (qweight, scales, mins, bits, group: quant_kernels.c's
 * forms, group a multiple of 16, of 32 for int4), tiled here 32 outputs at a time. bias: bf16 [n] or
 * NULL. scratch: quant_amx_scratch(k, threads) bf16, 64-byte aligned. Returns 0, or -1 (and computes
 * nothing) where AMX cannot run. */
TARGET int quant_gemm_amx(const uint16_t *x, long x_stride, long rows, long k, const uint8_t *qweight,
                          const float *scales, const float *mins, int bits, long group, const uint16_t *tiled,
                          long n, const uint16_t *bias, uint16_t *out, long out_stride, uint16_t *scratch,
                          int threads) {
    if (!quant_amx_ready()) return -1; /* (a tile instruction would fault: SIGILL) */
    long steps = k / STEP, whole = rows / 16, blocks = (rows + 15) / 16, pairs = (n + 31) / 32;
    uint16_t *tail = scratch;
    if (whole < blocks) { /* the last rows, padded with zeros, so a tile never reads past x */
        memset(tail, 0, 16 * k * sizeof(uint16_t));
        for (long r = whole * 16; r < rows; r++)
            memcpy(tail + (r - whole * 16) * k, x + r * x_stride, k * sizeof(uint16_t));
    }
#pragma omp parallel num_threads(threads)
    {
        int team = omp_get_num_threads(), me = omp_get_thread_num();
        uint16_t *own = scratch + 16 * k + me * 48 * k; /* two blocks of B tiles, then 16 weight rows */
        float c[256] __attribute__((aligned(64)));
        configure_tiles();
        for (long pair = pairs * me / team; pair < pairs * (me + 1) / team; pair++) {
            long o0 = pair * 32;
            int two_w = o0 + 16 < n;
            const uint16_t *w[2] = {tiled ? tiled + o0 * k : own, tiled ? tiled + (o0 + 16) * k : own + 16 * k};
            if (!tiled) {
                tile_weight(qweight, scales, mins, bits, group, n, k, o0, own + 32 * k, own);
                if (two_w) tile_weight(qweight, scales, mins, bits, group, n, k, o0 + 16, own + 32 * k, own + 16 * k);
            }
            for (long blk = 0; blk < blocks; blk += 2) {
                int two_x = blk + 1 < blocks;
                const uint16_t *a[2] = {blk < whole ? x + blk * 16 * x_stride : tail,
                                        blk + 1 < whole ? x + (blk + 1) * 16 * x_stride : tail};
                long stride[2] = {blk < whole ? x_stride : k, blk + 1 < whole ? x_stride : k};
                products(a, stride, w, two_x, two_w, steps);
                for (int t = 0; t < 4; t++) { /* tile 2i + j: rows of A i, outputs of B j */
                    if ((t >= 2 && !two_x) || (t % 2 && !two_w)) continue;
                    store_c(t, c);
                    store_tile(c, (blk + t / 2) * 16, rows, o0 + 16 * (t % 2), n, bias, out, out_stride);
                }
            }
        }
        _tile_release();
    }
    return 0;
}
#endif
