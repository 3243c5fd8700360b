/* The skinny kernels, written once for each weight type: included by _skinny.c with
 *   WT        the weight element (float, or uint16_t holding bfloat16 bits),
 *   LOADW(p)  8 weights from p as a __m256 of floats (a bfloat16 widens exactly),
 *   NAME(f)   the kernel's name for this type.
 * x rows and y rows are float32 whatever WT is: every multiply-add is float32, so a bfloat16
 * weight gives the products its float32 value would. */

/* One row of x against 8 rows of w at a time: 8 independent FMA chains keep the core busy while
 * the weights stream in. */
TARGET static void NAME(one_row)(const float *x, const WT *w, float *y, float s, int scaled, int64_t O,
                           int64_t K) {
    int64_t o = 0;
    for (; o + 8 <= O; o += 8) {
        const WT *r = w + o * K;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        for (int64_t k = 0; k < K; k += 8) {
            __m256 v = _mm256_loadu_ps(x + k);
            a0 = _mm256_fmadd_ps(v, LOADW(r + k), a0);
            a1 = _mm256_fmadd_ps(v, LOADW(r + K + k), a1);
            a2 = _mm256_fmadd_ps(v, LOADW(r + 2 * K + k), a2);
            a3 = _mm256_fmadd_ps(v, LOADW(r + 3 * K + k), a3);
            a4 = _mm256_fmadd_ps(v, LOADW(r + 4 * K + k), a4);
            a5 = _mm256_fmadd_ps(v, LOADW(r + 5 * K + k), a5);
            a6 = _mm256_fmadd_ps(v, LOADW(r + 6 * K + k), a6);
            a7 = _mm256_fmadd_ps(v, LOADW(r + 7 * K + k), a7);
        }
        float h[8] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3), hsum(a4), hsum(a5), hsum(a6), hsum(a7)};
        for (int j = 0; j < 8; j++)
            y[o + j] = scaled ? h[j] * s : h[j];
    }
    for (; o < O; o++) {
        __m256 a = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k += 8)
            a = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), LOADW(w + o * K + k), a);
        float h = hsum(a);
        y[o] = scaled ? h * s : h;
    }
}

/* k-th step of a pass over a 4-row block: its share of the block PF_BLOCKS ahead (4K weights over
 * K/8 steps: 32 weights a step, 2 cache lines of floats or 1 of bf16), when pf (that block) is given. */
static inline void NAME(ask_ahead)(const char *pf, int64_t k) {
    if (pf) {
        const char *p = pf + k / 8 * 32 * (int64_t)sizeof(WT);
        _mm_prefetch(p, _MM_HINT_T0);
        if (32 * sizeof(WT) > 64)
            _mm_prefetch(p + 64, _MM_HINT_T0);
    }
}

/* y[m][o] = sum_k x[m][k] w[o, k] for o in [o0, o1): 4 rows of w by 2 rows of x at a time, and for
 * an odd row count the last 3 rows in one pass (12 accumulators: a pair then a single row, whose 4
 * FMA chains wait on their own latency, took 1.36x as long from cache, docs/PERFORMANCE.md). Any
 * split of [0, O) into ranges gives the same bits (each element's operations are the same in a
 * block and in the tail), and so does any grouping of the rows. */
TARGET static void NAME(dot_rows)(const float *const *x, const void *wv, float *const *y, const float *scale,
                        int64_t M, int64_t o0, int64_t O, int64_t K) {
    const WT *w = (const WT *)wv;
    if (M == 1) {
        NAME(one_row)(x[0], w + o0 * K, y[0] + o0, scale ? scale[0] : 1.0f, scale != NULL, O - o0, K);
        return;
    }
    const int64_t pairs = M % 2 ? M - 3 : M; /* rows in pairs; the 3 after them in one pass */
    int64_t o = o0;
    for (; o + 4 <= O; o += 4) {
        const WT *w0 = w + o * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        /* the first pass streams this block from memory: it asks for the block PF_BLOCKS ahead */
        const char *ahead = (const char *)(w0 + PF_BLOCKS * 4 * K);
        for (int64_t m = 0; m < pairs; m += 2) {
            const float *x0 = x[m], *x1 = x[m + 1];
            const char *pf = m ? NULL : ahead;
            __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
            __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
            for (int64_t k = 0; k < K; k += 8) {
                NAME(ask_ahead)(pf, k);
                __m256 v0 = _mm256_loadu_ps(x0 + k), v1 = _mm256_loadu_ps(x1 + k);
                __m256 u = LOADW(w0 + k);
                a00 = _mm256_fmadd_ps(v0, u, a00), a10 = _mm256_fmadd_ps(v1, u, a10);
                u = LOADW(w1 + k);
                a01 = _mm256_fmadd_ps(v0, u, a01), a11 = _mm256_fmadd_ps(v1, u, a11);
                u = LOADW(w2 + k);
                a02 = _mm256_fmadd_ps(v0, u, a02), a12 = _mm256_fmadd_ps(v1, u, a12);
                u = LOADW(w3 + k);
                a03 = _mm256_fmadd_ps(v0, u, a03), a13 = _mm256_fmadd_ps(v1, u, a13);
            }
            float h0[4] = {hsum(a00), hsum(a01), hsum(a02), hsum(a03)};
            float h1[4] = {hsum(a10), hsum(a11), hsum(a12), hsum(a13)};
            for (int j = 0; j < 4; j++) {
                y[m][o + j] = scale ? h0[j] * scale[m] : h0[j];
                y[m + 1][o + j] = scale ? h1[j] * scale[m + 1] : h1[j];
            }
        }
        if (pairs < M) {
            const int64_t m = pairs;
            const float *x0 = x[m], *x1 = x[m + 1], *x2 = x[m + 2];
            const char *pf = m ? NULL : ahead;
            __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
            __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00;
            for (int64_t k = 0; k < K; k += 8) {
                NAME(ask_ahead)(pf, k);
                __m256 v0 = _mm256_loadu_ps(x0 + k), v1 = _mm256_loadu_ps(x1 + k), v2 = _mm256_loadu_ps(x2 + k);
                __m256 u = LOADW(w0 + k);
                a00 = _mm256_fmadd_ps(v0, u, a00), a10 = _mm256_fmadd_ps(v1, u, a10), a20 = _mm256_fmadd_ps(v2, u, a20);
                u = LOADW(w1 + k);
                a01 = _mm256_fmadd_ps(v0, u, a01), a11 = _mm256_fmadd_ps(v1, u, a11), a21 = _mm256_fmadd_ps(v2, u, a21);
                u = LOADW(w2 + k);
                a02 = _mm256_fmadd_ps(v0, u, a02), a12 = _mm256_fmadd_ps(v1, u, a12), a22 = _mm256_fmadd_ps(v2, u, a22);
                u = LOADW(w3 + k);
                a03 = _mm256_fmadd_ps(v0, u, a03), a13 = _mm256_fmadd_ps(v1, u, a13), a23 = _mm256_fmadd_ps(v2, u, a23);
            }
            float h[3][4] = {{hsum(a00), hsum(a01), hsum(a02), hsum(a03)},
                             {hsum(a10), hsum(a11), hsum(a12), hsum(a13)},
                             {hsum(a20), hsum(a21), hsum(a22), hsum(a23)}};
            for (int i = 0; i < 3; i++)
                for (int j = 0; j < 4; j++)
                    y[m + i][o + j] = scale ? h[i][j] * scale[m + i] : h[i][j];
        }
    }
    for (; o < O; o++)
        for (int64_t m = 0; m < M; m++) {
            __m256 a = _mm256_setzero_ps();
            for (int64_t k = 0; k < K; k += 8)
                a = _mm256_fmadd_ps(_mm256_loadu_ps(x[m] + k), LOADW(w + o * K + k), a);
            float h = hsum(a);
            y[m][o] = scale ? h * scale[m] : h;
        }
}

/* The same for MANY_ROWS rows or more (compute-bound: a decode layer's projections at 12+ streams):
 * 3 rows of w by 4 rows of x at a time, 12 accumulators, 7 loads per 12 FMAs where the 4 x 2 block
 * does 6 per 8 (1.04-1.17x at 16-64 rows, docs/PERFORMANCE.md); rows and outputs it leaves go to
 * dot_rows. The same operations per element (8 lanes of FMAs over k, one add tree): the same bits. */
TARGET __attribute__((noinline)) static void NAME(dot_rows_fours)(const float *const *x, const WT *w, float *const *y, const float *scale,
                                  int64_t M4, int64_t o0, int64_t O, int64_t K) {
    /* The next 3-row block of w is asked for while this one is used, its cache lines spread over the
     * passes of 4 x rows: without it the first pass over each block waits on memory (a decode step's
     * dense weights are not in cache: the experts went through it). */
    const int64_t lines = (3 * K * (int64_t)sizeof(WT) + 63) / 64, passes = M4 / 4, per = passes ? (lines + passes - 1) / passes : 0;
    int64_t o = o0;
    for (; o + 3 <= O; o += 3) {
        const WT *w0 = w + o * K, *w1 = w0 + K, *w2 = w1 + K;
        const char *next = o + 6 <= O ? (const char *)(w0 + 3 * K) : NULL;
        for (int64_t m = 0; m < M4; m += 4) {
            if (next)
                for (int64_t i = m / 4 * per, end = i + per < lines ? i + per : lines; i < end; i++)
                    _mm_prefetch(next + 64 * i, _MM_HINT_T0);
            const float *x0 = x[m], *x1 = x[m + 1], *x2 = x[m + 2], *x3 = x[m + 3];
            __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a10 = a00, a11 = a00, a12 = a00;
            __m256 a20 = a00, a21 = a00, a22 = a00, a30 = a00, a31 = a00, a32 = a00;
            for (int64_t k = 0; k < K; k += 8) {
                __m256 u0 = LOADW(w0 + k), u1 = LOADW(w1 + k), u2 = LOADW(w2 + k);
                __m256 v = _mm256_loadu_ps(x0 + k);
                a00 = _mm256_fmadd_ps(v, u0, a00), a01 = _mm256_fmadd_ps(v, u1, a01), a02 = _mm256_fmadd_ps(v, u2, a02);
                v = _mm256_loadu_ps(x1 + k);
                a10 = _mm256_fmadd_ps(v, u0, a10), a11 = _mm256_fmadd_ps(v, u1, a11), a12 = _mm256_fmadd_ps(v, u2, a12);
                v = _mm256_loadu_ps(x2 + k);
                a20 = _mm256_fmadd_ps(v, u0, a20), a21 = _mm256_fmadd_ps(v, u1, a21), a22 = _mm256_fmadd_ps(v, u2, a22);
                v = _mm256_loadu_ps(x3 + k);
                a30 = _mm256_fmadd_ps(v, u0, a30), a31 = _mm256_fmadd_ps(v, u1, a31), a32 = _mm256_fmadd_ps(v, u2, a32);
            }
            float h[4][3] = {{hsum(a00), hsum(a01), hsum(a02)}, {hsum(a10), hsum(a11), hsum(a12)},
                             {hsum(a20), hsum(a21), hsum(a22)}, {hsum(a30), hsum(a31), hsum(a32)}};
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 3; j++)
                    y[m + i][o + j] = scale ? h[i][j] * scale[m + i] : h[i][j];
        }
    }
    if (o < O && M4)
        NAME(dot_rows)(x, w, y, scale, M4, o, O, K);
}

/* The rows in fours by dot_rows_fours, the 1-3 after them by dot_rows; with such rows, a piece of
 * about PIECE_FLOATS weights at a time, so that their pass reads the piece from L2 instead of all
 * the weights again from memory (1.1-1.24x at 17-21 rows; kept out of dot_rows_fours, whose loop
 * was 0.91x at 32 rows with a call in it). Any split of the outputs gives the same bits. */
#define PIECE_FLOATS (64 * 1024)
TARGET static void NAME(dot_rows_many)(const float *const *x, const void *wv, float *const *y, const float *scale,
                                 int64_t M, int64_t o0, int64_t O, int64_t K) {
    const WT *w = (const WT *)wv;
    const int64_t M4 = M / 4 * 4, piece = M4 < M ? (PIECE_FLOATS / K / 12 + 1) * 12 : O - o0;
    for (int64_t o = o0; o < O; o += piece) {
        const int64_t end = O - o < piece ? O : o + piece;
        NAME(dot_rows_fours)(x, w, y, scale, M4, o, end, K);
        if (M4 < M)
            NAME(dot_rows)(x + M4, w, y + M4, scale ? scale + M4 : NULL, M - M4, o, end, K);
    }
}
