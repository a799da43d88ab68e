/* Prompt chunks over packed int4/int8 weights with AVX-512 VNNI (kernels/quant_cpu.py's vnni_gemm), for
 * CPUs without AMX: the activation rows are quantized to int8 per block of 32 as the decode kernel does
 * (quant_kernels.c's quant_quantize_rows), and the weight is multiplied in its packed form, 16 outputs
 * at a time, never dequantized to bf16.
 *
 * Why: on such a CPU a bf16 GEMM is bound by VDPBF16PS (32 products an instruction), which oneDNN runs
 * at ~86 % of its peak here, so a prompt over a weight dequantized for it could only be slower than
 * bf16's. VPDPBUSD makes 64 byte products an instruction and issues on two ports: ~3x the products a
 * second (docs/performance.md). The decode kernel's layout (each weight row's bytes along the lanes)
 * spends shuffles per unit reducing lanes to sums; here the lanes are 16 outputs instead: each group of
 * 16 outputs (a panel) is laid out once a call as VNNI columns (lane j of vector q = the 4 bytes q of
 * output j's chunk), so one VPDPBUSD of a panel vector with 4 activation bytes broadcast adds 4 products
 * to each of 16 outputs, and a unit's 8 of them leave its exact integer sums in the lanes, with no
 * reduction. Each panel serves every row of the call from the cache.
 *
 * The product of a row and an output: per unit of 32 inputs u in order, S = the exact integer sum of
 * q_w q_x (int8 weights read as w + 128, the 128 * sum(q_x) taken back), y += S * (weight scale * dx)
 * by one FMA, then per group in order y += min * T (T: sum of dx * q_x over the group), y rounded once
 * to bf16: the decode kernel's terms, summed in unit order rather than in 16 lanes, so within float32
 * rounding of it; each output's sum depends on its row alone, never on the rows or outputs beside it.
 * Checked against the reference before use (kernels/quant_check.py). Units of 32 only: int8 groups of
 * 16 run the dequantizing path.
 *
 * Decode steps of 8 rows or more (quant_kernels.c's quant_matmul) run the same panels with the decode
 * kernel's order of sums: unit u's term into accumulator u % 16, group g's minimum term into g % 16,
 * then reduce4's tree across the 16, so every output has the decode kernel's bits (tested against
 * each row alone) for fewer instructions (no lane reductions).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#include <omp.h>

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define CHUNK 64 /* inputs a chunk: two units of 32 */
#define PANEL 16 /* outputs a panel: one a lane */
#define MOST_ROWS 8 /* activation rows a pass over a panel (their sums and results in registers) */

long quant_quantize_rows(const uint16_t *x, long x_stride, long rows, long k, long group, int bits, uint8_t *scratch);
long quant_row_scratch_bytes(long k, long group);
const float *quant_row_dx(const uint8_t *row, long k);
const int32_t *quant_row_xs(const uint8_t *row, long k);
const float *quant_row_t(const uint8_t *row, long k);
void quant_store_bf16(const float *in, uint16_t *out, long n);
/* chunk j of a weight row as VPDPBUSD's unsigned bytes, in the activations' order */
void quant_chunk_values_to(const uint8_t *w, long j, int bits, uint8_t *out);

/* Bytes of a thread's panel: the VNNI columns, then the scales and minimums a group [groups][16]. */
static long panel_bytes(long k, long group) { return PANEL * k + 2 * (k / group) * PANEL * 4; }

/* Scratch bytes quant_gemm_vnni needs: the quantized rows, each thread's panel, room to align. */
long quant_gemm_vnni_scratch(long rows, long k, long group, int threads) {
    return rows * (quant_row_scratch_bytes(k, group) - 64) + threads * panel_bytes(k, group) + 64;
}

/* Outputs o0..o0+15 (zero past n) as VNNI columns: columns[c * 16 + q] lane j = bytes 4q..4q+3 of
 * output o0 + j's chunk c; and their scales and minimums, scales[g * 16 + j] (mins likewise). */
TARGET static void pack_panel(const uint8_t *qweight, const float *scales, const float *mins, int bits, long group,
                              long n, long k, long o0, __m512i *columns, float *ws, float *wm) {
    long chunks = k / CHUNK, groups = k / group, w_row = bits == 4 ? k / 2 : k;
    int32_t rows[PANEL][16] __attribute__((aligned(64)));
    const __m512i across = _mm512_set_epi32(240, 224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64, 48, 32, 16, 0);
    for (long c = 0; c < chunks; c++) {
        for (long j = 0; j < PANEL; j++)
            if (o0 + j < n)
                quant_chunk_values_to(qweight + (o0 + j) * w_row, c, bits, (uint8_t *)rows[j]);
            else
                _mm512_store_si512((void *)rows[j], _mm512_setzero_si512());
        for (int q = 0; q < 16; q++) _mm512_store_si512((void *)(columns + c * 16 + q),
                                                        _mm512_i32gather_epi32(across, &rows[0][q], 4));
    }
    for (long g = 0; g < groups; g++)
        for (long j = 0; j < PANEL; j++) {
            ws[g * PANEL + j] = o0 + j < n ? scales[(o0 + j) * groups + g] : 0.0f;
            if (mins) wm[g * PANEL + j] = o0 + j < n ? mins[(o0 + j) * groups + g] : 0.0f;
        }
}

/* Where a quantized activation row's parts lie (quant_kernels.c's layout, asked once a call): bytes
 * between rows, and the offsets of its unit scales dx, int8 offsets xs and group sums T. */
struct row_form {
    long x_row, dx, xs, t;
};

#define ROW_DX(row, f, u) (((const float *)((row) + (f).dx))[u])
#define ROW_XS(row, f, u) (((const int32_t *)((row) + (f).xs))[u])
#define ROW_T(row, f, g) (((const float *)((row) + (f).t))[g])

/* The decode kernel's sum of its 16 lanes (quant_kernels.c's reduce4), taken across 16 vectors
 * lane by lane: lane[i] + lane[i + 8], then pairs, then pairs of pairs, in the tree's order. */
TARGET static inline __m512 lane_tree(const __m512 *lane) {
    __m512 h[8];
    for (int i = 0; i < 8; i++) h[i] = _mm512_add_ps(lane[i], lane[i + 8]);
    return _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(h[0], h[1]), _mm512_add_ps(h[2], h[3])),
                         _mm512_add_ps(_mm512_add_ps(h[4], h[5]), _mm512_add_ps(h[6], h[7])));
}

/* The panel's 16 outputs for NR quantized activation rows: y[r] lane j = output o0 + j of row r, in
 * float32 (NR, bits and ORDERED constants once inlined). Summed unit by unit into one accumulator a
 * row (in registers), or ORDERED as the decode kernel sums: unit u's term into accumulator u % 16 and
 * group g's minimum term into g % 16 (NR x 16 accumulators, in `lanes`), then its lane tree, so each
 * output has the decode kernel's bits. */
TARGET static inline __attribute__((always_inline)) void panel_rows(const __m512i *columns, const float *ws,
                                                                   const float *wm, const uint8_t *xq,
                                                                   struct row_form f, long k, long group,
                                                                   const int bits, const int NR, const int ORDERED,
                                                                   __m512 *lanes, __m512 *y) {
    long x_row = f.x_row;
    long chunks = k / CHUNK, groups = k / group;
#pragma GCC unroll 8
    for (int r = 0; r < NR; r++) y[r] = _mm512_setzero_ps();
    if (ORDERED)
        for (int i = 0; i < NR * 16; i++) lanes[i] = _mm512_setzero_ps();
    for (long c = 0; c < chunks; c++)
        for (int b = 0; b < 2; b++) { /* unit 2c + b: int4 vectors 4b..4b+3 and 8+4b..; int8 8b..8b+7 */
            long u = 2 * c + b;
            __m512i s[MOST_ROWS];
#pragma GCC unroll 8
            for (int r = 0; r < NR; r++) s[r] = _mm512_setzero_si512();
#pragma GCC unroll 8
            for (int i = 0; i < 8; i++) {
                int q = bits == 4 ? 4 * b + (i % 4) + 8 * (i / 4) : 8 * b + i;
                __m512i w = _mm512_load_si512((const void *)(columns + c * 16 + q));
                const uint8_t *bytes = xq + c * CHUNK + 4 * q; /* the 4 activation bytes of row 0 */
#pragma GCC unroll 8
                for (int r = 0; r < NR; r++)
                    s[r] = _mm512_dpbusd_epi32(s[r], w, _mm512_set1_epi32(*(const int32_t *)(bytes + r * x_row)));
            }
            __m512 scale = _mm512_load_ps(ws + (c * CHUNK + b * 32) / group * PANEL);
#pragma GCC unroll 8
            for (int r = 0; r < NR; r++) {
                const uint8_t *row = xq + r * x_row;
                __m512i sum = bits == 8 ? _mm512_sub_epi32(s[r], _mm512_set1_epi32(ROW_XS(row, f, u))) : s[r];
                __m512 *acc = ORDERED ? lanes + r * 16 + u % 16 : y + r;
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(scale, _mm512_set1_ps(ROW_DX(row, f, u))),
                                       *acc);
            }
        }
    if (wm)
        for (long g = 0; g < groups; g++) {
            __m512 min = _mm512_load_ps(wm + g * PANEL);
#pragma GCC unroll 8
            for (int r = 0; r < NR; r++) {
                __m512 *acc = ORDERED ? lanes + r * 16 + g % 16 : y + r;
                *acc = _mm512_fmadd_ps(min, _mm512_set1_ps(ROW_T(xq + r * x_row, f, g)), *acc);
            }
        }
    if (ORDERED)
        for (int r = 0; r < NR; r++) y[r] = lane_tree(lanes + r * 16);
}

/* Rows r0..r0+NR-1's outputs o0.. (up to 16, to n) rounded to bf16 into out. */
TARGET static inline __attribute__((always_inline)) void panel_pass(const __m512i *columns, const float *ws,
                                                                   const float *wm, const uint8_t *xq,
                                                                   struct row_form f, long k, long group,
                                                                   const int bits, const int NR, const int ORDERED,
                                                                   long r0, long o0, long n, uint16_t *out,
                                                                   long out_stride) {
    __m512 y[MOST_ROWS], lanes[MOST_ROWS * 16]; /* (the ORDERED accumulators) */
    float values[PANEL] __attribute__((aligned(64)));
    panel_rows(columns, ws, wm, xq + r0 * f.x_row, f, k, group, bits, NR, ORDERED, lanes, y);
    for (int r = 0; r < NR; r++) {
        _mm512_store_ps(values, y[r]);
        quant_store_bf16(values, out + (r0 + r) * out_stride + o0, n - o0 < PANEL ? n - o0 : PANEL);
    }
}

/* Every row of the call against one panel: passes of 8 rows, then 4, 2, 1 (one inlined copy of the
 * kernel per weight width and order). */
TARGET static void panel_all_rows(const __m512i *columns, const float *ws, const float *wm, const uint8_t *xq,
                                  struct row_form f, long rows, long k, long group, int bits, int ordered, long o0,
                                  long n, uint16_t *out, long out_stride) {
#define PASS(NR) panel_pass(columns, ws, wm, xq, f, k, group, BITS, NR, ORDERED, r0, o0, n, out, out_stride)
#define PASSES                                   \
    for (; r0 + 8 <= rows; r0 += 8) PASS(8);     \
    if (rows - r0 >= 4) PASS(4), r0 += 4;        \
    if (rows - r0 >= 2) PASS(2), r0 += 2;        \
    if (rows - r0 >= 1) PASS(1);
    long r0 = 0;
    if (bits == 4 && !ordered) {
        enum { BITS = 4, ORDERED = 0 };
        PASSES
    } else if (bits == 4) {
        enum { BITS = 4, ORDERED = 1 };
        PASSES
    } else if (!ordered) {
        enum { BITS = 8, ORDERED = 0 };
        PASSES
    } else {
        enum { BITS = 8, ORDERED = 1 };
        PASSES
    }
#undef PASSES
#undef PASS
}

/* Where a call's quantized rows lie (quant_kernels.c's layout from xq on, x_row bytes apart). */
static struct row_form row_form_of(const uint8_t *xq, long x_row, long k) {
    struct row_form f = {x_row, (const uint8_t *)quant_row_dx(xq, k) - xq, (const uint8_t *)quant_row_xs(xq, k) - xq,
                         (const uint8_t *)quant_row_t(xq, k) - xq};
    return f;
}

/* The panels of the weight against the quantized rows, split over the threads: x, when not NULL, is
 * quantized into xq first (a prompt chunk); own_panels: threads * panel_bytes. */
TARGET static void run_panels(const uint16_t *x, long x_stride, uint8_t *xq, long x_row, long rows, long k,
                              const uint8_t *qweight, const float *scales, const float *mins, long n, int bits,
                              long group, int ordered, uint16_t *out, long out_stride, uint8_t *own_panels,
                              int threads) {
    long groups = k / group, panels = (n + PANEL - 1) / PANEL;
    struct row_form f = row_form_of(xq, x_row, k);
#pragma omp parallel num_threads(threads)
    {
        uint8_t *own = own_panels + omp_get_thread_num() * panel_bytes(k, group);
        __m512i *columns = (__m512i *)own;
        float *ws = (float *)(own + PANEL * k), *wm = mins ? ws + groups * PANEL : 0;
        if (x) {
#pragma omp for schedule(static)
            for (long r = 0; r < rows; r++)
                quant_quantize_rows(x + r * x_stride, x_stride, 1, k, group, bits, xq + r * x_row);
        }
#pragma omp for schedule(static)
        for (long p = 0; p < panels; p++) {
            pack_panel(qweight, scales, mins, bits, group, n, k, p * PANEL, columns, ws, wm);
            panel_all_rows(columns, ws, wm, xq, f, rows, k, group, bits, ordered, p * PANEL, n, out, out_stride);
        }
    }
}

/* out[r][o] = x[r] . W[o], rounded once to bf16, for rows r < rows and outputs o < n. x: bf16 [rows][k],
 * row stride x_stride, k a multiple of 64. W: quant_kernels.c's packed forms, groups of 32 or a multiple
 * of 64 (k itself for one scale a row). scratch: quant_gemm_vnni_scratch bytes. The caller checks the
 * CPU (quant_supported). */
TARGET void quant_gemm_vnni(const uint16_t *x, long x_stride, long rows, long k, const uint8_t *qweight,
                            const float *scales, const float *mins, long n, int bits, long group, uint16_t *out,
                            long out_stride, uint8_t *scratch, int threads) {
    long x_row = quant_row_scratch_bytes(k, group) - 64;
    uint8_t *xq = (uint8_t *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    run_panels(x, x_stride, xq, x_row, rows, k, qweight, scales, mins, n, bits, group, 0, out, out_stride,
               xq + rows * x_row, threads);
}

/* For quant_kernels.c's quant_matmul: a decode step's bf16 rows, already quantized at xq (x_row bytes
 * apart), through the panels with the decode kernel's order of sums, so every output has the bits the
 * decode kernel gives it (units of 32 only). The panels live in a buffer of the calling thread's,
 * kept between calls. Returns 0, or -1 (nothing computed) where that buffer cannot be had. */
TARGET int quant_panels_in_decode_order(const uint8_t *xq, long x_row, long rows, long k, const uint8_t *qweight,
                                        const float *scales, const float *mins, long n, int bits, long group,
                                        uint16_t *out, long out_stride, int threads) {
    static __thread uint8_t *buffer;
    static __thread long held;
    long need = threads * panel_bytes(k, group);
    if (held < need) {
        free(buffer);
        buffer = aligned_alloc(64, (need + 63) / 64 * 64);
        held = buffer ? need : 0;
        if (!buffer) return -1;
    }
    run_panels(0, 0, (uint8_t *)xq, x_row, rows, k, qweight, scales, mins, n, bits, group, 1, out, out_stride, buffer,
               threads);
    return 0;
}
#endif
