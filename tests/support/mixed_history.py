"""Seeded bus histories of every event shape a ledger meets, for comparing ingest paths.

Each rank stores chains with shared prefixes (a root, then children of its own earlier
blocks), and now and then: removes blocks (some become ghosts, some are trimmed), stores
held blocks and ghosts again, stores children of parents it never had or evicted long
ago, stores the same engine hash with other content, repeats a hash within one event,
offloads known and unknown blocks without tokens, stores under a LoRA name, a cache
salt or extra keys, names tiers in several spellings, clears, starts a new epoch, skips
or repeats a sequence number, and keeps a second KV-cache group (a sliding window) with
its own stores and removals. Most events are still the plain ones (new blocks chained
from a root or a held parent), so a run also has the usual shape at volume.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import xxhash

from kvcore.bus import (
    SCHEMA_VERSION,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
    EventBatch,
    pack_tokens,
)

MODEL = "mixed/model"
BLOCK_SIZE = 4
MEDIUMS = ("gpu", "gpu", "gpu", "cpu", "GPU", "disk", "tape")


@dataclass
class _Rank:
    worker: str
    rank: int
    epoch: int = 1
    seq: int = 0
    chains: list[tuple[int, bytes]] = field(default_factory=list)  # (hash, block tokens)
    stores: list[BlockStored] = field(default_factory=list)  # recent stores, to repeat
    group_tail: int | None = None  # the last block hash of the window group


def _block(rng: random.Random) -> bytes:
    return pack_tokens([rng.randrange(50_000) for _ in range(BLOCK_SIZE)])


def _chain_hash(tokens: bytes, parent: int | None) -> int:
    return int(xxhash.xxh3_64_intdigest(tokens, parent or 0x5EED))


class MixedHistory:
    """`batches()` yields a seeded history of `ranks` ranks, about `blocks` blocks stored."""

    def __init__(self, ranks: int, blocks: int, seed: int = 7) -> None:
        self.rng = random.Random(seed)
        self.blocks = blocks
        self.ranks = [_Rank(f"worker-{i:04d}", i % 2) for i in range(ranks)]

    def batches(self) -> Iterator[EventBatch]:
        stored = 0
        while stored < self.blocks:
            rank = self.rng.choice(self.ranks)
            events = [self._event(rank) for _ in range(self.rng.randint(1, 4))]
            stored += sum(len(e.block_hashes) for e in events if isinstance(e, BlockStored))
            yield from self._batch(rank, events)

    def _batch(self, rank: _Rank, events: list[Event]) -> Iterator[EventBatch]:
        roll = self.rng.random()
        if roll < 0.002:  # a new epoch starts at 0
            rank.epoch += 1
            rank.seq = 0
        elif roll < 0.004:  # a gap
            rank.seq += 2
        out = EventBatch(schema=SCHEMA_VERSION, model=MODEL, worker_id=rank.worker,
                         dp_rank=rank.rank, epoch=rank.epoch, seq=rank.seq, events=events,
                         ts=float(rank.seq))
        rank.seq += 1
        yield out
        if roll > 0.998:  # a duplicate
            yield out

    def _event(self, rank: _Rank) -> Event:
        roll = self.rng.random()
        if roll < 0.70 or not rank.chains:
            return self._plain(rank)
        if roll < 0.78:
            return self._remove(rank)
        if roll < 0.82 and rank.stores:
            return self.rng.choice(rank.stores)  # a re-store: held blocks or ghosts
        if roll < 0.85:
            return self._offload(rank)
        if roll < 0.87:
            return self._odd_store(rank)
        if roll < 0.95:
            return self._group_event(rank)
        if roll < 0.952:
            rank.chains.clear()
            return AllBlocksCleared()
        return self._plain(rank, medium=self.rng.choice(MEDIUMS))

    def _plain(self, rank: _Rank, medium: str = "gpu", parent_roll: float | None = None,
               **fields: object) -> BlockStored:
        """New blocks from a root or after a known block (decode: one block)."""
        roll = self.rng.random() if parent_roll is None else parent_roll
        parent = None if roll < 0.2 or not rank.chains else self.rng.choice(rank.chains[-64:])[0]
        n = 1 if roll > 0.6 else self.rng.randint(1, 32)
        hashes, tokens = [], []
        last = parent
        for _ in range(n):
            block = _block(self.rng)
            last = _chain_hash(block, last)
            hashes.append(last)
            tokens.append(block)
            rank.chains.append((last, block))
        event = BlockStored(block_hashes=hashes, parent_hash=parent, token_ids=b"".join(tokens),
                            block_size=BLOCK_SIZE, medium=medium, **fields)  # type: ignore[arg-type]
        rank.stores = [*rank.stores[-15:], event]
        return event

    def _remove(self, rank: _Rank) -> BlockRemoved:
        picked = self.rng.sample(rank.chains[-200:], min(len(rank.chains), self.rng.randint(1, 8)))
        hashes = [h for h, _ in picked] + ([self.rng.getrandbits(64)] if self.rng.random() < 0.1
                                          else [])
        return BlockRemoved(block_hashes=hashes, medium=self.rng.choice(MEDIUMS[:4]))

    def _offload(self, rank: _Rank) -> BlockStored:
        """Known blocks (and now and then an unknown one) copied to another tier."""
        picked = [h for h, _ in self.rng.sample(rank.chains[-100:],
                                                min(len(rank.chains), self.rng.randint(1, 6)))]
        if self.rng.random() < 0.2:
            picked.append(self.rng.getrandbits(64))
        return BlockStored(block_hashes=picked, medium=self.rng.choice(("cpu", "disk")))

    def _odd_store(self, rank: _Rank) -> BlockStored:
        """A store the usual path does not take: unknown parent, LoRA / salt, extra keys,
        a repeated hash, a known hash with other content."""
        kind = self.rng.randrange(6)
        if kind == 0:
            event = self._plain(rank, parent_roll=0.5)
            event.parent_hash = self.rng.getrandbits(64)
            return event
        if kind == 1:
            return self._plain(rank, parent_roll=0.0, lora_name="adapter")
        if kind == 2:
            return self._plain(rank, parent_roll=0.0,
                               cache_salt=self.rng.choice(("salt", "")))
        if kind == 3:
            event = self._plain(rank, parent_roll=0.3)
            event.extra_keys = [b"mm" if i % 2 else b"" for i in range(len(event.block_hashes))]
            return event
        if kind == 4 and rank.chains:
            h, block = self.rng.choice(rank.chains[-50:])
            return BlockStored(block_hashes=[h, h], token_ids=block + block,
                               block_size=BLOCK_SIZE)
        h, _ = self.rng.choice(rank.chains[-50:])
        return BlockStored(block_hashes=[h], token_ids=_block(self.rng), block_size=BLOCK_SIZE)

    def _group_event(self, rank: _Rank) -> Event:
        """KV-cache group 1 (a sliding window) stores after the rank's chains and frees
        its older blocks."""
        if rank.group_tail is not None and self.rng.random() < 0.4:
            return BlockRemoved(block_hashes=[rank.group_tail], group=1)
        block = _block(self.rng)
        parent = self.rng.choice(rank.chains[-16:])[0] if rank.chains else None
        h = _chain_hash(block, parent)
        rank.group_tail = h
        return BlockStored(block_hashes=[h], parent_hash=parent, token_ids=block,
                           block_size=BLOCK_SIZE, group=1, group_kind="sliding_window",
                           sliding_window=64)
