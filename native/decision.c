/* decision.c: FindBestWorker's cheapest candidates at temperature 0, and its answer, in C
 * (indexer/serve/decision.py; `scheduling.top_costs` is the pure-Python twin, checked
 * against this in tests/test_decision_native.py).
 *
 *   encode_decision(chosen, ranked, freshness, candidate_count) -> bytes
 *       The FindBestWorkerResponse of those rows, serialised (no message object per
 *       candidate; protobuf's own serialiser is the pure-Python twin).
 *   decision_top_costs(scores, loads, ordered, positions, query_blocks, overlap_weight,
 *                      storage_load_weight, limit) -> list[tuple]
 *       scores: the Score answer (objects with worker_id, dp_rank, matched_blocks and
 *       blocks_by_tier, a dict whose "storage" entry counts storage-tier blocks); loads:
 *       the request's WorkerLoads (worker_id, dp_rank, active_blocks, waiting_requests;
 *       the last entry of a ref wins, as for scores; refs that are not candidates are
 *       ignored); ordered: every candidate ref (worker_id, dp_rank), sorted; positions:
 *       ref -> its index in ordered (`CandidateSet.positions`). Returns the `limit`
 *       cheapest candidates, best first, as (worker_id, dp_rank, matched_blocks,
 *       prefill_blocks, active_blocks, cost, waiting_requests, storage_blocks).
 *   decision_tally_top_costs(tally, refs, loads, ordered, positions, query_blocks, ...)
 *       -> (rows, hits)
 *       The same rows from the Score walk's tally (tally.c records: slot, matched, cpu,
 *       storage, other; refs names the slots) rather than a WorkerScore and its dict per
 *       matched rank; hits: the candidates with a matched block.
 *
 * The ranking is top_costs's: cost, then more matched blocks, fewer waiting requests,
 * then (worker_id, dp_rank), which is the position in `ordered`, so ties are broken without
 * string compares; cost = overlap_weight * (prefill + storage_load_weight *
 * storage) + active, in the same double operations as Python, so the answers are equal
 * bit for bit. A candidate neither matched nor loaded costs overlap_weight * query_blocks
 * and ties with its peers on all but the ref, so only the first `limit` of them (in
 * `ordered`) are looked at: the work grows with the matched and loaded candidates, not
 * with the candidate count.
 */
#include "native.h"
#include "bytebuf.h"

#define TALLY_RECORD_U32 5 /* tally.c's records: slot, matched, cpu, storage, other */

typedef struct {
    Py_ssize_t position; /* in ordered: the (worker_id, dp_rank) order */
    unsigned long long held, stored, active, waiting, prefill;
    double cost;
} Entry;

typedef struct {
    unsigned long long query_blocks;
    double overlap_weight, storage_load_weight;
    Py_ssize_t limit;
} Knobs;

/* Per call: the entries of the scored or loaded candidates, and per position in ordered
 * the index of its entry + 1 (0: none). */
typedef struct {
    PyObject *positions;
    Entry *entries;
    Py_ssize_t used;
    Py_ssize_t *entry_at; /* n_ordered of them */
    Py_ssize_t n_ordered;
} Gathered;

static PyObject *name_worker_id, *name_dp_rank, *name_matched_blocks, *name_blocks_by_tier,
    *name_active_blocks, *name_waiting_requests, *name_storage;

static int
intern_names(void)
{
    if (name_storage != NULL) {
        return 0;
    }
    const char *texts[] = {"worker_id", "dp_rank", "matched_blocks", "blocks_by_tier",
                           "active_blocks", "waiting_requests", "storage"};
    PyObject **slots[] = {&name_worker_id, &name_dp_rank, &name_matched_blocks,
                          &name_blocks_by_tier, &name_active_blocks,
                          &name_waiting_requests, &name_storage};
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) {
        if (*slots[i] == NULL && (*slots[i] = PyUnicode_InternFromString(texts[i])) == NULL) {
            return -1;
        }
    }
    return 0;
}

/* obj.name as an unsigned 64-bit count; -1 with an exception otherwise. */
static int
count_attr(PyObject *obj, PyObject *name, unsigned long long *out)
{
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL) {
        return -1;
    }
    *out = PyLong_AsUnsignedLongLong(value);
    Py_DECREF(value);
    return (*out == (unsigned long long)-1 && PyErr_Occurred()) ? -1 : 0;
}

static int
storage_blocks(PyObject *score, unsigned long long *out)
{
    PyObject *by_tier = PyObject_GetAttr(score, name_blocks_by_tier);
    if (by_tier == NULL) {
        return -1;
    }
    if (!PyDict_Check(by_tier)) {
        PyErr_SetString(PyExc_TypeError, "blocks_by_tier must be a dict");
        Py_DECREF(by_tier);
        return -1;
    }
    PyObject *count = PyDict_GetItemWithError(by_tier, name_storage); /* borrowed */
    int status = 0;
    *out = 0;
    if (count != NULL) {
        *out = PyLong_AsUnsignedLongLong(count);
        status = (*out == (unsigned long long)-1 && PyErr_Occurred()) ? -1 : 0;
    } else if (PyErr_Occurred()) {
        status = -1;
    }
    Py_DECREF(by_tier);
    return status;
}

/* The entry of obj's (worker_id, dp_rank), added when new; *entry NULL when the ref is
 * not a candidate. -1 with an exception on error. */
static int
entry_of_ref(PyObject *ref, Gathered *g, Entry **entry)
{
    *entry = NULL;
    PyObject *found = PyDict_GetItemWithError(g->positions, ref); /* borrowed */
    if (found == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    Py_ssize_t position = PyLong_AsSsize_t(found);
    if (position == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (position < 0 || position >= g->n_ordered) {
        PyErr_SetString(PyExc_ValueError, "positions must map each ref of ordered");
        return -1;
    }
    if (g->entry_at[position] == 0) {
        Entry *fresh = &g->entries[g->used++];
        memset(fresh, 0, sizeof *fresh);
        fresh->position = position;
        g->entry_at[position] = g->used;
    }
    *entry = &g->entries[g->entry_at[position] - 1];
    return 0;
}

/* entry_of_ref of obj's (worker_id, dp_rank). */
static int
entry_of(PyObject *obj, Gathered *g, Entry **entry)
{
    *entry = NULL;
    PyObject *worker = PyObject_GetAttr(obj, name_worker_id);
    PyObject *rank = worker ? PyObject_GetAttr(obj, name_dp_rank) : NULL;
    PyObject *key = rank ? PyTuple_Pack(2, worker, rank) : NULL;
    Py_XDECREF(worker);
    Py_XDECREF(rank);
    if (key == NULL) {
        return -1;
    }
    int status = entry_of_ref(key, g, entry);
    Py_DECREF(key);
    return status;
}

/* The scores' entries (the last of a ref wins); -1 with an exception. */
static int
gather_scores(PyObject *scores, Gathered *g)
{
    Entry *e;
    PyObject **items = PySequence_Fast_ITEMS(scores);
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(scores); i++) {
        if (entry_of(items[i], g, &e) < 0 ||
            (e && (count_attr(items[i], name_matched_blocks, &e->held) < 0 ||
                   storage_blocks(items[i], &e->stored) < 0))) {
            return -1;
        }
    }
    return 0;
}

/* The tally records' entries (tally.c: slot, matched, cpu, storage, other; refs names
 * each slot); *hits counts the candidates among them with a matched block. */
static int
gather_tally(const Py_buffer *tally, PyObject *refs, Gathered *g, Py_ssize_t *hits)
{
    const uint32_t *records = tally->buf;
    Py_ssize_t n = tally->len / (TALLY_RECORD_U32 * (Py_ssize_t)sizeof(uint32_t));
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint32_t *rec = &records[i * TALLY_RECORD_U32];
        PyObject *ref = (Py_ssize_t)rec[0] < PyList_GET_SIZE(refs)
                            ? PyList_GET_ITEM(refs, rec[0]) : Py_None;
        if (ref == Py_None || (uint64_t)rec[2] + rec[3] + rec[4] > rec[1]) {
            PyErr_SetString(PyExc_ValueError, "a record's slot has no ref, or its tier "
                                              "counts exceed its matched blocks");
            return -1;
        }
        Entry *e;
        if (entry_of_ref(ref, g, &e) < 0) {
            return -1;
        }
        if (e) {
            e->held = rec[1];
            e->stored = rec[3];
            *hits += rec[1] > 0;
        }
    }
    return 0;
}

/* The loads' entries (the last of a ref wins); -1 with an exception. */
static int
gather_loads(PyObject *loads, Gathered *g)
{
    Entry *e;
    PyObject **items = PySequence_Fast_ITEMS(loads);
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(loads); i++) {
        if (entry_of(items[i], g, &e) < 0 ||
            (e && (count_attr(items[i], name_active_blocks, &e->active) < 0 ||
                   count_attr(items[i], name_waiting_requests, &e->waiting) < 0))) {
            return -1;
        }
    }
    return 0;
}

/* -1, 0, 1 as (cost, -held, waiting, position) orders a before b. */
static int
compare_entries(const Entry *a, const Entry *b)
{
    if (a->cost != b->cost) {
        return a->cost < b->cost ? -1 : 1;
    }
    if (a->held != b->held) {
        return a->held > b->held ? -1 : 1;
    }
    if (a->waiting != b->waiting) {
        return a->waiting < b->waiting ? -1 : 1;
    }
    return a->position < b->position ? -1 : (a->position > b->position);
}

static int
compare_for_qsort(const void *a, const void *b)
{
    return compare_entries((const Entry *)a, (const Entry *)b);
}

static void
cost_entries(Gathered *g, const Knobs *knobs)
{
    for (Py_ssize_t i = 0; i < g->used; i++) {
        Entry *e = &g->entries[i];
        e->prefill = knobs->query_blocks > e->held ? knobs->query_blocks - e->held : 0;
        e->cost = knobs->overlap_weight * ((double)e->prefill +
                                           knobs->storage_load_weight * (double)e->stored) +
                  (double)e->active;
    }
    qsort(g->entries, (size_t)g->used, sizeof *g->entries, compare_for_qsort);
}

static PyObject *
cost_row(const Entry *e, PyObject *ordered)
{
    PyObject *ref = PySequence_Fast_ITEMS(ordered)[e->position];
    if (!PyTuple_Check(ref) || PyTuple_GET_SIZE(ref) != 2) {
        PyErr_SetString(PyExc_TypeError, "ordered must hold (worker_id, dp_rank) tuples");
        return NULL;
    }
    return Py_BuildValue("(OOKKKdKK)", PyTuple_GET_ITEM(ref, 0), PyTuple_GET_ITEM(ref, 1),
                         e->held, e->prefill, e->active, e->cost, e->waiting, e->stored);
}

/* The first `limit` of the merge of the sorted entries and the candidates without one
 * (in ordered's order, each costing overlap_weight * query_blocks), as rows. After the
 * sort entry_at tells only whether a position has an entry. */
static PyObject *
merged_rows(const Gathered *g, PyObject *ordered, const Knobs *knobs)
{
    Py_ssize_t n_ordered = PySequence_Fast_GET_SIZE(ordered);
    Entry idle = {0, 0, 0, 0, 0, knobs->query_blocks,
                  knobs->overlap_weight * (double)knobs->query_blocks};
    Py_ssize_t a = 0;
    PyObject *rows = PyList_New(0);
    while (idle.position < n_ordered && g->entry_at[idle.position]) {
        idle.position++;
    }
    while (rows != NULL && PyList_GET_SIZE(rows) < knobs->limit &&
           (a < g->used || idle.position < n_ordered)) {
        const Entry *next = &idle;
        if (idle.position >= n_ordered ||
            (a < g->used && compare_entries(&g->entries[a], &idle) < 0)) {
            next = &g->entries[a++];
        }
        PyObject *row = cost_row(next, ordered);
        if (row == NULL || PyList_Append(rows, row) < 0) {
            Py_XDECREF(row);
            Py_CLEAR(rows);
            break;
        }
        Py_DECREF(row);
        if (next == &idle) {
            do {
                idle.position++;
            } while (idle.position < n_ordered && g->entry_at[idle.position]);
        }
    }
    return rows;
}

/* knobs from args[0..3]: query_blocks, overlap_weight, storage_load_weight, limit. */
static int
read_knobs(PyObject *const *args, Knobs *knobs)
{
    knobs->query_blocks = PyLong_AsUnsignedLongLong(args[0]);
    knobs->overlap_weight = PyFloat_AsDouble(args[1]);
    knobs->storage_load_weight = PyFloat_AsDouble(args[2]);
    knobs->limit = PyLong_AsSsize_t(args[3]);
    return PyErr_Occurred() || intern_names() < 0 ? -1 : 0;
}

/* What gives the scored candidates' entries: the Score answer, or a tally and its refs. */
typedef struct {
    PyObject *scores;     /* a PySequence_Fast, or NULL with tally */
    const Py_buffer *tally;
    PyObject *refs;
    Py_ssize_t hits;      /* with tally: candidates matched */
} ScoreSource;

/* The `limit` cheapest rows of the scored and loaded candidates; NULL with an exception. */
static PyObject *
top_rows(ScoreSource *src, Py_ssize_t n_scored, PyObject *loads_arg, PyObject *ordered_arg,
         PyObject *positions, const Knobs *knobs)
{
    PyObject *loads = PySequence_Fast(loads_arg, "loads must be a sequence");
    PyObject *ordered = loads ? PySequence_Fast(ordered_arg, "ordered must be a sequence")
                              : NULL;
    PyObject *rows = NULL;
    Gathered g = {positions, NULL, 0, NULL, 0};
    if (ordered == NULL) {
        goto done;
    }
    Py_ssize_t n_ordered = g.n_ordered = PySequence_Fast_GET_SIZE(ordered);
    if (PyDict_GET_SIZE(positions) != n_ordered) {
        PyErr_SetString(PyExc_ValueError, "positions must map each ref of ordered");
        goto done;
    }
    Py_ssize_t room = n_scored + PySequence_Fast_GET_SIZE(loads);
    g.entries = PyMem_Malloc(sizeof *g.entries * (size_t)(room + 1));
    g.entry_at = PyMem_Calloc((size_t)n_ordered + 1, sizeof *g.entry_at);
    if (g.entries == NULL || g.entry_at == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    int gathered = src->scores != NULL ? gather_scores(src->scores, &g)
                                       : gather_tally(src->tally, src->refs, &g, &src->hits);
    if (gathered < 0 || gather_loads(loads, &g) < 0) {
        goto done;
    }
    cost_entries(&g, knobs);
    rows = merged_rows(&g, ordered, knobs);
done:
    PyMem_Free(g.entries);
    PyMem_Free(g.entry_at);
    Py_XDECREF(ordered);
    Py_XDECREF(loads);
    return rows;
}

const char decision_top_costs_doc[] = PyDoc_STR(
"decision_top_costs(scores, loads, ordered, positions, query_blocks, overlap_weight,\n"
"                   storage_load_weight, limit) -> list[tuple]\n\n"
"The `limit` cheapest candidates, ranked as scheduling.top_costs ranks them, as\n"
"(worker_id, dp_rank, matched_blocks, prefill_blocks, active_blocks, cost,\n"
"waiting_requests, storage_blocks) tuples.");

PyObject *
decision_top_costs(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Knobs knobs;
    if (nargs != 8 || !PyDict_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "decision_top_costs(scores, loads, ordered, "
                        "positions: dict, query_blocks, overlap_weight, "
                        "storage_load_weight, limit)");
        return NULL;
    }
    if (read_knobs(args + 4, &knobs) < 0) {
        return NULL;
    }
    if (knobs.limit <= 0) {
        return PyList_New(0);
    }
    ScoreSource src = {PySequence_Fast(args[0], "scores must be a sequence"), NULL, NULL, 0};
    if (src.scores == NULL) {
        return NULL;
    }
    PyObject *rows = top_rows(&src, PySequence_Fast_GET_SIZE(src.scores), args[1], args[2],
                              args[3], &knobs);
    Py_DECREF(src.scores);
    return rows;
}

const char decision_tally_top_costs_doc[] = PyDoc_STR(
"decision_tally_top_costs(tally, refs, loads, ordered, positions, query_blocks,\n"
"                         overlap_weight, storage_load_weight, limit)\n"
"    -> tuple[list[tuple], int]\n\n"
"decision_top_costs from a Score walk's tally (tally_runs records: slot, matched, cpu,\n"
"storage, other; refs: the slot table's refs, indexed by slot) instead of WorkerScores;\n"
"also the number of candidates with a matched block.");

PyObject *
decision_tally_top_costs(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    Knobs knobs;
    if (nargs != 9 || !PyList_Check(args[1]) || !PyDict_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError, "decision_tally_top_costs(tally, refs: list, loads, "
                        "ordered, positions: dict, query_blocks, overlap_weight, "
                        "storage_load_weight, limit)");
        return NULL;
    }
    if (read_knobs(args + 5, &knobs) < 0) {
        return NULL;
    }
    Py_buffer tally;
    if (PyObject_GetBuffer(args[0], &tally, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    PyObject *rows = NULL, *out = NULL;
    const Py_ssize_t record = TALLY_RECORD_U32 * (Py_ssize_t)sizeof(uint32_t);
    ScoreSource src = {NULL, &tally, args[1], 0};
    if (tally.len % record) {
        PyErr_SetString(PyExc_ValueError, "tally must be whole records of five u32");
    } else if (knobs.limit <= 0) {
        rows = PyList_New(0);
    } else {
        rows = top_rows(&src, tally.len / record, args[2], args[3], args[4], &knobs);
    }
    if (rows != NULL) {
        out = Py_BuildValue("(Nn)", rows, src.hits);
    }
    PyBuffer_Release(&tally);
    return out;
}

/* --- the answer's wire form ------------------------------------------------------------ */

#define WIRE_VARINT 0
#define WIRE_FIXED64 1
#define WIRE_LEN 2

/* A proto3 scalar with implicit presence: nothing when 0. */
static int
put_count(ByteBuf *buf, unsigned field, unsigned long long value)
{
    if (value == 0) {
        return 0;
    }
    return buf_put_varint(buf, field << 3 | WIRE_VARINT) < 0 ? -1 : buf_put_varint(buf, value);
}

static int
put_bytes(ByteBuf *buf, unsigned field, const char *data, Py_ssize_t len)
{
    if (buf_put_varint(buf, field << 3 | WIRE_LEN) < 0 ||
        buf_put_varint(buf, (unsigned long long)len) < 0) {
        return -1;
    }
    return buf_put(buf, (const unsigned char *)data, (size_t)len);
}

static int
put_text(ByteBuf *buf, unsigned field, PyObject *text)
{
    Py_ssize_t len;
    const char *utf8 = PyUnicode_AsUTF8AndSize(text, &len);
    if (utf8 == NULL) {
        return -1;
    }
    return len ? put_bytes(buf, field, utf8, len) : 0;
}

/* Item i of a cost row as an unsigned count. */
static int
row_count(PyObject *row, Py_ssize_t i, unsigned long long *out)
{
    *out = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(row, i));
    return (*out == (unsigned long long)-1 && PyErr_Occurred()) ? -1 : 0;
}

static int
check_row(PyObject *row)
{
    if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != 8 ||
        !PyUnicode_Check(PyTuple_GET_ITEM(row, 0))) {
        PyErr_SetString(PyExc_TypeError, "a cost row is (worker_id, dp_rank, matched_blocks, "
                        "prefill_blocks, active_blocks, cost, waiting_requests, "
                        "storage_blocks)");
        return -1;
    }
    return 0;
}

/* One CandidateCost message (fields 1-8) from a cost row. */
static int
put_candidate(ByteBuf *buf, PyObject *row)
{
    static const unsigned count_fields[] = {0, 2, 3, 4, 5, 0, 7, 8};
    if (check_row(row) < 0 || put_text(buf, 1, PyTuple_GET_ITEM(row, 0)) < 0) {
        return -1;
    }
    for (Py_ssize_t i = 1; i < 8; i++) {
        unsigned long long value;
        if (i == 5) {
            double cost = PyFloat_AsDouble(PyTuple_GET_ITEM(row, 5));
            uint64_t bits;
            memcpy(&bits, &cost, 8);
            if (cost == -1.0 && PyErr_Occurred()) {
                return -1;
            }
            if (bits != 0) {
                unsigned char le[8];
                put_u64_le(le, bits);
                if (buf_put_varint(buf, 6 << 3 | WIRE_FIXED64) < 0 || buf_put(buf, le, 8) < 0) {
                    return -1;
                }
            }
            continue;
        }
        if (row_count(row, i, &value) < 0 || put_count(buf, count_fields[i], value) < 0) {
            return -1;
        }
    }
    return 0;
}

const char encode_decision_doc[] = PyDoc_STR(
"encode_decision(chosen, ranked, freshness, candidate_count) -> bytes\n\n"
"A serialised FindBestWorkerResponse: the chosen cost row's worker_id, dp_rank and\n"
"matched_blocks, `ranked` (cost rows) as candidates, `freshness` (a serialised\n"
"Freshness) and candidate_count; proto3 zeros are left out, as protobuf does.");

PyObject *
encode_decision(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyBytes_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "encode_decision(chosen, ranked, freshness: bytes, "
                        "candidate_count)");
        return NULL;
    }
    PyObject *chosen = args[0], *result = NULL;
    PyObject *ranked = PySequence_Fast(args[1], "ranked must be a sequence");
    ByteBuf out = {NULL, 0, 0}, one = {NULL, 0, 0};
    unsigned long long rank, matched, count = PyLong_AsUnsignedLongLong(args[3]);
    if (ranked == NULL || PyErr_Occurred() || check_row(chosen) < 0 ||
        put_text(&out, 1, PyTuple_GET_ITEM(chosen, 0)) < 0 || row_count(chosen, 1, &rank) < 0 ||
        put_count(&out, 2, rank) < 0 || row_count(chosen, 2, &matched) < 0 ||
        put_count(&out, 3, matched) < 0) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(ranked); i++) {
        one.len = 0;
        if (put_candidate(&one, PySequence_Fast_ITEMS(ranked)[i]) < 0 ||
            put_bytes(&out, 4, (const char *)one.data, (Py_ssize_t)one.len) < 0) {
            goto done;
        }
    }
    if (put_bytes(&out, 5, PyBytes_AS_STRING(args[2]), PyBytes_GET_SIZE(args[2])) < 0 ||
        put_count(&out, 10, count) < 0) {
        goto done;
    }
    result = PyBytes_FromStringAndSize(out.data ? (const char *)out.data : "",
                                       (Py_ssize_t)out.len);
done:
    PyMem_Free(out.data);
    PyMem_Free(one.data);
    Py_XDECREF(ranked);
    return result;
}
