/* block_table.c: BlockTable (kvcore._native.BlockTable), u64 block key -> presence, the
 * in-memory index's hash table (indexer/index/block_table.py).
 *
 * Presence is stored as the block's holders, not as a mask: one u32 per holding slot,
 * slot << 4 | tier bits (the nibble bit `slot * 4 + tier` of the mask), sorted by slot. So
 * a block costs what its holders cost, whatever their slot numbers: a rank at slot 2**20
 * costs what slot 3 costs. An entry is {u64 key, u64 presence}, the presence being
 *   0                   an empty table slot,
 *   odd                 one or two holders inline: bits 1..31 the first (slot < 2**27),
 *                       bits 32..63 the second (0: none),
 *   even, not 0         a HolderArray on the heap (three holders or more, or a high slot).
 * The form is canonical (inline whenever it fits), so two presences are equal when their
 * words are, or both are arrays with equal holders.
 *
 * The Python face is unchanged: masks go in and come out as ints (bit slot * 4 + tier),
 * built on demand from the holders: one int per run in mask_runs, one per run of equal
 * presences in get_many / get_present. set_bit_at / clear_bit_at take a bit position, so
 * ingest never builds a mask as long as the highest slot.
 *
 * Open addressing with linear probing and backward-shift deletion; slots come from a keyed
 * mix of the key (the secret is drawn per table by the caller), so crafted prompts cannot
 * aim at one probe run.
 *
 * mask_runs() runs the chained block-key loop of chain.c itself, so the keys are hashed and
 * probed in one loop: xxHash is compiled in here too (XXH_INLINE_ALL), and the table's
 * probe helpers are in this file, so both inline into that loop.
 */
#include "native.h"
#include "intbits.h"
#include "tokens.h"

#define XXH_INLINE_ALL
#include "xxhash.h"

#define TIER_BITS 4
#define TIER_NIBBLE 0xFu
#define MAX_SLOT ((1u << 28) - 1) /* a holder is slot << 4 | tiers in a u32 */
#define INLINE_FIRST_MAX 0x7FFFFFFFu

typedef struct {
    uint32_t n;
    uint32_t cap;
    uint32_t holders[];
} HolderArray;

typedef struct {
    uint64_t key;
    uint64_t presence; /* 0: empty slot */
} TableEntry;

typedef struct {
    PyObject_HEAD
    TableEntry *entries;
    size_t capacity; /* a power of two, or 0 before the first insert */
    size_t used;
    size_t heap_bytes; /* held by HolderArrays */
    uint64_t secret;
} BlockTable;

#define TABLE_MIN_CAPACITY 64
#define PREFETCH_AHEAD 8

/* --- presence ------------------------------------------------------------------------ */

/* A presence's holders: `h` points into `inline_holders` or at a HolderArray's. */
typedef struct {
    uint32_t n;
    const uint32_t *h;
    uint32_t inline_holders[2];
} Holders;

static inline HolderArray *
presence_array(uint64_t presence)
{
    return (HolderArray *)(uintptr_t)presence;
}

static inline void
holders_of(uint64_t presence, Holders *out)
{
    if (presence & 1) {
        out->inline_holders[0] = (uint32_t)(presence >> 1) & INLINE_FIRST_MAX;
        out->inline_holders[1] = (uint32_t)(presence >> 32);
        out->n = out->inline_holders[1] ? 2 : 1;
        out->h = out->inline_holders;
    } else if (presence) {
        out->n = presence_array(presence)->n;
        out->h = presence_array(presence)->holders;
    } else {
        out->n = 0;
        out->h = out->inline_holders;
    }
}

static inline int
fits_inline(uint32_t n, const uint32_t *h)
{
    return n >= 1 && n <= 2 && h[0] <= INLINE_FIRST_MAX;
}

static inline uint64_t
inline_presence(uint32_t n, const uint32_t *h)
{
    return (uint64_t)h[0] << 1 | 1 | (n == 2 ? (uint64_t)h[1] << 32 : 0);
}

static inline int
presence_equal(uint64_t a, uint64_t b)
{
    if (a == b) {
        return 1;
    }
    if ((a & 1) || (b & 1) || !a || !b) {
        return 0;
    }
    HolderArray *x = presence_array(a), *y = presence_array(b);
    return x->n == y->n && memcmp(x->holders, y->holders, x->n * sizeof(uint32_t)) == 0;
}

static inline size_t
array_bytes(uint32_t cap)
{
    return sizeof(HolderArray) + (size_t)cap * sizeof(uint32_t);
}

static void
presence_free(BlockTable *table, uint64_t presence)
{
    if (presence && !(presence & 1)) {
        table->heap_bytes -= array_bytes(presence_array(presence)->cap);
        PyMem_Free(presence_array(presence));
    }
}

/* A HolderArray of these holders with room for `cap`; 0 on error. */
static uint64_t
new_array(BlockTable *table, uint32_t n, const uint32_t *h, uint32_t cap)
{
    HolderArray *array = PyMem_Malloc(array_bytes(cap));
    if (array == NULL) {
        PyErr_NoMemory();
        return 0;
    }
    array->n = n;
    array->cap = cap;
    memcpy(array->holders, h, n * sizeof(uint32_t));
    table->heap_bytes += array_bytes(cap);
    return (uint64_t)(uintptr_t)array;
}

/* First index whose slot is >= slot. */
static inline uint32_t
holder_search(const uint32_t *h, uint32_t n, uint32_t slot)
{
    uint32_t lo = 0, hi = n;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (h[mid] >> TIER_BITS < slot) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

/* The tiers of slot become (tiers & keep) | add; *presence is rewritten in canonical
 * form (0 when no holder is left). -1 on error, with *presence unchanged. */
static int
presence_apply(BlockTable *table, uint64_t *presence, uint32_t slot, uint32_t add,
               uint32_t keep)
{
    Holders cur;
    holders_of(*presence, &cur);
    uint32_t at = holder_search(cur.h, cur.n, slot);
    int found = at < cur.n && cur.h[at] >> TIER_BITS == slot;
    uint32_t old = found ? cur.h[at] & TIER_NIBBLE : 0;
    uint32_t tiers = ((old & keep) | add) & TIER_NIBBLE;
    if (tiers == old) {
        return 0;
    }
    uint32_t holder = slot << TIER_BITS | tiers;
    if (!(*presence & 1) && *presence) {
        HolderArray *array = presence_array(*presence);
        if (found && tiers) {
            array->holders[at] = holder;
            return 0;
        }
        if (found) {
            memmove(&array->holders[at], &array->holders[at + 1],
                    (array->n - at - 1) * sizeof(uint32_t));
            array->n--;
            if (array->n == 0 || fits_inline(array->n, array->holders)) {
                uint64_t small = array->n ? inline_presence(array->n, array->holders) : 0;
                presence_free(table, *presence);
                *presence = small;
            }
            return 0;
        }
        if (array->n == array->cap) {
            uint32_t cap = array->cap + array->cap / 2 + 1;
            HolderArray *grown = PyMem_Realloc(array, array_bytes(cap));
            if (grown == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            table->heap_bytes += array_bytes(cap) - array_bytes(grown->cap);
            grown->cap = cap;
            array = grown;
            *presence = (uint64_t)(uintptr_t)array;
        }
        memmove(&array->holders[at + 1], &array->holders[at],
                (array->n - at) * sizeof(uint32_t));
        array->holders[at] = holder;
        array->n++;
        if (fits_inline(array->n, array->holders)) { /* a low slot joined a high one */
            uint64_t small = inline_presence(array->n, array->holders);
            presence_free(table, *presence);
            *presence = small;
        }
        return 0;
    }
    /* empty or inline: at most two holders, three after an insert */
    uint32_t h[3];
    uint32_t n = 0;
    for (uint32_t i = 0; i < cur.n; i++) {
        if (i == at) {
            if (tiers) {
                h[n++] = holder;
            }
            if (found) {
                continue;
            }
        }
        h[n++] = cur.h[i];
    }
    if (at == cur.n && tiers) {
        h[n++] = holder;
    }
    if (n == 0 || fits_inline(n, h)) {
        *presence = n ? inline_presence(n, h) : 0;
        return 0;
    }
    uint64_t array = new_array(table, n, h, n);
    if (array == 0) {
        return -1;
    }
    *presence = array;
    return 0;
}

/* The int mask of a presence: bit slot * 4 + tier per holder. */
static PyObject *
presence_mask(uint64_t presence)
{
    Holders cur;
    holders_of(presence, &cur);
    if (cur.n == 0) {
        return PyLong_FromLong(0);
    }
    size_t n_bytes = (size_t)(cur.h[cur.n - 1] >> TIER_BITS) / 2 + 1;
    unsigned char stack[512];
    unsigned char *bytes = n_bytes <= sizeof(stack) ? stack : PyMem_Calloc(n_bytes, 1);
    if (bytes == NULL) {
        return PyErr_NoMemory();
    }
    if (bytes == stack) {
        memset(stack, 0, n_bytes);
    }
    for (uint32_t i = 0; i < cur.n; i++) {
        uint32_t slot = cur.h[i] >> TIER_BITS;
        bytes[slot / 2] |= (unsigned char)((cur.h[i] & TIER_NIBBLE) << (slot % 2 * 4));
    }
#if PY_VERSION_HEX >= 0x030D0000
    PyObject *mask = PyLong_FromUnsignedNativeBytes(
        bytes, n_bytes, Py_ASNATIVEBYTES_LITTLE_ENDIAN | Py_ASNATIVEBYTES_UNSIGNED_BUFFER);
#else
    PyObject *mask = _PyLong_FromByteArray(bytes, n_bytes, 1, 0);
#endif
    if (bytes != stack) {
        PyMem_Free(bytes);
    }
    return mask;
}

/* The nibble of slot in a non-negative int's bits (a nibble never straddles a word). */
static inline uint32_t
mask_nibble(const IntDigits *mask, uint32_t slot)
{
    uint64_t bit = (uint64_t)slot * TIER_BITS;
    return (uint32_t)(word_at(mask, (Py_ssize_t)(bit / 64)) >> (bit % 64)) & TIER_NIBBLE;
}

/* Whether any holder's tiers meet the wanted mask's nibble of its slot. */
static inline int
presence_meets(uint64_t presence, const IntDigits *wanted)
{
    Holders cur;
    holders_of(presence, &cur);
    for (uint32_t i = 0; i < cur.n; i++) {
        if (cur.h[i] & mask_nibble(wanted, cur.h[i] >> TIER_BITS)) {
            return 1;
        }
    }
    return 0;
}

/* --- the table ----------------------------------------------------------------------- */

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
        if (entry->presence == 0) {
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
        if (old[i].presence != 0) {
            size_t j = table_slot(table, old[i].key);
            while (fresh[j].presence != 0) {
                j = (j + 1) & (capacity - 1);
            }
            fresh[j] = old[i];
        }
    }
    PyMem_Free(old);
    return 0;
}

/* Make room for one more entry; -1 on error. */
static int
table_reserve(BlockTable *table)
{
    if ((table->used + 1) * 8 > table->capacity * 5) { /* load factor <= 5/8 */
        size_t capacity = table->capacity ? table->capacity * 2 : TABLE_MIN_CAPACITY;
        return table_resize(table, capacity);
    }
    return 0;
}

/* The entry for key, or the empty slot where it would go (room reserved first). */
static TableEntry *
table_slot_for(BlockTable *table, uint64_t key)
{
    size_t wrap = table->capacity - 1;
    for (size_t i = table_slot(table, key);; i = (i + 1) & wrap) {
        TableEntry *entry = &table->entries[i];
        if (entry->presence == 0 || entry->key == key) {
            return entry;
        }
    }
}

/* Empty the entry (its presence already freed or moved) and shift later members of its
 * probe run back (no tombstones). */
static void
table_delete(BlockTable *table, TableEntry *entry)
{
    size_t wrap = table->capacity - 1;
    size_t hole = (size_t)(entry - table->entries);
    table->entries[hole].presence = 0;
    table->used--;
    for (size_t j = (hole + 1) & wrap; table->entries[j].presence != 0; j = (j + 1) & wrap) {
        size_t home = table_slot(table, table->entries[j].key);
        /* j may move to the hole when its home is not cyclically within (hole, j]. */
        int stays = hole <= j ? (hole < home && home <= j) : (hole < home || home <= j);
        if (!stays) {
            table->entries[hole] = table->entries[j];
            table->entries[j].presence = 0;
            hole = j;
        }
    }
}

/* Apply (slot: tiers & keep | add) to key's presence, inserting or deleting the entry. */
static int
table_apply(BlockTable *table, uint64_t key, uint32_t slot, uint32_t add, uint32_t keep)
{
    TableEntry *entry;
    if (add) {
        if (table_reserve(table) < 0) {
            return -1;
        }
        entry = table_slot_for(table, key);
        if (entry->presence == 0) {
            uint64_t presence = 0;
            if (presence_apply(table, &presence, slot, add, keep) < 0) {
                return -1;
            }
            entry->key = key;
            entry->presence = presence;
            table->used++;
            return 0;
        }
    } else {
        entry = table_find(table, key);
        if (entry == NULL) {
            return 0;
        }
    }
    if (presence_apply(table, &entry->presence, slot, add, keep) < 0) {
        return -1;
    }
    if (entry->presence == 0) {
        table_delete(table, entry);
    }
    return 0;
}

static int
table_maybe_shrink(BlockTable *table)
{
    if (table->capacity > TABLE_MIN_CAPACITY * 16 && table->used * 16 < table->capacity) {
        return table_resize(table, table->capacity / 4);
    }
    return 0;
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
        presence_free(table, table->entries[i].presence);
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
        return presence_mask(entry->presence);
    }
    return nargs == 2 ? Py_NewRef(args[1]) : PyLong_FromLong(0);
}

/* A bit position argument: slot * 4 + tier, slot <= MAX_SLOT. */
static int
parse_bitpos(PyObject *obj, uint32_t *slot, uint32_t *tier_bit)
{
    unsigned long long bitpos = PyLong_AsUnsignedLongLong(obj);
    if (bitpos == (unsigned long long)-1 && PyErr_Occurred()) {
        return -1;
    }
    if (bitpos / TIER_BITS > MAX_SLOT) {
        PyErr_Format(PyExc_OverflowError, "slot %llu is beyond %u", bitpos / TIER_BITS,
                     MAX_SLOT);
        return -1;
    }
    *slot = (uint32_t)(bitpos / TIER_BITS);
    *tier_bit = 1u << (bitpos % TIER_BITS);
    return 0;
}

/* One (slot, add, keep) change applied to each key of a sequence. */
typedef struct {
    uint32_t slot;
    uint32_t add;
    uint32_t keep;
} SlotChange;

static int
apply_to_keys(BlockTable *table, PyObject *keys, const SlotChange *changes, Py_ssize_t n_changes)
{
    PyObject *seq = PySequence_Fast(keys, "keys must be a sequence of ints");
    if (seq == NULL) {
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t key;
        if (parse_key(PySequence_Fast_GET_ITEM(seq, i), &key) < 0) {
            Py_DECREF(seq);
            return -1;
        }
        for (Py_ssize_t c = 0; c < n_changes; c++) {
            if (table_apply(table, key, changes[c].slot, changes[c].add, changes[c].keep) < 0) {
                Py_DECREF(seq);
                return -1;
            }
        }
    }
    Py_DECREF(seq);
    return table_maybe_shrink(table);
}

/* For ledger_store.c: set_bit_at on a C array of keys. */
int
block_table_set_bit_raw(PyObject *obj, const uint64_t *keys, Py_ssize_t n, uint32_t bitpos)
{
    BlockTable *table = (BlockTable *)obj;
    if (bitpos / TIER_BITS > MAX_SLOT) {
        PyErr_Format(PyExc_OverflowError, "slot %u is beyond %u", bitpos / TIER_BITS, MAX_SLOT);
        return -1;
    }
    uint32_t slot = bitpos / TIER_BITS, add = 1u << (bitpos % TIER_BITS);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (table_apply(table, keys[i], slot, add, TIER_NIBBLE) < 0) {
            return -1;
        }
    }
    return table_maybe_shrink(table);
}

static PyObject *
table_set_bit_at(BlockTable *table, PyObject *const *args, Py_ssize_t nargs)
{
    SlotChange change = {0, 0, TIER_NIBBLE};
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "set_bit_at(keys, bitpos)");
        return NULL;
    }
    if (parse_bitpos(args[1], &change.slot, &change.add) < 0 ||
        apply_to_keys(table, args[0], &change, 1) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
table_clear_bit_at(BlockTable *table, PyObject *const *args, Py_ssize_t nargs)
{
    SlotChange change = {0, 0, 0};
    uint32_t tier_bit;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "clear_bit_at(keys, bitpos)");
        return NULL;
    }
    if (parse_bitpos(args[1], &change.slot, &tier_bit) < 0) {
        return NULL;
    }
    change.keep = TIER_NIBBLE & ~tier_bit;
    if (apply_to_keys(table, args[0], &change, 1) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* The slot changes that OR (add) or AND away (drop) the nibbles of a non-negative int:
 * one per slot with a nibble; a new array in *out (PyMem_Free it), -1 on error. */
static Py_ssize_t
changes_of_mask(PyObject *mask, int drop, SlotChange **out)
{
    IntDigits bits;
    if (int_digits(mask, "mask", &bits) < 0) {
        return -1;
    }
    Py_ssize_t n_words = (bits.n_digits * PyLong_SHIFT + 63) / 64;
    Py_ssize_t n = 0, cap = 4;
    SlotChange *changes = PyMem_Malloc((size_t)cap * sizeof(SlotChange));
    if (changes == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t w = 0; w < n_words; w++) {
        for (uint64_t word = word_at(&bits, w); word; word &= word - 1) {
            uint64_t bit = (uint64_t)w * 64 + (uint64_t)__builtin_ctzll(word);
            uint64_t slot = bit / TIER_BITS;
            if (n && changes[n - 1].slot == slot) {
                continue; /* its nibble is already taken */
            }
            if (slot > MAX_SLOT) {
                PyMem_Free(changes);
                PyErr_Format(PyExc_OverflowError, "slot %llu is beyond %u",
                             (unsigned long long)slot, MAX_SLOT);
                return -1;
            }
            if (n == cap) {
                cap *= 2;
                SlotChange *grown = PyMem_Realloc(changes, (size_t)cap * sizeof(SlotChange));
                if (grown == NULL) {
                    PyMem_Free(changes);
                    PyErr_NoMemory();
                    return -1;
                }
                changes = grown;
            }
            uint32_t nibble = mask_nibble(&bits, (uint32_t)slot);
            changes[n].slot = (uint32_t)slot;
            changes[n].add = drop ? 0 : nibble;
            changes[n].keep = drop ? TIER_NIBBLE & ~nibble : TIER_NIBBLE;
            n++;
        }
    }
    *out = changes;
    return n;
}

static PyObject *
table_set_bits(BlockTable *table, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "set_bits(keys, bit)");
        return NULL;
    }
    if (require_exact_int(args[1], "bit") < 0) {
        return NULL;
    }
    SlotChange *changes;
    Py_ssize_t n = changes_of_mask(args[1], 0, &changes);
    if (n < 0) {
        return NULL;
    }
    int failed = apply_to_keys(table, args[0], changes, n);
    PyMem_Free(changes);
    if (failed) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* clear_bits with a non-negative keep: each holder keeps its slot's nibble of keep. */
static int
keep_only(BlockTable *table, PyObject *keys, PyObject *keep)
{
    IntDigits bits;
    if (int_digits(keep, "keep", &bits) < 0) {
        return -1;
    }
    PyObject *seq = PySequence_Fast(keys, "keys must be a sequence of ints");
    if (seq == NULL) {
        return -1;
    }
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        uint64_t key;
        if (parse_key(PySequence_Fast_GET_ITEM(seq, i), &key) < 0) {
            Py_DECREF(seq);
            return -1;
        }
        TableEntry *entry;
        /* Holders go from the last: an applied change leaves those before it in place. */
        while ((entry = table_find(table, key)) != NULL) {
            Holders cur;
            holders_of(entry->presence, &cur);
            uint32_t k = cur.n;
            while (k > 0 && (cur.h[k - 1] & ~mask_nibble(&bits, cur.h[k - 1] >> TIER_BITS) &
                             TIER_NIBBLE) == 0) {
                k--;
            }
            if (k == 0) {
                break;
            }
            uint32_t slot = cur.h[k - 1] >> TIER_BITS;
            if (table_apply(table, key, slot, 0, mask_nibble(&bits, slot)) < 0) {
                Py_DECREF(seq);
                return -1;
            }
        }
    }
    Py_DECREF(seq);
    return table_maybe_shrink(table);
}

static PyObject *
table_clear_bits(BlockTable *table, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "clear_bits(keys, keep)");
        return NULL;
    }
    if (require_exact_int(args[1], "keep") < 0) {
        return NULL;
    }
    PyObject *zero = PyLong_FromLong(0);
    int negative = zero == NULL ? -1 : PyObject_RichCompareBool(args[1], zero, Py_LT);
    Py_XDECREF(zero);
    if (negative < 0) {
        return NULL;
    }
    if (!negative) {
        return keep_only(table, args[0], args[1]) < 0 ? NULL : Py_NewRef(Py_None);
    }
    PyObject *dropped = PyNumber_Invert(args[1]); /* ~keep: the bits to clear */
    if (dropped == NULL) {
        return NULL;
    }
    SlotChange *changes;
    Py_ssize_t n = changes_of_mask(dropped, 1, &changes);
    Py_DECREF(dropped);
    if (n < 0) {
        return NULL;
    }
    int failed = apply_to_keys(table, args[0], changes, n);
    PyMem_Free(changes);
    if (failed) {
        return NULL;
    }
    Py_RETURN_NONE;
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
        if (entry->presence == 0) {
            continue;
        }
        if (out >= PyList_GET_SIZE(items)) {
            Py_DECREF(items);
            PyErr_SetString(PyExc_RuntimeError, "BlockTable changed size during items()");
            return NULL;
        }
        uint64_t key_value = entry->key;
        PyObject *mask = presence_mask(entry->presence);
        PyObject *key = mask == NULL ? NULL : PyLong_FromUnsignedLongLong(key_value);
        PyObject *pair = key == NULL ? NULL : PyTuple_Pack(2, key, mask);
        Py_XDECREF(key);
        Py_XDECREF(mask);
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

/* holders(key) -> list[int]: the block's holders, slot << 4 | tiers, by slot. */
static PyObject *
table_holders(BlockTable *table, PyObject *obj)
{
    uint64_t key;
    if (parse_key(obj, &key) < 0) {
        return NULL;
    }
    TableEntry *entry = table_find(table, key);
    Holders cur;
    holders_of(entry != NULL ? entry->presence : 0, &cur);
    PyObject *out = PyList_New(cur.n);
    for (uint32_t i = 0; out != NULL && i < cur.n; i++) {
        PyObject *holder = PyLong_FromUnsignedLong(cur.h[i]);
        if (holder == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, i, holder);
    }
    return out;
}

static PyObject *
table_nbytes(BlockTable *table, void *Py_UNUSED(closure))
{
    return PyLong_FromSize_t(sizeof(BlockTable) + table->capacity * sizeof(TableEntry) +
                             table->heap_bytes);
}

/* Append one (mask, count) run to the flat list, the mask built from the presence. */
static int
push_run(PyObject *runs, uint64_t presence, Py_ssize_t count)
{
    PyObject *mask = presence_mask(presence);
    PyObject *n = mask == NULL ? NULL : PyLong_FromSsize_t(count);
    int failed = n == NULL || PyList_Append(runs, mask) < 0 || PyList_Append(runs, n) < 0;
    Py_XDECREF(mask);
    Py_XDECREF(n);
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

/* The int masks of consecutive lookups: equal presences in a row share one int. */
typedef struct {
    uint64_t presence; /* of `mask`; 0: none yet */
    PyObject *mask;
} MaskMemo;

/* A new reference to the mask of presence. The memo compares by content, so it may not
 * outlive a change to the table (each caller drops it before returning). */
static PyObject *
memo_mask(MaskMemo *memo, uint64_t presence)
{
    if (memo->mask == NULL || !presence_equal(memo->presence, presence)) {
        PyObject *mask = presence_mask(presence);
        if (mask == NULL) {
            return NULL;
        }
        Py_XSETREF(memo->mask, mask);
        memo->presence = presence;
    }
    return Py_NewRef(memo->mask);
}

static int
packed_keys(PyObject *packed, Py_buffer *view, const char *what)
{
    if (PyObject_GetBuffer(packed, view, PyBUF_SIMPLE) < 0) {
        return -1;
    }
    if (view->len % 8) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_ValueError, "%s: keys must be 8 bytes each", what);
        return -1;
    }
    return 0;
}

static inline uint64_t
key_at(const unsigned char *bytes, Py_ssize_t i)
{
    uint64_t key = 0;
    for (int b = 7; b >= 0; b--) {
        key = key << 8 | bytes[i * 8 + b];
    }
    return key;
}

/* get_many(keys): the mask of each key (8 bytes little-endian each), 0 when missing. */
static PyObject *
table_get_many(BlockTable *table, PyObject *packed)
{
    Py_buffer view;
    if (packed_keys(packed, &view, "get_many") < 0) {
        return NULL;
    }
    Py_ssize_t n = view.len / 8;
    PyObject *out = PyList_New(n);
    PyObject *zero = PyLong_FromLong(0);
    MaskMemo memo = {0, NULL};
    if (out == NULL || zero == NULL) {
        goto fail;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        TableEntry *entry = table_find(table, key_at(view.buf, i));
        PyObject *mask = entry == NULL ? Py_NewRef(zero) : memo_mask(&memo, entry->presence);
        if (mask == NULL) {
            goto fail;
        }
        PyList_SET_ITEM(out, i, mask);
    }
    Py_DECREF(zero);
    Py_XDECREF(memo.mask);
    PyBuffer_Release(&view);
    return out;
fail:
    Py_XDECREF(out);
    Py_XDECREF(zero);
    Py_XDECREF(memo.mask);
    PyBuffer_Release(&view);
    return NULL;
}

/* get_present(keys): {position: mask} of the keys (8 bytes little-endian each) held. */
static PyObject *
table_get_present(BlockTable *table, PyObject *packed)
{
    Py_buffer view;
    if (packed_keys(packed, &view, "get_present") < 0) {
        return NULL;
    }
    PyObject *out = PyDict_New();
    MaskMemo memo = {0, NULL};
    if (out == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    /* Masks are built before each dict insert: a collection during the insert cannot
     * change the table under a pointer held across it. */
    for (Py_ssize_t i = 0; i < view.len / 8; i++) {
        TableEntry *entry = table_find(table, key_at(view.buf, i));
        if (entry == NULL) {
            continue;
        }
        PyObject *mask = memo_mask(&memo, entry->presence);
        PyObject *position = mask == NULL ? NULL : PyLong_FromSsize_t(i);
        int failed = position == NULL || PyDict_SetItem(out, position, mask) < 0;
        Py_XDECREF(position);
        Py_XDECREF(mask);
        if (failed) {
            Py_DECREF(out);
            Py_XDECREF(memo.mask);
            PyBuffer_Release(&view);
            return NULL;
        }
    }
    Py_XDECREF(memo.mask);
    PyBuffer_Release(&view);
    return out;
}

/* See the method's docstring. Keys are hashed a few blocks ahead of the probes so the
 * table's cache lines are already on their way. Runs are found by comparing presences;
 * a run's int mask is built once, when it ends. */
static PyObject *
table_mask_runs(BlockTable *table, PyObject *const *args, Py_ssize_t nargs)
{
    TokenSource src;
    uint64_t seed;
    uint64_t ahead[PREFETCH_AHEAD];
    uint64_t run_presence = 0; /* 0: no run yet */
    Py_ssize_t run_count = 0;
    IntDigits wanted;
    if (nargs != 4 && nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "mask_runs(tokens, block_size, seed, wanted, keys_out=None)");
        return NULL;
    }
    int has_wanted = args[3] != Py_None;
    if (has_wanted && int_digits(args[3], "wanted", &wanted) < 0) {
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
    /* The table is not changed during the walk: nothing here runs Python code but the
     * list appends of finished runs, and those allocate untracked ints only. */
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
            uint64_t presence = entry->presence;
            if (run_presence != 0 && presence_equal(presence, run_presence)) {
                if (keys_out != NULL && append_key(keys_out, ahead[i]) < 0) {
                    goto fail;
                }
                run_count++;
                continue;
            }
            if (has_wanted && !presence_meets(presence, &wanted)) {
                goto done;
            }
            if (run_presence != 0 && push_run(runs, run_presence, run_count) < 0) {
                goto fail;
            }
            if (keys_out != NULL && append_key(keys_out, ahead[i]) < 0) {
                goto fail;
            }
            run_presence = presence;
            run_count = 1;
        }
    }
done:
    if (run_presence != 0 && push_run(runs, run_presence, run_count) < 0) {
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
    {"set_bit_at", (PyCFunction)(void (*)(void))table_set_bit_at, METH_FASTCALL,
     "set_bit_at(keys, bitpos): set bit bitpos (slot * 4 + tier) of each key's mask."},
    {"clear_bit_at", (PyCFunction)(void (*)(void))table_clear_bit_at, METH_FASTCALL,
     "clear_bit_at(keys, bitpos): clear bit bitpos of each present key's mask; drop masks\n"
     "that reach 0."},
    {"items", (PyCFunction)table_items, METH_NOARGS, "items(): list of (key, mask)."},
    {"holders", (PyCFunction)table_holders, METH_O,
     "holders(key) -> list[int]: the block's holders, slot << 4 | tier bits, by slot\n"
     "(what the table stores; [] when the key is missing)."},
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

static PyGetSetDef table_getset[] = {
    {"nbytes", (getter)table_nbytes, NULL,
     "bytes the table holds: the object, its entries and its holder arrays", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods table_as_sequence = {
    .sq_length = (lenfunc)table_len,
};

PyTypeObject BlockTableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvcore._native.BlockTable",
    .tp_doc = "BlockTable(secret=0): block key (u64) -> presence mask (int), stored as "
              "holders.",
    .tp_basicsize = sizeof(BlockTable),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = table_new,
    .tp_dealloc = (destructor)table_dealloc,
    .tp_methods = table_methods,
    .tp_getset = table_getset,
    .tp_as_sequence = &table_as_sequence,
};
