/* Skinny matmul: y = x w^T (+ b) for few rows of x, float32, AVX2 + FMA.
 *
 * Why C: a decode step's matmuls have few rows (one per stream; an expert gets ~3 rows of a
 * 32-stream batch), so they are matrix-vector products that should run at the speed the weights
 * stream from memory. torch's CPU kernel (MKL on this AMD box) reads them at 7-12 GB/s at 1-8 rows,
 * where one core streams ~20 GB/s (docs/PERFORMANCE.md, "Skinny matmuls"). This kernel reads each
 * weight row once per pair of x rows (from DRAM once, from L1 after) with 8 independent FMA chains.
 *
 * Bits: every output element is the same sequence of operations whatever the row count or the
 * blocking: lane j of an 8-wide accumulator adds x[k] w[k] for k = j, j+8, ... by FMA, the 8 lanes
 * are then added in one fixed tree, then the bias. So a row's result does not depend on the other
 * rows in the call. `model/skinny.py` is the caller and says when it is used.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SKINNY_X86 1
#define TARGET __attribute__((target("avx2,fma")))

TARGET static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    __m128 sh = _mm_movehdup_ps(lo);
    lo = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, lo);
    return _mm_cvtss_f32(_mm_add_ss(lo, sh));
}

/* The kernels read x rows and write y rows through pointer arrays, so a call can take rows from
 * anywhere (the expert step's gathered tokens) and write them anywhere (its output slots). y gets
 * its dot products, times `scale[m]` when scale is given. */

#define PF_BLOCKS 2 /* how far ahead dot_rows asks for weight blocks */
/* Rows from which a matmul uses dot_rows_many (3 x 4 blocks) over dot_rows (4 x 2): 12 for float32
 * weights, 8 for bfloat16, where dot_rows' second pass widens each block again (bench: 1.10-1.20x at
 * 8-15 rows, 0.90-0.98x at 9-11 rows for float32; docs/PERFORMANCE.md). */
#define MANY_ROWS 12
#define MANY_ROWS_BF16 8

/* float32 weights: one_row, dot_rows, dot_rows_many */
#define WT float
#define LOADW(p) _mm256_loadu_ps(p)
#define NAME(f) f
#include "_skinny_dot.h"
#undef WT
#undef LOADW
#undef NAME

/* bfloat16 weights (the bits' upper half of a float32): one_row_bf16, dot_rows_bf16, ... */
TARGET static inline __m256 bf16x8(const uint16_t *p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
#define WT uint16_t
#define LOADW(p) bf16x8(p)
#define NAME(f) f##_bf16
#include "_skinny_dot.h"
#undef WT
#undef LOADW
#undef NAME


/* Threads: a call whose weights are at least PAR_FLOATS floats is cut into ranges of output rows
 * (multiples of 8) shared by `threads` OpenMP threads, the team torch's own parallel regions use
 * (the module links the libgomp that torch loaded). The caller passes torch's thread count; 1 runs
 * serially. The split does not change any bit (dot_rows). */
#define PAR_FLOATS (64 * 1024)

/* The per-token loops of a decode layer (attention over the cache, the router) are shared by the
 * threads at LOOP_WORK multiply-adds or more: below that the team's wake-up costs more. */
#define LOOP_WORK (32 * 1024)

/* How many threads a piece of work gets: all of `threads` from `least` on, else one. */
static int64_t team(int threads, int64_t work, int64_t least) {
#ifdef _OPENMP
    return threads > 1 && work >= least ? threads : 1;
#else
    return 1;
#endif
}

#ifdef _OPENMP
#define THREAD_NUM() omp_get_thread_num()
#else
#define THREAD_NUM() 0
#endif

/* The t-th of n ranges of [0, O), cut at multiples of 8. */
static void cut(int64_t O, int64_t n, int64_t t, int64_t *o0, int64_t *o1) {
    int64_t step = ((O + n - 1) / n + 7) / 8 * 8;
    *o0 = t * step < O ? t * step : O;
    *o1 = (t + 1) * step < O ? (t + 1) * step : O;
}

/* Row pointers of a strided matrix, on the stack for up to STACK_ROWS rows. */
#define STACK_ROWS 64

/* A weight type's kernels (dot_rows, dot_rows_many or their _bf16 twins) as matmul calls them. */
typedef void (*dot_fn)(const float *const *x, const void *w, float *const *y, const float *scale, int64_t M,
                       int64_t o0, int64_t O, int64_t K);

static void matmul_of(dot_fn few, dot_fn many, int64_t many_from, const float *x, int64_t ldx, const void *w,
                      const float *b, float *y, int64_t ldy, int64_t M, int64_t O, int64_t K, int threads) {
    const float *xs[STACK_ROWS];
    float *ys[STACK_ROWS];
    const int64_t n_threads = team(threads, O * K, PAR_FLOATS);
    for (int64_t m0 = 0; m0 < M; m0 += STACK_ROWS) {
        int64_t n = M - m0 < STACK_ROWS ? M - m0 : STACK_ROWS;
        for (int64_t m = 0; m < n; m++)
            xs[m] = x + (m0 + m) * ldx, ys[m] = y + (m0 + m) * ldy;
        if (n_threads == 1) {
            (n >= many_from ? many : few)(xs, w, ys, NULL, n, 0, O, K);
            continue;
        }
#pragma omp parallel for num_threads(n_threads) schedule(static, 1)
        for (int64_t t = 0; t < n_threads; t++) {
            int64_t o0, o1;
            cut(O, n_threads, t, &o0, &o1);
            if (o0 < o1)
                (n >= many_from ? many : few)(xs, w, ys, NULL, n, o0, o1, K);
        }
    }
    if (b)
        for (int64_t m = 0; m < M; m++)
            for (int64_t o = 0; o < O; o++)
                y[m * ldy + o] += b[o];
}

static void matmul(const float *x, int64_t ldx, const float *w, const float *b, float *y, int64_t ldy,
                   int64_t M, int64_t O, int64_t K, int threads) {
    matmul_of(dot_rows, dot_rows_many, MANY_ROWS, x, ldx, w, b, y, ldy, M, O, K, threads);
}

/* bfloat16 <-> float32. Widening is exact; narrowing rounds to nearest, ties to even, as torch's
 * float -> bfloat16 conversion does, and makes a NaN the quiet NaN 0x7fc0 (as c10::BFloat16 does;
 * torch's vectorized conversion writes 0xffff, another NaN). */
static inline float bf16_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t float_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f)
        return 0x7fc0;
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

TARGET static void round_bf16(const float *src, uint16_t *dst, int64_t n) {
    const __m256i one = _mm256_set1_epi32(1), half = _mm256_set1_epi32(0x7fff), qnan = _mm256_set1_epi32(0x7fc0);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(src + i);
        __m256i u = _mm256_castps_si256(v);
        __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(half, _mm256_and_si256(_mm256_srli_epi32(u, 16), one)));
        r = _mm256_blendv_epi8(_mm256_srli_epi32(r, 16), qnan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
        _mm_storeu_si128((__m128i *)(dst + i),
                         _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
    }
    for (; i < n; i++)
        dst[i] = float_bf16(src[i]);
}

/* y = x w^T (+ b), all bfloat16: x's rows and the bias widened to float32 once, the weights as they
 * stream (dot_rows_bf16), float32 sums rounded to bfloat16 once, as torch's CPU bfloat16 matmul
 * does. Half the bytes of a float32 matmul from memory. Returns 0 when out of memory. */
static int matmul_bf16(const uint16_t *x, int64_t ldx, const uint16_t *w, const uint16_t *b, uint16_t *y,
                       int64_t ldy, int64_t M, int64_t O, int64_t K, int threads) {
    float *xf = malloc(sizeof(float) * (size_t)(M * K + M * O + (b ? O : 0)) + 1);
    if (!xf)
        return 0;
    float *yf = xf + M * K, *bf = b ? yf + M * O : NULL;
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++)
            xf[m * K + k] = bf16_float(x[m * ldx + k]);
    for (int64_t o = 0; bf && o < O; o++)
        bf[o] = bf16_float(b[o]);
    matmul_of(dot_rows_bf16, dot_rows_many_bf16, MANY_ROWS_BF16, xf, K, w, bf, yf, O, M, O, K, threads);
    for (int64_t m = 0; m < M; m++)
        round_bf16(yf + m * O, y + m * ldy, O);
    free(xf);
    return 1;
}

/* The expert step over routed pairs, grouped by expert (docs in `model/skinny.py`). The pairs' row
 * pointers are laid out first (xp, yp, scale: R each). How the threads share the experts' matmuls
 * depends on what bounds them. Any cut of an expert's output rows gives the same bits (`dot_rows`).
 * - Decode-sized groups (all under MANY_ROWS rows) are bound by reading the weights. The held
 *   experts' output rows, in expert order, make one run. Each thread takes one stretch of it, cut
 *   at multiples of 8 rows so that the stretches cost about the same (`row_cost`). A thread so
 *   reads its weights as one stream in address order, past the experts no pair uses, and the
 *   prefetchers stay on it. Items handed out dynamically each start a new stream: 1.01-1.09x
 *   slower at 1-64 streams (docs/PERFORMANCE.md).
 * - Larger groups (a prefill's) are bound by compute. Each expert's matmul is cut into items of
 *   CHUNK_FLOATS of its weights (512 KiB), handed out dynamically, which balances groups of
 *   different sizes. Fewer, longer items start fewer streams: 256 KiB items were 1.01-1.03x
 *   slower at 32 streams. */
#define CHUNK_FLOATS (128 * 1024)

/* The cost of one output row of a decode-sized expert of `rows` rows, in sixths of reading its
 * weights from memory. Up to 4 rows the read is the cost: a block's passes after the first find it
 * in L1. Each further row adds a sixth: the kernel's rates at 1-8 rows. */
static int64_t row_cost(int64_t rows) { return 6 + (rows > 4 ? rows - 4 : 0); }

/* The kernel for an expert of `rows` rows: a prefill's large groups by the many-row one (the same
 * bits). */
static dot_fn expert_kernel(int64_t rows) { return rows >= MANY_ROWS ? dot_rows_many : dot_rows; }

/* Output rows [o0, o1) of expert e's matmul over its pairs, which start at pair start[e]. */
static inline void expert_rows(const float *const *xp, float *const *yp, const float *scale, const int64_t *start,
                               const int64_t *counts, const float *w, int64_t O, int64_t K, int64_t e, int64_t o0,
                               int64_t o1) {
    if (o0 < o1)
        expert_kernel(counts[e])(xp + start[e], w + e * O * K, yp + start[e], scale ? scale + start[e] : NULL,
                                 counts[e], o0, o1, K);
}

static void expert_items(const float *const *xp, float *const *yp, const float *scale, const int64_t *counts,
                         int64_t E, const float *w, int64_t O, int64_t K, int threads) {
    /* held: the experts with pairs, in order, and each one's cost (`row_cost`) */
    int64_t start[E], held[E], cost[E], total = 0, nb = 0, biggest = 0, a = 0;
    for (int64_t e = 0; e < E; e++) {
        start[e] = a, a += counts[e];
        if (counts[e])
            held[nb] = e, cost[nb] = row_cost(counts[e]) * O, total += cost[nb++];
        biggest = counts[e] > biggest ? counts[e] : biggest;
    }
    const int64_t n = team(threads, nb * O * K, PAR_FLOATS);
    if (n == 1) {
        for (int64_t j = 0; j < nb; j++)
            expert_rows(xp, yp, scale, start, counts, w, O, K, held[j], 0, O);
        return;
    }
    if (biggest >= MANY_ROWS) {
        const int64_t pieces = O * K / CHUNK_FLOATS > 1 ? O * K / CHUNK_FLOATS : 1;
#pragma omp parallel for num_threads(n) schedule(dynamic, 1)
        for (int64_t item = 0; item < nb * pieces; item++) {
            int64_t o0, o1;
            cut(O, pieces, item % pieces, &o0, &o1);
            expert_rows(xp, yp, scale, start, counts, w, O, K, held[item / pieces], o0, o1);
        }
        return;
    }
    /* Thread t's stretch runs from (held expert at_i[t], output row at_o[t]) to thread t + 1's start. */
    int64_t at_i[n + 1], at_o[n + 1], i = 0, before = 0;
    for (int64_t t = 0; t < n; t++) {
        const int64_t target = total * t / n;
        while (i < nb && before + cost[i] <= target)
            before += cost[i++];
        at_i[t] = i, at_o[t] = i < nb ? (target - before) / (cost[i] / O) / 8 * 8 : 0;
    }
    at_i[n] = nb, at_o[n] = 0;
#pragma omp parallel for num_threads(n) schedule(static, 1)
    for (int64_t t = 0; t < n; t++)
        for (int64_t j = at_i[t], o0 = at_o[t]; j < nb && j <= at_i[t + 1]; j++, o0 = 0)
            expert_rows(xp, yp, scale, start, counts, w, O, K, held[j], o0, j < at_i[t + 1] ? O : at_o[t + 1]);
}

/* The j-th pair of the order reads x row rows[order[j]] (rows NULL: row order[j] / A, the token of
 * pair t*A + a) and writes u[j]. */
static void expert_up(const float *x, int64_t ldx, const int64_t *rows, int64_t A, const int64_t *order,
                      const int64_t *counts, int64_t E, const float *w1, int64_t F2, int64_t K, float *u,
                      const float **xp, float **up, int64_t R, int threads) {
    for (int64_t j = 0; j < R; j++)
        xp[j] = x + (rows ? rows[order[j]] : order[j] / A) * ldx, up[j] = u + j * F2;
    expert_items(xp, up, NULL, counts, E, w1, F2, K, threads);
}

static void expert_down(const float *act, const int64_t *order, const int64_t *counts, int64_t E,
                        const float *w2, int64_t D, int64_t F, const float *weights, const int64_t *slots,
                        float *out, int64_t ldo, const float **xp, float **yp, float *scale, int64_t R,
                        int threads) {
    for (int64_t j = 0; j < R; j++) { /* slots NULL: pair i writes out row i */
        int64_t i = order[j];
        xp[j] = act + j * F, yp[j] = out + (slots ? slots[i] : i) * ldo, scale[j] = weights[i];
    }
    expert_items(xp, yp, scale, counts, E, w2, D, F, threads);
}

/* RMSNorm of B rows of d (out may be x): out = w * x / sqrt(mean(x^2) + eps). */
static void rms_rows(const float *x, const float *w, float eps, float *out, int64_t B, int64_t d) {
    for (int64_t b = 0; b < B; b++) {
        const float *r = x + b * d;
        double ss = 0.0;
        for (int64_t j = 0; j < d; j++)
            ss += (double)r[j] * r[j];
        float inv = 1.0f / sqrtf((float)(ss / d) + eps);
        for (int64_t j = 0; j < d; j++)
            out[b * d + j] = w[j] * (r[j] * inv);
    }
}

TARGET static void softmax(float *x, int64_t n);

/* ---- one decode step of a layer's LF attention (docs in `model/skinny.py`, `decode_attention`) ---- */
typedef struct {
    const float *h, *lf, *w1, *b1, *w2, *b2, *lfnorm, *wqk, *wv, *cos, *sin;
    float *kc, *vc, *out;
    const int64_t *lf_read, *lf_blocks, *write, *slots;
    const uint8_t *has_prev, *mask;
    int64_t B, d, H, D, P, L;
    float eps;
    int threads;
} decode_t;

TARGET static float dot(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t k = 0; k < n; k += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc);
    return hsum(acc);
}

TARGET static void attend(const float *rq, const float *kh, const float *vh, const int64_t *slots, const uint8_t *mask,
                          int64_t L, int64_t D, float root, float *work, float *o);

/* scratch: taps [B, 2d], c1 [B, d/2], c2in [B, d], c2 [B, d], qk [B, 2d], v [B, d], p [threads, 4L] */
static void decode_attention(const decode_t *c, float *scratch) {
    const int64_t B = c->B, d = c->d, half = d / 2, H = c->H, D = c->D, L = c->L, W = half + d;
    float *taps = scratch, *c1 = taps + B * 2 * d, *c2in = c1 + B * half, *c2 = c2in + B * d;
    float *qk = c2 + B * d, *v = qk + B * 2 * d, *p = v + B * d;
    /* LF, from the state [c1[t-1], h[t-1]] (W floats; read before this step writes any state: a
     * sequence's state block may be the one it writes): rows [h[t-1], h[t]] for c1[t], and
     * c2's input [c1[t-1], c1[t]] with c1[-1] zero (not b1) before position 0. */
    for (int64_t b = 0; b < B; b++) {
        const float *state = c->lf + c->lf_read[b] * W;
        memcpy(taps + b * 2 * d, state + half, d * sizeof(float));
        memcpy(taps + b * 2 * d + d, c->h + b * d, d * sizeof(float));
        if (c->has_prev[b])
            memcpy(c2in + b * d, state, half * sizeof(float));
        else
            memset(c2in + b * d, 0, half * sizeof(float));
    }
    matmul(taps, 2 * d, c->w1, c->b1, c1, half, B, half, 2 * d, c->threads);
    for (int64_t b = 0; b < B; b++)
        memcpy(c2in + b * d + half, c1 + b * half, half * sizeof(float));
    matmul(c2in, d, c->w2, c->b2, c2, d, B, d, d, c->threads);
    for (int64_t j = 0; j < B * d; j++) /* f = RMSNorm(c2 + h), kept in c2 */
        c2[j] += c->h[j];
    rms_rows(c2, c->lfnorm, c->eps, c2, B, d);
    matmul(c2, d, c->wqk, NULL, qk, 2 * d, B, 2 * d, d, c->threads); /* q|k from the filtered states */
    matmul(c->h, d, c->wv, NULL, v, d, B, d, d, c->threads);        /* v from the input */
    for (int64_t b = 0; b < B; b++) { /* the LF state [c1[t], h[t]] after t */
        float *state = (float *)c->lf + c->lf_blocks[b] * W;
        memcpy(state, c1 + b * half, half * sizeof(float));
        memcpy(state + half, c->h + b * d, d * sizeof(float));
    }
    /* Each (sequence, head) alone: rotate its q and k, write its k and v to the cache, then attend
     * over its cache slots (its own new one among them; a sequence writes only slots of its own
     * blocks). Shared by the threads when there is enough of it; each pair's operations are the
     * same either way, so the bits are too. */
    const float root = sqrtf((float)D);
    const int64_t n_threads = team(c->threads, B * H * (L + 1) * D, LOOP_WORK);
#pragma omp parallel for if (n_threads > 1) num_threads(n_threads) schedule(static)
    for (int64_t bh = 0; bh < B * H; bh++) {
        const int64_t b = bh / H, hh = bh % H;
        const float *cs = c->cos + b * D, *sn = c->sin + b * D;
        float *q = qk + b * 2 * d + hh * 2 * D, *k = q + D, rq[512], rk[512];
        for (int64_t i = 0; i < D; i++) { /* rotate-half rotary */
            float xq = i < D / 2 ? -q[i + D / 2] : q[i - D / 2];
            float xk = i < D / 2 ? -k[i + D / 2] : k[i - D / 2];
            rq[i] = q[i] * cs[i] + xq * sn[i];
            rk[i] = k[i] * cs[i] + xk * sn[i];
        }
        const int64_t slot = c->write[b];
        memcpy(c->kc + (hh * c->P + slot) * D, rk, D * sizeof(float));
        memcpy(c->vc + (hh * c->P + slot) * D, v + b * d + hh * D, D * sizeof(float));
        attend(rq, c->kc + hh * c->P * D, c->vc + hh * c->P * D, c->slots + b * L, c->mask + b * L, L, D, root,
               p + THREAD_NUM() * 4 * L, c->out + b * d + hh * D);
    }
}

/* ---- the rest of a decode step's layer: o_proj + residual + norm + router ---- */
typedef struct {
    const float *a, *x, *wo, *post, *wqkv;
    float *x_out, *g, *wts, *qkv;
    int64_t *ids;
    int64_t B, d, N, top_k;
    int normalize, threads;
    float eps;
} post_t;

/* x_out = x + a wo^T; g = RMSNorm(x_out); the Attention Router on g: ids and weights of the top_k
 * experts, most probable first (model/attention_router.py has the math). */
static void decode_post(const post_t *c) {
    const int64_t B = c->B, d = c->d, N = c->N;
    matmul(c->a, d, c->wo, NULL, c->x_out, d, B, d, d, c->threads);
    for (int64_t j = 0; j < B * d; j++)
        c->x_out[j] = c->x[j] + c->x_out[j];
    rms_rows(c->x_out, c->post, c->eps, c->g, B, d);
    matmul(c->g, d, c->wqkv, NULL, c->qkv, 3 * N, B, 3 * N, d, c->threads);
    const int64_t n_threads = team(c->threads, 16 * B * N * N, LOOP_WORK); /* an expf ~ 16 multiply-adds */
#pragma omp parallel for if (n_threads > 1) num_threads(n_threads) schedule(static)
    for (int64_t b = 0; b < B; b++) { /* each token alone: the same bits on any number of threads */
        float prob[256], e[256];
        const float *q = c->qkv + b * 3 * N, *k = q + N, *v = k + N;
        for (int64_t i = 0; i < N; i++) { /* M = softmax_rows(Q K^T), P = M V */
            for (int64_t j = 0; j < N; j++)
                e[j] = q[i] * k[j];
            softmax(e, N);
            float acc = 0.0f;
            for (int64_t j = 0; j < N; j++)
                acc += e[j] * v[j];
            prob[i] = acc;
        }
        softmax(prob, N); /* p = softmax(P) */
        float total = 0.0f;
        uint8_t taken[256] = {0};
        for (int64_t t = 0; t < c->top_k; t++) { /* the largest left, the lower id on a tie */
            int64_t arg = -1; /* NaN probabilities (a broken request) still give an expert id */
            for (int64_t i = 0; i < N; i++)
                if (!taken[i] && (arg < 0 || prob[i] > prob[arg]))
                    arg = i;
            c->ids[b * c->top_k + t] = arg;
            c->wts[b * c->top_k + t] = prob[arg];
            total += prob[arg];
            taken[arg] = 1;
        }
        if (c->normalize)
            for (int64_t t = 0; t < c->top_k; t++)
                c->wts[b * c->top_k + t] /= total;
    }
}

/* A stable counting sort of P pairs by expert: local[i] in [0, E), or < 0 for a pair left out;
 * order gets the pair indices grouped by expert, counts each group's size. The largest group. */
static int64_t sort_by_expert(const int64_t *local, int64_t P, int64_t E, int64_t *order, int64_t *counts) {
    for (int64_t e = 0; e < E; e++)
        counts[e] = 0;
    for (int64_t i = 0; i < P; i++)
        if (local[i] >= 0)
            counts[local[i]]++;
    int64_t start[E], biggest = 0, a = 0; /* each expert's next place in order (E: a bank's experts) */
    for (int64_t e = 0; e < E; e++) {
        start[e] = a, a += counts[e];
        if (counts[e] > biggest)
            biggest = counts[e];
    }
    for (int64_t i = 0; i < P; i++)
        if (local[i] >= 0)
            order[start[local[i]]++] = i;
    return biggest;
}

/* Each of P pairs' local expert in a bank (lookup: global id -> local index or -1, L entries; a
 * pair with id < 0 is held elsewhere: -1), and in *held how many the bank computes. Returns the
 * first pair routed to an expert the bank does not hold, or -1. */
static int64_t bank_pairs(const int64_t *ids, int64_t P, const int64_t *lookup, int64_t L, int64_t E,
                          int64_t *local, int64_t *held) {
    *held = 0;
    for (int64_t i = 0; i < P; i++) {
        int64_t id = ids[i], e = id >= 0 && id < L ? lookup[id] : -1;
        if (id >= 0 && (e < 0 || e >= E))
            return i;
        local[i] = id < 0 ? -1 : e;
        *held += id >= 0;
    }
    return -1;
}

/* out[t] = residual[t] (when given) + token t's A slots [T, A, D] added in a order: slot 0 +
 * slot 1, then += the rest, as `sum_slots` adds them. */
static void add_slots(const float *slots, int64_t T, int64_t A, int64_t D, const float *residual, float *out) {
    for (int64_t t = 0; t < T; t++) {
        const float *sl = slots + t * A * D;
        float *o = out + t * D;
        for (int64_t i = 0; i < D; i++) {
            float y = A == 1 ? sl[i] : sl[i] + sl[D + i];
            for (int64_t a = 2; a < A; a++)
                y += sl[a * D + i];
            o[i] = residual ? residual[t * D + i] + y : y;
        }
    }
}

/* Floats of `decode_attention`'s scratch: taps [B, 2d], c1 [B, d/2], c2in and c2 [B, d] each,
 * qk [B, 2d] and v [B, d], and [4L] for each thread (`attend`'s slot list and scores). */
static size_t attention_scratch(int64_t B, int64_t d, int64_t L, int threads) {
    return (size_t)(B * 2 * d + B * (d / 2) + 2 * B * d + B * 3 * d + (threads > 1 ? threads : 1) * 4 * L);
}

/* ---- SwiGLU: act = silu(u[:, :F]) * u[:, F:], silu(a) = a / (1 + exp(-a)) ---- */
/* exp by the Cephes single-precision method: n = floor(x log2(e) + 1/2), r = x - n ln2 (ln2 in two
 * parts), exp(r) by a degree-5 polynomial, times 2^n set in the exponent bits; within ~2 ulp of
 * expf over [-88.38, 88.38] (clamped there: exp is 0 below, inf above). The vector and the scalar
 * form do the same operations (FMA in both), so an element's bits do not depend on where it is. */
#define EXP_MAX 88.3762626647949f
#define EXP_LOG2E 1.44269504088896341f
#define EXP_C1 0.693359375f
#define EXP_C2 (-2.12194440e-4f)
#define EXP_P0 1.9875691500e-4f
#define EXP_P1 1.3981999507e-3f
#define EXP_P2 8.3334519073e-3f
#define EXP_P3 4.1665795894e-2f
#define EXP_P4 1.6666665459e-1f
#define EXP_P5 5.0000001201e-1f

TARGET static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-EXP_MAX)), _mm256_set1_ps(EXP_MAX));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(EXP_LOG2E), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_C1), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_C2), x);
    __m256 z = _mm256_mul_ps(x, x), y = _mm256_set1_ps(EXP_P0);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(EXP_P1));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(EXP_P2));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(EXP_P3));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(EXP_P4));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(EXP_P5));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, z, x), _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

static inline float exp1(float x) {
    x = fminf(fmaxf(x, -EXP_MAX), EXP_MAX);
    float n = floorf(fmaf(x, EXP_LOG2E, 0.5f));
    x = fmaf(-n, EXP_C1, x);
    x = fmaf(-n, EXP_C2, x);
    float z = x * x, y = EXP_P0;
    y = fmaf(y, x, EXP_P1);
    y = fmaf(y, x, EXP_P2);
    y = fmaf(y, x, EXP_P3);
    y = fmaf(y, x, EXP_P4);
    y = fmaf(y, x, EXP_P5);
    y = fmaf(y, z, x) + 1.0f;
    union { uint32_t i; float f; } e = {.i = (uint32_t)((int32_t)n + 127) << 23};
    return y * e.f;
}

/* x[i] = exp(x[i] - shift) for i < n: 8 at a time, `exp1` for the rest (the same bits). */
TARGET static void exp_shifted(float *x, int64_t n, float shift) {
    int64_t i = 0;
    for (const __m256 m = _mm256_set1_ps(shift); i + 8 <= n; i += 8)
        _mm256_storeu_ps(x + i, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), m)));
    for (; i < n; i++)
        x[i] = exp1(x[i] - shift);
}

/* x = softmax(x) over n entries, in float32: exp(x - max) by `exp8` (8 at a time, `exp1` for the
 * rest), added in index order, then each divided by the sum. */
TARGET static void softmax(float *x, int64_t n) {
    float best = -INFINITY, sum = 0.0f;
    for (int64_t i = 0; i < n; i++)
        if (x[i] > best)
            best = x[i];
    exp_shifted(x, n, best);
    for (int64_t i = 0; i < n; i++)
        sum += x[i];
    for (int64_t i = 0; i < n; i++)
        x[i] /= sum;
}

/* One (sequence, head) of a decode step's attention: q (rotated) against the K rows of its valid
 * slots (mask[l]: slots[l] is one), softmax, o = sum_j p_j v_j. The valid slots are listed first
 * (`work`, [4L] floats of scratch: L int64 slot indices, then the L scores), so the exps go 8 at a
 * time. The K rows AHEAD slots on and each score's V row are asked for while the scores are taken:
 * a context's rows are scattered over blocks and come from memory, not cache. o is accumulated in
 * registers, a multiply then an add per term in slot order. */
#define AHEAD 4
TARGET static void attend(const float *rq, const float *kh, const float *vh, const int64_t *slots, const uint8_t *mask,
                          int64_t L, int64_t D, float root, float *work, float *o) {
    int64_t n = 0, *at = (int64_t *)work; /* 8-byte aligned: the scratch before it is rows of d or d/2 floats */
    float *scores = work + 2 * L;
    for (int64_t l = 0; l < L; l++)
        if (mask[l])
            at[n++] = slots[l];
    for (int64_t j = 0; j < n && j < AHEAD; j++)
        for (int64_t i = 0; i < D; i += 16)
            _mm_prefetch((const char *)(kh + at[j] * D + i), _MM_HINT_T0);
    for (int64_t j = 0; j < n; j++) {
        for (int64_t i = 0; i < D; i += 16) {
            if (j + AHEAD < n)
                _mm_prefetch((const char *)(kh + at[j + AHEAD] * D + i), _MM_HINT_T0);
            _mm_prefetch((const char *)(vh + at[j] * D + i), _MM_HINT_T0);
        }
        scores[j] = dot(rq, kh + at[j] * D, D) / root;
    }
    softmax(scores, n);
    for (int64_t i0 = 0; i0 < D; i0 += 64) { /* 8 accumulators of 8 at a time */
        const int64_t w = (D - i0 < 64 ? D - i0 : 64) / 8;
        __m256 acc[8];
        for (int64_t q = 0; q < w; q++)
            acc[q] = _mm256_setzero_ps();
        for (int64_t j = 0; j < n; j++) {
            const __m256 p = _mm256_set1_ps(scores[j]);
            const float *v = vh + at[j] * D + i0;
            for (int64_t q = 0; q < w; q++)
                acc[q] = _mm256_add_ps(acc[q], _mm256_mul_ps(p, _mm256_loadu_ps(v + 8 * q)));
        }
        for (int64_t q = 0; q < w; q++)
            _mm256_storeu_ps(o + i0 + 8 * q, acc[q]);
    }
}

/* The activation is shared by the threads from SWIGLU_WORK elements on (a prefill's pairs). */
#define SWIGLU_WORK (256 * 1024)

TARGET static void swiglu_rows(const float *u, int64_t R, int64_t F, float *act, int threads) {
    const int64_t n_threads = team(threads, R * F, SWIGLU_WORK);
#pragma omp parallel for if (n_threads > 1) num_threads(n_threads) schedule(static)
    for (int64_t r = 0; r < R; r++) {
        const float *a = u + r * 2 * F, *b = a + F;
        float *o = act + r * F;
        int64_t f = 0;
        for (; f + 8 <= F; f += 8) {
            __m256 v = _mm256_loadu_ps(a + f);
            __m256 s = _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), v))));
            _mm256_storeu_ps(o + f, _mm256_mul_ps(s, _mm256_loadu_ps(b + f)));
        }
        for (; f < F; f++)
            o[f] = a[f] / (1.0f + exp1(-a[f])) * b[f];
    }
}

/* ---- a whole decode step's layers in one call, for the in-process engine ---- */
/* Per layer, the pointers of `model/skinny.py`'s `decode_table` (LAYER_PTRS of them, in this order). */
enum {
    T_IN_NORM, T_CONV1, T_CONV1_B, T_CONV2, T_CONV2_B, T_LF_NORM, T_WQK, T_WV, T_WO, T_POST_NORM, T_WQKV,
    T_W1, T_W2, T_LOOKUP, T_K, T_V, T_LF, T_LOOKUP_N, T_EXPERTS, LAYER_PTRS
};

typedef struct {
    float *x; /* [B, d], the step's embeddings in, the last layer's output out */
    const float *cos, *sin;
    const int64_t *lf_read, *lf_blocks, *write, *slots;
    const uint8_t *has_prev, *mask;
    int64_t B, d, H, D, P, L, N, A, F;
    int normalize, threads;
} step_t;

/* Each layer: h = RMSNorm(x); the attention half (`decode_attention`); x2 = x + o_proj, g, the
 * router's ids and weights (`decode_post`); the expert step over the bank (`bank_up`, SwiGLU,
 * `bank_down`'s slots and their sum in a order); x = x2 + that sum. The same operations as the
 * per-layer calls, so the same bits. Returns the layer whose routing named an expert its bank does
 * not hold (*pair the pair), or -1. */
static int64_t decode_layers(const int64_t *table, const float *eps, int64_t NL, const step_t *s, float *fs,
                             int64_t *is, const float **xp, float **yp, float *scale, int64_t *routing,
                             int64_t *pair) {
    const int64_t B = s->B, d = s->d, N = s->N, A = s->A, F = s->F, Pp = B * A;
    float *att = fs, *h = att + attention_scratch(B, d, s->L, s->threads);
    float *a = h + B * d, *x2 = a + B * d, *g = x2 + B * d, *qkv = g + B * d, *wts = qkv + B * 3 * N;
    float *u = wts + Pp, *act = u + Pp * 2 * F, *slots = act + Pp * F;
    int64_t *ids = is, *local = ids + Pp, *order = local + Pp, *counts = order + Pp;
    for (int64_t l = 0; l < NL; l++) {
        const int64_t *t = table + l * LAYER_PTRS;
#define PTR(type, i) ((type)(uintptr_t)t[i])
        rms_rows(s->x, PTR(const float *, T_IN_NORM), eps[3 * l], h, B, d);
        decode_t c = {
            .h = h, .lf = PTR(const float *, T_LF), .w1 = PTR(const float *, T_CONV1),
            .b1 = PTR(const float *, T_CONV1_B), .w2 = PTR(const float *, T_CONV2), .b2 = PTR(const float *, T_CONV2_B),
            .lfnorm = PTR(const float *, T_LF_NORM), .wqk = PTR(const float *, T_WQK), .wv = PTR(const float *, T_WV),
            .cos = s->cos, .sin = s->sin, .kc = PTR(float *, T_K), .vc = PTR(float *, T_V), .out = a,
            .lf_read = s->lf_read, .lf_blocks = s->lf_blocks, .write = s->write, .slots = s->slots,
            .has_prev = s->has_prev, .mask = s->mask, .B = B, .d = d, .H = s->H, .D = s->D, .P = s->P, .L = s->L,
            .eps = eps[3 * l + 1], .threads = s->threads,
        };
        decode_attention(&c, att);
        post_t pc = {
            .a = a, .x = s->x, .wo = PTR(const float *, T_WO), .post = PTR(const float *, T_POST_NORM),
            .wqkv = PTR(const float *, T_WQKV), .x_out = x2, .g = g, .wts = wts, .ids = ids, .qkv = qkv,
            .B = B, .d = d, .N = N, .top_k = A, .normalize = s->normalize, .threads = s->threads,
            .eps = eps[3 * l + 2],
        };
        decode_post(&pc);
        if (routing) /* the caller keeps each layer's expert ids [B, A] */
            memcpy(routing + l * Pp, ids, (size_t)Pp * sizeof(int64_t));
        const int64_t E = t[T_EXPERTS];
        int64_t R;
        if ((*pair = bank_pairs(ids, Pp, PTR(const int64_t *, T_LOOKUP), t[T_LOOKUP_N], E, local, &R)) >= 0)
            return l;
        sort_by_expert(local, Pp, E, order, counts);
        if (R < Pp)
            memset(slots, 0, (size_t)(Pp * d) * sizeof(float)); /* a pair held elsewhere adds 0 */
        if (R > 0) {
            expert_up(g, d, NULL, A, order, counts, E, PTR(const float *, T_W1), 2 * F, d, u, xp, yp, R, s->threads);
            swiglu_rows(u, R, F, act, s->threads);
            expert_down(act, order, counts, E, PTR(const float *, T_W2), d, F, wts, NULL, slots, d, xp, yp, scale, R,
                        s->threads);
        }
#undef PTR
        add_slots(slots, B, A, d, x2, s->x); /* x = x2 + the expert step */
    }
    return -1;
}

static int supported(void) {
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
    return known;
}
#else
#define SKINNY_X86 0
static int supported(void) { return 0; }
#endif

PyDoc_STRVAR(available_doc, "available() -> bool\n\nWhether this CPU runs the kernel (x86-64 with AVX2 and FMA).");

static PyObject *available(PyObject *self, PyObject *args) { return PyBool_FromLong(supported()); }

PyDoc_STRVAR(openmp_doc, "openmp() -> bool\n\nWhether the module was built with OpenMP (its large calls shared by threads).");

static PyObject *openmp(PyObject *self, PyObject *args) {
#ifdef _OPENMP
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

PyDoc_STRVAR(release_doc, "release_team() -> bool\n\n"
"Frees the calling thread's OpenMP team (its idle worker threads exit): omp_pause_resource for the\n"
"host; False where there is no OpenMP or the thread is inside a parallel region.");

static PyObject *release_team(PyObject *self, PyObject *args) {
#ifdef _OPENMP
    /* the host only: omp_pause_resource_all would also start any offload plugins */
    return PyBool_FromLong(omp_pause_resource(omp_pause_soft, omp_get_initial_device()) == 0);
#else
    Py_RETURN_FALSE;
#endif
}

PyDoc_STRVAR(matmul_doc,
"matmul(x, ldx, w, b, y, ldy, M, O, K, threads, bf16=False)\n\n"
"y[m, o] = sum_k x[m, k] w[o, k] (+ b[o]) for m < M, o < O. x, w, b, y are data pointers (b 0 for\n"
"none); x rows ldx elements apart, y rows ldy apart, w [O, K] contiguous, K a multiple of 8. All\n"
"float32, or with bf16 all bfloat16 (float32 sums of the widened values, rounded once). The caller\n"
"(model/skinny.py) has checked the tensors; the GIL is released while it runs.");

static PyObject *py_matmul(PyObject *self, PyObject *args) {
    unsigned long long x, w, b, y;
    long long ldx, ldy, M, O, K;
    int threads, bf16 = 0, ok = 1;
    if (!PyArg_ParseTuple(args, "KLKKKLLLLi|p:matmul", &x, &ldx, &w, &b, &y, &ldy, &M, &O, &K, &threads, &bf16))
        return NULL;
    if (!supported() || K % 8 || M < 0 || O < 0 || K < 0 || ldx < K || ldy < O) {
        PyErr_SetString(PyExc_ValueError, "matmul: unsupported CPU or shapes (K a multiple of 8, ldx >= K, ldy >= O)");
        return NULL;
    }
#if SKINNY_X86
    Py_BEGIN_ALLOW_THREADS
    if (bf16)
        ok = matmul_bf16((const uint16_t *)(uintptr_t)x, ldx, (const uint16_t *)(uintptr_t)w,
                         (const uint16_t *)(uintptr_t)b, (uint16_t *)(uintptr_t)y, ldy, M, O, K, threads);
    else
        matmul((const float *)(uintptr_t)x, ldx, (const float *)(uintptr_t)w, (const float *)(uintptr_t)b,
               (float *)(uintptr_t)y, ldy, M, O, K, threads);
    Py_END_ALLOW_THREADS
#endif
    if (!ok)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

PyDoc_STRVAR(group_doc,
"group(local, R, E, order, counts) -> largest group\n\n"
"A stable counting sort of R pairs by their expert: local (int64 [R], each in [0, E)) -> order\n"
"(int64 [R], pair indices grouped by expert) and counts (int64 [E]). Pointers as in matmul.");

static PyObject *py_group(PyObject *self, PyObject *args) {
    unsigned long long p_local, p_order, p_counts;
    long long R, E;
    if (!PyArg_ParseTuple(args, "KLLKK:group", &p_local, &R, &E, &p_order, &p_counts))
        return NULL;
    const int64_t *local = (const int64_t *)(uintptr_t)p_local;
    int64_t *order = (int64_t *)(uintptr_t)p_order, *counts = (int64_t *)(uintptr_t)p_counts;
    if (R < 0 || E < 1) {
        PyErr_SetString(PyExc_ValueError, "group: R >= 0 and E >= 1");
        return NULL;
    }
    for (int64_t i = 0; i < R; i++)
        if (local[i] < 0 || local[i] >= E) {
            PyErr_Format(PyExc_ValueError, "expert_ids: pair %lld is routed to an expert this bank does not hold",
                         (long long)i);
            return NULL;
        }
    return PyLong_FromLongLong(sort_by_expert(local, R, E, order, counts));
}

/* The number of pairs (the sum of counts), after checking idx[order[j]] in [0, limit) for each; -1
 * with ValueError set when one is not. */
static int64_t checked_pairs(const int64_t *counts, int64_t E, const int64_t *order, const int64_t *idx,
                             int64_t limit, const char *name) {
    int64_t R = 0;
    for (int64_t e = 0; e < E; e++)
        R += counts[e];
    for (int64_t j = 0; j < R; j++) {
        int64_t i = order[j];
        if (i < 0 || i >= R || idx[i] < 0 || idx[i] >= limit) {
            PyErr_Format(PyExc_ValueError, "%s: pair %lld is out of range [0, %lld)", name, (long long)i,
                         (long long)limit);
            return -1;
        }
    }
    return R;
}

/* Per-pair scratch for a call: R x-row pointers, R y-row pointers, R scales, in one block. */
typedef struct {
    const float **xp;
    float **yp;
    float *scale;
} pair_buffers;

static int alloc_pairs(pair_buffers *b, int64_t R) {
    size_t n = (size_t)(R ? R : 1);
    char *p = PyMem_Malloc(n * (sizeof(float *) * 2 + sizeof(float)));
    if (!p) {
        PyErr_NoMemory();
        return -1;
    }
    b->xp = (const float **)p, b->yp = (float **)(p + n * sizeof(float *));
    b->scale = (float *)(p + 2 * n * sizeof(float *));
    return 0;
}

PyDoc_STRVAR(expert_up_doc,
"expert_up(x, ldx, T, rows, order, counts, E, w1, F2, K, u, threads)\n\n"
"u[j] = x[rows[order[j]]] w1[e]^T for the j-th pair of `group`'s order, e its expert: x [T, K]\n"
"rows ldx apart, w1 [E, F2, K], u [R, F2] contiguous, R the sum of counts.");

static PyObject *py_expert_up(PyObject *self, PyObject *args) {
    unsigned long long p_x, p_rows, p_order, p_counts, p_w1, p_u;
    long long ldx, T, E, F2, K;
    int threads;
    if (!PyArg_ParseTuple(args, "KLLKKKLKLLKi:expert_up", &p_x, &ldx, &T, &p_rows, &p_order, &p_counts, &E, &p_w1,
                          &F2, &K, &p_u, &threads))
        return NULL;
    if (!supported() || K % 8 || ldx < K || E < 1) {
        PyErr_SetString(PyExc_ValueError, "expert_up: unsupported CPU or shapes");
        return NULL;
    }
    const int64_t *counts = (const int64_t *)(uintptr_t)p_counts, *order = (const int64_t *)(uintptr_t)p_order;
    pair_buffers b;
    int64_t R = checked_pairs(counts, E, order, (const int64_t *)(uintptr_t)p_rows, T, "rows");
    if (R < 0 || alloc_pairs(&b, R) < 0)
        return NULL;
#if SKINNY_X86
    Py_BEGIN_ALLOW_THREADS
    expert_up((const float *)(uintptr_t)p_x, ldx, (const int64_t *)(uintptr_t)p_rows, 1, order, counts, E,
              (const float *)(uintptr_t)p_w1, F2, K, (float *)(uintptr_t)p_u, b.xp, b.yp, R, threads);
    Py_END_ALLOW_THREADS
#endif
    PyMem_Free(b.xp);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(expert_down_doc,
"expert_down(act, order, counts, E, w2, D, F, weights, slots, S, out, ldo, threads)\n\n"
"out[slots[i]] = weights[i] * act[j] w2[e]^T for the j-th pair of `group`'s order, i = order[j],\n"
"e its expert: act [R, F] contiguous, w2 [E, D, F], weights float32 [R], out [S, D] rows ldo apart.");

static PyObject *py_expert_down(PyObject *self, PyObject *args) {
    unsigned long long p_act, p_order, p_counts, p_w2, p_weights, p_slots, p_out;
    long long E, D, F, S, ldo;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKLKLLKKLKLi:expert_down", &p_act, &p_order, &p_counts, &E, &p_w2, &D, &F,
                          &p_weights, &p_slots, &S, &p_out, &ldo, &threads))
        return NULL;
    if (!supported() || F % 8 || ldo < D || E < 1) {
        PyErr_SetString(PyExc_ValueError, "expert_down: unsupported CPU or shapes");
        return NULL;
    }
    const int64_t *counts = (const int64_t *)(uintptr_t)p_counts, *order = (const int64_t *)(uintptr_t)p_order;
    pair_buffers b;
    int64_t R = checked_pairs(counts, E, order, (const int64_t *)(uintptr_t)p_slots, S, "slots");
    if (R < 0 || alloc_pairs(&b, R) < 0)
        return NULL;
#if SKINNY_X86
    Py_BEGIN_ALLOW_THREADS
    expert_down((const float *)(uintptr_t)p_act, order, counts, E, (const float *)(uintptr_t)p_w2, D, F,
                (const float *)(uintptr_t)p_weights, (const int64_t *)(uintptr_t)p_slots,
                (float *)(uintptr_t)p_out, ldo, b.xp, b.yp, b.scale, R, threads);
    Py_END_ALLOW_THREADS
#endif
    PyMem_Free(b.xp);
    Py_RETURN_NONE;
}

/* ---- a whole bank's expert step over [T, A] routing, for the in-process dispatcher ---- */
PyDoc_STRVAR(bank_up_doc,
"bank_up(x, ldx, T, A, ids, lookup, L, E, w1, F2, K, u, order, counts, max_rows, threads) -> (largest, R)\n\n"
"The pairs of a [T, A] routing (ids int64 [T*A], global expert ids, -1 for a pair held elsewhere)\n"
"that this bank holds (lookup int64 [L]: global id -> local index or -1), grouped by local expert\n"
"stably: order (int64 [T*A]) gets their pair indices t*A+a, counts (int64 [E]) their sizes; then,\n"
"unless the largest group has more than max_rows rows, u[j] = x[order[j] / A] w1[e]^T (u [T*A, F2]).\n"
"ValueError names a pair routed to an expert the bank does not hold.");

static PyObject *py_bank_up(PyObject *self, PyObject *args) {
    unsigned long long p_x, p_ids, p_lookup, p_w1, p_u, p_order, p_counts;
    long long ldx, T, A, L, E, F2, K, max_rows;
    int threads;
    if (!PyArg_ParseTuple(args, "KLLLKKLLKLLKKKLi:bank_up", &p_x, &ldx, &T, &A, &p_ids, &p_lookup, &L, &E, &p_w1,
                          &F2, &K, &p_u, &p_order, &p_counts, &max_rows, &threads))
        return NULL;
    if (!supported() || K % 8 || ldx < K || E < 1 || T < 0 || A < 1) {
        PyErr_SetString(PyExc_ValueError, "bank_up: unsupported CPU or shapes");
        return NULL;
    }
    const int64_t *ids = (const int64_t *)(uintptr_t)p_ids, *lookup = (const int64_t *)(uintptr_t)p_lookup;
    int64_t *order = (int64_t *)(uintptr_t)p_order, *counts = (int64_t *)(uintptr_t)p_counts;
    const int64_t P = T * A;
    int64_t *local = PyMem_Malloc((size_t)(P ? P : 1) * sizeof(int64_t)), R, bad;
    if (!local)
        return PyErr_NoMemory();
    if ((bad = bank_pairs(ids, P, lookup, L, E, local, &R)) >= 0) {
        PyErr_Format(PyExc_ValueError, "expert_ids: pair %lld is routed to expert %lld, which this bank "
                     "does not hold", (long long)bad, (long long)ids[bad]);
        PyMem_Free(local);
        return NULL;
    }
    int64_t biggest = sort_by_expert(local, P, E, order, counts);
    PyMem_Free(local);
    if (biggest <= max_rows && R > 0) {
        pair_buffers b;
        if (alloc_pairs(&b, R) < 0)
            return NULL;
#if SKINNY_X86
        Py_BEGIN_ALLOW_THREADS
        expert_up((const float *)(uintptr_t)p_x, ldx, NULL, A, order, counts, E, (const float *)(uintptr_t)p_w1,
                  F2, K, (float *)(uintptr_t)p_u, b.xp, b.yp, R, threads);
        Py_END_ALLOW_THREADS
#endif
        PyMem_Free(b.xp);
    }
    return Py_BuildValue("LL", (long long)biggest, (long long)R);
}

PyDoc_STRVAR(bank_down_doc,
"bank_down(act, order, counts, E, w2, D, F, weights, T, A, out, threads)\n\n"
"out[t] = sum over a of weights[t*A+a] * act[j] w2[e]^T, j the pair's row in `bank_up`'s order and e\n"
"its expert, the A terms added in a order (a pair held elsewhere adds 0), as `sum_slots` adds a\n"
"token's slots: act [R, F], w2 [E, D, F], weights float32 [T*A], out [T, D], all contiguous.");

static PyObject *py_bank_down(PyObject *self, PyObject *args) {
    unsigned long long p_act, p_order, p_counts, p_w2, p_weights, p_out;
    long long E, D, F, T, A;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKLKLLKLLKi:bank_down", &p_act, &p_order, &p_counts, &E, &p_w2, &D, &F,
                          &p_weights, &T, &A, &p_out, &threads))
        return NULL;
    if (!supported() || F % 8 || E < 1 || T < 0 || A < 1) {
        PyErr_SetString(PyExc_ValueError, "bank_down: unsupported CPU or shapes");
        return NULL;
    }
    const int64_t *counts = (const int64_t *)(uintptr_t)p_counts, *order = (const int64_t *)(uintptr_t)p_order;
    const int64_t P = T * A;
    int64_t R = 0;
    for (int64_t e = 0; e < E; e++)
        R += counts[e];
    for (int64_t j = 0; j < R; j++)
        if (order[j] < 0 || order[j] >= P) {
            PyErr_Format(PyExc_ValueError, "order: entry %lld is out of range [0, %lld)", (long long)j, (long long)P);
            return NULL;
        }
    float *slots = PyMem_Calloc((size_t)(P ? P : 1) * (size_t)D, sizeof(float)); /* unheld pairs: 0 */
    pair_buffers b;
    if (!slots)
        return PyErr_NoMemory();
    if (alloc_pairs(&b, R) < 0) {
        PyMem_Free(slots);
        return NULL;
    }
#if SKINNY_X86
    float *out = (float *)(uintptr_t)p_out;
    Py_BEGIN_ALLOW_THREADS
    expert_down((const float *)(uintptr_t)p_act, order, counts, E, (const float *)(uintptr_t)p_w2, D, F,
                (const float *)(uintptr_t)p_weights, NULL, slots, D, b.xp, b.yp, b.scale, R, threads);
    add_slots(slots, T, A, D, NULL, out);
    Py_END_ALLOW_THREADS
#endif
    PyMem_Free(b.xp);
    PyMem_Free(slots);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(decode_doc,
"decode_attention(ptrs, sizes, eps, threads)\n\n"
"One decode step of a layer's LF attention for B one-token chunks, before o_proj (model/skinny.py\n"
"`decode_attention` says what each pointer is). Indices are checked in range first.");

static int in_range(const int64_t *idx, int64_t n, int64_t limit, const char *name) {
    for (int64_t i = 0; i < n; i++)
        if (idx[i] < 0 || idx[i] >= limit) {
            PyErr_Format(PyExc_ValueError, "%s: entry %lld is %lld, out of range [0, %lld)", name, (long long)i,
                         (long long)idx[i], (long long)limit);
            return -1;
        }
    return 0;
}

/* A decode step's attention shapes the C layer takes: hidden a multiple of 16, head dim a multiple
 * of 8 up to 512, at least one chunk and one context position. */
static int attention_shapes(int64_t B, int64_t d, int64_t H, int64_t D, int64_t L) {
    return d % 16 == 0 && D % 8 == 0 && D <= 512 && H * D == d && B >= 1 && L >= 1;
}

/* The step's cache indices in range (N blocks, P slots); -1 with ValueError naming the first that is
 * not. */
static int step_indices(const int64_t *lf_read, const int64_t *lf_blocks, const int64_t *write,
                        const int64_t *slots, int64_t B, int64_t L, int64_t N, int64_t P) {
    return in_range(lf_read, B, N, "lf_read") < 0 || in_range(lf_blocks, B, N, "lf_blocks") < 0 ||
                   in_range(write, B, P, "write_slots") < 0 || in_range(slots, B * L, P, "decode_slots") < 0
               ? -1
               : 0;
}

static PyObject *py_decode(PyObject *self, PyObject *args) {
    unsigned long long p[20];
    long long B, d, H, D, P, L, N;
    float eps;
    int threads;
    if (!PyArg_ParseTuple(args, "(KKKKKKKKKKKKKKKKKKKK)(LLLLLLL)fi:decode_attention", &p[0], &p[1], &p[2], &p[3],
                          &p[4], &p[5], &p[6], &p[7], &p[8], &p[9], &p[10], &p[11], &p[12], &p[13], &p[14], &p[15],
                          &p[16], &p[17], &p[18], &p[19], &B, &d, &H, &D, &P, &L, &N, &eps, &threads))
        return NULL;
    if (!supported() || !attention_shapes(B, d, H, D, L)) {
        PyErr_SetString(PyExc_ValueError, "decode_attention: unsupported CPU or shapes");
        return NULL;
    }
#if SKINNY_X86
    decode_t c = {
        .h = (const float *)(uintptr_t)p[0], .lf = (const float *)(uintptr_t)p[1],
        .w1 = (const float *)(uintptr_t)p[2], .b1 = (const float *)(uintptr_t)p[3],
        .w2 = (const float *)(uintptr_t)p[4], .b2 = (const float *)(uintptr_t)p[5],
        .lfnorm = (const float *)(uintptr_t)p[6], .wqk = (const float *)(uintptr_t)p[7],
        .wv = (const float *)(uintptr_t)p[8], .cos = (const float *)(uintptr_t)p[9],
        .sin = (const float *)(uintptr_t)p[10], .kc = (float *)(uintptr_t)p[11], .vc = (float *)(uintptr_t)p[12],
        .out = (float *)(uintptr_t)p[13], .lf_read = (const int64_t *)(uintptr_t)p[14],
        .lf_blocks = (const int64_t *)(uintptr_t)p[15], .write = (const int64_t *)(uintptr_t)p[16],
        .slots = (const int64_t *)(uintptr_t)p[17], .has_prev = (const uint8_t *)(uintptr_t)p[18],
        .mask = (const uint8_t *)(uintptr_t)p[19],
        .B = B, .d = d, .H = H, .D = D, .P = P, .L = L, .eps = eps, .threads = threads,
    };
    if (step_indices(c.lf_read, c.lf_blocks, c.write, c.slots, B, L, N, P) < 0)
        return NULL;
    float *scratch = PyMem_Malloc(sizeof(float) * attention_scratch(B, d, L, threads));
    if (!scratch)
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    decode_attention(&c, scratch);
    Py_END_ALLOW_THREADS
    PyMem_Free(scratch);
#endif
    Py_RETURN_NONE;
}

PyDoc_STRVAR(rms_doc, "rms_norm(x, w, out, B, d, eps)\n\nout = w * x / sqrt(mean(x^2) + eps) per row, float32 pointers.");

static PyObject *py_rms(PyObject *self, PyObject *args) {
    unsigned long long x, w, out;
    long long B, d;
    float eps;
    if (!PyArg_ParseTuple(args, "KKKLLf:rms_norm", &x, &w, &out, &B, &d, &eps))
        return NULL;
    if (!supported() || B < 0 || d < 1) {
        PyErr_SetString(PyExc_ValueError, "rms_norm: unsupported CPU or shapes");
        return NULL;
    }
#if SKINNY_X86
    Py_BEGIN_ALLOW_THREADS
    rms_rows((const float *)(uintptr_t)x, (const float *)(uintptr_t)w, eps, (float *)(uintptr_t)out, B, d);
    Py_END_ALLOW_THREADS
#endif
    Py_RETURN_NONE;
}

PyDoc_STRVAR(post_doc,
"decode_post((a, x, wo, post, wqkv, x_out, g, wts, ids), (B, d, N, top_k, normalize), eps, threads)\n\n"
"x_out = x + a wo^T, g = RMSNorm(x_out), and the Attention Router's top_k ids and weights of g\n"
"(model/skinny.py `decode_post` says what each pointer is).");

static PyObject *py_post(PyObject *self, PyObject *args) {
    unsigned long long p[9];
    long long B, d, N, top_k, normalize;
    float eps;
    int threads;
    if (!PyArg_ParseTuple(args, "(KKKKKKKKK)(LLLLL)fi:decode_post", &p[0], &p[1], &p[2], &p[3], &p[4], &p[5], &p[6],
                          &p[7], &p[8], &B, &d, &N, &top_k, &normalize, &eps, &threads))
        return NULL;
    if (!supported() || d % 8 || N < 1 || N > 256 || top_k < 1 || top_k > N || B < 1) {
        PyErr_SetString(PyExc_ValueError, "decode_post: unsupported CPU or shapes");
        return NULL;
    }
#if SKINNY_X86
    float *qkv = PyMem_Malloc(sizeof(float) * (size_t)(B * 3 * N));
    if (!qkv)
        return PyErr_NoMemory();
    post_t c = {
        .a = (const float *)(uintptr_t)p[0], .x = (const float *)(uintptr_t)p[1],
        .wo = (const float *)(uintptr_t)p[2], .post = (const float *)(uintptr_t)p[3],
        .wqkv = (const float *)(uintptr_t)p[4], .x_out = (float *)(uintptr_t)p[5], .g = (float *)(uintptr_t)p[6],
        .wts = (float *)(uintptr_t)p[7], .ids = (int64_t *)(uintptr_t)p[8], .qkv = qkv,
        .B = B, .d = d, .N = N, .top_k = top_k, .normalize = (int)normalize, .threads = (int)threads, .eps = eps,
    };
    Py_BEGIN_ALLOW_THREADS
    decode_post(&c);
    Py_END_ALLOW_THREADS
    PyMem_Free(qkv);
#endif
    Py_RETURN_NONE;
}

PyDoc_STRVAR(swiglu_doc,
"swiglu(u, R, F, act, threads)\n\n"
"act[r] = silu(u[r, :F]) * u[r, F:] for R rows, silu(a) = a / (1 + exp(-a)) with this module's\n"
"vectorised exp: u [R, 2F] and act [R, F] contiguous float32.");

static PyObject *py_swiglu(PyObject *self, PyObject *args) {
    unsigned long long p_u, p_act;
    long long R, F;
    int threads;
    if (!PyArg_ParseTuple(args, "KLLKi:swiglu", &p_u, &R, &F, &p_act, &threads))
        return NULL;
    if (!supported() || R < 0 || F < 1) {
        PyErr_SetString(PyExc_ValueError, "swiglu: unsupported CPU or shapes");
        return NULL;
    }
#if SKINNY_X86
    Py_BEGIN_ALLOW_THREADS
    swiglu_rows((const float *)(uintptr_t)p_u, R, F, (float *)(uintptr_t)p_act, threads);
    Py_END_ALLOW_THREADS
#endif
    Py_RETURN_NONE;
}

PyDoc_STRVAR(layers_doc,
"decode_layers((table, eps, layers, E_max, routing), (lf_read, lf_blocks, write_slots, decode_slots, has_prev,\n"
"mask), (B, d, H, D, P, L, blocks, N, A, normalize, F), (token_ids, positions, logits_rows, embed, cos, sin,\n"
"norm, head, logits), (R, vocab, V, max_pos), eps, threads)\n\n"
"A decode step in one call: x [B, d] from the embedding rows of token_ids, the rotary rows of\n"
"positions, every layer with its expert step over its bank, then the final RMSNorm (norm, eps) and the\n"
"LM head (head [V, d]) of the R rows logits_rows into logits [R, V].\n"
"table: int64 [layers, LAYER_PTRS] (model/skinny.py `decode_table`), eps: float32 [layers, 3]\n"
"(input norm, LF norm, post norm); routing: 0, or int64 [layers, B, A] for each layer's expert ids;\n"
"embed [vocab, d], cos and sin [max_pos, D]. Indices are checked in range first; ValueError names a\n"
"pair routed to an expert its layer's bank does not hold (the layers before it are done).");

static PyObject *py_layers(PyObject *self, PyObject *args) {
    unsigned long long m[3], p[6], e[9];
    long long NL, E_max, B, d, H, D, P, L, NB, N, A, normalize, F, R, vocab, V, max_pos;
    float eps;
    int threads;
    if (!PyArg_ParseTuple(args, "(KKLLK)(KKKKKK)(LLLLLLLLLLL)(KKKKKKKKK)(LLLL)fi:decode_layers", &m[0], &m[1], &NL,
                          &E_max, &m[2], &p[0], &p[1], &p[2], &p[3], &p[4], &p[5], &B, &d, &H, &D, &P, &L, &NB, &N,
                          &A, &normalize, &F, &e[0], &e[1], &e[2], &e[3], &e[4], &e[5], &e[6], &e[7], &e[8], &R,
                          &vocab, &V, &max_pos, &eps, &threads))
        return NULL;
    if (!supported() || !attention_shapes(B, d, H, D, L) || N < 1 || N > 256 || A < 1 || A > N || F < 8 || F % 8 ||
        E_max < 1 || NL < 0 || R < 0 || V < 1) {
        PyErr_SetString(PyExc_ValueError, "decode_layers: unsupported CPU or shapes");
        return NULL;
    }
#if SKINNY_X86
    const int64_t *tokens = (const int64_t *)(uintptr_t)e[0], *positions = (const int64_t *)(uintptr_t)e[1];
    const int64_t *rows = (const int64_t *)(uintptr_t)e[2];
    const float *embed = (const float *)(uintptr_t)e[3], *cos_t = (const float *)(uintptr_t)e[4];
    const float *sin_t = (const float *)(uintptr_t)e[5];
    step_t s = {
        .lf_read = (const int64_t *)(uintptr_t)p[0], .lf_blocks = (const int64_t *)(uintptr_t)p[1],
        .write = (const int64_t *)(uintptr_t)p[2], .slots = (const int64_t *)(uintptr_t)p[3],
        .has_prev = (const uint8_t *)(uintptr_t)p[4], .mask = (const uint8_t *)(uintptr_t)p[5],
        .B = B, .d = d, .H = H, .D = D, .P = P, .L = L, .N = N, .A = A, .F = F, .normalize = (int)normalize,
        .threads = threads,
    };
    if (step_indices(s.lf_read, s.lf_blocks, s.write, s.slots, B, L, NB, P) < 0 ||
        in_range(tokens, B, vocab, "token_ids") < 0 || in_range(positions, B, max_pos, "positions") < 0 ||
        in_range(rows, R, B, "logits_rows") < 0)
        return NULL;
    /* then h, a, x2, g [B, d]; qkv [B, 3N]; wts [Pp]; u, act [Pp, 3F]; slots [Pp, d]; then the
     * step's x [B, d], its cos and sin rows [B, D] each, and the final norm's rows [R, d] */
    const int64_t Pp = B * A;
    size_t layer_floats = attention_scratch(B, d, L, threads) + (size_t)(4 * B * d + B * 3 * N + Pp) +
                          (size_t)(Pp * 3 * F + Pp * d);
    float *fs = PyMem_Malloc((layer_floats + (size_t)(B * d + 2 * B * D + R * d)) * sizeof(float));
    int64_t *is = PyMem_Malloc((size_t)(3 * Pp + E_max) * sizeof(int64_t)), pair = -1, layer;
    pair_buffers b = {0};
    if (!fs || !is || alloc_pairs(&b, Pp) < 0) {
        PyMem_Free(fs), PyMem_Free(is);
        return fs && is ? NULL : PyErr_NoMemory();
    }
    float *x = fs + layer_floats, *cs = x + B * d, *sn = cs + B * D, *last = sn + B * D;
    s.x = x, s.cos = cs, s.sin = sn;
    Py_BEGIN_ALLOW_THREADS
    for (int64_t i = 0; i < B; i++) { /* the rows torch's embedding and table indexing would give */
        memcpy(x + i * d, embed + tokens[i] * d, (size_t)d * sizeof(float));
        memcpy(cs + i * D, cos_t + positions[i] * D, (size_t)D * sizeof(float));
        memcpy(sn + i * D, sin_t + positions[i] * D, (size_t)D * sizeof(float));
    }
    layer = decode_layers((const int64_t *)(uintptr_t)m[0], (const float *)(uintptr_t)m[1], NL, &s, fs, is, b.xp,
                          b.yp, b.scale, (int64_t *)(uintptr_t)m[2], &pair);
    if (layer < 0 && R > 0) { /* the final norm and the LM head, as `rms_norm` and `matmul` compute them */
        for (int64_t r = 0; r < R; r++)
            memcpy(last + r * d, x + rows[r] * d, (size_t)d * sizeof(float));
        rms_rows(last, (const float *)(uintptr_t)e[6], eps, last, R, d);
        matmul(last, d, (const float *)(uintptr_t)e[7], NULL, (float *)(uintptr_t)e[8], V, R, V, d, threads);
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(fs), PyMem_Free(is), PyMem_Free(b.xp);
    if (layer >= 0) {
        PyErr_Format(PyExc_ValueError, "expert_ids: layer %lld pair %lld is routed to an expert its bank does not hold",
                     (long long)layer, (long long)pair);
        return NULL;
    }
#endif
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"available", available, METH_NOARGS, available_doc},
    {"openmp", openmp, METH_NOARGS, openmp_doc},
    {"release_team", release_team, METH_NOARGS, release_doc},
    {"matmul", py_matmul, METH_VARARGS, matmul_doc},
    {"group", py_group, METH_VARARGS, group_doc},
    {"decode_attention", py_decode, METH_VARARGS, decode_doc},
    {"rms_norm", py_rms, METH_VARARGS, rms_doc},
    {"decode_post", py_post, METH_VARARGS, post_doc},
    {"expert_up", py_expert_up, METH_VARARGS, expert_up_doc},
    {"expert_down", py_expert_down, METH_VARARGS, expert_down_doc},
    {"bank_up", py_bank_up, METH_VARARGS, bank_up_doc},
    {"bank_down", py_bank_down, METH_VARARGS, bank_down_doc},
    {"swiglu", py_swiglu, METH_VARARGS, swiglu_doc},
    {"decode_layers", py_layers, METH_VARARGS, layers_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "model._skinny", "Skinny float32 matmuls (few rows) with AVX2 + FMA, in C.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__skinny(void) { return PyModule_Create(&module); }
