/* Fused kernels of the sparsifying merges (TIES, DARE, Breadcrumbs, DELLA, Consensus), included by
 * _fused.c (one translation unit: they share its loads, stores and SIMD dispatch).
 *
 * delta_histogram   the radix-select passes of merge/stats.py over raw chunks: counts of the upper
 *                   16 bits of |x_k - b| (as float32 bits), or of the lower 16 bits inside one
 *                   upper bin; no float32 copy of the chunk is ever made.
 * sparse_merge      trim (magnitude window, listed tie entries, a keep mask), rescale, weight, sign
 *                   election, disjoint mean or sum, lambda, + base, cast: the torch path of
 *                   sparsify.aggregate/combine operation for operation, so the same bits.
 * dare_mask         DARE's Bernoulli keep mask, the very numbers TensorJob.uniform draws with
 *                   torch.rand (MT19937 seeded per block, 24-bit uniforms), without torch.
 * tie_select        which entries std::sort (torch's CPU sort, libstdc++ introsort) places in a
 *                   window of positions, following only the ranges that hold a window edge.
 */

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
    int magnitudes;              /* in[0] holds float32 magnitudes already (no base) */
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
        if (!job->magnitudes)
            load_block(b, job->base + start * itemsize(job->base_dtype), job->base_dtype, n, &conv);
        for (int k = 0; k < job->count; k++) {
            if (job->counts[k] == NULL && job->gather[k] == NULL)
                continue;
            if (job->magnitudes) {
                memcpy(bits, job->in[k] + start * 4, (size_t)n * 4);
            } else {
                load_block(x, job->in[k] + start * itemsize(job->in_dtype[k]), job->in_dtype[k], n, &conv);
                for (Py_ssize_t i = 0; i < n; i++) {
                    float d = x[i] - b[i];
                    uint32_t u;
                    memcpy(&u, &d, 4);
                    bits[i] = u & 0x7fffffffu;
                    bad += bits[i] >= 0x7f800000u;
                }
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
    float *work;           /* count * BLOCK floats */
    HalfLoad half_load;
    HalfStore half_store;
} SparseJob;

/* trimmed, rescaled, weighted task vector of model k for entries [start, start + n) */
DW_INLINE void trimmed_block(float *d, const float *b, const SparseJob *job, int k, Py_ssize_t start, Py_ssize_t n,
                             Py_ssize_t *cursor, const Job *conv) {
    const ModelTrim *t = &job->trim[k];
    load_block(d, job->in[k] + start * itemsize(job->in_dtype[k]), job->in_dtype[k], n, conv);
    for (Py_ssize_t i = 0; i < n; i++)
        d[i] = d[i] - b[i];
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
            float lo = t->lower, hi = t->upper;
            for (Py_ssize_t i = 0; i < n; i++) {
                float m = fabsf(d[i]);
                int keep = (!t->has_lower || m > lo) && (!t->has_upper || m < hi);
                d[i] = keep ? d[i] : 0.0f;
            }
            /* the listed entries are kept whatever their magnitude (the tie rule's choice) */
            Py_ssize_t first = job->offset + start, last = first + n, c = *cursor;
            while (c < t->listed_len && t->listed[c] < first)
                c++;
            float raw[BLOCK];
            int reloaded = 0;
            for (; c < t->listed_len && t->listed[c] < last; c++) {
                if (!reloaded) {
                    load_block(raw, job->in[k] + start * itemsize(job->in_dtype[k]), job->in_dtype[k], n, conv);
                    reloaded = 1;
                }
                Py_ssize_t i = (Py_ssize_t)(t->listed[c] - first);
                d[i] = raw[i] - b[i];
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
            trimmed_block(job->work + (size_t)k * BLOCK, b, job, k, start, n, &cursor[k], &conv);
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

/* ---- DARE masks: torch.rand's numbers without torch ---------------------------------------- */

/* torch's CPU generator is MT19937 seeded with the low 32 bits of the seed; torch.rand(float32)
   takes the low 24 bits of each 32-bit draw times 2^-24. So keep = u < density is
   (draw & 0xffffff) * 2^-24 < (float)density, decided in float32 as torch does. */
typedef struct {
    uint32_t state[624];
    int index;
} Mt19937;

static void mt_seed(Mt19937 *mt, uint32_t seed) {
    mt->state[0] = seed;
    for (int j = 1; j < 624; j++)
        mt->state[j] = 1812433253u * (mt->state[j - 1] ^ (mt->state[j - 1] >> 30)) + (uint32_t)j;
    mt->index = 624;
}

static void mt_twist(Mt19937 *mt) {
    uint32_t *s = mt->state;
    int k = 0;
    for (; k < 624 - 397; k++) {
        uint32_t y = (s[k] & 0x80000000u) | (s[k + 1] & 0x7fffffffu);
        s[k] = s[k + 397] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
    }
    for (; k < 623; k++) {
        uint32_t y = (s[k] & 0x80000000u) | (s[k + 1] & 0x7fffffffu);
        s[k] = s[k + 397 - 624] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
    }
    uint32_t y = (s[623] & 0x80000000u) | (s[0] & 0x7fffffffu);
    s[623] = s[396] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
    mt->index = 0;
}

/* Fills keep[0..n) for draws [skip, skip + n) of the stream seeded by seed. */
static void mt_mask(uint8_t *keep, uint32_t seed, Py_ssize_t skip, Py_ssize_t n, float density) {
    Mt19937 mt;
    mt_seed(&mt, seed);
    Py_ssize_t pos = 0;
    while (pos + 624 <= skip) { /* whole twists that are skipped still have to be computed */
        mt_twist(&mt);
        pos += 624;
    }
    mt_twist(&mt);
    Py_ssize_t i = skip - pos, done = 0;
    while (done < n) {
        if (i == 624) {
            mt_twist(&mt);
            i = 0;
        }
        Py_ssize_t take = 624 - i < n - done ? 624 - i : n - done;
        for (Py_ssize_t j = 0; j < take; j++) {
            uint32_t y = mt.state[i + j];
            y ^= y >> 11;
            y ^= (y << 7) & 0x9d2c5680u;
            y ^= (y << 15) & 0xefc60000u;
            y ^= y >> 18;
            keep[done + j] = (float)(y & 0xffffffu) * 0x1p-24f < density;
        }
        i += take;
        done += take;
    }
}

/* ---- tie selection: libstdc++'s std::sort, followed only where a window edge lies ------------ */

typedef struct {
    float v;
    uint32_t i;
} Entry;

/* comp(a, b) of torch's KeyValueCompDesc / KeyValueCompAsc (no NaN here: inputs are finite) */
#define TIE_LESS(desc, a, b) ((desc) ? (a).v > (b).v : (a).v < (b).v)

static void entry_swap(Entry *a, Entry *b) {
    Entry t = *a;
    *a = *b;
    *b = t;
}

static void move_median_to_first(Entry *result, Entry *a, Entry *b, Entry *c, int desc) {
    if (TIE_LESS(desc, *a, *b)) {
        if (TIE_LESS(desc, *b, *c))
            entry_swap(result, b);
        else if (TIE_LESS(desc, *a, *c))
            entry_swap(result, c);
        else
            entry_swap(result, a);
    } else if (TIE_LESS(desc, *a, *c))
        entry_swap(result, a);
    else if (TIE_LESS(desc, *b, *c))
        entry_swap(result, c);
    else
        entry_swap(result, b);
}

#define PART_BLOCK 64

/* std::__unguarded_partition. The k-th entry from the left that may not stay left is swapped with the
   k-th from the right that may not stay right, as long as they have not crossed: far from the
   crossing, those entries are found branch-free 64 at a time on each side (as BlockQuicksort does)
   and swapped pair by pair in the same order; the scalar loop then finishes from the same state. */
static Entry *unguarded_partition(Entry *first, Entry *last, Entry *pivot, int desc) {
    const Entry p = *pivot;
    uint8_t left[PART_BLOCK], right[PART_BLOCK];
    int n_left = 0, s_left = 0, n_right = 0, s_right = 0;
    Entry *l = first, *r = last, *left_base = first, *right_base = last; /* [l, r): not scanned yet */
    while (r - l >= 2 * PART_BLOCK) {
        if (n_left == 0) {
            left_base = l;
            s_left = 0;
            for (int k = 0; k < PART_BLOCK; k++) {
                left[n_left] = (uint8_t)k;
                n_left += !TIE_LESS(desc, l[k], p);
            }
            l += PART_BLOCK;
        }
        if (n_right == 0) {
            right_base = r;
            s_right = 0;
            for (int k = 0; k < PART_BLOCK; k++) {
                right[n_right] = (uint8_t)k;
                n_right += !TIE_LESS(desc, p, r[-1 - k]);
            }
            r -= PART_BLOCK;
        }
        int m = n_left < n_right ? n_left : n_right;
        for (int t = 0; t < m; t++)
            entry_swap(left_base + left[s_left + t], right_base - 1 - right[s_right + t]);
        s_left += m;
        n_left -= m;
        s_right += m;
        n_right -= m;
    }
    first = n_left ? left_base + left[s_left] : l;
    last = n_right ? right_base - right[s_right] : r;
    while (1) {
        while (TIE_LESS(desc, *first, *pivot))
            ++first;
        --last;
        while (TIE_LESS(desc, *pivot, *last))
            --last;
        if (!(first < last))
            return first;
        entry_swap(first, last);
        ++first;
    }
}

static void insertion_sort(Entry *first, Entry *last, int desc) {
    if (first == last)
        return;
    for (Entry *i = first + 1; i != last; ++i) {
        Entry val = *i;
        if (TIE_LESS(desc, val, *first)) {
            memmove(first + 1, first, (size_t)(i - first) * sizeof(Entry));
            *first = val;
        } else {
            Entry *hole = i, *next = i - 1;
            while (TIE_LESS(desc, val, *next)) {
                *hole = *next;
                hole = next;
                --next;
            }
            *hole = val;
        }
    }
}

static void push_heap(Entry *first, Py_ssize_t hole, Py_ssize_t top, Entry value, int desc) {
    Py_ssize_t parent = (hole - 1) / 2;
    while (hole > top && TIE_LESS(desc, first[parent], value)) {
        first[hole] = first[parent];
        hole = parent;
        parent = (hole - 1) / 2;
    }
    first[hole] = value;
}

static void adjust_heap(Entry *first, Py_ssize_t hole, Py_ssize_t len, Entry value, int desc) {
    Py_ssize_t top = hole, child = hole;
    while (child < (len - 1) / 2) {
        child = 2 * (child + 1);
        if (TIE_LESS(desc, first[child], first[child - 1]))
            child--;
        first[hole] = first[child];
        hole = child;
    }
    if ((len & 1) == 0 && child == (len - 2) / 2) {
        child = 2 * (child + 1);
        first[hole] = first[child - 1];
        hole = child - 1;
    }
    push_heap(first, hole, top, value, desc);
}

/* std::__partial_sort(first, last, last): make_heap then sort_heap */
static void heap_sort(Entry *first, Entry *last, int desc) {
    Py_ssize_t len = last - first;
    if (len >= 2) {
        for (Py_ssize_t parent = (len - 2) / 2;; parent--) {
            adjust_heap(first, parent, len, first[parent], desc);
            if (parent == 0)
                break;
        }
    }
    while (last - first > 1) {
        --last;
        Entry value = *last;
        *last = *first;
        adjust_heap(first, 0, last - first, value, desc);
    }
}

static int holds_edge(const Entry *base, const Entry *first, const Entry *last, const Py_ssize_t *edges, int n_edges) {
    for (int e = 0; e < n_edges; e++)
        if (base + edges[e] > first && base + edges[e] < last)
            return 1;
    return 0;
}

/* std::__introsort_loop, recursing only into ranges that hold an edge: elsewhere the set of
   entries on each side of an edge is already final, which is all the window needs. Leaves of
   at most 16 get the final insertion sort's effect (it never moves an entry across a partition). */
static void select_loop(Entry *base, Entry *first, Entry *last, int depth, const Py_ssize_t *edges, int n_edges, int desc) {
    while (last - first > 16) {
        if (!holds_edge(base, first, last, edges, n_edges))
            return;
        if (depth == 0) {
            heap_sort(first, last, desc);
            return;
        }
        --depth;
        Entry *mid = first + (last - first) / 2;
        move_median_to_first(first, first + 1, mid, last - 1, desc);
        Entry *cut = unguarded_partition(first + 1, last, first, desc);
        select_loop(base, cut, last, depth, edges, n_edges, desc);
        last = cut;
    }
    if (holds_edge(base, first, last, edges, n_edges))
        insertion_sort(first, last, desc);
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

/* ---- dispatch and argument handling ------------------------------------------------------ */

#ifdef DW_X86_DISPATCH
__attribute__((target("avx2,fma,f16c"))) static Py_ssize_t histogram_avx2(const HistJob *job) { return histogram_body(job); }
__attribute__((target("avx2,fma,f16c"))) static Py_ssize_t sparse_avx2(const SparseJob *job) { return sparse_body(job); }
__attribute__((target("avx2,fma,f16c"))) static void l1_avx2(const HistJob *job, const uint8_t *const *masks, double *before,
                                                              double *after) { l1_body(job, masks, before, after); }
#endif

static void l1_kernel(const HistJob *job, const uint8_t *const *masks, double *before, double *after) {
#ifdef DW_X86_DISPATCH
    if (use_avx2 > 0) {
        l1_avx2(job, masks, before, after);
        return;
    }
#endif
    l1_body(job, masks, before, after);
}

static Py_ssize_t histogram_kernel(const HistJob *job) {
#ifdef DW_X86_DISPATCH
    if (use_avx2 > 0)
        return histogram_avx2(job);
#endif
    return histogram_body(job);
}

static Py_ssize_t sparse_kernel(const SparseJob *job) {
#ifdef DW_X86_DISPATCH
    if (use_avx2 > 0)
        return sparse_avx2(job);
#endif
    return sparse_body(job);
}

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

PyDoc_STRVAR(delta_histogram_doc,
"delta_histogram(base, base_dtype, inputs, dtypes, counts, highs, gathers) -> int\n\n"
"For each model k with counts[k] not None (int64, writable): counts of the upper 16 bits of the float32\n"
"bits of |x_k - b| (highs[k] < 0, 32768 bins), or of the lower 16 bits of the entries whose upper bits\n"
"are highs[k] (65536 bins), added to counts[k]. gathers[k], when not None (float32, writable), receives\n"
"|x_k - b|. base None: inputs is one float32 buffer of magnitudes, counted as they are.\n"
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
    if (base == Py_None) { /* one input of float32 magnitudes */
        job.magnitudes = 1;
        PyObject *first = PySequence_Size(inputs) == 1 ? PySequence_GetItem(inputs, 0) : NULL;
        if (first == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "without a base, one input of float32 magnitudes");
            goto done;
        }
        job.in[0] = hold(&held, first, 0, 0, "magnitudes");
        Py_DECREF(first);
        if (job.in[0] == NULL)
            goto done;
        job.n = held.views[0].len / 4;
        job.count = 1;
        job.in_dtype[0] = DT_F32;
    } else {
        job.base = hold(&held, base, 0, 0, "base");
        if (job.base == NULL)
            goto done;
        job.base_dtype = base_dtype;
        job.n = held.views[0].len / itemsize(base_dtype);
        if (take_models(&held, inputs, dtypes, job.n, &job.count, job.in, job.in_dtype) < 0)
            goto done;
    }
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
"             divisor, scale, offset) -> int\n\n"
"out = cast(b + scale * aggregate_k(w_k * rescale(trim(x_k - b)))): sparsify.combine's arithmetic.\n"
"trims[k] = (weight, mode 0 none/1 window/2 mask, lower, upper, listed int64 indices or None, uint8 mask or\n"
"None, rescale 0 none/1 multiply/2 divide, factor). consensus: sign election and disjoint merge (divided by\n"
"the agreeing weights if normalize); else a sum divided by divisor (None: not divided). scale None: not\n"
"scaled. offset: flat index of out's first entry in the tensor (for listed). Returns the non-finite count.");

static PyObject *py_sparse_merge(PyObject *self, PyObject *args) {
    PyObject *out, *base, *inputs, *dtypes, *trims, *divisor, *scale;
    int out_dtype, base_dtype, consensus, zero_positive, normalize;
    Py_ssize_t offset;
    if (!PyArg_ParseTuple(args, "OiOiOOOpppOOn", &out, &out_dtype, &base, &base_dtype, &inputs, &dtypes, &trims,
                          &consensus, &zero_positive, &normalize, &divisor, &scale, &offset))
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

PyDoc_STRVAR(dare_mask_doc,
"dare_mask(out, seeds, skips, lengths, density) -> None\n\n"
"out (uint8, writable) receives, segment after segment, keep = u < density for the draws [skip, skip +\n"
"length) of torch.rand(generator=torch.Generator().manual_seed(seed)) (float32): segment j uses seeds[j].");

static PyObject *py_dare_mask(PyObject *self, PyObject *args) {
    PyObject *out, *seeds, *skips, *lengths;
    double density;
    if (!PyArg_ParseTuple(args, "OOOOd", &out, &seeds, &skips, &lengths, &density))
        return NULL;
    Py_ssize_t parts = PySequence_Size(seeds);
    if (parts < 0 || PySequence_Size(skips) != parts || PySequence_Size(lengths) != parts) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "seeds, skips and lengths must have the same length");
        return NULL;
    }
    uint32_t *seed = malloc((size_t)(parts + 1) * sizeof(uint32_t));
    Py_ssize_t *skip = malloc((size_t)(parts + 1) * sizeof(Py_ssize_t)), *length = malloc((size_t)(parts + 1) * sizeof(Py_ssize_t));
    Held held = {.held = 0};
    PyObject *result = NULL;
    Py_ssize_t total = 0;
    if (!seed || !skip || !length) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t j = 0; j < parts; j++) {
        PyObject *a = PySequence_GetItem(seeds, j), *b = PySequence_GetItem(skips, j), *c = PySequence_GetItem(lengths, j);
        seed[j] = a ? (uint32_t)(PyLong_AsUnsignedLongLongMask(a) & 0xffffffffu) : 0;
        skip[j] = b ? PyLong_AsSsize_t(b) : -1;
        length[j] = c ? PyLong_AsSsize_t(c) : -1;
        Py_XDECREF(a);
        Py_XDECREF(b);
        Py_XDECREF(c);
        if (PyErr_Occurred())
            goto done;
        if (skip[j] < 0 || length[j] < 0) {
            PyErr_SetString(PyExc_ValueError, "skips and lengths must be non-negative");
            goto done;
        }
        total += length[j];
    }
    uint8_t *keep = hold(&held, out, 1, total, "out");
    if (keep == NULL)
        goto done;
    float dens = (float)density;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t j = 0, pos = 0; j < parts; pos += length[j], j++)
        mt_mask(keep + pos, seed[j], skip[j], length[j], dens);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    release_all(&held);
    free(seed);
    free(skip);
    free(length);
    return result;
}

PyDoc_STRVAR(tie_select_doc,
"tie_select(magnitudes, descending, start, stop, boundaries, out) -> int\n\n"
"The flat indices of the entries that torch.sort(magnitudes, descending) (CPU, not stable) places at\n"
"positions [start, stop) and whose value is one of boundaries, written to out (int64, writable) in no\n"
"particular order; returns how many. magnitudes: float32, finite, fewer than 2**32 entries.");

static PyObject *py_tie_select(PyObject *self, PyObject *args) {
    PyObject *magnitudes, *boundaries, *out;
    int descending;
    Py_ssize_t start, stop;
    if (!PyArg_ParseTuple(args, "OpnnOO", &magnitudes, &descending, &start, &stop, &boundaries, &out))
        return NULL;
    Held held = {.held = 0};
    PyObject *result = NULL;
    Entry *entries = NULL;
    float bounds[2];
    Py_ssize_t n_bounds = PySequence_Size(boundaries);
    if (n_bounds < 1 || n_bounds > 2) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "one or two boundary values");
        return NULL;
    }
    for (Py_ssize_t j = 0; j < n_bounds; j++) {
        PyObject *item = PySequence_GetItem(boundaries, j);
        bounds[j] = item ? (float)PyFloat_AsDouble(item) : 0.0f;
        Py_XDECREF(item);
        if (PyErr_Occurred())
            return NULL;
    }
    const float *values = hold(&held, magnitudes, 0, 0, "magnitudes");
    if (values == NULL)
        goto done;
    Py_ssize_t n = held.views[0].len / 4;
    int64_t *kept = hold(&held, out, 1, 0, "out");
    if (kept == NULL)
        goto done;
    Py_ssize_t capacity = held.views[1].len / 8, found = 0;
    if ((uint64_t)n >= ((uint64_t)1 << 32) || start < 0 || stop < start || stop > n) {
        PyErr_SetString(PyExc_ValueError, "bad window or too many entries");
        goto done;
    }
    entries = malloc((size_t)(n ? n : 1) * sizeof(Entry));
    if (entries == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        entries[i].v = values[i];
        entries[i].i = (uint32_t)i;
    }
    Py_ssize_t edges[2] = {start, stop};
    int depth = 0;
    for (Py_ssize_t m = n; m > 1; m >>= 1)
        depth++;
    select_loop(entries, entries, entries + n, 2 * depth, edges, 2, descending);
    for (Py_ssize_t p = start; p < stop; p++) {
        float v = entries[p].v;
        if (v == bounds[0] || (n_bounds > 1 && v == bounds[1])) {
            if (found < capacity)
                kept[found] = entries[p].i;
            found++;
        }
    }
    Py_END_ALLOW_THREADS
    if (found > capacity) {
        PyErr_Format(PyExc_ValueError, "out holds %zd indices, %zd needed", capacity, found);
        goto done;
    }
    result = PyLong_FromSsize_t(found);
done:
    free(entries);
    release_all(&held);
    return result;
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
    job.base = hold(&held, base, 0, 0, "base");
    if (job.base == NULL)
        goto done;
    job.base_dtype = base_dtype;
    job.n = held.views[0].len / itemsize(base_dtype);
    if (take_models(&held, inputs, dtypes, job.n, &job.count, job.in, job.in_dtype) < 0)
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
