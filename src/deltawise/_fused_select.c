/* The tie order of torch's CPU sort without a whole sort; see _fused_sparse.c. */

/* ---- tie selection: libstdc++'s std::sort, followed only where a window edge lies ------------
 *
 * torch.sort / argsort on the CPU (not stable) run std::sort over (value, index) pairs compared by
 * value alone, so which of several equal values lands where depends on every value of the tensor.
 * The code below runs the same introsort (same pivots, same comparisons, same moves), but on one
 * uint32 key per entry instead of an 8-byte pair, in place:
 *
 * - a key is the float32 bit pattern of the magnitude: for non-negative floats the bit patterns
 *   order like the values, so comparing keys as integers is comparing the values;
 * - only the entries equal to a window's boundary value need an identity (every other entry in the
 *   window is kept whatever its place), so the T entries equal to boundary value B get the keys
 *   B .. B + T - 1 in flat-index order, and every comparison treats that range as one value; to make
 *   room, every key above B moves up by n - 1 (so keys fit in 32 bits for fewer than 2**30 entries),
 *   in the same pass that copies nothing: the keys are computed in place of the float32 bits (or by the
 *   second radix pass, magnitude_bins in _fused_stats.c, which reads every magnitude anyway: all but the
 *   entries of the boundaries' upper bins, which finish_keys makes from their listed positions);
 * - after the selection, a key in the window that lies in a range names its entry: idx[key - base].
 */

typedef uint32_t Key;

typedef struct {
    int n;
    Key lo[2], hi[2]; /* keys lo[j] .. hi[j] stand for one value */
} Ranges;

DW_INLINE Key range_lo(const Ranges *r, Key k) {
    for (int j = 0; j < r->n; j++)
        if (k - r->lo[j] <= r->hi[j] - r->lo[j])
            return r->lo[j];
    return k;
}

DW_INLINE Key range_hi(const Ranges *r, Key k) {
    for (int j = 0; j < r->n; j++)
        if (k - r->lo[j] <= r->hi[j] - r->lo[j])
            return r->hi[j];
    return k;
}

/* comp(a, b) of torch's KeyValueCompDesc / KeyValueCompAsc on the values the keys stand for (finite) */
#define KEY_LESS(desc, r, a, b) ((desc) ? range_lo((r), (a)) > range_lo((r), (b)) : range_lo((r), (a)) < range_lo((r), (b)))

DW_INLINE void key_swap(Key *a, Key *b) {
    Key t = *a;
    *a = *b;
    *b = t;
}

DW_INLINE void move_median_to_first(Key *result, Key *a, Key *b, Key *c, int desc, const Ranges *r) {
    if (KEY_LESS(desc, r, *a, *b)) {
        if (KEY_LESS(desc, r, *b, *c))
            key_swap(result, b);
        else if (KEY_LESS(desc, r, *a, *c))
            key_swap(result, c);
        else
            key_swap(result, a);
    } else if (KEY_LESS(desc, r, *a, *c))
        key_swap(result, a);
    else if (KEY_LESS(desc, r, *b, *c))
        key_swap(result, c);
    else
        key_swap(result, b);
}

#define PART_BLOCK 64

/* Offsets (0 .. 63) of the entries of a 64-entry block that may not stay on their side, ascending: on the
   left, of l[0 .. 64) that are >= lo (descending: <= hi); on the right, the k such that r[-1 - k] is <= hi
   (descending: >= lo). Returns how many; `offsets` holds 8 bytes of slack. */
DW_INLINE int stoppers_scalar(const Key *block, int right, Key bound, int at_least, uint8_t *offsets) {
    int count = 0;
    for (int k = 0; k < PART_BLOCK; k++) {
        Key x = right ? block[-1 - k] : block[k];
        offsets[count] = (uint8_t)k;
        count += at_least ? x >= bound : x <= bound;
    }
    return count;
}

static uint8_t set_bits[256][8]; /* positions of the set bits of a byte, ascending (also della's line_keep) */
static uint8_t set_bits_reversed[256][8]; /* 7 - position, for the bits from the highest down */

static void init_set_bits(void) {
    for (int m = 0; m < 256; m++) {
        int c = 0, d = 0;
        for (int b = 0; b < 8; b++)
            if (m >> b & 1)
                set_bits[m][c++] = (uint8_t)b;
        for (int b = 7; b >= 0; b--)
            if (m >> b & 1)
                set_bits_reversed[m][d++] = (uint8_t)(7 - b);
    }
}

#ifdef DW_X86_DISPATCH
#include <immintrin.h>

/* stoppers_scalar with 8-entry compares and the offsets of each byte of the mask from a table */
__attribute__((target("avx2"))) static inline int stoppers_avx2(const Key *block, int right, Key bound, int at_least,
                                                               uint8_t *offsets) {
    const Key *first = right ? block - PART_BLOCK : block;
    __m256i b = _mm256_set1_epi32((int)bound);
    uint64_t mask = 0; /* bit j: first[j] may not stay */
    for (int j = 0; j < PART_BLOCK / 8; j++) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(first + 8 * j));
        __m256i keep = _mm256_cmpeq_epi32(at_least ? _mm256_max_epu32(x, b) : _mm256_min_epu32(x, b), x);
        mask |= (uint64_t)(uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(keep)) << (8 * j);
    }
    int count = 0;
    for (int j = 0; j < PART_BLOCK / 8; j++) {
        /* left: byte j holds offsets 8j ..; right: offset k is entry 63 - k, so byte 7 - j holds offsets 8j .. */
        unsigned m = right ? (unsigned)(mask >> (8 * (7 - j))) & 0xffu : (unsigned)(mask >> (8 * j)) & 0xffu;
        uint64_t add = 0x0101010101010101ull * (uint64_t)(8 * j), list;
        memcpy(&list, right ? set_bits_reversed[m] : set_bits[m], 8);
        list += add;
        memcpy(offsets + count, &list, 8);
        count += __builtin_popcount(m);
    }
    return count;
}
#endif

/* std::__unguarded_partition. The k-th entry from the left that may not stay left is swapped with the
   k-th from the right that may not stay right, as long as they have not crossed: far from the
   crossing, those entries are found branch-free 64 at a time on each side (as BlockQuicksort does)
   and swapped pair by pair in the same order; the scalar loop then finishes from the same state.
   Against the pivot's value (keys lo .. hi), an entry x stays left when x < lo (descending: x > hi)
   and stays right when x > hi (descending: x < lo). */
DW_INLINE Key *unguarded_partition(Key *first, Key *last, const Key *pivot, int desc, int simd, const Ranges *r) {
    const Key lo = range_lo(r, *pivot), hi = range_hi(r, *pivot);
    uint8_t left[PART_BLOCK + 8], right[PART_BLOCK + 8];
    int n_left = 0, s_left = 0, n_right = 0, s_right = 0;
    Key *l = first, *rt = last, *left_base = first, *right_base = last; /* [l, rt): not scanned yet */
    (void)simd;
    while (rt - l >= 2 * PART_BLOCK) {
        if (n_left == 0) {
            left_base = l;
            s_left = 0;
#ifdef DW_X86_DISPATCH
            if (simd)
                n_left = stoppers_avx2(l, 0, desc ? hi : lo, !desc, left);
            else
#endif
                n_left = stoppers_scalar(l, 0, desc ? hi : lo, !desc, left);
            l += PART_BLOCK;
        }
        if (n_right == 0) {
            right_base = rt;
            s_right = 0;
#ifdef DW_X86_DISPATCH
            if (simd)
                n_right = stoppers_avx2(rt, 1, desc ? lo : hi, desc, right);
            else
#endif
                n_right = stoppers_scalar(rt, 1, desc ? lo : hi, desc, right);
            rt -= PART_BLOCK;
        }
        int m = n_left < n_right ? n_left : n_right;
        for (int t = 0; t < m; t++)
            key_swap(left_base + left[s_left + t], right_base - 1 - right[s_right + t]);
        s_left += m;
        n_left -= m;
        s_right += m;
        n_right -= m;
    }
    first = n_left ? left_base + left[s_left] : l;
    last = n_right ? right_base - right[s_right] : rt;
    while (1) {
        while (desc ? *first > hi : *first < lo)
            ++first;
        --last;
        while (desc ? *last < lo : *last > hi)
            --last;
        if (!(first < last))
            return first;
        key_swap(first, last);
        ++first;
    }
}

static void insertion_sort(Key *first, Key *last, int desc, const Ranges *r) {
    if (first == last)
        return;
    for (Key *i = first + 1; i != last; ++i) {
        Key val = *i;
        if (KEY_LESS(desc, r, val, *first)) {
            memmove(first + 1, first, (size_t)(i - first) * sizeof(Key));
            *first = val;
        } else {
            Key *hole = i, *next = i - 1;
            while (KEY_LESS(desc, r, val, *next)) {
                *hole = *next;
                hole = next;
                --next;
            }
            *hole = val;
        }
    }
}

static void push_heap(Key *first, Py_ssize_t hole, Py_ssize_t top, Key value, int desc, const Ranges *r) {
    Py_ssize_t parent = (hole - 1) / 2;
    while (hole > top && KEY_LESS(desc, r, first[parent], value)) {
        first[hole] = first[parent];
        hole = parent;
        parent = (hole - 1) / 2;
    }
    first[hole] = value;
}

static void adjust_heap(Key *first, Py_ssize_t hole, Py_ssize_t len, Key value, int desc, const Ranges *r) {
    Py_ssize_t top = hole, child = hole;
    while (child < (len - 1) / 2) {
        child = 2 * (child + 1);
        if (KEY_LESS(desc, r, first[child], first[child - 1]))
            child--;
        first[hole] = first[child];
        hole = child;
    }
    if ((len & 1) == 0 && child == (len - 2) / 2) {
        child = 2 * (child + 1);
        first[hole] = first[child - 1];
        hole = child - 1;
    }
    push_heap(first, hole, top, value, desc, r);
}

/* std::__partial_sort(first, last, last): make_heap then sort_heap */
static void heap_sort(Key *first, Key *last, int desc, const Ranges *r) {
    Py_ssize_t len = last - first;
    if (len >= 2) {
        for (Py_ssize_t parent = (len - 2) / 2;; parent--) {
            adjust_heap(first, parent, len, first[parent], desc, r);
            if (parent == 0)
                break;
        }
    }
    while (last - first > 1) {
        --last;
        Key value = *last;
        *last = *first;
        adjust_heap(first, 0, last - first, value, desc, r);
    }
}

static int holds_edge(const Key *base, const Key *first, const Key *last, const Py_ssize_t *edges, int n_edges) {
    for (int e = 0; e < n_edges; e++)
        if (base + edges[e] > first && base + edges[e] < last)
            return 1;
    return 0;
}

/* std::__introsort_loop, recursing only into ranges that hold an edge: elsewhere the set of
   entries on each side of an edge is already final, which is all the window needs. Leaves of
   at most 16 get the final insertion sort's effect (it never moves an entry across a partition).
   desc is a constant in each caller below, so the partition is compiled once per order. */
DW_INLINE void select_body(Key *base, Key *first, Key *last, int depth, const Py_ssize_t *edges, int n_edges, int desc,
                           int simd, const Ranges *r,
                           void (*recurse)(Key *, Key *, Key *, int, const Py_ssize_t *, int, const Ranges *)) {
    while (last - first > 16) {
        if (!holds_edge(base, first, last, edges, n_edges))
            return;
        if (depth == 0) {
            heap_sort(first, last, desc, r);
            return;
        }
        --depth;
        Key *mid = first + (last - first) / 2;
        move_median_to_first(first, first + 1, mid, last - 1, desc, r);
        Key *cut = unguarded_partition(first + 1, last, first, desc, simd, r);
        recurse(base, cut, last, depth, edges, n_edges, r);
        last = cut;
    }
    if (holds_edge(base, first, last, edges, n_edges))
        insertion_sort(first, last, desc, r);
}

typedef void (*SelectFn)(Key *, Key *, Key *, int, const Py_ssize_t *, int, const Ranges *);

static void select_desc(Key *base, Key *first, Key *last, int depth, const Py_ssize_t *edges, int n_edges, const Ranges *r) {
    select_body(base, first, last, depth, edges, n_edges, 1, 0, r, select_desc);
}

static void select_asc(Key *base, Key *first, Key *last, int depth, const Py_ssize_t *edges, int n_edges, const Ranges *r) {
    select_body(base, first, last, depth, edges, n_edges, 0, 0, r, select_asc);
}

#ifdef DW_X86_DISPATCH
__attribute__((target("avx2"))) static void select_desc_avx2(Key *base, Key *first, Key *last, int depth,
                                                             const Py_ssize_t *edges, int n_edges, const Ranges *r) {
    select_body(base, first, last, depth, edges, n_edges, 1, 1, r, select_desc_avx2);
}

__attribute__((target("avx2"))) static void select_asc_avx2(Key *base, Key *first, Key *last, int depth,
                                                            const Py_ssize_t *edges, int n_edges, const Ranges *r) {
    select_body(base, first, last, depth, edges, n_edges, 0, 1, r, select_asc_avx2);
}
#endif

static SelectFn select_fn(int descending) {
#ifdef DW_X86_DISPATCH
    if (use_avx2 > 0)
        return descending ? select_desc_avx2 : select_asc_avx2;
#endif
    return descending ? select_desc : select_asc;
}

/* ---- the keys ------------------------------------------------------------------------------ */

typedef struct {
    int n;                 /* boundaries with at least one entry equal to them, ascending */
    Py_ssize_t ties[2];    /* entries equal to each */
    Key base[2];           /* first key of each one's range */
    uint32_t *index[2];    /* flat index of each tag (tied entry), ascending */
    Py_ssize_t capacity[2];
} Tied;

/* records tied entry i of boundary j, tagged with its rank among them; -1 on a failed allocation */
static int tag(Tied *tied, int j, Py_ssize_t i, Key *key) {
    Py_ssize_t t = tied->ties[j];
    if (t == tied->capacity[j]) {
        Py_ssize_t grown = t ? 2 * t : 1024;
        uint32_t *index = realloc(tied->index[j], (size_t)grown * sizeof(uint32_t));
        if (index == NULL)
            return -1;
        tied->index[j] = index;
        tied->capacity[j] = grown;
    }
    tied->index[j][t] = (uint32_t)i;
    *key = tied->base[j] + (Key)t;
    tied->ties[j] = t + 1;
    return 0;
}

/* keeps the boundaries that have tied entries; returns 0 */
static int keep_tied_boundaries(Tied *tied, int nb) {
    tied->n = 0;
    for (int j = 0; j < nb; j++)
        if (tied->ties[j] > 0) {
            int m = tied->n++;
            tied->ties[m] = tied->ties[j];
            tied->base[m] = tied->base[j];
            if (m != j) {
                tied->index[m] = tied->index[j];
                tied->index[j] = NULL;
            }
        }
    return 0;
}

/* The keys (see the top of this file): a key above b0 moves up by `shift` (at least the number of entries, so at
   least the ties of that value less one), above b1 by as much again; the entries equal to b0 / b1 get the keys
   base[0], base[0] + 1, ... / base[1], ... in flat-index order, base[0] = b0 and base[1] = b1 + shift (n < 2**30: no
   key overflows). With one boundary b1 is 2**32 - 1, above every key. */
typedef struct {
    Key shift, b0, b1;
} KeyRule;

static KeyRule key_rule(Py_ssize_t n, const Key *bounds, int nb, Tied *tied) {
    KeyRule rule = {(Key)(n > 1 ? n - 1 : 0), bounds[0], nb > 1 ? bounds[1] : 0xffffffffu};
    tied->base[0] = rule.b0;
    tied->base[1] = nb > 1 ? rule.b1 + rule.shift : 0xffffffffu; /* bounds[1]'s entries, moved up once */
    return rule;
}

/* keys[j]'s key, from its float32 bits, tagged when it equals a boundary; -1 on a failed allocation */
DW_INLINE int make_key(Key *keys, Py_ssize_t j, const KeyRule *rule, Tied *tied) {
    Key k = keys[j];
    keys[j] = k + (rule->shift & (0u - (Key)(k > rule->b0))) + (rule->shift & (0u - (Key)(k > rule->b1)));
    return k == rule->b0 ? tag(tied, 0, j, &keys[j]) : k == rule->b1 ? tag(tied, 1, j, &keys[j]) : 0;
}

/* The keys, in one pass over the float32 bits in place (key_rule). Returns 0, -1 on a failed allocation, -2 when a
   key is not that of a finite non-negative float. */
DW_INLINE int prepare_keys_body(Key *keys, Py_ssize_t n, const Key *bounds, int nb, Tied *tied) {
    const KeyRule rule = key_rule(n, bounds, nb, tied);
    const Key shift = rule.shift, b0 = rule.b0, b1 = rule.b1, find1 = tied->base[1]; /* no key is 2**32 - 1 */
    Key largest = 0;
    for (Py_ssize_t i = 0; i < n; i += 16) {
        Py_ssize_t stop = i + 16 < n ? i + 16 : n;
        Key any = 0;
        for (Py_ssize_t j = i; j < stop; j++) {
            Key k = keys[j];
            largest = k > largest ? k : largest;
            any |= (Key)(k == b0) | (Key)(k == b1);
            keys[j] = k + (shift & (0u - (Key)(k > b0))) + (shift & (0u - (Key)(k > b1)));
        }
        if (!any) /* few entries are tied: tested 16 at once */
            continue;
        for (Py_ssize_t j = i; j < stop; j++) {
            Key k = keys[j];
            if (k == b0 ? tag(tied, 0, j, &keys[j]) < 0 : k == find1 && tag(tied, 1, j, &keys[j]) < 0)
                return -1;
        }
    }
    if (largest >= 0x7f800000u)
        return -2;
    return keep_tied_boundaries(tied, nb);
}

#ifdef DW_X86_DISPATCH
/* prepare_keys_body 16 keys a step with whole-vector compares: the compiler's copy of the body vectorised
   each 16-entry group on its own, with a vector prologue and epilogue and two reductions per group (about
   0.75 ns an entry against 0.6 here, on a 16M-entry tensor of the 1B benchmark). The same keys and tags. */
__attribute__((target("avx2"))) static int prepare_keys_avx2(Key *keys, Py_ssize_t n, const Key *bounds, int nb,
                                                             Tied *tied) {
    const KeyRule rule = key_rule(n, bounds, nb, tied);
    const Key shift = rule.shift, b0 = rule.b0, b1 = rule.b1, find1 = tied->base[1];
    /* a valid key is below 2**31, so signed compares order it as unsigned ones do; with one boundary the second
       compare is against 2**31 - 1, which no valid key exceeds (an invalid key makes the call fail anyway) */
    const __m256i vb0 = _mm256_set1_epi32((int)b0), vb1 = _mm256_set1_epi32((int)b1);
    const __m256i above1 = _mm256_set1_epi32((int)(nb > 1 ? b1 : 0x7fffffffu)), vshift = _mm256_set1_epi32((int)shift);
    __m256i largest8 = _mm256_setzero_si256();
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i k0 = _mm256_loadu_si256((const __m256i *)(keys + i)), k1 = _mm256_loadu_si256((const __m256i *)(keys + i + 8));
        largest8 = _mm256_max_epu32(largest8, _mm256_max_epu32(k0, k1));
        __m256i tied8 = _mm256_or_si256(_mm256_or_si256(_mm256_cmpeq_epi32(k0, vb0), _mm256_cmpeq_epi32(k1, vb0)),
                                        _mm256_or_si256(_mm256_cmpeq_epi32(k0, vb1), _mm256_cmpeq_epi32(k1, vb1)));
        __m256i up0 = _mm256_add_epi32(_mm256_and_si256(vshift, _mm256_cmpgt_epi32(k0, vb0)),
                                       _mm256_and_si256(vshift, _mm256_cmpgt_epi32(k0, above1)));
        __m256i up1 = _mm256_add_epi32(_mm256_and_si256(vshift, _mm256_cmpgt_epi32(k1, vb0)),
                                       _mm256_and_si256(vshift, _mm256_cmpgt_epi32(k1, above1)));
        _mm256_storeu_si256((__m256i *)(keys + i), _mm256_add_epi32(k0, up0));
        _mm256_storeu_si256((__m256i *)(keys + i + 8), _mm256_add_epi32(k1, up1));
        if (!_mm256_testz_si256(tied8, tied8)) /* few entries are tied */
            for (Py_ssize_t j = i; j < i + 16; j++) {
                Key k = keys[j];
                if (k == b0 ? tag(tied, 0, j, &keys[j]) < 0 : k == find1 && tag(tied, 1, j, &keys[j]) < 0)
                    return -1;
            }
    }
    Key lanes[8], largest = 0;
    _mm256_storeu_si256((__m256i *)lanes, largest8);
    for (int j = 0; j < 8; j++)
        largest = lanes[j] > largest ? lanes[j] : largest;
    for (; i < n; i++) {
        largest = keys[i] > largest ? keys[i] : largest;
        if (make_key(keys, i, &rule, tied) < 0)
            return -1;
    }
    if (largest >= 0x7f800000u)
        return -2;
    return keep_tied_boundaries(tied, nb);
}
#endif

static int prepare_keys(Key *keys, Py_ssize_t n, const Key *bounds, int nb, Tied *tied) {
#ifdef DW_X86_DISPATCH
    if (use_avx2 > 0)
        return prepare_keys_avx2(keys, n, bounds, nb, tied);
#endif
    return prepare_keys_body(keys, n, bounds, nb, tied);
}

/* prepare_keys, for keys that magnitude_bins made on its way (_fused_stats.c) for boundary values in the upper bins
   it was given: every entry outside those bins has its key already, the entries inside them are listed in
   positions[0, listed) (ascending, so tagged in flat-index order) and still hold their float32 bits. Returns -3 when
   positions are not ascending flat indices. */
static int finish_keys(Key *keys, Py_ssize_t n, const Key *bounds, int nb, const uint32_t *positions, Py_ssize_t listed,
                       Tied *tied) {
    const KeyRule rule = key_rule(n, bounds, nb, tied);
    for (Py_ssize_t p = 0; p < listed; p++) {
        if (positions[p] >= (uint64_t)n || (p > 0 && positions[p] <= positions[p - 1]))
            return -3;
        if (make_key(keys, positions[p], &rule, tied) < 0)
            return -1;
    }
    return keep_tied_boundaries(tied, nb);
}

/* Sorts keys[0, n) as far as the window [start, stop) needs, and writes to out (ascending, at most capacity)
   the flat indices of the tied entries it holds; returns how many there are, or prepare_keys' error. With
   positions, the keys are made but for the entries listed there (finish_keys). */
static Py_ssize_t tie_select_keys(Key *keys, Py_ssize_t n, int descending, Py_ssize_t start, Py_ssize_t stop,
                                  const Key *bounds, int nb, int64_t *out, Py_ssize_t capacity, const uint32_t *positions,
                                  Py_ssize_t listed) {
    Tied tied;
    memset(&tied, 0, sizeof tied);
    Py_ssize_t found = -1;
    uint8_t *hit = NULL;
    int prepared = positions != NULL ? finish_keys(keys, n, bounds, nb, positions, listed, &tied)
                                     : prepare_keys(keys, n, bounds, nb, &tied);
    if (prepared < 0) {
        found = prepared;
        goto done;
    }
    found = 0;
    if (tied.n == 0 || stop <= start)
        goto done;
    Ranges r;
    r.n = tied.n;
    for (int j = 0; j < tied.n; j++) {
        r.lo[j] = tied.base[j];
        r.hi[j] = tied.base[j] + (Key)(tied.ties[j] - 1);
    }
    Py_ssize_t edges[2] = {start, stop};
    int depth = 0;
    for (Py_ssize_t m = n; m > 1; m >>= 1)
        depth++;
    select_fn(descending)(keys, keys, keys + n, 2 * depth, edges, 2, &r);
    Py_ssize_t total = tied.ties[0] + (tied.n > 1 ? tied.ties[1] : 0);
    hit = calloc((size_t)total, 1);
    if (hit == NULL) {
        found = -1;
        goto done;
    }
    Key span0 = r.hi[0] - r.lo[0], span1 = tied.n > 1 ? r.hi[1] - r.lo[1] : 0, lo1 = tied.n > 1 ? r.lo[1] : r.lo[0];
    for (Py_ssize_t p = start; p < stop; p++) {
        Key k = keys[p];
        if (k - r.lo[0] <= span0) {
            hit[k - r.lo[0]] = 1;
            found++;
        } else if (k - lo1 <= span1) {
            hit[tied.ties[0] + (k - lo1)] = 1;
            found++;
        }
    }
    /* the two ranges' indices are each ascending: merge them */
    Py_ssize_t a = 0, b = 0, w = 0, t0 = tied.ties[0], t1 = total - t0;
    while (a < t0 || b < t1) {
        int from_first = b >= t1 || (a < t0 && tied.index[0][a] < tied.index[1][b]);
        int64_t index = from_first ? tied.index[0][a] : tied.index[1][b];
        int kept = from_first ? hit[a++] : hit[t0 + b++];
        if (kept) {
            if (w < capacity)
                out[w] = index;
            w++;
        }
    }
done:
    free(hit);
    for (int j = 0; j < 2; j++)
        free(tied.index[j]);
    return found;
}

PyDoc_STRVAR(tie_select_doc,
"tie_select(magnitudes, descending, start, stop, boundaries, out, overwrite, positions=None, highs=None) -> int\n\n"
"The flat indices of the entries that torch.sort(magnitudes, descending) (CPU, not stable) places at\n"
"positions [start, stop) and whose value is one of boundaries, written to out (int64, writable) in\n"
"ascending order; returns how many. magnitudes: float32, finite, non-negative, fewer than 2**30 entries;\n"
"with overwrite (magnitudes writable) the selection runs in its buffer, which is left scrambled,\n"
"else in a copy. With positions (uint32) and highs: magnitude_bins(magnitudes, highs, counts, positions)\n"
"made the keys already, for these boundaries (one in each of the upper bins highs, ascending).");

static PyObject *py_tie_select(PyObject *self, PyObject *args) {
    PyObject *magnitudes, *boundaries, *out, *listing = Py_None, *highs = Py_None;
    int descending, overwrite;
    Py_ssize_t start, stop;
    if (!PyArg_ParseTuple(args, "OpnnOOp|OO", &magnitudes, &descending, &start, &stop, &boundaries, &out, &overwrite,
                          &listing, &highs))
        return NULL;
    Held held = {.held = 0};
    PyObject *result = NULL;
    Key *copy = NULL;
    Key bounds[2];
    Py_ssize_t n_bounds = PySequence_Size(boundaries);
    if (n_bounds < 1 || n_bounds > 2) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "one or two boundary values");
        return NULL;
    }
    for (Py_ssize_t j = 0; j < n_bounds; j++) {
        PyObject *item = PySequence_GetItem(boundaries, j);
        float v = item ? (float)PyFloat_AsDouble(item) : 0.0f;
        Py_XDECREF(item);
        if (PyErr_Occurred())
            return NULL;
        bounds[j] = v == 0.0f ? 0u : float_bits(v); /* -0 equals +0 */
    }
    if (n_bounds == 2 && bounds[0] > bounds[1]) {
        Key t = bounds[0];
        bounds[0] = bounds[1];
        bounds[1] = t;
    }
    int nb = (n_bounds == 2 && bounds[0] == bounds[1]) ? 1 : (int)n_bounds;
    if (listing != Py_None) { /* the keys were made for one boundary in each of these bins */
        int same = PySequence_Check(highs) && PySequence_Size(highs) == nb;
        for (int j = 0; same && j < nb; j++) {
            PyObject *item = PySequence_GetItem(highs, j);
            long high = item ? PyLong_AsLong(item) : -1;
            Py_XDECREF(item);
            if (PyErr_Occurred())
                return NULL;
            same = high == (long)(bounds[j] >> 16);
        }
        if (!same) {
            PyErr_SetString(PyExc_ValueError, "the keys were made for the upper bins of other boundaries");
            return NULL;
        }
        if (!overwrite) {
            PyErr_SetString(PyExc_ValueError, "keys made already are finished in their buffer: overwrite");
            return NULL;
        }
    }
    Key *keys = hold(&held, magnitudes, overwrite, 0, "magnitudes");
    if (keys == NULL)
        goto done;
    Py_ssize_t n = held.views[0].len / 4;
    int64_t *kept = hold(&held, out, 1, 0, "out");
    if (kept == NULL)
        goto done;
    Py_ssize_t capacity = held.views[1].len / 8, found = 0, listed = 0;
    const uint32_t *positions = NULL;
    if (listing != Py_None) {
        positions = hold(&held, listing, 0, 0, "positions");
        if (positions == NULL)
            goto done;
        listed = held.views[2].len / 4;
    }
    if ((uint64_t)n >= ((uint64_t)1 << 30) || start < 0 || stop < start || stop > n) {
        PyErr_SetString(PyExc_ValueError, "bad window or too many entries");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    if (!overwrite) {
        copy = malloc((size_t)(n ? n : 1) * sizeof(Key));
        if (copy != NULL)
            memcpy(copy, keys, (size_t)n * sizeof(Key));
    }
    Key *work = overwrite ? keys : copy;
    found = work == NULL ? -1
                         : tie_select_keys(work, n, descending, start, stop, bounds, nb, kept, capacity, positions, listed);
    Py_END_ALLOW_THREADS
    if (found == -2) {
        PyErr_SetString(PyExc_ValueError, "magnitudes must be finite and non-negative");
        goto done;
    }
    if (found == -3) {
        PyErr_SetString(PyExc_ValueError, "positions must be ascending flat indices");
        goto done;
    }
    if (found < 0) {
        PyErr_NoMemory();
        goto done;
    }
    if (found > capacity) {
        PyErr_Format(PyExc_ValueError, "out holds %zd indices, %zd needed", capacity, found);
        goto done;
    }
    result = PyLong_FromSsize_t(found);
done:
    free(copy);
    release_all(&held);
    return result;
}
