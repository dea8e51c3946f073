"""What the marker copies on every master cost ingest (`make bench-redis-markers`).

A partition's consumer writes its `position.<p>` marker once per fetch (up to
`--fetch-batch` messages, the consumer's default), after applying it. On Redis Cluster
that is one SET on one master with a single key, one SET per master with the copies
(indexer/index/redis_markers.py). This starts a private 3-master cluster, times both
writes alone, then ingests the same workload as a consumer does (apply a fetch, write the
position) with each, on both cluster layouts (`RedisClusterIndex`, `ShardedRedisIndex`
with 3 sub-slots), and prints the figures (no docs table: the lead re-runs benches).
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

from redis.asyncio.cluster import RedisCluster as ClusterClient

from bench.workload import make_workload
from indexer.index.redis import get_marker, set_marker
from indexer.index.redis_cluster import RedisClusterIndex
from indexer.index.redis_markers import ClusterMarkers
from indexer.index.redis_sharded import ShardedRedisIndex
from kvcore.bus import EventBatch
from tests.support.redis_cluster import RedisCluster

MODEL = "bench/model"
Writer = Callable[[str, str], Awaitable[None]]


async def per_call_us(call: Callable[[int], Awaitable[Any]], calls: int) -> float:
    await call(0)  # the slot map, connections
    start = time.perf_counter()
    for i in range(calls):
        await call(i)
    return (time.perf_counter() - start) / calls * 1e6


async def marker_calls(url: str, calls: int) -> dict[str, float]:
    client = ClusterClient.from_url(url)
    markers = ClusterMarkers(client)
    try:
        return {
            "set_one": await per_call_us(
                lambda i: set_marker(client, "position.0", str(i)), calls),
            "set_copies": await per_call_us(lambda i: markers.set("position.0", str(i)), calls),
            "get_one": await per_call_us(lambda i: get_marker(client, "position.0"), calls),
            "get_copies": await per_call_us(lambda i: markers.get("position.0"), calls),
        }
    finally:
        await client.aclose()


async def consume(index: Any, batches: list[EventBatch], fetch: int, write: Writer) -> float:
    """Blocks/s of applying `batches` a fetch at a time, each followed by its position."""
    start = time.perf_counter()
    for i in range(0, len(batches), fetch):
        await index.apply(batches[i : i + fetch])
        await write("position.0", str(i + fetch))
    return time.perf_counter() - start


async def ingest_rates(url: str, layout: str, batches: list[EventBatch], blocks: int,
                       args: argparse.Namespace) -> dict[str, float]:
    admin = ClusterClient.from_url(url)
    rates: dict[str, list[float]] = {"one": [], "copies": []}
    try:
        for _ in range(args.rounds):
            for how, found in rates.items():
                await admin.flushall(target_nodes=ClusterClient.PRIMARIES)
                index: Any = (RedisClusterIndex.from_url(url) if layout == "cluster" else
                              ShardedRedisIndex.from_url(url, subslots=3, cluster=True))
                client = index._redis

                async def single(name: str, value: str, client: Any = client) -> None:
                    await set_marker(client, name, value)

                write = single if how == "one" else index.set_marker
                found.append(blocks / await consume(index, batches, args.fetch_batch,
                                                         write))
                await index.close()
    finally:
        await admin.aclose()
    return {how: statistics.median(values) for how, values in rates.items()}


async def run(args: argparse.Namespace, cluster: RedisCluster) -> None:
    calls = await marker_calls(cluster.url, args.calls)
    print("marker call, µs (one key on one master / a copy on each of 3 masters):")
    print(f"  set {calls['set_one']:.0f} / {calls['set_copies']:.0f}, "
          f"get {calls['get_one']:.0f} / {calls['get_copies']:.0f}")
    workload = make_workload(args.workers, args.blocks, n_queries=1)
    batches = workload.batches(MODEL)
    fetches = -(-len(batches) // args.fetch_batch)
    print(f"ingest: {len(batches)} batches, {workload.blocks} blocks, {fetches} fetches of "
          f"{args.fetch_batch}, a position write after each; median of {args.rounds}")
    for layout in ("cluster", "subslots"):
        rates = await ingest_rates(cluster.url, layout, batches, workload.blocks, args)
        print(f"  {layout}: one key {rates['one']:,.0f} blocks/s, copies "
              f"{rates['copies']:,.0f} blocks/s ({rates['copies'] / rates['one']:.3f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=200_000)
    parser.add_argument("--fetch-batch", type=int, default=512)
    parser.add_argument("--calls", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cluster = RedisCluster(Path(tempfile.mkdtemp(prefix="bench-redis-markers-")) / "cluster")
    cluster.start()
    try:
        asyncio.run(run(args, cluster))
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
