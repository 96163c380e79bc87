/*
 * Redis HSET commands of feature rows in Feast's online format, written in one pass.
 *
 * Why it exists: a stream worker's Redis write is one HSET per changed entity, holding
 * the entity's timestamp and each changed feature as a serialized feast.types.Value. The
 * vectorized Arrow/NumPy path (features/online.py) builds every piece as a column and
 * then puts them in order with a take: a dozen passes over the data and about 4 - 9 us per
 * row of Python-side work, a third of a live worker's time. Here each row's command is
 * written straight into one output buffer, reading the numbers from Arrow's own buffers.
 * Text and list values, whose encodings are already whole Arrow columns, come in encoded.
 * The Arrow path stays as the fallback (no compiler) and as the reference the tests
 * compare this against, byte for byte.
 *
 * hset_commands(rows, keys, suffix, ts_field, micros, features, changed) -> bytes
 *   rows:     the number of rows
 *   keys:     (offsets, data, offset): a LargeBinary array's buffers and offset, the
 *             serialized entity key of each row; ``suffix`` (the project) follows each key
 *   ts_field: the timestamp's hash field; micros: int64 epoch microseconds, one per row,
 *             written as a google.protobuf.Timestamp (fields equal to 0 left out)
 *   features: a tuple of (field, kind, validity, data, offsets, offset), one per feature:
 *             kind 0: int64 values, written as Value(int64_val) (tag 0x20, varint)
 *             kind 1: float64 values, written as Value(double_val) (tag 0x29); NaN as null
 *             kind 2: already-encoded Value bytes, a LargeBinary array (``offsets``, ``data``)
 *             validity: Arrow's validity bitmap or None (all valid); a null is an empty Value
 *             offset: the array's offset into its buffers (elements for kind 0/1, offsets
 *             entries for kind 2; bits of the validity bitmap for every kind)
 *   changed:  None (every feature of every row) or a C-contiguous (rows x features) uint8
 *             buffer: nonzero where the feature is written
 * Each row becomes HSET <key+suffix> <ts_field> <ts> then <field> <value> per written
 * feature, in the order of ``features``.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { KIND_INT64 = 0, KIND_FLOAT64 = 1, KIND_ENCODED = 2 };
#define INT64_TAG 0x20
#define DOUBLE_TAG 0x29
/* A bulk string's overhead: '$', up to 20 length digits, two CRLFs. */
#define BULK_OVERHEAD 25

#define MAX_FIELD 64

typedef struct {
    const char *field;
    Py_ssize_t field_len;
    char field_bulk[MAX_FIELD + BULK_OVERHEAD]; /* the field as a bulk string, written once */
    Py_ssize_t field_bulk_len;
    int kind;
    const uint8_t *validity; /* NULL: all valid */
    const uint8_t *data;
    const int64_t *offsets; /* kind 2 */
    Py_ssize_t offset;
} Feature;

static inline char *write_uint(char *out, uint64_t value) {
    if (value < 10) { /* (most lengths: every number's value is at most 11 bytes) */
        *out++ = (char)('0' + value);
        return out;
    }
    char digits[20];
    int n = 0;
    do {
        digits[n++] = (char)('0' + value % 10);
        value /= 10;
    } while (value);
    while (n) *out++ = digits[--n];
    return out;
}

/* "$<len>\r\n" */
static inline char *bulk_head(char *out, Py_ssize_t len) {
    *out++ = '$';
    out = write_uint(out, (uint64_t)len);
    *out++ = '\r';
    *out++ = '\n';
    return out;
}

static inline char *crlf(char *out) {
    *out++ = '\r';
    *out++ = '\n';
    return out;
}

static inline char *bulk(char *out, const char *bytes, Py_ssize_t len) {
    out = bulk_head(out, len);
    if (len) memcpy(out, bytes, (size_t)len);
    return crlf(out + len);
}

static inline char *empty_bulk(char *out) {
    memcpy(out, "$0\r\n\r\n", 6);
    return out + 6;
}

static inline int varint_len(uint64_t value) {
    int n = 1;
    while (value >= 0x80) {
        value >>= 7;
        n++;
    }
    return n;
}

static inline char *varint(char *out, uint64_t value) {
    while (value >= 0x80) {
        *out++ = (char)((value & 0x7F) | 0x80);
        value >>= 7;
    }
    *out++ = (char)value;
    return out;
}

static inline int is_valid(const uint8_t *validity, Py_ssize_t bit) {
    return validity == NULL || (validity[bit >> 3] >> (bit & 7)) & 1;
}

/* The serialized google.protobuf.Timestamp of ``micros``, as Timestamp.FromDatetime. */
static inline char *timestamp(char *out, int64_t micros) {
    int64_t seconds = micros / 1000000, rest = micros % 1000000;
    if (rest < 0) { /* floor division, as NumPy's */
        rest += 1000000;
        seconds -= 1;
    }
    int64_t nanos = rest * 1000;
    int length = (seconds ? 1 + varint_len((uint64_t)seconds) : 0) + (nanos ? 1 + varint_len((uint64_t)nanos) : 0);
    out = bulk_head(out, length);
    if (seconds) {
        *out++ = 0x08;
        out = varint(out, (uint64_t)seconds);
    }
    if (nanos) {
        *out++ = 0x10;
        out = varint(out, (uint64_t)nanos);
    }
    return crlf(out);
}

static char *value(char *out, const Feature *f, Py_ssize_t row) {
    Py_ssize_t at = f->offset + row;
    if (f->kind == KIND_ENCODED) {
        int64_t start = f->offsets[at], end = f->offsets[at + 1];
        return bulk(out, (const char *)f->data + start, (Py_ssize_t)(end - start));
    }
    if (!is_valid(f->validity, at)) return empty_bulk(out);
    if (f->kind == KIND_INT64) {
        int64_t number;
        memcpy(&number, f->data + at * 8, 8);
        uint64_t bits = (uint64_t)number; /* two's complement, as protobuf's int64 */
        out = bulk_head(out, 1 + varint_len(bits));
        *out++ = INT64_TAG;
        return crlf(varint(out, bits));
    }
    double number;
    memcpy(&number, f->data + at * 8, 8);
    if (isnan(number)) return empty_bulk(out); /* Feast stores NaN as null */
    uint64_t bits;
    memcpy(&bits, &number, 8);
    memcpy(out, "$9\r\n", 4);
    out[4] = DOUBLE_TAG;
    for (int i = 0; i < 8; i++) out[5 + i] = (char)(bits >> (8 * i)); /* little-endian */
    memcpy(out + 13, "\r\n", 2);
    return out + 15;
}

/* Upper bound of a value's bulk string. */
static Py_ssize_t value_bound(const Feature *f, Py_ssize_t row) {
    if (f->kind == KIND_ENCODED) {
        Py_ssize_t at = f->offset + row;
        return (Py_ssize_t)(f->offsets[at + 1] - f->offsets[at]) + BULK_OVERHEAD;
    }
    return 11 + BULK_OVERHEAD; /* a tag and at most 10 varint bytes */
}

typedef struct {
    Py_buffer views[3 * 64 + 4];
    int count;
} Views;

static const void *view_of(Views *views, PyObject *object, Py_ssize_t min_bytes, const char *what) {
    if (views->count >= (int)(sizeof(views->views) / sizeof(views->views[0]))) {
        PyErr_SetString(PyExc_ValueError, "too many features (at most 64)");
        return NULL;
    }
    Py_buffer *view = &views->views[views->count];
    if (PyObject_GetBuffer(object, view, PyBUF_SIMPLE) < 0) return NULL;
    views->count++;
    if (view->len < min_bytes) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, at least %zd needed", what, view->len, min_bytes);
        return NULL;
    }
    return view->buf;
}

static void release(Views *views) {
    for (int i = 0; i < views->count; i++) PyBuffer_Release(&views->views[i]);
    views->count = 0;
}

static int parse_feature(Views *views, PyObject *item, Py_ssize_t rows, Feature *f) {
    PyObject *validity, *data, *offsets;
    if (!PyArg_ParseTuple(item, "y#iOOOn", &f->field, &f->field_len, &f->kind, &validity, &data, &offsets,
                          &f->offset))
        return -1;
    if (f->offset < 0) {
        PyErr_SetString(PyExc_ValueError, "a feature's offset is negative");
        return -1;
    }
    if (f->field_len > MAX_FIELD) {
        PyErr_Format(PyExc_ValueError, "a hash field is longer than %d bytes", MAX_FIELD);
        return -1;
    }
    f->field_bulk_len = bulk(f->field_bulk, f->field, f->field_len) - f->field_bulk;
    f->validity = NULL;
    if (validity != Py_None) {
        f->validity = view_of(views, validity, (f->offset + rows + 7) / 8, "a validity bitmap");
        if (f->validity == NULL) return -1;
    }
    if (f->kind == KIND_INT64 || f->kind == KIND_FLOAT64) {
        f->data = view_of(views, data, (f->offset + rows) * 8, "a feature's values");
        f->offsets = NULL;
        return f->data == NULL ? -1 : 0;
    }
    if (f->kind != KIND_ENCODED) {
        PyErr_Format(PyExc_ValueError, "unknown feature kind %d", f->kind);
        return -1;
    }
    f->offsets = view_of(views, offsets, (f->offset + rows + 1) * 8, "a feature's offsets");
    if (f->offsets == NULL) return -1;
    const int64_t *o = f->offsets + f->offset;
    for (Py_ssize_t i = 0; i < rows; i++) {
        if (o[i] < 0 || o[i + 1] < o[i]) {
            PyErr_SetString(PyExc_ValueError, "a feature's offsets are not ascending");
            return -1;
        }
    }
    f->data = view_of(views, data, (Py_ssize_t)o[rows], "a feature's encoded values");
    return f->data == NULL ? -1 : 0;
}

static PyObject *hset_commands(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t rows, suffix_len, ts_field_len, key_offset;
    PyObject *key_offsets_obj, *key_data_obj, *micros_obj, *features_obj, *changed_obj;
    const char *suffix, *ts_field;
    if (!PyArg_ParseTuple(args, "n(OOn)y#y#OO!O", &rows, &key_offsets_obj, &key_data_obj, &key_offset, &suffix,
                          &suffix_len, &ts_field, &ts_field_len, &micros_obj, &PyTuple_Type, &features_obj,
                          &changed_obj))
        return NULL;
    if (rows < 0 || key_offset < 0) {
        PyErr_SetString(PyExc_ValueError, "rows and offsets must not be negative");
        return NULL;
    }
    Py_ssize_t count = PyTuple_GET_SIZE(features_obj);
    if (count > 64) {
        PyErr_SetString(PyExc_ValueError, "too many features (at most 64)");
        return NULL;
    }
    Views views = {.count = 0};
    Feature features[64];
    PyObject *result = NULL;
    const int64_t *key_offsets = view_of(&views, key_offsets_obj, (key_offset + rows + 1) * 8, "the key offsets");
    if (key_offsets == NULL) goto done;
    key_offsets += key_offset;
    for (Py_ssize_t i = 0; i < rows; i++) {
        if (key_offsets[i] < 0 || key_offsets[i + 1] < key_offsets[i]) {
            PyErr_SetString(PyExc_ValueError, "the key offsets are not ascending");
            goto done;
        }
    }
    const char *key_data = view_of(&views, key_data_obj, rows ? (Py_ssize_t)key_offsets[rows] : 0, "the key data");
    const int64_t *micros = view_of(&views, micros_obj, rows * 8, "the timestamps");
    if (key_data == NULL || micros == NULL) goto done;
    for (Py_ssize_t j = 0; j < count; j++)
        if (parse_feature(&views, PyTuple_GET_ITEM(features_obj, j), rows, &features[j]) < 0) goto done;
    const uint8_t *changed = NULL;
    if (changed_obj != Py_None) {
        changed = view_of(&views, changed_obj, rows * count, "the changed matrix");
        if (changed == NULL) goto done;
    }

    /* An upper bound of the output, then one pass writing it. Neither touches a Python
     * object (the buffers are held by their views, the bytes by the arguments), so other
     * threads run meanwhile: the stream worker's next cycle while its store thread writes. */
    Py_ssize_t bound = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < rows; i++) {
        bound += 40 + (Py_ssize_t)(key_offsets[i + 1] - key_offsets[i]) + suffix_len + BULK_OVERHEAD;
        bound += ts_field_len + 2 * BULK_OVERHEAD + 22;
        for (Py_ssize_t j = 0; j < count; j++)
            if (changed == NULL || changed[i * count + j])
                bound += features[j].field_len + BULK_OVERHEAD + value_bound(&features[j], i);
    }
    Py_END_ALLOW_THREADS
    result = PyBytes_FromStringAndSize(NULL, bound);
    if (result == NULL) goto done;
    char *start = PyBytes_AS_STRING(result), *out = start;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < rows; i++) {
        Py_ssize_t written = count;
        if (changed != NULL) {
            written = 0;
            for (Py_ssize_t j = 0; j < count; j++) written += changed[i * count + j] != 0;
        }
        *out++ = '*';
        out = write_uint(out, (uint64_t)(2 + 2 * (written + 1)));
        memcpy(out, "\r\n$4\r\nHSET\r\n", 12);
        out += 12;
        Py_ssize_t key_len = (Py_ssize_t)(key_offsets[i + 1] - key_offsets[i]);
        out = bulk_head(out, key_len + suffix_len);
        memcpy(out, key_data + key_offsets[i], (size_t)key_len);
        memcpy(out + key_len, suffix, (size_t)suffix_len);
        out = crlf(out + key_len + suffix_len);
        out = bulk(out, ts_field, ts_field_len);
        int64_t stamp;
        memcpy(&stamp, (const char *)micros + i * 8, 8);
        out = timestamp(out, stamp);
        for (Py_ssize_t j = 0; j < count; j++) {
            if (changed != NULL && !changed[i * count + j]) continue;
            memcpy(out, features[j].field_bulk, (size_t)features[j].field_bulk_len);
            out = value(out + features[j].field_bulk_len, &features[j], i);
        }
    }
    Py_END_ALLOW_THREADS
    if (_PyBytes_Resize(&result, out - start) < 0) result = NULL;
done:
    release(&views);
    return result;
}

static PyMethodDef methods[] = {
    {"hset_commands", hset_commands, METH_VARARGS,
     "hset_commands(rows, keys, suffix, ts_field, micros, features, changed) -> bytes: "
     "the RESP HSET commands of feature rows in Feast's Redis format (see features/_resp.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_resp", NULL, -1, methods};

PyMODINIT_FUNC PyInit__resp(void) { return PyModule_Create(&module); }
