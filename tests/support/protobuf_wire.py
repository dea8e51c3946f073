"""Protobuf wire encoding by hand, for requests the generated code would never write."""

from __future__ import annotations


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def unpacked_tokens(field: int, tokens: list[int]) -> bytes:
    """A repeated uint32 in the non-packed encoding (one tag per value), which parsers
    must accept as well as the packed one."""
    return b"".join(varint(field << 3) + varint(t) for t in tokens)
