/* chain.c: chain_keys and chain_keys_packed, the chained block-key loop (spec:
 * docs/block-keys.md), kvcore.keys.block_keys when the extension is built.
 *
 * key(block i) = xxh3_64(tokens of block i as u32 little-endian, seed = key(block i - 1))
 *
 * xxHash is compiled in (XXH_INLINE_ALL) so the hash inlines into the loop.
 */
#include "native.h"
#include "bytebuf.h"
#include "tokens.h"

#define XXH_INLINE_ALL
#include "xxhash.h"

/* chain_keys and chain_keys_packed: the same loop, the keys as ints or as packed bytes. */
static PyObject *
chain(PyObject *const *args, Py_ssize_t nargs, int packed, const char *usage)
{
    TokenSource src;
    uint64_t seed;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, usage);
        return NULL;
    }
    if (source_from_args(&src, args[0], args[1], args[2], &seed) < 0) {
        return NULL;
    }
    PyObject *keys = packed ? PyBytes_FromStringAndSize(NULL, src.n_blocks * 8)
                            : PyList_New(src.n_blocks);
    if (keys == NULL) {
        goto fail;
    }
    for (Py_ssize_t i = 0; i < src.n_blocks; i++) {
        const unsigned char *block = source_block(&src, i);
        if (block == NULL) {
            goto fail;
        }
        seed = XXH3_64bits_withSeed(block, (size_t)src.stride, seed);
        if (packed) {
            put_u64_le((unsigned char *)PyBytes_AS_STRING(keys) + i * 8, seed);
            continue;
        }
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

const char chain_keys_doc[] = PyDoc_STR(
"chain_keys(tokens, block_size, seed) -> list[int]\n\n"
"Chained xxh3_64 keys of the full blocks in tokens, starting from seed.");

PyObject *
chain_keys(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    return chain(args, nargs, 0, "chain_keys(tokens, block_size, seed)");
}

const char chain_keys_packed_doc[] = PyDoc_STR(
"chain_keys_packed(tokens, block_size, seed) -> bytes\n\n"
"chain_keys as u64 little-endian, 8 bytes per block.");

PyObject *
chain_keys_packed(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    return chain(args, nargs, 1, "chain_keys_packed(tokens, block_size, seed)");
}
