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
 *   LedgerMap: engine hash -> (block key, held tiers), a worker rank's ledger map, packed.
 *   tally_runs(runs, candidates, weights, include_zero) -> bytes (tally_pool_runs: with
 *       shared storage pools as wildcard holders for their mounters) and
 *   scores_from_tally(tally, refs, order, weights, tiers, make) -> list: Score's prefix
 *       walk over the masks and its answer, without an object per slot in between.
 *   decision_top_costs(scores, loads, ordered, members, ...) -> list[tuple]:
 *       FindBestWorker's cheapest candidates (cost with the loads, then top-k), or
 *   decision_tally_top_costs(tally, refs, loads, ...) -> (list[tuple], int): the same
 *       straight from the Score walk's tally (no WorkerScore per matched rank), and
 *   encode_decision(chosen, ranked, freshness, candidate_count) -> bytes: its answer.
 *   subslot_split(packed, subslots) and subslot_merge(replies, positions, n): a sub-slot
 *       Score's keys grouped by sub-slot and its replies merged back (no object per key).
 *   store_plain(map, events, ...) and OpsWriter: a ledger's common stores in one loop
 *       (keys, map, presence op, journal), and the Redis record's presence ops;
 *       check_plain_stores(events, ...) and check_plain_batch(batch, ...): validate_batch's
 *       checks of the usual stores (and batch).
 *
 * `tokens` is packed u32 little-endian (bytes, bytearray, memoryview) or a sequence of
 * ints in 0..2**32-1. Only full blocks are hashed.
 *
 * One extension, one C file per concern: this file is the module (its method table and
 * init); chain.c the key loop, block_table.c BlockTable, ledger_map.c LedgerMap, wire.c
 * take_uint32_field, log_pack.c pack_log_entries, tally.c the Score walk, decision.c
 * FindBestWorker's top-k; subslot.c the sub-slot Score's split and merge; ledger_store.c
 * store_plain and OpsWriter;
 * tokens.c/tokens.h and bytebuf.h what more than one of them uses;
 * native.h what this file needs from the others.
 */
#include "native.h"

static int
native_exec(PyObject *module)
{
    if (PyType_Ready(&BlockTableType) < 0 || PyType_Ready(&LedgerMapType) < 0 ||
        PyType_Ready(&OpsWriterType) < 0) {
        return -1;
    }
    if (PyModule_AddObjectRef(module, "OpsWriter", (PyObject *)&OpsWriterType) < 0) {
        return -1;
    }
    if (PyModule_AddObjectRef(module, "BlockTable", (PyObject *)&BlockTableType) < 0) {
        return -1;
    }
    return PyModule_AddObjectRef(module, "LedgerMap", (PyObject *)&LedgerMapType);
}

static PyModuleDef_Slot native_slots[] = {
    {Py_mod_exec, native_exec},
    {0, NULL},
};

static PyMethodDef native_methods[] = {
    {"chain_keys", (PyCFunction)(void (*)(void))chain_keys, METH_FASTCALL, chain_keys_doc},
    {"chain_keys_packed", (PyCFunction)(void (*)(void))chain_keys_packed, METH_FASTCALL,
     chain_keys_packed_doc},
    {"take_uint32_field", (PyCFunction)(void (*)(void))take_uint32_field, METH_FASTCALL,
     take_uint32_field_doc},
    {"pack_log_entries", (PyCFunction)(void (*)(void))pack_log_entries, METH_FASTCALL,
     "pack_log_entries(hashes, keys, tiers) -> bytes: the ledger log's M/D records."},
    {"tally_runs", (PyCFunction)(void (*)(void))tally_runs, METH_FASTCALL, tally_runs_doc},
    {"tally_masks", (PyCFunction)(void (*)(void))tally_masks, METH_FASTCALL, tally_masks_doc},
    {"tally_pool_runs", (PyCFunction)(void (*)(void))tally_pool_runs, METH_FASTCALL,
     tally_pool_runs_doc},
    {"tally_pool_masks", (PyCFunction)(void (*)(void))tally_pool_masks, METH_FASTCALL,
     tally_pool_masks_doc},
    {"scores_from_tally", (PyCFunction)(void (*)(void))scores_from_tally, METH_FASTCALL,
     scores_from_tally_doc},
    {"score_maker_kind", (PyCFunction)score_maker_kind, METH_O, score_maker_kind_doc},
    {"decision_top_costs", (PyCFunction)(void (*)(void))decision_top_costs, METH_FASTCALL,
     decision_top_costs_doc},
    {"decision_tally_top_costs", (PyCFunction)(void (*)(void))decision_tally_top_costs,
     METH_FASTCALL, decision_tally_top_costs_doc},
    {"encode_decision", (PyCFunction)(void (*)(void))encode_decision, METH_FASTCALL,
     encode_decision_doc},
    {"subslot_split", (PyCFunction)(void (*)(void))subslot_split, METH_FASTCALL,
     subslot_split_doc},
    {"subslot_merge", (PyCFunction)(void (*)(void))subslot_merge, METH_FASTCALL,
     subslot_merge_doc},
    {"store_plain", (PyCFunction)(void (*)(void))store_plain, METH_FASTCALL, store_plain_doc},
    {"check_plain_stores", (PyCFunction)(void (*)(void))check_plain_stores, METH_FASTCALL,
     check_plain_stores_doc},
    {"check_plain_batch", (PyCFunction)(void (*)(void))check_plain_batch, METH_FASTCALL,
     check_plain_batch_doc},
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
