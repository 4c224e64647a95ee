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

#define NO_BIN 0x10000u /* a wanted bin that no upper 16 bits match or exceed */

/* Counts into c0 / c1 the lower 16 bits of the entries of bits[from, n) whose upper 16 bits are want0 / want1
   (want0 < want1; want1 may be NO_BIN). With `positions` (tie_keys_*) it also makes tie_select's keys
   (_fused_select.c) on the way, for boundary values that lie in those bins: an entry outside both bins gets its
   final key in place (up by `shift` for each bin below its own, as prepare_keys moves it up for each boundary below
   its value), an entry inside one is left as it is and its flat index listed in positions (ascending, at most
   `capacity`; tie_select finishes those keys once the boundary values are known); *top gets the largest upper
   16 bits seen. Returns how many entries lie in the bins from `from` on. */
DW_INLINE Py_ssize_t bins_body(uint32_t *bits, Py_ssize_t from, Py_ssize_t n, uint32_t want0, uint32_t want1, int64_t *c0,
                               int64_t *c1, uint32_t shift, uint32_t *positions, Py_ssize_t capacity, uint32_t *top) {
    Py_ssize_t listed = 0;
    uint32_t largest = 0;
    for (Py_ssize_t i = from; i < n; i += 16) { /* few entries fall in a wanted bin: test 16 at once */
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
                else
                    continue;
                if (positions != NULL && listed++ < capacity)
                    positions[listed - 1] = (uint32_t)j;
            }
        if (positions != NULL)
            for (Py_ssize_t j = i; j < stop; j++) {
                uint32_t high = bits[j] >> 16;
                largest = high > largest ? high : largest;
                bits[j] += (shift & (0u - (uint32_t)(high > want0 && high != want1)))
                           + (shift & (0u - (uint32_t)(high > want1)));
            }
    }
    *top = largest;
    return listed;
}

#ifdef DW_X86_DISPATCH
#include <immintrin.h>

/* bins_body 16 entries a step: the matches found by one compare per bin and 8 entries, and only they visited, in one
   loop (each step with a match costs a mispredicted branch or two) */
__attribute__((target("avx2"), always_inline)) static inline Py_ssize_t bins_avx2_body(
    uint32_t *bits, Py_ssize_t n, uint32_t want0, uint32_t want1, int64_t *c0, int64_t *c1, uint32_t shift,
    uint32_t *positions, Py_ssize_t capacity, uint32_t *top) {
    const __m256i w0 = _mm256_set1_epi32((int)want0), w1 = _mm256_set1_epi32((int)want1), up = _mm256_set1_epi32((int)shift);
    __m256i largest = _mm256_setzero_si256();
    Py_ssize_t i = 0, listed = 0;
    for (; i + 16 <= n; i += 16) {
        unsigned m0 = 0, m = 0; /* bit j: entry i + j lies in bin want0 / in either bin */
        for (int h = 0; h < 2; h++) {
            __m256i x = _mm256_loadu_si256((const __m256i *)(bits + i + 8 * h)), high = _mm256_srli_epi32(x, 16);
            __m256i in0 = _mm256_cmpeq_epi32(high, w0), in1 = _mm256_cmpeq_epi32(high, w1);
            m0 |= (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(in0)) << (8 * h);
            m |= (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_or_si256(in0, in1))) << (8 * h);
            if (positions != NULL) { /* the bins' entries keep their bits; upper bits and want1 fit signed compares */
                largest = _mm256_max_epu32(largest, high);
                __m256i above0 = _mm256_andnot_si256(in1, _mm256_cmpgt_epi32(high, w0));
                __m256i above1 = _mm256_cmpgt_epi32(high, w1);
                __m256i add = _mm256_add_epi32(_mm256_and_si256(up, above0), _mm256_and_si256(up, above1));
                _mm256_storeu_si256((__m256i *)(bits + i + 8 * h), _mm256_add_epi32(x, add));
            }
        }
        for (; m; m &= m - 1) {
            int j = __builtin_ctz(m);
            int64_t *c = m0 >> j & 1 ? c0 : c1;
            c[bits[i + j] & 0xffffu]++;
            if (positions != NULL && listed++ < capacity)
                positions[listed - 1] = (uint32_t)(i + j);
        }
    }
    uint32_t lanes[8], rest = 0;
    _mm256_storeu_si256((__m256i *)lanes, largest);
    Py_ssize_t room = capacity > listed ? capacity - listed : 0;
    listed += bins_body(bits, i, n, want0, want1, c0, c1, shift, positions == NULL ? NULL : positions + (capacity - room),
                        room, &rest);
    for (int j = 0; j < 8; j++)
        rest = lanes[j] > rest ? lanes[j] : rest;
    *top = rest;
    return listed;
}

__attribute__((target("avx2"))) static void bins_avx2(const uint32_t *bits, Py_ssize_t n, uint32_t want0, uint32_t want1,
                                                      int64_t *c0, int64_t *c1) {
    uint32_t top;
    bins_avx2_body((uint32_t *)bits, n, want0, want1, c0, c1, 0, NULL, 0, &top); /* nothing written without positions */
}

__attribute__((target("avx2"))) static Py_ssize_t tie_keys_avx2(uint32_t *bits, Py_ssize_t n, uint32_t want0,
                                                                uint32_t want1, int64_t *c0, int64_t *c1, uint32_t shift,
                                                                uint32_t *positions, Py_ssize_t capacity, uint32_t *top) {
    return bins_avx2_body(bits, n, want0, want1, c0, c1, shift, positions, capacity, top);
}
#endif

static void bins_portable(const uint32_t *bits, Py_ssize_t n, uint32_t want0, uint32_t want1, int64_t *c0, int64_t *c1) {
    uint32_t top;
    bins_body((uint32_t *)bits, 0, n, want0, want1, c0, c1, 0, NULL, 0, &top); /* nothing written without positions */
}

static Py_ssize_t tie_keys_portable(uint32_t *bits, Py_ssize_t n, uint32_t want0, uint32_t want1, int64_t *c0, int64_t *c1,
                                    uint32_t shift, uint32_t *positions, Py_ssize_t capacity, uint32_t *top) {
    return bins_body(bits, 0, n, want0, want1, c0, c1, shift, positions, capacity, top);
}

PyDoc_STRVAR(magnitude_bins_doc,
"magnitude_bins(magnitudes, highs, counts, positions=None) -> int\n\n"
"For one or two upper bins highs[j] (distinct, 0 .. 32767): adds to counts[j] (int64, 65536, writable) the\n"
"counts of the lower 16 bits of the float32 magnitudes whose upper 16 bits are highs[j], in one read.\n"
"With positions (uint32, writable; highs ascending, magnitudes writable, finite, fewer than 2**30): also\n"
"turns the magnitudes into tie_select's keys for boundary values in those bins, all but the bins' entries,\n"
"whose flat indices it writes to positions (ascending); returns how many entries lie in the bins.");

static PyObject *py_magnitude_bins(PyObject *self, PyObject *args) {
    PyObject *magnitudes, *highs, *counts, *listing = Py_None;
    if (!PyArg_ParseTuple(args, "OOO|O", &magnitudes, &highs, &counts, &listing))
        return NULL;
    Py_ssize_t m = PySequence_Size(highs);
    if (m < 1 || m > 2 || PySequence_Size(counts) != m) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "one or two bins, with one counts buffer each");
        return NULL;
    }
    int keys = listing != Py_None;
    Held held = {.held = 0};
    PyObject *result = NULL;
    uint32_t want[2] = {NO_BIN, NO_BIN};
    int64_t *c[2] = {NULL, NULL};
    uint32_t *bits = hold(&held, magnitudes, keys, 0, "magnitudes"), *positions = NULL;
    if (bits == NULL)
        goto done;
    Py_ssize_t n = held.views[0].len / 4, capacity = 0, listed = 0;
    if (keys) {
        positions = hold(&held, listing, 1, 0, "positions");
        if (positions == NULL)
            goto done;
        capacity = held.views[1].len / 4;
        if ((uint64_t)n >= ((uint64_t)1 << 30)) {
            PyErr_SetString(PyExc_ValueError, "too many entries for tie keys");
            goto done;
        }
    }
    for (Py_ssize_t j = 0; j < m; j++) {
        PyObject *item = PySequence_GetItem(highs, j);
        long high = item ? PyLong_AsLong(item) : -1;
        Py_XDECREF(item);
        if (PyErr_Occurred())
            goto done;
        if (high < 0 || high > 0xffff || (j == 1 && (keys ? (uint32_t)high <= want[0] : (uint32_t)high == want[0]))) {
            PyErr_SetString(PyExc_ValueError, keys ? "bins are ascending and within 0 .. 65535"
                                                   : "bins are distinct and within 0 .. 65535");
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
    uint32_t shift = (uint32_t)(n > 1 ? n - 1 : 0), top = 0; /* prepare_keys' shift */
    Py_BEGIN_ALLOW_THREADS
#ifdef DW_X86_DISPATCH
    if (use_avx2 > 0 && keys)
        listed = tie_keys_avx2(bits, n, want[0], want[1], c[0], c[1], shift, positions, capacity, &top);
    else if (use_avx2 > 0)
        bins_avx2(bits, n, want[0], want[1], c[0], c[1]);
    else
#endif
    if (keys)
        listed = tie_keys_portable(bits, n, want[0], want[1], c[0], c[1], shift, positions, capacity, &top);
    else
        bins_portable(bits, n, want[0], want[1], c[0], c[1]);
    Py_END_ALLOW_THREADS
    if (top >= 0x7f80u) {
        PyErr_SetString(PyExc_ValueError, "magnitudes must be finite and non-negative");
        goto done;
    }
    if (listed > capacity) {
        PyErr_Format(PyExc_ValueError, "positions holds %zd indices, %zd needed", capacity, listed);
        goto done;
    }
    if (keys)
        result = PyLong_FromSsize_t(listed);
    else {
        result = Py_None;
        Py_INCREF(result);
    }
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
