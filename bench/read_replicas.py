"""Redis read replicas: what Score from a replica costs and how stale its answers are
(`make bench-replicas`).

Starts a private redis-server primary and one `--replicaof` replica. Phase 1, under
write load: `RedisIndex.apply` ingests a generated shared-prefix workload into the primary
as fast as it goes while a `ReplicaReadIndex` answers Score alongside, one query after
another: the staleness bound each replica answer declares, and the share of answers the
replica gave. Phase 2, idle: Score p50 / p99 on the primary directly and through the
replica (same queries, same data, after the replica caught up). `--subslots S` (S >= 2):
the same with every model over S sub-slots (`ShardedRedisIndex`, the replica read through
its pipe), written to a section of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from bench.workload import make_workload
from indexer.index.protocol import ScoreQuery
from indexer.index.read_replicas import DEFAULT_MAX_STALENESS_S, ReplicaReadIndex
from indexer.index.redis import RedisIndex
from indexer.index.redis_sharded import ShardedRedisIndex
from kvcore.keys import block_keys_for_tokens
from kvsim.report import pct, write_section
from tests.support.redis_replicas import RedisReplica
from tests.support.servers import RedisServer

MODEL = "bench/replicas"


async def score_under_load(index: ReplicaReadIndex, keys: list[list[int]],
                           stop: asyncio.Event) -> tuple[list[float], int, int]:
    """(staleness of each replica answer in ms, replica answers, primary answers)."""
    staleness: list[float] = []
    primary = 0
    i = 0
    while not stop.is_set():
        result = await index.score(ScoreQuery(model=MODEL, block_keys=keys[i % len(keys)]))
        i += 1
        if result.replica:
            staleness.append(result.staleness_s * 1e3)
        else:
            primary += 1
    return staleness, len(staleness), primary


def primary_index(url: str, subslots: int) -> RedisIndex | ShardedRedisIndex:
    if subslots >= 2:
        return ShardedRedisIndex.from_url(url, subslots=subslots)
    return RedisIndex.from_url(url)


async def timed_scores(score: RedisIndex | ShardedRedisIndex | ReplicaReadIndex,
                       keys: list[list[int]],
                       reps: int) -> list[float]:
    """Score latencies in µs, `reps` passes over `keys` after one warm-up pass."""
    out = []
    for rep in range(reps + 1):
        for query_keys in keys:
            started = time.perf_counter()
            await score.score(ScoreQuery(model=MODEL, block_keys=query_keys))
            if rep:
                out.append((time.perf_counter() - started) * 1e6)
    return out


async def run(args: argparse.Namespace, workdir: Path) -> str:
    workload = make_workload(args.workers, args.blocks, n_queries=args.queries)
    batches = workload.batches(MODEL)
    keys = [block_keys_for_tokens(tokens, 16, MODEL) for tokens in workload.queries]
    primary = RedisServer(workdir / "primary").start()
    replica = RedisReplica(workdir / "replica", primary).start()
    try:
        await replica.wait_in_sync()
        writer = primary_index(primary.url, args.subslots)
        reader = ReplicaReadIndex.from_urls(primary.url, [replica.url], config=writer.config,
                                            primary=primary_index(primary.url, args.subslots))
        await reader.ping()  # starts the probes
        await asyncio.sleep(0.5)
        stop = asyncio.Event()
        scoring = asyncio.create_task(score_under_load(reader, keys, stop))
        started = time.perf_counter()
        for i in range(0, len(batches), args.chunk):
            await writer.apply(batches[i : i + args.chunk])
        ingest_s = time.perf_counter() - started
        stop.set()
        staleness, from_replica, from_primary = await scoring
        await replica.wait_in_sync()
        await asyncio.sleep(0.3)
        on_primary = await timed_scores(writer, keys, args.reps)
        via_replica = await timed_scores(reader, keys, args.reps)
        reads = dict(reader.reads)
        await reader.close()
        await writer.close()
    finally:
        replica.stop()
        primary.stop()
    answers = from_replica + from_primary
    print(f"under load: {answers} answers, {from_replica} from the replica; staleness p50 "
          f"{statistics.median(staleness):.1f} ms, p99 {pct(staleness, 0.99):.1f} ms")
    print(f"idle Score p50/p99: primary {statistics.median(on_primary):.0f}/"
          f"{pct(on_primary, 0.99):.0f} us, replica {statistics.median(via_replica):.0f}/"
          f"{pct(via_replica, 0.99):.0f} us; idle reads {reads}")
    layout = (f"`ShardedRedisIndex`, {args.subslots} sub-slots" if args.subslots >= 2
              else "`RedisIndex`")
    rate = workload.blocks / ingest_s
    rows = "\n".join(f"| {phase} | {figure} | {value} |" for phase, figure, value in (
        (f"ingest into the primary ({rate:,.0f} blocks/s, {ingest_s:.1f} s), Score "
         "alongside", "answers / from the replica", f"{answers:,} / {from_replica:,}"),
        ("", "declared staleness p50 / p99 / max",
         f"{statistics.median(staleness):.1f} / {pct(staleness, 0.99):.1f} / "
         f"{max(staleness):.1f} ms"),
        (f"idle, {args.reps} passes over the queries",
         f"Score p50 / p99 on the primary ({layout})",
         f"{statistics.median(on_primary):,.0f} / {pct(on_primary, 0.99):,.0f} µs"),
        ("", "Score p50 / p99 through the replica (`ReplicaReadIndex`, `EVALSHA_RO`)",
         f"{statistics.median(via_replica):,.0f} / {pct(via_replica, 0.99):,.0f} µs")))
    return f"""Private redis-server primary and one `--replicaof` replica on loopback, one
client process. Workload: {args.workers} workers, {workload.blocks:,} blocks in
{len(batches):,} batches; {len(keys)} queries of 8,192 tokens. Staleness is the bound each
answer declares (`Freshness.index_staleness_seconds`), measured from replication offsets
by probes every 100 ms; limit {DEFAULT_MAX_STALENESS_S:g} s.

| phase | figure | value |
|---|---|---:|
{rows}

The declared staleness is an upper bound, not the replication delay itself: it adds up
to one probe interval (100 ms) and the time the probes wait for this process's event loop,
which the ingest keeps busy here as it does in a consumer process.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=300_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--subslots", type=int, default=1,
                        help=">= 2: every model over that many sub-slots")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        body = asyncio.run(run(args, Path(tmp)))
    if not args.no_write:
        if args.subslots >= 2:
            write_section("replicas-subslots", f"Redis read replicas with {args.subslots} "
                          "sub-slots: Score cost and declared staleness",
                          f"python -m bench.read_replicas --subslots {args.subslots}", body)
        else:
            write_section("replicas", "Redis read replicas: Score cost and declared "
                          "staleness", "make bench-replicas", body)


if __name__ == "__main__":
    main()
