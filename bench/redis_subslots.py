"""One model over several hash slots (`--redis-subslots`) on a real 3-master Redis Cluster:
memory per entry, ingest rate, Score latency and redis-server time per Score, with every
answer checked against the in-memory index (`make bench-redis-subslots`).

Starts a private cluster (3 masters, a replica each, on loopback), ingests one generated
shared-prefix workload (one model) into it with today's single-slot index
(`RedisClusterIndex`: the model on one master) and with `ShardedRedisIndex` at
`--subslots` S (the model spread over the masters by block key), and times Score for
8,192-token queries one at a time. redis-server's own time comes from INFO commandstats
of each master (reset before the Score pass): the total per Score and the busiest
master's share. Prints a markdown table; docs/benchmarks.md keeps dated run notes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis.asyncio.cluster import RedisCluster as ClusterClient

from bench.redis_cluster import ingest
from bench.workload import make_workload
from indexer.index.memory import MemoryIndex
from indexer.index.protocol import Index, IndexConfig, ScoreQuery
from indexer.index.redis_cluster import RedisClusterIndex
from indexer.index.redis_sharded import ShardedRedisIndex
from kvcore.bus import EventBatch
from kvcore.keys import block_keys_for_tokens
from kvsim.report import pct
from tests.support.redis_cluster import RedisCluster

MODEL = "bench/model"


async def masters_info(admin: ClusterClient, section: str) -> dict[str, dict[str, Any]]:
    replies = await admin.info(section, target_nodes=ClusterClient.PRIMARIES)
    return {str(node): reply for node, reply in replies.items()}


async def used_memory(admin: ClusterClient) -> int:
    return sum(int(info["used_memory"]) for info in (await masters_info(admin, "memory"))
               .values())


async def redis_usec(admin: ClusterClient) -> dict[str, float]:
    """usec of every command so far, per master."""
    out = {}
    for node, info in (await masters_info(admin, "commandstats")).items():
        out[node] = sum(float(v["usec"]) for k, v in info.items()
                        if k.startswith("cmdstat_") and isinstance(v, dict))
    return out


def answers(result: Any) -> list[tuple[str, int, int]]:
    return [(s.worker_id, s.dp_rank, s.matched_blocks) for s in result.scores]


async def measure(name: str, make: Callable[[], Index], admin: ClusterClient, *,
                  batches: list[EventBatch], blocks: int, queries: list[list[int]],
                  expected: list[list[tuple[str, int, int]]],
                  args: argparse.Namespace) -> dict[str, Any]:
    rates = []
    index: Index | None = None
    mem_before = 0
    for _ in range(args.rounds):
        if index is not None:
            await index.close()
        await admin.flushall(target_nodes=ClusterClient.PRIMARIES)
        mem_before = await used_memory(admin)
        index = make()
        rates.append(blocks / await ingest(index, batches, args.chunk))
        print(f"{name}: ingest round {rates[-1]:,.0f} blocks/s")
    assert index is not None
    mem_after = await used_memory(admin)
    entries = sum(sum(w.blocks_by_tier.values()) for w in await index.workers(MODEL))
    for keys in queries:  # warm-up, and the answers checked
        await index.score(ScoreQuery(model=MODEL, block_keys=keys))
    mismatches = 0
    for keys, want in zip(queries, expected, strict=True):
        mismatches += answers(await index.score(ScoreQuery(model=MODEL, block_keys=keys))) != want
    await admin.config_resetstat(target_nodes=ClusterClient.PRIMARIES)
    latencies = []
    for _ in range(args.reps):
        for keys in queries:
            start = time.perf_counter()
            await index.score(ScoreQuery(model=MODEL, block_keys=keys))
            latencies.append((time.perf_counter() - start) * 1e6)
    usec = await redis_usec(admin)
    await index.close()
    calls = len(latencies)
    figures = {
        "ingest": statistics.median(rates), "rounds": rates,
        "bytes": (mem_after - mem_before) / max(entries, 1), "entries": entries,
        "p50": statistics.median(latencies), "p99": pct(latencies, 0.99),
        "redis_total": sum(usec.values()) / calls, "redis_max": max(usec.values()) / calls,
        "mismatches": mismatches, "checked": len(queries),
    }
    print(name, {k: (round(v, 1) if isinstance(v, float) else v) for k, v in figures.items()
                 if k != "rounds"})
    return figures


async def run(args: argparse.Namespace, cluster: RedisCluster) -> str:
    workload = make_workload(args.workers, args.blocks, n_queries=args.queries)
    batches = workload.batches(MODEL)
    queries = [block_keys_for_tokens(tokens, 16, MODEL) for tokens in workload.queries]
    memory = MemoryIndex(IndexConfig())
    await ingest(memory, batches, args.chunk)
    expected = [answers(await memory.score(ScoreQuery(model=MODEL, block_keys=keys)))
                for keys in queries]
    admin = ClusterClient.from_url(cluster.url)
    load_before = os.getloadavg()
    try:
        single = await measure("single slot", lambda: RedisClusterIndex.from_url(cluster.url),
                               admin, batches=batches, blocks=workload.blocks,
                               queries=queries, expected=expected, args=args)
        sharded = await measure(
            f"{args.subslots} sub-slots",
            lambda: ShardedRedisIndex.from_url(cluster.url, subslots=args.subslots,
                                               cluster=True),
            admin, batches=batches, blocks=workload.blocks, queries=queries,
            expected=expected, args=args)
    finally:
        await admin.aclose()
    load_after = os.getloadavg()
    rows = [
        ("Redis memory per (block, rank) entry, B", "bytes", ".1f"),
        (f"ingest, blocks/s (median of {args.rounds})", "ingest", ",.0f"),
        ("Score p50, µs (8,192 tokens, one call at a time)", "p50", ",.0f"),
        ("Score p99, µs", "p99", ",.0f"),
        ("redis-server µs per Score, all masters", "redis_total", ",.1f"),
        ("redis-server µs per Score, busiest master", "redis_max", ",.1f"),
    ]
    table = "\n".join(f"| {label} | {single[key]:{fmt}} | {sharded[key]:{fmt}} |"
                      for label, key, fmt in rows)
    return f"""{args.workers} ranks, {workload.blocks:,} blocks, {single['entries']:,} entries,
chunks of {args.chunk} batches, {args.reps} x {args.queries} Scores; load average
{load_before[0]:.2f} before, {load_after[0]:.2f} after. Answers checked against the
in-memory index: single slot {single['mismatches']} / {single['checked']} differ,
{args.subslots} sub-slots {sharded['mismatches']} / {sharded['checked']} differ.

| figure | single slot (RedisClusterIndex) | {args.subslots} sub-slots (ShardedRedisIndex) |
|---|---:|---:|
{table}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=300_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--subslots", type=int, default=3)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-redis-subslots-"))
    cluster = RedisCluster(workdir / "cluster").start()
    try:
        print(asyncio.run(run(args, cluster)))
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
