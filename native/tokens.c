/* tokens.c: TokenSource, the token ids of chain_keys and BlockTable.mask_runs read one block
 * at a time (see tokens.h). One copy for both callers: source_block is a call from their
 * loops, as it was when everything was one file (the compiler kept it out of line there).
 */
#include "tokens.h"

#define U32_MAX_VALUE 0xFFFFFFFFUL

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

const unsigned char *
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

int
source_from_args(TokenSource *src, PyObject *tokens, PyObject *block_size_obj,
                 PyObject *seed_obj, uint64_t *seed)
{
    Py_ssize_t block_size = PyLong_AsSsize_t(block_size_obj);
    if ((block_size == -1 && PyErr_Occurred()) || parse_u64(seed_obj, "seed", seed) < 0) {
        return -1;
    }
    return source_open(src, tokens, block_size);
}
