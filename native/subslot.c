/* subslot.c: the client's side of a sub-slot Score (indexer/index/redis_sharded.py),
 * without a Python object per key.
 *
 *   subslot_split(packed, subslots) -> list[tuple[bytes, bytes]]: per sub-slot k, the
 *       query's keys with key % subslots == k (u64 LE, in query order) and their positions
 *       in the query (u32 LE, ascending).
 *   subslot_merge(replies, positions, n) -> list: the sub-slots' replies (runs of equal
 *       values, flat [value, count, ...], each up to its first unheld key) merged by query
 *       position up to the first position nobody holds, as runs again. `positions` are
 *       subslot_split's; `n` the query's number of keys.
 */
#include "native.h"

#include <string.h>

const char subslot_split_doc[] =
    "subslot_split(packed, subslots) -> list[tuple[bytes, bytes]]: per sub-slot its keys "
    "(u64 LE, key % subslots) and their query positions (u32 LE).";

const char subslot_merge_doc[] =
    "subslot_merge(replies, positions, n) -> list: the sub-slots' runs merged by query "
    "position up to the first position nobody holds, as runs [value, count, ...].";

static uint64_t
get_u64_le(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) {
        v = (v << 8) | p[i];
    }
    return v;
}

static uint32_t
get_u32_le(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void
put_u32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static PyObject *
split_parts(const unsigned char *keys, Py_ssize_t n, Py_ssize_t subslots, Py_ssize_t *counts)
{
    PyObject *out = PyList_New(subslots);
    if (out == NULL) {
        return NULL;
    }
    for (Py_ssize_t k = 0; k < subslots; k++) {
        PyObject *packed = PyBytes_FromStringAndSize(NULL, counts[k] * 8);
        PyObject *where = PyBytes_FromStringAndSize(NULL, counts[k] * 4);
        PyObject *pair = (packed && where) ? PyTuple_Pack(2, packed, where) : NULL;
        Py_XDECREF(packed);
        Py_XDECREF(where);
        if (pair == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, k, pair);
        counts[k] = 0;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t k = (Py_ssize_t)(get_u64_le(keys + i * 8) % (uint64_t)subslots);
        PyObject *pair = PyList_GET_ITEM(out, k);
        unsigned char *packed = (unsigned char *)PyBytes_AS_STRING(PyTuple_GET_ITEM(pair, 0));
        unsigned char *where = (unsigned char *)PyBytes_AS_STRING(PyTuple_GET_ITEM(pair, 1));
        memcpy(packed + counts[k] * 8, keys + i * 8, 8);
        put_u32(where + counts[k] * 4, (uint32_t)i);
        counts[k]++;
    }
    return out;
}

PyObject *
subslot_split(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyBytes_Check(args[0]) || !PyLong_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "subslot_split(packed: bytes, subslots: int)");
        return NULL;
    }
    Py_ssize_t subslots = PyLong_AsSsize_t(args[1]);
    if (subslots == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    if (subslots < 1 || subslots > 65536 || size % 8 || size / 8 > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "subslot_split: 1..65536 sub-slots, u64 keys");
        return NULL;
    }
    const unsigned char *keys = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = size / 8;
    Py_ssize_t *counts = PyMem_Calloc((size_t)subslots, sizeof(Py_ssize_t));
    if (counts == NULL) {
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        counts[get_u64_le(keys + i * 8) % (uint64_t)subslots]++;
    }
    PyObject *out = split_parts(keys, n, subslots, counts);
    PyMem_Free(counts);
    return out;
}

/* The number of values `runs` ([value, count, ...]) expands to; -1 on a bad reply. */
static Py_ssize_t
runs_length(PyObject *runs, Py_ssize_t limit)
{
    Py_ssize_t len = PyList_GET_SIZE(runs), total = 0;
    if (len % 2) {
        PyErr_SetString(PyExc_ValueError, "subslot_merge: a reply of odd length");
        return -1;
    }
    for (Py_ssize_t j = 1; j < len; j += 2) {
        Py_ssize_t count = PyLong_AsSsize_t(PyList_GET_ITEM(runs, j));
        if (count == -1 && PyErr_Occurred()) {
            return -1;
        }
        if (count < 1 || count > limit - total) {
            PyErr_SetString(PyExc_ValueError, "subslot_merge: a run count out of range");
            return -1;
        }
        total += count;
    }
    return total;
}

static int
values_equal(PyObject *a, PyObject *b)
{
    if (a == b) {
        return 1;
    }
    if (PyBytes_CheckExact(a) && PyBytes_CheckExact(b)) {
        return PyBytes_GET_SIZE(a) == PyBytes_GET_SIZE(b) &&
               memcmp(PyBytes_AS_STRING(a), PyBytes_AS_STRING(b),
                      (size_t)PyBytes_GET_SIZE(a)) == 0;
    }
    return PyObject_RichCompareBool(a, b, Py_EQ);
}

/* Runs of equal values of merged[0..end), flat. */
static PyObject *
runs_of(PyObject **merged, Py_ssize_t end)
{
    PyObject *out = PyList_New(0);
    Py_ssize_t start = 0;
    while (out != NULL && start < end) {
        Py_ssize_t stop = start + 1;
        int same = 1;
        while (stop < end && (same = values_equal(merged[start], merged[stop])) == 1) {
            stop++;
        }
        PyObject *count = (stop < end && same < 0) ? NULL : PyLong_FromSsize_t(stop - start);
        if (count == NULL || PyList_Append(out, merged[start]) < 0 ||
            PyList_Append(out, count) < 0) {
            Py_XDECREF(count);
            Py_CLEAR(out);
            break;
        }
        Py_DECREF(count);
        start = stop;
    }
    return out;
}

static int
merge_into(PyObject **merged, Py_ssize_t end, PyObject *runs, const unsigned char *where)
{
    Py_ssize_t at = 0;
    for (Py_ssize_t j = 0; j < PyList_GET_SIZE(runs); j += 2) {
        PyObject *value = PyList_GET_ITEM(runs, j);
        Py_ssize_t count = PyLong_AsSsize_t(PyList_GET_ITEM(runs, j + 1));
        for (Py_ssize_t c = 0; c < count; c++, at++) {
            uint32_t position = get_u32_le(where + at * 4);
            if ((Py_ssize_t)position >= end) {
                return 0; /* positions ascend: the rest is past the end too */
            }
            merged[position] = value;
        }
    }
    return 0;
}

PyObject *
subslot_merge(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyList_Check(args[0]) || !PyList_Check(args[1]) ||
        PyList_GET_SIZE(args[0]) != PyList_GET_SIZE(args[1])) {
        PyErr_SetString(PyExc_TypeError,
                        "subslot_merge(replies: list, positions: list (same length), n: int)");
        return NULL;
    }
    Py_ssize_t n = PyLong_AsSsize_t(args[2]), end = n;
    if (n < 0) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError, "subslot_merge: n < 0");
        }
        return NULL;
    }
    Py_ssize_t parts = PyList_GET_SIZE(args[0]);
    for (Py_ssize_t k = 0; k < parts; k++) {
        PyObject *runs = PyList_GET_ITEM(args[0], k);
        PyObject *where = PyList_GET_ITEM(args[1], k);
        if (!PyList_Check(runs) || !PyBytes_Check(where) || PyBytes_GET_SIZE(where) % 4) {
            PyErr_SetString(PyExc_TypeError, "subslot_merge: a reply list and u32 positions");
            return NULL;
        }
        Py_ssize_t keys = PyBytes_GET_SIZE(where) / 4;
        Py_ssize_t held = runs_length(runs, keys);
        if (held < 0) {
            return NULL;
        }
        if (held < keys) {
            uint32_t first_unheld = get_u32_le((const unsigned char *)PyBytes_AS_STRING(where)
                                               + held * 4);
            if ((Py_ssize_t)first_unheld < end) {
                end = (Py_ssize_t)first_unheld;
            }
        }
    }
    PyObject **merged = PyMem_Calloc((size_t)(end ? end : 1), sizeof(PyObject *));
    if (merged == NULL) {
        return PyErr_NoMemory();
    }
    for (Py_ssize_t k = 0; k < parts; k++) {
        merge_into(merged, end, PyList_GET_ITEM(args[0], k),
                   (const unsigned char *)PyBytes_AS_STRING(PyList_GET_ITEM(args[1], k)));
    }
    for (Py_ssize_t i = 0; i < end; i++) {
        if (merged[i] == NULL) {
            PyMem_Free(merged);
            PyErr_SetString(PyExc_ValueError,
                            "subslot_merge: a sub-slot stopped before the first unheld position");
            return NULL;
        }
    }
    PyObject *out = runs_of(merged, end);
    PyMem_Free(merged);
    return out;
}
