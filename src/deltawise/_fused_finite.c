/* The NaN/inf screen over raw entries (deltawise/io/finite.py): counts the entries whose exponent
 * bits are all ones, which are exactly the NaNs and infinities of IEEE-754 formats:
 *   bfloat16 (x & 0x7f80) == 0x7f80, float16 (x & 0x7c00) == 0x7c00, float32 (x & 0x7f800000) == 0x7f800000.
 * One read of the stored bytes, no conversion to float32 and no reduction that can overflow (a float32
 * sum of large finite entries can); compiled twice like the merge kernels, the AVX2 copy where the CPU
 * has it. Counting in 16-bit lanes over blocks of 4096 entries lets the compiler test 16 bfloat16
 * entries per instruction: a passthrough merge screens every byte it copies, and torch's aminmax took
 * 10% of its CPU time. */

#define FINITE_BLOCK 4096

DW_INLINE Py_ssize_t nonfinite16_body(const uint16_t *x, Py_ssize_t n, uint16_t mask) {
    Py_ssize_t bad = 0;
    for (Py_ssize_t start = 0; start < n; start += FINITE_BLOCK) {
        Py_ssize_t stop = n - start < FINITE_BLOCK ? n : start + FINITE_BLOCK;
        uint16_t hits = 0; /* at most FINITE_BLOCK: fits */
        for (Py_ssize_t i = start; i < stop; i++)
            hits += (uint16_t)((x[i] & mask) == mask);
        bad += hits;
    }
    return bad;
}

DW_INLINE Py_ssize_t nonfinite32_body(const uint32_t *x, Py_ssize_t n) {
    Py_ssize_t bad = 0;
    for (Py_ssize_t start = 0; start < n; start += FINITE_BLOCK) {
        Py_ssize_t stop = n - start < FINITE_BLOCK ? n : start + FINITE_BLOCK;
        uint32_t hits = 0;
        for (Py_ssize_t i = start; i < stop; i++)
            hits += (uint32_t)((x[i] & 0x7f800000u) == 0x7f800000u);
        bad += hits;
    }
    return bad;
}

static Py_ssize_t nonfinite16_generic(const uint16_t *x, Py_ssize_t n, uint16_t mask) { return nonfinite16_body(x, n, mask); }
static Py_ssize_t nonfinite32_generic(const uint32_t *x, Py_ssize_t n) { return nonfinite32_body(x, n); }
#ifdef DW_X86_DISPATCH
__attribute__((target("avx2"))) static Py_ssize_t nonfinite16_avx2(const uint16_t *x, Py_ssize_t n, uint16_t mask) {
    return nonfinite16_body(x, n, mask);
}
__attribute__((target("avx2"))) static Py_ssize_t nonfinite32_avx2(const uint32_t *x, Py_ssize_t n) { return nonfinite32_body(x, n); }
#endif

PyDoc_STRVAR(nonfinite_doc,
"nonfinite(buffer, dtype) -> int\n\n"
"How many entries of the raw buffer are NaN or infinite; dtype codes: 0 float32, 1 bfloat16, 2 float16\n"
"(float16 needs no compiler support here: only the exponent bits are read). A trailing partial entry\n"
"is an error.");

static PyObject *py_nonfinite(PyObject *self, PyObject *args) {
    PyObject *obj;
    int dtype;
    if (!PyArg_ParseTuple(args, "Oi", &obj, &dtype))
        return NULL;
    if (dtype != DT_F32 && dtype != DT_BF16 && dtype != DT_F16) {
        PyErr_Format(PyExc_ValueError, "unknown dtype code %d (0 float32, 1 bfloat16, 2 float16)", dtype);
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t size = dtype == DT_F32 ? 4 : 2;
    if (view.len % size) {
        PyBuffer_Release(&view);
        PyErr_Format(PyExc_ValueError, "buffer of %zd bytes is not a whole number of %zd-byte entries", view.len, size);
        return NULL;
    }
    Py_ssize_t n = view.len / size, bad;
    int avx2 = 0;
#ifdef DW_X86_DISPATCH
    avx2 = use_avx2 > 0;
#endif
    Py_BEGIN_ALLOW_THREADS
    if (dtype == DT_F32) {
#ifdef DW_X86_DISPATCH
        bad = avx2 ? nonfinite32_avx2((const uint32_t *)view.buf, n) : nonfinite32_generic((const uint32_t *)view.buf, n);
#else
        bad = nonfinite32_generic((const uint32_t *)view.buf, n);
#endif
    } else {
        uint16_t mask = dtype == DT_BF16 ? 0x7f80u : 0x7c00u;
#ifdef DW_X86_DISPATCH
        bad = avx2 ? nonfinite16_avx2((const uint16_t *)view.buf, n, mask)
                   : nonfinite16_generic((const uint16_t *)view.buf, n, mask);
#else
        bad = nonfinite16_generic((const uint16_t *)view.buf, n, mask);
#endif
    }
    Py_END_ALLOW_THREADS
    (void)avx2;
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(bad);
}
