/* block_table.c: BlockTable (kvcore._native.BlockTable), u64 block key -> presence mask
 * (exact int), the in-memory index's hash table (indexer/index/block_table.py).
 *
 * Open addressing with linear probing and backward-shift deletion, entries {key, mask}
 * inline, so a lookup costs one cache line instead of a dict's index, entry and key object.
 * Slots come from a keyed mix of the key (the secret is drawn per table by the caller), so
 * crafted prompts cannot aim at one probe run. Masks are exact ints: no reference cycles,
 * no GC tracking.
 *
 * mask_runs() runs the chained block-key loop of chain.c itself, so the keys are hashed and
 * probed in one loop: xxHash is compiled in here too (XXH_INLINE_ALL), and the table's
 * probe helpers are in this file, so both inline into that loop.
 */
#include "native.h"
#include "tokens.h"

#define XXH_INLINE_ALL
#include "xxhash.h"

typedef struct {
    uint64_t key;
    PyObject *mask; /* NULL: empty slot */
} TableEntry;

typedef struct {
    PyObject_HEAD
    TableEntry *entries;
    size_t capacity; /* a power of two, or 0 before the first insert */
    size_t used;
    uint64_t secret;
} BlockTable;

#define TABLE_MIN_CAPACITY 64
#define PREFETCH_AHEAD 8

static inline size_t
table_slot(const BlockTable *table, uint64_t key)
{
    uint64_t h = key ^ table->secret;
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return (size_t)h & (table->capacity - 1);
}

/* The entry holding key, or NULL. */
static inline TableEntry *
table_find(const BlockTable *table, uint64_t key)
{
    if (table->capacity == 0) {
        return NULL;
    }
    size_t wrap = table->capacity - 1;
    for (size_t i = table_slot(table, key);; i = (i + 1) & wrap) {
        TableEntry *entry = &table->entries[i];
        if (entry->mask == NULL) {
            return NULL;
        }
        if (entry->key == key) {
            return entry;
        }
    }
}

static int
table_resize(BlockTable *table, size_t capacity)
{
    TableEntry *old = table->entries;
    size_t old_capacity = table->capacity;
    TableEntry *fresh = PyMem_Calloc(capacity, sizeof(TableEntry));
    if (fresh == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    table->entries = fresh;
    table->capacity = capacity;
    for (size_t i = 0; i < old_capacity; i++) {
        if (old[i].mask != NULL) {
            size_t j = table_slot(table, old[i].key);
            while (fresh[j].mask != NULL) {
                j = (j + 1) & (capacity - 1);
            }
            fresh[j] = old[i];
        }
    }
    PyMem_Free(old);
    return 0;
}

/* The entry for key, inserted empty-masked (mask NULL) when missing; NULL on error. */
static TableEntry *
table_find_or_insert(BlockTable *table, uint64_t key)
{
    if ((table->used + 1) * 8 > table->capacity * 5) { /* load factor <= 5/8 */
        size_t capacity = table->capacity ? table->capacity * 2 : TABLE_MIN_CAPACITY;
        if (table_resize(table, capacity) < 0) {
            return NULL;
        }
    }
    size_t wrap = table->capacity - 1;
    for (size_t i = table_slot(table, key);; i = (i + 1) & wrap) {
        TableEntry *entry = &table->entries[i];
        if (entry->mask == NULL || entry->key == key) {
            entry->key = key;
            return entry;
        }
    }
}

/* Empty the entry and shift later members of its probe run back (no tombstones). */
static void
table_delete(BlockTable *table, TableEntry *entry)
{
    size_t wrap = table->capacity - 1;
    size_t hole = (size_t)(entry - table->entries);
    Py_CLEAR(table->entries[hole].mask);
    table->used--;
    for (size_t j = (hole + 1) & wrap; table->entries[j].mask != NULL; j = (j + 1) & wrap) {
        size_t home = table_slot(table, table->entries[j].key);
        /* j may move to the hole when its home is not cyclically within (hole, j]. */
        int stays = hole <= j ? (hole < home && home <= j) : (hole < home || home <= j);
        if (!stays) {
            table->entries[hole] = table->entries[j];
            table->entries[j].mask = NULL;
            hole = j;
        }
    }
}

static int
parse_key(PyObject *obj, uint64_t *key)
{
    return parse_u64(obj, "block key", key);
}

static int
require_exact_int(PyObject *obj, const char *what)
{
    if (!PyLong_CheckExact(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, not %.100s", what,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    return 0;
}

static PyObject *
table_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"secret", NULL};
    unsigned long long secret = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|K:BlockTable", kwlist, &secret)) {
        return NULL;
    }
    BlockTable *table = (BlockTable *)type->tp_alloc(type, 0);
    if (table != NULL) {
        table->secret = (uint64_t)secret;
    }
    return (PyObject *)table;
}

static void
table_clear_all(BlockTable *table)
{
    for (size_t i = 0; i < table->capacity; i++) {
        Py_CLEAR(table->entries[i].mask);
    }
    PyMem_Free(table->entries);
    table->entries = NULL;
    table->capacity = 0;
    table->used = 0;
}

static void
table_dealloc(BlockTable *table)
{
    table_clear_all(table);
    Py_TYPE(table)->tp_free((PyObject *)table);
}

static Py_ssize_t
table_len(BlockTable *table)
{
    return (Py_ssize_t)table->used;
}

static PyObject *
table_get(BlockTable *table, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t key;
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get(key, default=0)");
        return NULL;
    }
    if (parse_key(args[0], &key) < 0) {
        return NULL;
    }
    TableEntry *entry = table_find(table, key);
    if (entry != NULL) {
        return Py_NewRef(entry->mask);
    }
    return nargs == 2 ? Py_NewRef(args[1]) : PyLong_FromLong(0);
}

/* The (keys, int) arguments of set_bits and clear_bits: the keys as a fast sequence (a new
 * reference), the int (borrowed) in *value. */
static PyObject *
keys_and_int(PyObject *const *args, Py_ssize_t nargs, const char *usage, const char *what,
             PyObject **value)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, usage);
        return NULL;
    }
    if (require_exact_int(args[1], what) < 0) {
        return NULL;
    }
    *value = args[1];
    return PySequence_Fast(args[0], "keys must be a sequence of ints");
}

/* One call's last mask update, old -> new (both held): the blocks of one event mostly
 * carry the same mask object, and then share the updated one too, so equal masks along a
 * prefix stay one object (less memory; mask_runs compares them by identity). */
typedef struct {
    PyObject *old;
    PyObject *updated;
} MaskMemo;

static PyObject *
memo_apply(MaskMemo *memo, PyObject *mask, PyObject *operand,
           PyObject *(*op)(PyObject *, PyObject *))
{
    if (mask != memo->old) {
        PyObject *updated = op(mask, operand);
        if (updated == NULL) {
            return NULL;
        }
        Py_XSETREF(memo->old, Py_NewRef(mask));
        Py_XSETREF(memo->updated, updated);
    }
    return Py_NewRef(memo->updated);
}

static void
memo_clear(MaskMemo *memo)
{
    Py_CLEAR(memo->old);
    Py_CLEAR(memo->updated);
}

static PyObject *
table_set_bits(BlockTable *table, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *bit = NULL;
    PyObject *keys = keys_and_int(args, nargs, "set_bits(keys, bit)", "bit", &bit);
    if (keys == NULL) {
        return NULL;
    }
    MaskMemo memo = {NULL, NULL};
    Py_ssize_t n = PySequence_Fast_GET_SIZE(keys);
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t key;
        if (parse_key(PySequence_Fast_GET_ITEM(keys, i), &key) < 0) {
            goto fail;
        }
        TableEntry *entry = table_find_or_insert(table, key);
        if (entry == NULL) {
            goto fail;
        }
        if (entry->mask == NULL) {
            entry->mask = Py_NewRef(bit);
            table->used++;
            continue;
        }
        PyObject *mask = memo_apply(&memo, entry->mask, bit, PyNumber_Or);
        if (mask == NULL) {
            goto fail;
        }
        Py_SETREF(entry->mask, mask);
    }
    memo_clear(&memo);
    Py_DECREF(keys);
    Py_RETURN_NONE;
fail:
    memo_clear(&memo);
    Py_DECREF(keys);
    return NULL;
}

static PyObject *
table_clear_bits(BlockTable *table, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *keep = NULL;
    PyObject *keys = keys_and_int(args, nargs, "clear_bits(keys, keep)", "keep", &keep);
    if (keys == NULL) {
        return NULL;
    }
    MaskMemo memo = {NULL, NULL};
    Py_ssize_t n = PySequence_Fast_GET_SIZE(keys);
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t key;
        if (parse_key(PySequence_Fast_GET_ITEM(keys, i), &key) < 0) {
            goto fail;
        }
        TableEntry *entry = table_find(table, key);
        if (entry == NULL) {
            continue;
        }
        PyObject *mask = memo_apply(&memo, entry->mask, keep, PyNumber_And);
        if (mask == NULL) {
            goto fail;
        }
        int nonzero = PyObject_IsTrue(mask);
        if (nonzero) {
            Py_SETREF(entry->mask, mask);
        } else {
            Py_DECREF(mask);
            table_delete(table, entry);
        }
    }
    memo_clear(&memo);
    Py_DECREF(keys);
    if (table->capacity > TABLE_MIN_CAPACITY * 16 && table->used * 16 < table->capacity &&
        table_resize(table, table->capacity / 4) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
fail:
    memo_clear(&memo);
    Py_DECREF(keys);
    return NULL;
}

static PyObject *
table_items(BlockTable *table, PyObject *Py_UNUSED(ignored))
{
    PyObject *items = PyList_New((Py_ssize_t)table->used);
    if (items == NULL) {
        return NULL;
    }
    Py_ssize_t out = 0;
    /* Tuples are GC-tracked: allocating one may run a collection, and a finaliser could
     * change the table. Entries are re-read each step; a size change is an error. */
    for (size_t i = 0; i < table->capacity; i++) {
        TableEntry *entry = &table->entries[i];
        if (entry->mask == NULL) {
            continue;
        }
        if (out >= PyList_GET_SIZE(items)) {
            Py_DECREF(items);
            PyErr_SetString(PyExc_RuntimeError, "BlockTable changed size during items()");
            return NULL;
        }
        PyObject *mask = Py_NewRef(entry->mask); /* held across the tuple's allocation */
        PyObject *key = PyLong_FromUnsignedLongLong(entry->key);
        PyObject *pair = key == NULL ? NULL : PyTuple_Pack(2, key, mask);
        Py_XDECREF(key);
        Py_DECREF(mask);
        if (pair == NULL) {
            Py_DECREF(items);
            return NULL;
        }
        PyList_SET_ITEM(items, out++, pair);
    }
    if (out != PyList_GET_SIZE(items)) {
        Py_DECREF(items);
        PyErr_SetString(PyExc_RuntimeError, "BlockTable changed size during items()");
        return NULL;
    }
    return items;
}

static PyObject *
table_clear(BlockTable *table, PyObject *Py_UNUSED(ignored))
{
    table_clear_all(table);
    Py_RETURN_NONE;
}

/* Append one (mask, count) run to the flat list. */
static int
push_run(PyObject *runs, PyObject *mask, Py_ssize_t count)
{
    PyObject *n = PyLong_FromSsize_t(count);
    if (n == NULL) {
        return -1;
    }
    int failed = PyList_Append(runs, mask) < 0 || PyList_Append(runs, n) < 0;
    Py_DECREF(n);
    return failed ? -1 : 0;
}

/* Append a block key to a bytearray, 8 bytes little-endian. */
static int
append_key(PyObject *out, uint64_t key)
{
    unsigned char bytes[8];
    for (int b = 0; b < 8; b++) {
        bytes[b] = (unsigned char)(key >> (8 * b));
    }
    Py_ssize_t size = PyByteArray_GET_SIZE(out);
    if (PyByteArray_Resize(out, size + 8) < 0) {
        return -1;
    }
    memcpy(PyByteArray_AS_STRING(out) + size, bytes, 8);
    return 0;
}

/* get_many(keys): the mask of each key (8 bytes little-endian each), 0 when missing. */
static PyObject *
table_get_many(BlockTable *table, PyObject *packed)
{
    Py_buffer view;
    if (PyObject_GetBuffer(packed, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (view.len % 8) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "get_many: keys must be 8 bytes each");
        return NULL;
    }
    Py_ssize_t n = view.len / 8;
    PyObject *out = PyList_New(n);
    PyObject *zero = PyLong_FromLong(0);
    if (out == NULL || zero == NULL) {
        Py_XDECREF(out);
        Py_XDECREF(zero);
        PyBuffer_Release(&view);
        return NULL;
    }
    const unsigned char *bytes = view.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t key = 0;
        for (int b = 7; b >= 0; b--) {
            key = key << 8 | bytes[i * 8 + b];
        }
        TableEntry *entry = table_find(table, key);
        PyList_SET_ITEM(out, i, Py_NewRef(entry != NULL ? entry->mask : zero));
    }
    Py_DECREF(zero);
    PyBuffer_Release(&view);
    return out;
}

/* get_present(keys): {position: mask} of the keys (8 bytes little-endian each) held. */
static PyObject *
table_get_present(BlockTable *table, PyObject *packed)
{
    Py_buffer view;
    if (PyObject_GetBuffer(packed, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (view.len % 8) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "get_present: keys must be 8 bytes each");
        return NULL;
    }
    PyObject *out = PyDict_New();
    if (out == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    const unsigned char *bytes = view.buf;
    for (Py_ssize_t i = 0; i < view.len / 8; i++) {
        uint64_t key = 0;
        for (int b = 7; b >= 0; b--) {
            key = key << 8 | bytes[i * 8 + b];
        }
        TableEntry *entry = table_find(table, key);
        if (entry == NULL) {
            continue;
        }
        PyObject *mask = Py_NewRef(entry->mask); /* held across the dict's allocations */
        PyObject *position = PyLong_FromSsize_t(i);
        int failed = position == NULL || PyDict_SetItem(out, position, mask) < 0;
        Py_XDECREF(position);
        Py_DECREF(mask);
        if (failed) {
            Py_DECREF(out);
            PyBuffer_Release(&view);
            return NULL;
        }
    }
    PyBuffer_Release(&view);
    return out;
}

/* See the method's docstring. Keys are hashed a few blocks ahead of the probes so the
 * table's cache lines are already on their way. */
static PyObject *
table_mask_runs(BlockTable *table, PyObject *const *args, Py_ssize_t nargs)
{
    TokenSource src;
    uint64_t seed;
    uint64_t ahead[PREFETCH_AHEAD];
    PyObject *run_mask = NULL; /* borrowed from the table while the run grows */
    Py_ssize_t run_count = 0;
    if (nargs != 4 && nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "mask_runs(tokens, block_size, seed, wanted, keys_out=None)");
        return NULL;
    }
    PyObject *wanted = args[3] == Py_None ? NULL : args[3];
    if (wanted != NULL && require_exact_int(wanted, "wanted") < 0) {
        return NULL;
    }
    PyObject *keys_out = nargs == 5 && args[4] != Py_None ? args[4] : NULL;
    if (keys_out != NULL && !PyByteArray_CheckExact(keys_out)) {
        PyErr_SetString(PyExc_TypeError, "keys_out must be a bytearray or None");
        return NULL;
    }
    if (source_from_args(&src, args[0], args[1], args[2], &seed) < 0) {
        return NULL;
    }
    PyObject *runs = PyList_New(0);
    if (runs == NULL) {
        goto fail;
    }
    if (table->capacity == 0) {
        goto done;
    }
    for (Py_ssize_t base = 0; base < src.n_blocks; base += PREFETCH_AHEAD) {
        Py_ssize_t count = src.n_blocks - base < PREFETCH_AHEAD ? src.n_blocks - base
                                                                : PREFETCH_AHEAD;
        for (Py_ssize_t i = 0; i < count; i++) {
            const unsigned char *block = source_block(&src, base + i);
            if (block == NULL) {
                goto fail;
            }
            seed = XXH3_64bits_withSeed(block, (size_t)src.stride, seed);
            ahead[i] = seed;
            __builtin_prefetch(&table->entries[table_slot(table, seed)]);
        }
        for (Py_ssize_t i = 0; i < count; i++) {
            TableEntry *entry = table_find(table, ahead[i]);
            if (entry == NULL) {
                goto done;
            }
            PyObject *mask = entry->mask;
            if (run_mask != NULL) {
                int same = masks_equal(mask, run_mask);
                if (same < 0) {
                    goto fail;
                }
                if (same) {
                    if (keys_out != NULL && append_key(keys_out, ahead[i]) < 0) {
                        goto fail;
                    }
                    run_count++;
                    continue;
                }
            }
            if (wanted != NULL) {
                PyObject *shared = PyNumber_And(mask, wanted);
                if (shared == NULL) {
                    goto fail;
                }
                int any = PyObject_IsTrue(shared);
                Py_DECREF(shared);
                if (!any) {
                    goto done;
                }
            }
            if (run_mask != NULL && push_run(runs, run_mask, run_count) < 0) {
                goto fail;
            }
            if (keys_out != NULL && append_key(keys_out, ahead[i]) < 0) {
                goto fail;
            }
            run_mask = mask;
            run_count = 1;
        }
    }
done:
    if (run_mask != NULL && push_run(runs, run_mask, run_count) < 0) {
        goto fail;
    }
    source_close(&src);
    return runs;
fail:
    Py_XDECREF(runs);
    source_close(&src);
    return NULL;
}

static PyMethodDef table_methods[] = {
    {"get", (PyCFunction)(void (*)(void))table_get, METH_FASTCALL,
     "get(key, default=0): the mask of a block key."},
    {"set_bits", (PyCFunction)(void (*)(void))table_set_bits, METH_FASTCALL,
     "set_bits(keys, bit): OR the int bit into each key's mask (missing keys start at 0)."},
    {"clear_bits", (PyCFunction)(void (*)(void))table_clear_bits, METH_FASTCALL,
     "clear_bits(keys, keep): AND each present key's mask with keep; drop masks that reach 0."},
    {"items", (PyCFunction)table_items, METH_NOARGS, "items(): list of (key, mask)."},
    {"clear", (PyCFunction)table_clear, METH_NOARGS, "clear(): drop every entry."},
    {"mask_runs", (PyCFunction)(void (*)(void))table_mask_runs, METH_FASTCALL,
     "mask_runs(tokens, block_size, seed, wanted, keys_out=None) -> list[int]\n\n"
     "Hash the full blocks of tokens (packed u32 little-endian or ints) into chained keys\n"
     "from seed and look them up, stopping before the first block that is missing or whose\n"
     "mask shares no bit with wanted (None: any mask goes). Returns the masks of the\n"
     "leading blocks as runs of equal masks, flat: [mask, count, mask, count, ...]; the\n"
     "keys of those blocks are appended to the bytearray keys_out (8 bytes LE each)."},
    {"get_many", (PyCFunction)table_get_many, METH_O,
     "get_many(keys) -> list[int]: the mask of each key (packed u64 LE), 0 if missing."},
    {"get_present", (PyCFunction)table_get_present, METH_O,
     "get_present(keys) -> dict[int, int]: position -> mask of the keys (packed u64 LE)\n"
     "the table holds."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods table_as_sequence = {
    .sq_length = (lenfunc)table_len,
};

PyTypeObject BlockTableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvcore._native.BlockTable",
    .tp_doc = "BlockTable(secret=0): block key (u64) -> presence mask (int).",
    .tp_basicsize = sizeof(BlockTable),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = table_new,
    .tp_dealloc = (destructor)table_dealloc,
    .tp_methods = table_methods,
    .tp_as_sequence = &table_as_sequence,
};
