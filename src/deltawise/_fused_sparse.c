/* Fused kernels of the sparsifying merges (TIES, DARE, Breadcrumbs, DELLA, Consensus), included by
 * _fused.c (one translation unit: they share its loads, stores and SIMD dispatch), in five files:
 *
 * _fused_sparse.c   sparse_merge: trim (magnitude window, listed tie entries, a keep mask), rescale,
 *                   weight, sign election, disjoint mean or sum, Consensus's TALL-mask selection,
 *                   lambda, + base, cast: the torch path of sparsify.aggregate/combine (and
 *                   consensus.py) operation for operation, so the same bits; and the argument
 *                   helpers the others use.
 * _fused_stats.c    delta_histogram, magnitude_bins, delta_l1: the radix-select passes of merge/stats.py
 *                   over raw chunks (no float32 copy of a chunk is made) or kept magnitudes (making
 *                   tie_select's keys on the way), and DARE's L1 norms.
 * _fused_rng.c      dare_mask: DARE's Bernoulli keep mask, the very numbers TensorJob.uniform draws
 *                   with torch.rand (MT19937 seeded per block, 24-bit uniforms), without torch.
 * _fused_select.c   tie_select: which entries std::sort (torch's CPU sort, libstdc++ introsort)
 *                   places in a window of positions, following only the ranges that hold a window edge,
 *                   on 4-byte keys in place of the magnitudes.
 * _fused_della.c    della_mask: DELLA's keep mask, from each entry's magnitude rank within its row
 *                   (a stable radix sort) and dare_mask's draws.
 */

static void choose_half(HalfLoad *load, HalfStore *store) {
#if defined(DW_HAVE_F16) && defined(DW_X86_DISPATCH)
    *load = use_avx2 > 0 ? half_load_f16c : half_load_generic;
    *store = use_avx2 > 0 ? half_store_f16c : half_store_generic;
#elif defined(DW_HAVE_F16)
    *load = half_load_generic;
    *store = half_store_generic;
#else
    *load = NULL;
    *store = NULL;
#endif
}

/* A set of held buffers, released together. */
typedef struct {
    Py_buffer views[4 * MAX_INPUTS + 4];
    int held;
} Held;

static void release_all(Held *h) {
    for (int k = 0; k < h->held; k++)
        PyBuffer_Release(&h->views[k]);
    h->held = 0;
}

/* Takes obj's buffer (writable if asked), checks it holds at least `need` bytes; NULL on error. */
static void *hold(Held *h, PyObject *obj, int writable, Py_ssize_t need, const char *what) {
    Py_buffer *view = &h->views[h->held];
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
        return NULL;
    h->held++;
    if (view->len < need) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, %zd needed", what, view->len, need);
        return NULL;
    }
    return view->buf;
}

static int take_models(Held *h, PyObject *inputs, PyObject *dtypes, Py_ssize_t n, int *count, const char **in,
                       int *in_dtype) {
    Py_ssize_t c = PySequence_Size(inputs);
    if (c < 1 || c > MAX_INPUTS || PySequence_Size(dtypes) != c) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "between 1 and %d inputs with one dtype each are supported", MAX_INPUTS);
        return -1;
    }
    *count = (int)c;
    for (Py_ssize_t k = 0; k < c; k++) {
        PyObject *item = PySequence_GetItem(dtypes, k);
        long dtype = item ? PyLong_AsLong(item) : -1;
        Py_XDECREF(item);
        if (PyErr_Occurred() || check_dtype((int)dtype, "input") < 0)
            return -1;
        item = PySequence_GetItem(inputs, k);
        if (item == NULL)
            return -1;
        in[k] = hold(h, item, 0, n * itemsize((int)dtype), "input");
        Py_DECREF(item);
        if (in[k] == NULL)
            return -1;
        in_dtype[k] = (int)dtype;
    }
    return 0;
}

/* ---- the sparse merge ---------------------------------------------------------------- */

static inline uint32_t float_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
}

static inline float bits_float(uint32_t u) {
    float x;
    memcpy(&x, &u, 4);
    return x;
}

enum { TRIM_NONE = 0, TRIM_WINDOW = 1, TRIM_MASK = 2 };

typedef struct {
    int trim;              /* TRIM_* */
    int has_lower, has_upper;
    float lower, upper;    /* keep lower <= |d| <= upper; exclusive when listed != NULL */
    const int64_t *listed; /* sorted flat indices kept besides (tie rule), relative to the tensor */
    Py_ssize_t listed_len;
    const uint8_t *mask;   /* TRIM_MASK: keep where mask != 0 (d * mask: dropped entries become +-0) */
    int rescale;           /* 0 none, 1 multiply by factor, 2 divide by factor */
    float factor;
    float weight;
} ModelTrim;

typedef struct {
    Py_ssize_t n, offset;  /* entries; flat index of the first within the tensor */
    int count;
    const char *in[MAX_INPUTS];
    int in_dtype[MAX_INPUTS];
    ModelTrim trim[MAX_INPUTS];
    const char *base;
    int base_dtype;
    char *out;
    int out_dtype;
    int consensus;         /* 0 plain sum, 1 sign election + disjoint merge */
    int zero_positive;     /* an election sum of zero elects + */
    int normalize;         /* consensus: divide by the agreeing weights */
    int divide;            /* plain sum: divide by divisor */
    float divisor;
    int has_scale;
    float scale;
    int tall;              /* Consensus: keep the aggregate only where >= tall_k TALL masks select the entry */
    int tall_k;
    float tall_lambda[MAX_INPUTS];
    float *work;           /* count * BLOCK floats */
    HalfLoad half_load;
    HalfStore half_store;
} SparseJob;

/* trimmed, rescaled, weighted task vector of model k for entries [start, start + n) */
/* (returns how many task-vector entries are NaN or infinite: a trim or an election could hide them) */
DW_INLINE Py_ssize_t trimmed_block(float *d, const float *b, const SparseJob *job, int k, Py_ssize_t start, Py_ssize_t n,
                                   Py_ssize_t *cursor, const Job *conv) {
    const ModelTrim *t = &job->trim[k];
    load_block(d, job->in[k] + start * itemsize(job->in_dtype[k]), job->in_dtype[k], n, conv);
    Py_ssize_t bad = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        d[i] = d[i] - b[i];
        bad += (int32_t)(float_bits(d[i]) & 0x7fffffffu) >= (int32_t)0x7f800000u;
    }
    if (t->trim == TRIM_WINDOW) {
        if (t->listed == NULL) {
            float lo = t->has_lower ? t->lower : 0.0f, hi = t->has_upper ? t->upper : INFINITY;
            int use_hi = t->has_upper;
            for (Py_ssize_t i = 0; i < n; i++) {
                float m = fabsf(d[i]);
                int keep = m >= lo && (!use_hi || m <= hi);
                d[i] = keep ? d[i] : 0.0f;
            }
        } else {
            /* exclusive bounds, one loop per pair of bounds present, so that each vectorises (the flags read in
               one loop kept it scalar) */
            float lo = t->lower, hi = t->upper, raw[BLOCK];
            memcpy(raw, d, (size_t)n * sizeof(float)); /* cheaper than loading the block again for the listed entries */
            if (t->has_lower && t->has_upper)
                for (Py_ssize_t i = 0; i < n; i++) {
                    float m = fabsf(d[i]);
                    d[i] = m > lo && m < hi ? d[i] : 0.0f;
                }
            else if (t->has_lower)
                for (Py_ssize_t i = 0; i < n; i++)
                    d[i] = fabsf(d[i]) > lo ? d[i] : 0.0f;
            else if (t->has_upper)
                for (Py_ssize_t i = 0; i < n; i++)
                    d[i] = fabsf(d[i]) < hi ? d[i] : 0.0f;
            /* the listed entries are kept whatever their magnitude (the tie rule's choice) */
            Py_ssize_t first = job->offset + start, last = first + n, c = *cursor;
            while (c < t->listed_len && t->listed[c] < first)
                c++;
            for (; c < t->listed_len && t->listed[c] < last; c++) {
                Py_ssize_t i = (Py_ssize_t)(t->listed[c] - first);
                d[i] = raw[i];
            }
            *cursor = c;
        }
    } else if (t->trim == TRIM_MASK) {
        const uint8_t *m = t->mask + start;
        for (Py_ssize_t i = 0; i < n; i++)
            d[i] = d[i] * (float)m[i]; /* m is 0 or 1: d * mask as torch computes it (dropped: +-0) */
    }
    if (t->rescale == 1) {
        float f = t->factor;
        for (Py_ssize_t i = 0; i < n; i++)
            d[i] = d[i] * f;
    } else if (t->rescale == 2) {
        float f = t->factor;
        for (Py_ssize_t i = 0; i < n; i++)
            d[i] = d[i] / f;
    }
    if (t->weight != 1.0f) {
        float w = t->weight;
        for (Py_ssize_t i = 0; i < n; i++)
            d[i] = d[i] * w;
    }
    return bad;
}

/* Consensus (TALL masks): result = result where at least tall_k models have |tau_k| > lambda_k |result - tau_k|,
   else +0 (tau_k untrimmed and unweighted: the work buffer where no trim, rescale or weight touched it) */
DW_INLINE void tall_block(float *result, const float *b, const SparseJob *job, Py_ssize_t start, Py_ssize_t n,
                          const Job *conv) {
    int32_t count[BLOCK];
    float raw[BLOCK];
    for (Py_ssize_t i = 0; i < n; i++)
        count[i] = 0;
    for (int k = 0; k < job->count; k++) {
        const ModelTrim *t = &job->trim[k];
        const float *d = job->work + (size_t)k * BLOCK;
        if (t->trim != TRIM_NONE || t->rescale != 0 || t->weight != 1.0f) {
            load_block(raw, job->in[k] + start * itemsize(job->in_dtype[k]), job->in_dtype[k], n, conv);
            for (Py_ssize_t i = 0; i < n; i++)
                raw[i] = raw[i] - b[i];
            d = raw;
        }
        float lam = job->tall_lambda[k];
        for (Py_ssize_t i = 0; i < n; i++)
            count[i] += fabsf(d[i]) > fabsf(result[i] - d[i]) * lam;
    }
    int32_t least = job->tall_k;
    for (Py_ssize_t i = 0; i < n; i++)
        result[i] = count[i] >= least ? result[i] : 0.0f;
}

DW_INLINE Py_ssize_t sparse_body(const SparseJob *job) {
    float b[BLOCK], total[BLOCK], mixed[BLOCK], divisor[BLOCK];
    Py_ssize_t cursor[MAX_INPUTS] = {0};
    Py_ssize_t bad = 0;
    Job conv;
    conv.half_load = job->half_load;
    conv.half_store = job->half_store;
    for (int k = 0; k < job->count; k++) { /* the first listed entry of this chunk, by bisection */
        Py_ssize_t lo = 0, hi = job->trim[k].listed_len;
        while (lo < hi) {
            Py_ssize_t mid = lo + (hi - lo) / 2;
            if (job->trim[k].listed[mid] < job->offset)
                lo = mid + 1;
            else
                hi = mid;
        }
        cursor[k] = lo;
    }
    for (Py_ssize_t start = 0; start < job->n; start += BLOCK) {
        Py_ssize_t n = job->n - start < BLOCK ? job->n - start : BLOCK;
        load_block(b, job->base + start * itemsize(job->base_dtype), job->base_dtype, n, &conv);
        for (int k = 0; k < job->count; k++)
            bad += trimmed_block(job->work + (size_t)k * BLOCK, b, job, k, start, n, &cursor[k], &conv);
        const float *d0 = job->work;
        for (Py_ssize_t i = 0; i < n; i++)
            total[i] = d0[i];
        for (int k = 1; k < job->count; k++) {
            const float *d = job->work + (size_t)k * BLOCK;
            for (Py_ssize_t i = 0; i < n; i++)
                total[i] = total[i] + d[i];
        }
        float *result = total;
        if (job->consensus) {
            /* branch-free (bit masks) so that the loops vectorise; the same values as the selects */
            uint32_t zp = job->zero_positive ? 1u : 0u;
            for (Py_ssize_t i = 0; i < n; i++) {
                uint32_t positive = 0u - (uint32_t)((total[i] > 0.0f) | (zp & (total[i] == 0.0f)));
                total[i] = bits_float(0xbf800000u ^ (positive & 0x80000000u)); /* the elected sign, +1 or -1 */
                mixed[i] = 0.0f;
                divisor[i] = 0.0f;
            }
            for (int k = 0; k < job->count; k++) {
                const float *d = job->work + (size_t)k * BLOCK;
                uint32_t w = float_bits(job->trim[k].weight);
                for (Py_ssize_t i = 0; i < n; i++) {
                    uint32_t agree = 0u - (uint32_t)(d[i] * total[i] > 0.0f);
                    mixed[i] = mixed[i] + bits_float(float_bits(d[i]) & agree);  /* +0 where it disagrees */
                    divisor[i] = divisor[i] + bits_float(w & agree);
                }
            }
            if (job->normalize)
                for (Py_ssize_t i = 0; i < n; i++) {
                    uint32_t zero = 0u - (uint32_t)(divisor[i] == 0.0f);
                    mixed[i] = mixed[i] / bits_float((float_bits(divisor[i]) & ~zero) | (0x3f800000u & zero));
                }
            result = mixed;
        } else if (job->divide) {
            float dv = job->divisor;
            for (Py_ssize_t i = 0; i < n; i++)
                total[i] = total[i] / dv;
        }
        if (job->tall)
            tall_block(result, b, job, start, n, &conv);
        if (job->has_scale) {
            float s = job->scale;
            for (Py_ssize_t i = 0; i < n; i++)
                result[i] = result[i] * s;
        }
        for (Py_ssize_t i = 0; i < n; i++)
            result[i] = result[i] + b[i];
        bad += store_block(job->out + start * itemsize(job->out_dtype), result, job->out_dtype, n, &conv);
    }
    return bad;
}

#ifdef DW_X86_DISPATCH
__attribute__((target("avx2,fma,f16c"))) static Py_ssize_t sparse_avx2(const SparseJob *job) { return sparse_body(job); }
#endif

static Py_ssize_t sparse_kernel(const SparseJob *job) {
#ifdef DW_X86_DISPATCH
    if (use_avx2 > 0)
        return sparse_avx2(job);
#endif
    return sparse_body(job);
}

/* one model's trim: (weight, mode, lower|None, upper|None, listed|None, mask|None, rescale, factor) */
static int take_trim(Held *h, PyObject *spec, ModelTrim *t, Py_ssize_t n) {
    PyObject *lower, *upper, *listed, *mask;
    double weight, factor;
    if (!PyArg_ParseTuple(spec, "diOOOOid", &weight, &t->trim, &lower, &upper, &listed, &mask, &t->rescale, &factor))
        return -1;
    t->weight = (float)weight;
    t->factor = (float)factor;
    t->has_lower = lower != Py_None;
    t->has_upper = upper != Py_None;
    t->lower = t->has_lower ? (float)PyFloat_AsDouble(lower) : 0.0f;
    t->upper = t->has_upper ? (float)PyFloat_AsDouble(upper) : 0.0f;
    if (PyErr_Occurred())
        return -1;
    if (listed != Py_None) {
        t->listed = hold(h, listed, 0, 0, "listed");
        if (t->listed == NULL)
            return -1;
        t->listed_len = h->views[h->held - 1].len / 8;
    }
    if (t->trim == TRIM_MASK) {
        if (mask == Py_None) {
            PyErr_SetString(PyExc_ValueError, "a mask trim needs the mask");
            return -1;
        }
        t->mask = hold(h, mask, 0, n, "mask");
        if (t->mask == NULL)
            return -1;
    }
    return 0;
}

PyDoc_STRVAR(sparse_merge_doc,
"sparse_merge(out, out_dtype, base, base_dtype, inputs, dtypes, trims, consensus, zero_positive, normalize,\n"
"             divisor, scale, offset, tall) -> int\n\n"
"out = cast(b + scale * aggregate_k(w_k * rescale(trim(x_k - b)))): sparsify.combine's arithmetic.\n"
"trims[k] = (weight, mode 0 none/1 window/2 mask, lower, upper, listed int64 indices or None, uint8 mask or\n"
"None, rescale 0 none/1 multiply/2 divide, factor). consensus: sign election and disjoint merge (divided by\n"
"the agreeing weights if normalize); else a sum divided by divisor (None: not divided). scale None: not\n"
"scaled. offset: flat index of out's first entry in the tensor (for listed). tall None, or (k, lambdas): before\n"
"the scale, keep the aggregate only where at least k models have |x_k - b| > lambda_k |aggregate - (x_k - b)|\n"
"(Consensus's TALL masks), else 0. Returns the count of non-finite task-vector entries plus non-finite outputs.");

static PyObject *py_sparse_merge(PyObject *self, PyObject *args) {
    PyObject *out, *base, *inputs, *dtypes, *trims, *divisor, *scale, *tall;
    int out_dtype, base_dtype, consensus, zero_positive, normalize;
    Py_ssize_t offset;
    if (!PyArg_ParseTuple(args, "OiOiOOOpppOOnO", &out, &out_dtype, &base, &base_dtype, &inputs, &dtypes, &trims,
                          &consensus, &zero_positive, &normalize, &divisor, &scale, &offset, &tall))
        return NULL;
    if (check_dtype(out_dtype, "output") < 0 || check_dtype(base_dtype, "base") < 0)
        return NULL;
    SparseJob job;
    memset(&job, 0, sizeof job);
    Held held = {.held = 0};
    Py_ssize_t bad = -1;
    job.out = hold(&held, out, 1, 0, "out");
    if (job.out == NULL)
        goto done;
    job.out_dtype = out_dtype;
    job.n = held.views[0].len / itemsize(out_dtype);
    job.offset = offset;
    job.base = hold(&held, base, 0, job.n * itemsize(base_dtype), "base");
    if (job.base == NULL)
        goto done;
    job.base_dtype = base_dtype;
    if (take_models(&held, inputs, dtypes, job.n, &job.count, job.in, job.in_dtype) < 0)
        goto done;
    if (PySequence_Size(trims) != job.count) {
        PyErr_SetString(PyExc_ValueError, "trims need one entry per input");
        goto done;
    }
    for (int k = 0; k < job.count; k++) {
        PyObject *item = PySequence_GetItem(trims, k);
        int rc = item ? take_trim(&held, item, &job.trim[k], job.n) : -1;
        Py_XDECREF(item);
        if (rc < 0)
            goto done;
    }
    job.consensus = consensus;
    job.zero_positive = zero_positive;
    job.normalize = normalize;
    job.divide = divisor != Py_None;
    job.divisor = job.divide ? (float)PyFloat_AsDouble(divisor) : 1.0f;
    job.has_scale = scale != Py_None;
    job.scale = job.has_scale ? (float)PyFloat_AsDouble(scale) : 1.0f;
    if (PyErr_Occurred())
        goto done;
    if (tall != Py_None) {
        PyObject *lambdas;
        long least;
        if (!PyArg_ParseTuple(tall, "lO", &least, &lambdas))
            goto done;
        if (PySequence_Size(lambdas) != job.count) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "tall needs one lambda per input");
            goto done;
        }
        job.tall = 1;
        job.tall_k = least > INT32_MAX ? INT32_MAX : (least < INT32_MIN ? INT32_MIN : (int)least);
        for (int k = 0; k < job.count; k++) {
            PyObject *item = PySequence_GetItem(lambdas, k);
            job.tall_lambda[k] = item ? (float)PyFloat_AsDouble(item) : 0.0f;
            Py_XDECREF(item);
            if (PyErr_Occurred())
                goto done;
        }
    }
    job.work = malloc((size_t)job.count * BLOCK * sizeof(float));
    if (job.work == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    choose_half(&job.half_load, &job.half_store);
    Py_BEGIN_ALLOW_THREADS
    bad = sparse_kernel(&job);
    Py_END_ALLOW_THREADS
    free(job.work);
done:
    release_all(&held);
    return bad < 0 ? NULL : PyLong_FromSsize_t(bad);
}
