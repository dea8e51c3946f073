"""Client CPU per Score: the one-slot `RedisIndex` against `ShardedRedisIndex` (S sub-slots),
each on its own plain redis-server, same workload, rounds alternated in one process.

Ingests one generated shared-prefix workload (one model) into both, checks every answer
against the in-memory index, then times `score()` with `time.process_time` (this process's
CPU, the indexer's side of a Score) and `time.perf_counter`, `--rounds` alternations of
`--queries` Scores each. redis-server's own time per Score comes from INFO commandstats.
For same-load A/B of two commits run it from each checkout (PYTHONPATH) back to back.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from bench.redis_cluster import ingest
from bench.workload import make_workload
from indexer.index.memory import MemoryIndex
from indexer.index.protocol import Index, IndexConfig, ScoreQuery
from indexer.index.redis import RedisIndex
from indexer.index.redis_sharded import ShardedRedisIndex
from kvcore.keys import block_keys_for_tokens
from tests.support.servers import RedisServer

MODEL = "bench/model"


def answers(result: Any) -> list[tuple[str, int, int]]:
    return [(s.worker_id, s.dp_rank, s.matched_blocks) for s in result.scores]


async def redis_usec(url: str) -> float:
    client = aioredis.Redis.from_url(url)
    try:
        info = await client.info("commandstats")
    finally:
        await client.aclose()
    return sum(float(v["usec"]) for v in info.values() if isinstance(v, dict))


async def score_round(index: Index, url: str, queries: list[list[int]]) -> dict[str, float]:
    usec = await redis_usec(url)
    cpu = wall = 0.0
    for keys in queries:
        query = ScoreQuery(model=MODEL, block_keys=keys)
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        await index.score(query)
        cpu += time.process_time() - start_cpu
        wall += time.perf_counter() - start_wall
    n = len(queries)
    return {"cpu": cpu / n * 1e6, "wall": wall / n * 1e6,
            "redis": (await redis_usec(url) - usec) / n}


async def run(args: argparse.Namespace, servers: list[RedisServer]) -> None:
    workload = make_workload(args.workers, args.blocks, n_queries=args.queries)
    batches = workload.batches(MODEL)
    queries = [block_keys_for_tokens(tokens, 16, MODEL) for tokens in workload.queries]
    memory = MemoryIndex(IndexConfig())
    await ingest(memory, batches, args.chunk)
    expected = [answers(await memory.score(ScoreQuery(model=MODEL, block_keys=keys)))
                for keys in queries]
    indexes: dict[str, tuple[Index, str]] = {
        "one slot": (RedisIndex.from_url(servers[0].url), servers[0].url),
        f"{args.subslots} sub-slots": (
            ShardedRedisIndex.from_url(servers[1].url, subslots=args.subslots),
            servers[1].url),
    }
    for name, (index, _) in indexes.items():
        await ingest(index, batches, args.chunk)
        wrong = 0
        for keys, want in zip(queries, expected, strict=True):
            wrong += answers(await index.score(ScoreQuery(model=MODEL, block_keys=keys))) != want
        print(f"{name}: {wrong} / {len(queries)} answers differ from the in-memory index")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in indexes}
    load = os.getloadavg()
    for _ in range(args.rounds):
        for name, (index, url) in indexes.items():
            results[name].append(await score_round(index, url, queries))
    for name, rounds in results.items():
        cpu = [r["cpu"] for r in rounds]
        print(f"{name}: client CPU us/Score per round {[round(c) for c in cpu]} "
              f"(median {statistics.median(cpu):.0f}); wall median "
              f"{statistics.median(r['wall'] for r in rounds):.0f} us; redis-server "
              f"{statistics.median(r['redis'] for r in rounds):.1f} us/Score")
    print(f"{args.workers} ranks, {workload.blocks:,} blocks, {args.rounds} x "
          f"{args.queries} Scores; load average {load[0]:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")
    for index, _ in indexes.values():
        await index.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--subslots", type=int, default=3)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-subslot-cpu-"))
    servers = [RedisServer(workdir / str(i)).start() for i in range(2)]
    try:
        asyncio.run(run(args, servers))
    finally:
        for server in servers:
            server.stop()


if __name__ == "__main__":
    main()
