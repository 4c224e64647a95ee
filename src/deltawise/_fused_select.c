/* The tie order of torch's CPU sort without a whole sort; see _fused_sparse.c. */

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
