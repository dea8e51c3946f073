/* tally.c: Score's prefix walk over presence masks and the building of its answer, in C
 * (indexer/index/scoring.py: `_Walk` is the pure-Python twin, checked against this in
 * tests/test_native.py).
 *
 *   tally_runs(runs, candidates, weights, include_zero) -> bytes
 *       The walk of prefix_match_runs: per matched slot, in slot order, five u32 (native
 *       byte order): slot, matched blocks, and the blocks whose best copy is on cpu,
 *       storage, other (gpu is the rest).
 *   tally_masks(masks, candidates, weights, include_zero) -> bytes
 *       The same walk over one mask per block (BlockTable.get_many's list: block-key
 *       queries), equal neighbours walked as one run.
 *   tally_pool_runs(runs, candidates, weights, include_zero, credits, groups) -> bytes
 *   tally_pool_masks(masks, ...) -> bytes
 *       The same walks with shared storage pools: a run a pool holds keeps the pool's
 *       mounters alive at the storage tier (its `credits` entry's storage bits OR'ed
 *       into each word read), and of each group of mounters holding none of the runs'
 *       blocks one walks and the others copy its record (indexer/index/pools.py).
 *   scores_from_tally(tally, refs, order, weights, tiers, make) -> list
 *       One make(worker_id, dp_rank, matched, weighted, blocks_by_tier) per record, best
 *       first: matched desc, weighted desc, then order[slot] (u32 per slot: the rank of
 *       the slot's (worker_id, dp_rank) among all, so ties need no string compares);
 *       refs[slot] is the slot's (worker_id, dp_rank) (a list, None where no slot is).
 *       A `make` that is a msgspec Struct type of those five fields (WorkerScore) has its
 *       instances' slots filled here rather than being called; consecutive scores of the
 *       same tier counts share one blocks_by_tier dict (answers are read-only).
 *
 * Masks hold a nibble per slot (bit slot * 4 + tier). At thousands of ranks a mask is a
 * long int of thousands of bits: the walk reads 64 bits (16 slots) at a time straight
 * from the int's digits, and only the words that still hold a matching slot, so a step
 * costs a few operations per live word rather than an object per live slot.
 */
#include "native.h"
#include "intbits.h"

#include <structmember.h>
#ifndef Py_T_OBJECT_EX
#define Py_T_OBJECT_EX T_OBJECT_EX
#endif

#define TALLY_TIERS 4
#define RECORD_U32 5 /* slot, matched, cpu, storage, other */
#define SLOTS_PER_WORD 16

/* a == b for two exact ints, by their digits: CPython compares long ints a digit at a
 * time, ~0.8 us for masks of 4,096 slots, paid per block of a run in mask_runs. */
NATIVE_INTERNAL int
masks_equal(PyObject *a, PyObject *b)
{
    IntDigits x, y;
    if (a == b) {
        return 1;
    }
    if (!PyLong_CheckExact(a) || !PyLong_CheckExact(b) || int_digits(a, "a", &x) < 0 ||
        int_digits(b, "b", &y) < 0) {
        PyErr_Clear();
        return PyObject_RichCompareBool(a, b, Py_EQ);
    }
    return x.n_digits == y.n_digits &&
           memcmp(x.digits, y.digits, (size_t)x.n_digits * sizeof(digit)) == 0;
}

static int
read_weights(PyObject *obj, double weights[TALLY_TIERS])
{
    PyObject *seq = PySequence_Fast(obj, "weights must be a sequence of 4 floats");
    if (seq == NULL) {
        return -1;
    }
    if (PySequence_Fast_GET_SIZE(seq) != TALLY_TIERS) {
        PyErr_SetString(PyExc_ValueError, "weights must be a sequence of 4 floats");
        Py_DECREF(seq);
        return -1;
    }
    for (int t = 0; t < TALLY_TIERS; t++) {
        weights[t] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, t));
        if (weights[t] == -1.0 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
    }
    Py_DECREF(seq);
    return 0;
}

/* Best tier of each nibble value, ties to the lower tier (scoring._best_tier_table);
 * returns whether gpu is the best tier of every nibble holding a gpu copy. */
static int
best_tier_table(const double weights[TALLY_TIERS], unsigned char best[16])
{
    int gpu_always_best = 1;
    best[0] = 0;
    for (int nibble = 1; nibble < 16; nibble++) {
        int chosen = -1;
        for (int t = 0; t < TALLY_TIERS; t++) {
            if (nibble >> t & 1 && (chosen < 0 || weights[t] > weights[chosen])) {
                chosen = t;
            }
        }
        best[nibble] = (unsigned char)chosen;
        if (nibble & 1 && chosen != 0) {
            gpu_always_best = 0;
        }
    }
    return gpu_always_best;
}

typedef struct {
    Py_ssize_t n_words;
    uint64_t *alive;    /* per word: bit 0 of each live slot's nibble */
    Py_ssize_t *live;   /* indexes of the words with a live slot */
    Py_ssize_t n_live;
    int64_t *matched;   /* per slot: -1 live or not a candidate, else its matched blocks */
    uint32_t *counts;   /* per slot: blocks best on cpu, storage, other */
    unsigned char best[16];
    int fast;
    int include_zero;
} Walk;

static void
walk_free(Walk *walk)
{
    PyMem_Free(walk->alive);
    PyMem_Free(walk->live);
    PyMem_Free(walk->matched);
    PyMem_Free(walk->counts);
}

static int
walk_init(Walk *walk, const IntDigits *candidates)
{
    Py_ssize_t bits = candidates->n_digits * PyLong_SHIFT;
    walk->n_words = (bits + 63) / 64;
    Py_ssize_t n = walk->n_words ? walk->n_words : 1;
    walk->alive = PyMem_Calloc((size_t)n, sizeof(uint64_t));
    walk->live = PyMem_Calloc((size_t)n, sizeof(Py_ssize_t));
    walk->matched = PyMem_Malloc((size_t)n * SLOTS_PER_WORD * sizeof(int64_t));
    walk->counts = PyMem_Calloc((size_t)n * SLOTS_PER_WORD * (TALLY_TIERS - 1),
                                sizeof(uint32_t));
    if (!walk->alive || !walk->live || !walk->matched || !walk->counts) {
        PyErr_NoMemory();
        return -1;
    }
    walk->n_live = 0;
    for (Py_ssize_t w = 0; w < walk->n_words; w++) {
        walk->alive[w] = word_at(candidates, w) & 0x1111111111111111ULL;
        if (walk->alive[w]) {
            walk->live[walk->n_live++] = w;
        }
    }
    for (Py_ssize_t s = 0; s < n * SLOTS_PER_WORD; s++) {
        walk->matched[s] = -1;
    }
    return 0;
}

static inline void
end_slots(Walk *walk, Py_ssize_t word, uint64_t ended, int64_t depth)
{
    int64_t value = depth || walk->include_zero ? depth : -1;
    while (ended) {
        int bit = __builtin_ctzll(ended);
        walk->matched[word * SLOTS_PER_WORD + bit / 4] = value;
        ended &= ended - 1;
    }
}

/* The storage bits of the mounters of the pools holding a run, in word `w`. */
static inline uint64_t
credited_word(const IntDigits *const *credited, Py_ssize_t n_credited, Py_ssize_t w)
{
    uint64_t out = 0;
    for (Py_ssize_t c = 0; c < n_credited; c++) {
        out |= word_at(credited[c], w);
    }
    return out;
}

/* One run of `blocks` blocks with presence `mask` at `depth`, plus the storage bits of
 * `credited` (the mounters of the pools holding the run: pools are wildcard holders for
 * them); returns the live words left. */
static Py_ssize_t
walk_step(Walk *walk, const IntDigits *mask, const IntDigits *const *credited,
          Py_ssize_t n_credited, int64_t depth, uint32_t blocks)
{
    Py_ssize_t kept = 0;
    for (Py_ssize_t i = 0; i < walk->n_live; i++) {
        Py_ssize_t w = walk->live[i];
        uint64_t alive = walk->alive[w];
        uint64_t present = (word_at(mask, w) | credited_word(credited, n_credited, w)) &
                           alive * 15;
        uint64_t anywhere = (present | present >> 1 | present >> 2 | present >> 3) & alive;
        if (anywhere != alive) {
            end_slots(walk, w, alive ^ anywhere, depth);
            walk->alive[w] = alive = anywhere;
            present &= alive * 15;
        }
        if (!alive) {
            continue;
        }
        walk->live[kept++] = w;
        uint64_t look = walk->fast ? alive & ~present : alive;
        while (look) {
            int bit = __builtin_ctzll(look);
            int tier = walk->best[present >> bit & 15];
            if (tier) {
                walk->counts[(w * SLOTS_PER_WORD + bit / 4) * (TALLY_TIERS - 1) + tier - 1] +=
                    blocks;
            }
            look &= look - 1;
        }
    }
    walk->n_live = kept;
    return kept;
}

static int
walk_runs(Walk *walk, PyObject *runs, int64_t *depth)
{
    Py_ssize_t n = PySequence_Fast_GET_SIZE(runs);
    if (n % 2) {
        PyErr_SetString(PyExc_ValueError, "runs must be [mask, count, ...]");
        return -1;
    }
    for (Py_ssize_t i = 0; i < n && walk->n_live; i += 2) {
        IntDigits mask;
        if (int_digits(PySequence_Fast_GET_ITEM(runs, i), "a run's mask", &mask) < 0) {
            return -1;
        }
        long long blocks = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(runs, i + 1));
        if (blocks == -1 && PyErr_Occurred()) {
            return -1;
        }
        if (blocks < 1 || *depth + blocks > UINT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "a run's count must be >= 1, the total < 2**32");
            return -1;
        }
        if (walk_step(walk, &mask, NULL, 0, *depth, (uint32_t)blocks)) {
            *depth += blocks;
        }
    }
    for (Py_ssize_t i = 0; i < walk->n_live; i++) {
        end_slots(walk, walk->live[i], walk->alive[walk->live[i]], *depth);
    }
    return 0;
}

static PyObject *
walk_records(const Walk *walk)
{
    Py_ssize_t n_slots = walk->n_words * SLOTS_PER_WORD;
    Py_ssize_t n = 0;
    for (Py_ssize_t s = 0; s < n_slots; s++) {
        n += walk->matched[s] >= 0;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * RECORD_U32 * (Py_ssize_t)sizeof(uint32_t));
    if (out == NULL) {
        return NULL;
    }
    uint32_t *rec = (uint32_t *)PyBytes_AS_STRING(out);
    for (Py_ssize_t s = 0; s < n_slots; s++) {
        if (walk->matched[s] >= 0) {
            rec[0] = (uint32_t)s;
            rec[1] = (uint32_t)walk->matched[s];
            memcpy(&rec[2], &walk->counts[s * (TALLY_TIERS - 1)],
                   (TALLY_TIERS - 1) * sizeof(uint32_t));
            rec += RECORD_U32;
        }
    }
    return out;
}

NATIVE_INTERNAL const char tally_runs_doc[] =
    "tally_runs(runs, candidates, weights, include_zero) -> bytes: the prefix walk over\n"
    "runs [mask, count, ...]; per matched slot five u32: slot, matched, cpu, storage, other.";

typedef int (*Walker)(Walk *walk, PyObject *seq, int64_t *depth);

/* The body of tally_runs and tally_masks: parse (seq, candidates, weights, include_zero),
 * walk `seq` with `walker`, answer the records. */
static PyObject *
tally_with(PyObject *const *args, Py_ssize_t nargs, Walker walker, const char *usage,
           const char *seq_error)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, usage);
        return NULL;
    }
    Walk walk = {0};
    IntDigits candidates;
    double weights[TALLY_TIERS];
    int include_zero = PyObject_IsTrue(args[3]);
    if (include_zero < 0 || int_digits(args[1], "candidates", &candidates) < 0 ||
        read_weights(args[2], weights) < 0) {
        return NULL;
    }
    PyObject *seq = PySequence_Fast(args[0], seq_error);
    if (seq == NULL) {
        return NULL;
    }
    PyObject *out = NULL;
    int64_t depth = 0;
    walk.fast = best_tier_table(weights, walk.best);
    walk.include_zero = include_zero;
    if (walk_init(&walk, &candidates) == 0 && walker(&walk, seq, &depth) == 0) {
        out = walk_records(&walk);
    }
    walk_free(&walk);
    Py_DECREF(seq);
    return out;
}

NATIVE_INTERNAL PyObject *
tally_runs(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    return tally_with(args, nargs, walk_runs,
                      "tally_runs(runs, candidates, weights, include_zero)",
                      "runs must be a sequence of ints");
}

/* walk_runs over one mask per block: equal neighbours are walked as one run. */
static int
walk_masks(Walk *walk, PyObject *masks, int64_t *depth)
{
    Py_ssize_t n = PySequence_Fast_GET_SIZE(masks);
    PyObject **items = PySequence_Fast_ITEMS(masks);
    for (Py_ssize_t i = 0; i < n && walk->n_live;) {
        Py_ssize_t end = i + 1;
        int equal = 1;
        while (end < n && (equal = masks_equal(items[i], items[end])) == 1) {
            end++;
        }
        IntDigits mask;
        if (equal < 0 || int_digits(items[i], "a mask", &mask) < 0) {
            return -1;
        }
        if (*depth + (end - i) > UINT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "masks must be fewer than 2**32");
            return -1;
        }
        if (walk_step(walk, &mask, NULL, 0, *depth, (uint32_t)(end - i))) {
            *depth += end - i;
        }
        i = end;
    }
    for (Py_ssize_t i = 0; i < walk->n_live; i++) {
        end_slots(walk, walk->live[i], walk->alive[walk->live[i]], *depth);
    }
    return 0;
}

NATIVE_INTERNAL const char tally_masks_doc[] =
    "tally_masks(masks, candidates, weights, include_zero) -> bytes: tally_runs over one\n"
    "mask per block (a list, as BlockTable.get_many gives them), equal neighbours as runs.";

NATIVE_INTERNAL PyObject *
tally_masks(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    return tally_with(args, nargs, walk_masks,
                      "tally_masks(masks, candidates, weights, include_zero)",
                      "masks must be a sequence of ints");
}

/* --- shared storage pools: wildcard holders for their mounters ---------------------- */

typedef struct {
    IntDigits mask;
    uint32_t blocks;
} Run;

typedef struct {
    Py_ssize_t nibble_word; /* the pool slot's nibble: word and bit offset in it */
    int nibble_bit;
    IntDigits mounters;     /* storage bits of the candidate slots mounting the pool */
} Credit;

/* Mounters of the same pools holding none of the query's blocks: `first` walks, the
 * others (`n_words` words of slot bits) copy its record. */
typedef struct {
    Py_ssize_t first;
    uint64_t *others;
} Replica;

typedef struct {
    Run *runs;
    Py_ssize_t n_runs;
    Credit *credits;
    Py_ssize_t n_credits;
    const IntDigits **credited; /* scratch: the mounters credited in the current run */
    Replica *replicas;
    Py_ssize_t n_replicas;
    uint64_t *dropped; /* per word: slots whose answer is a replica's */
    PyObject *credit_seq; /* holds the credit tuples, whose ints `credits` points into */
} Pooled;

static void
pooled_free(Pooled *p)
{
    for (Py_ssize_t i = 0; i < p->n_replicas; i++) {
        PyMem_Free(p->replicas[i].others);
    }
    PyMem_Free(p->runs);
    PyMem_Free(p->credits);
    PyMem_Free(p->credited);
    PyMem_Free(p->replicas);
    PyMem_Free(p->dropped);
    Py_XDECREF(p->credit_seq);
}

/* `seq` as runs: [mask, count, ...] when `as_runs`, else one mask per block with equal
 * neighbours as one run. */
static int
collect_runs(Pooled *p, PyObject *seq, int as_runs)
{
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    if (as_runs && n % 2) {
        PyErr_SetString(PyExc_ValueError, "runs must be [mask, count, ...]");
        return -1;
    }
    p->runs = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(Run));
    if (p->runs == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    int64_t total = 0;
    for (Py_ssize_t i = 0; i < n;) {
        Run *run = &p->runs[p->n_runs];
        Py_ssize_t end = i + 1;
        long long blocks;
        if (as_runs) {
            blocks = PyLong_AsLongLong(items[i + 1]);
            if (blocks == -1 && PyErr_Occurred()) {
                return -1;
            }
            end = i + 2;
        } else {
            int equal = 1;
            while (end < n && (equal = masks_equal(items[i], items[end])) == 1) {
                end++;
            }
            if (equal < 0) {
                return -1;
            }
            blocks = end - i;
        }
        if (blocks < 1 || total + blocks > UINT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "a run's count must be >= 1, the total < 2**32");
            return -1;
        }
        if (int_digits(items[i], as_runs ? "a run's mask" : "a mask", &run->mask) < 0) {
            return -1;
        }
        run->blocks = (uint32_t)blocks;
        total += blocks;
        p->n_runs++;
        i = end;
    }
    return 0;
}

/* `credits`: (shift, mounters) per pool, as pools.PoolCredit. */
static int
collect_credits(Pooled *p, PyObject *credits)
{
    PyObject *seq = PySequence_Fast(credits, "credits must be a sequence of (shift, mounters)");
    if (seq == NULL) {
        return -1;
    }
    p->credit_seq = seq; /* released by pooled_free, after the walk read the ints */
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    p->credits = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(Credit));
    p->credited = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(IntDigits *));
    if (p->credits == NULL || p->credited == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            PyErr_SetString(PyExc_TypeError, "a credit must be a (shift, mounters) tuple");
            return -1;
        }
        Py_ssize_t shift = PyLong_AsSsize_t(PyTuple_GET_ITEM(item, 0));
        if (shift == -1 && PyErr_Occurred()) {
            return -1;
        }
        if (shift < 0 || shift % 4) {
            PyErr_SetString(PyExc_ValueError, "a credit's shift must be a slot's (>= 0, * 4)");
            return -1;
        }
        Credit *credit = &p->credits[i];
        credit->nibble_word = shift / 64;
        credit->nibble_bit = (int)(shift % 64);
        /* the tuple keeps the int alive, and credit_seq the tuple, for the whole call */
        if (int_digits(PyTuple_GET_ITEM(item, 1), "a credit's mounters", &credit->mounters) < 0) {
            return -1;
        }
    }
    p->n_credits = n;
    return 0;
}

static inline uint64_t
nibble_bits(uint64_t word)
{
    return (word | word >> 1 | word >> 2 | word >> 3) & 0x1111111111111111ULL;
}

static Py_ssize_t
popcount_words(const uint64_t *words, Py_ssize_t n)
{
    Py_ssize_t count = 0;
    for (Py_ssize_t w = 0; w < n; w++) {
        count += __builtin_popcountll(words[w]);
    }
    return count;
}

/* The replicas (pools.pool_runs): of each group of candidate slots mounting the same
 * pools (`groups`, `slot_bits` form), those holding none of the runs' blocks get one
 * answer; with two or more, the lowest walks and the others copy it. */
static int
collect_replicas(Pooled *p, PyObject *groups, const IntDigits *candidates, Py_ssize_t n_words)
{
    PyObject *seq = PySequence_Fast(groups, "groups must be a sequence of ints");
    if (seq == NULL) {
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    Py_ssize_t words = n_words ? n_words : 1;
    uint64_t *held = PyMem_Calloc((size_t)words, sizeof(uint64_t));
    p->dropped = PyMem_Calloc((size_t)words, sizeof(uint64_t));
    p->replicas = PyMem_Calloc((size_t)(n ? n : 1), sizeof(Replica));
    int rc = -1;
    if (held == NULL || p->dropped == NULL || p->replicas == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t w = 0; w < n_words && n; w++) {
        uint64_t any = 0;
        for (Py_ssize_t r = 0; r < p->n_runs; r++) {
            any |= word_at(&p->runs[r].mask, w);
        }
        held[w] = nibble_bits(any) & word_at(candidates, w);
    }
    for (Py_ssize_t g = 0; g < n; g++) {
        IntDigits group;
        if (int_digits(PySequence_Fast_GET_ITEM(seq, g), "a group", &group) < 0) {
            goto done;
        }
        uint64_t *pure = PyMem_Calloc((size_t)words, sizeof(uint64_t));
        if (pure == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        for (Py_ssize_t w = 0; w < n_words; w++) {
            pure[w] = word_at(&group, w) & word_at(candidates, w) & ~held[w] &
                      0x1111111111111111ULL;
        }
        if (popcount_words(pure, n_words) < 2) {
            PyMem_Free(pure);
            continue;
        }
        Py_ssize_t w = 0;
        while (!pure[w]) {
            w++;
        }
        int bit = __builtin_ctzll(pure[w]);
        pure[w] &= pure[w] - 1;
        for (Py_ssize_t v = 0; v < n_words; v++) {
            p->dropped[v] |= pure[v];
        }
        p->replicas[p->n_replicas++] = (Replica){w * SLOTS_PER_WORD + bit / 4, pure};
    }
    rc = 0;
done:
    PyMem_Free(held);
    Py_DECREF(seq);
    return rc;
}

/* The walk over the runs with the pools credited: a run a pool holds keeps the pool's
 * mounters alive (storage tier) with no mask built per run. */
static int
walk_pooled(Walk *walk, Pooled *p, int64_t *depth)
{
    for (Py_ssize_t w = 0; w < walk->n_words; w++) {
        walk->alive[w] &= ~p->dropped[w];
    }
    Py_ssize_t kept = 0;
    for (Py_ssize_t i = 0; i < walk->n_live; i++) {
        if (walk->alive[walk->live[i]]) {
            walk->live[kept++] = walk->live[i];
        }
    }
    walk->n_live = kept;
    for (Py_ssize_t r = 0; r < p->n_runs && walk->n_live; r++) {
        const Run *run = &p->runs[r];
        Py_ssize_t n_credited = 0;
        for (Py_ssize_t c = 0; c < p->n_credits; c++) {
            const Credit *credit = &p->credits[c];
            if (word_at(&run->mask, credit->nibble_word) >> credit->nibble_bit & 15) {
                p->credited[n_credited++] = &credit->mounters;
            }
        }
        if (walk_step(walk, &run->mask, p->credited, n_credited, *depth, run->blocks)) {
            *depth += run->blocks;
        }
    }
    for (Py_ssize_t i = 0; i < walk->n_live; i++) {
        end_slots(walk, walk->live[i], walk->alive[walk->live[i]], *depth);
    }
    return 0;
}

/* walk_records, then each replica's record copied to its other slots: after the walk's
 * records, in their order, each one's others in slot order. */
static PyObject *
pooled_records(const Walk *walk, const Pooled *p)
{
    PyObject *walked = walk_records(walk);
    if (walked == NULL || !p->n_replicas) {
        return walked;
    }
    Py_ssize_t n_walked = PyBytes_GET_SIZE(walked) / (RECORD_U32 * (Py_ssize_t)sizeof(uint32_t));
    Py_ssize_t n = n_walked;
    for (Py_ssize_t i = 0; i < p->n_replicas; i++) {
        if (walk->matched[p->replicas[i].first] >= 0) {
            n += popcount_words(p->replicas[i].others, walk->n_words);
        }
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * RECORD_U32 * (Py_ssize_t)sizeof(uint32_t));
    if (out == NULL) {
        Py_DECREF(walked);
        return NULL;
    }
    const uint32_t *src = (const uint32_t *)PyBytes_AS_STRING(walked);
    uint32_t *rec = (uint32_t *)PyBytes_AS_STRING(out);
    memcpy(rec, src, (size_t)PyBytes_GET_SIZE(walked));
    uint32_t *next = rec + n_walked * RECORD_U32;
    for (Py_ssize_t i = 0; i < n_walked; i++) {
        const uint32_t *record = &src[i * RECORD_U32];
        for (Py_ssize_t k = 0; k < p->n_replicas; k++) {
            const Replica *replica = &p->replicas[k];
            if (replica->first != (Py_ssize_t)record[0]) {
                continue;
            }
            for (Py_ssize_t w = 0; w < walk->n_words; w++) {
                for (uint64_t bits = replica->others[w]; bits; bits &= bits - 1) {
                    memcpy(next, record, RECORD_U32 * sizeof(uint32_t));
                    next[0] = (uint32_t)(w * SLOTS_PER_WORD + __builtin_ctzll(bits) / 4);
                    next += RECORD_U32;
                }
            }
        }
    }
    Py_DECREF(walked);
    return out;
}

/* tally_pool_runs / tally_pool_masks: (seq, candidates, weights, include_zero, credits,
 * groups). */
static PyObject *
tally_pooled(PyObject *const *args, Py_ssize_t nargs, int as_runs, const char *usage)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, usage);
        return NULL;
    }
    Walk walk = {0};
    Pooled pooled = {0};
    IntDigits candidates;
    double weights[TALLY_TIERS];
    int include_zero = PyObject_IsTrue(args[3]);
    if (include_zero < 0 || int_digits(args[1], "candidates", &candidates) < 0 ||
        read_weights(args[2], weights) < 0) {
        return NULL;
    }
    PyObject *seq = PySequence_Fast(args[0], as_runs ? "runs must be a sequence of ints"
                                                     : "masks must be a sequence of ints");
    if (seq == NULL) {
        return NULL;
    }
    PyObject *out = NULL;
    int64_t depth = 0;
    walk.fast = best_tier_table(weights, walk.best);
    walk.include_zero = include_zero;
    if (walk_init(&walk, &candidates) == 0 && collect_runs(&pooled, seq, as_runs) == 0 &&
        collect_credits(&pooled, args[4]) == 0 &&
        collect_replicas(&pooled, args[5], &candidates, walk.n_words) == 0 &&
        walk_pooled(&walk, &pooled, &depth) == 0) {
        out = pooled_records(&walk, &pooled);
    }
    pooled_free(&pooled);
    walk_free(&walk);
    Py_DECREF(seq);
    return out;
}

NATIVE_INTERNAL const char tally_pool_runs_doc[] =
    "tally_pool_runs(runs, candidates, weights, include_zero, credits, groups) -> bytes:\n"
    "tally_runs with shared storage pools: credits are pools.PoolCredit (shift, mounters),\n"
    "groups the candidate slots mounting the same pools; a replica's record copied to the slots sharing its answer.";

NATIVE_INTERNAL PyObject *
tally_pool_runs(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    return tally_pooled(args, nargs, 1,
                        "tally_pool_runs(runs, candidates, weights, include_zero, credits, "
                        "groups)");
}

NATIVE_INTERNAL const char tally_pool_masks_doc[] =
    "tally_pool_masks(masks, candidates, weights, include_zero, credits, groups) -> bytes:\n"
    "tally_pool_runs over one mask per block, equal neighbours as runs.";

NATIVE_INTERNAL PyObject *
tally_pool_masks(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    return tally_pooled(args, nargs, 0,
                        "tally_pool_masks(masks, candidates, weights, include_zero, credits, "
                        "groups)");
}

/* --- the answer -------------------------------------------------------------------- */

typedef struct {
    uint32_t matched;
    uint32_t order;
    double weighted;
    const uint32_t *record;
} Ranked;

static int
ranked_cmp(const void *a, const void *b)
{
    const Ranked *x = a, *y = b;
    if (x->matched != y->matched) {
        return x->matched > y->matched ? -1 : 1;
    }
    if (x->weighted != y->weighted) {
        return x->weighted > y->weighted ? -1 : 1;
    }
    return (x->order > y->order) - (x->order < y->order);
}

/* Pools widely mounted make answers of thousands of ranks with few distinct (matched,
 * weighted) pairs; those are ranked in linear time instead of by qsort. */
#define MAX_PAIRS 32

typedef struct {
    uint32_t matched;
    double weighted;
    Py_ssize_t count; /* records with this pair, then where the next one goes */
} Pair;

static int
pair_cmp(const void *a, const void *b)
{
    const Pair *x = a, *y = b;
    if (x->matched != y->matched) {
        return x->matched > y->matched ? -1 : 1;
    }
    return x->weighted > y->weighted ? -1 : x->weighted < y->weighted;
}

/* ranked_cmp's order for `n` records: the records placed by order (each slot's rank
 * among all: distinct, below `n_order`), then spread stably over their pairs, best pair
 * first. Returns 0 when it cannot (too many pairs, orders too sparse, out of range or
 * repeated), -1 on error. */
static int
rank_by_pairs(Ranked *ranked, Py_ssize_t n, Py_ssize_t n_order)
{
    if (n < 256 || n_order > 8 * n) {
        return 0;
    }
    Pair pairs[MAX_PAIRS];
    int n_pairs = 0, last = 0;
    unsigned char *pair_of = PyMem_Malloc((size_t)n);
    Py_ssize_t *at = PyMem_Malloc((size_t)n_order * sizeof(Py_ssize_t));
    Ranked *out = PyMem_Malloc((size_t)n * sizeof(Ranked));
    int rc = 0;
    if (pair_of == NULL || at == NULL || out == NULL) {
        PyErr_NoMemory();
        rc = -1;
        goto done;
    }
    for (Py_ssize_t o = 0; o < n_order; o++) {
        at[o] = -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        const Ranked *r = &ranked[i];
        if (r->order >= (uint64_t)n_order || at[r->order] >= 0 || r->weighted != r->weighted) {
            goto done; /* an order out of range or repeated, or a NaN: left to qsort */
        }
        at[r->order] = i;
        if (!n_pairs || pairs[last].matched != r->matched ||
            pairs[last].weighted != r->weighted) {
            for (last = 0; last < n_pairs; last++) {
                if (pairs[last].matched == r->matched && pairs[last].weighted == r->weighted) {
                    break;
                }
            }
            if (last == n_pairs) {
                if (n_pairs == MAX_PAIRS) {
                    goto done;
                }
                pairs[n_pairs++] = (Pair){r->matched, r->weighted, 0};
            }
        }
        pairs[last].count++;
    }
    qsort(pairs, (size_t)n_pairs, sizeof(Pair), pair_cmp);
    Py_ssize_t start = 0;
    for (int p = 0; p < n_pairs; p++) {
        Py_ssize_t count = pairs[p].count;
        pairs[p].count = start;
        start += count;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        for (last = 0; last < n_pairs - 1 && (pairs[last].matched != ranked[i].matched ||
                                               pairs[last].weighted != ranked[i].weighted);
             last++) {
        }
        pair_of[i] = (unsigned char)last;
    }
    for (Py_ssize_t o = 0; o < n_order; o++) {
        if (at[o] >= 0) {
            out[pairs[pair_of[at[o]]].count++] = ranked[at[o]];
        }
    }
    memcpy(ranked, out, (size_t)n * sizeof(Ranked));
    rc = 1;
done:
    PyMem_Free(pair_of);
    PyMem_Free(at);
    PyMem_Free(out);
    return rc;
}

/* The weighted score as scoring._Walk._tally sums it (same order of float operations). */
static double
weighted_score(const uint32_t *record, const double weights[TALLY_TIERS])
{
    uint32_t matched = record[1];
    if (!(record[2] | record[3] | record[4])) {
        return weights[0] * matched;
    }
    double sum = weights[0] * (double)(matched - record[2] - record[3] - record[4]);
    for (int t = 1; t < TALLY_TIERS; t++) {
        sum += weights[t] * record[1 + t];
    }
    return sum;
}

/* {tier name: blocks} of the tiers holding some; `matched` is the int of record[1]. */
static PyObject *
blocks_by_tier(const uint32_t *record, PyObject *tiers, PyObject *matched)
{
    PyObject *out = PyDict_New();
    if (out == NULL) {
        return NULL;
    }
    uint32_t counts[TALLY_TIERS] = {record[1] - record[2] - record[3] - record[4], record[2],
                                    record[3], record[4]};
    for (int t = 0; t < TALLY_TIERS; t++) {
        if (counts[t]) {
            PyObject *count = counts[t] == record[1] ? Py_NewRef(matched)
                                                     : PyLong_FromUnsignedLong(counts[t]);
            if (count == NULL ||
                PyDict_SetItem(out, PyTuple_GET_ITEM(tiers, t), count) < 0) {
                Py_XDECREF(count);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(count);
        }
    }
    return out;
}

/* Objects equal to the previous score's are reused: ints and floats (immutable), and the
 * blocks_by_tier dict of the same tier counts (`record`: the score that made it). An
 * answer's scores are read-only (WorkerScore's doc): no caller writes into the dict, so
 * the two thousand mounters of a pool holding none of the query themselves share one
 * {storage: n} instead of a dict each. */
typedef struct {
    PyObject *matched, *weighted, *by_tier;
    const uint32_t *record;
} Reuse;

static PyObject *
reuse_int(PyObject **held, uint32_t value)
{
    if (*held == NULL || PyLong_AsUnsignedLong(*held) != value) {
        Py_XSETREF(*held, PyLong_FromUnsignedLong(value));
    }
    return *held;
}

/* How a score is made: by calling `make`, or, when `make` is a msgspec Struct type of
 * five fields without __post_init__ (WorkerScore), by allocating the instance and storing
 * the fields straight into its slots, which is what its __init__ does with five
 * positional arguments; the call's argument handling is what is saved. The first score is
 * still made by the call, and the slots are filled directly only if that call stored each
 * argument, unchanged, in the slot found for its field (a kw_only Struct, a converting
 * __init__ or a subclass fails it and keeps being called). */
#define SCORE_FIELDS 5

typedef struct {
    PyObject *make;
    PyTypeObject *type; /* NULL: call make */
    int checked;        /* the first call's result matched the slots */
    int raw;            /* not GC, freed by PyObject_Free, nothing but the five slots */
    Py_ssize_t offsets[SCORE_FIELDS];
} Maker;

/* The slot offset of `name` in `type` when it is a plain object slot, else -1. */
static Py_ssize_t
slot_offset(PyTypeObject *type, PyObject *name)
{
    PyObject *descr = _PyType_Lookup(type, name);
    if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        return -1;
    }
    PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
    if (member->type != Py_T_OBJECT_EX || member->offset < (Py_ssize_t)sizeof(PyObject) ||
        member->offset > type->tp_basicsize - (Py_ssize_t)sizeof(PyObject *)) {
        return -1;
    }
    return member->offset;
}

static int
maker_init(Maker *maker, PyObject *make)
{
    maker->make = make;
    maker->type = NULL;
    maker->checked = 0;
    maker->raw = 0;
    /* msgspec's own Struct types only: another class's __init__ may do more than fill */
    if (!PyType_Check(make) || strcmp(Py_TYPE(make)->tp_name, "msgspec._core.StructMeta")) {
        return 0;
    }
    PyTypeObject *type = (PyTypeObject *)make;
    PyObject *fields = PyObject_GetAttrString(make, "__struct_fields__");
    if (fields == NULL) {
        PyErr_Clear();
        return 0;
    }
    PyObject *post_init = PyUnicode_InternFromString("__post_init__");
    int plain = post_init != NULL && PyTuple_Check(fields) &&
                PyTuple_GET_SIZE(fields) == SCORE_FIELDS && type->tp_dictoffset == 0 &&
                type->tp_alloc != NULL && _PyType_Lookup(type, post_init) == NULL;
    Py_XDECREF(post_init);
    for (int f = 0; plain && f < SCORE_FIELDS; f++) {
        PyObject *name = PyTuple_GET_ITEM(fields, f);
        maker->offsets[f] = PyUnicode_Check(name) ? slot_offset(type, name) : -1;
        plain = maker->offsets[f] >= 0;
    }
    Py_DECREF(fields);
    if (PyErr_Occurred()) {
        return -1;
    }
    if (plain) {
        maker->type = type;
        Py_ssize_t covered = 0; /* the five offsets, distinct, tile the body */
        for (int f = 0; f < SCORE_FIELDS; f++) {
            for (int g = 0; g < f; g++) {
                covered |= maker->offsets[f] == maker->offsets[g];
            }
        }
        maker->raw = !covered && !PyType_IS_GC(type) && type->tp_itemsize == 0 &&
                     type->tp_free == PyObject_Free &&
                     type->tp_basicsize ==
                         (Py_ssize_t)(sizeof(PyObject) + SCORE_FIELDS * sizeof(PyObject *));
    }
    return 0;
}

/* Whether `made` (make's result for `values`) holds each value in its field's slot. */
static int
filled_as_slots(const Maker *maker, PyObject *made, PyObject *const values[SCORE_FIELDS])
{
    if (!Py_IS_TYPE(made, maker->type)) {
        return 0;
    }
    for (int f = 0; f < SCORE_FIELDS; f++) {
        if (*(PyObject **)((char *)made + maker->offsets[f]) != values[f]) {
            return 0;
        }
    }
    return 1;
}

static PyObject *
maker_make(Maker *maker, PyObject *const values[SCORE_FIELDS])
{
    if (maker->type == NULL || !maker->checked) {
        PyObject *made = PyObject_Vectorcall(maker->make, values, SCORE_FIELDS, NULL);
        if (made != NULL && maker->type != NULL) {
            maker->checked = filled_as_slots(maker, made, values);
            if (!maker->checked) {
                maker->type = NULL;
            }
        }
        return made;
    }
    PyObject *out;
    if (maker->raw) {
        out = PyObject_Malloc((size_t)maker->type->tp_basicsize);
        if (out == NULL) {
            return PyErr_NoMemory();
        }
        PyObject_Init(out, maker->type);
    } else {
        out = maker->type->tp_alloc(maker->type, 0);
        if (out == NULL) {
            return NULL;
        }
    }
    for (int f = 0; f < SCORE_FIELDS; f++) {
        *(PyObject **)((char *)out + maker->offsets[f]) = Py_NewRef(values[f]);
    }
    return out;
}

static PyObject *
make_score(const Ranked *r, PyObject *refs, PyObject *tiers, Maker *maker,
           Reuse *reuse)
{
    /* checked here, not once: a Python make may have shortened the list */
    if ((Py_ssize_t)r->record[0] >= PyList_GET_SIZE(refs)) {
        PyErr_SetString(PyExc_ValueError, "refs changed while the answer was made");
        return NULL;
    }
    PyObject *ref = PyList_GET_ITEM(refs, r->record[0]);
    if (!PyTuple_Check(ref) || PyTuple_GET_SIZE(ref) != 2) {
        PyErr_SetString(PyExc_TypeError, "refs must give each slot (worker_id, dp_rank)");
        return NULL;
    }
    if ((reuse->matched == NULL || reuse->record[1] != r->matched) &&
        reuse_int(&reuse->matched, r->matched) == NULL) {
        return NULL;
    }
    if (reuse->weighted == NULL || PyFloat_AS_DOUBLE(reuse->weighted) != r->weighted) {
        Py_XSETREF(reuse->weighted, PyFloat_FromDouble(r->weighted));
        if (reuse->weighted == NULL) {
            return NULL;
        }
    }
    /* matched, cpu, storage, other: the same counts make the same dict */
    const uint32_t *was = reuse->record, *now = r->record;
    if (reuse->by_tier == NULL || was[1] != now[1] || was[2] != now[2] || was[3] != now[3] ||
        was[4] != now[4]) {
        Py_XSETREF(reuse->by_tier, blocks_by_tier(r->record, tiers, reuse->matched));
        if (reuse->by_tier == NULL) {
            return NULL;
        }
        reuse->record = r->record;
    }
    PyObject *by_tier = reuse->by_tier;
    PyObject *values[SCORE_FIELDS] = {PyTuple_GET_ITEM(ref, 0), PyTuple_GET_ITEM(ref, 1),
                                      reuse->matched, reuse->weighted, by_tier};
    return maker_make(maker, values);
}

NATIVE_INTERNAL const char score_maker_kind_doc[] =
    "score_maker_kind(make) -> str: how scores_from_tally makes scores with this make:\n"
    "'raw' (allocated and slots filled), 'slots' (tp_alloc, slots filled), 'call'\n"
    "(before its first call's check; tests hold WorkerScore to its fast path).";

NATIVE_INTERNAL PyObject *
score_maker_kind(PyObject *module, PyObject *make)
{
    Maker maker;
    if (maker_init(&maker, make) < 0) {
        return NULL;
    }
    return PyUnicode_FromString(maker.type == NULL ? "call" : maker.raw ? "raw" : "slots");
}

NATIVE_INTERNAL const char scores_from_tally_doc[] =
    "scores_from_tally(tally, refs, order, weights, tiers, make) -> list: one\n"
    "make(worker_id, dp_rank, matched, weighted, blocks_by_tier) per record, best first\n"
    "(a Struct make's slots filled directly; equal tier counts in a row share one dict).";

NATIVE_INTERNAL PyObject *
scores_from_tally(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "scores_from_tally(tally, refs, order, weights, tiers, make)");
        return NULL;
    }
    PyObject *refs = args[1], *tiers = args[4], *make = args[5];
    double weights[TALLY_TIERS];
    if (read_weights(args[3], weights) < 0) {
        return NULL;
    }
    if (!PyTuple_Check(tiers) || PyTuple_GET_SIZE(tiers) != TALLY_TIERS) {
        PyErr_SetString(PyExc_TypeError, "tiers must be a tuple of 4 names");
        return NULL;
    }
    Py_buffer tally, order;
    if (PyObject_GetBuffer(args[0], &tally, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[2], &order, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&tally);
        return NULL;
    }
    PyObject *out = NULL;
    Ranked *ranked = NULL;
    Py_ssize_t n = tally.len / (RECORD_U32 * (Py_ssize_t)sizeof(uint32_t));
    Py_ssize_t n_order = order.len / (Py_ssize_t)sizeof(uint32_t);
    Reuse reuse = {NULL, NULL, NULL, NULL};
    Maker maker;
    if (maker_init(&maker, make) < 0) {
        goto done;
    }
    if (!PyList_Check(refs)) {
        PyErr_SetString(PyExc_TypeError, "refs must be a list indexed by slot");
        goto done;
    }
    if (PyList_GET_SIZE(refs) < n_order) {
        n_order = PyList_GET_SIZE(refs); /* a slot must have both an order and a ref */
    }
    if (tally.len % (RECORD_U32 * sizeof(uint32_t))) {
        PyErr_SetString(PyExc_ValueError, "tally must be whole records of five u32");
        goto done;
    }
    ranked = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(Ranked));
    if (ranked == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    const uint32_t *records = tally.buf;
    const uint32_t *orders = order.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint32_t *rec = &records[i * RECORD_U32];
        if ((Py_ssize_t)rec[0] >= n_order || (uint64_t)rec[2] + rec[3] + rec[4] > rec[1]) {
            PyErr_SetString(PyExc_ValueError, "a record's slot has no order or ref, or its "
                                              "tier counts exceed its matched blocks");
            goto done;
        }
        ranked[i] = (Ranked){rec[1], orders[rec[0]], weighted_score(rec, weights), rec};
    }
    int placed = rank_by_pairs(ranked, n, n_order);
    if (placed < 0) {
        goto done;
    }
    if (!placed) {
        qsort(ranked, (size_t)n, sizeof(Ranked), ranked_cmp);
    }
    out = PyList_New(n);
    for (Py_ssize_t i = 0; out != NULL && i < n; i++) {
        PyObject *score = make_score(&ranked[i], refs, tiers, &maker, &reuse);
        if (score == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, i, score);
    }
done:
    Py_XDECREF(reuse.matched);
    Py_XDECREF(reuse.weighted);
    Py_XDECREF(reuse.by_tier);
    PyMem_Free(ranked);
    PyBuffer_Release(&tally);
    PyBuffer_Release(&order);
    return out;
}
