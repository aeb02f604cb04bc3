/* y[n, m] = x[n, k] @ W (+ bias[m]) for float32 on CPUs with AVX-512, W stored as column panels.
 *
 * Layout: W [k, m] (input-major) is cut into P = ceil(m / 64) panels of 64 output columns, each stored
 * [k, 64] contiguously (the last one zero-padded): w[P, k, 64]. A panel is read front to back, so a batch-1
 * product streams memory sequentially (the GEMV of decode), and a panel (k * 256 bytes) stays in cache while
 * every group of up to 6 rows of x passes over it (the small GEMMs of batched decode and prefill).
 *
 * Every output y[i, j] is accumulated over p = 0, 1, ..., k-1 in that order, whatever n, the row group or the
 * thread: the result for a row does not depend on the rest of the batch.
 *
 * Built by kernels/native.py with -O3 -mavx512f -mfma -fopenmp; threads are torch's (one libgomp).
 */
#include <immintrin.h>
#include <stdint.h>

#define NR 64 /* output columns per panel: 4 zmm */
#define MR 6  /* rows of x per tile: 24 accumulators + 4 weight registers */

#define TILE(I)                                                                                       \
    static void tile##I(const float *x, int64_t k, const float *w, float *y, int64_t ldy, int64_t cols, \
                        const float *bias) {                                                          \
        __m512 a[I][4];                                                                               \
        for (int i = 0; i < I; i++)                                                                   \
            for (int j = 0; j < 4; j++) a[i][j] = _mm512_setzero_ps();                                \
        for (int64_t p = 0; p < k; p++) {                                                             \
            const float *wp = w + p * NR;                                                             \
            __m512 w0 = _mm512_loadu_ps(wp), w1 = _mm512_loadu_ps(wp + 16);                           \
            __m512 w2 = _mm512_loadu_ps(wp + 32), w3 = _mm512_loadu_ps(wp + 48);                      \
            for (int i = 0; i < I; i++) {                                                             \
                __m512 b = _mm512_set1_ps(x[i * k + p]);                                              \
                a[i][0] = _mm512_fmadd_ps(b, w0, a[i][0]);                                            \
                a[i][1] = _mm512_fmadd_ps(b, w1, a[i][1]);                                            \
                a[i][2] = _mm512_fmadd_ps(b, w2, a[i][2]);                                            \
                a[i][3] = _mm512_fmadd_ps(b, w3, a[i][3]);                                            \
            }                                                                                         \
        }                                                                                             \
        for (int j = 0; j < 4 && cols > 16 * j; j++) {                                                \
            int64_t left = cols - 16 * j;                                                             \
            __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);          \
            __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + 16 * j) : _mm512_setzero_ps();      \
            for (int i = 0; i < I; i++) _mm512_mask_storeu_ps(y + i * ldy + 16 * j, mask, _mm512_add_ps(a[i][j], bv)); \
        }                                                                                             \
    }

TILE(1)
TILE(2)
TILE(3)
TILE(4)
TILE(5)
TILE(6)

int panel_linear_abi(void) { return 1; }

void panel_linear_f32(const float *x, const float *w, const float *bias, float *y, int64_t n, int64_t k,
                      int64_t m) {
    const int64_t panels = (m + NR - 1) / NR, groups = (n + MR - 1) / MR;
    /* One task per (panel, row group), panel-major: a thread's consecutive tasks reuse its panel. Threads
     * only when there is enough work to pay for waking them (about 32k multiply-adds per lane group). */
#pragma omp parallel for schedule(static) if (panels * groups * k >= 2048)
    for (int64_t t = 0; t < panels * groups; t++) {
        const int64_t q = t / groups, i = (t % groups) * MR;
        const int64_t cols = m - q * NR < NR ? m - q * NR : NR, rows = n - i < MR ? n - i : MR;
        const float *xi = x + i * k, *wq = w + q * k * NR, *bq = bias ? bias + q * NR : 0;
        float *yi = y + i * m + q * NR;
        switch (rows) {
            case 1: tile1(xi, k, wq, yi, m, cols, bq); break;
            case 2: tile2(xi, k, wq, yi, m, cols, bq); break;
            case 3: tile3(xi, k, wq, yi, m, cols, bq); break;
            case 4: tile4(xi, k, wq, yi, m, cols, bq); break;
            case 5: tile5(xi, k, wq, yi, m, cols, bq); break;
            default: tile6(xi, k, wq, yi, m, cols, bq); break;
        }
    }
}
