"""The in-memory index's table: block key (u64) -> presence mask (int, a nibble per slot).

`new_block_table()` gives the C table (`kvcore._native.BlockTable`: open addressing, each
block's presence stored as its holders, a u32 per holding slot, inline when one or two,
so a block costs the same whatever its holders' slot numbers; masks are built as ints on
demand; keyed slot mix, prefetching lookups) when the extension is built, else
`DictBlockTable`, a dict of int masks with the same methods. Both pass tests/test_native.py's
comparison, and every index test runs on whichever this install has.
"""

from __future__ import annotations

import secrets
import sys
from array import array
from collections.abc import Iterator, Sequence
from typing import Protocol

import xxhash

from kvcore.bus import pack_tokens
from kvcore.keys import NATIVE

if NATIVE:
    from kvcore._native import BlockTable

__all__ = ["BlockMasks", "DictBlockTable", "new_block_table", "unpack_keys"]

_PACK_CHUNK_BLOCKS = 32  # token lists are packed this many blocks at a time


class BlockMasks(Protocol):
    """What scoring and the memory index need of a key -> mask table."""

    def __len__(self) -> int: ...

    def get(self, key: int, default: int, /) -> int: ...

    def set_bits(self, keys: Sequence[int], bit: int, /) -> None: ...

    def clear_bits(self, keys: Sequence[int], keep: int, /) -> None: ...

    def set_bit_at(self, keys: Sequence[int], bitpos: int, /) -> None: ...

    def clear_bit_at(self, keys: Sequence[int], bitpos: int, /) -> None: ...

    def items(self) -> Sequence[tuple[int, int]]: ...

    def mask_runs(self, tokens: Sequence[int] | bytes, block_size: int, seed: int,
                  wanted: int | None, keys_out: bytearray | None = None, /) -> list[int]: ...

    def get_many(self, keys: bytes | bytearray, /) -> list[int]: ...

    def get_present(self, keys: bytes | bytearray, /) -> dict[int, int]: ...


def new_block_table() -> BlockMasks:
    if NATIVE:
        return BlockTable(secret=secrets.randbits(64))
    return DictBlockTable()


class DictBlockTable(dict[int, int]):
    """`BlockMasks` on a plain dict: the pure-Python fallback and the C table's reference."""

    def set_bits(self, keys: Sequence[int], bit: int, /) -> None:
        get = self.get
        for key in keys:
            self[key] = get(key, 0) | bit

    def clear_bits(self, keys: Sequence[int], keep: int, /) -> None:
        get = self.get
        for key in keys:
            mask = get(key, 0) & keep
            if mask:
                self[key] = mask
            else:
                self.pop(key, None)

    def set_bit_at(self, keys: Sequence[int], bitpos: int, /) -> None:
        self.set_bits(keys, 1 << bitpos)

    def clear_bit_at(self, keys: Sequence[int], bitpos: int, /) -> None:
        self.clear_bits(keys, ~(1 << bitpos))

    def items(self) -> list[tuple[int, int]]:  # type: ignore[override]
        return list(super().items())

    def get_many(self, keys: bytes | bytearray, /) -> list[int]:
        """The mask of each key (packed u64 little-endian), 0 when missing."""
        get = self.get
        return [get(key, 0) for key in unpack_keys(keys)]

    def get_present(self, keys: bytes | bytearray, /) -> dict[int, int]:
        """Position -> mask of the keys (packed u64 little-endian) the table holds."""
        return {i: mask for i, key in enumerate(unpack_keys(keys))
                if (mask := self.get(key, 0))}

    def mask_runs(self, tokens: Sequence[int] | bytes, block_size: int, seed: int,
                  wanted: int | None, keys_out: bytearray | None = None, /) -> list[int]:
        """Masks of the prompt's leading blocks, up to the first one missing or without a
        wanted bit, as runs of equal masks: [mask, count, mask, count, ...]; their keys
        go to `keys_out` (u64 little-endian). Blocks past the stop are never packed or
        hashed."""
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        runs: list[int] = []
        h = xxhash.xxh3_64_intdigest
        get = self.get
        stride = block_size * 4
        for chunk in _packed_chunks(tokens, block_size):
            for off in range(0, len(chunk), stride):
                seed = h(chunk[off : off + stride], seed)
                mask = get(seed, 0)
                if runs and mask == runs[-2]:
                    runs[-1] += 1
                elif not mask or (wanted is not None and not mask & wanted):
                    return runs
                else:
                    runs += (mask, 1)
                if keys_out is not None:
                    keys_out += seed.to_bytes(8, "little")
        return runs


def unpack_keys(packed: bytes | bytearray) -> list[int]:
    """Block keys packed as u64 little-endian, 8 bytes each."""
    keys = array("Q")
    keys.frombytes(packed)
    if sys.byteorder == "big":
        keys.byteswap()
    return keys.tolist()


def _packed_chunks(tokens: Sequence[int] | bytes, block_size: int) -> Iterator[memoryview]:
    """The prompt's full blocks as packed u32 bytes, a few blocks at a time."""
    stride = block_size * 4
    if isinstance(tokens, bytes | bytearray | memoryview):
        view = memoryview(tokens).cast("B")
        yield view[: len(view) // stride * stride]
        return
    end = len(tokens) // block_size * block_size
    step = block_size * _PACK_CHUNK_BLOCKS
    for start in range(0, end, step):
        yield memoryview(pack_tokens(tokens[start : min(start + step, end)]))
