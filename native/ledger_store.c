/* ledger_store.c: the ledger's common store in one C loop (indexer/index/ledger.py,
 * WorkerLedger._apply_events), and OpsWriter, the Redis record's presence ops.
 *
 *   store_plain(map, events, start, root_seed, slot, target, counts, dirty, stored_type,
 *               tier_slots) -> (next, added)
 *       applies events[start:] while each is a plain store (below) and returns the index
 *       of the first one that is not (len(events) when all were) and how many blocks were
 *       added. Each store it applies does exactly what WorkerLedger._store does for it:
 *       keys chained from the root or the parent's key, every block added to the map
 *       (held in the event's tier), the keys' bit set in `target`, the tier's count
 *       raised, the hashes added to `dirty` (the journal's set, or None). It decides
 *       whether an event is plain before changing anything, so an event it stops at is
 *       untouched, for the Python path to apply.
 *
 *   A plain store: a BlockStored of KV-cache group 0 without a group kind or window,
 *   with tokens and no extra keys, a block hash per full block of its tokens, a medium
 *   named exactly as in `tier_slots`, a root (no LoRA name, no cache salt: `root_seed`)
 *   or a parent the map knows, and blocks the map does not know (none repeated).
 *
 *   `target` is an OpsWriter (the keys go in as an S op, packed here) or any sink with
 *   set_bits(keys, bitpos).
 *
 *   OpsWriter(ops: bytearray).keys_op(kind, group, bitpos, keys): appends an S / C op
 *   (group 0) or a T / K op of a group to `ops`, or extends the last op when it was the
 *   last thing written and has the same kind, group and bit position (redis.py _OpsSink,
 *   layout in apply.lua).
 */
#include "native.h"
#include "bytebuf.h"
#include "tokens.h"

#define XXH_INLINE_ALL
#include "xxhash.h"

#define STACK_BLOCKS 64

/* --- OpsWriter --------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *ops;            /* the bytearray the ops go to */
    Py_ssize_t last_end;      /* len(ops) just after the last keys op; -1: none */
    Py_ssize_t last_count_at; /* where that op's count is */
    uint32_t last_count;
    uint32_t last_bitpos;
    int last_group;
    char last_kind;
} OpsWriter;

static int
ops_append(PyObject *ops, const unsigned char *bytes, Py_ssize_t n, unsigned char **out)
{
    Py_ssize_t at = PyByteArray_GET_SIZE(ops);
    if (PyByteArray_Resize(ops, at + n) < 0) {
        return -1;
    }
    unsigned char *base = (unsigned char *)PyByteArray_AS_STRING(ops) + at;
    if (bytes != NULL) {
        memcpy(base, bytes, (size_t)n);
    }
    if (out != NULL) {
        *out = base;
    }
    return 0;
}

static inline void
put_u32_le(unsigned char *out, uint32_t value)
{
    for (int i = 0; i < 4; i++) {
        out[i] = (unsigned char)(value >> (8 * i));
    }
}

/* The header of a keys op of n keys, or the last op's count raised by n; then room for
 * the n keys, whose first byte goes to *keys_out. */
static int
writer_open(OpsWriter *w, char kind, int group, uint32_t bitpos, Py_ssize_t n,
            unsigned char **keys_out)
{
    PyObject *ops = w->ops;
    if (PyByteArray_GET_SIZE(ops) == w->last_end && bitpos == w->last_bitpos &&
        kind == w->last_kind && group == w->last_group) {
        if ((uint64_t)w->last_count + (uint64_t)n > UINT32_MAX) {
            PyErr_SetString(PyExc_OverflowError, "too many keys in one op");
            return -1;
        }
        w->last_count += (uint32_t)n;
        put_u32_le((unsigned char *)PyByteArray_AS_STRING(ops) + w->last_count_at,
                   w->last_count);
    } else {
        unsigned char header[10];
        Py_ssize_t size = 0;
        if ((uint64_t)n > UINT32_MAX) {
            PyErr_SetString(PyExc_OverflowError, "too many keys in one op");
            return -1;
        }
        header[size++] = (unsigned char)kind;
        if (kind != 'S' && kind != 'C') {
            header[size++] = (unsigned char)group;
        }
        put_u32_le(header + size, bitpos);
        put_u32_le(header + size + 4, (uint32_t)n);
        size += 8;
        if (ops_append(ops, header, size, NULL) < 0) {
            return -1;
        }
        w->last_kind = kind;
        w->last_group = group;
        w->last_bitpos = bitpos;
        w->last_count = (uint32_t)n;
        w->last_count_at = PyByteArray_GET_SIZE(ops) - 4;
    }
    if (ops_append(ops, NULL, n * 8, keys_out) < 0) {
        w->last_end = -1;
        return -1;
    }
    w->last_end = PyByteArray_GET_SIZE(ops);
    return 0;
}

static PyObject *
writer_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"ops", NULL};
    PyObject *ops;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!:OpsWriter", kwlist, &PyByteArray_Type,
                                     &ops)) {
        return NULL;
    }
    OpsWriter *w = (OpsWriter *)type->tp_alloc(type, 0);
    if (w != NULL) {
        w->ops = Py_NewRef(ops);
        w->last_end = -1;
        w->last_group = -1;
    }
    return (PyObject *)w;
}

static void
writer_dealloc(OpsWriter *w)
{
    Py_XDECREF(w->ops);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static PyObject *
writer_keys_op(OpsWriter *w, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "keys_op(kind, group, bitpos, keys)");
        return NULL;
    }
    if (!PyBytes_Check(args[0]) || PyBytes_GET_SIZE(args[0]) != 1) {
        PyErr_SetString(PyExc_TypeError, "kind must be one byte");
        return NULL;
    }
    char kind = PyBytes_AS_STRING(args[0])[0];
    long group = PyLong_AsLong(args[1]);
    if (group == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (group < 0 || group > 255) {
        PyErr_Format(PyExc_ValueError, "group %ld is outside 0..255", group);
        return NULL;
    }
    unsigned long bitpos = PyLong_AsUnsignedLong(args[2]);
    if (bitpos == (unsigned long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    if (bitpos > UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "bitpos is outside 0..2**32-1");
        return NULL;
    }
    PyObject *keys = PySequence_Fast(args[3], "keys must be a sequence of ints");
    if (keys == NULL) {
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(keys);
    uint64_t *values = PyMem_Malloc(n > 0 ? (size_t)n * 8 : 1);
    int failed = values == NULL;
    if (failed) {
        PyErr_NoMemory();
    }
    for (Py_ssize_t j = 0; !failed && j < n; j++) {
        failed = parse_u64(PySequence_Fast_GET_ITEM(keys, j), "block key", &values[j]) < 0;
    }
    Py_DECREF(keys);
    unsigned char *out;
    if (!failed && writer_open(w, kind, (int)group, (uint32_t)bitpos, n, &out) == 0) {
        for (Py_ssize_t j = 0; j < n; j++) {
            put_u64_le(out + j * 8, values[j]);
        }
    } else {
        failed = 1;
    }
    PyMem_Free(values);
    if (failed) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
writer_get_ops(OpsWriter *w, void *Py_UNUSED(closure))
{
    return Py_NewRef(w->ops);
}

static PyMethodDef writer_methods[] = {
    {"keys_op", (PyCFunction)(void (*)(void))writer_keys_op, METH_FASTCALL,
     "keys_op(kind, group, bitpos, keys): add an S / C op (group 0) or a T / K op of a\n"
     "group, or extend the last op (the last thing written, same kind, group, bitpos)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef writer_getset[] = {
    {"ops", (getter)writer_get_ops, NULL, "the bytearray the ops go to", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject OpsWriterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvcore._native.OpsWriter",
    .tp_doc = "OpsWriter(ops: bytearray): the Redis record's presence ops, packed.",
    .tp_basicsize = sizeof(OpsWriter),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = writer_new,
    .tp_dealloc = (destructor)writer_dealloc,
    .tp_methods = writer_methods,
    .tp_getset = writer_getset,
};

/* --- store_plain ------------------------------------------------------------------- */

typedef struct {
    PyObject *block_hashes, *parent_hash, *token_ids, *block_size, *medium, *lora_name,
        *cache_salt, *extra_keys, *group, *group_kind, *sliding_window, *set_bits;
} FieldNames;

static FieldNames names;

static int
intern_names(void)
{
    if (names.set_bits != NULL) {
        return 0;
    }
#define NAME(field)                                                                    \
    if ((names.field = PyUnicode_InternFromString(#field)) == NULL) {                  \
        return -1;                                                                     \
    }
    NAME(block_hashes) NAME(parent_hash) NAME(token_ids) NAME(block_size) NAME(medium)
    NAME(lora_name) NAME(cache_salt) NAME(extra_keys) NAME(group) NAME(group_kind)
    NAME(sliding_window) NAME(set_bits)
#undef NAME
    return 0;
}

/* One plain store's inputs, read off the event (borrowed references only where noted). */
typedef struct {
    PyObject *hashes;            /* the block_hashes list (a new reference) */
    const unsigned char *tokens; /* into token_ids, which `hashes`' event keeps alive */
    Py_ssize_t stride;
    Py_ssize_t n;
    int tier;
    uint64_t seed;
} PlainStore;

/* 1: `obj` is the int 0; 0: not (any error cleared). */
static int
is_zero(PyObject *obj)
{
    return PyLong_CheckExact(obj) && PyObject_Not(obj) == 1;
}

/* An attribute that must be None (1), or not None / missing (0). */
static int
attr_is_none(PyObject *event, PyObject *name)
{
    PyObject *value = PyObject_GetAttr(event, name);
    if (value == NULL) {
        PyErr_Clear();
        return 0;
    }
    int none = value == Py_None;
    Py_DECREF(value);
    return none;
}

static int
attr_is_zero(PyObject *event, PyObject *name)
{
    PyObject *value = PyObject_GetAttr(event, name);
    if (value == NULL) {
        PyErr_Clear();
        return 0;
    }
    int zero = is_zero(value);
    Py_DECREF(value);
    return zero;
}

/* The seed of the store's first block: the root, or the key of a parent the map knows.
 * 1: found; 0: not a plain store. */
static int
plain_seed(PyObject *event, PyObject *map, uint64_t root_seed, uint64_t *seed)
{
    PyObject *parent = PyObject_GetAttr(event, names.parent_hash);
    if (parent == NULL) {
        PyErr_Clear();
        return 0;
    }
    if (parent == Py_None) {
        Py_DECREF(parent);
        if (!attr_is_none(event, names.lora_name) || !attr_is_none(event, names.cache_salt)) {
            return 0;
        }
        *seed = root_seed;
        return 1;
    }
    unsigned long long value = PyLong_Check(parent) ? PyLong_AsUnsignedLongLong(parent) : 0;
    int bad = !PyLong_Check(parent) || (value == (unsigned long long)-1 && PyErr_Occurred());
    Py_DECREF(parent);
    if (bad) {
        PyErr_Clear();
        return 0;
    }
    return ledger_map_lookup(map, (uint64_t)value, seed);
}

/* Whether `event` is a plain store (see the top of the file); fills `store` when it is,
 * with a new reference to its hashes. Never leaves an error set. */
static int
read_plain(PyObject *event, PyObject *map, uint64_t root_seed, PyObject *tier_slots,
           PlainStore *store)
{
    if (!attr_is_zero(event, names.group) || !attr_is_none(event, names.group_kind) ||
        !attr_is_zero(event, names.sliding_window) || !attr_is_none(event, names.extra_keys)) {
        return 0;
    }
    PyObject *medium = PyObject_GetAttr(event, names.medium);
    if (medium == NULL) {
        PyErr_Clear();
        return 0;
    }
    PyObject *tier = PyUnicode_CheckExact(medium) ? PyDict_GetItemWithError(tier_slots, medium)
                                                  : NULL;
    Py_DECREF(medium);
    long tier_value = tier != NULL && PyLong_CheckExact(tier) ? PyLong_AsLong(tier) : -1;
    PyErr_Clear();
    if (tier_value < 0 || tier_value > 3) {
        return 0;
    }
    PyObject *size_obj = PyObject_GetAttr(event, names.block_size);
    Py_ssize_t block_size = size_obj != NULL && PyLong_CheckExact(size_obj)
                                ? PyLong_AsSsize_t(size_obj) : -1;
    Py_XDECREF(size_obj);
    PyErr_Clear();
    if (block_size <= 0 || block_size > PY_SSIZE_T_MAX / 4) {
        return 0;
    }
    if (!plain_seed(event, map, root_seed, &store->seed)) {
        return 0;
    }
    PyObject *tokens = PyObject_GetAttr(event, names.token_ids);
    PyObject *hashes = PyObject_GetAttr(event, names.block_hashes);
    PyErr_Clear();
    /* token_ids stays alive while the event does (a msgspec Struct field) */
    int plain = tokens != NULL && PyBytes_CheckExact(tokens) && PyBytes_GET_SIZE(tokens) > 0 &&
                hashes != NULL && PyList_CheckExact(hashes) && PyList_GET_SIZE(hashes) > 0 &&
                PyList_GET_SIZE(hashes) == PyBytes_GET_SIZE(tokens) / (block_size * 4);
    if (plain) {
        store->tokens = (const unsigned char *)PyBytes_AS_STRING(tokens);
        store->stride = block_size * 4;
        store->n = PyList_GET_SIZE(hashes);
        store->tier = (int)tier_value;
        store->hashes = Py_NewRef(hashes);
    }
    Py_XDECREF(tokens);
    Py_XDECREF(hashes);
    return plain;
}

/* The keys' bit set in the target: an S op of the OpsWriter, or target.set_bits(). */
static int
set_bits(PyObject *target, const uint64_t *keys, Py_ssize_t n, uint32_t bitpos)
{
    if (Py_IS_TYPE(target, &OpsWriterType)) {
        unsigned char *out;
        if (writer_open((OpsWriter *)target, 'S', 0, bitpos, n, &out) < 0) {
            return -1;
        }
        for (Py_ssize_t j = 0; j < n; j++) {
            put_u64_le(out + j * 8, keys[j]);
        }
        return 0;
    }
    PyObject *list = PyList_New(n);
    if (list == NULL) {
        return -1;
    }
    for (Py_ssize_t j = 0; j < n; j++) {
        PyObject *key = PyLong_FromUnsignedLongLong(keys[j]);
        if (key == NULL) {
            Py_DECREF(list);
            return -1;
        }
        PyList_SET_ITEM(list, j, key);
    }
    PyObject *bit = PyLong_FromUnsignedLong(bitpos);
    PyObject *result = bit == NULL ? NULL
                                   : PyObject_CallMethodObjArgs(target, names.set_bits, list,
                                                                bit, NULL);
    Py_DECREF(list);
    Py_XDECREF(bit);
    Py_XDECREF(result);
    return result == NULL ? -1 : 0;
}

static int
add_count(PyObject *counts, int tier, Py_ssize_t n)
{
    if (!PyList_CheckExact(counts) || PyList_GET_SIZE(counts) <= tier) {
        PyErr_SetString(PyExc_TypeError, "counts must be a list with a count per tier");
        return -1;
    }
    Py_ssize_t now = PyLong_AsSsize_t(PyList_GET_ITEM(counts, tier));
    if (now == -1 && PyErr_Occurred()) {
        return -1;
    }
    PyObject *value = PyLong_FromSsize_t(now + n);
    if (value == NULL) {
        return -1;
    }
    PyList_SetItem(counts, tier, value);
    return 0;
}

/* Apply one plain store; 1: applied, 0: its blocks are not all new (nothing changed),
 * -1: an error. */
static int
apply_plain(PlainStore *store, PyObject *map, uint32_t slot, PyObject *target,
            PyObject *counts, PyObject *dirty, uint64_t *buffer)
{
    Py_ssize_t n = store->n;
    uint64_t *hashes = buffer, *keys = buffer + n;
    PyObject **items = PySequence_Fast_ITEMS(store->hashes);
    for (Py_ssize_t j = 0; j < n; j++) {
        unsigned long long value = PyLong_Check(items[j]) ? PyLong_AsUnsignedLongLong(items[j])
                                                           : (unsigned long long)-1;
        if (!PyLong_Check(items[j]) || (value == (unsigned long long)-1 && PyErr_Occurred())) {
            PyErr_Clear();
            return 0; /* the Python path says what is wrong with it */
        }
        hashes[j] = (uint64_t)value;
    }
    uint64_t seed = store->seed;
    for (Py_ssize_t j = 0; j < n; j++) {
        seed = XXH3_64bits_withSeed(store->tokens + j * store->stride, (size_t)store->stride,
                                    seed);
        keys[j] = seed;
    }
    int added = ledger_map_add_new_raw(map, hashes, keys, n, (uint8_t)(1u << store->tier));
    if (added <= 0) {
        return added;
    }
    if (set_bits(target, keys, n, slot * 4 + (uint32_t)store->tier) < 0 ||
        add_count(counts, store->tier, n) < 0) {
        return -1;
    }
    if (dirty != Py_None) {
        for (Py_ssize_t j = 0; j < n; j++) {
            if (PySet_Add(dirty, items[j]) < 0) {
                return -1;
            }
        }
    }
    return 1;
}

const char store_plain_doc[] = PyDoc_STR(
"store_plain(map, events, start, root_seed, slot, target, counts, dirty, stored_type,\n"
"            tier_slots) -> (next, added)\n\n"
"Apply events[start:] while each is a plain store (ledger_store.c says which are): the\n"
"index of the first that is not, and how many blocks were added.");

PyObject *
store_plain(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "store_plain(map, events, start, root_seed, slot, "
                                         "target, counts, dirty, stored_type, tier_slots)");
        return NULL;
    }
    PyObject *map = args[0], *events = args[1], *target = args[5], *counts = args[6];
    PyObject *dirty = args[7], *stored_type = args[8], *tier_slots = args[9];
    uint64_t root_seed;
    Py_ssize_t start = PyLong_AsSsize_t(args[2]);
    unsigned long slot = PyLong_AsUnsignedLong(args[4]);
    if ((start == -1 && PyErr_Occurred()) || parse_u64(args[3], "root seed", &root_seed) < 0 ||
        (slot == (unsigned long)-1 && PyErr_Occurred()) || intern_names() < 0) {
        return NULL;
    }
    if (!Py_IS_TYPE(map, &LedgerMapType) || !PyList_CheckExact(events) ||
        !PyDict_CheckExact(tier_slots) || (dirty != Py_None && !PySet_CheckExact(dirty)) ||
        slot > (UINT32_MAX >> 2)) {
        PyErr_SetString(PyExc_TypeError, "store_plain: bad argument types");
        return NULL;
    }
    uint64_t stack[2 * STACK_BLOCKS];
    Py_ssize_t added = 0, i = start < 0 ? 0 : start;
    for (; i < PyList_GET_SIZE(events); i++) {
        PyObject *event = PyList_GET_ITEM(events, i);
        PlainStore store;
        if ((PyObject *)Py_TYPE(event) != stored_type ||
            !read_plain(event, map, root_seed, tier_slots, &store)) {
            break;
        }
        uint64_t *buffer = store.n <= STACK_BLOCKS ? stack
                                                   : PyMem_Malloc(2 * (size_t)store.n * 8);
        int done = buffer == NULL ? (PyErr_NoMemory(), -1)
                                  : apply_plain(&store, map, (uint32_t)slot, target, counts,
                                                dirty, buffer);
        if (buffer != stack) {
            PyMem_Free(buffer);
        }
        Py_DECREF(store.hashes);
        if (done < 0) {
            return NULL;
        }
        if (done == 0) {
            break;
        }
        added += store.n;
    }
    return Py_BuildValue("(nn)", i, added);
}
