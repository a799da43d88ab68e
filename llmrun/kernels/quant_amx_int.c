/* Decode steps of several rows over packed int4/int8 weights with AMX int8 tiles (kernels/quant_cpu.py's
 * matmul, where the CPU has AMX): quant_kernels.c's quantized product, bit for bit. The activation rows
 * are quantized as there (int8 per block of 32, quant_quantize_rows); each unit's exact integer sum
 * S (32 inputs, 16 where groups are 16) for 16 weight rows by up to 16 activation rows is one tile
 * product (TDPBUSD: unsigned int4 values by signed activations; TDPBSSD for int8 weights), where the
 * VNNI kernel spends a VPDPBUSD per 64 inputs of every weight row and activation row and reduces its
 * lanes. The float steps are the VNNI kernel's, in its order, vectorised over the activation rows:
 * lane u % 16 of an output's accumulator takes S * (weight scale * dx) by one FMA in unit order, then
 * min * T by group, and the 16 lanes are summed as its reduce4 sums them. So a row's bits do not
 * depend on whether it ran alone (VNNI) or among others (here), which tests/model/test_quant_kernels.py
 * checks.
 *
 * A tile product: A = 16 weight rows of a unit's bytes, B = the unit's activation bytes in AMX's
 * layout (B[r][4 j + e] = byte 4 r + e of activation row j), C = 16 x 16 int32. The bytes of a unit
 * are taken in one order on both sides (int4: the unit's even inputs, then its odd ones, the order
 * quant_kernels.c's chunks hold them); an integer sum does not depend on it.
 */
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <omp.h>

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,amx-tile,amx-int8")))
#define CHUNK 64
#define AT_ONCE 32 /* units whose sums a block of 16 weight rows keeps before taking their float terms */
#define ROUND64(x) (((x) + 63) / 64 * 64)

int quant_amx_ready(void);
long quant_quantize_rows(const uint16_t *x, long x_stride, long rows, long k, long group, int bits,
                         uint8_t *scratch);
long quant_row_scratch_bytes(long k, long group);
const float *quant_row_dx(const uint8_t *row, long k);
const float *quant_row_t(const uint8_t *row, long k);
void quant_store_bf16(const float *in, uint16_t *out, long n);

/* Whether AMX int8 tiles run here (quant_amx_ready asked Linux for the tile state). */
int quant_amx_int_ready(void) {
    unsigned a, b, c, d;
    return quant_amx_ready() && __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d & (1u << 25));
}

struct tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* C in tiles 0-3 (16 weight rows x 16 int32 columns), A in 4-5 (16 rows of an item's bytes), B in 6-7
 * (bytes / 4 rows of 64 bytes). An item is a unit (columns: 16 activation rows), or for up to 8 rows
 * two units (columns 0-7: the first unit's sums for the rows, 8-15: the second's), which halves the
 * tile instructions and the float work. */
TARGET static void configure_tiles(int bytes) {
    struct tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; t++) {
        config.colsb[t] = t < 4 || t >= 6 ? 64 : bytes;
        config.rows[t] = t < 6 ? 16 : bytes / 4;
    }
    _tile_loadconfig(&config);
}

/* Byte r of unit u within an activation row (quant_kernels.c's chunk layout: per 64 inputs, int4 holds
 * the even ones, then the odd ones, so its unit h of a chunk is bytes 16 h.. and 32 + 16 h..). */
static long unit_byte(long u, long r, int bits, int unit) {
    if (bits == 8) return u * unit + r;
    long chunk = u / 2, h = u % 2;
    return chunk * CHUNK + (r < 16 ? h * 16 + r : 32 + h * 16 + r - 16);
}

/* The sums of items u0..end into sums (a 16 x 16 int32 tile an item): item i's A at a + (i / 2) *
 * a_two + (i % 2) * a_one (16 rows, a_stride apart), its B at b + i * b_item. */
#define PRODUCT(t, ta, tb, dp)                                                  \
    do {                                                                        \
        _tile_loadd(ta, a + (u + (t)) / 2 * a_two + (u + (t)) % 2 * a_one, a_stride); \
        _tile_loadd(tb, b + (u + (t)) * b_item, 64);                            \
        dp(t, ta, tb);                                                          \
    } while (0)
#define PRODUCTS(dp)                                                  \
    do {                                                              \
        PRODUCT(0, 4, 6, dp);                                         \
        if (u + 1 < end) PRODUCT(1, 5, 7, dp);                        \
        if (u + 2 < end) PRODUCT(2, 4, 6, dp);                        \
        if (u + 3 < end) PRODUCT(3, 5, 7, dp);                        \
    } while (0)

TARGET static void unit_products(const uint8_t *a, long a_stride, long a_two, long a_one, const uint8_t *b,
                                 long b_item, long u0, long end, int bits, int32_t *sums) {
    for (long u = u0; u < end; u += 4) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        if (bits == 4)
            PRODUCTS(_tile_dpbusd);
        else
            PRODUCTS(_tile_dpbssd);
        int32_t *c = sums + (u - u0) * 256;
        _tile_stored(0, c, 64);
        if (u + 1 < end) _tile_stored(1, c + 256, 64);
        if (u + 2 < end) _tile_stored(2, c + 512, 64);
        if (u + 3 < end) _tile_stored(3, c + 768, 64);
    }
}
#undef PRODUCTS
#undef PRODUCT

/* 16 int4 weight rows (zero past n) unpacked as A tiles: units 2c and 2c + 1 of row m, 32 bytes each,
 * at a[c * 1024 + 64 m]. */
TARGET static void unpack_int4(const uint8_t *qweight, long o0, long n, long k, uint8_t *a) {
    for (long m = 0; m < 16; m++) {
        const uint8_t *w = qweight + (o0 + m) * (k / 2);
        for (long c = 0; c < k / CHUNK; c++) {
            __m512i bytes = _mm512_setzero_si512();
            if (o0 + m < n) {
                __m256i packed = _mm256_loadu_si256((const __m256i *)(w + c * 32));
                bytes = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(packed), _mm256_srli_epi16(packed, 4), 1),
                                         _mm512_set1_epi8(0x0f));
                bytes = _mm512_shuffle_i32x4(bytes, bytes, 0xD8); /* [unit 2c: evens, odds | unit 2c + 1: evens, odds] */
            }
            _mm512_storeu_si512((void *)(a + c * 1024 + 64 * m), bytes);
        }
    }
}

/* The float terms of items i0..end (i0 a multiple of 16 units) for the 16 weight rows from o0, into acc
 * ([m][vector][16]; from zero where i0 is 0): scales s, each unit's group in gidx, dx per item and
 * activation row in dxt. An item is a unit (vector j: lane class j, u % 16, over the rows), or where
 * `narrow` (a constant once inlined) two units (lanes 0-7 the first's class for the rows, 8-15 the
 * second's, so each float step covers two units, and dxt and tt hold [first | second]). Where end is
 * the last item, then the minimums' terms (lane class g % 16: min * T, by group, T per group and row
 * in tt) and the classes summed in reduce4's order into result [m][row]. */
TARGET static inline __attribute__((always_inline)) void item_terms(const int32_t *sums, long i0, long end, long items,
                                                                   const float *s, const float *mins, long groups,
                                                                   long o0, long n, const int32_t *gidx,
                                                                   const float *dxt, const float *tt, float *acc,
                                                                   float *result, const int narrow) {
    const int vectors = narrow ? 8 : 16;
    for (long m = 0; m < 16 && o0 + m < n; m++) {
        const float *sm = s + (o0 + m) * groups;
        __m512 l[16];
#pragma GCC unroll 16
        for (int j = 0; j < vectors; j++) l[j] = i0 ? _mm512_load_ps(acc + (m * 16 + j) * 16) : _mm512_setzero_ps();
        for (long ib = i0; ib < end; ib += vectors) {
#pragma GCC unroll 16
            for (int j = 0; j < vectors; j++) {
                long i = ib + j;
                if (i >= end) break;
                __m512 w = narrow ? _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(sm[gidx[2 * i]]),
                                                         _mm512_set1_ps(sm[gidx[2 * i + 1]]))
                                  : _mm512_set1_ps(sm[gidx[i]]);
                __m512 sum = _mm512_cvtepi32_ps(_mm512_load_si512((const void *)(sums + (i - i0) * 256 + m * 16)));
                l[j] = _mm512_fmadd_ps(sum, _mm512_mul_ps(w, _mm512_load_ps(dxt + i * 16)), l[j]);
            }
        }
        if (end < items) {
#pragma GCC unroll 16
            for (int j = 0; j < vectors; j++) _mm512_store_ps(acc + (m * 16 + j) * 16, l[j]);
            continue;
        }
        if (mins) {
            const float *mm = mins + (o0 + m) * groups;
            for (long g0 = 0; g0 < groups; g0 += 16) {
#pragma GCC unroll 16
                for (int j = 0; j < vectors; j++) {
                    long g = g0 + (narrow ? 2 * j : j);
                    if (g >= groups) break;
                    __m512 mv = narrow ? _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(mm[g]),
                                                              _mm512_set1_ps(g + 1 < groups ? mm[g + 1] : 0.0f))
                                       : _mm512_set1_ps(mm[g]);
                    l[j] = _mm512_fmadd_ps(mv, _mm512_load_ps(tt + (narrow ? g / 2 : g) * 16), l[j]);
                }
            }
        }
        if (narrow) { /* vector i + vector i + 4 holds t[2i] | t[2i + 1], t[c] = class c + class c + 8 */
            __m256 u[4];
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) {
                __m512 t = _mm512_add_ps(l[i], l[i + 4]);
                u[i] = _mm256_add_ps(_mm512_castps512_ps256(t),
                                     _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(t), 1)));
            }
            _mm256_store_ps(result + m * 16, _mm256_add_ps(_mm256_add_ps(u[0], u[1]), _mm256_add_ps(u[2], u[3])));
            continue;
        }
        __m512 t[8];
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) t[i] = _mm512_add_ps(l[i], l[i + 8]);
        __m512 sum = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(t[0], t[1]), _mm512_add_ps(t[2], t[3])),
                                   _mm512_add_ps(_mm512_add_ps(t[4], t[5]), _mm512_add_ps(t[6], t[7])));
        _mm512_store_ps(result + m * 16, sum);
    }
}

/* result [weight row][activation row] as outputs o0.. of the activation rows, rounded to bf16. */
TARGET static void store_outputs(const float *result, long o0, long n, long rows, uint16_t *out, long out_stride) {
    long width = n - o0 < 16 ? n - o0 : 16;
    const __m512i column = _mm512_set_epi32(240, 224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64, 48, 32, 16, 0);
    for (long r = 0; r < rows; r++) {
        float row[16];
        _mm512_storeu_ps(row, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), (__mmask16)((1u << width) - 1),
                                                       _mm512_add_epi32(column, _mm512_set1_epi32((int)r)), result, 4));
        quant_store_bf16(row, out + r * out_stride + o0, width);
    }
}

static long a_bytes(long k) { return 16 * k; } /* a block's A tiles: 16 rows of k bytes (int4 unpacked) */
static long own_bytes(long k) { return ROUND64(a_bytes(k)) + AT_ONCE * 1024 + 16 * 1024 + 1024; }

/* The scratch bytes quant_matmul_amx needs (64-byte aligned). */
long quant_amx_int_scratch(long k, long group, int threads) {
    long units = k / (group == 16 ? 16 : 32), groups = k / group;
    return 16 * (quant_row_scratch_bytes(k, group) - 64) + ROUND64(16 * k) + ROUND64(units * 64) +
           ROUND64(groups * 64) + ROUND64(units * 4) + threads * own_bytes(k);
}

/* out[r][o] (bf16, row stride out_stride) = x[r] . W[o] for bf16 rows x (rows <= 16, row stride
 * x_stride) and outputs o < n, as quant_matmul computes it for bf16 rows (its formats: k a multiple of
 * 64; int4 groups a multiple of 32, int8 groups 16, 32 or a multiple of 64). scratch:
 * quant_amx_int_scratch bytes, 64-byte aligned. Returns 0, or -1 (and computes nothing) where it
 * cannot run. */
TARGET int quant_matmul_amx(const uint16_t *x, long x_stride, long rows, long k, const uint8_t *qweight,
                            const float *scales, const float *mins, long n, int bits, long group, uint16_t *out,
                            long out_stride, uint8_t *scratch, int threads) {
    if (!quant_amx_int_ready() || rows < 1 || rows > 16) return -1;
    long unit = group == 16 ? 16 : 32, units = k / unit, groups = k / group;
    int narrow = rows <= 8; /* items of two units */
    long items = narrow ? units / 2 : units, item_bytes = narrow ? 2 * unit : unit;
    uint8_t *xq = scratch;
    long x_row = quant_quantize_rows(x, x_stride, rows, k, group, bits, xq);
    uint8_t *b = xq + 16 * x_row;
    float *dxt = (float *)(b + ROUND64(16 * k)), *tt = (float *)((uint8_t *)dxt + ROUND64(units * 64));
    int32_t *gidx = (int32_t *)((uint8_t *)tt + ROUND64(groups * 64));
    uint8_t *owns = (uint8_t *)gidx + ROUND64(units * 4);
    memset(b, 0, 16 * k);
    memset(dxt, 0, units * 64);
    memset(tt, 0, groups * 64);
    for (long u = 0; u < units; u++) {
        gidx[u] = (int32_t)(u * unit / group);
        /* unit u's column block: its item, the item's first B row and first column */
        long item = narrow ? u / 2 : u, row0 = narrow ? (u % 2) * unit / 4 : 0, col0 = narrow ? (u % 2) * 8 : 0;
        for (long j = 0; j < rows; j++) {
            dxt[item * 16 + col0 + j] = quant_row_dx(xq + j * x_row, k)[u];
            for (long r = 0; r < unit / 4; r++)
                memcpy(b + item * item_bytes * 16 + (row0 + r) * 64 + 4 * (col0 + j),
                       xq + j * x_row + unit_byte(u, 4 * r, bits, (int)unit), 4);
        }
    }
    for (long g = 0; g < groups; g++)
        for (long j = 0; j < rows; j++)
            tt[(narrow ? g / 2 * 16 + (g % 2) * 8 : g * 16) + j] = quant_row_t(xq + j * x_row, k)[g];
    long blocks = (n + 15) / 16;
#pragma omp parallel num_threads(threads)
    {
        int team = omp_get_num_threads(), me = omp_get_thread_num();
        uint8_t *own = owns + me * own_bytes(k);
        uint8_t *a_tiles = own;
        int32_t *sums = (int32_t *)(own + ROUND64(a_bytes(k)));
        float *acc = (float *)((uint8_t *)sums + AT_ONCE * 1024), *result = acc + 16 * 256;
        configure_tiles((int)item_bytes);
        for (long blk = blocks * me / team; blk < blocks * (me + 1) / team; blk++) {
            long o0 = blk * 16;
            const uint8_t *a = a_tiles;
            long a_stride = 64, a_two = 1024, a_one = 32; /* int4: units 2c, 2c + 1 at c * 1024, 32 bytes each */
            if (bits == 4) {
                unpack_int4(qweight, o0, n, k, a_tiles);
            } else { /* int8 rows are A tiles as they lie (the last rows padded with zeros) */
                if (o0 + 16 <= n) {
                    a = qweight + o0 * k;
                } else {
                    memset(a_tiles, 0, a_bytes(k));
                    memcpy(a_tiles, qweight + o0 * k, (n - o0) * k);
                }
                a_stride = k, a_two = 2 * unit, a_one = unit;
            }
            if (narrow) /* item i: units 2i, 2i + 1, side by side */
                a_two *= 2, a_one = a_two / 2;
            for (long u0 = 0; u0 < items; u0 += AT_ONCE) {
                long end = u0 + AT_ONCE < items ? u0 + AT_ONCE : items;
                unit_products(a, a_stride, a_two, a_one, b, item_bytes * 16, u0, end, bits, sums);
                if (narrow)
                    item_terms(sums, u0, end, items, scales, mins, groups, o0, n, gidx, dxt, tt, acc, result, 1);
                else
                    item_terms(sums, u0, end, items, scales, mins, groups, o0, n, gidx, dxt, tt, acc, result, 0);
            }
            store_outputs(result, o0, n, rows, out, out_stride);
        }
        _tile_release();
    }
    return 0;
}
#endif
