/*
 * Weight-only int4 GEMM for x86-64 CPUs with AVX512-BF16:
 *     y[M, N] = (x[M, K] . (u[N, K] - 8)^T) * scale[N]
 * bf16 activations x, THUDM's per-row int4 weights (one scale per output row), fp32 results.
 * Built and loaded by adapters/native.py (which documents the fallback when it cannot be).
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
 *     sequential stream (2x the bandwidth of NB separate row streams at one activation row,
 *     measured on a 2-core AVX-512 EPYC).
 *
 * Weight layout (adapters/native.py pack_int4): blocks of NB rows; a block is K/64 chunks; a chunk
 * is NB runs of 32 bytes, run j for row j of the block; byte b of the run holds column c + b in its
 * LOW nibble and column c + 32 + b in its HIGH nibble (c = 64 * chunk), as u = q + 8.  K must be a
 * multiple of 64 and N of NB: the caller pads (u = 8, i.e. q = 0).
 *
 * Threads: OpenMP with the thread count the caller passes (torch.get_num_threads()); the library
 * links libgomp.so.1, the soname torch's own OpenMP runtime is loaded under, so both share it.
 */
#include <immintrin.h>
#include <stdint.h>

#define NB 4 /* weight rows (output columns) per register block */
#define MB 4 /* activation rows per register block: MB * NB accumulators + 2 * NB weights */

typedef uint16_t bf16_t;

int wq_block_rows(void) { return NB; }

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

/* Output columns [n, n + NB) for `mb` (1..MB, a constant after inlining) activation rows. */
static inline __attribute__((always_inline)) void block_int4(
    const int mb, const bf16_t *x, int64_t ldx, const uint8_t *wblock, int64_t K,
    const float *scale, float *y, int64_t ldy, __m512i table) {
    __m512 acc[MB][NB];
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < NB; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 64) {
        const uint8_t *chunk = wblock + (k / 64) * NB * 32;
        __m512i wl[NB], wh[NB];
        for (int j = 0; j < NB; j++) unpack_run(chunk + j * 32, table, &wl[j], &wh[j]);
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
        for (int j = 0; j < NB; j++) y[i * ldy + j] = _mm512_reduce_add_ps(acc[i][j]) * scale[j];
}

void wq_int4_gemm(const bf16_t *x, int64_t M, int64_t K, const uint8_t *w, const float *scale,
                  int64_t N, float *y, int nthreads) {
    const __m512i table = int4_table();
    const int64_t nblocks = N / NB;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t nb = 0; nb < nblocks; nb++) {
        const int64_t n = nb * NB;
        const uint8_t *wblock = w + n * (K / 2);
        for (int64_t m = 0; m < M; m += MB) {
            const bf16_t *xm = x + m * K;
            float *ym = y + m * N + n;
            switch (M - m >= MB ? MB : M - m) {
            case 4: block_int4(4, xm, K, wblock, K, scale + n, ym, N, table); break;
            case 3: block_int4(3, xm, K, wblock, K, scale + n, ym, N, table); break;
            case 2: block_int4(2, xm, K, wblock, K, scale + n, ym, N, table); break;
            default: block_int4(1, xm, K, wblock, K, scale + n, ym, N, table); break;
            }
        }
    }
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
 * bf16 weights (the output layer, which THUDM keeps unquantized): y[M, N] = x[M, K] . w[N, K]^T.
 * oneDNN's bf16 GEMM reads a 65024 x 4096 weight at ~17 GB/s for one activation row; the same
 * interleaved layout as above (chunks of 32 columns: NB runs of 32 bf16, one per row) streams it
 * at the memory's rate.  K must be a multiple of 32 and N of NB.
 */
static inline __attribute__((always_inline)) void block_bf16(
    const int mb, const bf16_t *x, int64_t ldx, const bf16_t *wblock, int64_t K, float *y,
    int64_t ldy) {
    __m512 acc[MB][NB];
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < NB; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        const bf16_t *chunk = wblock + (k / 32) * NB * 32;
        __m512i wv[NB];
        for (int j = 0; j < NB; j++) wv[j] = _mm512_loadu_si512((const void *)(chunk + j * 32));
        for (int i = 0; i < mb; i++) {
            __m512bh a = (__m512bh)_mm512_loadu_si512((const void *)(x + i * ldx + k));
            for (int j = 0; j < NB; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a, (__m512bh)wv[j]);
        }
    }
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < NB; j++) y[i * ldy + j] = _mm512_reduce_add_ps(acc[i][j]);
}

void wq_bf16_gemm(const bf16_t *x, int64_t M, int64_t K, const bf16_t *w, int64_t N, float *y,
                  int nthreads) {
    const int64_t nblocks = N / NB;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t nb = 0; nb < nblocks; nb++) {
        const int64_t n = nb * NB;
        const bf16_t *wblock = w + n * K;
        for (int64_t m = 0; m < M; m += MB) {
            const bf16_t *xm = x + m * K;
            float *ym = y + m * N + n;
            switch (M - m >= MB ? MB : M - m) {
            case 4: block_bf16(4, xm, K, wblock, K, ym, N); break;
            case 3: block_bf16(3, xm, K, wblock, K, ym, N); break;
            case 2: block_bf16(2, xm, K, wblock, K, ym, N); break;
            default: block_bf16(1, xm, K, wblock, K, ym, N); break;
            }
        }
    }
}
