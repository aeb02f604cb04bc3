/* float32 CPU kernels for AVX-512, called through ctypes (kernels/native.py builds this file).
 *
 * panel_linear_f32: y[n, m] = x[n, k] @ W (+ bias[m]), the linear layer of every decode and prefill step.
 * swiglu_f32:       y = (silu(x @ G) * (x @ U)) @ D in one call (dense MLPs, shared and routed experts).
 * rms_norm_f32:     x * rsqrt(mean(x^2) + eps) (* w).
 * decode_layer_f32: a whole decoder layer for a step in which every sequence decodes one token.
 * pack_dispatch_f32: the router's dispatch blocks (actors/parallel/router.py) without a torch op per index.
 *
 * Weight layout: W [k, m] (input-major) is cut into P = ceil(m / 64) panels of 64 output columns, each stored
 * [k, 64] contiguously (the last one zero-padded): w[P, k, 64]. A panel is read front to back, so a batch-1
 * product streams memory sequentially (the GEMV of decode), and a panel (k * 256 bytes) stays in cache while
 * every group of up to 6 rows of x passes over it (the small GEMMs of batched decode and prefill).
 *
 * Every output y[i, j] is accumulated over p = 0, 1, ..., k-1 in that order, whatever n, the row group or the
 * thread, and the activation is elementwise: the result for a row does not depend on the rest of the batch.
 *
 * Built with -O3 -mavx512f -mavx2 -mfma -fopenmp; the OpenMP threads are torch's (one libgomp in the process).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NR 64 /* output columns per panel: 4 zmm */
#define MR 6  /* rows of x per tile: 24 accumulators + 4 weight registers */

/* A weight as the kernels take it: panels of one of three kinds (kernels/linear.py builds them).
 *   PANEL_F32  data float [P, k, 64].
 *   PANEL_FP8  data e4m3 bytes [P, k, 64]; scales [P * 64], the column scales times 256.
 *   PANEL_INT4 data [P, k, 32] bytes, byte b of a row = column b (low nibble) | column b + 32 (high), each code + 8;
 *              scales [P, k / group, 64].
 * Quantized panels are dequantized to fp32 in registers as they stream by, so a batch-1 product reads a quarter
 * (fp8) or an eighth (int4) of the float32 bytes. */
enum { PANEL_F32 = 0, PANEL_FP8 = 1, PANEL_INT4 = 2 };
typedef struct {
    const void *data;
    const float *scales;
    int64_t kind, group;
} Panels;

/* Software prefetch into L2 some 32 KB ahead of the panel row being read: a decode GEMV over a 1-3 MB matrix
 * (one that ends before the hardware prefetcher ramps up) streams at about 29 instead of 25 GB/s here. */
#define PREFETCH_BYTES 32768
static inline void prefetch_lines(const void *at, int bytes) {
    for (int line = 0; line < bytes; line += 64) _mm_prefetch((const char *)at + PREFETCH_BYTES + line, _MM_HINT_T1);
}

/* 16 e4m3 bytes -> 16 floats, each 2^-8 times its value: the byte moved into fp16's bit positions (sign to bit
 * 15, exponent and mantissa to bits 7..13) is an fp16 of 2^-8 times the e4m3 value, subnormals included, and
 * vcvtph2ps converts it exactly. Sign-extending the byte to 16 bits and shifting by 7 puts the sign in bits 14
 * and 15; one AND clears bit 14 (three integer ops per 16 weights). */
static inline __m512 fp8x16(const uint8_t *p) {
    const __m256i t = _mm256_slli_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p)), 7);
    return _mm512_cvtph_ps(_mm256_and_si256(t, _mm256_set1_epi16((short)0xBFFF)));
}

/* -8 x the group's scales: an int4 weight (c - 8) * s is computed as fma(c, s, -8 s), exactly the same float
 * (8 s is exact, and the fma rounds the exact (c - 8) * s once, as the product did). */
#define INT4_OFFSETS                                                                                    \
    const __m512 m8 = _mm512_set1_ps(-8.0f);                                                            \
    const __m512 n0 = _mm512_mul_ps(s0, m8), n1 = _mm512_mul_ps(s1, m8);                                \
    const __m512 n2 = _mm512_mul_ps(s2, m8), n3 = _mm512_mul_ps(s3, m8);

/* The 4 weight vectors of panel row p, columns 0-15, 16-31, 32-47, 48-63. */
#define LOAD_F32(p)                                                                                     \
    const float *wp = (const float *)W->data + (q * k + (p)) * NR;                                      \
    prefetch_lines(wp, NR * 4);                                                                         \
    __m512 w0 = _mm512_loadu_ps(wp), w1 = _mm512_loadu_ps(wp + 16);                                     \
    __m512 w2 = _mm512_loadu_ps(wp + 32), w3 = _mm512_loadu_ps(wp + 48);
#define LOAD_FP8(p)                                                                                     \
    const uint8_t *bp = (const uint8_t *)W->data + (q * k + (p)) * NR;                                  \
    prefetch_lines(bp, NR);                                                                             \
    __m512 w0 = fp8x16(bp), w1 = fp8x16(bp + 16), w2 = fp8x16(bp + 32), w3 = fp8x16(bp + 48);
#define LOAD_INT4(p)                                                                                    \
    const uint8_t *bp = (const uint8_t *)W->data + (q * k + (p)) * (NR / 2);                            \
    if (((p) & 1) == 0) prefetch_lines(bp, 64);                                                         \
    const __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)bp));                     \
    const __m512i b1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(bp + 16)));               \
    const __m512i lo = _mm512_set1_epi32(0xF);                                                          \
    __m512 w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b0, lo)), s0, n0);                  \
    __m512 w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b1, lo)), s1, n1);                  \
    __m512 w2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b0, 4)), s2, n2);                  \
    __m512 w3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b1, 4)), s3, n3);

/* y[I rows, cols] = x[I rows, k] @ panel q of W (+ bias); int4 rows are walked group by group, the group's 4 scale
 * vectors in registers; fp8 column scales are applied once, at the end. */
#define TILE(KIND, I)                                                                                   \
    static void tile_##KIND##I(const float *x, int64_t ldx, int64_t k, const Panels *W, int64_t q,      \
                               float *y, int64_t ldy, int64_t cols, const float *bias) {                \
        __m512 a[I][4];                                                                                 \
        for (int i = 0; i < I; i++)                                                                     \
            for (int j = 0; j < 4; j++) a[i][j] = _mm512_setzero_ps();                                  \
        const int64_t group = PANEL_##KIND == PANEL_INT4 ? W->group : k;                                \
        for (int64_t g0 = 0; g0 < k; g0 += group) {                                                     \
            __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;                                 \
            if (PANEL_##KIND == PANEL_INT4) {                                                           \
                const float *sp = W->scales + (q * (k / group) + g0 / group) * NR;                      \
                s0 = _mm512_loadu_ps(sp), s1 = _mm512_loadu_ps(sp + 16);                                \
                s2 = _mm512_loadu_ps(sp + 32), s3 = _mm512_loadu_ps(sp + 48);                           \
            }                                                                                           \
            INT4_OFFSETS                                                                                \
            (void)s0, (void)s1, (void)s2, (void)s3, (void)n0, (void)n1, (void)n2, (void)n3;             \
            for (int64_t p = g0; p < g0 + group; p++) {                                                 \
                LOAD_##KIND(p)                                                                          \
                for (int i = 0; i < I; i++) {                                                           \
                    __m512 b = _mm512_set1_ps(x[i * ldx + p]);                                          \
                    a[i][0] = _mm512_fmadd_ps(b, w0, a[i][0]);                                          \
                    a[i][1] = _mm512_fmadd_ps(b, w1, a[i][1]);                                          \
                    a[i][2] = _mm512_fmadd_ps(b, w2, a[i][2]);                                          \
                    a[i][3] = _mm512_fmadd_ps(b, w3, a[i][3]);                                          \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
        for (int j = 0; j < 4 && cols > 16 * j; j++) {                                                  \
            int64_t left = cols - 16 * j;                                                               \
            __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);            \
            __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + 16 * j) : _mm512_setzero_ps();        \
            __m512 sv = PANEL_##KIND == PANEL_FP8 ? _mm512_loadu_ps(W->scales + q * NR + 16 * j)        \
                                                   : _mm512_set1_ps(1.0f);                              \
            for (int i = 0; i < I; i++)                                                                 \
                _mm512_mask_storeu_ps(y + i * ldy + 16 * j, mask, _mm512_fmadd_ps(a[i][j], sv, bv));    \
        }                                                                                               \
    }

#define TILES(KIND) TILE(KIND, 1) TILE(KIND, 2) TILE(KIND, 3) TILE(KIND, 4) TILE(KIND, 5) TILE(KIND, 6)
TILES(F32)
TILES(FP8)
TILES(INT4)

#define DISPATCH(KIND)                                                                                  \
    switch (rows) {                                                                                     \
        case 1: tile_##KIND##1(xi, ldx, k, w, q, yi, ldy, cols, bq); break;                             \
        case 2: tile_##KIND##2(xi, ldx, k, w, q, yi, ldy, cols, bq); break;                             \
        case 3: tile_##KIND##3(xi, ldx, k, w, q, yi, ldy, cols, bq); break;                             \
        case 4: tile_##KIND##4(xi, ldx, k, w, q, yi, ldy, cols, bq); break;                             \
        case 5: tile_##KIND##5(xi, ldx, k, w, q, yi, ldy, cols, bq); break;                             \
        default: tile_##KIND##6(xi, ldx, k, w, q, yi, ldy, cols, bq); break;                            \
    }

/* Batched products over quantized panels: a thread decodes panel q once into fp32 (exactly the vectors the
 * quantized tiles compute, the fp8 column scale still to apply) and runs the float tiles over it for every row
 * group, so the decoding is not repeated per 6 rows. Results equal the quantized tiles' bit for bit. */
static __thread float *panel_buf;
static __thread int64_t panel_cap, cached_q;
static __thread const Panels *cached_w;

static void decode_panel(const Panels *W, int64_t q, int64_t k, float *out) {
    const int64_t group = W->kind == PANEL_INT4 ? W->group : k;
    for (int64_t g0 = 0; g0 < k; g0 += group) {
        __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        if (W->kind == PANEL_INT4) {
            const float *sp = W->scales + (q * (k / group) + g0 / group) * NR;
            s0 = _mm512_loadu_ps(sp), s1 = _mm512_loadu_ps(sp + 16);
            s2 = _mm512_loadu_ps(sp + 32), s3 = _mm512_loadu_ps(sp + 48);
        }
        INT4_OFFSETS
        for (int64_t p = g0; p < g0 + group; p++) {
            float *o = out + p * NR;
            if (W->kind == PANEL_INT4) {
                LOAD_INT4(p)
                _mm512_storeu_ps(o, w0), _mm512_storeu_ps(o + 16, w1);
                _mm512_storeu_ps(o + 32, w2), _mm512_storeu_ps(o + 48, w3);
            } else {
                LOAD_FP8(p)
                _mm512_storeu_ps(o, w0), _mm512_storeu_ps(o + 16, w1);
                _mm512_storeu_ps(o + 32, w2), _mm512_storeu_ps(o + 48, w3);
            }
        }
    }
}

static const float *decoded_panel(const Panels *w, int64_t q, int64_t k) {
    if (cached_w != w || cached_q != q) {
        if (panel_cap < k * NR) {
            free(panel_buf);
            panel_buf = (float *)aligned_alloc(64, (size_t)k * NR * sizeof(float));
            panel_cap = k * NR;
        }
        decode_panel(w, q, k, panel_buf);
        cached_w = w, cached_q = q;
    }
    return panel_buf;
}

/* One (panel, row group) task of y = x @ W: tasks are numbered panel-major, so a thread's consecutive tasks
 * reuse its panel. */
static void linear_task(int64_t t, int64_t groups, const float *x, int64_t ldx, const Panels *w, const float *bias,
                        float *y, int64_t ldy, int64_t n, int64_t k, int64_t m) {
    const int64_t q = t / groups, i = (t % groups) * MR;
    const int64_t cols = m - q * NR < NR ? m - q * NR : NR, rows = n - i < MR ? n - i : MR;
    const float *xi = x + i * ldx;
    const float *bq = bias ? bias + q * NR : 0;
    float *yi = y + i * ldy + q * NR;
    if (w->kind != PANEL_F32 && n > MR) {
        const Panels decoded = {decoded_panel(w, q, k), 0, PANEL_F32, 0}, *quantized = w;
        const int is_fp8 = w->kind == PANEL_FP8;
        if (is_fp8) bq = 0; /* bias after the column scale, below */
        {
            const Panels *w = &decoded;
            const int64_t q = 0;
            DISPATCH(F32)
        }
        if (is_fp8) /* y = acc * scale + bias, as the fp8 tile ends */
            for (int j = 0; j < 4 && cols > 16 * j; j++) {
                const int64_t left = cols - 16 * j;
                const __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
                const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + q * NR + 16 * j) : _mm512_setzero_ps();
                const __m512 sv = _mm512_loadu_ps(quantized->scales + q * NR + 16 * j);
                for (int64_t r = 0; r < rows; r++) {
                    float *yr = yi + r * ldy + 16 * j;
                    _mm512_mask_storeu_ps(yr, mask, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, yr), sv, bv));
                }
            }
    } else if (w->kind == PANEL_FP8) {
        DISPATCH(FP8)
    } else if (w->kind == PANEL_INT4) {
        DISPATCH(INT4)
    } else {
        DISPATCH(F32)
    }
}

static int64_t num_tasks(int64_t n, int64_t m) { return ((m + NR - 1) / NR) * ((n + MR - 1) / MR); }

/* y[n, m] = x[n, k] @ W (+ bias) over the panels, rows of x ldx floats apart; the tasks are shared by the
 * threads of the enclosing parallel region. */
static void linear_for(const float *x, int64_t ldx, const Panels *w, const float *bias, float *y, int64_t n, int64_t k,
                       int64_t m) {
    const int64_t tasks = num_tasks(n, m), groups = (n + MR - 1) / MR;
    cached_w = 0; /* every thread of the region passes here: no decoded panel outlives a call */
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; t++) linear_task(t, groups, x, ldx, w, bias, y, m, n, k, m);
}

/* Threads only when there is enough work to pay for waking them. */
#define WORTH_THREADS(tasks, k) ((tasks) * (k) >= 2048)

void panel_linear_f32(const float *x, const Panels *w, const float *bias, float *y, int64_t n, int64_t k,
                      int64_t m) {
#pragma omp parallel if (WORTH_THREADS(num_tasks(n, m), k))
    linear_for(x, k, w, bias, y, n, k, m);
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

/* ------------------------------------------------------------------------------------------------------------
 * decode_layer_f32: one decoder layer for n sequences decoding one token each, in one parallel region: a decode
 * step without a torch op per norm, rotation, gather or expert group (actors/fused_decode.py drives it; the
 * torch path in actors/model.py is the definition it is tested against).
 *
 * x [n, H] is the residual stream, updated in place: x += attention(rms_norm(x)); x += ffn(rms_norm(x)), where
 * ffn is the dense MLP, or (MoE layers, top-1) shared_expert(xn) + expert_e(xn * sigmoid(router_e(xn))).
 * Every row is computed the same way whatever the other rows are.
 *
 * Split at the router (MoE layers with routed_rows set; the routed experts live in other processes): the call
 * leaves x += attention(...), each row's expert in chosen, its score-scaled row xn * sigmoid(router_e(xn)) in
 * routed_rows and shared_expert(xn) in shared_rows (row order); the caller sends routed_rows to the experts and
 * adds shared + routed to x. The shared expert runs before the rows leave: while the expert processes compute,
 * this one's threads would only take their cores.
 * ---------------------------------------------------------------------------------------------------------- */
typedef struct {
    int64_t hidden, q_heads, kv_heads, head_dim;
    float eps, scale; /* RMSNorm / QK-norm epsilon; attention scale (head_dim^-0.5) */
} DecodeDims;

typedef struct {
    const float *input_norm, *post_norm;      /* [H] */
    const Panels *qkv; const float *qkv_bias; /* panels [H, (Hq + 2 Hkv) D]; bias or NULL */
    const Panels *o; const float *o_bias;     /* panels [Hq D, H]; bias or NULL */
    const Panels *router;                     /* panels [H, E], NULL for a dense layer */
    const Panels *mlp_gate_up, *mlp_down;     /* shared expert (MoE layers) or dense MLP: panels */
    const Panels *const *expert_gate_up;      /* [E] panels [H, 2 I] (MoE layers) */
    const Panels *const *expert_down;         /* [E] panels [I, H] */
    int64_t mlp_inter, expert_inter, num_experts;
    float *k_cache, *v_cache;                 /* this layer's pool: [slots, Hkv, D] */
    const int64_t *ctx_slots;                 /* every row's context slots, in position order, row after row */
    const int64_t *ctx_offsets;               /* [n + 1]: row r's are ctx_slots[ctx_offsets[r] .. ctx_offsets[r+1]) */
    const int64_t *write_slots;               /* [n]; < 0: that token's k/v are not kept */
    const float *rope;                        /* [n, D / 2, 2] (cos, sin), NULL on NoPE layers */
    const float *q_scales;                    /* [n] NoPE temperature tuning, or NULL */
    int32_t qk_norm;                          /* L2-normalise q and k heads after RoPE */
    float *routed_rows, *shared_rows;         /* [n, H] each, or NULL; see "split at the router" above */
} DecodeLayer;

static void swiglu_for(const float *x, const Panels *gate_up, const Panels *down, float *act, float *y, int64_t n,
                       int64_t h, int64_t inter) {
    linear_for(x, h, gate_up, 0, act, n, h, 2 * inter);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; r++) silu_mul_row(act + r * 2 * inter, act + r * 2 * inter, inter);
    linear_for(act, 2 * inter, down, 0, y, n, inter, h);
}

/* y[n, h] = (silu(x @ G) * (x @ U)) @ D: gate_up panels of [h, 2 * inter] (gate = first inter columns), down
 * panels of [inter, h]; scratch holds n * 2 * inter floats. One parallel region, three phases. */
void swiglu_f32(const float *x, const Panels *gate_up, const Panels *down, float *scratch, float *y, int64_t n,
                int64_t h, int64_t inter) {
#pragma omp parallel if (WORTH_THREADS(num_tasks(n, 2 * inter), h))
    swiglu_for(x, gate_up, down, scratch, y, n, h, inter);
}

static void rotate_heads(float *heads, int64_t n, int64_t d, const float *rope) {
    for (int64_t h = 0; h < n; h++)
        for (int64_t i = 0; i < d / 2; i++) {
            float *p = heads + h * d + 2 * i;
            const float re = p[0], im = p[1], c = rope[2 * i], s = rope[2 * i + 1];
            p[0] = re * c - im * s;
            p[1] = re * s + im * c;
        }
}

static inline float dot(const float *a, const float *b, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    float s = _mm512_reduce_add_ps(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* out[D] = softmax(q . keys * scale) @ values over n context slots and the token's own k/v (kv head g). */
static void attend_head(const float *q, const float *own_k, const float *own_v, const int64_t *slots, int64_t n,
                        const DecodeLayer *L, int64_t g, const DecodeDims *d, float *scores, float *out) {
    const int64_t dim = d->head_dim, stride = d->kv_heads * dim;
    float top = -INFINITY;
    for (int64_t j = 0; j <= n; j++) {
        const float *key = j < n ? L->k_cache + slots[j] * stride + g * dim : own_k;
        scores[j] = dot(q, key, dim) * d->scale;
        top = scores[j] > top ? scores[j] : top;
    }
    float total = 0.0f;
    for (int64_t j = 0; j <= n; j++) total += scores[j] = expf(scores[j] - top);
    for (int64_t i = 0; i < dim; i++) out[i] = 0.0f;
    for (int64_t j = 0; j <= n; j++) {
        const float *value = j < n ? L->v_cache + slots[j] * stride + g * dim : own_v;
        const float p = scores[j] / total;
        for (int64_t i = 0; i < dim; i++) out[i] += p * value[i];
    }
}

/* The first of the largest logits (the routed expert of top-1 routing). */
static inline int64_t top1(const float *logits, int64_t num_e) {
    int64_t best = 0;
    for (int64_t e = 1; e < num_e; e++) best = logits[e] > logits[best] ? e : best;
    return best;
}

/* Scratch for n rows whose longest context has max_ctx slots: decode_scratch_floats(...) floats and
 * n + E + 1 int64. chosen [n]: each row's routed expert on MoE layers. */
int64_t decode_scratch_floats(const DecodeDims *d, int64_t n, int64_t num_experts, int64_t max_inter, int64_t max_ctx) {
    const int64_t width = (d->q_heads + 2 * d->kv_heads) * d->head_dim;
    return n * (5 * d->hidden + width + d->q_heads * d->head_dim + num_experts + 2 * max_inter +
                d->q_heads * (max_ctx + 1));
}

void decode_layer_f32(const DecodeLayer *L, const DecodeDims *d, int64_t n, float *x, float *scratch,
                      int64_t *iscratch, int64_t *chosen) {
    const int64_t h = d->hidden, dim = d->head_dim, hq = d->q_heads, hkv = d->kv_heads, group = hq / hkv;
    const int64_t width = (hq + 2 * hkv) * dim, num_e = L->router ? L->num_experts : 0;
    const int64_t max_inter = L->mlp_inter > L->expert_inter ? L->mlp_inter : L->expert_inter;
    int64_t max_ctx = 0;
    for (int64_t r = 0; r < n; r++) {
        const int64_t len = L->ctx_offsets[r + 1] - L->ctx_offsets[r];
        max_ctx = len > max_ctx ? len : max_ctx;
    }
    float *xn = scratch, *qkv = xn + n * h, *attn = qkv + n * width, *tmp = attn + n * hq * dim;
    float *routed_in = tmp + n * h, *routed = routed_in + n * h, *shared = routed + n * h;
    float *logits = shared + n * h, *act = logits + n * num_e, *scores = act + n * 2 * max_inter;
    int64_t *order = iscratch, *start = iscratch + n; /* rows sorted by expert; expert e's rows from start[e] */
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) rms_norm_f32(x + r * h, L->input_norm, xn + r * h, 1, h, d->eps);
        linear_for(xn, h, L->qkv, L->qkv_bias, qkv, n, h, width);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            float *q = qkv + r * width, *k = q + hq * dim, *v = k + hkv * dim;
            if (L->rope) {
                rotate_heads(q, hq + hkv, dim, L->rope + r * dim); /* q and k heads are adjacent */
                if (L->qk_norm) rms_norm_f32(q, 0, q, hq + hkv, dim, d->eps);
            }
            if (L->q_scales)
                for (int64_t i = 0; i < hq * dim; i++) q[i] *= L->q_scales[r];
            const int64_t slot = L->write_slots[r];
            if (slot >= 0)
                for (int64_t i = 0; i < hkv * dim; i++) {
                    L->k_cache[slot * hkv * dim + i] = k[i];
                    L->v_cache[slot * hkv * dim + i] = v[i];
                }
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n * hq; t++) {
            const int64_t r = t / hq, head = t % hq, g = head / group;
            const float *row = qkv + r * width;
            attend_head(row + head * dim, row + (hq + g) * dim, row + (hq + hkv + g) * dim,
                        L->ctx_slots + L->ctx_offsets[r], L->ctx_offsets[r + 1] - L->ctx_offsets[r], L, g, d,
                        scores + t * (max_ctx + 1), attn + r * hq * dim + head * dim);
        }
        linear_for(attn, hq * dim, L->o, L->o_bias, tmp, n, hq * dim, h);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            for (int64_t i = 0; i < h; i++) x[r * h + i] += tmp[r * h + i];
            rms_norm_f32(x + r * h, L->post_norm, xn + r * h, 1, h, d->eps);
        }
        if (L->router) linear_for(xn, h, L->router, 0, logits, n, h, num_e);
        if (L->router && L->routed_rows) {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < n; r++) {
                chosen[r] = top1(logits + r * num_e, num_e);
                const float score = 1.0f / (1.0f + expf(-logits[r * num_e + chosen[r]]));
                for (int64_t i = 0; i < h; i++) L->routed_rows[r * h + i] = xn[r * h + i] * score;
            }
            swiglu_for(xn, L->mlp_gate_up, L->mlp_down, act, L->shared_rows, n, h, L->mlp_inter);
        } else if (L->router) {
#pragma omp single
            { /* top-1 expert and score per row; a counting sort groups the rows by expert */
                for (int64_t e = 0; e <= num_e; e++) start[e] = 0;
                for (int64_t r = 0; r < n; r++) {
                    chosen[r] = top1(logits + r * num_e, num_e);
                    start[chosen[r] + 1]++;
                }
                for (int64_t e = 0; e < num_e; e++) start[e + 1] += start[e];
                for (int64_t r = 0; r < n; r++) order[r] = -1;
                for (int64_t r = 0; r < n; r++) {
                    int64_t at = start[chosen[r]];
                    while (order[at] >= 0) at++;
                    order[at] = r;
                    const float score = 1.0f / (1.0f + expf(-logits[r * num_e + chosen[r]]));
                    for (int64_t i = 0; i < h; i++) routed_in[at * h + i] = xn[r * h + i] * score;
                }
            }
            for (int64_t e = 0; e < num_e; e++) { /* every thread walks the experts; the work inside is shared */
                const int64_t rows = start[e + 1] - start[e];
                if (rows)
                    swiglu_for(routed_in + start[e] * h, L->expert_gate_up[e], L->expert_down[e], act,
                               routed + start[e] * h, rows, h, L->expert_inter);
            }
        }
        if (!(L->router && L->routed_rows)) { /* the same on every thread */
            swiglu_for(xn, L->mlp_gate_up, L->mlp_down, act, shared, n, h, L->mlp_inter);
#pragma omp for schedule(static)
            for (int64_t at = 0; at < n; at++) {
                const int64_t r = L->router ? order[at] : at;
                for (int64_t i = 0; i < h; i++)
                    x[r * h + i] += L->router ? shared[r * h + i] + routed[at * h + i] : shared[r * h + i];
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------------------
 * serve_blocks_f32: an expert rank's side of one MoE layer, float32 on the CPU (`LocalExperts.serve_blocks`).
 * num_blocks dispatch blocks, block a at in + a * in_stride floats, as pack_dispatch_f32 writes them: head rows
 * whose first bytes are the int32 counts of the max_local local experts, then capacity rows of h sorted by local
 * expert. Each counted row goes through its expert's SwiGLU (gate_up[m], down[m]: local expert m's panels) into
 * the same row of reply block a, at out + a * out_stride floats; the rows after the counted ones are left as
 * they are (nobody reads them). scratch: capacity * 2 * inter floats. Returns the rows served, or -1 (nothing
 * written) when a block's counts exceed its capacity.
 * ---------------------------------------------------------------------------------------------------------- */
int64_t serve_blocks_f32(const float *in, int64_t in_stride, float *out, int64_t out_stride, int64_t num_blocks,
                         int64_t head, int64_t capacity, int64_t h, int64_t max_local, const Panels *const *gate_up,
                         const Panels *const *down, int64_t inter, float *scratch) {
    int64_t served = 0;
    for (int64_t a = 0; a < num_blocks; a++) {
        int64_t rows = 0;
        for (int64_t m = 0; m < max_local; m++) {
            int32_t c;
            memcpy(&c, (const char *)(in + a * in_stride) + 4 * m, 4);
            if (c < 0) return -1;
            rows += c;
        }
        if (rows > capacity) return -1;
    }
    for (int64_t a = 0; a < num_blocks; a++) {
        const float *block = in + a * in_stride;
        int64_t row = 0;
        for (int64_t m = 0; m < max_local; m++) {
            int32_t c;
            memcpy(&c, (const char *)block + 4 * m, 4);
            if (c)
                swiglu_f32(block + (head + row) * h, gate_up[m], down[m], scratch, out + a * out_stride + row * h, c,
                           h, inter);
            row += c;
        }
        served += row;
    }
    return served;
}

/* ------------------------------------------------------------------------------------------------------------
 * pack_dispatch_f32: what `Router.start` sends, for float32 rows on the CPU. x [n, h] rows with their global
 * expert ids [n]; expert e lives on expert rank rank_of[e] (0 .. num_ranks - 1) as its local expert local_of[e]
 * (< max_local). Writes blocks [num_ranks, head + capacity, h]: block j is head rows holding the int32 counts of
 * rank j's local experts (zero bytes after them), then its rows sorted by expert, stable, zeros after them; and
 * slot[r], the row of x[r] among the num_ranks * capacity row slots. counts: num_ranks * max_local int64 of
 * scratch. The same bytes as the torch path.
 * ---------------------------------------------------------------------------------------------------------- */
void pack_dispatch_f32(const float *x, const int64_t *ids, int64_t n, int64_t h, const int64_t *rank_of,
                       const int64_t *local_of, int64_t num_ranks, int64_t max_local, int64_t head,
                       int64_t capacity, int64_t *counts, float *blocks, int64_t *slot) {
    const int64_t block = (head + capacity) * h;
    for (int64_t i = 0; i < num_ranks * max_local; i++) counts[i] = 0;
    for (int64_t r = 0; r < n; r++) counts[rank_of[ids[r]] * max_local + local_of[ids[r]]]++;
    for (int64_t j = 0; j < num_ranks; j++) {
        float *b = blocks + j * block;
        int64_t used = 0;
        for (int64_t i = 0; i < head * h; i++) b[i] = 0.0f;
        for (int64_t m = 0; m < max_local; m++) {
            const int32_t c = (int32_t)counts[j * max_local + m];
            memcpy((char *)b + 4 * m, &c, 4);
            counts[j * max_local + m] = used; /* from here on: the next free row of that expert */
            used += c;
        }
        for (int64_t i = (head + used) * h; i < block; i++) b[i] = 0.0f;
    }
    for (int64_t r = 0; r < n; r++) {
        const int64_t j = rank_of[ids[r]], at = counts[j * max_local + local_of[ids[r]]]++;
        slot[r] = j * capacity + at;
        memcpy(blocks + j * block + (head + at) * h, x + r * h, h * sizeof(float));
    }
}
