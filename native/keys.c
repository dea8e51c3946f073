/* indexer._native: the block-key hot loops in C (spec: docs/block-keys.md).
 *
 * key(block i) = xxh3_64(tokens of block i as u32 little-endian, seed = key(block i - 1))
 *
 * Python does the same in indexer/keys.py and indexer/scoring.py; this module only removes
 * the per-block interpreter overhead (one xxh3 call, one slice, one dict lookup per block
 * cost ~250 ns in Python, ~25 ns here). Both paths are checked against each other and
 * against tests/vectors/block_keys.json.
 *
 *   chain_keys(tokens, block_size, seed) -> list[int]
 *   chain_masks(blocks, tokens, block_size, seed, wanted) -> list[int]
 *
 * `tokens` is packed u32 little-endian (bytes, bytearray, memoryview) or a sequence of
 * ints in 0..2**32-1. Only full blocks are hashed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define XXH_INLINE_ALL
#include "xxhash.h"

#define U32_MAX_VALUE 0xFFFFFFFFUL

typedef struct {
    PyObject *items;     /* PySequence_Fast of the token ids, or NULL for packed bytes */
    Py_buffer view;      /* packed bytes, when items is NULL */
    unsigned char *scratch; /* one block of ids packed little-endian */
    Py_ssize_t stride;   /* bytes per block */
    Py_ssize_t block_size;
    Py_ssize_t n_blocks;
} TokenSource;

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

static void
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

/* Bytes of block `i`, packing token ids into scratch when they came as ints. */
static const unsigned char *
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

static int
parse_seed(PyObject *obj, uint64_t *seed)
{
    unsigned long long value = PyLong_AsUnsignedLongLong(obj);
    if (value == (unsigned long long)-1 && PyErr_Occurred()) {
        return -1;
    }
    *seed = (uint64_t)value;
    return 0;
}

PyDoc_STRVAR(chain_keys_doc,
"chain_keys(tokens, block_size, seed) -> list[int]\n\n"
"Chained xxh3_64 keys of the full blocks in tokens, starting from seed.");

static PyObject *
chain_keys(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    TokenSource src;
    Py_ssize_t block_size;
    uint64_t seed;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "chain_keys(tokens, block_size, seed)");
        return NULL;
    }
    block_size = PyLong_AsSsize_t(args[1]);
    if ((block_size == -1 && PyErr_Occurred()) || parse_seed(args[2], &seed) < 0) {
        return NULL;
    }
    if (source_open(&src, args[0], block_size) < 0) {
        return NULL;
    }
    PyObject *keys = PyList_New(src.n_blocks);
    if (keys == NULL) {
        goto fail;
    }
    for (Py_ssize_t i = 0; i < src.n_blocks; i++) {
        const unsigned char *block = source_block(&src, i);
        if (block == NULL) {
            goto fail;
        }
        seed = XXH3_64bits_withSeed(block, (size_t)src.stride, seed);
        PyObject *key = PyLong_FromUnsignedLongLong(seed);
        if (key == NULL) {
            goto fail;
        }
        PyList_SET_ITEM(keys, i, key);
    }
    source_close(&src);
    return keys;
fail:
    Py_XDECREF(keys);
    source_close(&src);
    return NULL;
}

PyDoc_STRVAR(chain_masks_doc,
"chain_masks(blocks, tokens, block_size, seed, wanted) -> list[int]\n\n"
"Hash the full blocks in tokens and look each key up in the dict blocks (key -> presence\n"
"mask). Returns the masks of the leading blocks, stopping before the first block that is\n"
"missing or whose mask shares no bit with wanted (None: any mask goes). Blocks past the\n"
"stop are never hashed.");

static PyObject *
chain_masks(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    TokenSource src;
    Py_ssize_t block_size;
    uint64_t seed;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "chain_masks(blocks, tokens, block_size, seed, wanted)");
        return NULL;
    }
    PyObject *blocks = args[0];
    PyObject *wanted = args[4] == Py_None ? NULL : args[4];
    if (!PyDict_CheckExact(blocks)) {
        PyErr_SetString(PyExc_TypeError, "blocks must be a dict of int -> int");
        return NULL;
    }
    block_size = PyLong_AsSsize_t(args[2]);
    if ((block_size == -1 && PyErr_Occurred()) || parse_seed(args[3], &seed) < 0) {
        return NULL;
    }
    if (source_open(&src, args[1], block_size) < 0) {
        return NULL;
    }
    PyObject *masks = PyList_New(0);
    if (masks == NULL) {
        goto fail;
    }
    for (Py_ssize_t i = 0; i < src.n_blocks; i++) {
        const unsigned char *block = source_block(&src, i);
        if (block == NULL) {
            goto fail;
        }
        seed = XXH3_64bits_withSeed(block, (size_t)src.stride, seed);
        PyObject *key = PyLong_FromUnsignedLongLong(seed);
        if (key == NULL) {
            goto fail;
        }
        /* Keys are exact ints: the lookup runs no Python code. */
        PyObject *mask = PyDict_GetItemWithError(blocks, key);
        Py_DECREF(key);
        if (mask == NULL) {
            if (PyErr_Occurred()) {
                goto fail;
            }
            break;
        }
        if (wanted != NULL) {
            PyObject *shared = PyNumber_And(mask, wanted);
            if (shared == NULL) {
                goto fail;
            }
            int any = PyObject_IsTrue(shared);
            Py_DECREF(shared);
            if (any < 0) {
                goto fail;
            }
            if (!any) {
                break;
            }
        }
        if (PyList_Append(masks, mask) < 0) {
            goto fail;
        }
    }
    source_close(&src);
    return masks;
fail:
    Py_XDECREF(masks);
    source_close(&src);
    return NULL;
}

static PyMethodDef native_methods[] = {
    {"chain_keys", (PyCFunction)(void (*)(void))chain_keys, METH_FASTCALL, chain_keys_doc},
    {"chain_masks", (PyCFunction)(void (*)(void))chain_masks, METH_FASTCALL, chain_masks_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "indexer._native",
    .m_doc = "Block-key hashing and prefix lookup hot loops (optional C speed-up).",
    .m_size = 0,
    .m_methods = native_methods,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    return PyModuleDef_Init(&native_module);
}
