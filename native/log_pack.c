/* log_pack.c: pack_log_entries, the Redis ledger log's M/D records for dirty engine hashes
 * (indexer/index/ledger.py, written by indexer/index/redis.py), packed in one pass instead
 * of one struct.pack and dict lookups per hash in Python.
 *
 * For each hash: b"M" + hash + key (u64 LE each) + tier mask (u8) when `keys` maps it, else
 * b"D" + hash: struct formats "<cQQB" and "<cQ" of indexer/index/ledger.py (LOG_MAP,
 * LOG_HASH), in the iteration order of `hashes`.
 */
#include "native.h"
#include "bytebuf.h"

static int
dict_u64(PyObject *dict, PyObject *key, uint64_t *value, int *found)
{
    PyObject *item = PyDict_GetItemWithError(dict, key);
    if (item == NULL) {
        *found = 0;
        return PyErr_Occurred() ? -1 : 0;
    }
    *found = 1;
    unsigned long long v = PyLong_AsUnsignedLongLong(item);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        return -1;
    }
    *value = (uint64_t)v;
    return 0;
}

PyObject *
pack_log_entries(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyDict_Check(args[1]) || !PyDict_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "pack_log_entries(hashes, keys: dict, tiers: dict)");
        return NULL;
    }
    PyObject *iter = PyObject_GetIter(args[0]);
    if (iter == NULL) {
        return NULL;
    }
    ByteBuf out = {NULL, 0, 0};
    PyObject *item;
    while ((item = PyIter_Next(iter)) != NULL) {
        unsigned char entry[18];
        uint64_t hash, key, tiers = 0;
        int has_key, has_tiers;
        unsigned long long h = PyLong_AsUnsignedLongLong(item);
        int failed = (h == (unsigned long long)-1 && PyErr_Occurred()) ||
                     dict_u64(args[1], item, &key, &has_key) < 0 ||
                     (has_key && dict_u64(args[2], item, &tiers, &has_tiers) < 0);
        Py_DECREF(item);
        if (failed) {
            goto fail;
        }
        hash = (uint64_t)h;
        if (tiers > 0xFF) {
            PyErr_SetString(PyExc_OverflowError, "tier mask does not fit a byte");
            goto fail;
        }
        entry[0] = has_key ? 'M' : 'D';
        put_u64_le(entry + 1, hash);
        if (has_key) {
            put_u64_le(entry + 9, key);
            entry[17] = (unsigned char)tiers;
        }
        if (buf_put(&out, entry, has_key ? 18 : 9) < 0) {
            goto fail;
        }
    }
    if (PyErr_Occurred()) {
        goto fail;
    }
    Py_DECREF(iter);
    PyObject *result = PyBytes_FromStringAndSize(out.data ? (const char *)out.data : "",
                                                 (Py_ssize_t)out.len);
    PyMem_Free(out.data);
    return result;
fail:
    Py_DECREF(iter);
    PyMem_Free(out.data);
    return NULL;
}
