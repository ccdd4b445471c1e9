/* kiapi's CPU matrix products on MLX-quantized weights (affine: w = scale * q + bias).
 *
 * MLX's CPU backend multiplies quantized matrices one scalar at a time on one thread; this
 * file is what kiapi runs instead for the chat engine's weights on the CPU. It is compiled
 * at run time by the machine's C compiler for the machine's own instruction set
 * (kiapi/runtime/qmatmul.py), and called through ctypes on buffers MLX owns.
 *
 * Layout (MLX's): a matrix of N rows (outputs) by K columns (inputs) is packed row by row,
 * 32 / bits values per little-endian uint32, the first value in the lowest bits; each row has
 * K / group scales and biases (float32 here: the loader widens GGUF's float16 ones once).
 *
 *   y[m, n] = sum_k x[m, k] * (scale[n, g(k)] * q[n, k] + bias[n, g(k)])
 *           = sum_g scale[n, g] * (sum_{k in g} x[m, k] * q[n, k])
 *             + sum_g bias[n, g] * xsum[m, g]
 *
 * kiapi_qgemv computes that for a few rows of x (decoding: one row per sequence), reading
 * the packed weights once for all of them: that read is what a decode step costs. Weight
 * rows are split between threads (OpenMP). kiapi_dequantize writes the float32 matrix, for
 * products over many rows (prefill), which the BLAS then runs.
 *
 * Only bits 4 and 8 are handled, with group sizes 32, 64 or 128 (MLX's); the caller checks
 * (kiapi_supported).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_ROWS 8 /* rows of x handled per sweep over the weights */

int kiapi_supported(int bits, int group) { /* MLX's group sizes; the loops need 32/64/128 */
    return (bits == 4 || bits == 8) && (group == 32 || group == 64 || group == 128);
}

/* LANES floats, as GCC and Clang vector extensions, the width of the machine's registers:
 * 16 with AVX-512, 8 with AVX2, else 4 (SSE, NEON). A wider vector than the machine has is
 * lowered piece by piece, far slower (16 lanes on AVX2 ran the products 10x slower than 8,
 * by hand: 2.1 against 22.6 GMAC/s on one row). */
#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX2__)
#define LANES 8
#else
#define LANES 4
#endif
typedef float vf __attribute__((vector_size(LANES * 4)));

static inline __attribute__((always_inline)) vf loadv(const float *p) {
    vf v;
    memcpy(&v, p, sizeof(v));
    return v;
}

/* LANES bytes widened to LANES floats, and LANES bytes' low and high nibbles. With AVX-512
 * or AVX2 a few instructions; elsewhere plain loops (GCC 12 turned the vector-extension
 * conversion of bytes into byte-by-byte scalar code, so it is spelled out here). */
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
/* LANES bytes from p (16 with AVX-512, 8 with AVX2), and LANES bytes as floats. */
static inline __attribute__((always_inline)) __m128i load_bytes(const uint8_t *p) {
#if defined(__AVX512F__)
    return _mm_loadu_si128((const __m128i *)p);
#else
    return _mm_loadl_epi64((const __m128i *)p);
#endif
}
static inline __attribute__((always_inline)) vf to_floats(__m128i bytes) {
#if defined(__AVX512F__)
    const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
#else
    const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
#endif
    vf out;
    memcpy(&out, &f, sizeof(out));
    return out;
}
static inline __attribute__((always_inline)) vf widen(const uint8_t *p) {
    return to_floats(load_bytes(p));
}
static inline __attribute__((always_inline)) void nibbles(const uint8_t *p, vf *lo, vf *hi) {
    const __m128i bytes = load_bytes(p), mask = _mm_set1_epi8(15);
    *lo = to_floats(_mm_and_si128(bytes, mask));
    *hi = to_floats(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask));
}
#else
static inline __attribute__((always_inline)) vf widen(const uint8_t *p) {
    vf out;
    for (int j = 0; j < LANES; j++) out[j] = (float)p[j];
    return out;
}
static inline __attribute__((always_inline)) void nibbles(const uint8_t *p, vf *lo, vf *hi) {
    for (int j = 0; j < LANES; j++) {
        (*lo)[j] = (float)(p[j] & 15);
        (*hi)[j] = (float)(p[j] >> 4);
    }
}
#endif

/* The sum of the lanes as a tree (a chain of additions cost a row ~64 cycles). */
static inline __attribute__((always_inline)) float sumv(vf v) {
#if defined(__AVX512F__)
    __m512 m;
    memcpy(&m, &v, sizeof(m));
    return _mm512_reduce_add_ps(m);
#else
    float t[LANES];
    memcpy(t, &v, sizeof(t));
    for (int half = LANES / 2; half > 0; half /= 2)
        for (int j = 0; j < half; j++) t[j] += t[j + half];
    return t[0];
#endif
}

/* sum_i a[i] * b[i], LANES at a time (a row's biases against x's group sums). */
static inline __attribute__((always_inline)) float dot(const float *a, const float *b, int n) {
    vf acc = (vf){0};
    int i = 0;
    for (; i + LANES <= n; i += LANES) acc += loadv(a + i) * loadv(b + i);
    float total = sumv(acc);
    for (; i < n; i++) total += a[i] * b[i];
    return total;
}

/* One weight row's dot products with `rows` rows of x, `rows` a constant once inlined (the
 * accumulators stay in registers). The weights of each 32-value block are widened to floats
 * and scaled once, then multiplied into every row of x; two blocks at a time, into two sets
 * of accumulators, so consecutive blocks do not wait on each other's additions. The biases
 * contribute bias[g] * (sum of x over group g), added at the end.
 *
 * 4-bit: a block's 16 bytes hold its 32 values; the low nibbles are the even elements, the
 * high nibbles the odd ones, so x comes pre-split into its even and odd halves per block
 * (xs: [k / 32][16 even][16 odd]). 8-bit: byte k is element k, and x is as given. */
static inline __attribute__((always_inline)) void block_q4(
    const uint8_t *w, float s, const float *xs, const int rows, int K, vf *acc) {
    for (int part = 0; part < 16; part += LANES) {
        vf lo, hi;
        nibbles(w + part, &lo, &hi);
        lo *= s;
        hi *= s;
        for (int m = 0; m < rows; m++) {
            const float *xe = xs + (size_t)m * K + part;
            acc[m] += loadv(xe) * lo + loadv(xe + 16) * hi;
        }
    }
}

static inline __attribute__((always_inline)) void block_q8(
    const uint8_t *w, float s, const float *x, const int rows, int K, vf *acc) {
    for (int part = 0; part < 32; part += LANES) {
        const vf v = s * widen(w + part);
        for (int m = 0; m < rows; m++) acc[m] += loadv(x + (size_t)m * K + part) * v;
    }
}

#define ROW_KERNEL(name, block, bytes_per_block)                                          \
    static inline __attribute__((always_inline)) void name(                               \
        const uint8_t *w, const float *scales, const float *biases, const float *x,       \
        const float *xsum, const int rows, int K, int group, float *out, int out_stride) { \
        const int per_group = group / 32, groups = K / group;                            \
        vf even[MAX_ROWS], odd[MAX_ROWS];                                                 \
        for (int m = 0; m < rows; m++) even[m] = odd[m] = (vf){0};                        \
        if (per_group == 1) { /* group 32 (GGUF): a scale per block */                     \
            int g = 0;                                                                    \
            for (; g + 1 < groups; g += 2) {                                              \
                block(w + (size_t)g * bytes_per_block, scales[g], x + g * 32, rows, K, even); \
                block(w + (size_t)(g + 1) * bytes_per_block, scales[g + 1], x + (g + 1) * 32, \
                      rows, K, odd);                                                      \
            }                                                                             \
            if (g < groups)                                                               \
                block(w + (size_t)g * bytes_per_block, scales[g], x + g * 32, rows, K, even); \
        } else { /* 64, 128, ...: an even number of blocks per scale */                    \
            for (int g = 0; g < groups; g++)                                              \
                for (int blk = g * per_group; blk < (g + 1) * per_group; blk += 2) {      \
                    block(w + (size_t)blk * bytes_per_block, scales[g], x + blk * 32, rows, K, \
                          even);                                                          \
                    block(w + (size_t)(blk + 1) * bytes_per_block, scales[g],             \
                          x + (blk + 1) * 32, rows, K, odd);                              \
                }                                                                         \
        }                                                                                 \
        for (int m = 0; m < rows; m++) {                                                  \
            out[(size_t)m * out_stride] =                                                 \
                sumv(even[m] + odd[m]) + dot(biases, xsum + (size_t)m * groups, groups);   \
        }                                                                                 \
    }

ROW_KERNEL(row_q4, block_q4, 16)
ROW_KERNEL(row_q8, block_q8, 32)

#define ROWS_CASE(fn, n) \
    case n: fn(w, s, b, x, xsum, n, K, group, out, out_stride); break;
#define ROWS_SWITCH(fn)                                                                   \
    switch (rows) {                                                                       \
        ROWS_CASE(fn, 1) ROWS_CASE(fn, 2) ROWS_CASE(fn, 3) ROWS_CASE(fn, 4)               \
        ROWS_CASE(fn, 5) ROWS_CASE(fn, 6) ROWS_CASE(fn, 7) ROWS_CASE(fn, 8)               \
    }

static void row_block(const uint8_t *w, const float *s, const float *b, const float *x,
                      const float *xsum, int rows, int K, int group, int bits, float *out,
                      int out_stride) {
    if (bits == 4) {
        ROWS_SWITCH(row_q4)
    } else {
        ROWS_SWITCH(row_q8)
    }
}

/* y (M, N) = x (M, K) times the quantized (N, K) matrix, transposed. `work` holds
 * M * (K + K / group) floats: x as the row kernel reads it, and its group sums. */
void kiapi_qgemv(const float *x, int M, int K, const uint32_t *packed, const float *scales,
                 const float *biases, int N, int group, int bits, float *y, float *work,
                 int threads) {
    const int groups = K / group;
    float *xs = work, *xsum = work + (size_t)M * K;
    for (int m = 0; m < M; m++) {
        const float *xr = x + (size_t)m * K;
        float *dst = xs + (size_t)m * K;
        for (int g = 0; g < groups; g++) {
            float total = 0;
            for (int k = g * group; k < (g + 1) * group; k++) total += xr[k];
            xsum[(size_t)m * groups + g] = total;
        }
        if (bits == 4) {
            for (int k0 = 0; k0 < K; k0 += 32)
                for (int j = 0; j < 16; j++) {
                    dst[k0 + j] = xr[k0 + 2 * j];
                    dst[k0 + 16 + j] = xr[k0 + 2 * j + 1];
                }
        } else {
            memcpy(dst, xr, sizeof(float) * K);
        }
    }
    const size_t row_bytes = (size_t)K * bits / 8;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int n = 0; n < N; n++) {
        const uint8_t *w = (const uint8_t *)packed + n * row_bytes;
        const float *s = scales + (size_t)n * groups, *b = biases + (size_t)n * groups;
        for (int m0 = 0; m0 < M; m0 += MAX_ROWS) {
            const int rows = M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS;
            row_block(w, s, b, xs + (size_t)m0 * K, xsum + (size_t)m0 * groups, rows, K, group,
                      bits, y + (size_t)m0 * N + n, N);
        }
    }
}

/* The float32 (N, K) matrix: out[n, k] = scale * q + bias, rounded after the product and
 * after the sum (no fused multiply-add), exactly as kiapi's float32 expansion
 * (mlx_quantized.dequantized_float32) computes it. */
__attribute__((optimize("fp-contract=off"))) static void dequantize_row(
    const uint32_t *packed, const float *scales, const float *biases, int n, int K, int group,
    int bits, float *o) {
#ifdef __clang__
#pragma clang fp contract(off) /* clang ignores GCC's optimize attribute */
#endif
    const int groups = K / group, per_group = group / 32;
    const size_t row_bytes = (size_t)K * bits / 8;
    {
        const uint8_t *w = (const uint8_t *)packed + n * row_bytes;
        for (int g = 0; g < groups; g++) {
            const float s = scales[(size_t)n * groups + g], b = biases[(size_t)n * groups + g];
            for (int blk = g * per_group; blk < (g + 1) * per_group; blk++) {
                float *dst = o + (size_t)blk * 32;
                if (bits == 4) {
                    for (int part = 0; part < 16; part += LANES) {
                        vf lo, hi;
                        nibbles(w + (size_t)blk * 16 + part, &lo, &hi);
                        lo = lo * s;
                        hi = hi * s;
                        lo = lo + b;
                        hi = hi + b;
                        for (int j = 0; j < LANES; j++) {
                            dst[2 * (part + j)] = lo[j];
                            dst[2 * (part + j) + 1] = hi[j];
                        }
                    }
                } else {
                    for (int part = 0; part < 32; part += LANES) {
                        vf v = widen(w + (size_t)blk * 32 + part);
                        v = v * s;
                        v = v + b;
                        memcpy(dst + part, &v, sizeof(v));
                    }
                }
            }
        }
    }
}

void kiapi_dequantize(const uint32_t *packed, const float *scales, const float *biases, int N,
                      int K, int group, int bits, float *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int n = 0; n < N; n++)
        dequantize_row(packed, scales, biases, n, K, group, bits, out + (size_t)n * K);
}

/* ---- element-wise work of a decoder block, vectorized and split over threads ----------- */

/* exp(x) to ~2 ulp for x in [-87, 88] (clamped outside): 2^(x log2 e) as 2^n times a degree-6
 * polynomial of the fraction (Cephes' coefficients, as MLX's own CPU exp uses), 2^n built in
 * the exponent bits. Branch-free, so loops calling it vectorize. */
static inline float fast_exp(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float t = x * 1.44269504088896341f;
    const float n = (t + 12582912.0f) - 12582912.0f; /* round to nearest (1.5 * 2^23) */
    const float f = t - n;
    float p = 1.535336188319500e-4f;
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}

/* The largest of n floats, and their sum (a tree over LANES partial sums), LANES at a time. */
typedef int32_t vi __attribute__((vector_size(LANES * 4)));
static inline float max_of(const float *x, int n) {
    vf top = (vf){0} - 3.0e38f;
    int j = 0;
    for (; j + LANES <= n; j += LANES) {
        const vf v = loadv(x + j);
        const vi bigger = v > top;
        top = (vf)(((vi)v & bigger) | ((vi)top & ~bigger));
    }
    float best = -3.0e38f;
    for (int i = 0; i < LANES; i++) best = top[i] > best ? top[i] : best;
    for (; j < n; j++) best = x[j] > best ? x[j] : best;
    return best;
}
static inline float sum_of(const float *x, int n) {
    vf acc = (vf){0};
    int j = 0;
    for (; j + LANES <= n; j += LANES) acc += loadv(x + j);
    float total = sumv(acc);
    for (; j < n; j++) total += x[j];
    return total;
}

/* out[j] = exp(in[j] - the largest kept value) for the `seen` entries `keep` keeps (NULL: all),
 * exactly 0 for the others; returns their sum (0: none kept). `out` may be `in`. Every loop is
 * a vector loop (a per-entry branch kept GCC from vectorizing the masked rows: mlx-lm's
 * batched prefill always passes a mask array). */
static inline float exp_row(const float *in, float *out, int seen, const uint8_t *keep) {
    if (keep) {
#pragma GCC ivdep
        for (int j = 0; j < seen; j++) out[j] = keep[j] ? in[j] : -3.0e38f;
        in = out;
    }
    const float top = max_of(in, seen);
    if (top == -3.0e38f) return 0.0f; /* nothing kept (or nothing seen) */
#pragma GCC ivdep
    for (int j = 0; j < seen; j++) out[j] = fast_exp(in[j] - top);
    if (keep) {
#pragma GCC ivdep
        for (int j = 0; j < seen; j++) out[j] = keep[j] ? out[j] : 0.0f;
    }
    return sum_of(out, seen);
}

/* Softmax of each of `rows` rows of `cols` values, in place (an encoder's attention scores,
 * its padding already added to them). */
void kiapi_softmax(float *x, int rows, int cols, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int r = 0; r < rows; r++) {
        float *row = x + (size_t)r * cols;
        const float inverse = 1.0f / exp_row(row, row, cols, NULL);
#pragma GCC ivdep
        for (int j = 0; j < cols; j++) row[j] *= inverse;
    }
}

/* out (D floats) = inverse * sum_j s[j] v[j] over `seen` rows of v (D floats each, `stride`
 * apart), with the output row in registers when D is a constant multiple of LANES (the head
 * sizes 32, 64, 128 once inlined): K keys at a time into K independent sums (4 while they fit
 * the registers), so the additions do not wait on each other's latency. */
static inline __attribute__((always_inline)) void weighted_rows(
    const float *s, int seen, float inverse, const float *v, long stride, const int D, float *o) {
    if (D % LANES == 0 && D <= 8 * LANES) {
        const int C = D / LANES, K = C <= 2 ? 4 : 2;
        vf acc[4][8];
        for (int k = 0; k < K; k++)
            for (int c = 0; c < C; c++) acc[k][c] = (vf){0};
        int j = 0;
        for (; j + K <= seen; j += K)
            for (int k = 0; k < K; k++) {
                const float p = s[j + k];
                for (int c = 0; c < C; c++)
                    acc[k][c] += p * loadv(v + (j + k) * stride + c * LANES);
            }
        for (; j < seen; j++)
            for (int c = 0; c < C; c++) acc[0][c] += s[j] * loadv(v + j * stride + c * LANES);
        for (int k = 1; k < K; k++)
            for (int c = 0; c < C; c++) acc[0][c] += acc[k][c];
        for (int c = 0; c < C; c++) acc[0][c] *= inverse;
        memcpy(o, acc[0], sizeof(float) * D);
        return;
    }
    for (int d = 0; d < D; d++) o[d] = 0.0f;
    for (int j = 0; j < seen; j++) {
        const float pj = s[j] * inverse;
        for (int d = 0; d < D; d++) o[d] += pj * v[j * stride + d];
    }
}

/* Attention of a prompt chunk or an encoder batch, whole: out = softmax(scale * q k^T, masked) v
 * for queries q (B, H, L, D), keys and values (B, KVH, S, D), each kv head shared by H / KVH
 * query heads (h reads kv head h / (H / KVH)). float32, each row of D contiguous, the rest
 * laid out by `strides`: for q, k, v and out in turn, the element strides of the batch, head
 * and position axes (12 values; (B, H, L, D) contiguous is {H L D, L D, D}, and an encoder's
 * fused (B, L, 3, H, D) product holds q, k and v at strides {3 L H D, D, 3 H D}). Masks, the
 * ones mlx-lm passes (at most one): causal (query i at position S - L + i sees keys
 * 0 .. S - L + i); `keep`, one byte per (query, key) (nonzero: attend); `add`, a float per
 * (query, key) added to the scores. `keep` and `add` hold L x S per batch element
 * (`mask_batched`) or one for all, the same for every head. A row that keeps nothing attends
 * uniformly to all S keys (MLX's masked softmax).
 *
 * The keys are transposed once into `work` (B * KVH * D * SP floats, SP = S rounded up to
 * LANES, zero-padded) and the values copied after them as contiguous (S, D) blocks (B * KVH *
 * S * D floats); each query row's scores are then LANES keys at a time in a register across
 * all D, its softmax in place (`scores`: threads * SP floats), and its output row in
 * registers across its keys. Rows are split over threads. The copy of the values: read in
 * place from an encoder's fused product, a head's value rows lie 3 H D floats apart (4.5 KB
 * for MiniLM), which maps them onto a few L1 sets that its 128 rows thrashed (by hand, the
 * weighted sum was a third of attention's samples). No BLAS: the OpenBLAS threads the same
 * products used to wake fought kiapi's OpenMP threads for the two cores. */
void kiapi_attention(const float *q, const float *k, const float *v, float *out, int B, int H,
                     int KVH, int L, int S, int D, const long *strides, float scale, int causal,
                     const uint8_t *keep, const float *add, int mask_batched, float *work,
                     float *scores, int threads) {
    const long *qs = strides, *ks = strides + 3, *vs = strides + 6, *os = strides + 9;
    const int SP = (S + LANES - 1) / LANES * LANES;
    float *values = work + (size_t)B * KVH * D * SP;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int bg = 0; bg < B * KVH; bg++) { /* kt[bg][d][j] = k[b][g][j][d], zeros past S */
        const float *src = k + (bg / KVH) * ks[0] + (bg % KVH) * ks[1];
        float *dst = work + (size_t)bg * D * SP;
        for (int j = 0; j < S; j++)
            for (int d = 0; d < D; d++) dst[(size_t)d * SP + j] = src[j * ks[2] + d];
        for (int d = 0; d < D; d++)
            for (int j = S; j < SP; j++) dst[(size_t)d * SP + j] = 0.0f;
        const float *vsrc = v + (bg / KVH) * vs[0] + (bg % KVH) * vs[1];
        float *vdst = values + (size_t)bg * S * D;
        for (int j = 0; j < S; j++)
            memcpy(vdst + (size_t)j * D, vsrc + j * vs[2], sizeof(float) * D);
    }
    const int repeats = H / KVH;
    const long rows = (long)B * H * L;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long r = 0; r < rows; r++) {
        const int b = (int)(r / ((long)H * L)), h = (int)(r / L % H), i = (int)(r % L);
        const int g = h / repeats;
        const float *qi = q + b * qs[0] + h * qs[1] + i * qs[2];
        const float *kt = work + ((size_t)b * KVH + g) * D * SP;
        const float *vb = values + ((size_t)b * KVH + g) * S * D; /* (S, D) contiguous */
        float *o = out + b * os[0] + h * os[1] + i * os[2];
#ifdef _OPENMP
        float *s = scores + (size_t)omp_get_thread_num() * SP;
#else
        float *s = scores;
#endif
        int seen = S;
        if (causal) {
            seen = S - L + i + 1;
            if (seen > S) seen = S;
            if (seen < 0) seen = 0;
        }
        const size_t mask_row = ((size_t)(mask_batched ? b : 0) * L + i) * S;
        const uint8_t *kp = keep ? keep + mask_row : NULL;
        if (r + 2 < rows) { /* the query row after next: rows lie apart in a fused product */
            const long n = r + 2;
            const float *next =
                q + (n / ((long)H * L)) * qs[0] + (n / L % H) * qs[1] + (n % L) * qs[2];
            for (int d = 0; d < D; d += 16) __builtin_prefetch(next + d);
        }
        float qd[D]; /* the query row, scaled */
        for (int d = 0; d < D; d++) qd[d] = qi[d] * scale;
        int j0 = 0; /* four vectors of keys at a time: four independent sums */
        for (; j0 + 3 * LANES < seen; j0 += 4 * LANES) {
            vf a0 = (vf){0}, a1 = (vf){0}, a2 = (vf){0}, a3 = (vf){0};
            for (int d = 0; d < D; d++) {
                const float *kd = kt + (size_t)d * SP + j0;
                a0 += qd[d] * loadv(kd);
                a1 += qd[d] * loadv(kd + LANES);
                a2 += qd[d] * loadv(kd + 2 * LANES);
                a3 += qd[d] * loadv(kd + 3 * LANES);
            }
            memcpy(s + j0, &a0, sizeof(a0));
            memcpy(s + j0 + LANES, &a1, sizeof(a1));
            memcpy(s + j0 + 2 * LANES, &a2, sizeof(a2));
            memcpy(s + j0 + 3 * LANES, &a3, sizeof(a3));
        }
        for (; j0 < seen; j0 += LANES) { /* (reads up to SP: zeros past S) */
            vf acc = (vf){0};
            for (int d = 0; d < D; d++) acc += qd[d] * loadv(kt + (size_t)d * SP + j0);
            memcpy(s + j0, &acc, sizeof(acc));
        }
        if (add) {
            const float *ap = add + mask_row;
#pragma GCC ivdep
            for (int j = 0; j < seen; j++) s[j] += ap[j];
        }
        const float total = exp_row(s, s, seen, kp);
        if (total > 0) {
            if (D == 32)
                weighted_rows(s, seen, 1.0f / total, vb, D, 32, o);
            else if (D == 64)
                weighted_rows(s, seen, 1.0f / total, vb, D, 64, o);
            else if (D == 128)
                weighted_rows(s, seen, 1.0f / total, vb, D, 128, o);
            else
                weighted_rows(s, seen, 1.0f / total, vb, D, D, o);
        } else { /* nothing kept: uniform over all S keys */
            for (int j = 0; j < S; j++) s[j] = 1.0f;
            weighted_rows(s, S, 1.0f / S, vb, D, D, o);
        }
    }
}

/* x = layer_norm(a + x) over each of `rows` rows of `cols` floats, in place in x: mean and
 * variance of the row in float32 (two passes), then (v - mean) / sqrt(var + eps) * gamma +
 * beta: a transformer block's residual and norm in one sweep. Row r of x adds row r % period
 * of a: period = rows for a residual, a text's width for position rows added to every text
 * of a batch. */
void kiapi_add_layer_norm(const float *a, float *x, int rows, int cols, int period,
                          const float *gamma, const float *beta, float eps, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int r = 0; r < rows; r++) {
        float *xr = x + (size_t)r * cols;
        const float *ar = a + (size_t)(r % period) * cols;
#pragma GCC ivdep
        for (int j = 0; j < cols; j++) xr[j] += ar[j];
        const float mean = sum_of(xr, cols) / cols;
        vf acc = (vf){0};
        int j = 0;
        for (; j + LANES <= cols; j += LANES) {
            const vf d = loadv(xr + j) - mean;
            acc += d * d;
        }
        float var = sumv(acc);
        for (; j < cols; j++) var += (xr[j] - mean) * (xr[j] - mean);
        var /= cols;
        const float inverse = 1.0f / sqrtf(var + eps);
#pragma GCC ivdep
        for (int c = 0; c < cols; c++) xr[c] = (xr[c] - mean) * inverse * gamma[c] + beta[c];
    }
}

/* out[r, j] = silu(g) * u for g = gate_up[r, j], u = gate_up[r, hidden + j]: a SwiGLU MLP's
 * activation over its stacked gate and up products. */
void kiapi_swiglu(const float *gate_up, int rows, int hidden, float *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int r = 0; r < rows; r++) {
        const float *g = gate_up + (size_t)r * 2 * hidden, *u = g + hidden;
        float *o = out + (size_t)r * hidden;
#pragma GCC ivdep /* out is not gate_up */
        for (int j = 0; j < hidden; j++) o[j] = g[j] / (1.0f + fast_exp(-g[j])) * u[j];
    }
}

/* Exact (erf) GELU: 0.5 x (1 + erf(x / sqrt 2)) with erf from Abramowitz & Stegun 7.1.28
 * (|error| <= 3e-7), the polynomial kiapi's MLX version compiles (mlx_engine). Branch-free, so
 * loops calling it vectorize. */
static inline float gelu_of(float v) {
    const float z = (v < 0 ? -v : v) * 0.70710678118654752f;
    float p = 1.0f + z * (0.0705230784f + z * (0.0422820123f + z * (0.0092705272f +
              z * (0.0001520143f + z * (0.0002765672f + z * 0.0000430638f)))));
    p = p * p;
    p = p * p;
    p = p * p;
    const float erf_abs = 1.0f - 1.0f / (p * p);
    return 0.5f * v * (1.0f + (v < 0 ? -erf_abs : erf_abs));
}

/* GELU in place. */
void kiapi_gelu(float *x, long count, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long i = 0; i < count; i++) x[i] = gelu_of(x[i]);
}

/* ---- bfloat16 products on AMX tiles --------------------------------------------------------
 *
 * Intel's AMX (Sapphire Rapids and later) multiplies 16 x 32 bfloat16 tiles into 16 x 16
 * float32 ones: by hand, 3.4 TFLOP/s on one core of this project's Xeon, against about 0.2 for
 * float32 through the BLAS. Products over many rows (a prompt chunk, an embedding batch) run
 * here when the CPU has it: x and the weights rounded to bfloat16 (to nearest, ties to even),
 * products summed in float32. The weights are laid out once per matrix as the tiles read them
 * ("packed"): for each block of 16 outputs and 32 inputs, 16 rows (input pairs) of 16 outputs'
 * two values, 1 KB per tile, a block of outputs' tiles consecutive along the inputs:
 *
 *   packed[((nb * K/32 + kb) * 16 + p) * 32 + 2 n + e] = w[16 nb + n][32 kb + 2 p + e]
 *
 * N and K must be multiples of 32 (the caller checks). Compiled in only where -march=native
 * has AMX; kiapi_bf16_ready() says whether it is there and the kernel lets this process use
 * it (Linux hands out the tile state on request); kiapi_gemm_bf16 checks it too. */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define KIAPI_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
/* float32 -> bfloat16, round to nearest even (NaN is not expected: activations and weights) */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

int kiapi_bf16_ready(void) {
#ifdef KIAPI_AMX
    static int ready = -1; /* asked once (qmatmul.py caches the answer; asking again is harmless) */
    if (ready < 0) /* ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA: the whole process */
        ready = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    return ready;
#else
    return 0;
#endif
}

/* 16 rows (outputs n0 .. n0 + 15) of K floats each into their K/32 packed tiles. */
static void pack_block(const float *rows, int K, uint16_t *out) {
    for (int kb = 0; kb < K / 32; kb++) {
        uint16_t *tile = out + (size_t)kb * 512;
        for (int n = 0; n < 16; n++) {
            const float *src = rows + (size_t)n * K + kb * 32;
            for (int p = 0; p < 16; p++) {
                tile[p * 32 + 2 * n] = to_bf16(src[2 * p]);
                tile[p * 32 + 2 * n + 1] = to_bf16(src[2 * p + 1]);
            }
        }
    }
}

/* A float32 (N, K) matrix, packed. */
void kiapi_pack_bf16(const float *w, int N, int K, uint16_t *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int nb = 0; nb < N / 16; nb++)
        pack_block(w + (size_t)nb * 16 * K, K, out + (size_t)nb * 16 * K);
}

/* A quantized (N, K) matrix, expanded exactly as kiapi_dequantize does, then packed; `work`
 * holds threads * 16 * K floats. */
void kiapi_dequantize_bf16(const uint32_t *packed, const float *scales, const float *biases,
                           int N, int K, int group, int bits, uint16_t *out, float *work,
                           int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int nb = 0; nb < N / 16; nb++) {
#ifdef _OPENMP
        float *rows = work + (size_t)omp_get_thread_num() * 16 * K;
#else
        float *rows = work;
#endif
        for (int n = 0; n < 16; n++)
            dequantize_row(packed, scales, biases, nb * 16 + n, K, group, bits,
                           rows + (size_t)n * K);
        pack_block(rows, K, out + (size_t)nb * 16 * K);
    }
}

#ifdef KIAPI_AMX
struct tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
};

/* This thread's tiles: all 8 as 16 rows of 64 bytes (16 x 32 bfloat16 or 16 x 16 float32). */
static inline void load_tile_config(void) {
    struct tile_config config;
    memset(&config, 0, sizeof(config));
    config.palette = 1;
    for (int t = 0; t < 8; t++) {
        config.rows[t] = 16;
        config.bytes_per_row[t] = 64;
    }
    _tile_loadconfig(&config);
}

/* 32 floats (times `scale`) as 32 bfloat16 in order, rounded to nearest even, at out. */
static inline __attribute__((always_inline)) void bf16_32(const float *x, float scale,
                                                          uint16_t *out) {
#if defined(__AVX512BF16__)
    const __m512 f = _mm512_set1_ps(scale);
    const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_mul_ps(_mm512_loadu_ps(x + 16), f),
                                           _mm512_mul_ps(_mm512_loadu_ps(x), f));
    _mm512_storeu_si512(out, (__m512i)h);
#else
    for (int i = 0; i < 32; i++) out[i] = to_bf16(x[i] * scale);
#endif
}

/* Two rows of 16 floats as 16 bfloat16 pairs (a[0], b[0], a[1], b[1], ...) at out: two keys'
 * values as a tile's row of p v reads them. */
static inline __attribute__((always_inline)) void bf16_pairs(const float *a, const float *b,
                                                             uint16_t *out) {
#if defined(__AVX512BF16__)
    const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(b), _mm512_loadu_ps(a));
    const __m512i order = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
        23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    _mm512_storeu_si512(out, _mm512_permutexvar_epi16(order, both));
#else
    for (int n = 0; n < 16; n++) {
        out[2 * n] = to_bf16(a[n]);
        out[2 * n + 1] = to_bf16(b[n]);
    }
#endif
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define KIAPI_SOFTMAX_TILES 1
/* fast_exp of 16 floats at once: the same polynomial, 2^n applied by scalef. */
static inline __attribute__((always_inline)) __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* The `seen` (of 32 * blocks) scores at s whose `keep` byte is set (NULL: all): exp(score -
 * their largest) rounded to bfloat16, 32 to a tile row at p + 512 kb, zeros for the others and
 * past `seen`; returns the sum of the unrounded values (0, and nothing written, when none is
 * kept). Two passes, AVX-512 masks for the tail and `keep`: exp_row's five passes with scalar
 * tails, then the rounding, were 60% of MiniLM's attention (by hand). */
static inline float softmax_tile_row(const float *s, int seen, int blocks, const uint8_t *keep,
                                     uint16_t *p) {
    __m512 top = _mm512_set1_ps(-3.0e38f);
    for (int j = 0; j < seen; j += 16) {
        __mmask16 m = seen - j >= 16 ? 0xFFFF : (__mmask16)((1u << (seen - j)) - 1);
        if (keep) {
            const __m128i bytes = _mm_maskz_loadu_epi8(m, keep + j);
            m &= _mm_test_epi8_mask(bytes, bytes);
        }
        top = _mm512_mask_max_ps(top, m, top, _mm512_maskz_loadu_ps(m, s + j));
    }
    const float best = _mm512_reduce_max_ps(top);
    if (best == -3.0e38f) return 0.0f;
    const __m512 shift = _mm512_set1_ps(best);
    __m512 sum = _mm512_setzero_ps();
    for (int kb = 0; kb < blocks; kb++) {
        __m512 half[2];
        for (int h = 0; h < 2; h++) {
            const int j = kb * 32 + h * 16;
            __mmask16 m = j >= seen ? 0 : seen - j >= 16 ? 0xFFFF
                                                          : (__mmask16)((1u << (seen - j)) - 1);
            if (keep && m) {
                const __m128i bytes = _mm_maskz_loadu_epi8(m, keep + j);
                m &= _mm_test_epi8_mask(bytes, bytes);
            }
            half[h] = _mm512_maskz_mov_ps(
                m, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), shift)));
            sum = _mm512_add_ps(sum, half[h]);
        }
        _mm512_storeu_si512(p + (size_t)kb * 512, (__m512i)_mm512_cvtne2ps_pbh(half[1], half[0]));
    }
    return _mm512_reduce_add_ps(sum);
}
#endif

/* A 32 x 32 block of y: rows m0 .. m0 + 31, outputs 32 cb .. 32 cb + 31. x comes as tiles
 * (kiapi_gemm_bf16's `work`), the weights packed; tiles 0-3 sum (starting from the bias, a
 * row read 16 times), 4-5 hold x, 6-7 the weights. A block with rows past M is stored aside
 * and its rows below M copied. With `yt`, the block goes there instead, as GELU of it rounded
 * to bfloat16, in x's tile layout for a product whose inputs are these N outputs (the rows
 * past M as zeros). */
static inline void block_32x32(const uint16_t *xt, int M, int K, const uint16_t *w, int N,
                               const float *bias, const float *zeros, float *y, uint16_t *yt,
                               int m0, int cb) {
    const int blocks = K / 32;
    const uint16_t *a0 = xt + (size_t)m0 * K, *a1 = a0 + (size_t)16 * K;
    const uint16_t *b0 = w + (size_t)2 * cb * 16 * K, *b1 = b0 + (size_t)16 * K;
    const float *c0 = bias ? bias + 32 * cb : zeros, *c1 = bias ? c0 + 16 : zeros;
    _tile_loadd(0, c0, 0);
    _tile_loadd(1, c1, 0);
    _tile_loadd(2, c0, 0);
    _tile_loadd(3, c1, 0);
    for (int kb = 0; kb < blocks; kb++) { /* each load as late as it can be: loads overlap */
        _tile_loadd(4, a0 + (size_t)kb * 512, 64);
        _tile_loadd(6, b0 + (size_t)kb * 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(7, b1 + (size_t)kb * 512, 64);
        _tile_dpbf16ps(1, 4, 7);
        _tile_loadd(5, a1 + (size_t)kb * 512, 64);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    if (yt) {
        float c[32][32] __attribute__((aligned(64)));
        _tile_stored(0, &c[0][0], 128);
        _tile_stored(1, &c[0][16], 128);
        _tile_stored(2, &c[16][0], 128);
        _tile_stored(3, &c[16][16], 128);
        for (int r = 0; r < 32; r++) {
            const int m = m0 + r;
            uint16_t *dst = yt + ((size_t)(m / 16) * (N / 32) + cb) * 512 + (m % 16) * 32;
            if (m < M) {
                float activated[32] __attribute__((aligned(64)));
                for (int i = 0; i < 32; i++) activated[i] = gelu_of(c[r][i]);
                bf16_32(activated, 1.0f, dst);
            } else {
                memset(dst, 0, 64);
            }
        }
        return;
    }
    float *dst = y + (size_t)m0 * N + 32 * cb;
    const long stride = (long)N * 4;
    if (m0 + 32 <= M) {
        _tile_stored(0, dst, stride);
        _tile_stored(1, dst + 16, stride);
        _tile_stored(2, dst + (size_t)16 * N, stride);
        _tile_stored(3, dst + (size_t)16 * N + 16, stride);
        return;
    }
    float c[32][32] __attribute__((aligned(64)));
    _tile_stored(0, &c[0][0], 128);
    _tile_stored(1, &c[0][16], 128);
    _tile_stored(2, &c[16][0], 128);
    _tile_stored(3, &c[16][16], 128);
    for (int r = 0; m0 + r < M; r++) memcpy(dst + (size_t)r * N, c[r], sizeof(c[r]));
}
#endif

/* y (M, N) = x (M, K) times the packed (N, K) matrix, transposed, plus `bias` (N; or NULL).
 * `work` holds ((M + 31) / 32 * 32) * K bfloat16 values: x rounded, padded and tiled, made
 * here from x, or with `tiled_x` already there (an earlier product's `gelu_tiles`; x is not
 * read). With `gelu_tiles` (((M + 31) / 32 * 32) * N values), GELU(y) goes there, rounded, as
 * the tiles of the next product's x, and y is not written: an MLP's up product hands its
 * activation to the down product without a float32 pass to memory and back (by hand, a 32 x
 * 128-token MiniLM batch's products 50.5-53 -> 48-50 ms). Threads split the rows of y
 * when there are enough of them (each thread then reads every weight tile), else the
 * outputs; a thread walks its rows 128 at a time (x's block stays in its L2 cache) against
 * all its outputs. */
int kiapi_gemm_bf16(const float *x, int M, int K, const uint16_t *w, int N, const float *bias,
                    int tiled_x, float *y, uint16_t *gelu_tiles, uint16_t *work, int threads) {
    if (!kiapi_bf16_ready()) return -1; /* no AMX, or Linux refused it: tiles would fault */
#ifdef KIAPI_AMX
    const int padded = (M + 31) / 32 * 32, blocks = K / 32;
    /* x rounded, as tiles: rows 16 r .. 16 r + 15, inputs 32 kb .. 32 kb + 31 at
     * work[(r * K/32 + kb) * 512], 64 bytes a row (one contiguous kilobyte per tile) */
    if (!tiled_x) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int m = 0; m < padded; m++) {
            uint16_t *dst = work + (size_t)(m / 16) * 16 * K + (m % 16) * 32;
            const float *src = x + (size_t)m * K;
            for (int kb = 0; kb < blocks; kb++) {
                if (m >= M)
                    memset(dst + (size_t)kb * 512, 0, 64);
                else
                    bf16_32(src + kb * 32, 1.0f, dst + (size_t)kb * 512);
            }
        }
    }
    static const float zeros[16] __attribute__((aligned(64)));
    const int row_blocks = padded / 32, column_blocks = N / 32;
#pragma omp parallel num_threads(threads)
    {
        int team = 1, me = 0;
#ifdef _OPENMP
        team = omp_get_num_threads();
        me = omp_get_thread_num();
#endif
        load_tile_config();
        int r0 = 0, r1 = row_blocks, c0 = 0, c1 = column_blocks;
        if (row_blocks >= team) {
            r0 = row_blocks * me / team;
            r1 = row_blocks * (me + 1) / team;
        } else {
            c0 = column_blocks * me / team;
            c1 = column_blocks * (me + 1) / team;
        }
        for (int rb = r0; rb < r1; rb += 4) {
            const int rend = rb + 4 < r1 ? rb + 4 : r1;
            for (int cb = c0; cb < c1; cb++)
                for (int r = rb; r < rend; r++)
                    block_32x32(work, M, K, w, N, bias, zeros, y, gelu_tiles, 32 * r, cb);
        }
        _tile_release();
    }
    return 0;
#else
    (void)x, (void)M, (void)K, (void)w, (void)N, (void)bias, (void)tiled_x, (void)y;
    (void)gelu_tiles, (void)work, (void)threads;
    return -1;
#endif
}

#ifdef KIAPI_AMX
/* dst (16 x 16 float32, rows `stride` bytes apart) = the sum over `steps` of the bfloat16
 * tiles a + i a_step times b + i b_step (tile 0 sums, 1 and 2 read). */
static inline void tile_products(const uint16_t *a, size_t a_step, const uint16_t *b,
                                 size_t b_step, int steps, float *dst, long stride) {
    _tile_zero(0);
    for (int i = 0; i < steps; i++) {
        _tile_loadd(1, a + i * a_step, 64);
        _tile_loadd(2, b + i * b_step, 64);
        _tile_dpbf16ps(0, 1, 2);
    }
    _tile_stored(0, dst, stride);
}
#endif

/* Attention as kiapi_attention computes it (the same arguments, layouts and masks), with both
 * products on AMX tiles: q k^T from q (scaled) and k rounded to bfloat16, then the softmax in
 * float32 as there, then p v from the unnormalized p = exp(score - max) and v rounded to
 * bfloat16, divided by the row's sum at the end; sums in float32. D must be a multiple of 32.
 * `work` holds B * KVH * 2 * D * SP bfloat16 values (SP = S rounded up to 32): k and v laid out
 * as the tiles read them; `scores` threads * 16 * SP * 2 floats (each thread's 16 rows of
 * scores, then the same rows of p as tiles). Query rows go 16 at a time (a tile's rows) per
 * (batch, head), split over threads. Returns -1 (and computes nothing) without AMX. */
int kiapi_attention_bf16(const float *q, const float *k, const float *v, float *out, int B, int H,
                         int KVH, int L, int S, int D, const long *strides, float scale,
                         int causal, const uint8_t *keep, const float *add, int mask_batched,
                         uint16_t *work, float *scores, int threads) {
    if (!kiapi_bf16_ready() || D % 32 || D > 256) return -1;
#ifdef KIAPI_AMX
    const long *qs = strides, *ks = strides + 3, *vs = strides + 6, *os = strides + 9;
    const int SP = (S + 31) / 32 * 32;
    /* per (b, g), D * SP values each:
     * k for q k^T, 16 keys by 32 dims a tile: kt[(db * SP/16 + jb) * 512 + p * 32 + 2 n + e]
     *   = k[16 jb + n][32 db + 2 p + e];
     * v for p v, 32 keys by 16 dims a tile: vt[(kb * D/16 + ob) * 512 + p * 32 + 2 n + e]
     *   = v[32 kb + 2 p + e][16 ob + n]; zeros past S. */
    uint16_t *k_tiles = work, *v_tiles = work + (size_t)B * KVH * D * SP;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int bg = 0; bg < B * KVH; bg++) {
        const float *kb_src = k + (bg / KVH) * ks[0] + (bg % KVH) * ks[1];
        const float *vb_src = v + (bg / KVH) * vs[0] + (bg % KVH) * vs[1];
        uint16_t *kt = k_tiles + (size_t)bg * D * SP, *vt = v_tiles + (size_t)bg * D * SP;
        static const float zero_row[256];
        for (int j = 0; j < SP; j++) { /* k: key j's dims in pairs, 16 keys to a tile row */
            const float *kr = j < S ? kb_src + j * ks[2] : zero_row;
            for (int db = 0; db < D / 32; db++) {
                uint16_t pairs[32] __attribute__((aligned(64)));
                bf16_32(kr + db * 32, 1.0f, pairs);
                uint32_t *tile = (uint32_t *)(kt + ((size_t)db * (SP / 16) + j / 16) * 512);
                for (int p = 0; p < 16; p++) memcpy(tile + p * 16 + j % 16, pairs + 2 * p, 4);
            }
        }
        for (int j = 0; j < SP; j += 2) { /* v: keys j and j + 1 interleaved, 16 dims a tile */
            const float *a = j < S ? vb_src + j * vs[2] : zero_row;
            const float *b = j + 1 < S ? vb_src + (j + 1) * vs[2] : zero_row;
            for (int ob = 0; ob < D / 16; ob++)
                bf16_pairs(a + ob * 16, b + ob * 16,
                           vt + ((size_t)(j / 32) * (D / 16) + ob) * 512 + (j % 32) / 2 * 32);
        }
    }
    const int repeats = H / KVH, QB = (L + 15) / 16;
    const long blocks = (long)B * H * QB;
#pragma omp parallel num_threads(threads)
    {
        int me = 0;
#ifdef _OPENMP
        me = omp_get_thread_num();
#endif
        load_tile_config();
        float *sc = scores + (size_t)me * 16 * SP * 2;   /* 16 rows of SP scores */
        uint16_t *pt = (uint16_t *)(sc + (size_t)16 * SP); /* the rows' p, 16 x 32 a tile */
        uint16_t qt[8 * 512] __attribute__((aligned(64))); /* the rows' q, 16 x 32 a tile */
        float o[16 * 256] __attribute__((aligned(64)));
        float inverse[16];
#pragma omp for schedule(static)
        for (long blk = 0; blk < blocks; blk++) {
            const int b = (int)(blk / ((long)H * QB)), h = (int)(blk / QB % H);
            const int i0 = (int)(blk % QB) * 16, rows = L - i0 < 16 ? L - i0 : 16;
            const int g = h / repeats;
            const uint16_t *kt = k_tiles + ((size_t)b * KVH + g) * D * SP;
            const uint16_t *vt = v_tiles + ((size_t)b * KVH + g) * D * SP;
            for (int r = 0; r < 16; r++) {
                const float *qi = q + b * qs[0] + h * qs[1] + (long)(i0 + r) * qs[2];
                for (int db = 0; db < D / 32; db++)
                    if (r < rows)
                        bf16_32(qi + db * 32, scale, qt + db * 512 + r * 32);
                    else
                        memset(qt + db * 512 + r * 32, 0, 64);
            }
            for (int jb = 0; jb < SP / 16; jb++) /* scores, 16 keys at a time */
                tile_products(qt, 512, kt + (size_t)jb * 512, (size_t)SP / 16 * 512, D / 32,
                              sc + jb * 16, (long)SP * 4);
            for (int r = 0; r < 16; r++) { /* softmax numerators, then p as tiles */
                float *s = sc + (size_t)r * SP;
                const int i = i0 + r;
                int seen = S;
                if (causal) {
                    seen = S - L + i + 1;
                    if (seen > S) seen = S;
                    if (seen < 0) seen = 0;
                }
                float total = 0.0f;
#ifdef KIAPI_SOFTMAX_TILES
                if (!add && r < rows) { /* p straight into its tiles */
                    const size_t mask_row = ((size_t)(mask_batched ? b : 0) * L + i) * S;
                    total = softmax_tile_row(s, seen, SP / 32, keep ? keep + mask_row : NULL,
                                             pt + r * 32);
                    if (total > 0) {
                        inverse[r] = 1.0f / total;
                        continue;
                    }
                }
#endif
                if (r < rows) {
                    const size_t mask_row = ((size_t)(mask_batched ? b : 0) * L + i) * S;
                    if (add)
                        for (int j = 0; j < seen; j++) s[j] += add[mask_row + j];
                    total = exp_row(s, s, seen, keep ? keep + mask_row : NULL);
                    if (total <= 0) { /* nothing kept: uniform over all S keys */
                        for (int j = 0; j < S; j++) s[j] = 1.0f;
                        seen = S;
                        total = (float)S;
                    }
                } else {
                    seen = 0;
                }
                inverse[r] = total > 0 ? 1.0f / total : 0.0f;
                for (int j = seen; j < SP; j++) s[j] = 0.0f;
                for (int kb = 0; kb < SP / 32; kb++)
                    bf16_32(s + kb * 32, 1.0f, pt + kb * 512 + r * 32);
            }
            for (int ob = 0; ob < D / 16; ob++) /* p v, 16 dims at a time */
                tile_products(pt, 512, vt + (size_t)ob * 512, (size_t)D / 16 * 512, SP / 32,
                              o + ob * 16, (long)D * 4);
            for (int r = 0; r < rows; r++) {
                float *dst = out + b * os[0] + h * os[1] + (long)(i0 + r) * os[2];
                for (int d = 0; d < D; d++) dst[d] = o[r * D + d] * inverse[r];
            }
        }
        _tile_release();
    }
    return 0;
#else
    (void)q, (void)k, (void)v, (void)out, (void)B, (void)H, (void)KVH, (void)L, (void)S, (void)D;
    (void)strides, (void)scale, (void)causal, (void)keep, (void)add, (void)mask_batched;
    (void)work, (void)scores, (void)threads;
    return -1;
#endif
}
