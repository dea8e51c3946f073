/* intbits.h: reading a non-negative Python int's bits straight from its digits, for the
 * presence masks of tally.c (the Score walk) and block_table.c (the `wanted` test of
 * mask_runs, and masks taken apart into holders). Static inline: both call them in loops.
 */
#ifndef KVCORE_NATIVE_INTBITS_H
#define KVCORE_NATIVE_INTBITS_H

#include "native.h"

typedef struct {
    Py_ssize_t n_digits;
    const digit *digits;
} IntDigits;

/* The digits of a non-negative exact int (the layout differs from 3.12 on). */
static inline int
int_digits(PyObject *obj, const char *what, IntDigits *out)
{
    if (!PyLong_CheckExact(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, not %.100s", what,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyLongObject *value = (PyLongObject *)obj;
#if PY_VERSION_HEX >= 0x030C0000
    uintptr_t tag = value->long_value.lv_tag;
    if ((tag & 3) == 2) { /* sign bits: 0 positive, 1 zero, 2 negative */
        PyErr_Format(PyExc_ValueError, "%s must be >= 0", what);
        return -1;
    }
    out->n_digits = (Py_ssize_t)(tag >> 3);
    out->digits = value->long_value.ob_digit;
#else
    if (Py_SIZE(value) < 0) {
        PyErr_Format(PyExc_ValueError, "%s must be >= 0", what);
        return -1;
    }
    out->n_digits = Py_SIZE(value);
    out->digits = value->ob_digit;
#endif
    return 0;
}

/* Bits 64 * word .. 64 * word + 63 of the int. */
static inline uint64_t
word_at(const IntDigits *v, Py_ssize_t word)
{
    Py_ssize_t bit = word * 64;
    Py_ssize_t i = bit / PyLong_SHIFT;
    if (i >= v->n_digits) {
        return 0;
    }
    int off = (int)(bit % PyLong_SHIFT);
    uint64_t out = (uint64_t)v->digits[i] >> off;
    int filled = PyLong_SHIFT - off;
    for (i++; filled < 64 && i < v->n_digits; i++) {
        out |= (uint64_t)v->digits[i] << filled;
        filled += PyLong_SHIFT;
    }
    return out;
}

#endif /* KVCORE_NATIVE_INTBITS_H */
