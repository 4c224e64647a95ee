/* DARE keep masks drawn as torch.rand draws them; see _fused_sparse.c. */

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

/* A position in the stream of one seed: draws come from state[index..] after the last twist. */
typedef struct {
    Mt19937 mt;
    Py_ssize_t index;
} MtStream;

/* Positions s at draw `skip` of the stream seeded by seed (whole twists skipped still have to be computed). */
static void mt_start(MtStream *s, uint32_t seed, Py_ssize_t skip) {
    mt_seed(&s->mt, seed);
    Py_ssize_t pos = 0;
    while (pos + 624 <= skip) {
        mt_twist(&s->mt);
        pos += 624;
    }
    mt_twist(&s->mt);
    s->index = skip - pos;
}

/* MT19937's tempering of one state word, then torch's float draw from its low 24 bits. */
DW_INLINE float mt_uniform(uint32_t y) {
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return (float)(y & 0xffffffu) * 0x1p-24f;
}

/* keep[j] = u_j < density for the next n draws u_j, decided in float32 as torch does. */
DW_INLINE void mt_keep(MtStream *s, uint8_t *keep, Py_ssize_t n, float density) {
    Py_ssize_t done = 0;
    while (done < n) {
        if (s->index == 624) {
            mt_twist(&s->mt);
            s->index = 0;
        }
        Py_ssize_t take = 624 - s->index < n - done ? 624 - s->index : n - done;
        const uint32_t *state = s->mt.state + s->index;
        uint8_t *out = keep + done;
        for (Py_ssize_t j = 0; j < take; j++)
            out[j] = mt_uniform(state[j]) < density;
        s->index += take;
        done += take;
    }
}

/* u[j] = the next n draws, as torch.rand gives them (float32). */
DW_INLINE void mt_fill(MtStream *s, float *u, Py_ssize_t n) {
    Py_ssize_t done = 0;
    while (done < n) {
        if (s->index == 624) {
            mt_twist(&s->mt);
            s->index = 0;
        }
        Py_ssize_t take = 624 - s->index < n - done ? 624 - s->index : n - done;
        const uint32_t *state = s->mt.state + s->index;
        float *out = u + done;
        for (Py_ssize_t j = 0; j < take; j++)
            out[j] = mt_uniform(state[j]);
        s->index += take;
        done += take;
    }
}

/* Fills keep[0..n) for draws [skip, skip + n) of the stream seeded by seed. */
static void mt_mask(uint8_t *keep, uint32_t seed, Py_ssize_t skip, Py_ssize_t n, float density) {
    MtStream s;
    mt_start(&s, seed, skip);
    mt_keep(&s, keep, n, density);
}

/* The RNG segments of a chunk: segment j holds draws [skip[j], skip[j] + length[j]) of the stream of seed[j]. */
typedef struct {
    Py_ssize_t parts, total;
    uint32_t *seed;
    Py_ssize_t *skip, *length;
} Segments;

static void free_segments(Segments *g) {
    free(g->seed);
    free(g->skip);
    free(g->length);
}

/* Reads seeds, skips and lengths (sequences of one length); -1 with an exception set on error. */
static int take_segments(Segments *g, PyObject *seeds, PyObject *skips, PyObject *lengths) {
    memset(g, 0, sizeof *g);
    g->parts = PySequence_Size(seeds);
    if (g->parts < 0 || PySequence_Size(skips) != g->parts || PySequence_Size(lengths) != g->parts) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "seeds, skips and lengths must have the same length");
        return -1;
    }
    g->seed = malloc((size_t)(g->parts + 1) * sizeof(uint32_t));
    g->skip = malloc((size_t)(g->parts + 1) * sizeof(Py_ssize_t));
    g->length = malloc((size_t)(g->parts + 1) * sizeof(Py_ssize_t));
    if (!g->seed || !g->skip || !g->length) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t j = 0; j < g->parts; j++) {
        PyObject *a = PySequence_GetItem(seeds, j), *b = PySequence_GetItem(skips, j), *c = PySequence_GetItem(lengths, j);
        g->seed[j] = a ? (uint32_t)(PyLong_AsUnsignedLongLongMask(a) & 0xffffffffu) : 0;
        g->skip[j] = b ? PyLong_AsSsize_t(b) : -1;
        g->length[j] = c ? PyLong_AsSsize_t(c) : -1;
        Py_XDECREF(a);
        Py_XDECREF(b);
        Py_XDECREF(c);
        if (PyErr_Occurred())
            return -1;
        if (g->skip[j] < 0 || g->length[j] < 0) {
            PyErr_SetString(PyExc_ValueError, "skips and lengths must be non-negative");
            return -1;
        }
        g->total += g->length[j];
    }
    return 0;
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
    Segments g;
    Held held = {.held = 0};
    PyObject *result = NULL;
    if (take_segments(&g, seeds, skips, lengths) < 0)
        goto done;
    uint8_t *keep = hold(&held, out, 1, g.total, "out");
    if (keep == NULL)
        goto done;
    float dens = (float)density;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t j = 0, pos = 0; j < g.parts; pos += g.length[j], j++)
        mt_mask(keep + pos, g.seed[j], g.skip[j], g.length[j], dens);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    release_all(&held);
    free_segments(&g);
    return result;
}
