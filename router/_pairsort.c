/* The dispatch plan's sort, in one call: routed (token, expert) pairs sorted by worker.
 *
 * Why C: a gateway pays this before every layer's first send, and resumes cold each layer (its
 * pools ran on its cores in between), so the numpy version's dozen calls cost ~40 us of the
 * ~450 us round trip to 4 pools (docs/TRANSPORT.md). This is that plan's one call: a stable
 * counting sort of the pairs by worker, writing the plan straight where the caller wants it
 * (a shared batch). `router.plan.plan_dispatch` is its only caller and its documentation.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* A C-contiguous buffer of `obj`, checked to hold `itemsize`-byte items (and integers when `integer`). */
static int get_buffer(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t itemsize, int integer,
                      const char *name) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0)
        return -1;
    const char *f = view->format ? view->format : "B";
    if (*f == '<' || *f == '=' || *f == '@')
        f++;
    int is_int = strchr("bBhHiIlLqQ", *f) != NULL && f[1] == '\0';
    if ((itemsize && view->itemsize != itemsize) || (integer && !is_int)) {
        PyErr_Format(PyExc_TypeError, "%s: expected %s items of %zd bytes, got format '%s' of %zd bytes", name,
                     integer ? "integer" : "raw", itemsize, view->format ? view->format : "B", view->itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(sort_pairs_doc,
"sort_pairs(pair_worker, expert_ids, weight_bits, top_k, num_workers, index_out, weights_out) -> sizes\n\n"
"Pairs i = t*top_k + a sorted by worker, stable (token order within a worker): for the j-th pair of\n"
"the sorted order, index_out[0, j] = its token t, index_out[1, j] = i (its output slot),\n"
"index_out[2, j] = expert_ids[i], weights_out[j] = weight_bits[i]. pair_worker and expert_ids are\n"
"int64 [K]; index_out int64 [3, K]; weights are items of any size, moved as bits. Returns the\n"
"pairs per worker, a list of num_workers ints.");

static PyObject *sort_pairs(PyObject *self, PyObject *args) {
    PyObject *o_worker, *o_ids, *o_w, *o_index, *o_wout;
    Py_ssize_t top_k, num_workers;
    if (!PyArg_ParseTuple(args, "OOOnnOO:sort_pairs", &o_worker, &o_ids, &o_w, &top_k, &num_workers, &o_index,
                          &o_wout))
        return NULL;
    if (top_k < 1 || num_workers < 1) {
        PyErr_SetString(PyExc_ValueError, "sort_pairs: top_k and num_workers must be positive");
        return NULL;
    }
    Py_buffer worker, ids, w, index, wout;
    PyObject *sizes = NULL;
    Py_ssize_t *counts = NULL;
    if (get_buffer(o_worker, &worker, 0, 8, 1, "pair_worker") < 0)
        return NULL;
    if (get_buffer(o_ids, &ids, 0, 8, 1, "expert_ids") < 0)
        goto release_worker;
    if (get_buffer(o_w, &w, 0, 0, 0, "weight_bits") < 0)
        goto release_ids;
    if (get_buffer(o_index, &index, 1, 8, 1, "index_out") < 0)
        goto release_w;
    if (get_buffer(o_wout, &wout, 1, w.itemsize, 0, "weights_out") < 0)
        goto release_index;

    Py_ssize_t K = worker.len / 8, isz = w.itemsize;
    if (ids.len != worker.len || w.len != K * isz || index.len != 3 * K * 8 || wout.len != w.len ||
        K % top_k != 0) {
        PyErr_Format(PyExc_ValueError,
                     "sort_pairs: %zd pairs (top_k %zd) need expert_ids [%zd], weight_bits [%zd], "
                     "index_out [3, %zd], weights_out [%zd]; got %zd, %zd, %zd and %zd items",
                     K, top_k, K, K, K, K, ids.len / 8, w.len / isz, index.len / 8, wout.len / isz);
        goto release_all;
    }
    const int64_t *pw = worker.buf, *eid = ids.buf;
    counts = PyMem_Calloc(num_workers + 1, sizeof(Py_ssize_t));
    if (counts == NULL) {
        PyErr_NoMemory();
        goto release_all;
    }
    for (Py_ssize_t i = 0; i < K; i++) {
        if (pw[i] < 0 || pw[i] >= num_workers) {
            PyErr_Format(PyExc_ValueError, "sort_pairs: pair %zd has worker %lld, not in [0, %zd)", i,
                         (long long)pw[i], num_workers);
            goto release_all;
        }
        counts[pw[i] + 1]++;
    }
    if ((sizes = PyList_New(num_workers)) == NULL)
        goto release_all;
    for (Py_ssize_t k = 0; k < num_workers; k++) {
        PyObject *n = PyLong_FromSsize_t(counts[k + 1]);
        if (n == NULL) {
            Py_CLEAR(sizes);
            goto release_all;
        }
        PyList_SET_ITEM(sizes, k, n);
        counts[k + 1] += counts[k]; /* counts[k]: where worker k's pairs start */
    }
    int64_t *rows = index.buf, *slots = rows + K, *experts = rows + 2 * K;
    const char *wsrc = w.buf;
    char *wdst = wout.buf;
    for (Py_ssize_t i = 0; i < K; i++) {
        Py_ssize_t j = counts[pw[i]]++;
        rows[j] = i / top_k;
        slots[j] = i;
        experts[j] = eid[i];
        memcpy(wdst + j * isz, wsrc + i * isz, isz);
    }

release_all:
    PyMem_Free(counts);
    PyBuffer_Release(&wout);
release_index:
    PyBuffer_Release(&index);
release_w:
    PyBuffer_Release(&w);
release_ids:
    PyBuffer_Release(&ids);
release_worker:
    PyBuffer_Release(&worker);
    return sizes;
}

static PyMethodDef methods[] = {
    {"sort_pairs", sort_pairs, METH_VARARGS, sort_pairs_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "router._pairsort", "The dispatch plan's sort of routed pairs by worker, in C.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__pairsort(void) { return PyModule_Create(&module); }
