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
 *   `target` is an OpsWriter (the keys go in as an S op, packed here), a BlockTable
 *   (set_bit_at(keys, bitpos), done here) or any sink with set_bits(keys, bitpos).
 *
 *   OpsWriter(ops: bytearray).keys_op(kind, group, bitpos, keys): appends an S / C op
 *   (group 0) or a T / K op of a group to `ops`, or extends the last op when it was the
 *   last thing written and has the same kind, group and bit position (redis.py _OpsSink,
 *   layout in apply.lua).
 */
#include "native.h"
#include "bytebuf.h"
#include "tokens.h"
#include <structmember.h>
#include <math.h>
#include <limits.h>

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

/* --- the fields of a BlockStored ------------------------------------------------- */

/* kvcore.bus.BlockStored and EventBatch are msgspec Structs: each field a member
 * descriptor (an object slot at a fixed offset), read here without an attribute lookup. */
enum {
    F_HASHES, F_PARENT, F_TOKENS, F_BLOCK_SIZE, F_MEDIUM, F_LORA, F_SALT, F_EXTRA, F_GROUP,
    F_KIND, F_WINDOW, F_POOL, N_FIELDS
};
static const char *const stored_fields[N_FIELDS] = {
    "block_hashes", "parent_hash", "token_ids", "block_size", "medium", "lora_name",
    "cache_salt", "extra_keys", "group", "group_kind", "sliding_window", "pool",
};
enum { B_SCHEMA, B_MODEL, B_WORKER, B_EPOCH, B_SEQ, B_EVENTS, B_RANK, B_TS, N_BATCH_FIELDS };
static const char *const batch_fields[N_BATCH_FIELDS] = {
    "schema", "model", "worker_id", "epoch", "seq", "events", "dp_rank", "ts",
};

typedef struct {
    PyObject *type; /* the type whose offsets these are */
    int n;
    const char *const *names;
    Py_ssize_t offsets[N_FIELDS];
} Layout;

static Layout stored_layout = {NULL, N_FIELDS, stored_fields, {0}};
static Layout batch_layout = {NULL, N_BATCH_FIELDS, batch_fields, {0}};
static PyObject *set_bits_name;

/* 1: `type`'s fields are object slots (offsets noted); 0: they are not; -1: an error. */
static int
layout_of(Layout *layout, PyObject *type)
{
    if (type == layout->type) {
        return 1;
    }
    if (!PyType_Check(type)) {
        return 0;
    }
    Py_ssize_t offsets[N_FIELDS];
    for (int i = 0; i < layout->n; i++) {
        PyObject *descr = PyObject_GetAttrString(type, layout->names[i]);
        if (descr == NULL) {
            PyErr_Clear();
            return 0;
        }
        int slot = Py_IS_TYPE(descr, &PyMemberDescr_Type) &&
                   ((PyMemberDescrObject *)descr)->d_member->type == T_OBJECT_EX;
        if (slot) {
            offsets[i] = ((PyMemberDescrObject *)descr)->d_member->offset;
        }
        Py_DECREF(descr);
        if (!slot) {
            return 0;
        }
    }
    Py_XSETREF(layout->type, Py_NewRef(type));
    memcpy(layout->offsets, offsets, (size_t)layout->n * sizeof(Py_ssize_t));
    return 1;
}

/* A field of an instance of stored_layout's type (borrowed; NULL when unset). */
static inline PyObject *
field(PyObject *event, int i)
{
    return *(PyObject **)((char *)event + stored_layout.offsets[i]);
}

/* A field of an instance of batch_layout's type (borrowed; NULL when unset). */
static inline PyObject *
batch_field(PyObject *batch, int i)
{
    return *(PyObject **)((char *)batch + batch_layout.offsets[i]);
}

static inline int
is_none(PyObject *value)
{
    return value == Py_None;
}

/* The int 0 (an exact int: bool and other subclasses go to the Python path). */
static inline int
is_zero(PyObject *value)
{
    return value != NULL && PyLong_CheckExact(value) && PyObject_Not(value) == 1;
}

/* An int in 0..2**64-1 (1), or anything else (0, no error left set). */
static inline int
try_u64(PyObject *value, uint64_t *out)
{
    if (value == NULL || !PyLong_Check(value)) {
        return 0;
    }
    if (parse_u64(value, "value", out) < 0) {
        PyErr_Clear();
        return 0;
    }
    return 1;
}

/* --- store_plain ------------------------------------------------------------------- */

/* One plain store's inputs, borrowed from the event. */
typedef struct {
    PyObject *hashes;
    const unsigned char *tokens;
    Py_ssize_t stride;
    Py_ssize_t n;
    int tier;
    uint64_t seed;
} PlainStore;

/* The seed of the store's first block: the root, or the key of a parent the map knows.
 * 1: found; 0: not a plain store. */
static int
plain_seed(PyObject *event, PyObject *map, uint64_t root_seed, uint64_t *seed)
{
    PyObject *parent = field(event, F_PARENT);
    if (is_none(parent)) {
        if (!is_none(field(event, F_LORA)) || !is_none(field(event, F_SALT))) {
            return 0;
        }
        *seed = root_seed;
        return 1;
    }
    uint64_t value;
    if (parent == NULL || !PyLong_CheckExact(parent) || !try_u64(parent, &value)) {
        return 0;
    }
    return ledger_map_lookup(map, value, seed);
}

/* Whether `event` is a plain store (see the top of the file); fills `store` when it is.
 * Never leaves an error set. */
static int
read_plain(PyObject *event, PyObject *map, uint64_t root_seed, PyObject *tier_slots,
           PlainStore *store)
{
    if (!is_zero(field(event, F_GROUP)) || !is_none(field(event, F_KIND)) ||
        !is_zero(field(event, F_WINDOW)) || !is_none(field(event, F_EXTRA))) {
        return 0;
    }
    PyObject *medium = field(event, F_MEDIUM);
    PyObject *tier = medium != NULL && PyUnicode_CheckExact(medium)
                         ? PyDict_GetItemWithError(tier_slots, medium) : NULL;
    long tier_value = tier != NULL && PyLong_CheckExact(tier) ? PyLong_AsLong(tier) : -1;
    PyErr_Clear();
    if (tier_value < 0 || tier_value > 3) {
        return 0;
    }
    PyObject *size_obj = field(event, F_BLOCK_SIZE);
    Py_ssize_t block_size = size_obj != NULL && PyLong_CheckExact(size_obj)
                                ? PyLong_AsSsize_t(size_obj) : -1;
    PyErr_Clear();
    if (block_size <= 0 || block_size > PY_SSIZE_T_MAX / 4) {
        return 0;
    }
    if (!plain_seed(event, map, root_seed, &store->seed)) {
        return 0;
    }
    PyObject *tokens = field(event, F_TOKENS), *hashes = field(event, F_HASHES);
    if (tokens == NULL || !PyBytes_CheckExact(tokens) || PyBytes_GET_SIZE(tokens) == 0 ||
        hashes == NULL || !PyList_CheckExact(hashes) || PyList_GET_SIZE(hashes) == 0 ||
        PyList_GET_SIZE(hashes) != PyBytes_GET_SIZE(tokens) / (block_size * 4)) {
        return 0;
    }
    store->tokens = (const unsigned char *)PyBytes_AS_STRING(tokens);
    store->stride = block_size * 4;
    store->n = PyList_GET_SIZE(hashes);
    store->tier = (int)tier_value;
    store->hashes = hashes;
    return 1;
}

/* The keys' bit set in the target: an S op of the OpsWriter, the BlockTable's bits
 * (set_bit_at), or target.set_bits(). */
static int
set_bits(PyObject *target, const uint64_t *keys, Py_ssize_t n, uint32_t bitpos)
{
    if (Py_IS_TYPE(target, &BlockTableType)) {
        return block_table_set_bit_raw(target, keys, n, bitpos);
    }
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
                                   : PyObject_CallMethodObjArgs(target, set_bits_name, list,
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
    PyObject **items = PySequence_Fast_ITEMS(store->hashes); /* a list */
    for (Py_ssize_t j = 0; j < n; j++) {
        if (!try_u64(items[j], &hashes[j])) {
            return 0; /* the Python path says what is wrong with it */
        }
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
        (slot == (unsigned long)-1 && PyErr_Occurred())) {
        return NULL;
    }
    if (set_bits_name == NULL && (set_bits_name = PyUnicode_InternFromString("set_bits")) == NULL) {
        return NULL;
    }
    int usable = layout_of(&stored_layout, stored_type);
    if (usable < 0) {
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
        if (!usable || (PyObject *)Py_TYPE(event) != stored_type ||
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

/* --- check_plain_stores ------------------------------------------------------------ */

#define MAX_BLOCKS_PER_EVENT 65536
#define MAX_NAME_BYTES 256
#define MAX_GROUP 63
#define MAX_SLIDING_WINDOW (1L << 24)
#define MAX_DP_RANK 65535
#define MAX_EVENTS_PER_BATCH 65536

/* A name kvcore.bus accepts whatever its encoding: a str of at most 64 chars (or None). */
static int
short_name(PyObject *value, int may_be_none)
{
    return (may_be_none && is_none(value)) ||
           (value != NULL && PyUnicode_Check(value) &&
            PyUnicode_GET_LENGTH(value) * 4 <= MAX_NAME_BYTES);
}

/* None, or a short name of printable characters only (kvcore.bus refuses others: a
 * group kind is stored as "kind\nwindow"). */
static int
printable_name(PyObject *value)
{
    if (is_none(value)) {
        return 1;
    }
    if (!short_name(value, 0)) {
        return 0;
    }
    int kind = PyUnicode_KIND(value);
    const void *data = PyUnicode_DATA(value);
    for (Py_ssize_t i = 0; i < PyUnicode_GET_LENGTH(value); i++) {
        if (!Py_UNICODE_ISPRINTABLE(PyUnicode_READ(kind, data, i))) {
            return 0;
        }
    }
    return 1;
}

/* An int in lo..hi (0 only, when `zero`). */
static int
int_in(PyObject *value, long lo, long hi, int zero)
{
    if (value == NULL || !PyLong_Check(value)) {
        return 0;
    }
    long v = PyLong_AsLong(value);
    if (v == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return v >= lo && v <= hi && (!zero || v == 0);
}

/* An int in 0..2**64-1. */
static int
is_u64(PyObject *value)
{
    uint64_t ignored;
    return try_u64(value, &ignored);
}

/* Every hash a u64, at most MAX_BLOCKS_PER_EVENT of them: their count, else -1. */
static Py_ssize_t
checked_hashes(PyObject *hashes)
{
    if (hashes == NULL || !PyList_CheckExact(hashes) ||
        PyList_GET_SIZE(hashes) > MAX_BLOCKS_PER_EVENT) {
        return -1;
    }
    for (Py_ssize_t j = 0; j < PyList_GET_SIZE(hashes); j++) {
        if (!is_u64(PyList_GET_ITEM(hashes, j))) {
            return -1;
        }
    }
    return PyList_GET_SIZE(hashes);
}

/* token_ids empty, or n blocks of block_size u32 tokens. */
static int
tokens_fit(PyObject *event, Py_ssize_t n)
{
    PyObject *tokens = field(event, F_TOKENS), *size = field(event, F_BLOCK_SIZE);
    if (tokens == NULL || !PyBytes_CheckExact(tokens) || size == NULL || !PyLong_Check(size)) {
        return 0;
    }
    if (PyBytes_GET_SIZE(tokens) == 0) {
        return 1;
    }
    Py_ssize_t block_size = PyLong_AsSsize_t(size);
    PyErr_Clear();
    return block_size > 0 && block_size <= MAX_BLOCKS_PER_EVENT * 64 &&
           PyBytes_GET_SIZE(tokens) == n * block_size * 4;
}

/* Whether kvcore.bus._check_stored accepts the event (and, for schema 1, it carries no
 * group field), by checks that never accept what it refuses. */
static int
store_passes(PyObject *event, int schema1)
{
    Py_ssize_t n = checked_hashes(field(event, F_HASHES));
    PyObject *kind = field(event, F_KIND), *parent = field(event, F_PARENT);
    return n >= 0 && int_in(field(event, F_GROUP), 0, MAX_GROUP, schema1) &&
           int_in(field(event, F_WINDOW), 0, MAX_SLIDING_WINDOW, schema1) &&
           (schema1 ? is_none(kind) : printable_name(kind)) &&
           short_name(field(event, F_MEDIUM), 0) && short_name(field(event, F_LORA), 1) &&
           short_name(field(event, F_SALT), 1) && is_none(field(event, F_POOL)) &&
           is_none(field(event, F_EXTRA)) && (is_none(parent) || is_u64(parent)) &&
           tokens_fit(event, n);
}

/* Whether every event of the list `events` is a stored_type that store_passes. */
static int
stores_pass(PyObject *events, PyObject *stored_type, int schema1)
{
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(events); i++) {
        PyObject *event = PyList_GET_ITEM(events, i);
        if ((PyObject *)Py_TYPE(event) != stored_type || !store_passes(event, schema1)) {
            return 0;
        }
    }
    return 1;
}

const char check_plain_stores_doc[] = PyDoc_STR(
"check_plain_stores(events, stored_type, schema1) -> bool\n\n"
"True when every event is a stored_type that kvcore.bus.validate_batch accepts, by checks\n"
"of the usual shapes only (no pool, no extra keys, short names); False says nothing:\n"
"the Python checks decide.");

PyObject *
check_plain_stores(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "check_plain_stores(events, stored_type, schema1)");
        return NULL;
    }
    PyObject *events = args[0], *stored_type = args[1];
    int schema1 = PyObject_IsTrue(args[2]);
    int usable = schema1 < 0 ? -1 : layout_of(&stored_layout, stored_type);
    if (usable < 0) {
        return NULL;
    }
    if (!usable || !PyList_CheckExact(events)) {
        Py_RETURN_FALSE;
    }
    return PyBool_FromLong(stores_pass(events, stored_type, schema1));
}

/* kvcore.bus.validate_batch's batch checks, by checks that never accept what it refuses. */
static int
batch_passes(PyObject *batch)
{
    PyObject *schema = batch_field(batch, B_SCHEMA), *model = batch_field(batch, B_MODEL);
    PyObject *worker = batch_field(batch, B_WORKER), *ts = batch_field(batch, B_TS);
    PyObject *events = batch_field(batch, B_EVENTS);
    long version = schema != NULL && PyLong_CheckExact(schema) ? PyLong_AsLong(schema) : 0;
    PyErr_Clear();
    return (version == 1 || version == 2) && model != NULL && PyUnicode_Check(model) &&
           worker != NULL && PyUnicode_Check(worker) && PyUnicode_GET_LENGTH(model) > 0 &&
           PyUnicode_GET_LENGTH(worker) > 0 &&
           (PyUnicode_GET_LENGTH(model) + PyUnicode_GET_LENGTH(worker)) * 4 <= MAX_NAME_BYTES &&
           int_in(batch_field(batch, B_EPOCH), 0, LONG_MAX, 0) &&
           int_in(batch_field(batch, B_SEQ), 0, LONG_MAX, 0) &&
           int_in(batch_field(batch, B_RANK), 0, MAX_DP_RANK, 0) && ts != NULL &&
           PyFloat_CheckExact(ts) && isfinite(PyFloat_AS_DOUBLE(ts)) && events != NULL &&
           PyList_CheckExact(events) && PyList_GET_SIZE(events) <= MAX_EVENTS_PER_BATCH;
}

const char check_plain_batch_doc[] = PyDoc_STR(
"check_plain_batch(batch, batch_type, stored_type) -> bool\n\n"
"True when kvcore.bus.validate_batch accepts the batch, every event a usual stored_type\n"
"(check_plain_stores); False says nothing: the Python checks decide.");

PyObject *
check_plain_batch(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "check_plain_batch(batch, batch_type, stored_type)");
        return NULL;
    }
    PyObject *batch = args[0], *batch_type = args[1], *stored_type = args[2];
    int usable = layout_of(&batch_layout, batch_type);
    if (usable > 0) {
        usable = layout_of(&stored_layout, stored_type);
    }
    if (usable < 0) {
        return NULL;
    }
    if (!usable || (PyObject *)Py_TYPE(batch) != batch_type || !batch_passes(batch)) {
        Py_RETURN_FALSE;
    }
    PyObject *events = batch_field(batch, B_EVENTS);
    int schema1 = PyLong_AsLong(batch_field(batch, B_SCHEMA)) == 1; /* 1 or 2 by now */
    return PyBool_FromLong(stores_pass(events, stored_type, schema1));
}
