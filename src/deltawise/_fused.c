/* Fused kernels for the linear and task-arithmetic merges: one pass from the stored inputs
 * (bfloat16, float16 or float32) to the stored output, float32 arithmetic in between.
 *
 * The torch path converts every input chunk to a float32 buffer, runs one elementwise op at a
 * time over whole chunks and casts the result back, so each entry crosses memory five to eight
 * times. Here each block of BLOCK entries is converted, combined and cast while it sits in L1.
 *
 * The arithmetic is the torch path's, operation for operation, so both give the same bits
 * (tests/test_fused.py checks this):
 *   linear:           acc = x0*w0; acc = fma(x_k, w_k, acc) for k >= 1; [acc /= divisor]
 *                     (torch's add_(x, alpha=w) is a fused multiply-add)
 *   task arithmetic:  total = (x0 - b)*w0; total += (x_k - b)*w_k (each product rounded);
 *                     [total /= divisor]; total *= scale; total += b
 * Floating-point contraction is off (-ffp-contract=off): only the fmaf calls fuse.
 * float32 -> bfloat16 rounds to nearest even, as torch does.
 *
 * float16 is supported where the compiler has _Float16 (module attribute `float16`).
 * Both functions release the GIL and return the number of non-finite outputs (after the cast,
 * so an overflow of the output dtype counts), so the engine can refuse a NaN/inf output without
 * a second pass over it. On x86-64 the loops are
 * compiled twice and the AVX2+FMA copy runs where the CPU has both (module attribute `path`);
 * DELTAWISE_FUSED_NO_SIMD=1 at import forces the baseline copy (the tests compare both).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stdlib.h>

#define BLOCK 512
#define MAX_INPUTS 64

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

#if defined(__FLT16_MAX__)
/* the compiler's _Float16 conversions round to nearest even, as torch's do */
#define DW_HAVE_F16 1
#endif

#if defined(__GNUC__)
#define DW_INLINE static inline __attribute__((always_inline))
#else
#define DW_INLINE static inline
#endif
#if defined(__GNUC__) && defined(__x86_64__)
/* one build runs on every x86-64 CPU: the bodies are compiled twice, once for AVX2+FMA
   (chosen at run time when the CPU has both) and once for the baseline */
#define DW_X86_DISPATCH 1
#endif

typedef void (*HalfLoad)(float *dst, const char *src, Py_ssize_t n);
typedef void (*HalfStore)(char *dst, const float *src, Py_ssize_t n);

typedef struct {
    Py_ssize_t n;            /* entries */
    int count;               /* inputs (models) */
    const char *in[MAX_INPUTS];
    int in_dtype[MAX_INPUTS];
    float weight[MAX_INPUTS];
    const char *base;        /* task arithmetic only */
    int base_dtype;
    char *out;
    int out_dtype;
    int divide;              /* 0: no division */
    float divisor;
    float scale;
    HalfLoad half_load;      /* float16 conversions: F16C where the CPU has it */
    HalfStore half_store;
} Job;

#ifdef DW_HAVE_F16
static void half_load_generic(float *dst, const char *src, Py_ssize_t n) {
    const _Float16 *h = (const _Float16 *)src;
    for (Py_ssize_t i = 0; i < n; i++)
        dst[i] = (float)h[i];
}

static void half_store_generic(char *dst, const float *src, Py_ssize_t n) {
    _Float16 *h = (_Float16 *)dst;
    for (Py_ssize_t i = 0; i < n; i++)
        h[i] = (_Float16)src[i];
}
#endif

#if defined(DW_HAVE_F16) && defined(DW_X86_DISPATCH)
#include <immintrin.h>
/* gcc does not vectorise _Float16 casts before AVX512-FP16; F16C converts 8 at a time, with the
   same round-to-nearest-even */
__attribute__((target("avx2,f16c"))) static void half_load_f16c(float *dst, const char *src, Py_ssize_t n) {
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + 2 * i))));
    half_load_generic(dst + i, src + 2 * i, n - i);
}

__attribute__((target("avx2,f16c"))) static void half_store_f16c(char *dst, const float *src, Py_ssize_t n) {
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + 2 * i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    half_store_generic(dst + 2 * i, src + i, n - i);
}
#endif

DW_INLINE void load_block(float *dst, const char *src, int dtype, Py_ssize_t n, const Job *job) {
    if (dtype == DT_F32) {
        memcpy(dst, src, (size_t)n * 4);
    } else if (dtype == DT_F16) {
        job->half_load(dst, src, n);
    } else {
        const uint16_t *s = (const uint16_t *)src;
        uint32_t *d = (uint32_t *)dst;
        for (Py_ssize_t i = 0; i < n; i++)
            d[i] = (uint32_t)s[i] << 16;
    }
}

/* Stores src as dtype; returns how many stored entries are NaN or infinite. Under round to
   nearest even, a float32 x becomes inf or NaN in the output dtype exactly when |x|'s bits reach
   that dtype's limit: the float32 infinity, or halfway past the largest finite value. */
DW_INLINE Py_ssize_t store_block(char *dst, const float *src, int dtype, Py_ssize_t n, const Job *job) {
    const uint32_t *u = (const uint32_t *)src;
    uint32_t limit;
    if (dtype == DT_F32) {
        memcpy(dst, src, (size_t)n * 4);
        limit = 0x7f800000u;
    } else if (dtype == DT_F16) {
        job->half_store(dst, src, n);
        limit = 0x477ff000u; /* 65520 = 65504 + half a step */
    } else {
        uint16_t *d = (uint16_t *)dst;
        for (Py_ssize_t i = 0; i < n; i++) {
            uint32_t x = u[i];
            uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
            d[i] = (x & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0u : (uint16_t)rounded;
        }
        limit = 0x7f7f8000u; /* rounds up to the bfloat16 infinity */
    }
    Py_ssize_t bad = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        bad += (int32_t)(u[i] & 0x7fffffffu) >= (int32_t)limit; /* both non-negative: signed compares vectorise */
    return bad;
}

static inline Py_ssize_t itemsize(int dtype) { return dtype == DT_F32 ? 4 : 2; } /* bf16, f16: 2 */

DW_INLINE Py_ssize_t linear_body(const Job *job) {
    float acc[BLOCK], x[BLOCK];
    Py_ssize_t bad = 0;
    for (Py_ssize_t start = 0; start < job->n; start += BLOCK) {
        Py_ssize_t n = job->n - start < BLOCK ? job->n - start : BLOCK;
        load_block(acc, job->in[0] + start * itemsize(job->in_dtype[0]), job->in_dtype[0], n, job);
        float w0 = job->weight[0];
        for (Py_ssize_t i = 0; i < n; i++)
            acc[i] = acc[i] * w0;
        for (int k = 1; k < job->count; k++) {
            load_block(x, job->in[k] + start * itemsize(job->in_dtype[k]), job->in_dtype[k], n, job);
            float w = job->weight[k];
            for (Py_ssize_t i = 0; i < n; i++)
                acc[i] = fmaf(x[i], w, acc[i]);
        }
        if (job->divide) {
            float d = job->divisor;
            for (Py_ssize_t i = 0; i < n; i++)
                acc[i] = acc[i] / d;
        }
        bad += store_block(job->out + start * itemsize(job->out_dtype), acc, job->out_dtype, n, job);
    }
    return bad;
}

DW_INLINE Py_ssize_t task_arithmetic_body(const Job *job) {
    float total[BLOCK], b[BLOCK], x[BLOCK];
    Py_ssize_t bad = 0;
    for (Py_ssize_t start = 0; start < job->n; start += BLOCK) {
        Py_ssize_t n = job->n - start < BLOCK ? job->n - start : BLOCK;
        load_block(b, job->base + start * itemsize(job->base_dtype), job->base_dtype, n, job);
        load_block(total, job->in[0] + start * itemsize(job->in_dtype[0]), job->in_dtype[0], n, job);
        float w0 = job->weight[0];
        for (Py_ssize_t i = 0; i < n; i++)
            total[i] = (total[i] - b[i]) * w0;
        for (int k = 1; k < job->count; k++) {
            load_block(x, job->in[k] + start * itemsize(job->in_dtype[k]), job->in_dtype[k], n, job);
            float w = job->weight[k];
            for (Py_ssize_t i = 0; i < n; i++)
                total[i] = total[i] + (x[i] - b[i]) * w;
        }
        if (job->divide) {
            float d = job->divisor;
            for (Py_ssize_t i = 0; i < n; i++)
                total[i] = total[i] / d;
        }
        float s = job->scale;
        for (Py_ssize_t i = 0; i < n; i++)
            total[i] = total[i] * s + b[i];
        bad += store_block(job->out + start * itemsize(job->out_dtype), total, job->out_dtype, n, job);
    }
    return bad;
}

#ifdef DW_X86_DISPATCH
__attribute__((target("avx2,fma,f16c"))) static Py_ssize_t linear_avx2(const Job *job) { return linear_body(job); }
__attribute__((target("avx2,fma,f16c"))) static Py_ssize_t task_arithmetic_avx2(const Job *job) { return task_arithmetic_body(job); }
static int use_avx2 = -1; /* decided once at import: CPU features, and DELTAWISE_FUSED_NO_SIMD for tests */
static void choose_path(void) {
    const char *off = getenv("DELTAWISE_FUSED_NO_SIMD");
    __builtin_cpu_init();
    use_avx2 = !(off && *off && strcmp(off, "0")) && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
               && __builtin_cpu_supports("f16c");
}
#else
static void choose_path(void) {}
#endif

static Py_ssize_t linear_kernel(const Job *job) {
#ifdef DW_X86_DISPATCH
    if (use_avx2 > 0)
        return linear_avx2(job);
#endif
    return linear_body(job);
}

static Py_ssize_t task_arithmetic_kernel(const Job *job) {
#ifdef DW_X86_DISPATCH
    if (use_avx2 > 0)
        return task_arithmetic_avx2(job);
#endif
    return task_arithmetic_body(job);
}

/* ---- argument handling ---------------------------------------------------------------- */

static int check_dtype(int dtype, const char *what) {
#ifdef DW_HAVE_F16
    int known = dtype == DT_F32 || dtype == DT_BF16 || dtype == DT_F16;
#else
    int known = dtype == DT_F32 || dtype == DT_BF16;
#endif
    if (!known) {
        PyErr_Format(PyExc_ValueError, "%s: unsupported dtype code %d", what, dtype);
        return -1;
    }
    return 0;
}

/* Fills job->in/in_dtype/weight from the sequences; views[] receive the held buffers. */
static int take_inputs(Job *job, PyObject *inputs, PyObject *dtypes, PyObject *weights, Py_buffer *views, int *held) {
    Py_ssize_t count = PySequence_Size(inputs);
    if (count < 1 || count > MAX_INPUTS) {
        PyErr_Format(PyExc_ValueError, "between 1 and %d inputs are supported, got %zd", MAX_INPUTS, count);
        return -1;
    }
    if (PySequence_Size(dtypes) != count || PySequence_Size(weights) != count) {
        PyErr_SetString(PyExc_ValueError, "inputs, dtypes and weights must have the same length");
        return -1;
    }
    job->count = (int)count;
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *item = PySequence_GetItem(dtypes, k);
        long dtype = item ? PyLong_AsLong(item) : -1;
        Py_XDECREF(item);
        if (PyErr_Occurred() || check_dtype((int)dtype, "input") < 0)
            return -1;
        item = PySequence_GetItem(weights, k);
        double w = item ? PyFloat_AsDouble(item) : -1.0;
        Py_XDECREF(item);
        if (PyErr_Occurred())
            return -1;
        item = PySequence_GetItem(inputs, k);
        if (item == NULL)
            return -1;
        int rc = PyObject_GetBuffer(item, &views[k], PyBUF_SIMPLE);
        Py_DECREF(item);
        if (rc < 0)
            return -1;
        (*held)++;
        if (views[k].len < job->n * itemsize((int)dtype)) {
            PyErr_Format(PyExc_ValueError, "input %zd holds %zd bytes, %zd needed", k, views[k].len,
                         job->n * itemsize((int)dtype));
            return -1;
        }
        job->in[k] = (const char *)views[k].buf;
        job->in_dtype[k] = (int)dtype;
        job->weight[k] = (float)w;
    }
    return 0;
}

static int take_out(Job *job, PyObject *out, int out_dtype, Py_buffer *view) {
    if (check_dtype(out_dtype, "output") < 0)
        return -1;
    if (PyObject_GetBuffer(out, view, PyBUF_WRITABLE) < 0)
        return -1;
    if (view->len % itemsize(out_dtype)) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "output length is not a whole number of entries");
        return -1;
    }
    job->out = (char *)view->buf;
    job->out_dtype = out_dtype;
    job->n = view->len / itemsize(out_dtype);
    return 0;
}

static int take_divisor(Job *job, PyObject *divisor) {
    job->divide = divisor != Py_None;
    if (job->divide) {
        double d = PyFloat_AsDouble(divisor);
        if (PyErr_Occurred())
            return -1;
        job->divisor = (float)d;
    }
    return 0;
}

typedef Py_ssize_t (*Kernel)(const Job *);

/* Takes the buffers (base may be NULL), runs the kernel without the GIL, releases them. */
static PyObject *run_kernel(Kernel kernel, Job *job, PyObject *out, int out_dtype, PyObject *base, PyObject *inputs,
                            PyObject *dtypes, PyObject *weights, PyObject *divisor) {
    Py_buffer out_view, base_view, views[MAX_INPUTS];
    int held = 0, have_base = 0;
    Py_ssize_t bad = -1;
    if (take_out(job, out, out_dtype, &out_view) < 0)
        return NULL;
    if (base != NULL) {
        if (PyObject_GetBuffer(base, &base_view, PyBUF_SIMPLE) < 0)
            goto done;
        have_base = 1;
        if (base_view.len < job->n * itemsize(job->base_dtype)) {
            PyErr_Format(PyExc_ValueError, "base holds %zd bytes, %zd needed", base_view.len,
                         job->n * itemsize(job->base_dtype));
            goto done;
        }
        job->base = (const char *)base_view.buf;
    }
    if (take_inputs(job, inputs, dtypes, weights, views, &held) < 0 || take_divisor(job, divisor) < 0)
        goto done;
#if defined(DW_HAVE_F16) && defined(DW_X86_DISPATCH)
    job->half_load = use_avx2 > 0 ? half_load_f16c : half_load_generic;
    job->half_store = use_avx2 > 0 ? half_store_f16c : half_store_generic;
#elif defined(DW_HAVE_F16)
    job->half_load = half_load_generic;
    job->half_store = half_store_generic;
#endif
    Py_BEGIN_ALLOW_THREADS
    bad = kernel(job);
    Py_END_ALLOW_THREADS
done:
    for (int k = 0; k < held; k++)
        PyBuffer_Release(&views[k]);
    if (have_base)
        PyBuffer_Release(&base_view);
    PyBuffer_Release(&out_view);
    return bad < 0 ? NULL : PyLong_FromSsize_t(bad);
}

PyDoc_STRVAR(linear_doc,
"linear(out, out_dtype, inputs, dtypes, weights, divisor) -> int\n\n"
"out = cast(sum_k w_k x_k [/ divisor]), accumulated in float32 in the inputs' order.\n"
"Buffers hold raw entries; dtype codes: 0 float32, 1 bfloat16, 2 float16. divisor: float or None.\n"
"Returns the number of non-finite entries written to out.");

static PyObject *py_linear(PyObject *self, PyObject *args) {
    PyObject *out, *inputs, *dtypes, *weights, *divisor;
    int out_dtype;
    if (!PyArg_ParseTuple(args, "OiOOOO", &out, &out_dtype, &inputs, &dtypes, &weights, &divisor))
        return NULL;
    Job job;
    memset(&job, 0, sizeof job);
    return run_kernel(linear_kernel, &job, out, out_dtype, NULL, inputs, dtypes, weights, divisor);
}

PyDoc_STRVAR(task_arithmetic_doc,
"task_arithmetic(out, out_dtype, base, base_dtype, inputs, dtypes, weights, divisor, scale) -> int\n\n"
"out = cast(b + scale * (sum_k (x_k - b) w_k [/ divisor])), in float32, each step rounded.\n"
"Returns the number of non-finite entries written to out.");

static PyObject *py_task_arithmetic(PyObject *self, PyObject *args) {
    PyObject *out, *base, *inputs, *dtypes, *weights, *divisor;
    int out_dtype, base_dtype;
    double scale;
    if (!PyArg_ParseTuple(args, "OiOiOOOOd", &out, &out_dtype, &base, &base_dtype, &inputs, &dtypes, &weights,
                          &divisor, &scale))
        return NULL;
    if (check_dtype(base_dtype, "base") < 0)
        return NULL;
    Job job;
    memset(&job, 0, sizeof job);
    job.base_dtype = base_dtype;
    job.scale = (float)scale;
    return run_kernel(task_arithmetic_kernel, &job, out, out_dtype, base, inputs, dtypes, weights, divisor);
}

/* the sparsifying merges' kernels, sharing the helpers above */
#include "_fused_sparse.c"
#include "_fused_stats.c"
#include "_fused_rng.c"
#include "_fused_select.c"
#include "_fused_della.c"
#include "_fused_finite.c"

static PyMethodDef methods[] = {
    {"linear", py_linear, METH_VARARGS, linear_doc},
    {"task_arithmetic", py_task_arithmetic, METH_VARARGS, task_arithmetic_doc},
    {"delta_histogram", py_delta_histogram, METH_VARARGS, delta_histogram_doc},
    {"magnitude_bins", py_magnitude_bins, METH_VARARGS, magnitude_bins_doc},
    {"sparse_merge", py_sparse_merge, METH_VARARGS, sparse_merge_doc},
    {"dare_mask", py_dare_mask, METH_VARARGS, dare_mask_doc},
    {"tie_select", py_tie_select, METH_VARARGS, tie_select_doc},
    {"delta_l1", py_delta_l1, METH_VARARGS, delta_l1_doc},
    {"della_mask", py_della_mask, METH_VARARGS, della_mask_doc},
    {"nonfinite", py_nonfinite, METH_VARARGS, nonfinite_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "deltawise._fused", "Fused float32 kernels for linear, task-arithmetic and sparsifying merges.", -1, methods,
};

PyMODINIT_FUNC PyInit__fused(void) {
    choose_path();
    init_set_bits(); /* tie_select's and della_mask's tables */
#ifdef DW_X86_DISPATCH
    const char *path = use_avx2 ? "avx2+fma" : "baseline";
#else
    const char *path = "baseline";
#endif
    PyObject *m = PyModule_Create(&module);
#ifdef DW_HAVE_F16
    const int float16 = 1;
#else
    const int float16 = 0;
#endif
    if (m && (PyModule_AddStringConstant(m, "path", path) < 0 || PyModule_AddIntConstant(m, "float16", float16) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
