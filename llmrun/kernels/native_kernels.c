/* Fused CPU kernels for the decode step's small ops, bit-identical to the ATen ops they replace.
 *
 * Built by kernels/native.py with the system C compiler (-O2 -ffp-contract=off: no fused
 * multiply-adds, so every product and sum is rounded where ATen rounds it), and used only after a
 * self-check against ATen on the model's shapes. Tensors are contiguous; dtype 0 is float32,
 * 1 is bfloat16 (values computed in float32 and rounded to nearest even, as ATen does).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float load(const void *p, long i, int dtype) {
    return dtype ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* The value as stored in `dtype` (a bf16 result is rounded), returned as float. */
static inline float rounded(float v, int dtype) {
    return dtype ? bf16_to_f32(f32_to_bf16(v)) : v;
}

static inline void store(void *p, long i, float v, int dtype) {
    if (dtype) ((uint16_t *)p)[i] = f32_to_bf16(v);
    else ((float *)p)[i] = v;
}

#define MAX_LANES 16

static int ceil_log2(long x) {
    if (x <= 2) return 1;
    int bits = 0;
    for (unsigned long v = (unsigned long)(x - 1); v; v >>= 1) bits++;
    return bits;
}

/* Sum of sq[0..n) in ATen's order for a contiguous inner reduction (cascade_sum): vectors of
 * `lanes` floats, four interleaved partial sums over them with a 4-level cascade, the scalar tail,
 * then the lanes added one by one. */
static float aten_sum(const float *sq, long n, int lanes) {
    enum { ILP = 4, LEVELS = 4 };
    float acc[LEVELS][ILP][MAX_LANES];
    memset(acc, 0, sizeof(acc));
    long nvec = n / lanes, size = nvec / ILP;
    int power = ceil_log2(size) / LEVELS;
    if (power < 4) power = 4;
    long step = 1L << power, mask = step - 1;
    long i = 0;
    while (i + step <= size) {
        for (long j = 0; j < step; ++j, ++i)
            for (int k = 0; k < ILP; ++k)
                for (int l = 0; l < lanes; ++l) acc[0][k][l] += sq[(i * ILP + k) * lanes + l];
        for (int j = 1; j < LEVELS; ++j) {
            for (int k = 0; k < ILP; ++k)
                for (int l = 0; l < lanes; ++l) {
                    acc[j][k][l] += acc[j - 1][k][l];
                    acc[j - 1][k][l] = 0.0f;
                }
            if ((i & (mask << (j * power))) != 0) break;
        }
    }
    for (; i < size; ++i)
        for (int k = 0; k < ILP; ++k)
            for (int l = 0; l < lanes; ++l) acc[0][k][l] += sq[(i * ILP + k) * lanes + l];
    for (int j = 1; j < LEVELS; ++j)
        for (int k = 0; k < ILP; ++k)
            for (int l = 0; l < lanes; ++l) acc[0][k][l] += acc[j][k][l];
    for (long v = size * ILP; v < nvec; ++v)
        for (int l = 0; l < lanes; ++l) acc[0][0][l] += sq[v * lanes + l];
    for (int k = 1; k < ILP; ++k)
        for (int l = 0; l < lanes; ++l) acc[0][0][l] += acc[0][k][l];
    float total = 0.0f;
    for (long e = nvec * lanes; e < n; ++e) total += sq[e];
    for (int l = 0; l < lanes; ++l) total += acc[0][0][l];
    return total;
}

/* For each of `rows` rows of n: h = hidden (+ delta when delta is not NULL), written to new_hidden
 * (when not NULL); out = weight * round(h * rsqrt(mean(h^2) + eps)), as transformers' RMSNorm.
 * `scratch` and `sq` hold n floats each; lanes is 1..MAX_LANES (checked by the caller). */
void add_rms_norm(const void *hidden, const void *delta, void *new_hidden, const void *weight, void *out,
                  long rows, long n, float eps, int dtype, int lanes, float *scratch, float *sq) {
    for (long r = 0; r < rows; ++r) {
        long base = r * n;
        for (long e = 0; e < n; ++e) {
            float h = load(hidden, base + e, dtype);
            if (delta) h = rounded(h + load(delta, base + e, dtype), dtype);
            if (new_hidden) store(new_hidden, base + e, h, dtype);
            scratch[e] = h;
            sq[e] = h * h;
        }
        float mean = aten_sum(sq, n, lanes) / (float)n;
        float scale = 1.0f / sqrtf(mean + eps);
        for (long e = 0; e < n; ++e) {
            float normed = rounded(scratch[e] * scale, dtype);
            store(out, base + e, load(weight, e, dtype) * normed, dtype);
        }
    }
}

/* RoPE on q and k, straight from the fused qkv projection, and the K/V cache writes.
 * qkv: [tokens, qkv_stride] with q heads, then kv heads of k, then of v, each `dim` wide;
 * cos, sin_folded: [tokens, dim] (sin_folded = (-sin, sin) halves); q_out: [tokens, q_heads, dim];
 * k_pool, v_pool: [slots, kv_heads, dim], row t written at slots[t].
 * x' = x * cos + roll(x, dim / 2) * sin_folded, each product and the sum rounded as ATen does. */
void rope_qkv(const void *qkv, long qkv_stride, const void *cos, const void *sin_folded, void *q_out,
              void *k_pool, void *v_pool, const int64_t *slots, long tokens, long q_heads, long kv_heads,
              long dim, int dtype) {
    long half = dim / 2;
    for (long t = 0; t < tokens; ++t) {
        const char *row = (const char *)qkv;
        long row_base = t * qkv_stride;
        for (long h = 0; h < q_heads + kv_heads; ++h) {
            long in = row_base + h * dim;
            void *dst = h < q_heads ? q_out : k_pool;
            long at = h < q_heads ? (t * q_heads + h) * dim : (slots[t] * kv_heads + (h - q_heads)) * dim;
            for (long e = 0; e < dim; ++e) {
                float x = load(row, in + e, dtype);
                float rolled = load(row, in + (e < half ? e + half : e - half), dtype);
                float a = rounded(x * load(cos, t * dim + e, dtype), dtype);
                float b = rounded(rolled * load(sin_folded, t * dim + e, dtype), dtype);
                store(dst, at + e, a + b, dtype);
            }
        }
        long v_in = row_base + (q_heads + kv_heads) * dim;
        long v_at = slots[t] * kv_heads * dim;
        size_t width = dtype ? 2 : 4;
        memcpy((char *)v_pool + v_at * width, row + v_in * width, (size_t)(kv_heads * dim) * width);
    }
}

/* SiLU(gate) * up for rows of n, as ATen computes `F.silu(gate) * up`: silu = g / (1 + exp(-g))
 * with ATen's own vectorised exp (`exp_fn`, Sleef's, taken from libtorch: `width` floats at a time;
 * the n % width tail uses expf like ATen's scalar path), rounded to the dtype, then the product,
 * rounded again. gate and up rows are `gate_stride` / `up_stride` elements apart; out is [rows, n].
 * `scratch` holds `width` floats. */
#if defined(__x86_64__)
#include <immintrin.h>

typedef __m512 (*exp16_fn)(__m512);
typedef __m256 (*exp8_fn)(__m256);

__attribute__((target("avx512f"))) static void exp_block16(const float *in, float *out, void *fn) {
    _mm512_storeu_ps(out, ((exp16_fn)fn)(_mm512_loadu_ps(in)));
}

__attribute__((target("avx2"))) static void exp_block8(const float *in, float *out, void *fn) {
    _mm256_storeu_ps(out, ((exp8_fn)fn)(_mm256_loadu_ps(in)));
}

void silu_mul(const void *gate, long gate_stride, const void *up, long up_stride, void *out, long rows, long n,
              int dtype, void *exp_fn, int width) {
    float neg[16], ex[16];
    for (long r = 0; r < rows; ++r) {
        long g0 = r * gate_stride, u0 = r * up_stride, o0 = r * n, e = 0;
        for (; e + width <= n; e += width) {
            for (int l = 0; l < width; ++l) neg[l] = -load(gate, g0 + e + l, dtype);
            if (width == 16) exp_block16(neg, ex, exp_fn);
            else exp_block8(neg, ex, exp_fn);
            for (int l = 0; l < width; ++l) {
                float g = -neg[l];
                float silu = rounded(g / (1.0f + ex[l]), dtype);
                store(out, o0 + e + l, silu * load(up, u0 + e + l, dtype), dtype);
            }
        }
        for (; e < n; ++e) {
            float g = load(gate, g0 + e, dtype);
            float silu = rounded(g / (1.0f + expf(-g)), dtype);
            store(out, o0 + e, silu * load(up, u0 + e, dtype), dtype);
        }
    }
}
#endif
