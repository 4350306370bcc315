/*
 * int8-activation GEMMs for x86-64 CPUs with AVX512-VNNI (the opt-in `--int8-activations` path):
 *     y[M, N] = (qa[M, K] . qw[N, K]^T) * sa[M] * sw[N] (+ bias[N])
 * where qa are the activations quantised per row (token) to int8, symmetric, sa = max|x| / 127,
 * and qw THUDM's per-row int4 or int8 weights with their row scales sw.
 * Built and loaded by adapters/weights/native/int8_act.py.
 *
 * Why: a prefill chunk is compute-bound, and VPDPBUSD multiplies 64 byte pairs per instruction
 * where VDPBF16PS (wq_gemm.c) multiplies 32 bf16 pairs; llama.cpp quantises activations to 8 bits
 * for the same reason.  The integer sums are exact (int32: |sum| < 255 * 127 * K), so the only
 * error against the weight-only path is the rounding of the activations to 8 bits.
 *
 * VPDPBUSD multiplies UNSIGNED bytes by SIGNED bytes:
 *   - int4 weights are stored as u = q + 8 in [0, 15] (wq_gemm.c's packing); they are the unsigned
 *     operand as they are and the activations the signed one:  sum(u * qa) - 8 * sum(qa);
 *   - int8 weights are signed, so the activations become unsigned, qa + 128:
 *     sum((qa + 128) * q) - 128 * sum(q), sum(q) per output row computed once at load.
 *
 * Weight layouts are wq_gemm.c's (adapters/weights/native/__init__.py pack_int4 / pack_int8):
 * blocks of NB rows, chunks of 64 columns, NB runs per chunk (int4: 32 bytes, low nibble column
 * c + b, high nibble column c + 32 + b; int8: 64 bytes in column order).  A thread widens an int4
 * block once into a buffer of int8 runs (64 bytes, column order) and reuses it for every row of
 * the activation tile, so the widening is paid once per (tile, block), not per 4 activation rows.
 * Activation rows are tiled so that a tile's bytes stay in the L2 cache while every weight block
 * passes over it.  K must be a multiple of 64 and N of NB (the callers pad, as for wq_gemm.c).
 */
#include <immintrin.h>
#include <stdint.h>
#include <omp.h>
#include <stdlib.h>

#define NB 4 /* weight rows per register block: wq_gemm.c's packing */
#define MB 4 /* activation rows per register block: MB * NB int32 accumulators + NB weights */
/* Bytes of activations per tile (M rows x K): inside a 1 MiB L2 with room for the weight
 * block (384 KiB to 1 MiB measured alike on a 2-core EPYC with 1 MiB L2 per core). */
#define TILE_BYTES (768 * 1024)

typedef uint16_t bf16_t;

int i8_block_rows(void) { return NB; }

int i8_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni");
}

static inline __m512 load_bf16x16(const bf16_t *p, __mmask16 mask) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

/* ---------------------------------------------------------------------------------------------
 * Per-row symmetric quantisation of bf16 activations x [M, K] (row stride K) into q [M, Kp]
 * (Kp >= K, the columns past K are 0): scale = max|x| / 127, q = round_half_even(x * (127 / max))
 * in fp32 (a row of zeros gets scale 0 and q = 0).  `plus128` stores q + 128 as unsigned bytes
 * (the operand for signed int8 weights); qsum[m] = sum(q) (before the +128).
 */
void i8_quantize_rows(const bf16_t *x, int64_t M, int64_t K, int64_t Kp, uint8_t *q,
                      float *scale, int32_t *qsum, int plus128, int nthreads) {
#pragma omp parallel for num_threads(M > 1 ? nthreads : 1) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const bf16_t *row = x + m * K;
        __m512 mx = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) {
            const __mmask16 mask = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
            mx = _mm512_max_ps(mx, _mm512_abs_ps(load_bf16x16(row + k, mask)));
        }
        const float amax = _mm512_reduce_max_ps(mx);
        scale[m] = amax / 127.0f;
        const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        const __m512i off = _mm512_set1_epi32(plus128 ? 128 : 0);
        __m512i sum = _mm512_setzero_si512();
        uint8_t *out = q + m * Kp;
        for (int64_t k = 0; k < Kp; k += 16) {
            const __mmask16 mask =
                K - k >= 16 ? 0xFFFF : (K > k ? (__mmask16)((1u << (K - k)) - 1) : 0);
            /* vcvtps2dq rounds with MXCSR's mode: to nearest even, as torch.round */
            const __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(load_bf16x16(row + k, mask), inv));
            sum = _mm512_add_epi32(sum, r);
            const __mmask16 store = Kp - k >= 16 ? 0xFFFF : (__mmask16)((1u << (Kp - k)) - 1);
            _mm_mask_storeu_epi8(out + k, store, _mm512_cvtepi32_epi8(_mm512_add_epi32(r, off)));
        }
        qsum[m] = _mm512_reduce_add_epi32(sum);
    }
}

/* Sums of int8 weights per row, rows of the pack_int8 layout [N, K]: the +128 correction. */
void i8_weight_row_sums(const int8_t *w, int64_t N, int64_t K, int32_t *out, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t nb = 0; nb < N / NB; nb++) {
        __m512i acc[NB];
        for (int j = 0; j < NB; j++) acc[j] = _mm512_setzero_si512();
        const __m512i ones = _mm512_set1_epi8(1);
        for (int64_t k = 0; k < K; k += 64) {
            const int8_t *chunk = w + nb * NB * K + (k / 64) * NB * 64;
            for (int j = 0; j < NB; j++)
                acc[j] = _mm512_dpbusd_epi32(acc[j], ones,
                                             _mm512_loadu_si512((const void *)(chunk + j * 64)));
        }
        for (int j = 0; j < NB; j++) out[nb * NB + j] = _mm512_reduce_add_epi32(acc[j]);
    }
}

/* The four 16-lane sums of a0..a3 as one 4-lane vector (a transposing add tree: fewer shuffles
 * than four separate reductions). */
static inline __m128i reduce4(__m512i a0, __m512i a1, __m512i a2, __m512i a3) {
    const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
    const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
    const __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
    const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(u), _mm512_extracti64x4_epi64(u, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* Integer dot products of `mb` activation rows (row stride lda) with one block of NB weight rows
 * (chunks of NB runs of 64 bytes); `w_unsigned`: the weights are the unsigned operand (int4 as
 * u), else the activations are (qa + 128).  Both are constants after inlining. */
static inline __attribute__((always_inline)) void block_dot(const int mb, const int w_unsigned,
                                                            const uint8_t *a, int64_t lda,
                                                            const uint8_t *wb, int64_t K,
                                                            __m128i out[MB]) {
    __m512i acc[MB][NB];
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < NB; j++) acc[i][j] = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 64) {
        const uint8_t *chunk = wb + (k / 64) * NB * 64;
        __m512i wv[NB];
        for (int j = 0; j < NB; j++) wv[j] = _mm512_loadu_si512((const void *)(chunk + j * 64));
        for (int i = 0; i < mb; i++) {
            const __m512i av = _mm512_loadu_si512((const void *)(a + i * lda + k));
            for (int j = 0; j < NB; j++)
                acc[i][j] = w_unsigned ? _mm512_dpbusd_epi32(acc[i][j], wv[j], av)
                                       : _mm512_dpbusd_epi32(acc[i][j], av, wv[j]);
        }
    }
    for (int i = 0; i < mb; i++) out[i] = reduce4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
}

/* One int4 weight block (NB rows, K/2 bytes each in pack_int4's layout) -> NB runs of 64 bytes
 * u in [0, 15] per chunk, columns in order. */
static inline void widen_int4_block(const uint8_t *wblock, int64_t K, uint8_t *buf) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int64_t k = 0; k < K; k += 64) {
        const uint8_t *chunk = wblock + (k / 64) * NB * 32;
        uint8_t *dst = buf + (k / 64) * NB * 64;
        for (int j = 0; j < NB; j++) {
            const __m256i b = _mm256_loadu_si256((const __m256i *)(chunk + j * 32));
            const __m256i lo = _mm256_and_si256(b, low);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
            _mm512_storeu_si512((void *)(dst + j * 64),
                                _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
        }
    }
}

/* fp32 -> bf16 of 4 lanes, round to nearest even (no NaN can come out of these sums). */
static inline __m128i f32x4_to_bf16(__m128 v) {
    const __m128i bits = _mm_castps_si128(v);
    const __m128i odd = _mm_and_si128(_mm_srli_epi32(bits, 16), _mm_set1_epi32(1));
    return _mm_srli_epi32(_mm_add_epi32(_mm_add_epi32(bits, _mm_set1_epi32(0x7fff)), odd), 16);
}

/* Output of one (row block, weight block): int32 dots -> corrected, scaled, biased, stored;
 * fp32 as (float)(dot - corrections) * sa * sw (+ bias), the bf16 output rounded once. */
static inline __attribute__((always_inline)) void store_block(
    int mb, const __m128i dots[MB], const int32_t *qsum, __m128i col_corr, const float *sa,
    const float *sw, const float *bias, void *y, int64_t ldy, int out_bf16) {
    const __m128 w = _mm_loadu_ps(sw);
    const __m128 b = bias ? _mm_loadu_ps(bias) : _mm_setzero_ps();
    for (int i = 0; i < mb; i++) {
        __m128i exact = _mm_sub_epi32(dots[i], col_corr);
        if (qsum) exact = _mm_sub_epi32(exact, _mm_set1_epi32(8 * qsum[i]));
        __m128 v = _mm_mul_ps(_mm_mul_ps(_mm_cvtepi32_ps(exact), _mm_set1_ps(sa[i])), w);
        if (bias) v = _mm_add_ps(v, b);
        if (out_bf16)
            _mm_storel_epi64((__m128i *)((bf16_t *)y + i * ldy),
                             _mm_cvtepi32_epi16(f32x4_to_bf16(v)));
        else _mm_storeu_ps((float *)y + i * ldy, v);
    }
}

#define FOR_ROW_BLOCKS(M, m, BLOCK)                                                            \
    for (int64_t m = 0; m < (M); m += MB) switch ((M) - m >= MB ? MB : (M) - m) {             \
        case 4: BLOCK(4); break;                                                               \
        case 3: BLOCK(3); break;                                                               \
        case 2: BLOCK(2); break;                                                               \
        default: BLOCK(1); break;                                                              \
        }

/* The work is (row tile, weight block) pairs, tile-major, handed out dynamically: the threads
 * share a tile while it is in their caches, and a thread that other processes hold up (shared
 * cores) does not stall the others at a barrier. */
static inline __attribute__((always_inline)) int gemm(
    const int int4, const uint8_t *a, const float *sa, const int32_t *qsum, int64_t M, int64_t K,
    const uint8_t *w, const int32_t *wsum, const float *sw, const float *bias, int64_t N,
    void *y, int out_bf16, int nthreads) {
    const int64_t nblocks = N / NB;
    int64_t tile = TILE_BYTES / K / MB * MB;
    if (tile < MB) tile = MB;
    const int64_t work = (M + tile - 1) / tile * nblocks;
    uint8_t *bufs = 0; /* int4: one widened weight block per thread */
    if (int4 && !(bufs = aligned_alloc(64, (size_t)nthreads * NB * K))) return -1;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 4)
    for (int64_t it = 0; it < work; it++) {
        const int64_t m0 = it / nblocks * tile, n = it % nblocks * NB;
        const int64_t mt = M - m0 < tile ? M - m0 : tile;
        const uint8_t *wb;
        __m128i col_corr;
        if (int4) {
            wb = bufs + (size_t)omp_get_thread_num() * NB * K;
            widen_int4_block(w + n * K / 2, K, (uint8_t *)wb);
            col_corr = _mm_setzero_si128();
        } else {
            wb = w + n * K;
            col_corr = _mm_slli_epi32(_mm_loadu_si128((const __m128i *)(wsum + n)), 7);
        }
#define BLOCK(mb)                                                                              \
    do {                                                                                       \
        __m128i dots[MB];                                                                      \
        block_dot(mb, int4, a + (m0 + m) * K, K, wb, K, dots);                                 \
        store_block(mb, dots, int4 ? qsum + m0 + m : 0, col_corr, sa + m0 + m, sw + n,        \
                    bias ? bias + n : 0,                                                       \
                    out_bf16 ? (void *)((bf16_t *)y + (m0 + m) * N + n)                        \
                             : (void *)((float *)y + (m0 + m) * N + n),                        \
                    N, out_bf16);                                                              \
    } while (0)
        FOR_ROW_BLOCKS(mt, m, BLOCK)
#undef BLOCK
    }
    free(bufs);
    return 0;
}

/* y = int4 weights (pack_int4) times int8 activations qa [M, K] (signed: i8_quantize_rows with
 * plus128 = 0, and its qsum): y[m, n] = (sum(u * qa) - 8 * qsum[m]) * sa[m] * sw[n] (+ bias[n]).
 * Returns 0, or -1 if its buffers could not be allocated. */
int i8_gemm_w4(const int8_t *qa, const float *sa, const int32_t *qsum, int64_t M, int64_t K,
               const uint8_t *w, const float *sw, const float *bias, int64_t N, void *y,
               int out_bf16, int nthreads) {
    return gemm(1, (const uint8_t *)qa, sa, qsum, M, K, w, 0, sw, bias, N, y, out_bf16, nthreads);
}

/* y = int8 weights (pack_int8, row sums wsum from i8_weight_row_sums) times activations stored
 * as qa + 128 (i8_quantize_rows with plus128 = 1): y[m, n] = (sum((qa + 128) * q) - 128 *
 * wsum[n]) * sa[m] * sw[n] (+ bias[n]).  Returns 0. */
int i8_gemm_w8(const uint8_t *ua, const float *sa, int64_t M, int64_t K, const int8_t *w,
               const int32_t *wsum, const float *sw, const float *bias, int64_t N, void *y,
               int out_bf16, int nthreads) {
    return gemm(0, ua, sa, 0, M, K, (const uint8_t *)w, wsum, sw, bias, N, y, out_bf16,
                nthreads);
}
