/*
 * Kernels of the stream engine's windowed state (streams/engine/state.py, runs.py).
 *
 * Why they exist: every micro-batch sums each group's per-row deltas by tile code, takes
 * the latest tile of each (entity, value) pair of a distinct count, and merges the new
 * codes into the state's sorted runs. In NumPy the first is a hash factorization, a
 * sort of the distinct codes, a rank mapping and one bincount per column; the second a
 * sort of every pair and a reduceat; the third a searchsorted, position arithmetic and
 * one scatter per column: together about a third of the state's time. Here each is one
 * hash pass (and a radix sort of the distinct codes) or one merge pass in C. The fourth,
 * hash_strings, hashes string keys (the router's shard of every event's keys, the key
 * index's new keys) in one pass over their bytes, where NumPy takes a pass per byte
 * position and the router first had Arrow find the distinct keys. intern_strings,
 * find_strings and place_cells keep the key index's hash table (see keys.py).
 * The NumPy versions stay as the fallback (no compiler) and as the reference the tests
 * compare these against, bit for bit.
 *
 * sum_by_code(codes, deltas, m, out_codes, out_sums) -> k
 *   codes:     int64, n values (any order, repeats)
 *   deltas:    float64, m rows of n (C order, m x n)
 *   out_codes: writable int64, at least n: the k distinct codes, ascending
 *   out_sums:  writable float64, at least m * k: row r's sums per distinct code, as an
 *              m x k C-order matrix; each sum adds its deltas in input order, starting
 *              from 0.0 (as numpy.bincount does), so the sums are the same to the bit
 *
 * max_by_code(codes, values, out_codes, out_max) -> k
 *   codes, values: int64, n each; out_codes, out_max: writable int64, at least n each:
 *   the k distinct codes ascending and each one's largest value
 *
 * merge_sorted(codes, values, new_codes, new_values, width, out_codes, out_values)
 *   codes (n) and new_codes (m): ascending int64; values (width x n) and new_values
 *   (width x m): 8-byte items (int64 or float64, copied as bits); out_codes (n + m) and
 *   out_values (width x (n + m)) receive the merge, a new code before an equal old one
 *   (where numpy.searchsorted's left side puts it).
 *
 * hash_strings(bounds, data, multipliers, length, rows, out)
 *   bounds:      int64, n + 1: string i is data[bounds[i]:bounds[i + 1]]
 *   data:        bytes-like (the strings' UTF-8 bytes)
 *   multipliers: uint64, rows x length (C order), length at least the longest string
 *   out:         writable int64, at least rows x n: out[r][i] is the sum over string i's
 *                bytes b_j of (b_j + 1) * multipliers[r][j], modulo 2**64 (the hashes of
 *                streams/engine/keys.py, whose NumPy passes compute the same integers)
 *
 * intern_strings(cells, held, bounds, data, multipliers, length, positions, primary_mask,
 *                next_id, stamps, serial, out_ids, out_distinct, out_rows)
 *     -> (new, distinct, consumed), None or an int
 *   The key index's table (streams/engine/keys.py): each string at ``positions`` (int64
 *   row numbers into bounds) gets its id, a new key the next one from ``next_id``.
 *   cells:   writable int64, capacity x 3 (C order; capacity a power of two): per cell a
 *            key's first hash (masked by primary_mask), its second hash, its id (-1: an
 *            empty cell); open addressing, linear probing from the first hash's Fibonacci
 *            cell. ``held`` keys are in it; it is never filled past half: the call stops
 *            there, ``consumed`` positions in, for the caller to grow the table and go on
 *   stamps:  writable int64, one per id (at least next_id + positions): a key whose stamp
 *            is not ``serial`` is seen for the first time in this call; its stamp is set,
 *            its id and its position appended to out_distinct and out_rows (``distinct``
 *            of them, first-seen order)
 *   out_ids: writable int64, one per position
 *   None (the table and the outputs then undefined) when two keys share a first hash but
 *   not the second: the caller drops the table for exact probes. An int (nothing done)
 *   when a string is longer than ``length``: the length the multipliers must reach.
 *
 * find_strings(cells, bounds, data, multipliers, length, primary_mask, out_ids)
 *   Each of the n strings' id in ``cells``, or -1 where the table does not hold it.
 *
 * place_cells(cells, first, second, ids)
 *   Put entries (int64 each, distinct first hashes) into an empty table ``cells``.
 *
 * All of them release the GIL while they compute: they touch no Python object then.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pythread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define DIGIT_BITS 11
#define DIGIT_VALUES (1 << DIGIT_BITS)
#define SIGN_BIT 0x8000000000000000ULL
/* Scratch memory up to this size is kept between calls: fresh pages cost a page fault
 * each on first touch, which on a VM took as long as the hashing itself. */
#define KEPT_SCRATCH_BYTES ((size_t)32 << 20)

/* One scratch block, reused by every call (a lock guards it: the kernels run without the
 * GIL). Callers carve their arrays from it; growing it loses what it held. */
static PyThread_type_lock scratch_lock;
static char *scratch;
static size_t scratch_size;

static char *scratch_reserve(size_t bytes) {
    if (bytes > scratch_size) {
        free(scratch);
        scratch = malloc(bytes);
        scratch_size = scratch ? bytes : 0;
    }
    return scratch;
}

static void scratch_trim(void) {
    if (scratch_size > KEPT_SCRATCH_BYTES) {
        free(scratch);
        scratch = NULL;
        scratch_size = 0;
    }
}

/* Sort ``keys`` (unsigned order) carrying ``items``, least significant digit first, using
 * ``keys_tmp``/``items_tmp`` (k each); digits on which every key agrees are skipped (the
 * tile codes vary in few bits). Stable. */
static void radix_sort(uint64_t *keys, int64_t *items, Py_ssize_t k, uint64_t *keys_tmp, int64_t *items_tmp) {
    if (k < 2) return;
    uint64_t varying = 0;
    for (Py_ssize_t i = 1; i < k; i++) varying |= keys[i] ^ keys[0];
    uint64_t *src_keys = keys, *dst_keys = keys_tmp;
    int64_t *src_items = items, *dst_items = items_tmp;
    Py_ssize_t counts[DIGIT_VALUES];
    for (int shift = 0; shift < 64; shift += DIGIT_BITS) {
        if (!((varying >> shift) & (DIGIT_VALUES - 1))) continue;
        memset(counts, 0, sizeof(counts));
        for (Py_ssize_t i = 0; i < k; i++) counts[(src_keys[i] >> shift) & (DIGIT_VALUES - 1)]++;
        Py_ssize_t total = 0;
        for (int d = 0; d < DIGIT_VALUES; d++) {
            Py_ssize_t c = counts[d];
            counts[d] = total;
            total += c;
        }
        for (Py_ssize_t i = 0; i < k; i++) {
            Py_ssize_t at = counts[(src_keys[i] >> shift) & (DIGIT_VALUES - 1)]++;
            dst_keys[at] = src_keys[i];
            dst_items[at] = src_items[i];
        }
        uint64_t *swap_keys = src_keys;
        src_keys = dst_keys;
        dst_keys = swap_keys;
        int64_t *swap_items = src_items;
        src_items = dst_items;
        dst_items = swap_items;
    }
    if (src_keys != keys) {
        memcpy(keys, src_keys, (size_t)k * sizeof(uint64_t));
        memcpy(items, src_items, (size_t)k * sizeof(int64_t));
    }
}

/* A batch's codes grouped: the distinct ones (first-seen order), each input's group. */
typedef struct {
    Py_ssize_t k;
    uint64_t *distinct; /* k codes */
    int64_t *labels;    /* n: the group of each input */
    int64_t *order;     /* k: after sort_groups, the groups by ascending code */
    uint64_t *keys_tmp; /* the sort's buffers */
    int64_t *items_tmp;
    char *rest; /* scratch past these, ``extra_bytes`` of it */
} Groups;

/* A code's first cell in a table of 2^(64 - shift) cells: the top bits of code * 2^64/phi. */
static inline size_t first_cell(uint64_t code, int shift) {
    return (size_t)((code * 0x9E3779B97F4A7C15ULL) >> shift);
}

/* Group ``codes`` by value (scratch lock held), reserving ``extra_bytes`` more scratch;
 * -1 when memory ran out. Open addressing over 32-bit cells (a group's number + 1; 0:
 * empty) with Fibonacci hashing (first_cell), at most half full: the table starts small
 * and doubles as groups come (a batch has about a third as many groups as codes; a table
 * sized for every code outgrew the caches on a backlog's batches). */
static int group_codes(const int64_t *codes, Py_ssize_t n, size_t extra_bytes, Groups *groups) {
    if (n >= (Py_ssize_t)UINT32_MAX) return -1;
    size_t most = 16; /* the largest table needed: twice the codes */
    while (most < (size_t)n * 2) most <<= 1;
    size_t table_bytes = (most * sizeof(uint32_t) + 7) & ~(size_t)7;
    char *base = scratch_reserve(table_bytes + (size_t)n * 8 * 5 + extra_bytes);
    if (!base) return -1;
    uint32_t *table = (uint32_t *)base;
    groups->distinct = (uint64_t *)(base + table_bytes);
    groups->labels = (int64_t *)(groups->distinct + n);
    groups->order = groups->labels + n;
    groups->keys_tmp = (uint64_t *)(groups->order + n);
    groups->items_tmp = (int64_t *)(groups->keys_tmp + n);
    groups->rest = (char *)(groups->items_tmp + n);
    uint64_t *distinct = groups->distinct;
    int64_t *labels = groups->labels;
    size_t capacity = most < 65536 ? most : 65536;
    int shift = 64;
    for (size_t c = capacity; c > 1; c >>= 1) shift--;
    size_t mask = capacity - 1;
    memset(table, 0, capacity * sizeof(uint32_t));
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t code = (uint64_t)codes[i];
        size_t at = first_cell(code, shift);
        for (;;) {
            uint32_t slot = table[at];
            if (slot == 0) {
                table[at] = (uint32_t)(k + 1);
                distinct[k] = code;
                labels[i] = k++;
                break;
            }
            if (distinct[slot - 1] == code) {
                labels[i] = slot - 1;
                break;
            }
            at = (at + 1) & mask;
        }
        if ((size_t)k * 2 > capacity && capacity < most) { /* double, and place every group again */
            capacity <<= 1;
            shift--;
            mask = capacity - 1;
            memset(table, 0, capacity * sizeof(uint32_t));
            for (Py_ssize_t g = 0; g < k; g++) {
                size_t cell = first_cell(distinct[g], shift);
                while (table[cell]) cell = (cell + 1) & mask;
                table[cell] = (uint32_t)(g + 1);
            }
        }
    }
    groups->k = k;
    return 0;
}

/* Order the groups by code (signed) into ``order``; ``distinct`` ends sorted, as unsigned
 * keys with the sign bit flipped (``sorted_code`` reads one back). */
static void sort_groups(Groups *groups) {
    for (Py_ssize_t j = 0; j < groups->k; j++) {
        groups->distinct[j] ^= SIGN_BIT; /* signed order as unsigned */
        groups->order[j] = j;
    }
    radix_sort(groups->distinct, groups->order, groups->k, groups->keys_tmp, groups->items_tmp);
}

static inline int64_t sorted_code(const Groups *groups, Py_ssize_t j) {
    return (int64_t)(groups->distinct[j] ^ SIGN_BIT);
}

/* The computation of sum_by_code (scratch lock held); -1 when memory ran out. */
static Py_ssize_t sum_codes(const int64_t *codes, const void *deltas_buffer, Py_ssize_t n, Py_ssize_t m,
                            int64_t *out_codes, void *out_sums_buffer) {
    const double *deltas = deltas_buffer;
    double *out_sums = out_sums_buffer;
    if (n == 0) return 0;
    Groups groups;
    if (group_codes(codes, n, (size_t)n * (size_t)m * sizeof(double), &groups) < 0) return -1;
    Py_ssize_t k = groups.k;
    /* A row at a time, as numpy.bincount does (each row's k sums stay in cache, where
     * side-by-side sums of every row outgrew it on a backlog's batches): each sum adds
     * its deltas in input order, from 0.0. */
    double *sums = (double *)groups.rest;
    memset(sums, 0, (size_t)(m * k) * sizeof(double));
    const int64_t *labels = groups.labels;
    for (Py_ssize_t r = 0; r < m; r++) {
        double *row_sums = sums + r * k;
        const double *row = deltas + r * n;
        for (Py_ssize_t i = 0; i < n; i++) row_sums[labels[i]] += row[i];
    }
    sort_groups(&groups);
    for (Py_ssize_t j = 0; j < k; j++) out_codes[j] = sorted_code(&groups, j);
    for (Py_ssize_t r = 0; r < m; r++) {
        const double *row_sums = sums + r * k;
        double *out_row = out_sums + r * k;
        for (Py_ssize_t j = 0; j < k; j++) out_row[j] = row_sums[groups.order[j]];
    }
    return k;
}

/* The computation of max_by_code (scratch lock held); -1 when memory ran out. */
static Py_ssize_t max_codes(const int64_t *codes, const void *values_buffer, Py_ssize_t n, Py_ssize_t m,
                            int64_t *out_codes, void *out_max_buffer) {
    (void)m; /* one value per code */
    const int64_t *values = values_buffer;
    int64_t *out_max = out_max_buffer;
    if (n == 0) return 0;
    Groups groups;
    if (group_codes(codes, n, (size_t)n * sizeof(int64_t), &groups) < 0) return -1;
    Py_ssize_t k = groups.k;
    int64_t *max = (int64_t *)groups.rest;
    for (Py_ssize_t j = 0; j < k; j++) max[j] = INT64_MIN;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t *slot = max + groups.labels[i];
        if (values[i] > *slot) *slot = values[i];
    }
    sort_groups(&groups);
    for (Py_ssize_t j = 0; j < k; j++) {
        out_codes[j] = sorted_code(&groups, j);
        out_max[j] = max[groups.order[j]];
    }
    return k;
}

typedef struct {
    Py_buffer views[9];
    int count;
} Views;

static void release(Views *views) {
    for (int i = 0; i < views->count; i++) PyBuffer_Release(&views->views[i]);
}

/* A C-contiguous buffer of 8-byte items holding at least ``items`` of them. */
static int get_view(Views *views, PyObject *object, int writable, Py_ssize_t items, const char *name) {
    Py_buffer *view = &views->views[views->count];
    if (PyObject_GetBuffer(object, view, (writable ? PyBUF_WRITABLE : 0) | PyBUF_C_CONTIGUOUS) < 0) return -1;
    views->count++;
    if (view->len < items * 8) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, needs %zd", name, view->len, items * 8);
        return -1;
    }
    return 0;
}

typedef Py_ssize_t (*GroupKernel)(const int64_t *codes, const void *values, Py_ssize_t n, Py_ssize_t m,
                                  int64_t *out_codes, void *out_values);

/* Run a grouping kernel over ``views`` (codes, values, out_codes, out_values), without the
 * GIL; release the views; the number of distinct codes, or NULL with MemoryError. */
static PyObject *run_grouped(Views *views, GroupKernel kernel, Py_ssize_t n, Py_ssize_t m) {
    Py_ssize_t k;
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(scratch_lock, WAIT_LOCK);
    k = kernel(views->views[0].buf, views->views[1].buf, n, m, views->views[2].buf, views->views[3].buf);
    scratch_trim();
    PyThread_release_lock(scratch_lock);
    Py_END_ALLOW_THREADS
    release(views);
    if (k < 0) return PyErr_NoMemory();
    return PyLong_FromSsize_t(k);
}

static PyObject *sum_by_code(PyObject *self, PyObject *args) {
    PyObject *codes_obj, *deltas_obj, *out_codes_obj, *out_sums_obj;
    Py_ssize_t m;
    if (!PyArg_ParseTuple(args, "OOnOO", &codes_obj, &deltas_obj, &m, &out_codes_obj, &out_sums_obj)) return NULL;
    Views views = {.count = 0};
    if (m < 0) {
        PyErr_SetString(PyExc_ValueError, "m must not be negative");
        return NULL;
    }
    if (get_view(&views, codes_obj, 0, 0, "codes") < 0) goto fail;
    Py_ssize_t n = views.views[0].len / 8;
    if (get_view(&views, deltas_obj, 0, m * n, "deltas") < 0 || get_view(&views, out_codes_obj, 1, n, "out_codes") < 0 ||
        get_view(&views, out_sums_obj, 1, m * n, "out_sums") < 0)
        goto fail;
    return run_grouped(&views, sum_codes, n, m);
fail:
    release(&views);
    return NULL;
}

static PyObject *max_by_code(PyObject *self, PyObject *args) {
    PyObject *codes_obj, *values_obj, *out_codes_obj, *out_max_obj;
    if (!PyArg_ParseTuple(args, "OOOO", &codes_obj, &values_obj, &out_codes_obj, &out_max_obj)) return NULL;
    Views views = {.count = 0};
    if (get_view(&views, codes_obj, 0, 0, "codes") < 0) goto fail;
    Py_ssize_t n = views.views[0].len / 8;
    if (get_view(&views, values_obj, 0, n, "values") < 0 || get_view(&views, out_codes_obj, 1, n, "out_codes") < 0 ||
        get_view(&views, out_max_obj, 1, n, "out_max") < 0)
        goto fail;
    return run_grouped(&views, max_codes, n, 1);
fail:
    release(&views);
    return NULL;
}

/* The computation of merge_sorted (scratch lock held); -1 (nothing written) when memory ran out. */
static int merge(const int64_t *codes, const uint64_t *values, Py_ssize_t n, const int64_t *new_codes,
                 const uint64_t *new_values, Py_ssize_t m, Py_ssize_t width, int64_t *out_codes,
                 uint64_t *out_values) {
    Py_ssize_t total = n + m;
    /* Codes first, noting where each output item comes from (>= 0: old, < 0: new). */
    int64_t *source = (int64_t *)scratch_reserve((size_t)(total > 0 ? total : 1) * sizeof(int64_t));
    if (!source) return -1;
    Py_ssize_t i = 0, j = 0, at = 0;
    while (i < n && j < m) {
        if (codes[i] < new_codes[j]) {
            out_codes[at] = codes[i];
            source[at++] = i++;
        } else {
            out_codes[at] = new_codes[j];
            source[at++] = -1 - j++;
        }
    }
    while (i < n) {
        out_codes[at] = codes[i];
        source[at++] = i++;
    }
    while (j < m) {
        out_codes[at] = new_codes[j];
        source[at++] = -1 - j++;
    }
    for (Py_ssize_t r = 0; r < width; r++) {
        const uint64_t *old_row = values + r * n, *new_row = new_values + r * m;
        uint64_t *out_row = out_values + r * total;
        for (Py_ssize_t p = 0; p < total; p++) {
            int64_t s = source[p];
            out_row[p] = s >= 0 ? old_row[s] : new_row[-1 - s];
        }
    }
    return 0;
}

static PyObject *merge_sorted(PyObject *self, PyObject *args) {
    PyObject *codes_obj, *values_obj, *new_codes_obj, *new_values_obj, *out_codes_obj, *out_values_obj;
    Py_ssize_t width;
    if (!PyArg_ParseTuple(args, "OOOOnOO", &codes_obj, &values_obj, &new_codes_obj, &new_values_obj, &width,
                          &out_codes_obj, &out_values_obj))
        return NULL;
    Views views = {.count = 0};
    if (width < 0) {
        PyErr_SetString(PyExc_ValueError, "width must not be negative");
        return NULL;
    }
    if (get_view(&views, codes_obj, 0, 0, "codes") < 0 || get_view(&views, new_codes_obj, 0, 0, "new_codes") < 0)
        goto fail;
    Py_ssize_t n = views.views[0].len / 8, m = views.views[1].len / 8;
    if (get_view(&views, values_obj, 0, width * n, "values") < 0 ||
        get_view(&views, new_values_obj, 0, width * m, "new_values") < 0 ||
        get_view(&views, out_codes_obj, 1, n + m, "out_codes") < 0 ||
        get_view(&views, out_values_obj, 1, width * (n + m), "out_values") < 0)
        goto fail;
    int failed;
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(scratch_lock, WAIT_LOCK);
    failed = merge(views.views[0].buf, views.views[2].buf, n, views.views[1].buf, views.views[3].buf, m, width,
                   views.views[4].buf, views.views[5].buf);
    scratch_trim();
    PyThread_release_lock(scratch_lock);
    Py_END_ALLOW_THREADS
    release(&views);
    if (failed < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
fail:
    release(&views);
    return NULL;
}

/* Every string's bounds inside the data, and no longer than the multipliers reach. */
static int bounds_valid(const int64_t *bounds, Py_ssize_t n, Py_ssize_t size, Py_ssize_t length) {
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t start = bounds[i], end = bounds[i + 1];
        if (start < 0 || end < start || end > size || end - start > length) return 0;
    }
    return 1;
}

/* One hash of one string: the sum of (byte + 1) * its position's multiplier in ``row``. */
static inline uint64_t hash_bytes(const uint8_t *p, Py_ssize_t len, const uint64_t *row) {
    uint64_t h = 0;
    for (Py_ssize_t j = 0; j < len; j++) h += ((uint64_t)p[j] + 1) * row[j];
    return h;
}

static PyObject *invalid_bounds(void) {
    PyErr_SetString(PyExc_ValueError, "bounds outside the data, not ascending, or a string longer than length");
    return NULL;
}

/* The computation of hash_strings; -1 (nothing written) when bounds or lengths are out of range. */
static int hash_all(const int64_t *bounds, Py_ssize_t n, const uint8_t *data, Py_ssize_t size,
                    const uint64_t *multipliers, Py_ssize_t length, Py_ssize_t rows, uint64_t *out) {
    if (!bounds_valid(bounds, n, size, length)) return -1;
    for (Py_ssize_t r = 0; r < rows; r++) {
        const uint64_t *row = multipliers + r * length;
        uint64_t *hashes = out + r * n;
        for (Py_ssize_t i = 0; i < n; i++)
            hashes[i] = hash_bytes(data + bounds[i], (Py_ssize_t)(bounds[i + 1] - bounds[i]), row);
    }
    return 0;
}

static PyObject *hash_strings(PyObject *self, PyObject *args) {
    PyObject *bounds_obj, *data_obj, *multipliers_obj, *out_obj;
    Py_ssize_t length, rows;
    if (!PyArg_ParseTuple(args, "OOOnnO", &bounds_obj, &data_obj, &multipliers_obj, &length, &rows, &out_obj))
        return NULL;
    if (length < 0 || rows < 0) {
        PyErr_SetString(PyExc_ValueError, "length and rows must not be negative");
        return NULL;
    }
    Views views = {.count = 0};
    Py_buffer *data = &views.views[0];
    if (PyObject_GetBuffer(data_obj, data, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    views.count++;
    if (get_view(&views, bounds_obj, 0, 1, "bounds") < 0) goto fail;
    Py_ssize_t n = views.views[1].len / 8 - 1;
    if (get_view(&views, multipliers_obj, 0, rows * length, "multipliers") < 0 ||
        get_view(&views, out_obj, 1, rows * n, "out") < 0)
        goto fail;
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = hash_all(views.views[1].buf, n, data->buf, data->len, views.views[2].buf, length, rows, views.views[3].buf);
    Py_END_ALLOW_THREADS
    release(&views);
    if (failed < 0) return invalid_bounds();
    Py_RETURN_NONE;
fail:
    release(&views);
    return NULL;
}

/* Both hashes of one string (see hash_all). */
static inline void hash_pair(const uint8_t *p, Py_ssize_t len, const uint64_t *multipliers, Py_ssize_t length,
                             uint64_t *first, uint64_t *second) {
    *first = hash_bytes(p, len, multipliers);
    *second = hash_bytes(p, len, multipliers + length);
}

typedef struct {
    int64_t *cells;
    size_t mask;
    int shift;
} Cells;

/* ``capacity`` cells (a power of two) as a probing table; -1 if it is not one. */
static int cells_of(Cells *table, int64_t *cells, Py_ssize_t capacity) {
    if (capacity < 2 || (capacity & (capacity - 1))) return -1;
    table->cells = cells;
    table->mask = (size_t)capacity - 1;
    table->shift = 64;
    for (Py_ssize_t c = capacity; c > 1; c >>= 1) table->shift--;
    return 0;
}

/* The cell holding ``first`` or the empty cell where it would go. */
static inline int64_t *probe(const Cells *table, uint64_t first) {
    size_t at = first_cell(first, table->shift);
    for (;;) {
        int64_t *cell = table->cells + 3 * at;
        if (cell[2] < 0 || (uint64_t)cell[0] == first) return cell;
        at = (at + 1) & table->mask;
    }
}

/* The computation of intern_strings: new keys (>= 0), with the distinct ones in *distinct and
 * the positions done in *consumed; -1 on a first-hash collision; nothing written on -2 (a
 * position outside the strings), -3 (bounds outside the data) or -4 (a string longer than
 * ``length``: the longest one's length in *consumed). */
static Py_ssize_t intern(const Cells *table, Py_ssize_t held, const int64_t *bounds, Py_ssize_t n,
                         const uint8_t *data, Py_ssize_t size, const uint64_t *multipliers, Py_ssize_t length,
                         const int64_t *positions, Py_ssize_t m, uint64_t primary_mask, int64_t next_id,
                         int64_t *stamps, int64_t serial, int64_t *out_ids, int64_t *out_distinct, int64_t *out_rows,
                         Py_ssize_t *distinct, Py_ssize_t *consumed) {
    Py_ssize_t longest = 0;
    for (Py_ssize_t i = 0; i < m; i++) {
        int64_t row = positions[i];
        if (row < 0 || row >= n) return -2;
        int64_t start = bounds[row], end = bounds[row + 1];
        if (start < 0 || end < start || end > size) return -3;
        if (end - start > longest) longest = (Py_ssize_t)(end - start);
    }
    if (longest > length) {
        *consumed = longest;
        return -4;
    }
    int64_t first_new = next_id;
    size_t most = (table->mask + 1) / 2; /* entries the table may hold */
    Py_ssize_t k = 0, i = 0;
    for (; i < m; i++) {
        int64_t row = positions[i];
        uint64_t first, second;
        hash_pair(data + bounds[row], (Py_ssize_t)(bounds[row + 1] - bounds[row]), multipliers, length, &first,
                  &second);
        first &= primary_mask;
        int64_t *cell = probe(table, first);
        int64_t id;
        if (cell[2] < 0) {
            if ((size_t)(held + (next_id - first_new)) >= most) break; /* half full: the caller grows it */
            cell[0] = (int64_t)first;
            cell[1] = (int64_t)second;
            cell[2] = id = next_id++;
        } else if ((uint64_t)cell[1] == second) {
            id = cell[2];
        } else {
            return -1;
        }
        out_ids[i] = id;
        if (stamps[id] != serial) {
            stamps[id] = serial;
            out_distinct[k] = id;
            out_rows[k++] = row;
        }
    }
    *distinct = k;
    *consumed = i;
    return (Py_ssize_t)(next_id - first_new);
}

static int get_table(Views *views, PyObject *object, Cells *table) {
    if (get_view(views, object, 1, 0, "cells") < 0) return -1;
    Py_buffer *view = &views->views[views->count - 1];
    if (view->len % 24 || cells_of(table, view->buf, view->len / 24) < 0) {
        PyErr_SetString(PyExc_ValueError, "cells must hold a power of two (at least 2) of 3 x int64 cells");
        return -1;
    }
    return 0;
}

/* The string arguments (data first, then bounds and multipliers); n strings. Their bounds
 * are checked by the callers (intern_strings only at the positions it reads). */
static int get_strings(Views *views, PyObject *bounds_obj, PyObject *data_obj, PyObject *multipliers_obj,
                       Py_ssize_t length, Py_ssize_t *n) {
    if (length < 0) {
        PyErr_SetString(PyExc_ValueError, "length must not be negative");
        return -1;
    }
    Py_buffer *data = &views->views[views->count];
    if (PyObject_GetBuffer(data_obj, data, PyBUF_C_CONTIGUOUS) < 0) return -1;
    views->count++;
    if (get_view(views, bounds_obj, 0, 1, "bounds") < 0) return -1;
    *n = views->views[views->count - 1].len / 8 - 1;
    return get_view(views, multipliers_obj, 0, 2 * length, "multipliers");
}


static PyObject *intern_strings(PyObject *self, PyObject *args) {
    PyObject *cells_obj, *bounds_obj, *data_obj, *multipliers_obj, *positions_obj, *stamps_obj, *out_ids_obj,
        *out_distinct_obj, *out_rows_obj;
    Py_ssize_t length, held;
    unsigned long long primary_mask;
    long long next_id, serial;
    if (!PyArg_ParseTuple(args, "OnOOOnOKLOLOOO", &cells_obj, &held, &bounds_obj, &data_obj, &multipliers_obj,
                          &length, &positions_obj, &primary_mask, &next_id, &stamps_obj, &serial, &out_ids_obj,
                          &out_distinct_obj, &out_rows_obj))
        return NULL;
    Views views = {.count = 0};
    Cells table;
    Py_ssize_t n;
    if (get_table(&views, cells_obj, &table) < 0 ||
        get_strings(&views, bounds_obj, data_obj, multipliers_obj, length, &n) < 0 ||
        get_view(&views, positions_obj, 0, 0, "positions") < 0)
        goto fail;
    Py_ssize_t m = views.views[4].len / 8;
    if (next_id < 0 || held < 0) {
        PyErr_SetString(PyExc_ValueError, "next_id and held must not be negative");
        goto fail;
    }
    if (get_view(&views, stamps_obj, 1, (Py_ssize_t)next_id + m, "stamps") < 0 ||
        get_view(&views, out_ids_obj, 1, m, "out_ids") < 0 ||
        get_view(&views, out_distinct_obj, 1, m, "out_distinct") < 0 ||
        get_view(&views, out_rows_obj, 1, m, "out_rows") < 0)
        goto fail;
    Py_ssize_t added, distinct = 0, consumed = 0;
    Py_BEGIN_ALLOW_THREADS
    added = intern(&table, held, views.views[2].buf, n, views.views[1].buf, views.views[1].len, views.views[3].buf,
                   length, views.views[4].buf, m, primary_mask, next_id, views.views[5].buf, serial,
                   views.views[6].buf, views.views[7].buf, views.views[8].buf, &distinct, &consumed);
    Py_END_ALLOW_THREADS
    release(&views);
    switch (added) {
    case -1:
        Py_RETURN_NONE;
    case -2:
        PyErr_SetString(PyExc_IndexError, "a position outside the strings");
        return NULL;
    case -3:
        return invalid_bounds();
    case -4:
        return PyLong_FromSsize_t(consumed);
    default:
        return Py_BuildValue("nnn", added, distinct, consumed);
    }
fail:
    release(&views);
    return NULL;
}

static PyObject *find_strings(PyObject *self, PyObject *args) {
    PyObject *cells_obj, *bounds_obj, *data_obj, *multipliers_obj, *out_obj;
    Py_ssize_t length;
    unsigned long long primary_mask;
    if (!PyArg_ParseTuple(args, "OOOOnKO", &cells_obj, &bounds_obj, &data_obj, &multipliers_obj, &length,
                          &primary_mask, &out_obj))
        return NULL;
    Views views = {.count = 0};
    Cells table;
    Py_ssize_t n;
    if (get_table(&views, cells_obj, &table) < 0 ||
        get_strings(&views, bounds_obj, data_obj, multipliers_obj, length, &n) < 0 ||
        get_view(&views, out_obj, 1, n, "out_ids") < 0)
        goto fail;
    const int64_t *bounds = views.views[2].buf;
    const uint8_t *data = views.views[1].buf;
    const uint64_t *multipliers = views.views[3].buf;
    int64_t *out = views.views[4].buf;
    if (!bounds_valid(bounds, n, views.views[1].len, length)) {
        release(&views);
        return invalid_bounds();
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t first, second;
        hash_pair(data + bounds[i], (Py_ssize_t)(bounds[i + 1] - bounds[i]), multipliers, length, &first, &second);
        const int64_t *cell = probe(&table, first & primary_mask);
        out[i] = cell[2] >= 0 && (uint64_t)cell[1] == second ? cell[2] : -1;
    }
    Py_END_ALLOW_THREADS
    release(&views);
    Py_RETURN_NONE;
fail:
    release(&views);
    return NULL;
}

static PyObject *place_cells(PyObject *self, PyObject *args) {
    PyObject *cells_obj, *first_obj, *second_obj, *ids_obj;
    if (!PyArg_ParseTuple(args, "OOOO", &cells_obj, &first_obj, &second_obj, &ids_obj)) return NULL;
    Views views = {.count = 0};
    Cells table;
    if (get_table(&views, cells_obj, &table) < 0 || get_view(&views, first_obj, 0, 0, "first") < 0) goto fail;
    Py_ssize_t n = views.views[1].len / 8;
    if (get_view(&views, second_obj, 0, n, "second") < 0 || get_view(&views, ids_obj, 0, n, "ids") < 0) goto fail;
    if ((size_t)(table.mask + 1) < 2 * (size_t)n) {
        PyErr_SetString(PyExc_ValueError, "cells must have room for twice the entries");
        goto fail;
    }
    const int64_t *first = views.views[1].buf, *second = views.views[2].buf, *ids = views.views[3].buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t *cell = probe(&table, (uint64_t)first[i]);
        cell[0] = first[i];
        cell[1] = second[i];
        cell[2] = ids[i];
    }
    Py_END_ALLOW_THREADS
    release(&views);
    Py_RETURN_NONE;
fail:
    release(&views);
    return NULL;
}

static PyMethodDef methods[] = {
    {"sum_by_code", sum_by_code, METH_VARARGS,
     "sum_by_code(codes, deltas, m, out_codes, out_sums) -> k: distinct codes ascending and their column sums."},
    {"max_by_code", max_by_code, METH_VARARGS,
     "max_by_code(codes, values, out_codes, out_max) -> k: distinct codes ascending and each one's largest value."},
    {"merge_sorted", merge_sorted, METH_VARARGS,
     "merge_sorted(codes, values, new_codes, new_values, width, out_codes, out_values): merge two sorted runs."},
    {"hash_strings", hash_strings, METH_VARARGS,
     "hash_strings(bounds, data, multipliers, length, rows, out): each string's position-weighted byte sums."},
    {"intern_strings", intern_strings, METH_VARARGS,
     "intern_strings(cells, held, bounds, data, multipliers, length, positions, primary_mask, next_id, stamps, "
     "serial, out_ids, out_distinct, out_rows) -> (new, distinct, consumed), None or int: ids of strings."},
    {"find_strings", find_strings, METH_VARARGS,
     "find_strings(cells, bounds, data, multipliers, length, primary_mask, out_ids): each string's id or -1."},
    {"place_cells", place_cells, METH_VARARGS, "place_cells(cells, first, second, ids): fill an empty table."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) {
    scratch_lock = PyThread_allocate_lock();
    if (!scratch_lock) return PyErr_NoMemory();
    return PyModule_Create(&module);
}
