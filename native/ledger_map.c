/* ledger_map.c: LedgerMap (kvcore._native.LedgerMap), one worker rank's engine hash (u64)
 * -> (block key u64, held tiers) map, the bulk of a WorkerLedger (indexer/index/ledger.py).
 *
 * Two Python dicts (hash -> key, hash -> tiers) cost about 130 bytes an entry in int objects
 * and dict slots; here a slot is 17 bytes in three parallel arrays (hashes, keys, a state
 * byte: OCCUPIED | tier mask, 0 for an empty slot; a ghost is OCCUPIED with no tier).
 * Open addressing with linear probing over the hashes array and backward-shift deletion,
 * at most 4/5 full, grown by half (any capacity: slots come from a multiply-shift of the
 * mixed hash, not a power-of-two mask), so the table stays between ~53% and 80% full. The
 * mix is keyed by a secret the caller draws per map: engine hashes come from outside.
 */
#include "native.h"
#include "bytebuf.h"
#include "tokens.h"

#define OCCUPIED 0x80
#define TIER_MASK 0x0F
#define MAP_MIN_CAPACITY 8

typedef struct {
    PyObject_HEAD
    uint64_t *hashes;
    uint64_t *keys;
    uint8_t *state; /* OCCUPIED | tiers, or 0: empty */
    size_t capacity;
    size_t used;
    uint64_t secret;
} LedgerMap;

static inline size_t
map_home(const LedgerMap *map, uint64_t hash)
{
    uint64_t h = hash ^ map->secret;
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return (size_t)(((unsigned __int128)h * map->capacity) >> 64);
}

static inline size_t
map_next(const LedgerMap *map, size_t i)
{
    return i + 1 == map->capacity ? 0 : i + 1;
}

/* The slot holding hash, or -1. */
static inline Py_ssize_t
map_find(const LedgerMap *map, uint64_t hash)
{
    if (map->used == 0) {
        return -1;
    }
    for (size_t i = map_home(map, hash);; i = map_next(map, i)) {
        if (map->state[i] == 0) {
            return -1;
        }
        if (map->hashes[i] == hash) {
            return (Py_ssize_t)i;
        }
    }
}

static int
map_resize(LedgerMap *map, size_t capacity)
{
    uint64_t *old_hashes = map->hashes, *old_keys = map->keys;
    uint8_t *old_state = map->state;
    size_t old_capacity = map->capacity;
    /* One allocation: hashes, keys, then the state bytes. */
    unsigned char *block = PyMem_Calloc(capacity, 2 * sizeof(uint64_t) + 1);
    if (block == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    map->hashes = (uint64_t *)block;
    map->keys = (uint64_t *)(block + capacity * sizeof(uint64_t));
    map->state = block + 2 * capacity * sizeof(uint64_t);
    map->capacity = capacity;
    for (size_t i = 0; i < old_capacity; i++) {
        if (old_state[i] == 0) {
            continue;
        }
        size_t j = map_home(map, old_hashes[i]);
        while (map->state[j] != 0) {
            j = map_next(map, j);
        }
        map->hashes[j] = old_hashes[i];
        map->keys[j] = old_keys[i];
        map->state[j] = old_state[i];
    }
    PyMem_Free(old_hashes); /* the start of the old block */
    return 0;
}

/* The slot for hash, claimed (state OCCUPIED, key 0) when missing; -1 on error. */
static Py_ssize_t
map_find_or_insert(LedgerMap *map, uint64_t hash, int *inserted)
{
    if ((map->used + 1) * 5 > map->capacity * 4) {
        size_t capacity = map->capacity < MAP_MIN_CAPACITY ? MAP_MIN_CAPACITY
                                                            : map->capacity + map->capacity / 2;
        if (map_resize(map, capacity) < 0) {
            return -1;
        }
    }
    for (size_t i = map_home(map, hash);; i = map_next(map, i)) {
        if (map->state[i] == 0) {
            map->hashes[i] = hash;
            map->keys[i] = 0;
            map->state[i] = OCCUPIED;
            map->used++;
            *inserted = 1;
            return (Py_ssize_t)i;
        }
        if (map->hashes[i] == hash) {
            *inserted = 0;
            return (Py_ssize_t)i;
        }
    }
}

/* Empty slot i and shift later members of its probe run back (no tombstones). */
static void
map_delete(LedgerMap *map, size_t hole)
{
    map->state[hole] = 0;
    map->used--;
    for (size_t j = map_next(map, hole); map->state[j] != 0; j = map_next(map, j)) {
        size_t home = map_home(map, map->hashes[j]);
        /* j may move to the hole when its home is not cyclically within (hole, j]. */
        int stays = hole <= j ? (hole < home && home <= j) : (hole < home || home <= j);
        if (!stays) {
            map->hashes[hole] = map->hashes[j];
            map->keys[hole] = map->keys[j];
            map->state[hole] = map->state[j];
            map->state[j] = 0;
            hole = j;
        }
    }
}

/* After deletions: a map far below its load gives memory back. */
static int
map_maybe_shrink(LedgerMap *map)
{
    if (map->capacity > 64 && map->used * 4 < map->capacity) {
        size_t capacity = map->used * 2 > MAP_MIN_CAPACITY ? map->used * 2 : MAP_MIN_CAPACITY;
        return map_resize(map, capacity);
    }
    return 0;
}

static void
map_free(LedgerMap *map)
{
    PyMem_Free(map->hashes);
    map->hashes = map->keys = NULL;
    map->state = NULL;
    map->capacity = map->used = 0;
}

static PyObject *
map_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"secret", NULL};
    unsigned long long secret = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|K:LedgerMap", kwlist, &secret)) {
        return NULL;
    }
    LedgerMap *map = (LedgerMap *)type->tp_alloc(type, 0);
    if (map != NULL) {
        map->secret = (uint64_t)secret;
    }
    return (PyObject *)map;
}

static void
map_dealloc(LedgerMap *map)
{
    map_free(map);
    Py_TYPE(map)->tp_free((PyObject *)map);
}

static Py_ssize_t
map_len(LedgerMap *map)
{
    return (Py_ssize_t)map->used;
}

static int
map_contains(LedgerMap *map, PyObject *obj)
{
    uint64_t hash;
    if (!PyLong_Check(obj)) {
        return 0;
    }
    unsigned long long value = PyLong_AsUnsignedLongLong(obj);
    if (value == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear(); /* negative or too large: never a key */
        return 0;
    }
    hash = (uint64_t)value;
    return map_find(map, hash) >= 0;
}

static int
parse_hash(PyObject *obj, uint64_t *hash)
{
    return parse_u64(obj, "engine hash", hash);
}

static PyObject *
map_get(LedgerMap *map, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t hash;
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get(hash, default=None)");
        return NULL;
    }
    if (parse_hash(args[0], &hash) < 0) {
        return NULL;
    }
    Py_ssize_t i = map_find(map, hash);
    if (i >= 0) {
        return PyLong_FromUnsignedLongLong(map->keys[i]);
    }
    return Py_NewRef(nargs == 2 ? args[1] : Py_None);
}

static PyObject *
map_tiers_of(LedgerMap *map, PyObject *obj)
{
    uint64_t hash;
    if (parse_hash(obj, &hash) < 0) {
        return NULL;
    }
    Py_ssize_t i = map_find(map, hash);
    return PyLong_FromLong(i >= 0 ? map->state[i] & TIER_MASK : 0);
}

static int
parse_tiers(PyObject *obj, uint8_t *tiers)
{
    long value = PyLong_AsLong(obj);
    if (value == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (value < 0 || value > TIER_MASK) {
        PyErr_Format(PyExc_ValueError, "tier mask %ld is outside 0..%d", value, TIER_MASK);
        return -1;
    }
    *tiers = (uint8_t)value;
    return 0;
}

static PyObject *
map_put(LedgerMap *map, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t hash, key;
    uint8_t tiers;
    int inserted;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "put(hash, key, tiers)");
        return NULL;
    }
    if (parse_hash(args[0], &hash) < 0 || parse_u64(args[1], "block key", &key) < 0 ||
        parse_tiers(args[2], &tiers) < 0) {
        return NULL;
    }
    Py_ssize_t i = map_find_or_insert(map, hash, &inserted);
    if (i < 0) {
        return NULL;
    }
    map->keys[i] = key;
    map->state[i] = OCCUPIED | tiers;
    Py_RETURN_NONE;
}

/* load_run(data, pos): the ledger log's N record at byte pos of data (tag, tier mask u8,
 * count u16, then count x (engine hash u64, block key u64), little-endian) put into the
 * map, each hash held in that mask; the position after it. */
static PyObject *
map_load_run(LedgerMap *map, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "load_run(data, pos)");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    const unsigned char *data = view.buf;
    PyObject *result = NULL;
    if (pos < 0 || pos > view.len - 4) {
        PyErr_Format(PyExc_ValueError, "truncated ledger log at byte %zd", pos);
        goto done;
    }
    uint8_t mask = data[pos + 1];
    Py_ssize_t count = (Py_ssize_t)data[pos + 2] | ((Py_ssize_t)data[pos + 3] << 8);
    if (mask > TIER_MASK) {
        PyErr_Format(PyExc_ValueError, "tier mask %d out of range at byte %zd", mask, pos);
        goto done;
    }
    Py_ssize_t start = pos + 4, end = start + count * 16;
    if (end > view.len) {
        PyErr_Format(PyExc_ValueError, "truncated ledger log at byte %zd", pos);
        goto done;
    }
    /* Grown once for the whole run (at most 4/5 full after it), not step by step. */
    size_t needed = map->used + (size_t)count;
    if (needed * 5 > map->capacity * 4) {
        size_t grown = map->capacity + map->capacity / 2;
        if (map_resize(map, grown > needed * 5 / 4 + 1 ? grown : needed * 5 / 4 + 1) < 0) {
            goto done;
        }
    }
    for (const unsigned char *entry = data + start; entry < data + end; entry += 16) {
        int inserted;
        Py_ssize_t i = map_find_or_insert(map, get_u64_le(entry), &inserted);
        if (i < 0) {
            goto done;
        }
        map->keys[i] = get_u64_le(entry + 8);
        map->state[i] = OCCUPIED | mask;
    }
    result = PyLong_FromSsize_t(end);
done:
    PyBuffer_Release(&view);
    return result;
}

static PyObject *
map_discard(LedgerMap *map, PyObject *obj)
{
    uint64_t hash;
    if (parse_hash(obj, &hash) < 0) {
        return NULL;
    }
    Py_ssize_t i = map_find(map, hash);
    if (i < 0) {
        Py_RETURN_FALSE;
    }
    map_delete(map, (size_t)i);
    if (map_maybe_shrink(map) < 0) {
        return NULL;
    }
    Py_RETURN_TRUE;
}

/* Two sequences of u64 of one length, as fast sequences (new references). */
static int
two_sequences(PyObject *a, PyObject *b, PyObject **fa, PyObject **fb)
{
    *fa = PySequence_Fast(a, "hashes must be a sequence of ints");
    if (*fa == NULL) {
        return -1;
    }
    *fb = PySequence_Fast(b, "keys must be a sequence of ints");
    if (*fb == NULL) {
        Py_CLEAR(*fa);
        return -1;
    }
    if (PySequence_Fast_GET_SIZE(*fa) != PySequence_Fast_GET_SIZE(*fb)) {
        PyErr_SetString(PyExc_ValueError, "hashes and keys differ in length");
        Py_CLEAR(*fa);
        Py_CLEAR(*fb);
        return -1;
    }
    return 0;
}

/* Undo the first n insertions of add_new (their hashes are distinct and were new). */
static void
undo_inserts(LedgerMap *map, PyObject *hashes, Py_ssize_t n)
{
    for (Py_ssize_t j = 0; j < n; j++) {
        uint64_t hash;
        if (parse_hash(PySequence_Fast_GET_ITEM(hashes, j), &hash) == 0) {
            Py_ssize_t i = map_find(map, hash);
            if (i >= 0) {
                map_delete(map, (size_t)i);
            }
        }
    }
}

/* add_new(hashes, keys, tiers): the usual store, every block new to the rank. */
static PyObject *
map_add_new(LedgerMap *map, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *hashes, *keys;
    uint8_t tiers;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "add_new(hashes, keys, tiers)");
        return NULL;
    }
    if (parse_tiers(args[2], &tiers) < 0 || two_sequences(args[0], args[1], &hashes, &keys) < 0) {
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(hashes);
    PyObject *result = Py_True;
    for (Py_ssize_t j = 0; j < n; j++) {
        uint64_t hash;
        if (parse_hash(PySequence_Fast_GET_ITEM(hashes, j), &hash) < 0) {
            goto fail;
        }
        if (map_find(map, hash) >= 0) {
            result = Py_False;
            goto done;
        }
    }
    for (Py_ssize_t j = 0; j < n; j++) {
        uint64_t hash, key;
        int inserted;
        if (parse_hash(PySequence_Fast_GET_ITEM(hashes, j), &hash) < 0 ||
            parse_u64(PySequence_Fast_GET_ITEM(keys, j), "block key", &key) < 0) {
            undo_inserts(map, hashes, j);
            goto fail;
        }
        Py_ssize_t i = map_find_or_insert(map, hash, &inserted);
        if (i < 0 || !inserted) { /* an error, or a hash twice in the event */
            undo_inserts(map, hashes, j);
            if (i < 0) {
                goto fail;
            }
            result = Py_False;
            goto done;
        }
        map->keys[i] = key;
        map->state[i] = OCCUPIED | tiers;
    }
done:
    Py_DECREF(hashes);
    Py_DECREF(keys);
    return Py_NewRef(result);
fail:
    Py_DECREF(hashes);
    Py_DECREF(keys);
    return NULL;
}

/* For ledger_store.c: the key of a hash when the map holds it (1), else 0. */
int
ledger_map_lookup(PyObject *obj, uint64_t hash, uint64_t *key)
{
    LedgerMap *map = (LedgerMap *)obj;
    Py_ssize_t i = map_find(map, hash);
    if (i < 0) {
        return 0;
    }
    *key = map->keys[i];
    return 1;
}

/* For ledger_store.c: add_new on C arrays. 1: every hash was new and distinct, now mapped
 * (held in tiers); 0: one was known or repeated, nothing changed; -1: an error. */
int
ledger_map_add_new_raw(PyObject *obj, const uint64_t *hashes, const uint64_t *keys,
                       Py_ssize_t n, uint8_t tiers)
{
    LedgerMap *map = (LedgerMap *)obj;
    for (Py_ssize_t j = 0; j < n; j++) {
        if (map_find(map, hashes[j]) >= 0) {
            return 0;
        }
    }
    for (Py_ssize_t j = 0; j < n; j++) {
        int inserted;
        Py_ssize_t i = map_find_or_insert(map, hashes[j], &inserted);
        if (i < 0 || !inserted) { /* an error, or a hash twice in the event */
            for (Py_ssize_t k = 0; k < j; k++) {
                Py_ssize_t at = map_find(map, hashes[k]);
                if (at >= 0) {
                    map_delete(map, (size_t)at);
                }
            }
            return i < 0 ? -1 : 0;
        }
        map->keys[i] = keys[j];
        map->state[i] = OCCUPIED | tiers;
    }
    return 1;
}

static int
append_u64(PyObject *list, uint64_t value)
{
    PyObject *item = PyLong_FromUnsignedLongLong(value);
    if (item == NULL) {
        return -1;
    }
    int failed = PyList_Append(list, item);
    Py_DECREF(item);
    return failed;
}

/* drop_tier(hashes, tier_bit) -> (keys, touched, ghosted, unknown): see the docstring. */
static PyObject *
map_drop_tier(LedgerMap *map, PyObject *const *args, Py_ssize_t nargs)
{
    uint8_t bit;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "drop_tier(hashes, tier_bit)");
        return NULL;
    }
    if (parse_tiers(args[1], &bit) < 0) {
        return NULL;
    }
    PyObject *hashes = PySequence_Fast(args[0], "hashes must be a sequence of ints");
    if (hashes == NULL) {
        return NULL;
    }
    PyObject *keys = PyList_New(0), *touched = PyList_New(0), *ghosted = PyList_New(0);
    Py_ssize_t unknown = 0;
    if (keys == NULL || touched == NULL || ghosted == NULL) {
        goto fail;
    }
    for (Py_ssize_t j = 0; j < PySequence_Fast_GET_SIZE(hashes); j++) {
        PyObject *item = PySequence_Fast_GET_ITEM(hashes, j);
        uint64_t hash;
        if (parse_hash(item, &hash) < 0) {
            goto fail;
        }
        Py_ssize_t i = map_find(map, hash);
        if (i < 0 || !(map->state[i] & bit)) {
            unknown += i < 0;
            continue;
        }
        map->state[i] ^= bit;
        if (append_u64(keys, map->keys[i]) < 0 || PyList_Append(touched, item) < 0 ||
            (!(map->state[i] & TIER_MASK) && PyList_Append(ghosted, item) < 0)) {
            goto fail;
        }
    }
    Py_DECREF(hashes);
    return Py_BuildValue("(NNNn)", keys, touched, ghosted, unknown);
fail:
    Py_DECREF(hashes);
    Py_XDECREF(keys);
    Py_XDECREF(touched);
    Py_XDECREF(ghosted);
    return NULL;
}

static PyObject *
map_held_keys(LedgerMap *map, PyObject *obj)
{
    uint8_t bit;
    if (parse_tiers(obj, &bit) < 0) {
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        return NULL;
    }
    for (size_t i = 0; i < map->capacity; i++) {
        if ((map->state[i] & bit) && append_u64(out, map->keys[i]) < 0) {
            Py_DECREF(out);
            return NULL;
        }
    }
    return out;
}

static PyObject *
map_items(LedgerMap *map, PyObject *Py_UNUSED(ignored))
{
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        return NULL;
    }
    for (size_t i = 0; i < map->capacity; i++) {
        if (map->state[i] == 0) {
            continue;
        }
        PyObject *item = Py_BuildValue("(KKi)", (unsigned long long)map->hashes[i],
                                       (unsigned long long)map->keys[i],
                                       map->state[i] & TIER_MASK);
        if (item == NULL || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
    }
    return out;
}

static PyObject *
map_clear(LedgerMap *map, PyObject *Py_UNUSED(ignored))
{
    map_free(map);
    Py_RETURN_NONE;
}

/* Runs of mapped hashes sharing a tier mask (ledger.py LOG_RUN): b"N", the mask (u8),
 * the count (u16 LE), then count x (hash, key) u64 LE: 16 bytes a hash where an M record
 * takes 18. `count_at` is where the open run's count is in `out` (-1: none open). */
typedef struct {
    ByteBuf out;
    Py_ssize_t count_at;
    uint8_t tiers;
} LogRuns;

/* Extend the open run by one when it has the same mask and room; else open one. */
static int
runs_open(LogRuns *runs, uint8_t tiers)
{
    ByteBuf *out = &runs->out;
    if (runs->count_at >= 0 && runs->tiers == tiers) {
        unsigned char *at = out->data + runs->count_at;
        unsigned count = (unsigned)at[0] | ((unsigned)at[1] << 8);
        if (count < 0xFFFF) {
            count++;
            at[0] = (unsigned char)(count & 0xFF);
            at[1] = (unsigned char)(count >> 8);
            return 0;
        }
    }
    unsigned char header[4] = {'N', tiers, 1, 0};
    if (buf_put(out, header, sizeof(header)) < 0) {
        return -1;
    }
    runs->count_at = (Py_ssize_t)out->len - 2;
    runs->tiers = tiers;
    return 0;
}

static int
runs_put_map(LogRuns *runs, uint64_t hash, uint64_t key, uint8_t tiers)
{
    unsigned char pair[16];
    if (runs_open(runs, tiers) < 0) {
        return -1;
    }
    put_u64_le(pair, hash);
    put_u64_le(pair + 8, key);
    return buf_put(&runs->out, pair, sizeof(pair));
}

static int
runs_put_gone(LogRuns *runs, uint64_t hash)
{
    unsigned char record[9];
    record[0] = 'D';
    put_u64_le(record + 1, hash);
    runs->count_at = -1;
    return buf_put(&runs->out, record, sizeof(record));
}

static PyObject *
bytes_of(ByteBuf *buf)
{
    PyObject *result = PyBytes_FromStringAndSize(buf->data ? (const char *)buf->data : "",
                                                 (Py_ssize_t)buf->len);
    PyMem_Free(buf->data);
    return result;
}

/* Every hash, one tier mask after another (ascending), each in table order: one run per
 * mask (per 65,535 hashes), not one each time the mask changes along the table. */
static PyObject *
map_log_records(LedgerMap *map, PyObject *Py_UNUSED(ignored))
{
    LogRuns runs = {{NULL, 0, 0}, -1, 0};
    unsigned masks = 0;  /* bit t: some hash has tier mask t */
    for (size_t i = 0; i < map->capacity; i++) {
        if (map->state[i] != 0) {
            masks |= 1u << (map->state[i] & TIER_MASK);
        }
    }
    for (unsigned mask = 0; mask <= TIER_MASK; mask++) {
        if (!(masks & (1u << mask))) {
            continue;
        }
        for (size_t i = 0; i < map->capacity; i++) {
            if (map->state[i] != 0 && (map->state[i] & TIER_MASK) == mask &&
                runs_put_map(&runs, map->hashes[i], map->keys[i], (uint8_t)mask) < 0) {
                PyMem_Free(runs.out.data);
                return NULL;
            }
        }
    }
    return bytes_of(&runs.out);
}

static PyObject *
map_pack_log(LedgerMap *map, PyObject *iterable)
{
    PyObject *iter = PyObject_GetIter(iterable);
    if (iter == NULL) {
        return NULL;
    }
    LogRuns runs = {{NULL, 0, 0}, -1, 0};
    PyObject *item;
    while ((item = PyIter_Next(iter)) != NULL) {
        uint64_t hash;
        int failed = parse_hash(item, &hash);
        Py_DECREF(item);
        if (failed < 0) {
            goto fail;
        }
        Py_ssize_t i = map_find(map, hash);
        if (i >= 0) {
            failed = runs_put_map(&runs, hash, map->keys[i], map->state[i] & TIER_MASK);
        } else {
            failed = runs_put_gone(&runs, hash);
        }
        if (failed < 0) {
            goto fail;
        }
    }
    if (PyErr_Occurred()) {
        goto fail;
    }
    Py_DECREF(iter);
    return bytes_of(&runs.out);
fail:
    Py_DECREF(iter);
    PyMem_Free(runs.out.data);
    return NULL;
}

static PyObject *
map_nbytes(LedgerMap *map, void *Py_UNUSED(closure))
{
    return PyLong_FromSize_t(sizeof(LedgerMap) + map->capacity * (2 * sizeof(uint64_t) + 1));
}

static PyMethodDef map_methods[] = {
    {"get", (PyCFunction)(void (*)(void))map_get, METH_FASTCALL,
     "get(hash, default=None): the block key of an engine hash (held or a ghost)."},
    {"tiers_of", (PyCFunction)map_tiers_of, METH_O,
     "tiers_of(hash) -> int: the mask of tiers holding it (0: a ghost or unknown)."},
    {"put", (PyCFunction)(void (*)(void))map_put, METH_FASTCALL,
     "put(hash, key, tiers): map the hash to key, held in tiers (0: a ghost)."},
    {"load_run", (PyCFunction)(void (*)(void))map_load_run, METH_FASTCALL,
     "load_run(data, pos) -> int: put the ledger log's N record at pos; the position after."},
    {"discard", (PyCFunction)map_discard, METH_O,
     "discard(hash) -> bool: forget the hash; whether it was there."},
    {"add_new", (PyCFunction)(void (*)(void))map_add_new, METH_FASTCALL,
     "add_new(hashes, keys, tiers) -> bool: when no hash is in the map and none repeats,\n"
     "map each to its key, held in tiers, and return True; else change nothing, False."},
    {"drop_tier", (PyCFunction)(void (*)(void))map_drop_tier, METH_FASTCALL,
     "drop_tier(hashes, tier_bit) -> (keys, touched, ghosted, unknown): clear the tier bit\n"
     "of each hash holding it; the keys and hashes of those, the hashes left in no tier\n"
     "(ghosts now), and how many hashes the map did not know."},
    {"held_keys", (PyCFunction)map_held_keys, METH_O,
     "held_keys(tier_bit) -> list[int]: the keys of the hashes held in that tier."},
    {"items", (PyCFunction)map_items, METH_NOARGS,
     "items() -> list[(hash, key, tiers)], in table order."},
    {"clear", (PyCFunction)map_clear, METH_NOARGS, "clear(): forget everything."},
    {"log_records", (PyCFunction)map_log_records, METH_NOARGS,
     "log_records() -> bytes: every hash as N runs of the ledger log, by tier mask."},
    {"pack_log", (PyCFunction)map_pack_log, METH_O,
     "pack_log(hashes) -> bytes: N runs of the hashes mapped, a D record for each other one."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef map_getset[] = {
    {"nbytes", (getter)map_nbytes, NULL, "bytes the map holds (object and slots)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods map_as_sequence = {
    .sq_length = (lenfunc)map_len,
    .sq_contains = (objobjproc)map_contains,
};

PyTypeObject LedgerMapType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvcore._native.LedgerMap",
    .tp_doc = "LedgerMap(secret=0): engine hash (u64) -> (block key u64, tier mask).",
    .tp_basicsize = sizeof(LedgerMap),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = map_new,
    .tp_dealloc = (destructor)map_dealloc,
    .tp_methods = map_methods,
    .tp_getset = map_getset,
    .tp_as_sequence = &map_as_sequence,
};
