/* DELLA's MagPrune keep masks (merge/methods/della.py) over raw chunks; see _fused_sparse.c.
 *
 * Deep et al. 2024 (arXiv 2406.11617), as della.py computes them: within each line (dimension 1 of
 * the tensor; a 0-d or 1-d tensor is one line) r_j is the ascending rank of |x_j - b_j|, equal
 * magnitudes in index order (torch.argsort(stable=True)); p_j = probs[r_j], the keep-probability
 * table that Python computes with della.py's own float32 expression; m_j = u_j < p_j with u_j the
 * number TensorJob.uniform draws for entry j (the DARE block streams of _fused_rng.c). So the masks
 * are the torch path's, bit for bit, for any chunking and thread count.
 *
 * Most entries need no exact rank (line_keep): the table rises with the rank, so an entry whose rank is
 * known to lie in [lo, hi] is kept when u < probs[lo] and dropped when u >= probs[hi], whatever its exact
 * rank. One counting pass over bins of the float32 bits of |x - b| (non-negative floats order as their
 * bits; bins of 1/2^m of a binade, about one for two entries, over the 16 binades below the line's largest
 * magnitude, one bin for all below) bounds every rank by its bin's first and last position; only the entries
 * whose draw falls between those two probabilities (about 2 epsilon (c - 1) / n of the entries of a bin of c)
 * get their exact rank, by counting the line's smaller keys. Where more than PENDING_MAX entries of a line need it,
 * or the table is not monotone, the whole line is ranked exactly (line_probs): an LSD radix sort on only
 * the bits where a line's keys differ, in one to three digits of at most 11 bits. Either way the ranks
 * compared are the exact ones, so the masks are the same.
 */

/* ---- the keep probability of each entry of a line, by its stable ascending rank --------------- */

#define RANK_MAX_BITS 11 /* digits of at most 11 bits: at most 3 passes, histograms of at most 2048 bins */

/* p[j * stride] = probs[rank_j] for the n keys of a line, rank_j the position of key j in the ascending
   order with equal keys in index order (torch.argsort(stable=True)). Only the bits where the keys differ
   are sorted on (LSD radix sort, stable), in one to three digits; the last pass writes p directly.
   a, b: scratch of n entries each; hist: scratch of 3 << RANK_MAX_BITS counts. */
static void line_probs(const uint32_t *key, Py_ssize_t n, float *p, Py_ssize_t stride, const float *probs, uint64_t *a,
                       uint64_t *b, uint32_t *hist) {
    if (n <= 32) { /* insertion sort, moving only past strictly larger keys: stable */
        for (Py_ssize_t j = 0; j < n; j++) {
            uint64_t v = ((uint64_t)key[j] << 32) | (uint32_t)j; /* index in the low half: unique, ordered */
            Py_ssize_t i = j;
            for (; i > 0 && a[i - 1] > v; i--)
                a[i] = a[i - 1];
            a[i] = v;
        }
        for (Py_ssize_t q = 0; q < n; q++)
            p[(Py_ssize_t)(uint32_t)a[q] * stride] = probs[q];
        return;
    }
    uint32_t k0 = key[0], differ = 0;
    for (Py_ssize_t j = 0; j < n; j++)
        differ |= key[j] ^ k0;
    if (differ == 0) { /* all equal: the ranks are the indices */
        for (Py_ssize_t j = 0; j < n; j++)
            p[j * stride] = probs[j];
        return;
    }
    int lo = __builtin_ctz(differ), width = 32 - __builtin_clz(differ) - lo;
    int max_bits = 8;
    while (max_bits < RANK_MAX_BITS && ((Py_ssize_t)1 << (max_bits + 1)) <= n) /* bins no more than entries */
        max_bits++;
    int passes = (width + max_bits - 1) / max_bits;
    passes = passes > 3 ? 3 : passes; /* width <= 31: three digits of at most 11 bits */
    int bits = (width + passes - 1) / passes;
    uint32_t mask = (1u << bits) - 1u, bins = 1u << bits;
    uint32_t *h0 = hist, *h1 = hist + bins, *h2 = hist + 2 * bins;
    memset(hist, 0, (size_t)passes * bins * sizeof(uint32_t));
    if (passes == 1) {
        for (Py_ssize_t j = 0; j < n; j++)
            h0[(key[j] >> lo) & mask]++;
    } else if (passes == 2) {
        for (Py_ssize_t j = 0; j < n; j++) {
            uint32_t k = key[j] >> lo;
            h0[k & mask]++;
            h1[(k >> bits) & mask]++;
        }
    } else {
        for (Py_ssize_t j = 0; j < n; j++) {
            uint32_t k = key[j] >> lo;
            h0[k & mask]++;
            h1[(k >> bits) & mask]++;
            h2[(k >> 2 * bits) & mask]++;
        }
    }
    for (int q = 0; q < passes; q++) { /* counts to first positions */
        uint32_t sum = 0, *h = hist + (size_t)q * bins;
        for (uint32_t d = 0; d < bins; d++) {
            uint32_t c = h[d];
            h[d] = sum;
            sum += c;
        }
    }
    if (passes == 1) { /* counting sort: in index order, each entry takes the next position of its bin */
        for (Py_ssize_t j = 0; j < n; j++)
            p[j * stride] = probs[h0[(key[j] >> lo) & mask]++];
        return;
    }
    for (Py_ssize_t j = 0; j < n; j++) { /* the first digit, packing (sorted bits, index) */
        uint32_t k = key[j] >> lo;
        a[h0[k & mask]++] = ((uint64_t)k << 32) | (uint32_t)j;
    }
    if (passes == 3) {
        for (Py_ssize_t j = 0; j < n; j++)
            b[h1[(a[j] >> (32 + bits)) & mask]++] = a[j];
        uint64_t *t = a;
        a = b;
        b = t;
    }
    uint32_t *last = passes == 3 ? h2 : h1;
    int shift = 32 + (passes - 1) * bits;
    for (Py_ssize_t j = 0; j < n; j++) /* the last digit gives the rank */
        p[(Py_ssize_t)(uint32_t)a[j] * stride] = probs[last[(a[j] >> shift) & mask]++];
}

/* ---- the keep decision of each entry of a line, ranking exactly only where the draw needs it ----- */

typedef uint8_t U8x8 __attribute__((vector_size(8)));
typedef uint32_t U32x8 __attribute__((vector_size(32)));

#define DECIDE_BINADES 16   /* the bins cover this many binades below a line's largest magnitude */
#define DECIDE_MAX_BINS 2048 /* at most this many bins (besides the one below the range) */
#define PENDING_MAX 32      /* exact ranks counted one by one for at most this many entries of a line */

typedef struct {
    uint32_t *first;   /* 2 (DECIDE_MAX_BINS + 2): the counts of even and odd entries, then first positions */
    uint32_t *bin;     /* line entries: each entry's bin */
    uint8_t *undecided; /* line entries + 8: the draw alone does not decide */
    uint32_t *pending; /* line entries + 8: the undecided entries, then those that need the exact rank */
    float *p;          /* line entries: the exact path's probabilities */
    uint64_t *a, *b;   /* line entries each: the exact path's sort */
    uint32_t *hist;    /* 3 << RANK_MAX_BITS counts */
} LineScratch;

/* The stable ascending rank of key[j] among the n keys: smaller keys, and equal keys before j. */
DW_INLINE uint32_t exact_rank(const uint32_t *key, Py_ssize_t n, Py_ssize_t j) {
    uint32_t kj = key[j], below = 0, before = 0;
    for (Py_ssize_t i = 0; i < j; i++)
        before += key[i] <= kj;
    for (Py_ssize_t i = j; i < n; i++)
        below += key[i] < kj;
    return below + before;
}

/* keep[j * stride] = u[j] < probs[rank_j] for the n keys of a line (rank_j as line_probs), u: the line's draws.
   monotone: probs never falls (then most entries are decided by their bin's range of ranks). */
DW_INLINE void line_keep(const uint32_t *restrict key, const float *restrict u, Py_ssize_t n, uint8_t *restrict keep,
                         Py_ssize_t stride, const float *restrict probs, int monotone, const LineScratch *s) {
    if (monotone && n > 32) {
        uint32_t top = 0;
        for (Py_ssize_t j = 0; j < n; j++)
            top = key[j] > top ? key[j] : top;
        int m = 0; /* 2^m bins a binade: about one bin for two entries */
        while (m < 23 && ((Py_ssize_t)DECIDE_BINADES << (m + 2)) <= n && (DECIDE_BINADES << (m + 1)) <= DECIDE_MAX_BINS)
            m++;
        int shift = 23 - m;
        int32_t bins = (DECIDE_BINADES << m) + 1, low = (int32_t)(top >> shift) - (bins - 1);
        uint32_t *restrict first = s->first, *restrict bin = s->bin, *restrict pending = s->pending;
        memset(first, 0, (size_t)(bins + 1) * sizeof(uint32_t));
        uint32_t *restrict second = first + DECIDE_MAX_BINS + 2;
        memset(second, 0, (size_t)(bins + 1) * sizeof(uint32_t));
        for (Py_ssize_t j = 0; j < n; j++) {
            int32_t t = (int32_t)(key[j] >> shift) - low; /* at most bins - 1: key[j] <= top */
            bin[j] = (uint32_t)(t < 0 ? 0 : t);
        }
        Py_ssize_t j2 = 0;
        for (; j2 + 2 <= n; j2 += 2) {
            first[bin[j2]]++;
            second[bin[j2 + 1]]++;
        }
        if (j2 < n) first[bin[j2]]++;
        uint32_t sum = 0;
        for (int32_t q = 0; q <= bins; q++) { /* first[bins] = n */
            uint32_t c = first[q] + second[q];
            first[q] = sum;
            sum += c;
        }
        /* the draw alone decides where it lies outside [probs[0], probs[n - 1]) */
        float p_min = probs[0], p_max = probs[n - 1];
        uint8_t *restrict undecided = s->undecided;
        for (Py_ssize_t j = 0; j < n; j++) {
            float uj = u[j];
            keep[j * stride] = uj < p_min;
            undecided[j] = (uj >= p_min) & (uj < p_max);
        }
        memset(undecided + n, 0, 8);
        /* their indices, eight flags at a time: the flags' byte mask picks the offsets from a table */
        uint32_t *restrict list = pending;
        Py_ssize_t count = 0;
        for (Py_ssize_t g = 0; g < n; g += 8) {
            uint64_t word;
            memcpy(&word, undecided + g, 8);
            unsigned mask = (unsigned)((word * 0x0102040810204080ull) >> 56); /* bit q: flag of byte q (0 or 1) */
            U8x8 offsets;
            memcpy(&offsets, set_bits[mask], 8);
            U32x8 at = __builtin_convertvector(offsets, U32x8) + (uint32_t)g;
            memcpy(list + count, &at, 32);
            count += __builtin_popcount(mask);
        }
        /* each by its bin: kept when u < probs[first], dropped when u >= probs[last]; between them the exact rank
           decides */
        Py_ssize_t exact = 0;
        for (Py_ssize_t q = 0; q < count; q++) {
            uint32_t j = list[q], t = bin[j];
            float uj = u[j];
            uint8_t kept = uj < probs[first[t]];
            keep[j * stride] = kept;
            pending[exact] = j;
            exact += !kept & (uj < probs[first[t + 1] - 1]);
        }
        if (exact <= PENDING_MAX) {
            for (Py_ssize_t q = 0; q < exact; q++) {
                Py_ssize_t j = pending[q];
                keep[j * stride] = u[j] < probs[exact_rank(key, n, j)];
            }
            return;
        }
    }
    line_probs(key, n, s->p, 1, probs, s->a, s->b, s->hist);
    for (Py_ssize_t j = 0; j < n; j++)
        keep[j * stride] = u[j] < s->p[j];
}

/* ---- the masks ------------------------------------------------------------------------------ */

typedef struct {
    const char *x, *b;     /* the model's and the base's entries of the chunk, as stored */
    int x_dtype, b_dtype;
    Py_ssize_t slab;       /* entries per row of dimension 0 (the whole tensor when 0-d or 1-d) */
    Py_ssize_t line;       /* entries per line: dimension 1 (the whole tensor when 0-d or 1-d) */
    Py_ssize_t stride;     /* distance between neighbours in a line: the product of dimensions 2.. */
    const float *probs;    /* keep probability by ascending rank, `line` entries */
    int monotone;          /* probs never falls */
    const Segments *g;     /* the chunk's RNG segments, each a whole number of slabs */
    uint8_t *out;
    float *u;              /* scratch: slab draws */
    uint32_t *keys;        /* scratch: slab keys */
    uint32_t *line_keys;   /* scratch: line keys (lines with stride > 1) */
    float *line_u;         /* scratch: line draws (lines with stride > 1) */
    LineScratch scratch;
    HalfLoad half_load;
} DellaJob;

/* The L1 norms of the task vector and of its kept part (DELLA's rescale), in float64: sums[q] += |x| and
   sums[8 + q] += |x| where kept, over entries q, q + 8, q + 16, ... of the n keys (the kept magnitude is the
   key's bits masked: +0 where dropped). */
static void l1_sums_generic(const uint32_t *k, const uint8_t *m, Py_ssize_t n, double *sums) {
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int q = 0; q < 8; q++) {
            sums[q] += (double)bits_float(k[i + q]);
            sums[8 + q] += (double)bits_float(k[i + q] & (0u - (uint32_t)m[i + q]));
        }
    for (; i < n; i++) {
        sums[0] += (double)bits_float(k[i]);
        sums[8] += (double)bits_float(k[i] & (0u - (uint32_t)m[i]));
    }
}

#ifdef DW_X86_DISPATCH
/* l1_sums_generic four lanes at a time: the same additions in the same order */
__attribute__((target("avx2"))) static void l1_sums_avx2(const uint32_t *k, const uint8_t *m, Py_ssize_t n,
                                                        double *sums) {
    __m256d all_lo = _mm256_loadu_pd(sums), all_hi = _mm256_loadu_pd(sums + 4);
    __m256d kept_lo = _mm256_loadu_pd(sums + 8), kept_hi = _mm256_loadu_pd(sums + 12);
    __m256i zero = _mm256_setzero_si256();
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i key = _mm256_loadu_si256((const __m256i *)(k + i));
        __m256i flag = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(m + i)));
        __m256 all = _mm256_castsi256_ps(key);
        __m256 kept = _mm256_castsi256_ps(_mm256_and_si256(key, _mm256_sub_epi32(zero, flag)));
        all_lo = _mm256_add_pd(all_lo, _mm256_cvtps_pd(_mm256_castps256_ps128(all)));
        all_hi = _mm256_add_pd(all_hi, _mm256_cvtps_pd(_mm256_extractf128_ps(all, 1)));
        kept_lo = _mm256_add_pd(kept_lo, _mm256_cvtps_pd(_mm256_castps256_ps128(kept)));
        kept_hi = _mm256_add_pd(kept_hi, _mm256_cvtps_pd(_mm256_extractf128_ps(kept, 1)));
    }
    _mm256_storeu_pd(sums, all_lo);
    _mm256_storeu_pd(sums + 4, all_hi);
    _mm256_storeu_pd(sums + 8, kept_lo);
    _mm256_storeu_pd(sums + 12, kept_hi);
    l1_sums_generic(k + i, m + i, n - i, sums);
}
#endif

DW_INLINE void l1_sums(const uint32_t *k, const uint8_t *m, Py_ssize_t n, double *sums) {
#ifdef DW_X86_DISPATCH
    if (use_avx2 > 0) {
        l1_sums_avx2(k, m, n, sums);
        return;
    }
#endif
    l1_sums_generic(k, m, n, sums);
}

DW_INLINE Py_ssize_t della_body(const DellaJob *job, double *l1) {
    float x[BLOCK], b[BLOCK];
    double sums[16] = {0};
    Job conv; /* load_block reads only the half conversion */
    conv.half_load = job->half_load;
    Py_ssize_t bad = 0, pos = 0, slab = job->slab, line = job->line, stride = job->stride;
    Py_ssize_t xsize = itemsize(job->x_dtype), bsize = itemsize(job->b_dtype);
    for (Py_ssize_t seg = 0; seg < job->g->parts; seg++) {
        MtStream s;
        mt_start(&s, job->g->seed[seg], job->g->skip[seg]);
        for (Py_ssize_t end = pos + job->g->length[seg]; pos < end; pos += slab) {
            for (Py_ssize_t start = 0; start < slab; start += BLOCK) {
                Py_ssize_t n = slab - start < BLOCK ? slab - start : BLOCK;
                load_block(x, job->x + (pos + start) * xsize, job->x_dtype, n, &conv);
                load_block(b, job->b + (pos + start) * bsize, job->b_dtype, n, &conv);
                uint32_t *k = job->keys + start;
                for (Py_ssize_t i = 0; i < n; i++) {
                    float d = x[i] - b[i];
                    uint32_t u;
                    memcpy(&u, &d, 4);
                    k[i] = u & 0x7fffffffu; /* |d|: non-negative floats order as their bits */
                    bad += k[i] >= 0x7f800000u;
                }
            }
            mt_fill(&s, job->u, slab);
            const LineScratch *scratch = &job->scratch;
            if (stride == 1) {
                line_keep(job->keys, job->u, line, job->out + pos, 1, job->probs, job->monotone, scratch);
            } else {
                for (Py_ssize_t r = 0; r < stride; r++) {
                    for (Py_ssize_t j = 0; j < line; j++) {
                        job->line_keys[j] = job->keys[r + j * stride];
                        job->line_u[j] = job->u[r + j * stride];
                    }
                    line_keep(job->line_keys, job->line_u, line, job->out + pos + r, stride, job->probs, job->monotone,
                              scratch);
                }
            }
            l1_sums(job->keys, job->out + pos, slab, sums);
        }
    }
    const double *all = sums, *kept = sums + 8;
    l1[0] = ((all[0] + all[1]) + (all[2] + all[3])) + ((all[4] + all[5]) + (all[6] + all[7]));
    l1[1] = ((kept[0] + kept[1]) + (kept[2] + kept[3])) + ((kept[4] + kept[5]) + (kept[6] + kept[7]));
    return bad;
}

#ifdef DW_X86_DISPATCH
__attribute__((target("avx2,fma,f16c,popcnt"))) static Py_ssize_t della_avx2(const DellaJob *job, double *l1) {
    return della_body(job, l1);
}
#endif

static Py_ssize_t della_kernel(const DellaJob *job, double *l1) {
#ifdef DW_X86_DISPATCH
    if (use_avx2 > 0)
        return della_avx2(job, l1);
#endif
    return della_body(job, l1);
}

PyDoc_STRVAR(della_mask_doc,
"della_mask(out, base, base_dtype, model, model_dtype, slab, line, stride, probs, seeds, skips, lengths)\n"
"    -> (int, float, float)\n\n"
"DELLA's keep mask of one model for a chunk, as uint8 into out (writable, one byte per entry): within each\n"
"line (`line` entries `stride` apart, `slab` = line * stride entries per row of dimension 0) r is the\n"
"ascending stable rank of |model - base|, and keep = u < probs[r] (probs: float32, `line` entries) with u\n"
"the draws of dare_mask's segments (seeds, skips, lengths; each a whole number of slabs).\n"
"Returns (the number of non-finite task-vector entries seen, sum |model - base|, sum of it where kept), the\n"
"sums in float64.");

static PyObject *py_della_mask(PyObject *self, PyObject *args) {
    PyObject *out, *base, *model, *probs, *seeds, *skips, *lengths;
    int base_dtype, model_dtype;
    Py_ssize_t slab, line, stride;
    if (!PyArg_ParseTuple(args, "OOiOinnnOOOO", &out, &base, &base_dtype, &model, &model_dtype, &slab, &line, &stride,
                          &probs, &seeds, &skips, &lengths))
        return NULL;
    if (check_dtype(base_dtype, "base") < 0 || check_dtype(model_dtype, "input") < 0)
        return NULL;
    DellaJob job;
    memset(&job, 0, sizeof job);
    Segments g;
    Held held = {.held = 0};
    Py_ssize_t bad = -1;
    double l1[2] = {0.0, 0.0};
    if (take_segments(&g, seeds, skips, lengths) < 0)
        goto done;
    if (line < 1 || stride < 1 || slab != line * stride || (uint64_t)line >= ((uint64_t)1 << 32)) {
        PyErr_SetString(PyExc_ValueError, "slab must be line * stride, both positive (line below 2**32)");
        goto done;
    }
    for (Py_ssize_t j = 0; j < g.parts; j++)
        if (g.length[j] % slab) {
            PyErr_SetString(PyExc_ValueError, "each RNG segment must hold whole rows");
            goto done;
        }
    job.out = hold(&held, out, 1, g.total, "out");
    job.b = job.out ? hold(&held, base, 0, g.total * itemsize(base_dtype), "base") : NULL;
    job.x = job.b ? hold(&held, model, 0, g.total * itemsize(model_dtype), "input") : NULL;
    job.probs = job.x ? hold(&held, probs, 0, line * 4, "probs") : NULL;
    if (job.probs == NULL)
        goto done;
    job.b_dtype = base_dtype;
    job.x_dtype = model_dtype;
    job.slab = slab;
    job.line = line;
    job.stride = stride;
    job.g = &g;
    job.monotone = 1;
    for (Py_ssize_t j = 1; j < line; j++)
        job.monotone &= job.probs[j - 1] <= job.probs[j]; /* false for a NaN too */
    LineScratch *ls = &job.scratch;
    job.u = malloc((size_t)slab * sizeof(float));
    job.keys = malloc((size_t)slab * sizeof(uint32_t));
    job.line_keys = malloc((size_t)line * sizeof(uint32_t));
    job.line_u = malloc((size_t)line * sizeof(float));
    ls->first = malloc((DECIDE_MAX_BINS + 2) * 2 * sizeof(uint32_t));
    ls->bin = malloc((size_t)line * sizeof(uint32_t));
    ls->undecided = malloc((size_t)line + 8);
    ls->pending = malloc(((size_t)line + 8) * sizeof(uint32_t));
    ls->p = malloc((size_t)line * sizeof(float));
    ls->a = malloc((size_t)line * sizeof(uint64_t));
    ls->b = malloc((size_t)line * sizeof(uint64_t));
    ls->hist = malloc(((size_t)3 << RANK_MAX_BITS) * sizeof(uint32_t));
    if (!job.u || !job.keys || !job.line_keys || !job.line_u || !ls->first || !ls->bin || !ls->undecided ||
        !ls->pending || !ls->p || !ls->a || !ls->b || !ls->hist) {
        PyErr_NoMemory();
        goto done;
    }
    HalfStore unused;
    choose_half(&job.half_load, &unused);
    Py_BEGIN_ALLOW_THREADS
    bad = della_kernel(&job, l1);
    Py_END_ALLOW_THREADS
done:
    free(job.u);
    free(job.keys);
    free(job.line_keys);
    free(job.line_u);
    free(job.scratch.first);
    free(job.scratch.bin);
    free(job.scratch.undecided);
    free(job.scratch.pending);
    free(job.scratch.p);
    free(job.scratch.a);
    free(job.scratch.b);
    free(job.scratch.hist);
    release_all(&held);
    free_segments(&g);
    return bad < 0 ? NULL : Py_BuildValue("(ndd)", bad, l1[0], l1[1]);
}
