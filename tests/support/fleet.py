"""A simulated fleet's event histories at field scale, for backend suites: several
models, each with workers (DP ranks) that store prompts sharing a per-model system prefix
(16-token blocks), evict their oldest prompts past a cap, and answer resyncs with their
whole cache. Engine hashes are unique per rank; everything is deterministic per seed."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

from kvcore.bus import (
    SCHEMA_VERSION,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    Event,
    EventBatch,
    pack_tokens,
)
from kvcore.keys import block_keys_for_tokens

BLOCK = 16
PREFIX_BLOCKS = 8


@dataclass
class FleetRank:
    model: str
    worker_id: str
    dp_rank: int
    prefix: list[int]  # the model's system prompt tokens
    epoch: int = 1
    seq: int = -1
    prefix_hashes: list[int] = field(default_factory=list)
    chains: deque[tuple[list[int], list[int]]] = field(default_factory=deque)  # hashes, tokens
    next_hash: int = 1

    def batch(self, *events: Event) -> EventBatch:
        self.seq += 1
        return EventBatch(schema=SCHEMA_VERSION, model=self.model, worker_id=self.worker_id,
                          dp_rank=self.dp_rank, epoch=self.epoch, seq=self.seq,
                          events=list(events))

    def hashes(self, count: int) -> list[int]:
        first = self.next_hash
        self.next_hash += count
        return list(range(first, first + count))


class Fleet:
    """`models` x `workers` ranks; `step()` gives one batch per rank."""

    def __init__(self, models: list[str], workers: int, *, tail_blocks: int = 24,
                 keep_prompts: int = 40, seed: int = 7) -> None:
        self.rng = random.Random(seed)
        self.tail_blocks = tail_blocks
        self.keep_prompts = keep_prompts
        self.ranks: list[FleetRank] = []
        self.token = 1000
        for m, model in enumerate(models):
            prefix = [m * 7919 + i for i in range(PREFIX_BLOCKS * BLOCK)]
            for w in range(workers):
                self.ranks.append(FleetRank(model, f"10.0.{m}.{w}:8000", w % 2, prefix))

    def _tokens(self, count: int) -> list[int]:
        first = self.token
        self.token += count
        return list(range(first, first + count))

    def step(self) -> list[EventBatch]:
        return [self._step(rank) for rank in self.ranks]

    def _step(self, rank: FleetRank) -> EventBatch:
        events: list[Event] = []
        if not rank.prefix_hashes:
            rank.prefix_hashes = rank.hashes(PREFIX_BLOCKS)
            events.append(BlockStored(block_hashes=rank.prefix_hashes, parent_hash=None,
                                      token_ids=pack_tokens(rank.prefix), block_size=BLOCK))
        length = self.rng.randint(self.tail_blocks // 2, self.tail_blocks * 3 // 2)
        tokens = self._tokens(length * BLOCK)
        hashes = rank.hashes(length)
        events.append(BlockStored(block_hashes=hashes, parent_hash=rank.prefix_hashes[-1],
                                  token_ids=pack_tokens(tokens), block_size=BLOCK))
        rank.chains.append((hashes, tokens))
        while len(rank.chains) > self.keep_prompts:
            old, _ = rank.chains.popleft()
            events.append(BlockRemoved(block_hashes=old))
        return rank.batch(*events)

    def resync(self, rank: FleetRank) -> EventBatch:
        """What the rank's publisher sends when asked for a resync: clear, then all of it."""
        events: list[Event] = [AllBlocksCleared()]
        if rank.prefix_hashes:
            events.append(BlockStored(block_hashes=rank.prefix_hashes, parent_hash=None,
                                      token_ids=pack_tokens(rank.prefix), block_size=BLOCK))
        for hashes, tokens in rank.chains:
            events.append(BlockStored(block_hashes=hashes, parent_hash=rank.prefix_hashes[-1],
                                      token_ids=pack_tokens(tokens), block_size=BLOCK))
        return rank.batch(*events)

    def rank(self, model: str, worker_id: str, dp_rank: int) -> FleetRank:
        return next(r for r in self.ranks if (r.model, r.worker_id, r.dp_rank)
                    == (model, worker_id, dp_rank))

    def queries(self, model: str, count: int) -> list[list[int]]:
        """Block keys of prompts some rank of `model` holds (prefix + tail, a few
        blocks of the tail cut), and of the bare prefix."""
        ranks = [r for r in self.ranks if r.model == model and r.chains]
        out = []
        prefix = ranks[0].prefix if ranks else []
        out.append(block_keys_for_tokens(prefix, BLOCK, model))
        for _ in range(count):
            rank = self.rng.choice(ranks)
            _, tokens = self.rng.choice(rank.chains)
            cut = self.rng.randint(0, 4) * BLOCK
            out.append(block_keys_for_tokens(prefix + tokens[: len(tokens) - cut], BLOCK, model))
        return out
