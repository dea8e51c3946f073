/* bytebuf.h: little-endian output helpers shared by more than one part of kvcore._native:
 * put_u64_le (chain_keys_packed's keys, pack_log_entries' records), get_u64_le (LedgerMap.load_run) and ByteBuf, the growable
 * output buffer of take_uint32_field, pack_log_entries and encode_decision, with
 * buf_put_varint (protobuf's base-128 varint) for the two protobuf writers.
 *
 * Static inline: their callers call them once per value or record, in loops, and inline
 * them (as they did when everything was one file).
 */
#ifndef KVCORE_NATIVE_BYTEBUF_H
#define KVCORE_NATIVE_BYTEBUF_H

#include "native.h"

static inline void
put_u64_le(unsigned char *out, uint64_t value)
{
    for (int i = 0; i < 8; i++) {
        out[i] = (unsigned char)(value >> (8 * i));
    }
}

static inline uint64_t
get_u64_le(const unsigned char *in)
{
    uint64_t value = 0;
    for (int i = 7; i >= 0; i--) {
        value = (value << 8) | in[i];
    }
    return value;
}

typedef struct {
    unsigned char *data;
    size_t len;
    size_t cap;
} ByteBuf;

static inline int
buf_reserve(ByteBuf *buf, size_t extra)
{
    if (buf->len + extra <= buf->cap) {
        return 0;
    }
    size_t cap = buf->cap ? buf->cap : 256;
    while (cap < buf->len + extra) {
        cap *= 2;
    }
    unsigned char *grown = PyMem_Realloc(buf->data, cap);
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    buf->data = grown;
    buf->cap = cap;
    return 0;
}

static inline int
buf_put(ByteBuf *buf, const unsigned char *bytes, size_t n)
{
    if (buf_reserve(buf, n) < 0) {
        return -1;
    }
    memcpy(buf->data + buf->len, bytes, n);
    buf->len += n;
    return 0;
}

static inline int
buf_put_varint(ByteBuf *buf, uint64_t value)
{
    unsigned char bytes[10];
    size_t n = 0;
    do {
        bytes[n++] = (unsigned char)((value & 0x7F) | (value > 0x7F ? 0x80 : 0));
        value >>= 7;
    } while (value);
    return buf_put(buf, bytes, n);
}

#endif /* KVCORE_NATIVE_BYTEBUF_H */
