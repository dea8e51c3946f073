"""Restart of a Redis-mode indexer at fleet size: how long the first apply() naming every
rank takes once the process's ledger cache is gone (each rank's ledger restored from
Redis: metadata and log read back, the log replayed).

    python -m bench.redis_restart [--ranks 1024] [--blocks 20000]

A private redis-server is filled with `--ranks` ranks of `--blocks` blocks each (one
model, every rank storing the same chain, some evicted), then a new `RedisIndex` applies
one batch per rank continuing its chain, in calls of 256 batches as a consumer does.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

from indexer.index.protocol import ApplyOutcome, IndexConfig
from indexer.index.redis import RedisIndex
from kvcore.bus import SCHEMA_VERSION, BlockRemoved, BlockStored, EventBatch, pack_tokens
from kvsim.report import write_section
from tests.support.servers import RedisServer

MODEL = "bench/restart"
BLOCK_SIZE = 16
CHUNK = 256


def history(ranks: int, blocks: int) -> tuple[list[EventBatch], list[EventBatch]]:
    """Every rank's stores and evictions, and the batch each sends after the restart."""
    tokens = pack_tokens([t % 50_000 for t in range(blocks * BLOCK_SIZE)])
    before: list[EventBatch] = []
    after: list[EventBatch] = []
    for rank in range(ranks):
        worker = f"w{rank}"
        stored = BlockStored(block_hashes=list(range(1, blocks + 1)), parent_hash=None,
                             token_ids=tokens, block_size=BLOCK_SIZE)
        evicted = BlockRemoved(block_hashes=list(range(blocks - rank % 100, blocks + 1)))
        before += [EventBatch(SCHEMA_VERSION, MODEL, worker, 1, 0, [stored]),
                   EventBatch(SCHEMA_VERSION, MODEL, worker, 1, 1, [evicted])]
        child = BlockStored(block_hashes=[blocks + 1], parent_hash=blocks - rank % 100 - 1,
                            token_ids=tokens[: BLOCK_SIZE * 4], block_size=BLOCK_SIZE)
        after.append(EventBatch(SCHEMA_VERSION, MODEL, worker, 1, 2, [child]))
    return before, after


async def run(ranks: int, blocks: int) -> tuple[float, float, int]:
    """Seconds to fill Redis, seconds of the restart's applies, entries restored."""
    before, after = history(ranks, blocks)
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp)).start()
        try:
            client = aioredis.Redis.from_url(server.url)
            config = IndexConfig()
            t0 = time.perf_counter()
            index = RedisIndex(client, config)
            for start in range(0, len(before), 16):
                await index.apply(before[start : start + 16])
            filled = time.perf_counter() - t0
            entries = sum(sum(w.blocks_by_tier.values()) for w in await index.workers(MODEL))
            restarted = RedisIndex(aioredis.Redis.from_url(server.url), config)
            t0 = time.perf_counter()
            outcomes = []
            for start in range(0, len(after), CHUNK):
                outcomes += await restarted.apply(after[start : start + CHUNK])
            seconds = time.perf_counter() - t0
            if set(outcomes) != {ApplyOutcome.APPLIED} or (await restarted.stats()).dropped:
                raise RuntimeError("a rank did not continue where it stopped")
            await restarted.close()
            await index.close()
            return filled, seconds, entries
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", type=int, default=1024)
    parser.add_argument("--blocks", type=int, default=20_000, help="blocks per rank")
    args = parser.parse_args()
    filled, seconds, entries = asyncio.run(run(args.ranks, args.blocks))
    line = (f"{args.ranks:,} ranks x {args.blocks:,} blocks ({entries:,} entries, filled in "
            f"{filled:.1f} s): restart restored every ledger in {seconds:.2f} s "
            f"({seconds / args.ranks * 1e3:.2f} ms per rank, "
            f"{entries / seconds / 1e6:.1f}M entries/s)")
    print(line)
    per_rank_ms = seconds / args.ranks * 1e3
    body = f"""One model, every rank storing the same chain of `--blocks` blocks, then evicting up
to 100 of them; after the restart one batch per rank continues its chain (its parent is
resolved from the restored ledger), in apply() calls of {CHUNK} batches. Time of those
calls, which restore every rank's ledger (metadata and log read back from Redis, the log
replayed):

| ranks | blocks per rank | entries | restore, s | ms per rank | entries/s |
|---:|---:|---:|---:|---:|---:|
| {args.ranks:,} | {args.blocks:,} | {entries:,} | {seconds:.2f} | {per_rank_ms:.2f} \
| {entries / seconds:,.0f} |
"""
    write_section("redis-restart", "Redis backend: an indexer's restart at fleet size",
                  f"python -m bench.redis_restart --ranks {args.ranks} --blocks {args.blocks}",
                  body)


if __name__ == "__main__":
    main()
