/* tokens.h: the token ids a block-key loop reads, shared by chain.c (chain_keys) and
 * block_table.c (BlockTable.mask_runs), which hash the same blocks the same way.
 *
 * `tokens` is packed u32 little-endian (bytes, bytearray, memoryview) or a sequence of ints
 * in 0..2**32-1; a TokenSource hands out one block of it at a time as packed bytes. The
 * per-call helpers are in tokens.c; the ones the callers inline (parse_u64 in BlockTable's
 * per-key loops, source_close) are static inline here.
 */
#ifndef KVCORE_NATIVE_TOKENS_H
#define KVCORE_NATIVE_TOKENS_H

#include "native.h"

typedef struct {
    PyObject *items;     /* PySequence_Fast of the token ids, or NULL for packed bytes */
    Py_buffer view;      /* packed bytes, when items is NULL */
    unsigned char *scratch; /* one block of ids packed little-endian */
    Py_ssize_t stride;   /* bytes per block */
    Py_ssize_t block_size;
    Py_ssize_t n_blocks;
} TokenSource;

/* The (tokens, block_size, seed) arguments of chain_keys and mask_runs. */
NATIVE_INTERNAL int source_from_args(TokenSource *src, PyObject *tokens,
                                     PyObject *block_size_obj, PyObject *seed_obj,
                                     uint64_t *seed);

/* Bytes of block `i`, packing token ids into scratch when they came as ints. */
NATIVE_INTERNAL const unsigned char *source_block(TokenSource *src, Py_ssize_t i);

static inline void
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

/* An int in 0..2**64-1; `what` names it in the OverflowError. On CPython 3.11 an exact
 * int of up to three 30-bit digits (every engine hash and block key) is read off its
 * digits: PyLong_AsUnsignedLongLong goes through _PyLong_AsByteArray past one digit. */
static inline int
parse_u64(PyObject *obj, const char *what, uint64_t *out)
{
#if PY_VERSION_HEX < 0x030C0000 && PYLONG_BITS_IN_DIGIT == 30
    if (PyLong_CheckExact(obj)) {
        Py_ssize_t size = Py_SIZE(obj);
        const digit *d = ((PyLongObject *)obj)->ob_digit;
        if (size >= 0 && size <= 3 && (size < 3 || d[2] < (1u << 4))) {
            uint64_t value = 0;
            for (Py_ssize_t i = size - 1; i >= 0; i--) {
                value = (value << 30) | (uint64_t)d[i];
            }
            *out = value;
            return 0;
        }
    }
#endif
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

#endif /* KVCORE_NATIVE_TOKENS_H */
