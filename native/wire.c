/* wire.c: take_uint32_field, a repeated uint32 field taken out of a serialised protobuf
 * message (the token ids of a gRPC Score request, indexer/serve/grpc_handlers.py).
 *
 * upb hands a parsed repeated field to Python one int object at a time, and parsing it at
 * all costs more than reading it here. So the field is read from the wire bytes into packed
 * u32 and cut out of the message; protobuf then parses only the small rest. Malformed input
 * raises ValueError (bounds are checked everywhere). Protobuf semantics: packed and unpacked
 * encodings are both accepted, every occurrence is appended in order (also across repeated
 * occurrences of the enclosing messages, which protobuf merges), and a varint wider than 32
 * bits keeps its low 32 bits, as a uint32 field does.
 */
#include "native.h"
#include "bytebuf.h"

static int
buf_put_u32(ByteBuf *buf, uint32_t value)
{
    unsigned char le[4] = {(unsigned char)value, (unsigned char)(value >> 8),
                           (unsigned char)(value >> 16), (unsigned char)(value >> 24)};
    return buf_put(buf, le, 4);
}

static inline int
read_varint(const unsigned char **pos, const unsigned char *end, uint64_t *value)
{
    const unsigned char *p = *pos;
    if (end - p >= 10) { /* room for the longest varint: no bounds checks */
        uint64_t result = 0;
        for (int shift = 0; shift < 70; shift += 7) {
            unsigned char byte = *p++;
            result |= (uint64_t)(byte & 0x7F) << (shift < 64 ? shift : 0);
            if (!(byte & 0x80)) {
                *pos = p;
                *value = result;
                return 0;
            }
        }
        PyErr_SetString(PyExc_ValueError, "varint longer than 10 bytes");
        return -1;
    }
    uint64_t result = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (*pos >= end) {
            PyErr_SetString(PyExc_ValueError, "truncated varint");
            return -1;
        }
        unsigned char byte = *(*pos)++;
        result |= (uint64_t)(byte & 0x7F) << shift;
        if (!(byte & 0x80)) {
            *value = result;
            return 0;
        }
    }
    PyErr_SetString(PyExc_ValueError, "varint longer than 10 bytes");
    return -1;
}

/* Past a fixed-width value (wire types 1 and 5). */
static int
skip_fixed(const unsigned char **pos, const unsigned char *end, uint64_t tag)
{
    size_t width = (tag & 7) == 1 ? 8 : 4;
    if ((size_t)(end - *pos) < width) {
        PyErr_SetString(PyExc_ValueError, "truncated fixed-width field");
        return -1;
    }
    *pos += width;
    return 0;
}

/* A length-delimited field's length, which must fit in what is left. */
static int
read_length(const unsigned char **pos, const unsigned char *end, uint64_t *len)
{
    if (read_varint(pos, end, len) < 0) {
        return -1;
    }
    if (*len > (uint64_t)(end - *pos)) {
        PyErr_SetString(PyExc_ValueError, "length-delimited field runs past the end");
        return -1;
    }
    return 0;
}

typedef struct {
    const uint32_t *path;
    Py_ssize_t path_len;
    ByteBuf values; /* packed u32 of the field */
} FieldTake;

/* Copy the message in [pos, end) to `rest` without the field at path[depth:]. */
static int
take_field(FieldTake *take, const unsigned char *pos, const unsigned char *end,
           Py_ssize_t depth, ByteBuf *rest)
{
    while (pos < end) {
        const unsigned char *field_start = pos;
        uint64_t tag, value;
        if (read_varint(&pos, end, &tag) < 0) {
            return -1;
        }
        int wanted = (tag >> 3) == take->path[depth];
        int last = depth == take->path_len - 1;
        switch ((int)(tag & 7)) {
        case 0:
            if (read_varint(&pos, end, &value) < 0) {
                return -1;
            }
            if (wanted && last) {
                if (buf_put_u32(&take->values, (uint32_t)value) < 0) {
                    return -1;
                }
                continue;
            }
            break;
        case 1:
        case 5:
            if (skip_fixed(&pos, end, tag) < 0) {
                return -1;
            }
            break;
        case 2: {
            if (read_length(&pos, end, &value) < 0) {
                return -1;
            }
            const unsigned char *stop = pos + value;
            if (wanted && last) {
                if (value == 0) {
                    continue;
                }
                /* at most one value per byte: reserve once, not per value */
                if (buf_reserve(&take->values, 4 * (size_t)value) < 0) {
                    return -1;
                }
                unsigned char *out = take->values.data + take->values.len;
                while (pos < stop) { /* value > 0 here: data is allocated */
                    if (read_varint(&pos, stop, &value) < 0) {
                        return -1;
                    }
                    out[0] = (unsigned char)value;
                    out[1] = (unsigned char)(value >> 8);
                    out[2] = (unsigned char)(value >> 16);
                    out[3] = (unsigned char)(value >> 24);
                    out += 4;
                }
                take->values.len = (size_t)(out - take->values.data);
                continue;
            }
            if (wanted) { /* an enclosing message: copy it without the field, new length */
                ByteBuf inner = {NULL, 0, 0};
                int failed = take_field(take, pos, stop, depth + 1, &inner) < 0 ||
                             buf_put_varint(rest, tag) < 0 ||
                             buf_put_varint(rest, inner.len) < 0 ||
                             (inner.len && buf_put(rest, inner.data, inner.len) < 0);
                PyMem_Free(inner.data);
                if (failed) {
                    return -1;
                }
                pos = stop;
                continue;
            }
            pos = stop;
            break;
        }
        default:
            PyErr_Format(PyExc_ValueError, "unsupported wire type %d", (int)(tag & 7));
            return -1;
        }
        if (buf_put(rest, field_start, (size_t)(pos - field_start)) < 0) {
            return -1;
        }
    }
    return 0;
}

/* Whether the message in [pos, end) has a field at path[depth:]: 1, 0, or -1 with an
 * exception. Only the enclosing messages on the path are entered. */
static int
has_field(const uint32_t *path, Py_ssize_t path_len, const unsigned char *pos,
          const unsigned char *end, Py_ssize_t depth)
{
    while (pos < end) {
        uint64_t tag, value;
        if (read_varint(&pos, end, &tag) < 0) {
            return -1;
        }
        int wanted = (tag >> 3) == path[depth];
        if (wanted && depth == path_len - 1) {
            return 1;
        }
        switch ((int)(tag & 7)) {
        case 0:
            if (read_varint(&pos, end, &value) < 0) {
                return -1;
            }
            break;
        case 1:
        case 5:
            if (skip_fixed(&pos, end, tag) < 0) {
                return -1;
            }
            break;
        case 2: {
            if (read_length(&pos, end, &value) < 0) {
                return -1;
            }
            if (wanted) {
                int found = has_field(path, path_len, pos, pos + value, depth + 1);
                if (found != 0) {
                    return found;
                }
            }
            pos += value;
            break;
        }
        default:
            PyErr_Format(PyExc_ValueError, "unsupported wire type %d", (int)(tag & 7));
            return -1;
        }
    }
    return 0;
}

const char take_uint32_field_doc[] = PyDoc_STR(
"take_uint32_field(message, path) -> tuple[bytes, bytes]\n\n"
"The values of the repeated uint32 field at path (field numbers, outermost first; the\n"
"ones before the last name embedded message fields) of a serialised protobuf message,\n"
"as packed u32 little-endian, and the message without that field (the message object\n"
"itself, not a copy, when it has no such field).");

#define MAX_FIELD_PATH 8

PyObject *
take_uint32_field(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    uint32_t path[MAX_FIELD_PATH];
    Py_buffer view;
    if (nargs != 2 || !PyTuple_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError,
                        "take_uint32_field(message, path: tuple[int, ...])");
        return NULL;
    }
    Py_ssize_t path_len = PyTuple_GET_SIZE(args[1]);
    if (path_len < 1 || path_len > MAX_FIELD_PATH) {
        PyErr_Format(PyExc_ValueError, "path must hold 1 to %d field numbers", MAX_FIELD_PATH);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < path_len; i++) {
        long number = PyLong_AsLong(PyTuple_GET_ITEM(args[1], i));
        if (number == -1 && PyErr_Occurred()) {
            return NULL;
        }
        if (number < 1 || number > 536870911L) {
            PyErr_Format(PyExc_ValueError, "field number %ld is out of range", number);
            return NULL;
        }
        path[i] = (uint32_t)number;
    }
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    FieldTake take = {path, path_len, {NULL, 0, 0}};
    ByteBuf rest = {NULL, 0, 0};
    const unsigned char *start = view.buf;
    PyObject *result = NULL;
    int found = has_field(path, path_len, start, start + view.len, 0);
    if (found == 0) { /* nothing to take (a token_bytes request): no copy */
        result = Py_BuildValue("(y#O)", "", (Py_ssize_t)0, args[0]);
    } else if (found > 0 && take_field(&take, start, start + view.len, 0, &rest) == 0) {
        /* y# turns a NULL pointer into None: empty buffers are given as "". */
        const char *values = take.values.data ? (const char *)take.values.data : "";
        const char *remainder = rest.data ? (const char *)rest.data : "";
        result = Py_BuildValue("(y#y#)", values, (Py_ssize_t)take.values.len, remainder,
                               (Py_ssize_t)rest.len);
    }
    PyBuffer_Release(&view);
    PyMem_Free(take.values.data);
    PyMem_Free(rest.data);
    return result;
}
