/* One float32 decoder layer for one token in one C call, bit-identical to the ATen ops it replaces.
 *
 * A float32 decode step on a CPU spends ~4 ms a token outside its matmuls: ~10 Python-level ops
 * a layer, each paying its dispatch, plus SDPA's setup. Here a whole Llama layer runs in C:
 * - the matmuls call the BLAS `sgemm_` that ATen calls (MKL's, taken from libtorch), with the
 *   arguments ATen passes for `F.linear` on one row, so they are the same function on the same data;
 * - norms, RoPE and SiLU·mul are native_kernels.c's (ATen's orders);
 * - attention follows ATen's CPU flash-attention kernel for a single query: per head, blocks of
 *   512 keys; q·kᵀ and p·v through the same `sgemm_` calls it makes; scaling and the running max;
 *   exp_u20 (ATen's fast exp, the same FMA steps) summed in 16 lanes, then the lanes added by
 *   halves as ATen's AVX-512 `vec_reduce_all`, the tail as a double exp rounded to float; the
 *   running sum's rescale as one FMA (ATen's build contracts it); the output scaled by 1 / sum.
 *   Heads run on ATen's OpenMP threads split as `at::parallel_for` splits them, each with its own
 *   buffer at the offset ATen's would have, and MKL inside that parallel region runs one thread, as
 *   it does in ATen (called outside it, MKL's two threads sum p·v in another order).
 * kernels/native_layer.py checks the attention against SDPA, and NativeLayer.agrees a whole
 * layer against the fused Python path, before use (AVX-512 CPUs with libtorch's MKL only).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#include <omp.h>

#define KV_SPLIT 512   /* keys per block in ATen's flash attention */
#define LANES 16       /* floats per AVX-512 vector */
#define TARGET __attribute__((target("avx512f")))

typedef void (*sgemm_fn)(const char *transa, const char *transb, const int *m, const int *n, const int *k,
                         const float *alpha, const float *a, const int *lda, const float *b, const int *ldb,
                         const float *beta, float *c, const int *ldc);

void add_rms_norm(const void *hidden, const void *delta, void *new_hidden, const void *weight, void *out,
                  long rows, long n, float eps, int dtype, int lanes, float *scratch, float *sq);
void rope_qkv(const void *qkv, long qkv_stride, const void *cos, const void *sin_folded, void *q_out,
              void *k_pool, void *v_pool, const int64_t *slots, long tokens, long q_heads, long kv_heads,
              long dim, int dtype);
void silu_mul(const void *gate, long gate_stride, const void *up, long up_stride, void *out, long rows, long n,
              int dtype, void *exp_fn, int width);

int layer_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
}

/* c[m] = op(a) · b, as column-major BLAS sees it, with beta 0 or 1. */
static void sgemm_col(sgemm_fn sgemm, char trans_a, int m, int k, const float *a, int lda, const float *b,
                      float beta, float *c) {
    const float one = 1.0f;
    const int n = 1, ldb = k, ldc = m;
    char no = 'N';
    sgemm(&trans_a, &no, &m, &n, &k, &one, a, &lda, b, &ldb, &beta, c, &ldc);
}

/* y[n] = w[n, k] · x[k]: ATen's `F.linear` on one contiguous row calls sgemm_("T", "N", n, 1, k, 1,
 * w, k, x, k, 0, y, n). */
static void linear_row(sgemm_fn sgemm, const float *w, const float *x, float *y, int n, int k) {
    sgemm_col(sgemm, 'T', n, k, w, k, x, 0.0f, y);
}

/* ATen's Vectorized<float>::exp_u20 on AVX-512: the same operations in the same order. */
TARGET static inline __m512 exp_u20(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512 log2e = _mm512_castsi512_ps(_mm512_set1_epi32(0x3fb8aa3b));
    const __m512 ln2 = _mm512_castsi512_ps(_mm512_set1_epi32(0x3f317218));
    const __m512 ln_min = _mm512_castsi512_ps(_mm512_set1_epi32((int)0xc2aeac50));
    const __m512 ln_max = _mm512_castsi512_ps(_mm512_set1_epi32(0x42b17218));
    __mmask16 underflow = _mm512_cmp_ps_mask(x, ln_min, _CMP_LT_OS);
    __m512 src = _mm512_max_ps(_mm512_min_ps(x, ln_max), ln_min);
    __m512 fx = _mm512_fmadd_ps(src, log2e, _mm512_set1_ps(0.5f));
    fx = _mm512_cvtepi32_ps(_mm512_cvt_roundps_epi32(fx, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
    __m512 r = _mm512_fnmadd_ps(fx, ln2, src);
    __m512 poly = _mm512_fmadd_ps(r, _mm512_set1_ps(0.00828929059f), _mm512_set1_ps(0.0418978221f));
    poly = _mm512_fmadd_ps(r, poly, _mm512_set1_ps(0.166676521f));
    poly = _mm512_fmadd_ps(r, poly, _mm512_set1_ps(0.499991506f));
    poly = _mm512_fmadd_ps(r, poly, _mm512_set1_ps(0.999999701f));
    poly = _mm512_fmadd_ps(r, poly, one);
    __m512i exponent = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_sub_ps(fx, one)), _mm512_set1_epi32(127));
    __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(exponent, 23));
    scale = _mm512_mask_blend_ps(underflow, scale, _mm512_setzero_ps());
    return _mm512_mul_ps(_mm512_mul_ps(poly, scale), _mm512_set1_ps(2.0f));
}

/* a[i] = exp(a[i] - max) for i < size; returns their sum: 16 lanes over whole vectors, the lanes
 * added by halves (lane i + lane i^8, then ^4, ^2, ^1), then the tail one by one. ATen's scalar
 * tail rounds a double exp to float (glibc's expf differs from that in rare last bits). */
TARGET static float exp_sum(float *a, long size, float max) {
    __m512 acc = _mm512_setzero_ps(), vmax = _mm512_set1_ps(max);
    long end = size - size % LANES, i = 0;
    for (; i < end; i += LANES) {
        __m512 e = exp_u20(_mm512_sub_ps(_mm512_loadu_ps(a + i), vmax));
        acc = _mm512_add_ps(acc, e);
        _mm512_storeu_ps(a + i, e);
    }
    float lanes[LANES];
    _mm512_storeu_ps(lanes, acc);
    for (int width = LANES / 2; width >= 1; width /= 2)
        for (int l = 0; l < width; ++l) lanes[l] = lanes[l] + lanes[l + width];
    float sum = lanes[0];
    for (; i < size; ++i) {
        float e = (float)exp((double)(a[i] - max));
        sum += e;
        a[i] = e;
    }
    return sum;
}

/* a[i] *= scale; returns the largest (NaN if any is NaN, as ATen's guard gives). */
static float scale_max(float *a, long size, float scale) {
    float max = -INFINITY;
    int nan = 0;
    for (long i = 0; i < size; ++i) {
        a[i] *= scale;
        if (a[i] != a[i]) nan = 1;
        else if (a[i] > max) max = a[i];
    }
    return nan ? NAN : max;
}

/* One query head over keys/values rows [0, len) (`row` floats apart), as ATen's flash kernel
 * computes it; `buf` holds min(len, 512) + 2 + dim floats (scores, max, sum, accumulator). */
static void attend_head(sgemm_fn sgemm, const float *q, const float *keys, const float *values, long len,
                        int row, int dim, float scale, float *out, float *buf) {
    long split = len < KV_SPLIT ? len : KV_SPLIT;
    float *scores = buf, *max = buf + split, *sum = max + 1, *acc = sum + 1;
    *max = -INFINITY;
    *sum = 0.0f;
    for (long n = 0; n < len; n += split) {
        int block = (int)(len - n < split ? len - n : split);
        sgemm_col(sgemm, 'T', block, dim, keys + n * row, row, q, 0.0f, scores);
        float block_max = scale_max(scores, block, scale);
        float new_max = *max > block_max ? *max : block_max;
        if (new_max == -INFINITY) {
            memset(scores, 0, sizeof(float) * (size_t)block);
        } else {
            float block_sum = exp_sum(scores, block, new_max);
            float rescale = expf(*max - new_max);
            *sum = fmaf(rescale, *sum, block_sum);  /* contracted to one FMA in ATen's build */
            *max = new_max;
            if (n > 0)
                for (int e = 0; e < dim; ++e) acc[e] *= rescale;
        }
        sgemm_col(sgemm, 'N', dim, block, values + n * row, row, scores, n == 0 ? 0.0f : 1.0f, acc);
    }
    float reciprocal = 1.0f / (*sum == 0.0f ? 1.0f : *sum);
    for (int e = 0; e < dim; ++e) out[e] = acc[e] * reciprocal;
}

/* Attention of one token's q [heads, dim] over pool rows [start, start + len) of k_pool, v_pool
 * [slots, kv_heads, dim] into out [heads, dim]; heads split over `threads` as at::parallel_for
 * splits them, thread t using buf + t * (min(len, 512) + 2 + dim). */
void attend_one_f32(sgemm_fn sgemm, const float *q, const float *k_pool, const float *v_pool, long start, long len,
                    int heads, int kv_heads, int dim, float scale, float *out, float *buf, int threads) {
    long per_thread = (len < KV_SPLIT ? len : KV_SPLIT) + 2 + dim;
    int row = kv_heads * dim, group = heads / kv_heads;
    const float *keys = k_pool + start * row, *values = v_pool + start * row;
    if (threads > heads) threads = heads;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int count = omp_get_num_threads(), tid = omp_get_thread_num();
        int chunk = (heads + count - 1) / count;
        for (int h = tid * chunk; h < heads && h < (tid + 1) * chunk; ++h) {
            int kv = h / group;
            attend_head(sgemm, q + h * dim, keys + kv * dim, values + kv * dim, len, row, dim, scale, out + h * dim,
                        buf + tid * per_thread);
        }
    }
}

/* What one layer needs: its weights and K/V pools (set per layer), and the step (set per step).
 * native_layer.py mirrors both structs (LayerWeights, LayerStep). */
struct layer_weights {
    const float *input_norm, *qkv, *o, *post_norm, *gate_up, *down;
    float *k_pool, *v_pool;
};

struct layer_step {
    sgemm_fn sgemm;
    void *exp_fn;          /* ATen's vectorised exp (Sleef's), for SiLU */
    int exp_width, lanes, threads;
    int hidden, heads, kv_heads, dim, intermediate;
    float eps, scale;
    const float *cos, *sin_folded;  /* this token's RoPE row */
    const int64_t *slot;            /* where this token's K/V go */
    long span_start, span_len;      /* the sequence's contiguous K/V rows, this token's included */
    const int64_t *rows;            /* or, when not NULL, its span_len K/V rows in order (a block table's) */
    float *scratch;                 /* layer_scratch_floats() floats, 64-byte aligned */
};

static long aligned(long floats) { return (floats + 15) / 16 * 16; }

long layer_scratch_floats(const struct layer_step *s) {
    long qkv = (long)(s->heads + 2 * s->kv_heads) * s->dim, attn = (long)s->heads * s->dim;
    long attend = (long)s->threads * ((s->span_len < KV_SPLIT ? s->span_len : KV_SPLIT) + 2 + s->dim);
    long gathered = s->rows ? 2 * aligned(s->span_len * s->kv_heads * s->dim) : 0;
    return 4 * aligned(s->hidden) + aligned(qkv) + 2 * aligned(attn) + aligned(2L * s->intermediate) +
           aligned(s->intermediate) + aligned(attend) + gathered;
}

/* hidden_out = hidden + delta (delta NULL: hidden), and through the layer: as LlamaDecoder.layer over the fused
 * kernels leaves them, hidden_out holds the stream after attention and delta_out the MLP's output, not yet
 * added. hidden and hidden_out may be the same; delta and delta_out too. */
void decode_layer_f32(const struct layer_weights *w, const struct layer_step *s, const float *hidden,
                      const float *delta, float *hidden_out, float *delta_out) {
    int size = s->hidden, qkv_size = (s->heads + 2 * s->kv_heads) * s->dim, attn_size = s->heads * s->dim;
    float *x = s->scratch, *norm_scratch = x + aligned(size), *o = norm_scratch + 2 * aligned(size);
    float *qkv = o + aligned(size), *q = qkv + aligned(qkv_size), *attn = q + aligned(attn_size);
    float *gate_up = attn + aligned(attn_size), *act = gate_up + aligned(2L * s->intermediate);
    float *attend_buf = act + aligned(s->intermediate);
    if (delta == NULL && hidden_out != hidden) memcpy(hidden_out, hidden, sizeof(float) * (size_t)size);
    add_rms_norm(hidden, delta, delta ? hidden_out : NULL, w->input_norm, x, 1, size, s->eps, 0, s->lanes,
                 norm_scratch, norm_scratch + size);
    linear_row(s->sgemm, w->qkv, x, qkv, qkv_size, size);
    rope_qkv(qkv, qkv_size, s->cos, s->sin_folded, q, w->k_pool, w->v_pool, s->slot, 1, s->heads, s->kv_heads,
             s->dim, 0);
    if (s->rows) {  /* keys and values gathered in order, as ATen's path gathers them: the same sums */
        long row = (long)s->kv_heads * s->dim;
        long attend = (long)s->threads * ((s->span_len < KV_SPLIT ? s->span_len : KV_SPLIT) + 2 + s->dim);
        float *keys = attend_buf + aligned(attend), *values = keys + aligned(s->span_len * row);
        for (long t = 0; t < s->span_len; ++t) {
            memcpy(keys + t * row, w->k_pool + s->rows[t] * row, sizeof(float) * (size_t)row);
            memcpy(values + t * row, w->v_pool + s->rows[t] * row, sizeof(float) * (size_t)row);
        }
        attend_one_f32(s->sgemm, q, keys, values, 0, s->span_len, s->heads, s->kv_heads, s->dim, s->scale, attn,
                       attend_buf, s->threads);
    } else {
        attend_one_f32(s->sgemm, q, w->k_pool, w->v_pool, s->span_start, s->span_len, s->heads, s->kv_heads, s->dim,
                       s->scale, attn, attend_buf, s->threads);
    }
    linear_row(s->sgemm, w->o, attn, o, size, attn_size);
    add_rms_norm(hidden_out, o, hidden_out, w->post_norm, x, 1, size, s->eps, 0, s->lanes, norm_scratch,
                 norm_scratch + size);
    linear_row(s->sgemm, w->gate_up, x, gate_up, 2 * s->intermediate, size);
    silu_mul(gate_up, 2L * s->intermediate, gate_up + s->intermediate, 2L * s->intermediate, act, 1,
             s->intermediate, 0, s->exp_fn, s->exp_width);
    linear_row(s->sgemm, w->down, act, delta_out, size, s->intermediate);
}
#endif
