"""Cutting one rank's events into bus batches that fit a byte limit (the server's max_payload).

A NATS server refuses a message over its `max_payload` (1 MiB by default), and the indexer
refuses a batch over `MAX_MESSAGE_BYTES`, `MAX_EVENTS_PER_BATCH` events or
`MAX_BLOCKS_PER_EVENT` blocks in an event. `split_events` packs events, in order, into as
few lists as it can under those limits, and cuts an event that does not fit on its own
into several events of the same kind:

- `BlockStored` blocks i..j-1 keep the event's fields (block size, medium, adapter, salt)
  with their own slices of `token_ids` and `extra_keys`; the first piece keeps the event's
  `parent_hash`, each later piece's parent is the last block of the piece before it, which
  is what the engine's chain says, so the index derives the same block keys;
- `BlockRemoved` is cut into runs of its hashes on the same medium.

Each list becomes one batch with its own seq (gapless), so the indexer applies the pieces
as consecutive batches. Sizes are computed from the msgpack layout as upper bounds (every
u64 counted as 9 bytes, every header at its widest), never by encoding: a batch built from
a list encodes to at most the budget. A single block that does not fit an empty batch
cannot be published at all; it is returned in `oversized` (as a one-block event, in order)
and left out of the lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from kvcore.bus import (
    MAX_BLOCKS_PER_EVENT,
    MAX_EVENTS_PER_BATCH,
    SCHEMA_VERSION,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
    EventBatch,
    encode_batch,
)

__all__ = ["Split", "envelope_bytes", "event_bytes", "split_events"]

_U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF
_INT: Final = 9  # widest msgpack int (uint 64)
_HEADER: Final = 5  # widest msgpack str / bin / array header


def _str_bytes(text: str) -> int:
    return len(text.encode()) + _HEADER


def _key(name: str) -> int:
    return len(name) + 1  # field names are short ASCII: one fixstr header byte


_CLEARED: Final = 1 + _key("type") + _str_bytes("cleared")
_REMOVED_FIXED: Final = 1 + _key("type") + _str_bytes("removed") + _key("block_hashes") + _HEADER
_STORED_FIXED: Final = (1 + _key("type") + _str_bytes("stored") + _key("block_hashes") + _HEADER
                        + _key("parent_hash") + _INT)  # a piece may gain a parent


def _fixed_bytes(event: BlockStored | BlockRemoved) -> int:
    """Bytes of an event (or any piece of it) besides its per-block parts."""
    if isinstance(event, BlockRemoved):
        size = _REMOVED_FIXED + _pool_bytes(event.pool)
        if event.medium != "gpu":
            size += _key("medium") + _str_bytes(event.medium)
        if event.group:
            size += _key("group") + _INT
        return size
    size = _STORED_FIXED + _pool_bytes(event.pool)
    if event.token_ids:
        size += _key("token_ids") + _HEADER
    if event.block_size:
        size += _key("block_size") + _INT
    if event.medium != "gpu":
        size += _key("medium") + _str_bytes(event.medium)
    if event.lora_name is not None:
        size += _key("lora_name") + _str_bytes(event.lora_name)
    if event.cache_salt is not None:
        size += _key("cache_salt") + _str_bytes(event.cache_salt)
    if event.extra_keys is not None:
        size += _key("extra_keys") + _HEADER
    if event.group:
        size += _key("group") + _INT
    if event.group_kind is not None:
        size += _key("group_kind") + _str_bytes(event.group_kind)
    if event.sliding_window:
        size += _key("sliding_window") + _INT
    return size


def _pool_bytes(pool: str | None) -> int:
    return 0 if pool is None else _key("pool") + _str_bytes(pool)


def _stride(event: BlockStored | BlockRemoved) -> int:
    """Bytes each block adds besides its extra key: its hash and its tokens."""
    if isinstance(event, BlockStored) and event.token_ids:
        return _INT + event.block_size * 4
    return _INT


def event_bytes(event: Event) -> int:
    """An upper bound of the event's msgpack size."""
    if isinstance(event, AllBlocksCleared):
        return _CLEARED + _pool_bytes(event.pool)
    size = _fixed_bytes(event) + _stride(event) * len(event.block_hashes)
    if isinstance(event, BlockStored) and event.extra_keys is not None:
        size += sum(len(extra) + _HEADER for extra in event.extra_keys)
    return size


def envelope_bytes(model: str, worker_id: str, dp_rank: int) -> int:
    """An upper bound of a batch's size besides its events (any epoch, seq and ts)."""
    empty = EventBatch(schema=SCHEMA_VERSION, model=model, worker_id=worker_id,
                       dp_rank=dp_rank, epoch=_U64_MAX, seq=_U64_MAX, ts=1.0, events=[])
    return len(encode_batch(empty)) - 1 + _HEADER  # the events array header at its widest


@dataclass
class Split:
    """Event lists, one per batch, in order; the blocks that fit no batch; events cut."""

    batches: list[list[Event]] = field(default_factory=list)
    oversized: list[BlockStored | BlockRemoved | AllBlocksCleared] = field(default_factory=list)
    cut_events: int = 0


def _piece(event: BlockStored | BlockRemoved, i: int, j: int) -> BlockStored | BlockRemoved:
    """Blocks i..j-1 of `event` as an event of their own."""
    hashes = event.block_hashes
    if i == 0 and j == len(hashes):
        return event
    if isinstance(event, BlockRemoved):
        return BlockRemoved(block_hashes=hashes[i:j], medium=event.medium, group=event.group,
                            pool=event.pool)
    tokens = event.token_ids
    if tokens:
        width = event.block_size * 4
        tokens = tokens[i * width : j * width]
    return BlockStored(
        block_hashes=hashes[i:j],
        parent_hash=event.parent_hash if i == 0 else hashes[i - 1],
        token_ids=tokens, block_size=event.block_size, medium=event.medium,
        lora_name=event.lora_name, cache_salt=event.cache_salt,
        extra_keys=None if event.extra_keys is None else event.extra_keys[i:j],
        group=event.group, group_kind=event.group_kind, sliding_window=event.sliding_window,
        pool=event.pool)


def split_events(
    events: Sequence[Event],
    budget: int,
    *,
    max_events: int = MAX_EVENTS_PER_BATCH,
    max_blocks: int = MAX_BLOCKS_PER_EVENT,
) -> Split:
    """Events, in order, as lists whose events take at most `budget` bytes each.

    `budget` is what a batch may spend on its events: the message limit minus
    `envelope_bytes`. Events are kept whole when they fit a batch of their own; an event
    that does not is cut, the first piece filling what the current batch has left.
    """
    if len(events) <= max_events:  # the common case: one engine step, one batch
        total = 0
        for event in events:
            if not isinstance(event, AllBlocksCleared) and len(event.block_hashes) > max_blocks:
                break
            total += event_bytes(event)
        else:
            if total <= budget:
                return Split(batches=[list(events)] if events else [])
    out = Split()
    current: list[Event] = []
    room = budget

    def close() -> None:
        nonlocal current, room
        if current:
            out.batches.append(current)
        current = []
        room = budget

    for event in events:
        size = event_bytes(event)
        blocks = 0 if isinstance(event, AllBlocksCleared) else len(event.block_hashes)
        if blocks <= max_blocks and size <= budget:
            if size > room or len(current) >= max_events:
                close()
            current.append(event)
            room -= size
            continue
        if isinstance(event, AllBlocksCleared) or not blocks:
            out.oversized.append(event)
            continue
        out.cut_events += 1
        fixed, stride = _fixed_bytes(event), _stride(event)
        extra = event.extra_keys if isinstance(event, BlockStored) else None
        i = 0
        while i < blocks:
            if len(current) >= max_events:
                close()
            available = room - fixed
            if extra is None:
                j = i + max(0, min(blocks - i, max_blocks, available // stride))
                used = (j - i) * stride
            else:
                j, used = i, 0
                while j < blocks and j - i < max_blocks:
                    cost = stride + len(extra[j]) + _HEADER
                    if used + cost > available:
                        break
                    used += cost
                    j += 1
            if j == i:
                if current:
                    close()  # an empty batch may hold the next block
                    continue
                out.oversized.append(_piece(event, i, i + 1))
                i += 1
                continue
            current.append(_piece(event, i, j))
            room -= fixed + used
            if j < blocks and j - i < max_blocks:
                close()  # bytes ran out (not the block count): this batch is full
            i = j
    close()
    return out
