/* kvcore._native: the block-key hot loops in C (spec: docs/block-keys.md).
 *
 * key(block i) = xxh3_64(tokens of block i as u32 little-endian, seed = key(block i - 1))
 *
 * Python does the same in kvcore/keys.py and indexer/index/scoring.py; this module only removes
 * the per-block interpreter overhead (one xxh3 call, one slice, one dict lookup per block
 * cost ~250 ns in Python, ~25 ns here). Both paths are checked against each other and
 * against tests/vectors/block_keys.json.
 *
 *   chain_keys(tokens, block_size, seed) -> list[int]
 *   chain_keys_packed(tokens, block_size, seed) -> bytes: the same keys as u64
 *       little-endian, for callers that send them on (Redis) rather than use them.
 *   take_uint32_field(message, path) -> (bytes, bytes): a repeated uint32 field, read off
 *       the wire and cut out of the message.
 *   pack_log_entries(hashes, keys, tiers) -> bytes: the Redis ledger log's M/D records.
 *   BlockTable: block key -> presence mask, the in-memory index's hash table, whose
 *       mask_runs() hashes a prompt and looks its blocks up in one loop.
 *
 * `tokens` is packed u32 little-endian (bytes, bytearray, memoryview) or a sequence of
 * ints in 0..2**32-1. Only full blocks are hashed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define XXH_INLINE_ALL
#include "xxhash.h"

#define U32_MAX_VALUE 0xFFFFFFFFUL

typedef struct {
    PyObject *items;     /* PySequence_Fast of the token ids, or NULL for packed bytes */
    Py_buffer view;      /* packed bytes, when items is NULL */
    unsigned char *scratch; /* one block of ids packed little-endian */
    Py_ssize_t stride;   /* bytes per block */
    Py_ssize_t block_size;
    Py_ssize_t n_blocks;
} TokenSource;

static int
is_packed(PyObject *tokens)
{
    return PyBytes_Check(tokens) || PyByteArray_Check(tokens) || PyMemoryView_Check(tokens);
}

static int
source_open(TokenSource *src, PyObject *tokens, Py_ssize_t block_size)
{
    memset(src, 0, sizeof(*src));
    if (block_size <= 0) {
        PyErr_Format(PyExc_ValueError, "block_size must be > 0, got %zd", block_size);
        return -1;
    }
    if (block_size > PY_SSIZE_T_MAX / 4) {
        PyErr_SetString(PyExc_ValueError, "block_size is too large");
        return -1;
    }
    src->block_size = block_size;
    src->stride = block_size * 4;
    if (is_packed(tokens)) {
        if (PyObject_GetBuffer(tokens, &src->view, PyBUF_SIMPLE) < 0) {
            return -1;
        }
        src->n_blocks = src->view.len / src->stride;
        return 0;
    }
    src->items = PySequence_Fast(tokens, "tokens must be packed bytes or a sequence of ints");
    if (src->items == NULL) {
        return -1;
    }
    src->n_blocks = PySequence_Fast_GET_SIZE(src->items) / block_size;
    src->scratch = PyMem_Malloc((size_t)src->stride);
    if (src->scratch == NULL) {
        Py_CLEAR(src->items);
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void
source_close(TokenSource *src)
{
    if (src->items != NULL) {
        Py_CLEAR(src->items);
        PyMem_Free(src->scratch);
        src->scratch = NULL;
    } else if (src->view.obj != NULL) {
        PyBuffer_Release(&src->view);
    }
}

/* A token id as u32; exact small ints (every real token id) skip the generic conversion. */
static inline int
token_value(PyObject *obj, unsigned long *out)
{
#if PY_VERSION_HEX >= 0x030C0000
    if (PyLong_CheckExact(obj) && PyUnstable_Long_IsCompact((PyLongObject *)obj)) {
        Py_ssize_t value = PyUnstable_Long_CompactValue((PyLongObject *)obj);
        if (value >= 0) {
            *out = (unsigned long)value;
            return 0;
        }
    }
#else
    if (PyLong_CheckExact(obj)) {
        Py_ssize_t size = Py_SIZE(obj);
        if (size == 1) {
            *out = (unsigned long)((PyLongObject *)obj)->ob_digit[0];
            return 0;
        }
        if (size == 0) {
            *out = 0;
            return 0;
        }
    }
#endif
    unsigned long value = PyLong_AsUnsignedLong(obj);
    if (value == (unsigned long)-1 && PyErr_Occurred()) {
        return -1;
    }
    if (value > U32_MAX_VALUE) {
        PyErr_Format(PyExc_OverflowError, "token id %lu is outside 0..2**32-1", value);
        return -1;
    }
    *out = value;
    return 0;
}

/* Bytes of block `i`, packing token ids into scratch when they came as ints. */
static const unsigned char *
source_block(TokenSource *src, Py_ssize_t i)
{
    if (src->items == NULL) {
        return (const unsigned char *)src->view.buf + i * src->stride;
    }
    /* The sequence may not shrink under us: nothing below runs Python code. */
    PyObject **items = PySequence_Fast_ITEMS(src->items) + i * src->block_size;
    unsigned char *out = src->scratch;
    for (Py_ssize_t j = 0; j < src->block_size; j++) {
        unsigned long token;
        if (token_value(items[j], &token) < 0) {
            return NULL;
        }
        out[0] = (unsigned char)token;
        out[1] = (unsigned char)(token >> 8);
        out[2] = (unsigned char)(token >> 16);
        out[3] = (unsigned char)(token >> 24);
        out += 4;
    }
    return src->scratch;
}

/* An int in 0..2**64-1; `what` names it in the OverflowError. */
static int
parse_u64(PyObject *obj, const char *what, uint64_t *out)
{
    unsigned long long value = PyLong_AsUnsignedLongLong(obj);
    if (value == (unsigned long long)-1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Format(PyExc_OverflowError, "%s is outside 0..2**64-1", what);
        }
        return -1;
    }
    *out = (uint64_t)value;
    return 0;
}

/* The (tokens, block_size, seed) arguments of chain_keys and mask_runs. */
static int
source_from_args(TokenSource *src, PyObject *tokens, PyObject *block_size_obj,
                 PyObject *seed_obj, uint64_t *seed)
{
    Py_ssize_t block_size = PyLong_AsSsize_t(block_size_obj);
    if ((block_size == -1 && PyErr_Occurred()) || parse_u64(seed_obj, "seed", seed) < 0) {
        return -1;
    }
    return source_open(src, tokens, block_size);
}

static void
put_u64_le(unsigned char *out, uint64_t value)
{
    for (int i = 0; i < 8; i++) {
        out[i] = (unsigned char)(value >> (8 * i));
    }
}

/* chain_keys and chain_keys_packed: the same loop, the keys as ints or as packed bytes. */
static PyObject *
chain(PyObject *const *args, Py_ssize_t nargs, int packed, const char *usage)
{
    TokenSource src;
    uint64_t seed;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, usage);
        return NULL;
    }
    if (source_from_args(&src, args[0], args[1], args[2], &seed) < 0) {
        return NULL;
    }
    PyObject *keys = packed ? PyBytes_FromStringAndSize(NULL, src.n_blocks * 8)
                            : PyList_New(src.n_blocks);
    if (keys == NULL) {
        goto fail;
    }
    for (Py_ssize_t i = 0; i < src.n_blocks; i++) {
        const unsigned char *block = source_block(&src, i);
        if (block == NULL) {
            goto fail;
        }
        seed = XXH3_64bits_withSeed(block, (size_t)src.stride, seed);
        if (packed) {
            put_u64_le((unsigned char *)PyBytes_AS_STRING(keys) + i * 8, seed);
            continue;
        }
        PyObject *key = PyLong_FromUnsignedLongLong(seed);
        if (key == NULL) {
            goto fail;
        }
        PyList_SET_ITEM(keys, i, key);
    }
    source_close(&src);
    return keys;
fail:
    Py_XDECREF(keys);
    source_close(&src);
    return NULL;
}

PyDoc_STRVAR(chain_keys_doc,
"chain_keys(tokens, block_size, seed) -> list[int]\n\n"
"Chained xxh3_64 keys of the full blocks in tokens, starting from seed.");

static PyObject *
chain_keys(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    return chain(args, nargs, 0, "chain_keys(tokens, block_size, seed)");
}

PyDoc_STRVAR(chain_keys_packed_doc,
"chain_keys_packed(tokens, block_size, seed) -> bytes\n\n"
"chain_keys as u64 little-endian, 8 bytes per block.");

static PyObject *
chain_keys_packed(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    return chain(args, nargs, 1, "chain_keys_packed(tokens, block_size, seed)");
}

/* ---- BlockTable: u64 block key -> presence mask (exact int) ------------------------------
 *
 * Open addressing with linear probing and backward-shift deletion, entries {key, mask}
 * inline, so a lookup costs one cache line instead of a dict's index, entry and key object.
 * Slots come from a keyed mix of the key (the secret is drawn per table by the caller), so
 * crafted prompts cannot aim at one probe run. Masks are exact ints: no reference cycles,
 * no GC tracking.
 */

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

static PyObject *
table_set_bits(BlockTable *table, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *bit = NULL;
    PyObject *keys = keys_and_int(args, nargs, "set_bits(keys, bit)", "bit", &bit);
    if (keys == NULL) {
        return NULL;
    }
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
        PyObject *mask = PyNumber_Or(entry->mask, bit);
        if (mask == NULL) {
            goto fail;
        }
        Py_SETREF(entry->mask, mask);
    }
    Py_DECREF(keys);
    Py_RETURN_NONE;
fail:
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
        PyObject *mask = PyNumber_And(entry->mask, keep);
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
    Py_DECREF(keys);
    if (table->capacity > TABLE_MIN_CAPACITY * 16 && table->used * 16 < table->capacity &&
        table_resize(table, table->capacity / 4) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
fail:
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
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "mask_runs(tokens, block_size, seed, wanted)");
        return NULL;
    }
    PyObject *wanted = args[3] == Py_None ? NULL : args[3];
    if (wanted != NULL && require_exact_int(wanted, "wanted") < 0) {
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
                int same = mask == run_mask || PyObject_RichCompareBool(mask, run_mask, Py_EQ);
                if (same < 0) {
                    goto fail;
                }
                if (same) {
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
     "mask_runs(tokens, block_size, seed, wanted) -> list[int]\n\n"
     "Hash the full blocks of tokens (packed u32 little-endian or ints) into chained keys\n"
     "from seed and look them up, stopping before the first block that is missing or whose\n"
     "mask shares no bit with wanted (None: any mask goes). Returns the masks of the\n"
     "leading blocks as runs of equal masks, flat: [mask, count, mask, count, ...]."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods table_as_sequence = {
    .sq_length = (lenfunc)table_len,
};

static PyTypeObject BlockTableType = {
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

static int
native_exec(PyObject *module)
{
    if (PyType_Ready(&BlockTableType) < 0) {
        return -1;
    }
    return PyModule_AddObjectRef(module, "BlockTable", (PyObject *)&BlockTableType);
}

static PyModuleDef_Slot native_slots[] = {
    {Py_mod_exec, native_exec},
    {0, NULL},
};

/* ---- take_uint32_field: a repeated uint32 field, taken out of a serialised message -----
 *
 * upb hands a parsed repeated field to Python one int object at a time (~25 ns each, 200 us
 * for an 8k-token prompt), and parsing it at all costs more than reading it here. So the
 * field is read from the wire bytes into packed u32 and cut out of the message; protobuf
 * then parses only the small rest. Malformed input raises ValueError (bounds are checked
 * everywhere). Protobuf semantics: packed and unpacked encodings are both accepted, every
 * occurrence is appended in order (also across repeated occurrences of the enclosing
 * messages, which protobuf merges), and a varint wider than 32 bits keeps its low 32 bits,
 * as a uint32 field does.
 */

typedef struct {
    unsigned char *data;
    size_t len;
    size_t cap;
} ByteBuf;

static int
buf_reserve(ByteBuf *buf, size_t extra)
{
    if (buf->len + extra <= buf->cap) {
        return 0;
    }
    size_t cap = buf->cap ? buf->cap : 256;
    while (cap < buf->len + extra) {
        cap *= 2;
    }
    unsigned char *grown = PyMem_Realloc(buf->data, cap);
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    buf->data = grown;
    buf->cap = cap;
    return 0;
}

static int
buf_put(ByteBuf *buf, const unsigned char *bytes, size_t n)
{
    if (buf_reserve(buf, n) < 0) {
        return -1;
    }
    memcpy(buf->data + buf->len, bytes, n);
    buf->len += n;
    return 0;
}

static int
buf_put_u32(ByteBuf *buf, uint32_t value)
{
    unsigned char le[4] = {(unsigned char)value, (unsigned char)(value >> 8),
                           (unsigned char)(value >> 16), (unsigned char)(value >> 24)};
    return buf_put(buf, le, 4);
}

static int
buf_put_varint(ByteBuf *buf, uint64_t value)
{
    unsigned char bytes[10];
    size_t n = 0;
    do {
        bytes[n++] = (unsigned char)((value & 0x7F) | (value > 0x7F ? 0x80 : 0));
        value >>= 7;
    } while (value);
    return buf_put(buf, bytes, n);
}

static inline int
read_varint(const unsigned char **pos, const unsigned char *end, uint64_t *value)
{
    const unsigned char *p = *pos;
    if (end - p >= 10) { /* room for the longest varint: no bounds checks */
        uint64_t result = 0;
        for (int shift = 0; shift < 70; shift += 7) {
            unsigned char byte = *p++;
            result |= (uint64_t)(byte & 0x7F) << (shift < 64 ? shift : 0);
            if (!(byte & 0x80)) {
                *pos = p;
                *value = result;
                return 0;
            }
        }
        PyErr_SetString(PyExc_ValueError, "varint longer than 10 bytes");
        return -1;
    }
    uint64_t result = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (*pos >= end) {
            PyErr_SetString(PyExc_ValueError, "truncated varint");
            return -1;
        }
        unsigned char byte = *(*pos)++;
        result |= (uint64_t)(byte & 0x7F) << shift;
        if (!(byte & 0x80)) {
            *value = result;
            return 0;
        }
    }
    PyErr_SetString(PyExc_ValueError, "varint longer than 10 bytes");
    return -1;
}

typedef struct {
    const uint32_t *path;
    Py_ssize_t path_len;
    ByteBuf values; /* packed u32 of the field */
} FieldTake;

/* Copy the message in [pos, end) to `rest` without the field at path[depth:]. */
static int
take_field(FieldTake *take, const unsigned char *pos, const unsigned char *end,
           Py_ssize_t depth, ByteBuf *rest)
{
    while (pos < end) {
        const unsigned char *field_start = pos;
        uint64_t tag, value;
        if (read_varint(&pos, end, &tag) < 0) {
            return -1;
        }
        int wanted = (tag >> 3) == take->path[depth];
        int last = depth == take->path_len - 1;
        switch ((int)(tag & 7)) {
        case 0:
            if (read_varint(&pos, end, &value) < 0) {
                return -1;
            }
            if (wanted && last) {
                if (buf_put_u32(&take->values, (uint32_t)value) < 0) {
                    return -1;
                }
                continue;
            }
            break;
        case 1:
        case 5: {
            size_t width = (tag & 7) == 1 ? 8 : 4;
            if ((size_t)(end - pos) < width) {
                PyErr_SetString(PyExc_ValueError, "truncated fixed-width field");
                return -1;
            }
            pos += width;
            break;
        }
        case 2: {
            if (read_varint(&pos, end, &value) < 0) {
                return -1;
            }
            if (value > (uint64_t)(end - pos)) {
                PyErr_SetString(PyExc_ValueError, "length-delimited field runs past the end");
                return -1;
            }
            const unsigned char *stop = pos + value;
            if (wanted && last) {
                if (value == 0) {
                    continue;
                }
                /* at most one value per byte: reserve once, not per value */
                if (buf_reserve(&take->values, 4 * (size_t)value) < 0) {
                    return -1;
                }
                unsigned char *out = take->values.data + take->values.len;
                while (pos < stop) { /* value > 0 here: data is allocated */
                    if (read_varint(&pos, stop, &value) < 0) {
                        return -1;
                    }
                    out[0] = (unsigned char)value;
                    out[1] = (unsigned char)(value >> 8);
                    out[2] = (unsigned char)(value >> 16);
                    out[3] = (unsigned char)(value >> 24);
                    out += 4;
                }
                take->values.len = (size_t)(out - take->values.data);
                continue;
            }
            if (wanted) { /* an enclosing message: copy it without the field, new length */
                ByteBuf inner = {NULL, 0, 0};
                int failed = take_field(take, pos, stop, depth + 1, &inner) < 0 ||
                             buf_put_varint(rest, tag) < 0 ||
                             buf_put_varint(rest, inner.len) < 0 ||
                             (inner.len && buf_put(rest, inner.data, inner.len) < 0);
                PyMem_Free(inner.data);
                if (failed) {
                    return -1;
                }
                pos = stop;
                continue;
            }
            pos = stop;
            break;
        }
        default:
            PyErr_Format(PyExc_ValueError, "unsupported wire type %d", (int)(tag & 7));
            return -1;
        }
        if (buf_put(rest, field_start, (size_t)(pos - field_start)) < 0) {
            return -1;
        }
    }
    return 0;
}

PyDoc_STRVAR(take_uint32_field_doc,
"take_uint32_field(message, path) -> tuple[bytes, bytes]\n\n"
"The values of the repeated uint32 field at path (field numbers, outermost first; the\n"
"ones before the last name embedded message fields) of a serialised protobuf message,\n"
"as packed u32 little-endian, and the message without that field.");

#define MAX_FIELD_PATH 8

static PyObject *
take_uint32_field(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    uint32_t path[MAX_FIELD_PATH];
    Py_buffer view;
    if (nargs != 2 || !PyTuple_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError,
                        "take_uint32_field(message, path: tuple[int, ...])");
        return NULL;
    }
    Py_ssize_t path_len = PyTuple_GET_SIZE(args[1]);
    if (path_len < 1 || path_len > MAX_FIELD_PATH) {
        PyErr_Format(PyExc_ValueError, "path must hold 1 to %d field numbers", MAX_FIELD_PATH);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < path_len; i++) {
        long number = PyLong_AsLong(PyTuple_GET_ITEM(args[1], i));
        if (number == -1 && PyErr_Occurred()) {
            return NULL;
        }
        if (number < 1 || number > 536870911L) {
            PyErr_Format(PyExc_ValueError, "field number %ld is out of range", number);
            return NULL;
        }
        path[i] = (uint32_t)number;
    }
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    FieldTake take = {path, path_len, {NULL, 0, 0}};
    ByteBuf rest = {NULL, 0, 0};
    const unsigned char *start = view.buf;
    PyObject *result = NULL;
    if (take_field(&take, start, start + view.len, 0, &rest) == 0) {
        /* y# turns a NULL pointer into None: empty buffers are given as "". */
        const char *values = take.values.data ? (const char *)take.values.data : "";
        const char *remainder = rest.data ? (const char *)rest.data : "";
        result = Py_BuildValue("(y#y#)", values, (Py_ssize_t)take.values.len, remainder,
                               (Py_ssize_t)rest.len);
    }
    PyBuffer_Release(&view);
    PyMem_Free(take.values.data);
    PyMem_Free(rest.data);
    return result;
}

/* ---- pack_log_entries: the Redis ledger log's M/D records for dirty engine hashes --------
 *
 * For each hash: b"M" + hash + key (u64 LE each) + tier mask (u8) when `keys` maps it, else
 * b"D" + hash: struct formats "<cQQB" and "<cQ" of indexer/index/ledger.py (LOG_MAP,
 * LOG_HASH), in the iteration order of `hashes`.
 */

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

static PyObject *
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

static PyMethodDef native_methods[] = {
    {"chain_keys", (PyCFunction)(void (*)(void))chain_keys, METH_FASTCALL, chain_keys_doc},
    {"chain_keys_packed", (PyCFunction)(void (*)(void))chain_keys_packed, METH_FASTCALL,
     chain_keys_packed_doc},
    {"take_uint32_field", (PyCFunction)(void (*)(void))take_uint32_field, METH_FASTCALL,
     take_uint32_field_doc},
    {"pack_log_entries", (PyCFunction)(void (*)(void))pack_log_entries, METH_FASTCALL,
     "pack_log_entries(hashes, keys, tiers) -> bytes: the ledger log's M/D records."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "kvcore._native",
    .m_doc = "Block-key hashing and prefix lookup hot loops (optional C speed-up).",
    .m_size = 0,
    .m_methods = native_methods,
    .m_slots = native_slots,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    return PyModuleDef_Init(&native_module);
}
