/* Radix-select histograms and L1 norms over raw chunks; see _fused_sparse.c. */

/* ---- delta histograms ------------------------------------------------------------------ */

typedef struct {
    Py_ssize_t n;
    int count;
    const char *in[MAX_INPUTS];
    int in_dtype[MAX_INPUTS];
    const char *base;
    int base_dtype;
    int64_t *counts[MAX_INPUTS]; /* per model: 32768 (high) or 65536 (low) bins; NULL: skip */
    int32_t high[MAX_INPUTS];    /* low pass: the upper bin counted; -1 for the high pass */
    float *gather[MAX_INPUTS];   /* optional: |delta| stored here (tie order) */
    uint32_t *tables;            /* high pass: 4 interleaved 32768-bin tables, so that runs of equal bins
                                    do not wait on each other's increments */
    HalfLoad half_load;
    HalfStore half_store;
} HistJob;

DW_INLINE Py_ssize_t histogram_body(const HistJob *job) {
    float b[BLOCK], x[BLOCK];
    uint32_t bits[BLOCK];
    Py_ssize_t bad = 0;
    Job conv; /* load_block reads only the half conversion */
    conv.half_load = job->half_load;
    for (Py_ssize_t start = 0; start < job->n; start += BLOCK) {
        Py_ssize_t n = job->n - start < BLOCK ? job->n - start : BLOCK;
        load_block(b, job->base + start * itemsize(job->base_dtype), job->base_dtype, n, &conv);
        for (int k = 0; k < job->count; k++) {
            if (job->counts[k] == NULL && job->gather[k] == NULL)
                continue;
            load_block(x, job->in[k] + start * itemsize(job->in_dtype[k]), job->in_dtype[k], n, &conv);
            for (Py_ssize_t i = 0; i < n; i++) {
                float d = x[i] - b[i];
                uint32_t u;
                memcpy(&u, &d, 4);
                bits[i] = u & 0x7fffffffu;
                bad += bits[i] >= 0x7f800000u;
            }
            if (job->gather[k] != NULL)
                memcpy(job->gather[k] + start, bits, (size_t)n * 4);
            int64_t *c = job->counts[k];
            if (c == NULL)
                continue;
            if (job->high[k] < 0) {
                uint32_t *t = job->tables + (size_t)k * 4 * 32768;
                Py_ssize_t i = 0;
                for (; i + 4 <= n; i += 4) {
                    t[bits[i] >> 16]++;
                    t[32768 + (bits[i + 1] >> 16)]++;
                    t[2 * 32768 + (bits[i + 2] >> 16)]++;
                    t[3 * 32768 + (bits[i + 3] >> 16)]++;
                }
                for (; i < n; i++)
                    t[bits[i] >> 16]++;
            } else {
                uint32_t want = (uint32_t)job->high[k];
                for (Py_ssize_t i = 0; i < n; i += 16) { /* few entries fall in the wanted bin: test 16 at once */
                    Py_ssize_t stop = i + 16 < n ? i + 16 : n;
                    uint32_t any = 0;
                    for (Py_ssize_t j = i; j < stop; j++)
                        any |= (bits[j] >> 16) == want;
                    if (any)
                        for (Py_ssize_t j = i; j < stop; j++)
                            if ((bits[j] >> 16) == want)
                                c[bits[j] & 0xffffu]++;
                }
            }
        }
    }
    for (int k = 0; k < job->count; k++) {
        if (job->counts[k] == NULL || job->high[k] >= 0)
            continue;
        const uint32_t *t = job->tables + (size_t)k * 4 * 32768;
        for (int j = 0; j < 32768; j++)
            job->counts[k][j] += (int64_t)t[j] + t[32768 + j] + t[2 * 32768 + j] + t[3 * 32768 + j];
    }
    return bad;
}

/* ---- the low radix pass over kept magnitudes: one read for up to two upper bins --------------- */

DW_INLINE void bins_body(const uint32_t *bits, Py_ssize_t n, uint32_t want0, uint32_t want1, int64_t *c0, int64_t *c1) {
    for (Py_ssize_t i = 0; i < n; i += 16) { /* few entries fall in a wanted bin: test 16 at once */
        Py_ssize_t stop = i + 16 < n ? i + 16 : n;
        uint32_t any = 0;
        for (Py_ssize_t j = i; j < stop; j++)
            any |= ((bits[j] >> 16) == want0) | ((bits[j] >> 16) == want1);
        if (any)
            for (Py_ssize_t j = i; j < stop; j++) {
                uint32_t high = bits[j] >> 16;
                if (high == want0)
                    c0[bits[j] & 0xffffu]++;
                else if (high == want1)
                    c1[bits[j] & 0xffffu]++;
            }
    }
}

#ifdef DW_X86_DISPATCH
#include <immintrin.h>

/* bins_body with the matches of 8 entries found by one compare per bin, and only they visited */
__attribute__((target("avx2"))) static void bins_avx2(const uint32_t *bits, Py_ssize_t n, uint32_t want0, uint32_t want1,
                                                      int64_t *c0, int64_t *c1) {
    const __m256i w0 = _mm256_set1_epi32((int)want0), w1 = _mm256_set1_epi32((int)want1);
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i high = _mm256_srli_epi32(_mm256_loadu_si256((const __m256i *)(bits + i)), 16);
        unsigned m0 = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(high, w0)));
        unsigned m1 = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(high, w1)));
        for (; m0; m0 &= m0 - 1)
            c0[bits[i + __builtin_ctz(m0)] & 0xffffu]++;
        for (; m1; m1 &= m1 - 1)
            c1[bits[i + __builtin_ctz(m1)] & 0xffffu]++;
    }
    bins_body(bits + i, n - i, want0, want1, c0, c1);
}
#endif

PyDoc_STRVAR(magnitude_bins_doc,
"magnitude_bins(magnitudes, highs, counts) -> None\n\n"
"For one or two upper bins highs[j] (distinct, 0 .. 32767): adds to counts[j] (int64, 65536, writable) the\n"
"counts of the lower 16 bits of the float32 magnitudes whose upper 16 bits are highs[j], in one read.");

static PyObject *py_magnitude_bins(PyObject *self, PyObject *args) {
    PyObject *magnitudes, *highs, *counts;
    if (!PyArg_ParseTuple(args, "OOO", &magnitudes, &highs, &counts))
        return NULL;
    Py_ssize_t m = PySequence_Size(highs);
    if (m < 1 || m > 2 || PySequence_Size(counts) != m) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "one or two bins, with one counts buffer each");
        return NULL;
    }
    Held held = {.held = 0};
    PyObject *result = NULL;
    uint32_t want[2] = {0xffffffffu, 0xffffffffu}; /* no upper 16 bits match 2**32 - 1 */
    int64_t *c[2] = {NULL, NULL};
    const uint32_t *bits = hold(&held, magnitudes, 0, 0, "magnitudes");
    if (bits == NULL)
        goto done;
    Py_ssize_t n = held.views[0].len / 4;
    for (Py_ssize_t j = 0; j < m; j++) {
        PyObject *item = PySequence_GetItem(highs, j);
        long high = item ? PyLong_AsLong(item) : -1;
        Py_XDECREF(item);
        if (PyErr_Occurred())
            goto done;
        if (high < 0 || high > 0xffff || (j == 1 && (uint32_t)high == want[0])) {
            PyErr_SetString(PyExc_ValueError, "bins are distinct and within 0 .. 65535");
            goto done;
        }
        want[j] = (uint32_t)high;
        item = PySequence_GetItem(counts, j);
        c[j] = item ? hold(&held, item, 1, 65536 * 8, "counts") : NULL;
        Py_XDECREF(item);
        if (c[j] == NULL)
            goto done;
    }
    if (c[1] == NULL)
        c[1] = c[0]; /* never written: want[1] matches nothing */
    Py_BEGIN_ALLOW_THREADS
#ifdef DW_X86_DISPATCH
    if (use_avx2 > 0)
        bins_avx2(bits, n, want[0], want[1], c[0], c[1]);
    else
#endif
        bins_body(bits, n, want[0], want[1], c[0], c[1]);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    release_all(&held);
    return result;
}

/* ---- L1 norms of the task vectors and their kept parts (DARE's rescale) ------------------- */

DW_INLINE void l1_body(const HistJob *job, const uint8_t *const *masks, double *before, double *after) {
    float b[BLOCK], x[BLOCK];
    Job conv;
    conv.half_load = job->half_load;
    for (Py_ssize_t start = 0; start < job->n; start += BLOCK) {
        Py_ssize_t n = job->n - start < BLOCK ? job->n - start : BLOCK;
        load_block(b, job->base + start * itemsize(job->base_dtype), job->base_dtype, n, &conv);
        for (int k = 0; k < job->count; k++) {
            load_block(x, job->in[k] + start * itemsize(job->in_dtype[k]), job->in_dtype[k], n, &conv);
            const uint8_t *m = masks[k] + start;
            /* eight partial sums so that the loop vectorises (float64 sums in another order than torch's:
               the same to float64 rounding, far below the float32 rescale factor's) */
            double all[8] = {0}, kept[8] = {0};
            Py_ssize_t i = 0;
            for (; i + 8 <= n; i += 8)
                for (int j = 0; j < 8; j++) {
                    double a = fabsf(x[i + j] - b[i + j]);
                    all[j] += a;
                    kept[j] += a * (double)m[i + j];
                }
            for (; i < n; i++) {
                double a = fabsf(x[i] - b[i]);
                all[0] += a;
                kept[0] += a * (double)m[i];
            }
            before[k] += ((all[0] + all[1]) + (all[2] + all[3])) + ((all[4] + all[5]) + (all[6] + all[7]));
            after[k] += ((kept[0] + kept[1]) + (kept[2] + kept[3])) + ((kept[4] + kept[5]) + (kept[6] + kept[7]));
        }
    }
}

#ifdef DW_X86_DISPATCH
__attribute__((target("avx2,fma,f16c"))) static Py_ssize_t histogram_avx2(const HistJob *job) { return histogram_body(job); }
__attribute__((target("avx2,fma,f16c"))) static void l1_avx2(const HistJob *job, const uint8_t *const *masks, double *before,
                                                              double *after) { l1_body(job, masks, before, after); }
#endif

static Py_ssize_t histogram_kernel(const HistJob *job) {
#ifdef DW_X86_DISPATCH
    if (use_avx2 > 0)
        return histogram_avx2(job);
#endif
    return histogram_body(job);
}

static void l1_kernel(const HistJob *job, const uint8_t *const *masks, double *before, double *after) {
#ifdef DW_X86_DISPATCH
    if (use_avx2 > 0) {
        l1_avx2(job, masks, before, after);
        return;
    }
#endif
    l1_body(job, masks, before, after);
}

/* The base and the models of a delta_histogram / delta_l1 call, held in ``held``; -1 with an exception set. */
static int take_base_and_models(Held *held, HistJob *job, PyObject *base, int base_dtype, PyObject *inputs,
                                PyObject *dtypes) {
    job->base = hold(held, base, 0, 0, "base");
    if (job->base == NULL)
        return -1;
    job->base_dtype = base_dtype;
    job->n = held->views[0].len / itemsize(base_dtype);
    return take_models(held, inputs, dtypes, job->n, &job->count, job->in, job->in_dtype);
}

PyDoc_STRVAR(delta_histogram_doc,
"delta_histogram(base, base_dtype, inputs, dtypes, counts, highs, gathers) -> int\n\n"
"For each model k with counts[k] not None (int64, writable): counts of the upper 16 bits of the float32\n"
"bits of |x_k - b| (highs[k] < 0, 32768 bins), or of the lower 16 bits of the entries whose upper bits\n"
"are highs[k] (65536 bins), added to counts[k]. gathers[k], when not None (float32, writable), receives\n"
"|x_k - b| (magnitudes kept already: magnitude_bins).\n"
"Returns the number of non-finite task-vector entries seen.");

static PyObject *py_delta_histogram(PyObject *self, PyObject *args) {
    PyObject *base, *inputs, *dtypes, *counts, *highs, *gathers;
    int base_dtype;
    if (!PyArg_ParseTuple(args, "OiOOOOO", &base, &base_dtype, &inputs, &dtypes, &counts, &highs, &gathers))
        return NULL;
    if (check_dtype(base_dtype, "base") < 0)
        return NULL;
    HistJob job;
    memset(&job, 0, sizeof job);
    Held held = {.held = 0};
    Py_ssize_t bad = -1;
    if (take_base_and_models(&held, &job, base, base_dtype, inputs, dtypes) < 0)
        goto done;
    if (PySequence_Size(counts) != job.count || PySequence_Size(highs) != job.count
        || PySequence_Size(gathers) != job.count) {
        PyErr_SetString(PyExc_ValueError, "counts, highs and gathers need one entry per input");
        goto done;
    }
    for (int k = 0; k < job.count; k++) {
        PyObject *item = PySequence_GetItem(highs, k);
        long high = item ? PyLong_AsLong(item) : -1;
        Py_XDECREF(item);
        if (PyErr_Occurred())
            goto done;
        job.high[k] = (int32_t)(high < 0 ? -1 : high);
        item = PySequence_GetItem(counts, k);
        if (item == NULL)
            goto done;
        if (item != Py_None)
            job.counts[k] = hold(&held, item, 1, (high < 0 ? 32768 : 65536) * 8, "counts");
        Py_DECREF(item);
        if (item != Py_None && job.counts[k] == NULL)
            goto done;
        item = PySequence_GetItem(gathers, k);
        if (item == NULL)
            goto done;
        if (item != Py_None)
            job.gather[k] = hold(&held, item, 1, job.n * 4, "gather");
        Py_DECREF(item);
        if (item != Py_None && job.gather[k] == NULL)
            goto done;
    }
    job.tables = calloc((size_t)job.count * 4 * 32768, sizeof(uint32_t));
    if (job.tables == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    choose_half(&job.half_load, &job.half_store);
    Py_BEGIN_ALLOW_THREADS
    bad = histogram_kernel(&job);
    Py_END_ALLOW_THREADS
done:
    free(job.tables);
    release_all(&held);
    return bad < 0 ? NULL : PyLong_FromSsize_t(bad);
}

PyDoc_STRVAR(delta_l1_doc,
"delta_l1(base, base_dtype, inputs, dtypes, masks) -> list[tuple[float, float]]\n\n"
"Per model: (sum |x_k - b|, sum of it where masks[k] != 0), in float64 (masks: uint8).");

static PyObject *py_delta_l1(PyObject *self, PyObject *args) {
    PyObject *base, *inputs, *dtypes, *masks;
    int base_dtype;
    if (!PyArg_ParseTuple(args, "OiOOO", &base, &base_dtype, &inputs, &dtypes, &masks))
        return NULL;
    if (check_dtype(base_dtype, "base") < 0)
        return NULL;
    HistJob job;
    memset(&job, 0, sizeof job);
    Held held = {.held = 0};
    PyObject *result = NULL;
    const uint8_t *mask[MAX_INPUTS];
    double before[MAX_INPUTS] = {0}, after[MAX_INPUTS] = {0};
    if (take_base_and_models(&held, &job, base, base_dtype, inputs, dtypes) < 0)
        goto done;
    if (PySequence_Size(masks) != job.count) {
        PyErr_SetString(PyExc_ValueError, "masks need one entry per input");
        goto done;
    }
    for (int k = 0; k < job.count; k++) {
        PyObject *item = PySequence_GetItem(masks, k);
        mask[k] = item ? hold(&held, item, 0, job.n, "mask") : NULL;
        Py_XDECREF(item);
        if (mask[k] == NULL)
            goto done;
    }
    choose_half(&job.half_load, &job.half_store);
    Py_BEGIN_ALLOW_THREADS
    l1_kernel(&job, mask, before, after);
    Py_END_ALLOW_THREADS
    result = PyList_New(job.count);
    for (int k = 0; result && k < job.count; k++) {
        PyObject *pair = Py_BuildValue("(dd)", before[k], after[k]);
        if (pair == NULL) {
            Py_CLEAR(result);
            break;
        }
        PyList_SET_ITEM(result, k, pair);
    }
done:
    release_all(&held);
    return result;
}
