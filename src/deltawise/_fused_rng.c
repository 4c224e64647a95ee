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
