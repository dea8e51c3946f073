"""Redis Cluster vs one Redis node: ingest rate and Score latency (`make bench-redis-cluster`).

Starts a private redis-server and a private Redis Cluster (3 masters, a replica each, on
loopback), ingests the same generated shared-prefix workload into each from one process
(`RedisIndex` on the single node, `RedisClusterIndex` on the cluster; one model, so one
master does the cluster's work, then the same workload split over three models, one per
master), and times Score for 8,192-token queries one at a time and 8 in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.workload import make_workload
from indexer.index.protocol import Index, ScoreQuery
from indexer.index.redis import RedisIndex
from indexer.index.redis_cluster import RedisClusterIndex
from kvcore.bus import EventBatch
from kvcore.keys import block_keys_for_tokens
from kvsim.report import pct, write_section
from tests.support.redis_cluster import RedisCluster
from tests.support.servers import RedisServer

IN_FLIGHT_CALLS = 2_000


def model_names(count: int) -> list[str]:
    """`count` model names whose hash slots fall in different thirds of the slot space
    (one per master of a fresh 3-master cluster)."""
    from redis.crc import key_slot

    from indexer.index.layouts import model_prefix

    picked: dict[int, str] = {}
    i = 0
    while len(picked) < count:
        name = f"bench/model-{i}"
        picked.setdefault(key_slot(model_prefix(name).encode()) * 3 // 16384, name)
        i += 1
    return [picked[k] for k in sorted(picked)][:count]


async def ingest(index: Index, batches: list[EventBatch], chunk: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(batches), chunk):
        await index.apply(batches[i : i + chunk])
    return time.perf_counter() - start


async def score_latencies(index: Index, model: str, queries: list[list[int]],
                          reps: int) -> list[float]:
    keys = [block_keys_for_tokens(tokens, 16, model) for tokens in queries]
    out = []
    for rep in range(reps + 1):
        for query in keys:
            start = time.perf_counter()
            await index.score(ScoreQuery(model=model, block_keys=query))
            if rep:  # rep 0 warms up
                out.append((time.perf_counter() - start) * 1e6)
    return out


async def calls_per_s(index: Index, model: str, queries: list[list[int]]) -> float:
    keys = [block_keys_for_tokens(tokens, 16, model) for tokens in queries]

    async def caller(first: int) -> None:
        for i in range(first, IN_FLIGHT_CALLS, 8):
            await index.score(ScoreQuery(model=model, block_keys=keys[i % len(keys)]))

    start = time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(8)))
    return IN_FLIGHT_CALLS / (time.perf_counter() - start)


async def measure(make: type[RedisIndex], url: str, args: argparse.Namespace,
                  flush: Callable[[], Awaitable[Any]]) -> dict[str, float]:
    workload = make_workload(args.workers, args.blocks, n_queries=args.queries)
    models = model_names(3)
    one = workload.batches(models[0])
    thirds = make_workload(args.workers, args.blocks // 3, n_queries=1)
    per_model = [thirds.batches(model) for model in models]
    spread = [b for step in zip(*per_model, strict=False) for b in step]  # interleaved
    figures: dict[str, float] = {}
    rates, spread_rates = [], []
    for _ in range(args.rounds):
        await flush()
        index = make.from_url(url)
        rates.append(workload.blocks / await ingest(index, one, args.chunk))
        await index.close()
        await flush()
        index = make.from_url(url)
        spread_rates.append(3 * thirds.blocks / await ingest(index, spread, args.chunk))
        if _ < args.rounds - 1:
            await index.close()
    await index.close()
    await flush()
    index = make.from_url(url)
    await ingest(index, one, args.chunk)
    latencies = await score_latencies(index, models[0], workload.queries, args.reps)
    figures["ingest"] = statistics.median(rates)
    figures["ingest_spread"] = statistics.median(spread_rates)
    figures["p50"] = statistics.median(latencies)
    figures["p99"] = pct(latencies, 0.99)
    figures["calls8"] = await calls_per_s(index, models[0], workload.queries)
    await index.close()
    print(make.__name__, {k: round(v) for k, v in figures.items()})
    return figures


async def run(args: argparse.Namespace, single: RedisServer, cluster: RedisCluster) -> str:
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import RedisCluster as ClusterClient

    single_admin = aioredis.Redis.from_url(single.url)
    cluster_admin = ClusterClient.from_url(cluster.url)
    try:
        plain = await measure(RedisIndex, single.url, args, single_admin.flushall)
        clustered = await measure(RedisClusterIndex, cluster.url, args, cluster_admin.flushall)
    finally:
        await single_admin.aclose()
        await cluster_admin.aclose()
    rows = [
        ("ingest, one model (one master busy), blocks/s", "ingest", ",.0f"),
        ("ingest, three models (one per master), blocks/s", "ingest_spread", ",.0f"),
        ("Score p50, µs (8,192 tokens, one call at a time)", "p50", ",.0f"),
        ("Score p99, µs", "p99", ",.0f"),
        ("Score calls/s, 8 in flight", "calls8", ",.0f"),
    ]
    table = "\n".join(f"| {name} | {plain[key]:{fmt}} | {clustered[key]:{fmt}} | "
                      f"{clustered[key] / plain[key]:.2f}x |" for name, key, fmt in rows)
    return f"""One client process, private servers on loopback (the cluster: 3 masters, a replica
each). `RedisIndex` on one redis-server (its queries pipelined on one connection) against
`RedisClusterIndex` on the cluster (apply pipelined on one connection per master, Score on
one pipelined connection per master; topology from redis-py's cluster client);
{args.workers} workers,
{args.blocks:,} blocks, chunks of {args.chunk} batches, ingest the median of {args.rounds}
rounds, Score over {args.reps} passes of {args.queries} queries. Client and servers share
the machine (the cluster run has 6 redis-servers, masters and replicas), so on a small
machine replication competes with the client for CPU.

| figure | one node | cluster | cluster / one node |
|---|---:|---:|---:|
{table}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=300_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=256)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-redis-cluster-"))
    single = RedisServer(workdir / "single").start()
    cluster = RedisCluster(workdir / "cluster").start()
    try:
        body = asyncio.run(run(args, single, cluster))
    finally:
        single.stop()
        cluster.stop()
    write_section("redis-cluster", "Redis Cluster vs one Redis node: ingest, Score",
                  "make bench-redis-cluster", body)


if __name__ == "__main__":
    main()
