/*
 * Weight-only int4 GEMM for x86-64 CPUs with AVX512-BF16:
 *     y[M, N] = (x[M, K] . (u[N, K] - 8)^T) * scale[N]
 * bf16 activations x, THUDM's per-row int4 weights (one scale per output row), fp32 results.
 * Built and loaded by adapters/weights/native/__init__.py (which documents the fallback when it cannot be).
 *
 * Why it exists: torch's `_weight_int4pack_mm_for_cpu` turns every weight into fp32 and multiplies
 * with fp32 FMAs, again for every block of 4 activation rows (int4mm_kernel.cpp, BLOCK_M = 4), so a
 * batched decode step (8-16 rows) is bound by fp32 FMA throughput, and at one row it reads the
 * weight rows as separate streams.  Here:
 *   - each nibble becomes an exact bf16 integer through one table lookup (vpermw) and is multiplied
 *     with VDPBF16PS (two bf16 products per fp32 lane, fp32 accumulation): twice the fp32 FMA rate,
 *     and every product is exact (a bf16 times an integer in [-8, 7] fits fp32), so the result is
 *     the fp32 kernel's sum up to accumulation order;
 *   - the NB weight rows of a register block are interleaved in memory, so each thread reads one
 *     sequential stream (measured faster than NB separate row streams at one activation row,
 *     measured on a 2-core AVX-512 EPYC).
 *
 * Weight layout (adapters/weights/native/__init__.py pack_int4): blocks of NB rows; a block is K/64 chunks; a chunk
 * is NB runs of 32 bytes, run j for row j of the block; byte b of the run holds column c + b in its
 * LOW nibble and column c + 32 + b in its HIGH nibble (c = 64 * chunk), as u = q + 8.  K must be a
 * multiple of 64 and N of NB: the caller pads (u = 8, i.e. q = 0).
 *
 * Batch invariance: every output (any number of activation rows, any weight format) is one fp32
 * vector accumulated over K in the same order and finished by store_output; every attention query
 * goes through attend_heads.  A row's bits never depend on the rows computed with it.
 *
 * Threads: OpenMP with the thread count the caller passes (torch.get_num_threads()); the library
 * links libgomp.so.1, the soname torch's own OpenMP runtime is loaded under, so both share it.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define NB 4 /* weight rows (output columns) per register block */
/* Software prefetch distance into a thread's weight stream, in bytes.  The hardware prefetcher
 * alone left the int4 kernel well under the memory's rate; 2-8 KB ahead measured best, 512 B
 * slower (python -m bench.kernels; figures in bench/README.md). */
#define PREFETCH_AHEAD 4096
#define PREFETCH(p, bytes)                                                                     \
    for (int _l = 0; _l < (bytes); _l += 64)                                                    \
        _mm_prefetch((const char *)(p) + PREFETCH_AHEAD + _l, _MM_HINT_T0)
#define MB 4 /* activation rows per register block: MB * NB accumulators + 2 * NB weights */
#define MBP 6 /* the same on the many-row paths (bf16 weights: MBP * NB accumulators + NB weights) */
/* Activation rows from which the GEMMs take the many-row loop (gemm_many_rows: weight panels,
 * int4/int8 widened once); the results are the same bits either way.  Below it, re-widening per
 * block of MB rows is faster: at 8-32 rows the many-row loop decoded int4 batches 20-30 % slower
 * (bench/README.md, "Batch invariance"). */
#define ROWS_WIDEN_ONCE 64

typedef uint16_t bf16_t;

/* fp32 -> bf16, round to nearest even (torch's conversion). */
static inline bf16_t f32_to_bf16(float f) {
    uint32_t bits;
    __builtin_memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((bits >> 16) | 0x40); /* NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (bf16_t)(bits >> 16);
}

int wq_block_rows(void) { return NB; }
int wq_widen_rows(void) { return ROWS_WIDEN_ONCE; }

/* Threads for `work` multiply-adds: one below ~256 K (small models, tiny calls), where waking a
 * second thread costs more than it saves, and far more when other processes hold the cores. */
static inline int threads_for(int64_t work, int nthreads) { return work < (1 << 18) ? 1 : nthreads; }

int wq_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512bf16");
}

/* bf16 values of u - 8 for u = 0..15 (small integers: exact), twice, filling the vpermw table. */
static __m512i int4_table(void) {
    uint16_t t[32];
    for (int u = 0; u < 32; u++) {
        float f = (float)((u & 15) - 8);
        uint32_t bits;
        __builtin_memcpy(&bits, &f, 4);
        t[u] = (uint16_t)(bits >> 16);
    }
    return _mm512_loadu_si512((const void *)t);
}

static inline __attribute__((always_inline)) void unpack_run(const uint8_t *run, __m512i table,
                                                             __m512i *lo, __m512i *hi) {
    __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)run));
    *lo = _mm512_permutexvar_epi16(_mm512_and_si512(b, _mm512_set1_epi16(0x0F)), table);
    *hi = _mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), table);
}

/* ---------------------------------------------------------------------------------------------
 * int8 weights (THUDM's int8: one scale per output row), same structure: per chunk of 64 columns,
 * NB runs of 64 signed bytes (one per row, columns in order).  An int8 is exact in bf16; it is
 * widened through int32 -> fp32 -> bf16 (vcvtne2ps2bf16, exact for these values).  torch's
 * `_weight_int8pack_mm` multiplies in fp32 per block of rows like its int4 kernel.
 */
static inline __attribute__((always_inline)) void unpack_run8(const int8_t *run, __m512i *lo,
                                                              __m512i *hi) {
    __m512 f0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)run)));
    __m512 f1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(run + 16))));
    __m512 f2 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(run + 32))));
    __m512 f3 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(run + 48))));
    *lo = (__m512i)_mm512_cvtne2ps_pbh(f1, f0);
    *hi = (__m512i)_mm512_cvtne2ps_pbh(f3, f2);
}

/* One output of every GEMM path: the fp32 lanes of `acc` summed (one fixed reduction tree), times
 * the row scale (quantised weights), plus the bias, stored as fp32 or rounded once to bf16.  Each
 * step rounds separately (built with -ffp-contract=off: no fused multiply-add), and the few-row
 * and many-row loops below all end here, so an output's bits do not depend on the loop that made
 * it, i.e. on how many activation rows were passed together. */
static inline __attribute__((always_inline)) void store_output(__m512 acc, const float *scale,
                                                               const float *bias, int j, void *y,
                                                               int64_t at, int out_bf16) {
    float v = _mm512_reduce_add_ps(acc);
    if (scale) v = v * scale[j];
    if (bias) v = v + bias[j];
    if (out_bf16) ((bf16_t *)y)[at] = f32_to_bf16(v);
    else ((float *)y)[at] = v;
}

/* Runs BLOCK(mb) for each block of at most MB activation rows starting at row m, mb being a
 * compile-time constant in every branch (so the block functions unroll fully). */
#define FOR_ROW_BLOCKS(M, m, BLOCK)                                                            \
    for (int64_t m = 0; m < (M); m += MB) switch ((M) - m >= MB ? MB : (M) - m) {             \
        case 4: BLOCK(4); break;                                                               \
        case 3: BLOCK(3); break;                                                               \
        case 2: BLOCK(2); break;                                                               \
        default: BLOCK(1); break;                                                              \
        }

/* Output columns [n, n + NB) for `mb` (1..MB) activation rows of a `bits`-bit (4 or 8) weight
 * block; both are constants after inlining.  A chunk of 64 columns is NB runs of 8 * bits bytes. */
static inline __attribute__((always_inline)) void block_quant(
    const int mb, const int bits, const bf16_t *x, int64_t ldx, const uint8_t *wblock, int64_t K,
    const float *scale, const float *bias, void *y, int64_t ldy, int out_bf16, __m512i table) {
    const int run = 8 * bits;
    __m512 acc[MB][NB];
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < NB; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 64) {
        const uint8_t *chunk = wblock + (k / 64) * NB * run;
        PREFETCH(chunk, NB * run);
        __m512i wl[NB], wh[NB];
        for (int j = 0; j < NB; j++) {
            if (bits == 4) unpack_run(chunk + j * run, table, &wl[j], &wh[j]);
            else unpack_run8((const int8_t *)(chunk + j * run), &wl[j], &wh[j]);
        }
        for (int i = 0; i < mb; i++) {
            __m512bh al = (__m512bh)_mm512_loadu_si512((const void *)(x + i * ldx + k));
            __m512bh ah = (__m512bh)_mm512_loadu_si512((const void *)(x + i * ldx + k + 32));
            for (int j = 0; j < NB; j++) {
                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], al, (__m512bh)wl[j]);
                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], ah, (__m512bh)wh[j]);
            }
        }
    }
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < NB; j++) store_output(acc[i][j], scale, bias, j, y, i * ldy + j, out_bf16);
}

static void quant_gemm_rows(const int bits, const bf16_t *x, int64_t M, int64_t K,
                            const uint8_t *w, const float *scale, const float *bias, int64_t N,
                            void *y, int out_bf16, int nthreads);

/* y (fp32, or bf16 if out_bf16) = x . q^T * scale (+ bias, fp32, may be NULL), the sum rounded
 * once: what torch computes for `(acc * scale + bias).to(bf16)`. */
static inline __attribute__((always_inline)) void quant_gemm(
    const int bits, const bf16_t *x, int64_t M, int64_t K, const uint8_t *w, const float *scale,
    const float *bias, int64_t N, void *y, int out_bf16, int nthreads) {
    if (M >= ROWS_WIDEN_ONCE) {
        quant_gemm_rows(bits, x, M, K, w, scale, bias, N, y, out_bf16, nthreads);
        return;
    }
    const __m512i table = int4_table();
    const int64_t nblocks = N / NB;
#pragma omp parallel for num_threads(threads_for(M * N * K, nthreads)) schedule(static)
    for (int64_t nb = 0; nb < nblocks; nb++) {
        const int64_t n = nb * NB;
        const uint8_t *wblock = w + n * K * bits / 8;
        const float *bn = bias ? bias + n : 0;
#define QUANT_BLOCK(mb)                                                                        \
    block_quant(mb, bits, x + m * K, K, wblock, K, scale + n, bn,                             \
                out_bf16 ? (void *)((bf16_t *)y + m * N + n) : (void *)((float *)y + m * N + n), \
                N, out_bf16, table)
        FOR_ROW_BLOCKS(M, m, QUANT_BLOCK)
#undef QUANT_BLOCK
    }
}

void wq_int4_gemm(const bf16_t *x, int64_t M, int64_t K, const uint8_t *w, const float *scale,
                  const float *bias, int64_t N, void *y, int out_bf16, int nthreads) {
    quant_gemm(4, x, M, K, w, scale, bias, N, y, out_bf16, nthreads);
}

void wq_int8_gemm(const bf16_t *x, int64_t M, int64_t K, const int8_t *w, const float *scale,
                  const float *bias, int64_t N, void *y, int out_bf16, int nthreads) {
    quant_gemm(8, x, M, K, (const uint8_t *)w, scale, bias, N, y, out_bf16, nthreads);
}

/* Rows [n0, n1) (multiples of NB) of the weight as bf16 integers u - 8, row-major [n1 - n0, K]:
 * for prefill, where one bf16 GEMM over the dequantised rows beats re-unpacking per 4 rows. */
void wq_int4_dequant(const uint8_t *w, int64_t K, int64_t n0, int64_t n1, bf16_t *out,
                     int nthreads) {
    const __m512i table = int4_table();
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t nb = n0 / NB; nb < n1 / NB; nb++) {
        const uint8_t *wblock = w + nb * NB * (K / 2);
        for (int64_t k = 0; k < K; k += 64) {
            const uint8_t *chunk = wblock + (k / 64) * NB * 32;
            for (int j = 0; j < NB; j++) {
                __m512i lo, hi;
                unpack_run(chunk + j * 32, table, &lo, &hi);
                bf16_t *row = out + (nb * NB + j - n0) * K + k;
                _mm512_storeu_si512((void *)row, lo);
                _mm512_storeu_si512((void *)(row + 32), hi);
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * bf16 weights (the output layer, which THUDM keeps unquantized, and every linear of a bf16
 * model): y[M, N] = x[M, K] . w[N, K]^T.  oneDNN's bf16 GEMM reads a 65024 x 4096 weight well
 * under the memory's rate for one activation row, and picks its blocking (so its summation order)
 * by M, so a row's result depended on the rows beside it; the same interleaved layout as above
 * (chunks of 32 columns: NB runs of 32 bf16, one per row) streams it at the memory's rate, and
 * every output is summed in one order whatever M.  K must be a multiple of 32 and N of NB.
 */
static inline __attribute__((always_inline)) void block_bf16(
    const int mb, const bf16_t *x, int64_t ldx, const bf16_t *wblock, int64_t K, const float *scale,
    const float *bias, void *y, int64_t ldy, int out_bf16, const int prefetch) {
    __m512 acc[MBP][NB];
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < NB; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        const bf16_t *chunk = wblock + (k / 32) * NB * 32;
        if (prefetch) PREFETCH(chunk, NB * 64);
        __m512i wv[NB];
        for (int j = 0; j < NB; j++) wv[j] = _mm512_loadu_si512((const void *)(chunk + j * 32));
        for (int i = 0; i < mb; i++) {
            __m512bh a = (__m512bh)_mm512_loadu_si512((const void *)(x + i * ldx + k));
            for (int j = 0; j < NB; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a, (__m512bh)wv[j]);
        }
    }
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < NB; j++) store_output(acc[i][j], scale, bias, j, y, i * ldy + j, out_bf16);
}

/* FOR_ROW_BLOCKS with blocks of up to MBP rows (the many-row loops: fewer loads per product). */
#define FOR_ROW_BLOCKS_P(M, m, BLOCK)                                                          \
    for (int64_t m = 0; m < (M); m += MBP) switch ((M) - m >= MBP ? MBP : (M) - m) {          \
        case 6: BLOCK(6); break;                                                               \
        case 5: BLOCK(5); break;                                                               \
        case 4: BLOCK(4); break;                                                               \
        case 3: BLOCK(3); break;                                                               \
        case 2: BLOCK(2); break;                                                               \
        default: BLOCK(1); break;                                                              \
        }

/* y (fp32, or bf16 if out_bf16) = x . w^T (+ bias, fp32, may be NULL), w in the interleaved bf16
 * layout.  Every output is one fp32 vector accumulated over K in 32-column steps, then
 * store_output: the same operations for any M. */
static void gemm_many_rows(const int bits, const bf16_t *x, int64_t M, int64_t K,
                           const void *w, const float *scale, const float *bias, int64_t N,
                           void *y, int out_bf16, int nthreads);

void wq_bf16_linear(const bf16_t *x, int64_t M, int64_t K, const bf16_t *w, const float *bias,
                    int64_t N, void *y, int out_bf16, int nthreads) {
    if (M >= ROWS_WIDEN_ONCE) {
        gemm_many_rows(16, x, M, K, w, 0, bias, N, y, out_bf16, nthreads);
        return;
    }
    const int64_t nblocks = N / NB;
#pragma omp parallel for num_threads(threads_for(M * N * K, nthreads)) schedule(static)
    for (int64_t nb = 0; nb < nblocks; nb++) {
        const int64_t n = nb * NB;
        const bf16_t *wblock = w + n * K;
        const float *bn = bias ? bias + n : 0;
#define BF16_BLOCK(mb)                                                                         \
    block_bf16(mb, x + m * K, K, wblock, K, 0, bn,                                            \
               out_bf16 ? (void *)((bf16_t *)y + m * N + n) : (void *)((float *)y + m * N + n), \
               N, out_bf16, 1)
        FOR_ROW_BLOCKS_P(M, m, BF16_BLOCK)
#undef BF16_BLOCK
    }
}

void wq_bf16_gemm(const bf16_t *x, int64_t M, int64_t K, const bf16_t *w, int64_t N, float *y,
                  int nthreads) {
    wq_bf16_linear(x, M, K, w, 0, N, y, 0, nthreads);
}

/* ---------------------------------------------------------------------------------------------
 * Many activation rows (prefill chunks, large decode batches).  Weight blocks are taken in
 * panels of P consecutive blocks (about 256 KB of bf16, so a panel stays in L2); int4/int8 panels
 * are first widened to bf16 once (the interleaved bf16 layout above) instead of once per MB rows.
 * Each block of MBP activation rows then runs over every block of the panel, so the activations
 * are read from L3 once per panel instead of once per weight block.  The bf16 values and their
 * order in each dot product are the few-row kernels' (a 64-column chunk = its two 32-column
 * halves, low then high), and every output ends in store_output: the bits are the same.
 * bits: 4, 8, or 16 (bf16 weights, used in place). */
static void gemm_many_rows(const int bits, const bf16_t *x, int64_t M, int64_t K,
                           const void *w, const float *scale, const float *bias, int64_t N,
                           void *y, int out_bf16, int nthreads) {
    const __m512i table = int4_table();
    const int64_t nblocks = N / NB;
    int64_t P = (256 * 1024) / (NB * K * (int64_t)sizeof(bf16_t));
    P = P < 1 ? 1 : (P > 16 ? 16 : P);
    const int64_t npanels = (nblocks + P - 1) / P;
#pragma omp parallel num_threads(threads_for(M * N * K, nthreads))
    {
        bf16_t *buf = bits == 16 ? 0
                                 : (bf16_t *)aligned_alloc(64, (size_t)(P * NB * K * sizeof(bf16_t)));
#pragma omp for schedule(static)
        for (int64_t panel = 0; panel < npanels; panel++) {
            const int64_t nb0 = panel * P, nb1 = nb0 + P < nblocks ? nb0 + P : nblocks;
            const bf16_t *wp;
            if (bits == 16) {
                wp = (const bf16_t *)w + nb0 * NB * K;
            } else {
                const int run = 8 * bits;
                for (int64_t nb = nb0; nb < nb1; nb++) {
                    const uint8_t *wblock = (const uint8_t *)w + nb * NB * K * bits / 8;
                    bf16_t *out = buf + (nb - nb0) * NB * K;
                    for (int64_t k = 0; k < K; k += 64) {
                        const uint8_t *chunk = wblock + (k / 64) * NB * run;
                        PREFETCH(chunk, NB * run);
                        for (int j = 0; j < NB; j++) {
                            __m512i lo, hi;
                            if (bits == 4) unpack_run(chunk + j * run, table, &lo, &hi);
                            else unpack_run8((const int8_t *)(chunk + j * run), &lo, &hi);
                            _mm512_store_si512((void *)(out + (k / 32) * NB * 32 + j * 32), lo);
                            _mm512_store_si512((void *)(out + (k / 32 + 1) * NB * 32 + j * 32), hi);
                        }
                    }
                }
                wp = buf;
            }
#define PANEL_BLOCK(mb)                                                                        \
    for (int64_t nb = nb0; nb < nb1; nb++) {                                                   \
        const int64_t n = nb * NB;                                                             \
        block_bf16(mb, x + m * K, K, wp + (nb - nb0) * NB * K, K, scale ? scale + n : 0,       \
                   bias ? bias + n : 0,                                                        \
                   out_bf16 ? (void *)((bf16_t *)y + m * N + n) : (void *)((float *)y + m * N + n), \
                   N, out_bf16, bits == 16 && m == 0);                                         \
    }
            FOR_ROW_BLOCKS_P(M, m, PANEL_BLOCK)
#undef PANEL_BLOCK
        }
        free(buf);
    }
}

static void quant_gemm_rows(const int bits, const bf16_t *x, int64_t M, int64_t K,
                            const uint8_t *w, const float *scale, const float *bias, int64_t N,
                            void *y, int out_bf16, int nthreads) {
    gemm_many_rows(bits, x, M, K, w, scale, bias, N, y, out_bf16, nthreads);
}

/* exp(x) for 16 floats: Cephes' expf range reduction and polynomial (~1 ulp), scaled by 2^n with
 * vscalefps so overflow gives inf and underflow denormals/0 as libm does. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(89.0f)), _mm512_set1_ps(-104.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
    return _mm512_scalef_ps(_mm512_add_ps(p, _mm512_set1_ps(1.0f)), n);
}

/* 16 bf16 <-> 16 floats; the narrowing rounds to nearest even, as torch. */
static inline __m512 load_bf16x16(const bf16_t *p) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline void store_bf16x16(bf16_t *p, __m512 v) {
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v));
}
static inline __m512 round_bf16x16(__m512 v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

/* ---------------------------------------------------------------------------------------------
 * Decode attention: one new query per sequence over that sequence's own KV cache, for a batch of
 * sequences whose caches are separate tensors of different lengths.  Replaces "copy every history
 * into a padded [B, groups, L, hd] tensor, convert to fp32, two batched matmuls" (copies that grow
 * with the histories) with reads in place.
 *
 *   q      bf16 [B, heads, hd]            (heads = groups * per_group; head h reads group h / per_group)
 *   cache  bf16 per sequence b: base[b] + layer * 2 * groups * cap[b] * hd, laid out
 *          [2 (keys, values), groups, cap[b], hd]; positions 0 .. len[b] - 1 are attended
 *   k_new, v_new  bf16 [B, groups, hd]: this step's key/value, first written at position len[b] - 1
 *   out    bf16 [B, heads, hd]
 * Scores and the softmax in fp32, scale 1 / sqrt(hd); the softmax numerators rounded to bf16 and
 * multiplied with the values with fp32 accumulation, divided by their fp32 sum, rounded to bf16
 * once: what torch's CPU flash attention (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp)
 * computes for bf16 inputs, which also hands its bf16 GEMM the numerators in bf16 (ChatGLM-6B: see
 * attend_heads).  hd must be a multiple of 16.  `scratch` holds B * heads * max_len floats.
 */
static inline float bf16_to_f32(bf16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
}

/* Where a block of 16 positions' dot products are reduced: position i of the block in
 * accumulator SLOT(i), so that reduce16 returns them in order (see reduce16). */
#define SLOT(i) (4 * ((i) % 4) + (i) / 4)
/* Query heads of one KV group attended together: each block of 16 keys is read into L1 once
 * for all of them, each pair of value rows loaded and interleaved once (2 accumulators per head
 * and 32 dimensions: 8 heads keep 16 in registers).  Without it every head streamed the group's
 * keys and values from L2/L3 on its own (1 MB per group at 2k positions). */
#define HEAD_BLOCK 8

/* The horizontal sums of a[SLOT(0)] .. a[SLOT(15)] as one vector, in order: a transposed
 * reduction (15 shuffle pairs for 16 sums instead of a reduce per sum).  Every sum adds the same
 * lane pairs in the same order as _mm512_reduce_add_ps (GCC's avx512fintrin.h: lane i + lane
 * i + 8, then i + 4, then i + 2, then i + 1), so each score has the bits of a reduce of its own. */
static inline __attribute__((always_inline)) __m512 reduce16(const __m512 *a) {
    __m512 b[8], d[4], f[2];
#pragma GCC unroll 8
    for (int k = 0; k < 8; k++) /* lanes i and i + 8 of a[2k] (low half), of a[2k + 1] (high) */
        b[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
#pragma GCC unroll 4
    for (int k = 0; k < 4; k++) /* i and i + 4: each 128-bit lane now one source's 4 partials */
        d[k] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
#pragma GCC unroll 2
    for (int k = 0; k < 2; k++) /* i and i + 2 within each 128-bit lane */
        f[k] = _mm512_add_ps(_mm512_shuffle_ps(d[2 * k], d[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(d[2 * k], d[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    /* i and i + 1: lane 4L + j holds source 4j + L, hence SLOT */
    return _mm512_add_ps(_mm512_shuffle_ps(f[0], f[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_ps(f[0], f[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* Scores of nh query heads (rows qstride apart) over positions 0 .. L - 1 into p + h * pstride
 * [0 .. L16 - 1] (L16 = L rounded up to 16; the padding gets -inf), 16 positions at a time (each
 * block of keys read once for all the heads); their maxima into mx[h].  Each score is the query's
 * dot product with the key accumulated over hd in order (one VDPBF16PS per 32 dimensions) and
 * reduced as reduce16 does, then scaled:
 *   glm_coeff == 0 (ChatGLM2/3, torch's fp32 path): score = (q . k) * scale;
 *   glm_coeff > 0 (ChatGLM-6B's attention_fn in bf16; q already divided by sqrt(hd) * coeff as
 *     torch does): score = bf16(q . k) * coeff. */
static inline void attention_scores(const bf16_t *q, int64_t qstride, int nh, const bf16_t *keys,
                                    int64_t L, int64_t hd, float scale, float glm_coeff, float *p,
                                    int64_t pstride, float *mx) {
    __m512 vmx[HEAD_BLOCK];
    for (int h = 0; h < nh; h++) vmx[h] = _mm512_set1_ps(-__builtin_inff());
    for (int64_t t0 = 0; t0 < L; t0 += 16) {
        const bf16_t *row[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) /* past L: any row in bounds; its lane is masked below */
            row[i] = keys + (t0 + i < L ? t0 + i : L - 1) * hd;
        const __mmask16 live = (__mmask16)(L - t0 >= 16 ? 0xFFFF : (1u << (L - t0)) - 1);
        for (int h = 0; h < nh; h++) {
            const bf16_t *qh = q + h * qstride;
            __m512 a[16];
#pragma GCC unroll 16
            for (int i = 0; i < 16; i++) a[i] = _mm512_setzero_ps();
            int64_t d = 0;
            for (; d + 32 <= hd; d += 32) {
                const __m512bh qv = (__m512bh)_mm512_loadu_si512((const void *)(qh + d));
#pragma GCC unroll 16
                for (int i = 0; i < 16; i++)
                    a[SLOT(i)] = _mm512_dpbf16_ps(
                        a[SLOT(i)], qv, (__m512bh)_mm512_loadu_si512((const void *)(row[i] + d)));
            }
            if (d < hd) { /* a last half vector (hd = 16 mod 32), the rest zeros: exact */
                const __m512bh qv = (__m512bh)_mm512_maskz_loadu_epi16(0xFFFF, qh + d);
#pragma GCC unroll 16
                for (int i = 0; i < 16; i++)
                    a[SLOT(i)] = _mm512_dpbf16_ps(
                        a[SLOT(i)], qv, (__m512bh)_mm512_maskz_loadu_epi16(0xFFFF, row[i] + d));
            }
            __m512 sc = reduce16(a);
            sc = glm_coeff > 0 ? _mm512_mul_ps(round_bf16x16(sc), _mm512_set1_ps(glm_coeff))
                               : _mm512_mul_ps(sc, _mm512_set1_ps(scale));
            sc = _mm512_mask_mov_ps(_mm512_set1_ps(-__builtin_inff()), live, sc);
            _mm512_storeu_ps(p + h * pstride + t0, sc);
            vmx[h] = _mm512_max_ps(sc, vmx[h]); /* a NaN score is passed over, as `>` would */
        }
    }
    for (int h = 0; h < nh; h++) mx[h] = _mm512_reduce_max_ps(vmx[h]);
}

/* Scores -> softmax numerators in place (the padding becomes 0); returns 1 / their sum.  With
 * glm_coeff > 0 the probabilities themselves are stored, rounded to bf16 (torch: softmax(...)
 * .to(bf16), then a bf16 matmul). */
static inline float attention_softmax(float *p, int64_t L, float mx, float glm_coeff) {
    __m512 vsum = _mm512_setzero_ps();
    const int64_t L16 = (L + 15) / 16 * 16;
    for (int64_t t = 0; t < L16; t += 16) {
        __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(p + t), _mm512_set1_ps(mx)));
        e = _mm512_mask_mov_ps(_mm512_setzero_ps(),
                               (__mmask16)(L - t >= 16 ? 0xFFFF : (1u << (L - t)) - 1), e);
        _mm512_storeu_ps(p + t, e);
        vsum = _mm512_add_ps(vsum, e);
    }
    const float inv = 1.0f / _mm512_reduce_add_ps(vsum);
    if (glm_coeff > 0)
        for (int64_t t = 0; t < L16; t += 16)
            _mm512_storeu_ps(p + t, round_bf16x16(_mm512_mul_ps(_mm512_loadu_ps(p + t),
                                                                _mm512_set1_ps(inv))));
    return inv;
}

/* out_h = sum_t p_h[t] v_t for NH heads (p_h at p + h * pstride, already bf16: two per float
 * slot, see attend_heads), 32 dimensions at a time with VDPBF16PS: two positions' values
 * interleaved (t, t + 1) once for all NH heads, each head's probability pair broadcast.  Position
 * pairs are accumulated in order, one accumulator per 16 dimensions (lanes in the interleaved
 * order, put back before the store).  glm_coeff <= 0: times inv[h] (the softmax's 1 / sum). */
static inline __attribute__((always_inline)) void attention_values(
    const int NH, const float *p, int64_t pstride, const bf16_t *values, int64_t L, int64_t hd,
    const float *inv, float glm_coeff, bf16_t *out, int64_t ostride) {
    /* dims of the low / high interleaved accumulators back in order (permutex2var indices) */
    const __m512i first = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
    const __m512i second = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10,
                                            9, 8);
    for (int64_t d = 0; d < hd; d += 32) {
        const __mmask32 dims = d + 32 <= hd ? 0xFFFFFFFFu : 0xFFFFu; /* hd = 16 mod 32 */
        __m512 lo[HEAD_BLOCK], hi[HEAD_BLOCK];
#pragma GCC unroll 8
        for (int h = 0; h < NH; h++) lo[h] = hi[h] = _mm512_setzero_ps();
        for (int64_t t = 0; t < L; t += 2) {
            const __m512i a = _mm512_maskz_loadu_epi16(dims, values + t * hd + d);
            /* an odd L's last position pairs with zeros (its probability's partner is 0 too) */
            const __m512i b = t + 1 < L ? _mm512_maskz_loadu_epi16(dims, values + (t + 1) * hd + d)
                                        : _mm512_setzero_si512();
            const __m512bh il = (__m512bh)_mm512_unpacklo_epi16(a, b);
            const __m512bh ih = (__m512bh)_mm512_unpackhi_epi16(a, b);
#pragma GCC unroll 8
            for (int h = 0; h < NH; h++) {
                int32_t pair;
                __builtin_memcpy(&pair, (const bf16_t *)(p + h * pstride) + t, 4);
                const __m512bh pp = (__m512bh)_mm512_set1_epi32(pair);
                lo[h] = _mm512_dpbf16_ps(lo[h], il, pp);
                hi[h] = _mm512_dpbf16_ps(hi[h], ih, pp);
            }
        }
#pragma GCC unroll 8
        for (int h = 0; h < NH; h++) {
            const __m512 scale = _mm512_set1_ps(glm_coeff <= 0 ? inv[h] : 1.0f);
            store_bf16x16(out + h * ostride + d,
                          _mm512_mul_ps(_mm512_permutex2var_ps(lo[h], first, hi[h]), scale));
            if (d + 32 <= hd)
                store_bf16x16(out + h * ostride + d + 16,
                              _mm512_mul_ps(_mm512_permutex2var_ps(lo[h], second, hi[h]), scale));
        }
    }
}

/* nh (1 .. HEAD_BLOCK) query heads that share one KV group (rows qstride apart) over positions
 * 0 .. L - 1 of `keys` / `values` ([L, hd] each): the arithmetic every attention path shares
 * (decode steps, prefill chunks, solo or batched), so a query's output depends only on its own
 * query, keys and values, never on what was computed with it (the heads in a block share loads,
 * not sums).  `p` has room for nh rows of pstride >= L rounded up to 16 floats.  Scores and the
 * softmax in fp32; out = bf16((sum e_t v_t) / sum e_t) (ChatGLM-6B: bf16(sum p_t v_t) with the
 * probabilities p_t rounded to bf16).  Output rows ostride apart. */
static inline void attend_heads(const bf16_t *q, int64_t qstride, int nh, const bf16_t *keys,
                                const bf16_t *values, int64_t L, int64_t hd, float scale,
                                float glm_coeff, float *p, int64_t pstride, bf16_t *out,
                                int64_t ostride) {
    float inv[HEAD_BLOCK], mx[HEAD_BLOCK];
    attention_scores(q, qstride, nh, keys, L, hd, scale, glm_coeff, p, pstride, mx);
    for (int h = 0; h < nh; h++) {
        float *ph = p + h * pstride;
        inv[h] = attention_softmax(ph, L, mx[h], glm_coeff);
        /* the numerators (ChatGLM-6B: the probabilities) as bf16, in place: bf16 t lands at
         * bytes 2t, before float t's; the padding (zeros) pairs with an odd L's last one */
        for (int64_t t = 0; t < L; t += 16)
            _mm256_storeu_si256((__m256i *)((bf16_t *)ph + t),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(ph + t)));
    }
    switch (nh) { /* constant head counts: the accumulators stay in registers */
    case 8: attention_values(8, p, pstride, values, L, hd, inv, glm_coeff, out, ostride); break;
    case 7: attention_values(7, p, pstride, values, L, hd, inv, glm_coeff, out, ostride); break;
    case 6: attention_values(6, p, pstride, values, L, hd, inv, glm_coeff, out, ostride); break;
    case 5: attention_values(5, p, pstride, values, L, hd, inv, glm_coeff, out, ostride); break;
    case 4: attention_values(4, p, pstride, values, L, hd, inv, glm_coeff, out, ostride); break;
    case 3: attention_values(3, p, pstride, values, L, hd, inv, glm_coeff, out, ostride); break;
    case 2: attention_values(2, p, pstride, values, L, hd, inv, glm_coeff, out, ostride); break;
    default: attention_values(1, p, pstride, values, L, hd, inv, glm_coeff, out, ostride); break;
    }
}

/* Heads per attend_heads call: HEAD_BLOCK (or the group's), halved while `items` (sequences or
 * queries, times groups) would give some of the threads no block (a one-sequence decode step on a
 * many-core CPU).  The results do not depend on it: heads in a block share loads, not sums. */
static int64_t head_block(int64_t items, int64_t per_group, int nthreads) {
    int64_t hb = HEAD_BLOCK < per_group ? HEAD_BLOCK : per_group;
    while (hb > 1 && items * ((per_group + hb - 1) / hb) < nthreads) hb = (hb + 1) / 2;
    return hb;
}

void wq_decode_attention(const bf16_t *q, const bf16_t *k_new, const bf16_t *v_new, int64_t B,
                         int64_t heads, int64_t groups, int64_t hd, const int64_t *base,
                         const int64_t *cap, const int64_t *len, int64_t layer, bf16_t *out,
                         float *scratch, int64_t max_len, float glm_coeff, int nthreads) {
    const int64_t per_group = heads / groups;
    const float scale = 1.0f / __builtin_sqrtf((float)hd);
    for (int64_t b = 0; b < B; b++) {
        bf16_t *kv = (bf16_t *)base[b] + layer * 2 * groups * cap[b] * hd;
        for (int64_t g = 0; g < groups; g++) {
            const int64_t at = (g * cap[b] + len[b] - 1) * hd;
            __builtin_memcpy(kv + at, k_new + (b * groups + g) * hd, hd * sizeof(bf16_t));
            __builtin_memcpy(kv + groups * cap[b] * hd + at, v_new + (b * groups + g) * hd,
                             hd * sizeof(bf16_t));
        }
    }
    const int threads = threads_for(B * heads * max_len * hd, nthreads);
    const int64_t hb = head_block(B * groups, per_group, threads);
    const int64_t blocks = (per_group + hb - 1) / hb; /* per group */
#pragma omp parallel for num_threads(threads) \
    schedule(dynamic, 1) collapse(2)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t gb = 0; gb < groups * blocks; gb++) {
            const int64_t g = gb / blocks, first = gb % blocks * hb, h = g * per_group + first;
            const bf16_t *kv = (const bf16_t *)base[b] + layer * 2 * groups * cap[b] * hd;
            attend_heads(q + (b * heads + h) * hd, hd, (int)(per_group - first < hb ? per_group - first : hb),
                         kv + g * cap[b] * hd, kv + (groups + g) * cap[b] * hd, len[b], hd, scale,
                         glm_coeff, scratch + (b * heads + h) * max_len, max_len,
                         out + (b * heads + h) * hd, hd);
        }
    }
}

/* Attention of T queries of ONE sequence (a prefill chunk, or several new positions) over that
 * sequence's cache, whose keys/values for these positions are already stored: query t (heads at
 * q + t * ldq + h * hd) attends positions 0 .. lens[t] - 1 of `kv` (this layer's
 * [2, groups, cap, hd]).  Each (t, h) is computed by attend_heads, exactly as a decode step of
 * that position computes it, so a prompt's results do not depend on how it was split into chunks.
 * out: [T, heads, hd]. */
void wq_prefill_attention(const bf16_t *q, int64_t ldq, int64_t T, int64_t heads, int64_t groups,
                          int64_t hd, const bf16_t *kv, int64_t cap, const int64_t *lens,
                          float glm_coeff, bf16_t *out, int nthreads) {
    const int64_t per_group = heads / groups;
    const float scale = 1.0f / __builtin_sqrtf((float)hd);
    int64_t max_len = 0;
    for (int64_t t = 0; t < T; t++) max_len = lens[t] > max_len ? lens[t] : max_len;
    max_len = (max_len + 15) / 16 * 16;
    const int threads = threads_for(T * heads * max_len * hd, nthreads);
    const int64_t hb = head_block(T * groups, per_group, threads);
    const int64_t blocks = (per_group + hb - 1) / hb; /* per group */
#pragma omp parallel num_threads(threads)
    {
        float *p = (float *)malloc((size_t)(hb * max_len) * sizeof(float));
#pragma omp for schedule(dynamic, 1) collapse(2)
        for (int64_t t = 0; t < T; t++) {
            for (int64_t gb = 0; gb < groups * blocks; gb++) {
                const int64_t g = gb / blocks, first = gb % blocks * hb, h = g * per_group + first;
                attend_heads(q + t * ldq + h * hd, hd,
                             (int)(per_group - first < hb ? per_group - first : hb),
                             kv + g * cap * hd, kv + (groups + g) * cap * hd, lens[t], hd, scale,
                             glm_coeff, p, max_len, out + (t * heads + h) * hd, hd);
            }
        }
        free(p);
    }
}

/* ---------------------------------------------------------------------------------------------
 * The element-wise parts of a ChatGLM2/3 layer in bf16, one call each instead of 8-24 small torch
 * ops (whose dispatch cost showed in every decode step).  Each reproduces modeling_chatglm.py
 * as torch evaluates it in bf16: every torch op computes in fp32 and rounds to bf16, so the same
 * roundings happen here at the same points (RNE, as torch's conversion).  Rows are independent,
 * so results do not depend on how many rows are passed together.
 */

/* RMSNorm: out = bf16(w * (x * rsqrt(mean(x^2) + eps))), variance in fp32.  H % 16 == 0. */
void wq_rms_norm(const bf16_t *x, const bf16_t *w, int64_t M, int64_t H, float eps, bf16_t *out,
                 int nthreads) {
#pragma omp parallel for num_threads(threads_for(M * H, nthreads)) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const bf16_t *row = x + m * H;
        __m512 ss = _mm512_setzero_ps();
        for (int64_t i = 0; i < H; i += 16) {
            const __m512 v = load_bf16x16(row + i);
            ss = _mm512_fmadd_ps(v, v, ss);
        }
        const __m512 r = _mm512_set1_ps(1.0f / __builtin_sqrtf(_mm512_reduce_add_ps(ss) / (float)H + eps));
        for (int64_t i = 0; i < H; i += 16)
            store_bf16x16(out + m * H + i,
                          _mm512_mul_ps(load_bf16x16(w + i), _mm512_mul_ps(load_bf16x16(row + i), r)));
    }
}

/* SwiGLU of h [M, 2F] = [gate | up]: out [M, F] = bf16(bf16(silu(gate)) * up), silu(g) =
 * g / (1 + exp(-g)) as torch's vectorised CPU silu.  F % 16 == 0. */
void wq_swiglu(const bf16_t *h, int64_t M, int64_t F, bf16_t *out, int nthreads) {
    const int64_t chunks = M * (F / 16);
#pragma omp parallel for num_threads(threads_for(M * F, nthreads)) schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t m = c / (F / 16), i = (c % (F / 16)) * 16;
        const bf16_t *gate = h + m * 2 * F, *up = gate + F;
        const __m512 g = load_bf16x16(gate + i);
        const __m512 act = round_bf16x16(_mm512_div_ps(
            g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g)))));
        store_bf16x16(out + m * F + i, _mm512_mul_ps(act, load_bf16x16(up + i)));
    }
}

/* Rotary embedding in place on the first `heads` heads (hd values each) of every row of `x`
 * (row stride `ldx`: the fused q|k|v projection, so queries and keys in one call).  Rotates the
 * interleaved pairs of the first 2 * npairs values of each head by row r's (cos, sin) pairs
 * rope[r, p, 0..1]:  (a, b) -> (a c - b s, b c + a s), every product and sum rounded to bf16. */
void wq_rotary(bf16_t *x, int64_t rows, int64_t ldx, int64_t heads, int64_t hd,
               const bf16_t *rope, int64_t npairs, int nthreads) {
#pragma omp parallel for num_threads(threads_for(rows * heads * npairs * 8, nthreads)) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const bf16_t *cs = rope + r * npairs * 2;
        for (int64_t h = 0; h < heads; h++) {
            bf16_t *v = x + r * ldx + h * hd;
            for (int64_t p = 0; p < npairs; p++) {
                const float c = bf16_to_f32(cs[2 * p]), s = bf16_to_f32(cs[2 * p + 1]);
                const float a = bf16_to_f32(v[2 * p]), b = bf16_to_f32(v[2 * p + 1]);
                const float ac = bf16_to_f32(f32_to_bf16(a * c)), bs = bf16_to_f32(f32_to_bf16(b * s));
                const float bc = bf16_to_f32(f32_to_bf16(b * c)), as = bf16_to_f32(f32_to_bf16(a * s));
                v[2 * p] = f32_to_bf16(ac - bs);
                v[2 * p + 1] = f32_to_bf16(bc + as);
            }
        }
    }
}
