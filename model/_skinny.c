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
#include <stdint.h>

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

/* One row of x against 8 rows of w at a time: 8 independent FMA chains keep the core busy while
 * the weights stream in. */
TARGET static void one_row(const float *x, const float *w, float *y, int64_t O, int64_t K) {
    int64_t o = 0;
    for (; o + 8 <= O; o += 8) {
        const float *r = w + o * K;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        for (int64_t k = 0; k < K; k += 8) {
            __m256 v = _mm256_loadu_ps(x + k);
            a0 = _mm256_fmadd_ps(v, _mm256_loadu_ps(r + k), a0);
            a1 = _mm256_fmadd_ps(v, _mm256_loadu_ps(r + K + k), a1);
            a2 = _mm256_fmadd_ps(v, _mm256_loadu_ps(r + 2 * K + k), a2);
            a3 = _mm256_fmadd_ps(v, _mm256_loadu_ps(r + 3 * K + k), a3);
            a4 = _mm256_fmadd_ps(v, _mm256_loadu_ps(r + 4 * K + k), a4);
            a5 = _mm256_fmadd_ps(v, _mm256_loadu_ps(r + 5 * K + k), a5);
            a6 = _mm256_fmadd_ps(v, _mm256_loadu_ps(r + 6 * K + k), a6);
            a7 = _mm256_fmadd_ps(v, _mm256_loadu_ps(r + 7 * K + k), a7);
        }
        y[o] = hsum(a0), y[o + 1] = hsum(a1), y[o + 2] = hsum(a2), y[o + 3] = hsum(a3);
        y[o + 4] = hsum(a4), y[o + 5] = hsum(a5), y[o + 6] = hsum(a6), y[o + 7] = hsum(a7);
    }
    for (; o < O; o++) {
        __m256 a = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k += 8)
            a = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(w + o * K + k), a);
        y[o] = hsum(a);
    }
}

/* y[m, o] = sum_k x[m, k] w[o, k]: 4 rows of w by 2 rows of x at a time, then single rows. */
TARGET static void rows(const float *x, int64_t ldx, const float *w, float *y, int64_t ldy, int64_t M,
                        int64_t O, int64_t K) {
    int64_t o = 0;
    for (; o + 4 <= O; o += 4) {
        const float *w0 = w + o * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        int64_t m = 0;
        for (; m + 2 <= M; m += 2) {
            const float *x0 = x + m * ldx, *x1 = x0 + ldx;
            __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
            __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
            for (int64_t k = 0; k < K; k += 8) {
                __m256 v0 = _mm256_loadu_ps(x0 + k), v1 = _mm256_loadu_ps(x1 + k);
                __m256 u = _mm256_loadu_ps(w0 + k);
                a00 = _mm256_fmadd_ps(v0, u, a00), a10 = _mm256_fmadd_ps(v1, u, a10);
                u = _mm256_loadu_ps(w1 + k);
                a01 = _mm256_fmadd_ps(v0, u, a01), a11 = _mm256_fmadd_ps(v1, u, a11);
                u = _mm256_loadu_ps(w2 + k);
                a02 = _mm256_fmadd_ps(v0, u, a02), a12 = _mm256_fmadd_ps(v1, u, a12);
                u = _mm256_loadu_ps(w3 + k);
                a03 = _mm256_fmadd_ps(v0, u, a03), a13 = _mm256_fmadd_ps(v1, u, a13);
            }
            float *y0 = y + m * ldy + o, *y1 = y0 + ldy;
            y0[0] = hsum(a00), y0[1] = hsum(a01), y0[2] = hsum(a02), y0[3] = hsum(a03);
            y1[0] = hsum(a10), y1[1] = hsum(a11), y1[2] = hsum(a12), y1[3] = hsum(a13);
        }
        for (; m < M; m++) {
            const float *x0 = x + m * ldx;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t k = 0; k < K; k += 8) {
                __m256 v = _mm256_loadu_ps(x0 + k);
                a0 = _mm256_fmadd_ps(v, _mm256_loadu_ps(w0 + k), a0);
                a1 = _mm256_fmadd_ps(v, _mm256_loadu_ps(w1 + k), a1);
                a2 = _mm256_fmadd_ps(v, _mm256_loadu_ps(w2 + k), a2);
                a3 = _mm256_fmadd_ps(v, _mm256_loadu_ps(w3 + k), a3);
            }
            float *y0 = y + m * ldy + o;
            y0[0] = hsum(a0), y0[1] = hsum(a1), y0[2] = hsum(a2), y0[3] = hsum(a3);
        }
    }
    for (; o < O; o++)
        for (int64_t m = 0; m < M; m++) {
            __m256 a = _mm256_setzero_ps();
            for (int64_t k = 0; k < K; k += 8)
                a = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * ldx + k), _mm256_loadu_ps(w + o * K + k), a);
            y[m * ldy + o] = hsum(a);
        }
}

static void matmul(const float *x, int64_t ldx, const float *w, const float *b, float *y, int64_t ldy,
                   int64_t M, int64_t O, int64_t K) {
    if (M == 1)
        one_row(x, w, y, O, K);
    else
        rows(x, ldx, w, y, ldy, M, O, K);
    if (b)
        for (int64_t m = 0; m < M; m++)
            for (int64_t o = 0; o < O; o++)
                y[m * ldy + o] += b[o];
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

PyDoc_STRVAR(matmul_doc,
"matmul(x, ldx, w, b, y, ldy, M, O, K)\n\n"
"y[m, o] = sum_k x[m, k] w[o, k] (+ b[o]) for m < M, o < O, float32. x, w, b, y are data pointers\n"
"(b 0 for none); x rows ldx floats apart, y rows ldy apart, w [O, K] contiguous, K a multiple of 8.\n"
"The caller (model/skinny.py) has checked the tensors; the GIL is released while it runs.");

static PyObject *py_matmul(PyObject *self, PyObject *args) {
    unsigned long long x, w, b, y;
    long long ldx, ldy, M, O, K;
    if (!PyArg_ParseTuple(args, "KLKKKLLLL:matmul", &x, &ldx, &w, &b, &y, &ldy, &M, &O, &K))
        return NULL;
    if (!supported() || K % 8 || M < 0 || O < 0 || K < 0 || ldx < K || ldy < O) {
        PyErr_SetString(PyExc_ValueError, "matmul: unsupported CPU or shapes (K a multiple of 8, ldx >= K, ldy >= O)");
        return NULL;
    }
#if SKINNY_X86
    Py_BEGIN_ALLOW_THREADS
    matmul((const float *)(uintptr_t)x, ldx, (const float *)(uintptr_t)w, (const float *)(uintptr_t)b,
           (float *)(uintptr_t)y, ldy, M, O, K);
    Py_END_ALLOW_THREADS
#endif
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"available", available, METH_NOARGS, available_doc},
    {"matmul", py_matmul, METH_VARARGS, matmul_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "model._skinny", "Skinny float32 matmuls (few rows) with AVX2 + FMA, in C.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__skinny(void) { return PyModule_Create(&module); }
