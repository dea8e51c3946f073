/* native.h: what module.c needs from each part of kvcore._native, and the include every
 * file of the extension starts with.
 *
 * The extension is one shared object built from several C files (one per concern); the
 * names shared between them are hidden so that, as when it was one file, PyInit__native
 * is the object's only exported symbol and calls between the files stay direct.
 */
#ifndef KVCORE_NATIVE_H
#define KVCORE_NATIVE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#if defined(__GNUC__) || defined(__clang__)
#define NATIVE_INTERNAL __attribute__((visibility("hidden")))
#else
#define NATIVE_INTERNAL
#endif

/* chain.c */
NATIVE_INTERNAL extern const char chain_keys_doc[];
NATIVE_INTERNAL extern const char chain_keys_packed_doc[];
NATIVE_INTERNAL PyObject *chain_keys(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
NATIVE_INTERNAL PyObject *chain_keys_packed(PyObject *module, PyObject *const *args,
                                            Py_ssize_t nargs);

/* block_table.c */
NATIVE_INTERNAL extern PyTypeObject BlockTableType;
NATIVE_INTERNAL int block_table_set_bit_raw(PyObject *table, const uint64_t *keys,
                                            Py_ssize_t n, uint32_t bitpos);

/* ledger_map.c */
NATIVE_INTERNAL extern PyTypeObject LedgerMapType;
NATIVE_INTERNAL int ledger_map_lookup(PyObject *map, uint64_t hash, uint64_t *key);
NATIVE_INTERNAL int ledger_map_add_new_raw(PyObject *map, const uint64_t *hashes,
                                           const uint64_t *keys, Py_ssize_t n, uint8_t tiers);

/* ledger_store.c */
NATIVE_INTERNAL extern PyTypeObject OpsWriterType;
NATIVE_INTERNAL extern const char store_plain_doc[];
NATIVE_INTERNAL PyObject *store_plain(PyObject *module, PyObject *const *args,
                                      Py_ssize_t nargs);
NATIVE_INTERNAL extern const char check_plain_batch_doc[];
NATIVE_INTERNAL PyObject *check_plain_batch(PyObject *module, PyObject *const *args,
                                            Py_ssize_t nargs);
NATIVE_INTERNAL extern const char check_plain_stores_doc[];
NATIVE_INTERNAL PyObject *check_plain_stores(PyObject *module, PyObject *const *args,
                                             Py_ssize_t nargs);

/* wire.c */
NATIVE_INTERNAL extern const char take_uint32_field_doc[];
NATIVE_INTERNAL PyObject *take_uint32_field(PyObject *module, PyObject *const *args,
                                            Py_ssize_t nargs);

/* tally.c */
NATIVE_INTERNAL extern const char tally_runs_doc[];
NATIVE_INTERNAL extern const char scores_from_tally_doc[];
NATIVE_INTERNAL extern const char score_maker_kind_doc[];
NATIVE_INTERNAL PyObject *score_maker_kind(PyObject *module, PyObject *make);
NATIVE_INTERNAL PyObject *tally_runs(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
NATIVE_INTERNAL PyObject *scores_from_tally(PyObject *module, PyObject *const *args,
                                            Py_ssize_t nargs);
NATIVE_INTERNAL extern const char tally_masks_doc[];
NATIVE_INTERNAL PyObject *tally_masks(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
NATIVE_INTERNAL extern const char tally_pool_runs_doc[];
NATIVE_INTERNAL PyObject *tally_pool_runs(PyObject *module, PyObject *const *args,
                                          Py_ssize_t nargs);
NATIVE_INTERNAL extern const char tally_pool_masks_doc[];
NATIVE_INTERNAL PyObject *tally_pool_masks(PyObject *module, PyObject *const *args,
                                           Py_ssize_t nargs);
NATIVE_INTERNAL int masks_equal(PyObject *a, PyObject *b); /* -1 on error, as RichCompare */

/* decision.c */
NATIVE_INTERNAL extern const char decision_top_costs_doc[];
NATIVE_INTERNAL PyObject *decision_top_costs(PyObject *module, PyObject *const *args,
                                             Py_ssize_t nargs);
NATIVE_INTERNAL extern const char decision_tally_top_costs_doc[];
NATIVE_INTERNAL PyObject *decision_tally_top_costs(PyObject *module, PyObject *const *args,
                                                   Py_ssize_t nargs);
NATIVE_INTERNAL extern const char encode_decision_doc[];
NATIVE_INTERNAL PyObject *encode_decision(PyObject *module, PyObject *const *args,
                                          Py_ssize_t nargs);

/* log_pack.c */
NATIVE_INTERNAL PyObject *pack_log_entries(PyObject *module, PyObject *const *args,
                                           Py_ssize_t nargs);

/* subslot.c */
NATIVE_INTERNAL extern const char subslot_split_doc[];
NATIVE_INTERNAL extern const char subslot_merge_doc[];
NATIVE_INTERNAL PyObject *subslot_split(PyObject *module, PyObject *const *args,
                                        Py_ssize_t nargs);
NATIVE_INTERNAL PyObject *subslot_merge(PyObject *module, PyObject *const *args,
                                        Py_ssize_t nargs);

#endif /* KVCORE_NATIVE_H */
