"""Canonical block keys: the one implementation (spec in docs/block-keys.md).

key(block i) = xxh3_64(tokens of block i as u32 little-endian [+ extra key bytes of block i],
                      seed = key(block i - 1))
key(block -1) = root_seed(model, lora_name, cache_salt)

Keys are unsigned 64-bit ints. Only full blocks get keys. Different models, adapters or
cache salts start from different roots, so they never share keys.

The loop runs in C (`kvcore._native`, built from native/ at install) when the
extension is there, else in Python below; `NATIVE` says which. Both give the same keys.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence
from typing import Final

import xxhash

from kvcore.bus import pack_tokens

try:
    from kvcore import _native
except ImportError:  # installed without a C compiler: the pure-Python loops
    _native = None  # type: ignore[assignment]

__all__ = [
    "KEY_SCHEME",
    "NATIVE",
    "block_keys",
    "block_keys_for_tokens",
    "block_keys_packed",
    "pack_keys",
    "root_seed",
]

NATIVE: Final = _native is not None

KEY_SCHEME: Final = b"kv-indexer/block-keys/v1"

_xxh3: Final = xxhash.xxh3_64_intdigest
_u32: Final = struct.Struct("<I")


def _field(text: str | None) -> bytes:
    raw = (text or "").encode()
    return _u32.pack(len(raw)) + raw


def root_seed(model: str, lora_name: str | None = None, cache_salt: str | None = None) -> int:
    """Seed of the first block: xxh3_64 over the scheme tag and length-prefixed names.

    `None` and "" are the same (no adapter, no salt).
    """
    return int(_xxh3(KEY_SCHEME + _field(model) + _field(lora_name) + _field(cache_salt)))


def block_keys(
    tokens: bytes | memoryview | Sequence[int],
    block_size: int,
    seed: int,
    extra_keys: Sequence[bytes] | None = None,
) -> list[int]:
    """Chained keys of the full blocks in `tokens` (packed u32 little-endian, or token ids).

    `seed` is the root seed for a sequence start, or the key of the block before the first.
    `extra_keys`, when given, holds one bytes entry per full block (b"" for none).
    """
    if extra_keys is None and _native is not None:
        return _native.chain_keys(tokens, block_size, seed)
    if not isinstance(tokens, bytes | bytearray | memoryview):
        tokens = pack_tokens(tokens)
    return block_keys_python(tokens, block_size, seed, extra_keys)


def block_keys_packed(
    tokens: bytes | memoryview | Sequence[int], block_size: int, seed: int
) -> bytes:
    """`block_keys` as u64 little-endian, 8 bytes per block (what the Redis index sends)."""
    if _native is not None:
        return _native.chain_keys_packed(tokens, block_size, seed)
    return pack_keys(block_keys(tokens, block_size, seed))


def pack_keys(keys: Sequence[int]) -> bytes:
    """Block keys as u64 little-endian, 8 bytes each (OverflowError outside 0..2**64-1)."""
    packed = array("Q", keys)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def block_keys_python(
    tokens: bytes | bytearray | memoryview,
    block_size: int,
    seed: int,
    extra_keys: Sequence[bytes] | None = None,
) -> list[int]:
    """`block_keys` without the C extension (the reference the extension is tested against)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    stride = block_size * 4
    view = memoryview(tokens)
    n_blocks = len(view) // stride
    keys: list[int] = []
    append = keys.append
    h = _xxh3
    if extra_keys is None:
        for off in range(0, n_blocks * stride, stride):
            seed = h(view[off : off + stride], seed)
            append(seed)
        return keys
    if len(extra_keys) < n_blocks:
        raise ValueError(f"extra_keys has {len(extra_keys)} entries for {n_blocks} blocks")
    for i in range(n_blocks):
        chunk = view[i * stride : (i + 1) * stride]
        extra = extra_keys[i]
        seed = h(chunk.tobytes() + extra if extra else chunk, seed)
        append(seed)
    return keys


def block_keys_for_tokens(
    tokens: Sequence[int] | array[int],
    block_size: int,
    model: str,
    *,
    lora_name: str | None = None,
    cache_salt: str | None = None,
    extra_keys: Sequence[bytes] | None = None,
) -> list[int]:
    """Keys of a prompt's full blocks from token ids, starting at the model's root."""
    return block_keys(tokens, block_size, root_seed(model, lora_name, cache_salt), extra_keys)
