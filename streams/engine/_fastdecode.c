/*
 * The stream engine's fast path from JSON event messages to Arrow column buffers.
 *
 * Why it exists: decoding is the largest single cost of the embedded engine (a msgspec
 * struct per message, then a tuple per struct, then an Arrow array per field: ~60% of it
 * is building Python objects that are thrown away). This module reads each message once
 * and appends the fields the feature definitions read straight into Arrow's buffers
 * (validity bitmap, int32 offsets and bytes for text; 8-byte values for numbers).
 *
 * Why it can be this small and still be exact: it only *accepts* a message when it is
 * certain msgspec would decode it to the same values. Anything it does not handle itself
 * (an escape in a read text field or in any top-level key, a null where the field is not
 * nullable, a number of another form than the field's, an integer beyond 18 digits, a
 * repeated read field, malformed JSON, bytes that are not UTF-8, nesting deeper than 64)
 * makes it hand that message back by index, and the caller decodes those with msgspec,
 * which gives them their values or their rejection reasons. Being stricter than msgspec
 * is always safe; being laxer never happens because every byte of an accepted message is
 * checked against the JSON grammar (RFC 8259) and UTF-8 (RFC 3629).
 *
 * decode(values, fields) -> (columns, fallback)
 *   values:   a list of bytes, one JSON message each
 *   fields:   a tuple of (name: str, kind: int, nullable: bool); kind 0 text, 1 int64,
 *             2 float64, 3 "must be the integer 1 if present" (checked, no column),
 *             4 text in the form of an RFC 3339 instant (else handed back; see rfc3339_form)
 *   columns:  per field of kind 0..2 and 4, in order: (validity bytes | None, values bytes,
 *             text bytes | None, null count); for text the values are int32 offsets
 *   fallback: the indexes (ascending) of the messages this module did not decode
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { KIND_TEXT = 0, KIND_INT64 = 1, KIND_FLOAT64 = 2, KIND_VERSION = 3, KIND_INSTANT = 4 };
#define IS_TEXT(kind) ((kind) == KIND_TEXT || (kind) == KIND_INSTANT)
#define MAX_FIELDS 32
#define MAX_DEPTH 64
#define MAX_NUMBER_TOKEN 63

typedef struct {
    char *data;
    Py_ssize_t len, cap;
} Buf;

static int buf_grow(Buf *b, Py_ssize_t extra) {
    Py_ssize_t cap = b->cap ? b->cap : 1024;
    while (cap < b->len + extra) cap *= 2;
    char *grown = realloc(b->data, (size_t)cap);
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = grown;
    b->cap = cap;
    return 0;
}

static inline int buf_append(Buf *b, const void *src, Py_ssize_t n) {
    if (n == 0) return 0; /* (memcpy of nothing to a buffer not yet allocated is still undefined) */
    if (b->len + n > b->cap && buf_grow(b, n) < 0) return -1;
    memcpy(b->data + b->len, src, (size_t)n);
    b->len += n;
    return 0;
}

typedef struct {
    const char *name;
    Py_ssize_t name_len;
    int kind;
    int nullable;
    /* Output. */
    Buf validity, values, text;
    Py_ssize_t nulls;
} Column;

typedef struct {
    int present, is_null;
    const unsigned char *text;
    Py_ssize_t text_len;
    int64_t integer;
    double real;
} Slot;

typedef struct {
    const unsigned char *p, *end;
} Cursor;

static inline void skip_ws(Cursor *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r')) c->p++;
}

static inline int is_hex(unsigned char ch) {
    return (ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f') || (ch >= 'A' && ch <= 'F');
}

static inline int hex_value(unsigned char ch) {
    if (ch <= '9') return ch - '0';
    if (ch >= 'a') return ch - 'a' + 10;
    return ch - 'A' + 10;
}

/* One UTF-8 sequence starting at a byte >= 0x80 (RFC 3629: no overlongs, no surrogates,
 * nothing past U+10FFFF); advances past it. 0: valid, -1: not. */
static inline int skip_utf8(Cursor *c) {
    const unsigned char *p = c->p;
    Py_ssize_t left = c->end - p;
    unsigned char b0 = p[0];
    int more;
    unsigned char lo = 0x80, hi = 0xBF;
    if (b0 >= 0xC2 && b0 <= 0xDF) {
        more = 1;
    } else if (b0 == 0xE0) {
        more = 2; lo = 0xA0;
    } else if ((b0 >= 0xE1 && b0 <= 0xEC) || b0 == 0xEE || b0 == 0xEF) {
        more = 2;
    } else if (b0 == 0xED) {
        more = 2; hi = 0x9F;
    } else if (b0 == 0xF0) {
        more = 3; lo = 0x90;
    } else if (b0 >= 0xF1 && b0 <= 0xF3) {
        more = 3;
    } else if (b0 == 0xF4) {
        more = 3; hi = 0x8F;
    } else {
        return -1;
    }
    if (left <= more) return -1;
    if (p[1] < lo || p[1] > hi) return -1;
    for (int i = 2; i <= more; i++) {
        if (p[i] < 0x80 || p[i] > 0xBF) return -1;
    }
    c->p = p + more + 1;
    return 0;
}

/* A JSON string at c->p (which is '"'). With escapes == 0 a backslash is refused (the
 * text is then exactly the bytes between the quotes); with escapes == 1 escapes are
 * checked and skipped (\u escapes of surrogates are refused: msgspec's view of a lone
 * surrogate is not ours to guess). 0: ok, -1: hand the message back. */
/* The index of the first byte of ``word`` that is '"', '\\', below 0x20 or above 0x7F, or
 * 8 when none is (bytes in memory order; the has-zero-byte trick: a borrow can only
 * flag bytes above a flagged one, so the lowest flag is exact). */
static inline int first_special(uint64_t word) {
    const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
    uint64_t quote = word ^ (ones * '"'), backslash = word ^ (ones * '\\');
    uint64_t flags = ((quote - ones) & ~quote) | ((backslash - ones) & ~backslash) | ((word - ones * 0x20) & ~word) |
                     word;
    flags &= highs;
    if (flags == 0) return 8;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    return __builtin_clzll(flags) / 8;
#else
    return __builtin_ctzll(flags) / 8;
#endif
}

static int scan_string(Cursor *c, int escapes, const unsigned char **text, Py_ssize_t *text_len) {
    const unsigned char *start = ++c->p;
    while (c->p < c->end) {
        while (c->end - c->p >= 8) { /* plain ASCII 8 bytes at a time */
            uint64_t word;
            memcpy(&word, c->p, sizeof word);
            int at = first_special(word);
            c->p += at;
            if (at < 8) break;
        }
        if (c->p >= c->end) break;
        unsigned char ch = *c->p;
        if (ch == '"') {
            if (text != NULL) {
                *text = start;
                *text_len = c->p - start;
            }
            c->p++;
            return 0;
        }
        if (ch < 0x20) return -1;
        if (ch == '\\') {
            if (!escapes || c->end - c->p < 2) return -1;
            unsigned char e = c->p[1];
            if (e == 'u') {
                if (c->end - c->p < 6) return -1;
                for (int i = 2; i < 6; i++) {
                    if (!is_hex(c->p[i])) return -1;
                }
                int unit = (hex_value(c->p[2]) << 12) | (hex_value(c->p[3]) << 8) |
                           (hex_value(c->p[4]) << 4) | hex_value(c->p[5]);
                if (unit >= 0xD800 && unit <= 0xDFFF) return -1;
                c->p += 6;
            } else if (e == '"' || e == '\\' || e == '/' || e == 'b' || e == 'f' || e == 'n' || e == 'r' ||
                       e == 't') {
                c->p += 2;
            } else {
                return -1;
            }
            continue;
        }
        if (ch < 0x80) {
            c->p++;
        } else if (skip_utf8(c) < 0) {
            return -1;
        }
    }
    return -1;
}

/* A JSON number (RFC 8259 grammar) at c->p. *integer: whether it has no fraction and no
 * exponent. 0: ok, -1: not a number. */
static int scan_number(Cursor *c, int *integer) {
    const unsigned char *p = c->p, *end = c->end;
    *integer = 1;
    if (p < end && *p == '-') p++;
    if (p >= end) return -1;
    if (*p == '0') {
        p++;
    } else if (*p >= '1' && *p <= '9') {
        while (p < end && *p >= '0' && *p <= '9') p++;
    } else {
        return -1;
    }
    if (p < end && *p == '.') {
        *integer = 0;
        p++;
        if (p >= end || *p < '0' || *p > '9') return -1;
        while (p < end && *p >= '0' && *p <= '9') p++;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        *integer = 0;
        p++;
        if (p < end && (*p == '+' || *p == '-')) p++;
        if (p >= end || *p < '0' || *p > '9') return -1;
        while (p < end && *p >= '0' && *p <= '9') p++;
    }
    c->p = p;
    return 0;
}

static int literal(Cursor *c, const char *word, Py_ssize_t n) {
    if (c->end - c->p < n || memcmp(c->p, word, (size_t)n) != 0) return -1;
    c->p += n;
    return 0;
}

/* Any JSON value, checked and skipped. 0: ok, -1: hand the message back. */
static int skip_value(Cursor *c, int depth) {
    if (c->p >= c->end || depth > MAX_DEPTH) return -1;
    int integer;
    switch (*c->p) {
    case '"':
        return scan_string(c, 1, NULL, NULL);
    case '{':
        c->p++;
        skip_ws(c);
        if (c->p < c->end && *c->p == '}') {
            c->p++;
            return 0;
        }
        for (;;) {
            if (c->p >= c->end || *c->p != '"' || scan_string(c, 1, NULL, NULL) < 0) return -1;
            skip_ws(c);
            if (c->p >= c->end || *c->p != ':') return -1;
            c->p++;
            skip_ws(c);
            if (skip_value(c, depth + 1) < 0) return -1;
            skip_ws(c);
            if (c->p >= c->end) return -1;
            if (*c->p == '}') {
                c->p++;
                return 0;
            }
            if (*c->p != ',') return -1;
            c->p++;
            skip_ws(c);
        }
    case '[':
        c->p++;
        skip_ws(c);
        if (c->p < c->end && *c->p == ']') {
            c->p++;
            return 0;
        }
        for (;;) {
            if (skip_value(c, depth + 1) < 0) return -1;
            skip_ws(c);
            if (c->p >= c->end) return -1;
            if (*c->p == ']') {
                c->p++;
                return 0;
            }
            if (*c->p != ',') return -1;
            c->p++;
            skip_ws(c);
        }
    case 't':
        return literal(c, "true", 4);
    case 'f':
        return literal(c, "false", 5);
    case 'n':
        return literal(c, "null", 4);
    default:
        return scan_number(c, &integer);
    }
}

/* Whether a number token that parsed to 0.0 had a non-zero digit before its exponent
 * (an underflow: left to msgspec). */
static int nonzero_mantissa(const unsigned char *p, const unsigned char *end) {
    for (; p < end && *p != 'e' && *p != 'E'; p++) {
        if (*p >= '1' && *p <= '9') return 1;
    }
    return 0;
}

static inline int digits(const unsigned char *p, int n) {
    for (int i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9') return 0;
    }
    return 1;
}

/* Whether an event time is written as infra.arrow_times.RFC3339_PATTERN says (the SDK's
 * form; its values, such as a 30th of February, are still Arrow's to judge):
 * YYYY-MM-DD[Tt ]hh:mm:ss(.d+)?([Zz]|[+-]hh:?mm). 0: it is, -1: hand the message back. */
static int rfc3339_form(const unsigned char *p, Py_ssize_t n) {
    if (n < 20 || !digits(p, 4) || p[4] != '-' || !digits(p + 5, 2) || p[7] != '-' || !digits(p + 8, 2)) return -1;
    if ((p[10] != 'T' && p[10] != 't' && p[10] != ' ') || !digits(p + 11, 2) || p[13] != ':' || !digits(p + 14, 2) ||
        p[16] != ':' || !digits(p + 17, 2))
        return -1;
    Py_ssize_t i = 19;
    if (p[i] == '.') {
        Py_ssize_t first = ++i;
        while (i < n && p[i] >= '0' && p[i] <= '9') i++;
        if (i == first) return -1;
    }
    if (i < n && (p[i] == 'Z' || p[i] == 'z')) return i + 1 == n ? 0 : -1;
    if (i >= n || (p[i] != '+' && p[i] != '-')) return -1;
    Py_ssize_t left = n - i - 1;
    if (left == 5) return digits(p + i + 1, 2) && p[i + 3] == ':' && digits(p + i + 4, 2) ? 0 : -1;
    if (left == 4) return digits(p + i + 1, 4) ? 0 : -1;
    return -1;
}

/* A read field's value into its slot. 0: ok, -1: hand the message back. */
static int read_value(Cursor *c, const Column *column, Slot *slot) {
    if (c->p >= c->end) return -1;
    if (*c->p == 'n') {
        if (!column->nullable || literal(c, "null", 4) < 0) return -1;
        slot->is_null = 1;
        return 0;
    }
    if (IS_TEXT(column->kind)) {
        if (*c->p != '"' || scan_string(c, 0, &slot->text, &slot->text_len) < 0) return -1;
        return column->kind == KIND_INSTANT ? rfc3339_form(slot->text, slot->text_len) : 0;
    }
    const unsigned char *start = c->p;
    int integer;
    if (scan_number(c, &integer) < 0) return -1;
    Py_ssize_t n = c->p - start;
    if (column->kind == KIND_VERSION) {
        return (n == 1 && start[0] == '1') ? 0 : -1;
    }
    if (column->kind == KIND_INT64) {
        Py_ssize_t digits = n - (start[0] == '-');
        if (!integer || digits > 18) return -1; /* 18 digits always fit int64 */
        int64_t value = 0;
        for (const unsigned char *p = start + (start[0] == '-'); p < c->p; p++) value = value * 10 + (*p - '0');
        slot->integer = start[0] == '-' ? -value : value;
        return 0;
    }
    /* KIND_FLOAT64: msgspec takes integers and decimals alike; very long tokens are left to it. */
    if (n > MAX_NUMBER_TOKEN || (integer && n > 15)) return -1;
    char token[MAX_NUMBER_TOKEN + 1];
    memcpy(token, start, (size_t)n);
    token[n] = '\0';
    char *stop = NULL;
    double value = PyOS_string_to_double(token, &stop, NULL); /* locale-independent, correctly rounded */
    if (value == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    if (stop != token + n || !isfinite(value) || (value == 0.0 && nonzero_mantissa(start, c->p))) return -1;
    slot->real = integer && value == 0.0 ? 0.0 : value; /* msgspec reads "-0" as the integer 0: +0.0 */
    return 0;
}

static int find_field(const Column *columns, int count, const unsigned char *key, Py_ssize_t key_len) {
    for (int i = 0; i < count; i++) {
        if (columns[i].name_len == key_len && memcmp(columns[i].name, key, (size_t)key_len) == 0) return i;
    }
    return -1;
}

/* One message into slots. 0: decoded, -1: hand it back. */
static int parse_message(const unsigned char *data, Py_ssize_t size, const Column *columns, int count,
                         Slot *slots) {
    Cursor c = {data, data + size};
    memset(slots, 0, sizeof(Slot) * (size_t)count);
    skip_ws(&c);
    if (c.p >= c.end || *c.p != '{') return -1;
    c.p++;
    skip_ws(&c);
    if (c.p < c.end && *c.p == '}') {
        c.p++;
    } else {
        for (;;) {
            const unsigned char *key;
            Py_ssize_t key_len;
            /* No escapes in top-level keys: "user\u005fid" would be a read field. */
            if (c.p >= c.end || *c.p != '"' || scan_string(&c, 0, &key, &key_len) < 0) return -1;
            skip_ws(&c);
            if (c.p >= c.end || *c.p != ':') return -1;
            c.p++;
            skip_ws(&c);
            int index = find_field(columns, count, key, key_len);
            if (index < 0) {
                if (skip_value(&c, 1) < 0) return -1;
            } else {
                if (slots[index].present) return -1; /* a repeated read field: msgspec's call */
                slots[index].present = 1;
                if (read_value(&c, &columns[index], &slots[index]) < 0) return -1;
            }
            skip_ws(&c);
            if (c.p >= c.end) return -1;
            if (*c.p == '}') {
                c.p++;
                break;
            }
            if (*c.p != ',') return -1;
            c.p++;
            skip_ws(&c);
        }
    }
    skip_ws(&c);
    return c.p == c.end ? 0 : -1;
}

/* The decoded message's slots appended to the columns (row ``row``). */
static int append_row(Column *columns, int count, const Slot *slots, Py_ssize_t row) {
    for (int i = 0; i < count; i++) {
        Column *column = &columns[i];
        if (column->kind == KIND_VERSION) continue;
        const Slot *slot = &slots[i];
        int valid = slot->present && !slot->is_null;
        if (row % 8 == 0) {
            unsigned char zero = 0;
            if (buf_append(&column->validity, &zero, 1) < 0) return -1;
        }
        if (valid) {
            column->validity.data[row / 8] |= (char)(1u << (row % 8));
        } else {
            column->nulls++;
        }
        if (IS_TEXT(column->kind)) {
            if (valid && buf_append(&column->text, slot->text, slot->text_len) < 0) return -1;
            int32_t offset = (int32_t)column->text.len;
            if (buf_append(&column->values, &offset, sizeof offset) < 0) return -1;
        } else if (column->kind == KIND_INT64) {
            int64_t value = valid ? slot->integer : 0;
            if (buf_append(&column->values, &value, sizeof value) < 0) return -1;
        } else {
            double value = valid ? slot->real : 0.0;
            if (buf_append(&column->values, &value, sizeof value) < 0) return -1;
        }
    }
    return 0;
}

static int setup_columns(PyObject *fields, Column *columns, int *count) {
    if (!PyTuple_Check(fields) || PyTuple_GET_SIZE(fields) > MAX_FIELDS) {
        PyErr_Format(PyExc_ValueError, "fields must be a tuple of at most %d (name, kind, nullable)", MAX_FIELDS);
        return -1;
    }
    *count = (int)PyTuple_GET_SIZE(fields);
    for (int i = 0; i < *count; i++) {
        PyObject *spec = PyTuple_GET_ITEM(fields, i);
        PyObject *name;
        int kind, nullable;
        if (!PyArg_ParseTuple(spec, "Uip", &name, &kind, &nullable)) return -1;
        if (kind < KIND_TEXT || kind > KIND_INSTANT) {
            PyErr_Format(PyExc_ValueError, "unknown field kind %d", kind);
            return -1;
        }
        columns[i].name = PyUnicode_AsUTF8AndSize(name, &columns[i].name_len);
        if (columns[i].name == NULL) return -1;
        columns[i].kind = kind;
        columns[i].nullable = nullable;
        if (IS_TEXT(kind)) {
            int32_t zero = 0;
            if (buf_append(&columns[i].values, &zero, sizeof zero) < 0) return -1;
        }
    }
    return 0;
}

static PyObject *bytes_of(const Buf *b) { return PyBytes_FromStringAndSize(b->data ? b->data : "", b->len); }

static PyObject *column_result(const Column *column) {
    PyObject *validity = column->nulls ? bytes_of(&column->validity) : Py_NewRef(Py_None);
    PyObject *values = bytes_of(&column->values);
    PyObject *text = IS_TEXT(column->kind) ? bytes_of(&column->text) : Py_NewRef(Py_None);
    if (validity == NULL || values == NULL || text == NULL) {
        Py_XDECREF(validity);
        Py_XDECREF(values);
        Py_XDECREF(text);
        return NULL;
    }
    return Py_BuildValue("(NNNn)", validity, values, text, column->nulls);
}

static PyObject *decode(PyObject *module, PyObject *args) {
    PyObject *values, *fields;
    if (!PyArg_ParseTuple(args, "O!O", &PyList_Type, &values, &fields)) return NULL;
    Column columns[MAX_FIELDS];
    Slot slots[MAX_FIELDS];
    memset(columns, 0, sizeof columns);
    int count = 0;
    PyObject *fallback = NULL, *result = NULL, *outputs = NULL;
    if (setup_columns(fields, columns, &count) < 0) goto done;
    fallback = PyList_New(0);
    if (fallback == NULL) goto done;
    Py_ssize_t rows = 0, n = PyList_GET_SIZE(values);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *value = PyList_GET_ITEM(values, i);
        int decoded = 0;
        if (PyBytes_CheckExact(value)) {
            const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(value);
            decoded = parse_message(data, PyBytes_GET_SIZE(value), columns, count, slots) == 0;
        }
        if (decoded) {
            for (int k = 0; k < count; k++) { /* int32 offsets: never let a column pass 2 GiB */
                if (IS_TEXT(columns[k].kind) && columns[k].text.len + slots[k].text_len > INT32_MAX) decoded = 0;
            }
        }
        if (decoded) {
            if (append_row(columns, count, slots, rows) < 0) goto done;
            rows++;
        } else {
            PyObject *index = PyLong_FromSsize_t(i);
            if (index == NULL || PyList_Append(fallback, index) < 0) {
                Py_XDECREF(index);
                goto done;
            }
            Py_DECREF(index);
        }
    }
    outputs = PyList_New(0);
    if (outputs == NULL) goto done;
    for (int k = 0; k < count; k++) {
        if (columns[k].kind == KIND_VERSION) continue;
        PyObject *column = column_result(&columns[k]);
        if (column == NULL || PyList_Append(outputs, column) < 0) {
            Py_XDECREF(column);
            goto done;
        }
        Py_DECREF(column);
    }
    result = PyTuple_Pack(2, outputs, fallback);
done:
    for (int k = 0; k < MAX_FIELDS; k++) {
        free(columns[k].validity.data);
        free(columns[k].values.data);
        free(columns[k].text.data);
    }
    Py_XDECREF(outputs);
    Py_XDECREF(fallback);
    return result;
}

static PyMethodDef methods[] = {
    {"decode", decode, METH_VARARGS,
     "decode(values, fields) -> (columns, fallback): JSON messages into Arrow column buffers; see the module source."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_fastdecode",
    "JSON event messages straight into Arrow column buffers (the stream engine's decode fast path).", -1, methods,
};

PyMODINIT_FUNC PyInit__fastdecode(void) { return PyModule_Create(&module_def); }
