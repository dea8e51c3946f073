"""Canonical block keys: the one implementation (spec in docs/block-keys.md).

key(block i) = xxh3_64(tokens of block i as u32 little-endian [+ extra key bytes of block i],
                      seed = key(block i - 1))
key(block -1) = root_seed(model, lora_name, cache_salt)

Keys are unsigned 64-bit ints. Only full blocks get keys. Different models, adapters or
cache salts start from different roots, so they never share keys. A block's extra keys
(multimodal items, prompt-embedding digests) have one canonical byte form,
`block_extra_key`; `multimodal_extra_keys` derives them for a prompt as a router does.

The loop runs in C (`kvcore._native`, built from native/ at install) when the
extension is there, else in Python below; `NATIVE` says which. Both give the same keys.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence
from typing import Final, NamedTuple

import xxhash

from kvcore.bus import pack_tokens

try:
    from kvcore import _native
except ImportError:  # installed without a C compiler: the pure-Python loops
    _native = None  # type: ignore[assignment]

__all__ = [
    "EMBEDS_ITEM_TAG",
    "KEY_SCHEME",
    "MM_ITEM_TAG",
    "NATIVE",
    "MultimodalItem",
    "block_extra_key",
    "block_keys",
    "block_keys_for_tokens",
    "block_keys_packed",
    "multimodal_extra_keys",
    "pack_keys",
    "root_seed",
]

NATIVE: Final = _native is not None

KEY_SCHEME: Final = b"kv-indexer/block-keys/v1"

# Item tags of the canonical extra-key form (docs/block-keys.md, "Extra keys").
MM_ITEM_TAG: Final = 0x6D  # "m": a multimodal item (identifier, offset in the block)
EMBEDS_ITEM_TAG: Final = 0x65  # "e": the digest of the block's prompt embeddings

_xxh3: Final = xxhash.xxh3_64_intdigest
_u32: Final = struct.Struct("<I")
_i64: Final = struct.Struct("<q")


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


class MultimodalItem(NamedTuple):
    """One multimodal input of a prompt: the engine's identifier (vLLM's `mm_feature.identifier`,
    the item's content hash, LoRA-prefixed when the request has an adapter), and the
    position (`offset`) and number (`length`) of the placeholder tokens it fills."""

    identifier: str
    offset: int
    length: int


def block_extra_key(
    mm_items: Sequence[tuple[str, int]] = (), embeds_digests: Sequence[bytes] = ()
) -> bytes:
    """The canonical extra-key bytes of one block (b"" when it has none).

    `mm_items` are the block's (identifier, offset) pairs in prompt order, the offset
    counted from the block's first token (negative when the item began in an earlier
    block); `embeds_digests` the digests of the block's prompt embeddings.

        multimodal item     0x6D ‖ u32_le(len(utf8(identifier))) ‖ utf8(identifier) ‖ i64_le(offset)
        embeddings digest   0x65 ‖ u32_le(len(digest)) ‖ digest
    """
    parts: list[bytes] = []
    for identifier, offset in mm_items:
        raw = identifier.encode()
        parts.append(bytes((MM_ITEM_TAG,)) + _u32.pack(len(raw)) + raw + _i64.pack(offset))
    for digest in embeds_digests:
        parts.append(bytes((EMBEDS_ITEM_TAG,)) + _u32.pack(len(digest)) + bytes(digest))
    return b"".join(parts)


def multimodal_extra_keys(
    mm_items: Sequence[MultimodalItem],
    n_tokens: int,
    block_size: int,
    embeds_digests: Sequence[bytes] | None = None,
) -> list[bytes] | None:
    """Per full block of an `n_tokens` prompt, the extra keys its multimodal items (and
    prompt-embedding digests, one per block) give it; None when no block has any.

    A block [s, s + block_size) lists every item that overlaps it (offset < s + block_size
    and offset + length > s), in prompt order, as (identifier, offset - s): what vLLM puts
    into its block hash and publishes in `extra_keys`.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    n_blocks = n_tokens // block_size
    if embeds_digests is not None and len(embeds_digests) < n_blocks:
        raise ValueError(f"embeds_digests has {len(embeds_digests)} entries for {n_blocks} "
                         "blocks")
    items = sorted(mm_items, key=lambda item: item.offset)
    out: list[bytes] = []
    for i in range(n_blocks):
        start, end = i * block_size, (i + 1) * block_size
        in_block = [(item.identifier, item.offset - start) for item in items
                    if item.offset < end and item.offset + item.length > start]
        digests = (embeds_digests[i],) if embeds_digests is not None else ()
        out.append(block_extra_key(in_block, digests))
    return out if any(out) else None
