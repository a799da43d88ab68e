/* Prompt chunks over packed int4/int8 weights with AMX (kernels/quant_cpu.py's gemm): bf16 activations
 * times the weight dequantized 32 output rows at a time into a buffer the caches hold, multiplied with
 * AMX bf16 tiles (TDPBF16PS: a 16x32 by 32x16 product an instruction, summed in float32). A chunk thus
 * neither writes the whole dequantized weight to memory nor has oneDNN reorder a plain weight for
 * every call.
 *
 * A tile product is A (16 rows of 32 bf16) by B (32 x 16 in AMX's pair layout: B[p][2j + e] is input
 * 2p + e of column j) into C (16 x 16 float32). The weight's rows are the A tiles: each row's 32
 * inputs of a step dequantized straight into place (int4 through a 16-entry table a group), 32
 * outputs at a time in the call or whole, once, for a step's prompt chunks to share
 * (quant_amx_tile_weight). The chunk's rows are the B tiles, laid out once a call (each 16 x 16 block
 * of input pairs transposed: the rows are fewer than the weight's values, so the transposing is
 * cheaper on this side), and each C tile (outputs by rows) is transposed back as it is stored. Two A
 * and two B tiles make four products a step of 32 inputs. Each output is summed over the inputs 32 at
 * a time in order, so a row's bits do not depend on the rows or outputs beside it, nor on which of the
 * two weight forms ran (tested). The weights are format.dequantize's values rounded once to bf16
 * (those of quant_kernels.c's dequantize, which the GEMM this replaces ran over); the sums are float32
 * in another order than the reference's, within what kernels/quant_check.py allows, checked before use.
 */
#include <stdint.h>
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
TARGET static inline __attribute__((always_inline)) void transpose16(__m512 r[16]) {
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
TARGET static inline __m512 dequantize_step(const uint8_t *w, const float *s, const float *m, long at, long g0,
                                            long g1, int bits) {
    if (bits == 4) {
        const __m512 ramp = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        __m256bh values = _mm512_cvtneps_pbh(dequantized(ramp, s[g0], m ? m + g0 : 0));
        __m512i table = _mm512_castsi256_si512((__m256i)values);
        __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w + at / 2)));
        /* lane j: low nibble (input at + 2j) in its low half, high nibble in its high half */
        __m512i index = _mm512_ternarylogic_epi32(bytes, _mm512_slli_epi32(bytes, 12),
                                                  _mm512_set1_epi32(0x000f000f), 0xA8); /* (a | b) & c */
        return _mm512_castsi512_ps(_mm512_permutexvar_epi16(index, table));
    }
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + at))));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + at + 16))));
    return (__m512)_mm512_cvtne2ps_pbh(dequantized(hi, s[g1], m ? m + g1 : 0), dequantized(lo, s[g0], m ? m + g0 : 0));
}

/* Outputs o0..o0+15 of the packed weight (zero past n) as A tiles, one per step of 32 inputs:
 * tiles[s * 512 + 32 c + i] = W[o0 + c][32 s + i], each row dequantized straight into place. */
TARGET static void tile_weight(const uint8_t *qweight, const float *scales, const float *mins, int bits, long group,
                               long n, long k, long o0, uint16_t *tiles) {
    long groups = k / group, weight_row = bits == 4 ? k / 2 : k;
    for (long c = 0; c < 16; c++) {
        uint16_t *row = tiles + 32 * c;
        if (o0 + c >= n) {
            for (long at = 0; at < k; at += STEP) _mm512_storeu_si512((void *)(row + at / STEP * TILE_VALUES),
                                                                      _mm512_setzero_si512());
            continue;
        }
        const uint8_t *w = qweight + (o0 + c) * weight_row;
        const float *s = scales + (o0 + c) * groups, *m = mins ? mins + (o0 + c) * groups : 0;
        if (o0 + c + 2 < n) /* the row after next fetched while this one is dequantized (rows lie one after another) */
            for (long line = 0; line < weight_row; line += 64)
                _mm_prefetch((const char *)w + 2 * weight_row + line, _MM_HINT_T0);
        long g = 0, left = group; /* inputs left in group g (the groups counted, not divided) */
        for (long at = 0; at < k; at += STEP) {
            long g0 = g;
            if ((left -= 16) == 0) g++, left = group;
            long g1 = g;
            if ((left -= 16) == 0) g++, left = group;
            __m512 values = bits == 4 ? dequantize_step(w, s, m, at, g0, g1, 4) : dequantize_step(w, s, m, at, g0, g1, 8);
            _mm512_storeu_ps((float *)(row + at / STEP * TILE_VALUES), values);
        }
    }
}

/* Rows r0..r0+15 of x (zero past `rows`) as B tiles, one per step of 32 inputs:
 * tiles[s * 512 + 32 p + 2 j + e] = x[r0 + j][32 s + 2 p + e] (each step's 16 rows transposed as
 * 32-bit pairs). */
TARGET static void tile_rows(const uint16_t *x, long x_stride, long rows, long k, long r0, uint16_t *tiles) {
    for (long at = 0; at < k; at += STEP) {
        __m512 r[16];
        for (long j = 0; j < 16; j++)
            r[j] = r0 + j < rows ? _mm512_loadu_ps((const float *)(x + (r0 + j) * x_stride + at)) : _mm512_setzero_ps();
        transpose16(r);
        float *tile = (float *)(tiles + at / STEP * TILE_VALUES);
        for (int p = 0; p < 16; p++) _mm512_storeu_ps(tile + 16 * p, r[p]);
    }
}

/* The whole weight as A tiles (outputs in blocks of 16, the last zero-padded): block b at
 * tiled + b * (k / 32) * 512, as tile_weight lays it out; for prompt chunks that share a layer's
 * weights (kernels/quant_cpu.py's sharing_dequantized). tiled: ceil(n / 16) * 16 * k bf16. Needs no
 * AMX itself. */
TARGET void quant_amx_tile_weight(const uint8_t *qweight, const float *scales, const float *mins, int bits,
                                  long group, long n, long k, uint16_t *tiled, int threads) {
    long blocks = (n + 15) / 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < blocks; b++) tile_weight(qweight, scales, mins, bits, group, n, k, b * 16, tiled + b * 16 * k);
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

/* A C tile (float32, 16 outputs x 16 rows: c[16 i + j] is output o0 + i of row r0 + j), transposed and
 * rounded to bf16 into out[r0 + j][o0 + i], plus the bias. */
TARGET static void store_tile(const float *c, long r0, long rows, long o0, long n, const uint16_t *bias,
                              uint16_t *out, long out_stride) {
    if (o0 >= n || r0 >= rows) return;
    long width = n - o0 < 16 ? n - o0 : 16;
    __mmask16 keep = (__mmask16)((1u << width) - 1);
    __m512 add = _mm512_setzero_ps(), r[16];
    if (bias)
        add = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(keep, bias + o0)), 16));
    for (int i = 0; i < 16; i++) r[i] = _mm512_load_ps(c + 16 * i);
    transpose16(r);
    for (long j = 0; j < 16 && r0 + j < rows; j++) {
        __m256i bf = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(r[j], add));
        _mm256_mask_storeu_epi16(out + (r0 + j) * out_stride + o0, keep, bf);
    }
}

/* C tiles 0-3 = A i . B j (tile 2i + j) summed over the steps of 32 inputs, from zero: A i the 512
 * values at a[i] + 512 s (16 weight rows), B j those at b[j] + 512 s (16 rows of x, transposed). */
TARGET static void products(const uint16_t *a[2], const uint16_t *b[2], int two_a, int two_b, long steps) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (long s = 0; s < steps; s++) {
        _tile_loadd(4, a[0] + s * TILE_VALUES, 64);
        _tile_loadd(6, b[0] + s * TILE_VALUES, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (two_b) {
            _tile_loadd(7, b[1] + s * TILE_VALUES, 64);
            _tile_dpbf16ps(1, 4, 7);
        }
        if (two_a) {
            _tile_loadd(5, a[1] + s * TILE_VALUES, 64);
            _tile_dpbf16ps(2, 5, 6);
            if (two_b) _tile_dpbf16ps(3, 5, 7);
        }
    }
}

/* The bf16 values of scratch quant_gemm_amx needs: x's rows as B tiles (padded to 16), and each
 * thread's two blocks of A tiles. */
long quant_amx_scratch(long rows, long k, int threads) { return ((rows + 15) / 16 * 16 + threads * 32L) * k; }

/* out[r][o] = x[r] . W[o] (+ bias[o]), rounded once to bf16, for rows r < rows and outputs o < n. x:
 * bf16 [rows][k], row stride x_stride, k a multiple of 32. W: `tiled` (quant_amx_tile_weight's
 * layout) where not NULL, else the packed weight (qweight, scales, mins, bits, group: quant_kernels.c's
 * forms, group a multiple of 16, of 32 for int4), tiled here 32 outputs at a time. bias: bf16 [n] or
 * NULL. scratch: quant_amx_scratch(rows, k, threads) bf16, 64-byte aligned. Returns 0, or -1 (and
 * computes nothing) where AMX cannot run. */
TARGET int quant_gemm_amx(const uint16_t *x, long x_stride, long rows, long k, const uint8_t *qweight,
                          const float *scales, const float *mins, int bits, long group, const uint16_t *tiled,
                          long n, const uint16_t *bias, uint16_t *out, long out_stride, uint16_t *scratch,
                          int threads) {
    if (!quant_amx_ready()) return -1; /* (a tile instruction would fault: SIGILL) */
    long steps = k / STEP, blocks = (rows + 15) / 16, pairs = (n + 31) / 32;
    uint16_t *x_tiles = scratch; /* block blk of rows at x_tiles + blk * 16 * k */
#pragma omp parallel num_threads(threads)
    {
        int team = omp_get_num_threads(), me = omp_get_thread_num();
        uint16_t *own = scratch + blocks * 16 * k + me * 32 * k; /* two blocks of A tiles */
        float c[256] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (long blk = 0; blk < blocks; blk++) tile_rows(x, x_stride, rows, k, blk * 16, x_tiles + blk * 16 * k);
        configure_tiles();
        for (long pair = pairs * me / team; pair < pairs * (me + 1) / team; pair++) {
            long o0 = pair * 32;
            int two_w = o0 + 16 < n;
            const uint16_t *w[2] = {tiled ? tiled + o0 * k : own, tiled ? tiled + (o0 + 16) * k : own + 16 * k};
            if (!tiled) {
                tile_weight(qweight, scales, mins, bits, group, n, k, o0, own);
                if (two_w) tile_weight(qweight, scales, mins, bits, group, n, k, o0 + 16, own + 16 * k);
            }
            for (long blk = 0; blk < blocks; blk += 2) {
                int two_x = blk + 1 < blocks;
                const uint16_t *xt[2] = {x_tiles + blk * 16 * k, x_tiles + (two_x ? blk + 1 : blk) * 16 * k};
                products(w, xt, two_w, two_x, steps);
                for (int t = 0; t < 4; t++) { /* tile 2i + j: outputs of A i, rows of B j */
                    if ((t >= 2 && !two_w) || (t % 2 && !two_x)) continue;
                    store_c(t, c);
                    store_tile(c, (blk + t % 2) * 16, rows, o0 + 16 * (t / 2), n, bias, out, out_stride);
                }
            }
        }
        _tile_release();
    }
    return 0;
}
#endif
