/* One bf16 Llama layer over quantized weights for a decode step's rows (each one sequence's new token,
 * up to 16) in one C call (kernels/quant_layer.py).
 *
 * At SmolLM2's size a token's int4 weights take ~3 ms to read, and the Python, dispatch and SDPA
 * set-up around a layer's ~10 ops cost as much again (for 16 sequences, 16 SDPA calls a layer). Here
 * the layer runs in C: the norms, RoPE with the K/V writes and SiLU·mul are native_kernels.c's own
 * functions (their addresses handed in, so the same code as the fused Python path), the matmuls
 * quant_kernels.c's `quant_matmul` (or quant_amx_int.c's tiles for several rows: the same bits), and
 * attention for each row's query over its sequence's K/V rows (a span of the pools, or rows listed by
 * its block table) is computed here in float32 (scores 16 keys at a time, max, ATen's vectorised exp,
 * sums), rounded to bf16 once, where SDPA rounds in its own places: this layer is checked against the
 * decoder's layer over the same kernel set within a tolerance, not bit for bit. Every step is row by
 * row, so a sequence's bits are the same whichever rows decode beside it.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#include <omp.h>

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vnni")))

typedef void (*norm_fn)(const void *, const void *, void *, const void *, void *, long, long, float, int, int,
                        float *, float *);
typedef void (*rope_fn)(const void *, long, const void *, const void *, void *, void *, void *, const int64_t *,
                        long, long, long, long, int);
typedef void (*silu_fn)(const void *, long, const void *, long, void *, long, long, int, void *, int);

void quant_matmul(const void *x, long x_stride, int bf16, long rows, long k, const uint8_t *qweight,
                  const float *scales, const float *mins, long n, int bits, long group, void *out, long out_stride,
                  uint8_t *scratch, int threads);
long quant_row_scratch_bytes(long k, long group);
void quant_store_bf16(const float *in, uint16_t *out, long n);
TARGET __m128 quant_lane_sums4(__m512 a, __m512 b, __m512 c, __m512 d);

/* A quantized matrix (format.py's QuantWeight), as quant_layer.py's QuantMatrix mirrors it. */
struct quant_matrix {
    const uint8_t *qweight;
    const float *scales, *mins; /* mins NULL when absent */
    long n, k, bits, group;
    long amx_from; /* the step's rows from which its sums come from AMX tiles, where they run (spec.cpu_amx_rows) */
};

struct quant_layer_weights {
    const void *input_norm, *post_norm; /* bf16 [hidden] */
    struct quant_matrix qkv, o, gate_up, down;
    void *k_pool, *v_pool; /* bf16 [slots][kv_heads][dim] */
};

/* What every layer of one decode step shares (quant_layer.py's QuantLayerStep): `count` rows, each
 * one sequence's new token. */
struct quant_layer_step {
    void *norm, *rope, *silu, *exp_fn;
    int exp_width, lanes, threads, hidden, heads, kv_heads, dim, intermediate;
    float eps, scale;
    const void *cos, *sin_folded; /* bf16 [count][dim], each row's */
    const int64_t *slot;          /* [count]: where each row's K/V go */
    long count, max_len;          /* rows; the most K/V rows one of them reads */
    const long *starts, *lens;    /* row r's K/V rows, contiguous in the pools from starts[r] */
    const int64_t *const *rows;   /* or, where rows[r] is not NULL, its lens[r] K/V rows in order */
    void *amx_matmul;             /* quant_amx_int.c's quant_matmul_amx where it may run, else NULL */
    uint8_t *amx_scratch;         /* its scratch (quant_amx_int_scratch bytes), 64-byte aligned */
    uint8_t *scratch;             /* quant_layer_scratch_bytes() */
};

static long align64(long bytes) { return (bytes + 63) & ~63L; }

static long matmul_scratch(const struct quant_layer_step *s) {
    long widest = s->intermediate > s->hidden ? s->intermediate : s->hidden;
    return align64(s->count * quant_row_scratch_bytes(widest, 16));
}

long quant_layer_scratch_bytes(const struct quant_layer_step *s) {
    long q = (long)s->heads * s->dim, kv = (long)s->kv_heads * s->dim;
    long bf16 = 2 * s->count * (3L * s->hidden + (q + 2 * kv) + 2 * q + 3L * s->intermediate);
    long floats = 4 * (2L * s->hidden + (long)s->threads * (s->max_len + s->dim + 16));
    return align64(bf16) + align64(floats) + matmul_scratch(s) + 4 * 64;
}

/* 16 bf16 values widened to float32. */
TARGET static inline __m512 load16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

typedef __m512 (*exp16_fn)(__m512);
typedef __m256 (*exp8_fn)(__m256);

/* scores[i] = exp(scores[i] - best) for i < len, `width` at a time with ATen's vectorised exp (Sleef's),
 * the tail with expf; returns their sum. */
TARGET static float exp_scores(float *scores, long len, float best, void *exp_fn, int width) {
    long t = 0;
    __m512 total16 = _mm512_setzero_ps();
    __m256 total8 = _mm256_setzero_ps();
    if (exp_fn && width == 16)
        for (; t + 16 <= len; t += 16) {
            __m512 e = ((exp16_fn)exp_fn)(_mm512_sub_ps(_mm512_loadu_ps(scores + t), _mm512_set1_ps(best)));
            _mm512_storeu_ps(scores + t, e);
            total16 = _mm512_add_ps(total16, e);
        }
    else if (exp_fn && width == 8)
        for (; t + 8 <= len; t += 8) {
            __m256 e = ((exp8_fn)exp_fn)(_mm256_sub_ps(_mm256_loadu_ps(scores + t), _mm256_set1_ps(best)));
            _mm256_storeu_ps(scores + t, e);
            total8 = _mm256_add_ps(total8, e);
        }
    float eight[8];
    _mm256_storeu_ps(eight, total8);
    float total = _mm512_reduce_add_ps(total16);
    for (int i = 0; i < 8; i++) total += eight[i];
    for (; t < len; t++) {
        scores[t] = expf(scores[t] - best);
        total += scores[t];
    }
    return total;
}

/* One head's softmax(q · kᵀ * scale) · v over `len` K/V rows (pool rows start.. or rows[]), dim = 16 * DV
 * (DV a constant once inlined, so q and the output stay in registers): scores 16 keys at a time with one
 * transposed sum, exp vectorised, values accumulated in float32, rounded to bf16 once. */
TARGET static inline __attribute__((always_inline)) void attend_head(const uint16_t *qh, const uint16_t *k_pool,
                                                                    const uint16_t *v_pool, long start, long len,
                                                                    const int64_t *rows, long row_width, float scale,
                                                                    float *scores, float *acc_out, void *exp_fn,
                                                                    int width, uint16_t *out, const int DV) {
    __m512 q[16], acc[16];
#pragma GCC unroll 16
    for (int d = 0; d < 16; d++) { /* (all 16 set, so no lane is read unset whatever DV is) */
        q[d] = d < DV ? load16(qh + 16 * d) : _mm512_setzero_ps();
        acc[d] = _mm512_setzero_ps();
    }
    float best = -INFINITY;
    for (long t0 = 0; t0 < len; t0 += 16) {
        __m512 dots[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) {
            long t = t0 + i < len ? t0 + i : len - 1; /* (past the end: a repeat, never stored) */
            const uint16_t *kt = k_pool + (rows ? rows[t] : start + t) * row_width;
            __m512 sum = _mm512_mul_ps(q[0], load16(kt));
#pragma GCC unroll 16
            for (int d = 1; d < DV; d++) sum = _mm512_fmadd_ps(q[d], load16(kt + 16 * d), sum);
            dots[i] = sum;
        }
        __m512 all = _mm512_castps128_ps512(quant_lane_sums4(dots[0], dots[1], dots[2], dots[3]));
        all = _mm512_insertf32x4(all, quant_lane_sums4(dots[4], dots[5], dots[6], dots[7]), 1);
        all = _mm512_insertf32x4(all, quant_lane_sums4(dots[8], dots[9], dots[10], dots[11]), 2);
        all = _mm512_insertf32x4(all, quant_lane_sums4(dots[12], dots[13], dots[14], dots[15]), 3);
        all = _mm512_mul_ps(all, _mm512_set1_ps(scale));
        __mmask16 keep = len - t0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (len - t0)) - 1);
        _mm512_mask_storeu_ps(scores + t0, keep, all);
        float chunk_best = _mm512_mask_reduce_max_ps(keep, all);
        best = chunk_best > best ? chunk_best : best;
    }
    float total = exp_scores(scores, len, best, exp_fn, width);
    for (long t = 0; t < len; t++) {
        const uint16_t *vt = v_pool + (rows ? rows[t] : start + t) * row_width;
        __m512 p = _mm512_set1_ps(scores[t]);
#pragma GCC unroll 16
        for (int d = 0; d < DV; d++) acc[d] = _mm512_fmadd_ps(p, load16(vt + 16 * d), acc[d]);
    }
    __m512 inverse = _mm512_set1_ps(1.0f / total);
#pragma GCC unroll 16
    for (int d = 0; d < DV; d++) _mm512_storeu_ps(acc_out + 16 * d, _mm512_mul_ps(acc[d], inverse));
    quant_store_bf16(acc_out, out, 16L * DV);
}

/* softmax(q · kᵀ * scale) · v for one query, per head, over pool rows [start, start + len), or over
 * rows[0..len) when `rows` is not NULL; dim a multiple of 16, at most 256. `exp_fn`: ATen's vectorised exp,
 * `width` floats at a time (the C set's, as its SiLU·mul uses). */
TARGET void quant_attend_bf16(const uint16_t *q, const uint16_t *k_pool, const uint16_t *v_pool, long start, long len,
                              const int64_t *rows, int heads, int kv_heads, int dim, float scale, uint16_t *out,
                              float *buf, void *exp_fn, int width, int threads) {
    int group = heads / kv_heads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int h = 0; h < heads; h++) {
        float *scores = buf + (long)omp_get_thread_num() * (len + dim + 16), *acc = scores + len;
        const uint16_t *qh = q + (long)h * dim;
        const uint16_t *kh = k_pool + (long)(h / group) * dim, *vh = v_pool + (long)(h / group) * dim;
        long row_width = (long)kv_heads * dim;
        uint16_t *oh = out + (long)h * dim;
        switch (dim / 16) { /* the usual head sizes with q and the output in registers */
            case 4:
                attend_head(qh, kh, vh, start, len, rows, row_width, scale, scores, acc, exp_fn, width, oh, 4);
                break;
            case 8:
                attend_head(qh, kh, vh, start, len, rows, row_width, scale, scores, acc, exp_fn, width, oh, 8);
                break;
            default: /* (dim at most 256: quant_layer.py) */
                attend_head(qh, kh, vh, start, len, rows, row_width, scale, scores, acc, exp_fn, width, oh, dim / 16);
                break;
        }
    }
}

typedef int (*amx_matmul_fn)(const uint16_t *, long, long, long, const uint8_t *, const float *, const float *, long,
                             int, long, uint16_t *, long, uint8_t *, int);

/* out = x @ W.T for the step's rows: by AMX tiles from their row counts where they may run (the same bits
 * as the VNNI kernel's, which runs elsewhere). */
static void matmul(const struct quant_matrix *m, const uint16_t *x, uint16_t *out, const struct quant_layer_step *s,
                   uint8_t *scratch) {
    if (s->amx_matmul && s->count >= m->amx_from &&
        ((amx_matmul_fn)s->amx_matmul)(x, m->k, s->count, m->k, m->qweight, m->scales, m->mins, m->n, (int)m->bits,
                                       m->group, out, m->n, s->amx_scratch, s->threads) == 0)
        return;
    quant_matmul(x, m->k, 1, s->count, m->k, m->qweight, m->scales, m->mins, m->n, (int)m->bits, m->group, out, m->n,
                 scratch, s->threads);
}

/* One layer for the step's rows: new_hidden = hidden + delta (delta may be NULL); h = new_hidden +
 * o(attention(norm(new_hidden))); out_hidden = h, out_delta = down(silu(gate) * up) of norm(h): the
 * decoder's (hidden, delta). Each row's attention reads its own sequence's K/V, and every other step
 * works row by row, so a row's results do not depend on the rows beside it. */
TARGET void quant_decode_layer(const struct quant_layer_weights *w, const struct quant_layer_step *s,
                               const uint16_t *hidden, const uint16_t *delta, uint16_t *out_hidden,
                               uint16_t *out_delta) {
    long n = s->count;
    long q_size = (long)s->heads * s->dim, kv_size = (long)s->kv_heads * s->dim, qkv_size = q_size + 2 * kv_size;
    uint8_t *base = (uint8_t *)(((uintptr_t)s->scratch + 63) & ~(uintptr_t)63);
    uint16_t *summed = (uint16_t *)base, *normed = summed + n * s->hidden, *o_out = normed + n * s->hidden;
    uint16_t *qkv = o_out + n * s->hidden, *q = qkv + n * qkv_size, *attn = q + n * q_size;
    uint16_t *gate_up = attn + n * q_size, *act = gate_up + 2L * n * s->intermediate;
    long bf16_bytes = 2 * n * (3L * s->hidden + qkv_size + 2 * q_size + 3L * s->intermediate);
    float *floats = (float *)(base + align64(bf16_bytes));
    float *norm_scratch = floats, *attn_buf = floats + 2L * s->hidden;
    long float_bytes = 4 * (2L * s->hidden + (long)s->threads * (s->max_len + s->dim + 16));
    uint8_t *mm = (uint8_t *)floats + align64(float_bytes);
    norm_fn norm = (norm_fn)s->norm;

    norm(hidden, delta, summed, w->input_norm, normed, n, s->hidden, s->eps, 1, s->lanes, norm_scratch,
         norm_scratch + s->hidden);
    matmul(&w->qkv, normed, qkv, s, mm);
    ((rope_fn)s->rope)(qkv, qkv_size, s->cos, s->sin_folded, q, w->k_pool, w->v_pool, s->slot, n, s->heads,
                       s->kv_heads, s->dim, 1);
    for (long r = 0; r < n; r++)
        quant_attend_bf16(q + r * q_size, (const uint16_t *)w->k_pool, (const uint16_t *)w->v_pool, s->starts[r],
                          s->lens[r], s->rows[r], s->heads, s->kv_heads, s->dim, s->scale, attn + r * q_size,
                          attn_buf, s->exp_fn, s->exp_width, s->threads);
    matmul(&w->o, attn, o_out, s, mm);
    norm(summed, o_out, out_hidden, w->post_norm, normed, n, s->hidden, s->eps, 1, s->lanes, norm_scratch,
         norm_scratch + s->hidden);
    matmul(&w->gate_up, normed, gate_up, s, mm);
    ((silu_fn)s->silu)(gate_up, 2L * s->intermediate, gate_up + s->intermediate, 2L * s->intermediate, act, n,
                       s->intermediate, 1, s->exp_fn, s->exp_width);
    matmul(&w->down, act, out_delta, s, mm);
}
#endif
