/* bf16 GEMV over oneDNN's packed weights, for CPU decode steps, bit-identical to oneDNN's AMX matmul.
 *
 * A weight packed by torch.ops.mkldnn._reorder_linear_weight on a CPU with AMX is laid out in
 * VNNI blocks: [N / 32][K / 2][32 outputs][2 inputs] bf16. oneDNN's AMX kernel (TDPBF16PS) sums
 * each tile of 32 inputs as two float32 chains from zero, one over the even inputs and one over
 * the odd ones, each product exact and each addition rounded to nearest even, flushing
 * denormals; then adds (even + odd) to the output, tile after tile, and rounds the output to bf16.
 * This kernel does the same sums in the same order with AVX-512, 16 outputs per vector, so its
 * results equal oneDNN's bit for bit (checked by kernels/native.py on every shape before use),
 * without oneDNN's fixed cost per call and reading the weights at near the memory bandwidth.
 *
 * Built by kernels/native.py with -fopenmp: the parallel loop joins the OpenMP runtime PyTorch
 * already loaded (libgomp.so.1), so it shares ATen's threads instead of starting its own.
 */
#include <stdint.h>

#if defined(__x86_64__)
#include <immintrin.h>
#include <omp.h>

#define OUT_BLOCK 32   /* outputs per VNNI block */
#define TILE 32        /* inputs per AMX tile row: 16 pairs */

#define TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

/* Whether this CPU runs the instructions below (callers check before the first call). */
int gemv_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512bf16");
}

/* One row of x (float32, k values) times `count` (1 or 2, a constant once inlined) adjacent
 * blocks' weights ([k / 2][32][2] bf16 each, `stride` words apart): 32 outputs per block, rounded
 * to bf16 into dst. Per tile, four float32 chains a block (even and odd inputs, two vectors of
 * outputs); two blocks at once give the FMAs enough independent chains to keep up with memory. */
TARGET static inline __attribute__((always_inline)) void blocks_row(const uint32_t *block, long stride,
                                                                    const float *x, long k, uint16_t *dst,
                                                                    const int count) {
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    __m512 out[2][2] = {{_mm512_setzero_ps(), _mm512_setzero_ps()}, {_mm512_setzero_ps(), _mm512_setzero_ps()}};
    for (long t = 0; t < k; t += TILE) {
        __m512 even[2][2], odd[2][2];
        for (int c = 0; c < count; c++)
            even[c][0] = even[c][1] = odd[c][0] = odd[c][1] = _mm512_setzero_ps();
        for (int p = 0; p < TILE / 2; p++) {
            __m512 xe = _mm512_set1_ps(x[t + 2 * p]), xo = _mm512_set1_ps(x[t + 2 * p + 1]);
            for (int c = 0; c < count; c++) {
                const uint32_t *pairs = block + c * stride + (t / 2 + p) * OUT_BLOCK;
                for (int h = 0; h < 2; h++) {
                    __m512i w = _mm512_loadu_si512((const void *)(pairs + 16 * h));
                    even[c][h] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), xe, even[c][h]);
                    odd[c][h] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(w, high)), xo, odd[c][h]);
                }
            }
        }
        for (int c = 0; c < count; c++)
            for (int h = 0; h < 2; h++)
                out[c][h] = _mm512_add_ps(out[c][h], _mm512_add_ps(even[c][h], odd[c][h]));
    }
    for (int c = 0; c < count; c++)
        for (int h = 0; h < 2; h++)
            _mm256_storeu_si256((__m256i *)(dst + c * OUT_BLOCK + 16 * h), (__m256i)_mm512_cvtneps_pbh(out[c][h]));
}

/* out[rows][n] (bf16, row stride out_stride) = x[rows][k] (bf16, row stride x_stride) @ W.T for a
 * packed W [n][k]; n and k multiples of 32. `scratch` holds rows * k floats (x as float32). Each
 * thread takes an even share of the blocks, two at a time, every row before the next two (so later
 * rows read them from L2; decoding calls it with one row, the self-check with more). */
TARGET void gemv_bf16_packed(const uint16_t *x, long x_stride, const uint32_t *w, uint16_t *out, long out_stride,
                             long rows, long n, long k, float *scratch, int threads) {
    for (long r = 0; r < rows; r++)
        for (long i = 0; i < k; i++) ((uint32_t *)scratch)[r * k + i] = (uint32_t)x[r * x_stride + i] << 16;
    long blocks = n / OUT_BLOCK, stride = (k / 2) * OUT_BLOCK;
#pragma omp parallel num_threads(threads)
    {
        int team = omp_get_num_threads(), me = omp_get_thread_num();
        long first = blocks * me / team, last = blocks * (me + 1) / team;
        unsigned int csr = _mm_getcsr();
        _mm_setcsr(csr | 0x8040); /* FTZ and DAZ, as AMX computes */
        for (long b = first; b < last; b += 2) {
            for (long r = 0; r < rows; r++) {
                uint16_t *dst = out + r * out_stride + b * OUT_BLOCK;
                if (b + 1 < last)
                    blocks_row(w + b * stride, stride, scratch + r * k, k, dst, 2);
                else
                    blocks_row(w + b * stride, stride, scratch + r * k, k, dst, 1);
            }
        }
        _mm_setcsr(csr);
    }
}
#endif
