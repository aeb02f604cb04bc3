/* float32 CPU kernels for AVX-512, called through ctypes (kernels/native.py builds this file).
 *
 * panel_linear_f32: y[n, m] = x[n, k] @ W (+ bias[m]), the linear layer of every decode and prefill step.
 * swiglu_f32:       y = (silu(x @ G) * (x @ U)) @ D in one call (dense MLPs, shared and routed experts).
 * rms_norm_f32:     x * rsqrt(mean(x^2) + eps) (* w).
 *
 * Weight layout: W [k, m] (input-major) is cut into P = ceil(m / 64) panels of 64 output columns, each stored
 * [k, 64] contiguously (the last one zero-padded): w[P, k, 64]. A panel is read front to back, so a batch-1
 * product streams memory sequentially (the GEMV of decode), and a panel (k * 256 bytes) stays in cache while
 * every group of up to 6 rows of x passes over it (the small GEMMs of batched decode and prefill).
 *
 * Every output y[i, j] is accumulated over p = 0, 1, ..., k-1 in that order, whatever n, the row group or the
 * thread, and the activation is elementwise: the result for a row does not depend on the rest of the batch.
 *
 * Built with -O3 -mavx512f -mfma -fopenmp; the OpenMP threads are torch's (one libgomp in the process).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define NR 64 /* output columns per panel: 4 zmm */
#define MR 6  /* rows of x per tile: 24 accumulators + 4 weight registers */

#define TILE(I)                                                                                          \
    static void tile##I(const float *x, int64_t ldx, int64_t k, const float *w, float *y, int64_t ldy,     \
                        int64_t cols, const float *bias) {                                               \
        __m512 a[I][4];                                                                                  \
        for (int i = 0; i < I; i++)                                                                      \
            for (int j = 0; j < 4; j++) a[i][j] = _mm512_setzero_ps();                                   \
        for (int64_t p = 0; p < k; p++) {                                                                \
            const float *wp = w + p * NR;                                                                \
            __m512 w0 = _mm512_loadu_ps(wp), w1 = _mm512_loadu_ps(wp + 16);                              \
            __m512 w2 = _mm512_loadu_ps(wp + 32), w3 = _mm512_loadu_ps(wp + 48);                         \
            for (int i = 0; i < I; i++) {                                                                \
                __m512 b = _mm512_set1_ps(x[i * ldx + p]);                                               \
                a[i][0] = _mm512_fmadd_ps(b, w0, a[i][0]);                                               \
                a[i][1] = _mm512_fmadd_ps(b, w1, a[i][1]);                                               \
                a[i][2] = _mm512_fmadd_ps(b, w2, a[i][2]);                                               \
                a[i][3] = _mm512_fmadd_ps(b, w3, a[i][3]);                                               \
            }                                                                                            \
        }                                                                                                \
        for (int j = 0; j < 4 && cols > 16 * j; j++) {                                                   \
            int64_t left = cols - 16 * j;                                                                \
            __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);             \
            __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + 16 * j) : _mm512_setzero_ps();         \
            for (int i = 0; i < I; i++)                                                                  \
                _mm512_mask_storeu_ps(y + i * ldy + 16 * j, mask, _mm512_add_ps(a[i][j], bv));           \
        }                                                                                                \
    }

TILE(1)
TILE(2)
TILE(3)
TILE(4)
TILE(5)
TILE(6)

/* One (panel, row group) task of y = x @ W: tasks are numbered panel-major, so a thread's consecutive tasks
 * reuse its panel. */
static void linear_task(int64_t t, int64_t groups, const float *x, int64_t ldx, const float *w, const float *bias,
                        float *y, int64_t ldy, int64_t n, int64_t k, int64_t m) {
    const int64_t q = t / groups, i = (t % groups) * MR;
    const int64_t cols = m - q * NR < NR ? m - q * NR : NR, rows = n - i < MR ? n - i : MR;
    const float *xi = x + i * ldx, *wq = w + q * k * NR, *bq = bias ? bias + q * NR : 0;
    float *yi = y + i * ldy + q * NR;
    switch (rows) {
        case 1: tile1(xi, ldx, k, wq, yi, ldy, cols, bq); break;
        case 2: tile2(xi, ldx, k, wq, yi, ldy, cols, bq); break;
        case 3: tile3(xi, ldx, k, wq, yi, ldy, cols, bq); break;
        case 4: tile4(xi, ldx, k, wq, yi, ldy, cols, bq); break;
        case 5: tile5(xi, ldx, k, wq, yi, ldy, cols, bq); break;
        default: tile6(xi, ldx, k, wq, yi, ldy, cols, bq); break;
    }
}

static int64_t num_tasks(int64_t n, int64_t m) { return ((m + NR - 1) / NR) * ((n + MR - 1) / MR); }

/* Threads only when there is enough work to pay for waking them. */
#define WORTH_THREADS(tasks, k) ((tasks) * (k) >= 2048)

void panel_linear_f32(const float *x, const float *w, const float *bias, float *y, int64_t n, int64_t k,
                      int64_t m) {
    const int64_t tasks = num_tasks(n, m), groups = (n + MR - 1) / MR;
#pragma omp parallel for schedule(static) if (WORTH_THREADS(tasks, k))
    for (int64_t t = 0; t < tasks; t++) linear_task(t, groups, x, k, w, bias, y, m, n, k, m);
}

/* silu(g) * u for 16 lanes: g / (1 + exp(-g)) * u with exp(-g) = 2^j * e^r, |r| <= ln2 / 2, a degree-6
 * polynomial for e^r (relative error about 2e-7, like expf) and the power of two applied by scalef. */
static inline __m512 silu_mul16(__m512 g, __m512 u) {
    const __m512 z = _mm512_max_ps(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), g), _mm512_set1_ps(88.0f)),
                                   _mm512_set1_ps(-88.0f));
    const __m512 j = _mm512_roundscale_ps(_mm512_mul_ps(z, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(j, _mm512_set1_ps(0.693145751953125f), z);
    r = _mm512_fnmadd_ps(j, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    const __m512 e = _mm512_scalef_ps(p, j);
    return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), u);
}

/* out[r, c] = silu(gu[r, c]) * gu[r, inter + c] for rows of gu [rows, 2 * inter] (out may alias gu's gate half:
 * each element is read before it is written). */
static void silu_mul_row(const float *gu, float *out, int64_t inter) {
    int64_t c = 0;
    for (; c + 16 <= inter; c += 16)
        _mm512_storeu_ps(out + c, silu_mul16(_mm512_loadu_ps(gu + c), _mm512_loadu_ps(gu + inter + c)));
    if (c < inter) {
        const __mmask16 mask = (__mmask16)((1u << (inter - c)) - 1);
        _mm512_mask_storeu_ps(out + c, mask, silu_mul16(_mm512_maskz_loadu_ps(mask, gu + c),
                                                        _mm512_maskz_loadu_ps(mask, gu + inter + c)));
    }
}

/* y[n, h] = (silu(x @ G) * (x @ U)) @ D: gate_up panels of [h, 2 * inter] (gate = first inter columns), down
 * panels of [inter, h]; scratch holds n * 2 * inter floats. One parallel region, three phases. */
void swiglu_f32(const float *x, const float *gate_up, const float *down, float *scratch, float *y, int64_t n,
                int64_t h, int64_t inter) {
    const int64_t t1 = num_tasks(n, 2 * inter), t2 = num_tasks(n, h), groups = (n + MR - 1) / MR;
#pragma omp parallel if (WORTH_THREADS(t1, h))
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < t1; t++) linear_task(t, groups, x, h, gate_up, 0, scratch, 2 * inter, n, h, 2 * inter);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) silu_mul_row(scratch + r * 2 * inter, scratch + r * 2 * inter, inter);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < t2; t++) linear_task(t, groups, scratch, 2 * inter, down, 0, y, h, n, inter, h);
    }
}

/* rms_norm_f32: y[r] = x[r] * rsqrt(mean(x[r]^2) + eps) (* w when w is not NULL), rows of d floats. */
void rms_norm_f32(const float *x, const float *w, float *y, int64_t rows, int64_t d, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        float *yr = y + r * d;
        __m512 acc = _mm512_setzero_ps();
        int64_t p = 0;
        for (; p + 16 <= d; p += 16) {
            __m512 v = _mm512_loadu_ps(xr + p);
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        float sum = _mm512_reduce_add_ps(acc);
        for (; p < d; p++) sum += xr[p] * xr[p];
        const float scale = 1.0f / sqrtf(sum / (float)d + eps);
        for (p = 0; p < d; p++) yr[p] = w ? xr[p] * scale * w[p] : xr[p] * scale;
    }
}
