"""Redis backend: ingest rate, Score latency and memory per entry (`make bench-redis`).

Starts a private redis-server (or uses --redis-url: an empty database, which the bench
empties again between its rounds, or any database with --flush), ingests a generated
shared-prefix workload of 64 workers and >= 1M blocks through `RedisIndex.apply` from one
process, then times Score for 8,192-token queries. Targets (issue 2): ingest >= 300k
blocks/s, Score p99 <= 1.5 ms, <= 100 bytes of Redis memory per (block, worker) entry.
Then the pool workload (issue 17): the same steps offloading into one shared pool that
every other worker mounts, <= 100 bytes per (block, owner) entry.

Then the same workload as a hybrid-attention model (issue 17): every store also in a
sliding-window group of 8 blocks that frees what left each chain's window
(`Workload.hybrid_batches`), one ingest round, its memory per entry and its Score.

Then fleet scale (issue 18): the generator at 1,024 and 4,096 ranks (`--scale-workers`),
each at the default bucket load and at 0 (`--scale-loads`): memory per entry (<= 64 B),
ingest (>= 400k blocks/s), Score p99 (<= 1 ms), redis-server's own time per block and per
Score, and every answer of a pass checked against the in-memory index.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from bench.workload import Workload, make_workload, pool_expected, pool_mounts
from indexer.index.memory import MemoryIndex
from indexer.index.protocol import IndexConfig, ScoreQuery
from indexer.index.redis import COMPACT_BUCKET_LOAD, DEFAULT_BUCKET_LOAD, RedisIndex
from kvcore.bus import BlockRemoved, BlockStored, EventBatch
from kvcore.keys import block_keys_for_tokens
from kvcore.pools import KIND_POOL
from kvsim.report import pct, verdict, write_section
from tests.support.servers import RedisServer, kvi_module

MODEL = "bench/model"


class NotEmptyError(RuntimeError):
    """The Redis database the bench was pointed at holds someone else's keys."""



async def ingest_fresh(admin: aioredis.Redis, url: str, batches: list[EventBatch], chunk: int,
                       **index_options: Any) -> tuple[RedisIndex, float, int]:
    """Empty the URL's database (only it: the bench's own keys), then feed `batches` to a
    fresh RedisIndex in calls of `chunk`: the index, the seconds the calls took, and
    used_memory before them."""
    await admin.flushdb()
    mem_before = int((await admin.info("memory"))["used_memory"])
    index = RedisIndex.from_url(url, **index_options)
    gc.collect()
    start = time.perf_counter()
    for i in range(0, len(batches), chunk):
        await index.apply(batches[i : i + chunk])
    return index, time.perf_counter() - start, mem_before

async def check_empty(admin: aioredis.Redis, url: str) -> None:
    """Refuse a database that holds keys: each ingest round starts with FLUSHDB."""
    keys = int(await admin.dbsize())
    if keys:
        raise NotEmptyError(
            f"{url} holds {keys:,} key{'s' if keys != 1 else ''} and every ingest round "
            "empties it (FLUSHDB): point --redis-url at an empty database, or add --flush "
            "if its keys may go")


async def run(args: argparse.Namespace, url: str, *, user_url: bool = False) -> str:
    t0 = time.perf_counter()
    workload = make_workload(args.workers, args.blocks, n_queries=args.queries)
    batches = workload.batches(MODEL)
    print(f"workload: {workload.blocks:,} blocks in {len(batches):,} batches "
          f"({time.perf_counter() - t0:.1f}s to generate)")

    admin = aioredis.Redis.from_url(url)
    if user_url and not args.flush:
        await check_empty(admin, url)
    rates: list[float] = []
    index: RedisIndex | None = None
    for _ in range(args.ingest_rounds):  # each round ingests into an empty Redis
        if index is not None:
            await index.close()
        index, seconds, mem_before = await ingest_fresh(admin, url, batches, args.chunk)
        rates.append(workload.blocks / seconds)
        print(f"ingest round: {rates[-1]:,.0f} blocks/s")
    assert index is not None
    ingest_rate = statistics.median(rates)
    rounds = " / ".join(f"{r:,.0f}" for r in rates)

    mem_after = int((await admin.info("memory"))["used_memory"])
    workers = await index.workers(MODEL)
    entries = sum(sum(w.blocks_by_tier.values()) for w in workers)
    distinct = int(await admin.hget(f"kvi:{{m:{_escape(MODEL)}}}:bk", "count") or 0)
    bytes_per_entry = (mem_after - mem_before) / max(entries, 1)
    print(f"ingest: {ingest_rate:,.0f} blocks/s; {entries:,} entries, {distinct:,} distinct "
          f"blocks; {bytes_per_entry:.1f} bytes per entry")

    queries = workload.queries
    score_only: list[float] = []
    with_hash: list[float] = []
    matched = 0
    plain_answers: list[dict[str, int]] = []
    for rep in range(args.reps + 1):
        for tokens in queries:
            t_hash = time.perf_counter()
            keys = block_keys_for_tokens(tokens, 16, MODEL)
            t_score = time.perf_counter()
            result = await index.score(ScoreQuery(model=MODEL, block_keys=keys))
            t_end = time.perf_counter()
            if rep:  # rep 0 warms up
                score_only.append((t_end - t_score) * 1e6)
                with_hash.append((t_end - t_hash) * 1e6)
                matched += bool(result.scores)
            else:
                plain_answers.append({s.worker_id: s.matched_blocks for s in result.scores})
    await index.close()
    await admin.aclose()
    query_cpu = {name: await query_cpu_per_call(url, queries, pipelined)
                 for name, pipelined in (("one pipelined connection", True),
                                         ("redis-py", False))}
    pool = await pool_workload(args, url, workload, plain_answers)

    hybrid = "" if args.no_hybrid else await run_hybrid(args, url, workload)
    scale = scale_section([await scale_row(args, url, n, load) for n in args.scale_workers
                           for load in args.scale_loads], args) if args.scale_workers else ""
    p50, p99 = statistics.median(score_only), pct(score_only, 0.99)
    h50, h99 = statistics.median(with_hash), pct(with_hash, 0.99)
    print(f"score: p50 {p50:.0f} us, p99 {p99:.0f} us; with hashing p50 {h50:.0f} us, "
          f"p99 {h99:.0f} us; {matched}/{len(score_only)} queries had a hit")
    rows = "\n".join(f"| {k} | {v} |" for k, v in workload.describe().items())
    ingest_ok = verdict(ingest_rate >= 300_000)
    memory_ok = verdict(bytes_per_entry <= 100)
    where = "the --redis-url server" if user_url else "private redis-server, on loopback"
    return f"""Redis {await _redis_version(url)} ({where}), one client process
(redis-py asyncio + hiredis), `RedisIndex.apply` in chunks of {args.chunk} batches (one
pipeline each, one atomic Lua call per batch).

| workload | |
|---|---|
{rows}

| figure | measured | target | |
|---|---:|---:|---|
| ingest, blocks/s (hashing included; median of {len(rates)} rounds: {rounds}) \
| {ingest_rate:,.0f} | >= 300,000 | {ingest_ok} |
| Redis memory per (block, worker) entry | {bytes_per_entry:.1f} B | <= 100 B | {memory_ok} |
| Score p50 (8,192 tokens, {args.workers} workers, {distinct:,} blocks) | {p50:,.0f} us | | |
| Score p99 | {p99:,.0f} us | <= 1,500 us | {verdict(p99 <= 1500)} |
| Score incl. hashing the prompt, p50 / p99 | {h50:,.0f} / {h99:,.0f} us | | |

{pool_section(pool, args)}

Score's connection to Redis: this process's CPU per `RedisIndex.score` and calls/s, with
N queries in flight ({QUERY_CPU_CALLS:,} calls each; Redis's own work is not counted). Over
the pipe a model in one bucket is read by MULTI / EXEC (every key's value comes back and is
cut into runs here), through redis-py by score.lua (runs cut in Redis):

| queries go over | CPU µs/call, 1 in flight | 8 in flight | calls/s, 1 in flight | 8 |
|---|---:|---:|---:|---:|
{query_cpu_rows(query_cpu)}

{entries:,} (block, worker, tier) entries; used_memory grew by {mem_after - mem_before:,} bytes
(presence buckets, per-worker engine-hash maps and ghost lists together). {len(score_only):,} timed
queries ({args.reps} passes over {len(queries)}), {matched:,} with at least one hit.

{hybrid}
{scale}"""


HYBRID_WINDOW_BLOCKS = 8


async def run_hybrid(args: argparse.Namespace, url: str, workload: Workload) -> str:
    """Ingest the hybrid form of `workload` into an emptied database; memory and Score."""
    batches = workload.hybrid_batches(MODEL, HYBRID_WINDOW_BLOCKS)
    window_entries = 0
    for batch in batches:
        for event in batch.events:
            if isinstance(event, BlockStored) and event.group:
                window_entries += len(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                window_entries -= len(event.block_hashes)
    admin = aioredis.Redis.from_url(url)
    index, seconds, mem_before = await ingest_fresh(admin, url, batches, args.chunk)
    rate = workload.blocks / seconds
    mem = int((await admin.info("memory"))["used_memory"]) - mem_before
    pairs = sum(sum(w.blocks_by_tier.values()) for w in await index.workers(MODEL))
    per_pair, per_entry = mem / max(pairs, 1), mem / max(pairs + window_entries, 1)
    lat: list[float] = []
    best: list[int] = []
    keys = [block_keys_for_tokens(tokens, 16, MODEL) for tokens in workload.queries]
    for rep in range(args.reps + 1):
        for query_keys in keys:
            t0 = time.perf_counter()
            result = await index.score(ScoreQuery(model=MODEL, block_keys=query_keys))
            if rep:
                lat.append((time.perf_counter() - t0) * 1e6)
                best.append(max((s.matched_blocks for s in result.scores), default=0))
    await index.close()
    await admin.flushdb()
    await admin.aclose()
    p50, p99 = statistics.median(lat), pct(lat, 0.99)
    print(f"hybrid: {rate:,.0f} blocks/s (of group 0); {per_pair:.1f} bytes per (block, "
          f"worker); score p50 {p50:.0f} us, p99 {p99:.0f} us")
    return f"""### Hybrid model: 2 KV-cache groups, window of {HYBRID_WINDOW_BLOCKS} blocks

The same workload with every store also in a sliding-window group that frees each chain's
blocks once they left the window (`Workload.hybrid_batches`); Score is vLLM's hybrid rule
(group 0's runs from score.lua, then the window group's masks from score_groups.lua as far
as group 0's prefix reaches: a second round trip).

| figure | measured | target | |
|---|---:|---:|---|
| ingest, blocks/s (each block stored in both groups; one round) | {rate:,.0f} | | |
| Redis memory per (block, worker) entry (group 0 holds {pairs:,}) | {per_pair:.1f} B \
| <= 100 B | {verdict(per_pair <= 100)} |
| Redis memory per (block, worker, group) entry ({pairs + window_entries:,}) \
| {per_entry:.1f} B | | |
| Score p50 / p99 (block keys given) | {p50:,.0f} / {p99:,.0f} us | | |
| best match per query, mean blocks | {statistics.mean(best):.0f} | | |
"""


@dataclass
class ScaleRow:
    workers: int
    bucket_load: int
    ingest_rate: float
    apply_us_per_block: float  # redis-server's time in apply.lua, per block
    python_us_per_block: float  # the bench process's CPU time in apply(), per block
    bytes_per_entry: float
    entries: int
    distinct: int
    p50: float
    p99: float
    score_us: float  # redis-server's time per Score (score.lua, or MULTI / EXEC)
    differing: int  # answers unlike the in-memory index's
    checked: int


# What a Score runs as: score.lua, or MULTI / EXEC of plain reads (a model in one
# bucket; EXEC's time includes the commands it runs).
SCORE_COMMANDS = ("cmdstat_evalsha", "cmdstat_multi", "cmdstat_exec")


async def score_usec(admin: aioredis.Redis) -> int:
    """redis-server's time in Score's commands since the last CONFIG RESETSTAT, in us."""
    stats = await admin.info("commandstats")
    return sum(int(stats[name]["usec"]) for name in SCORE_COMMANDS if name in stats)


async def scale_row(args: argparse.Namespace, url: str, workers: int,
                    bucket_load: int) -> ScaleRow:
    """The workload at `workers` ranks, one ingest round into an emptied database: rate,
    redis-server's own time per block and per Score (INFO commandstats, less sensitive
    to the machine's load than wall time), memory per entry, Score latency, and every
    answer of the first pass checked against the in-memory index fed the same batches."""
    workload = make_workload(workers, args.blocks, n_queries=args.queries)
    batches = workload.batches(MODEL)
    admin = aioredis.Redis.from_url(url)
    await admin.config_resetstat()  # apply.lua's time below is this ingest's
    cpu_before = time.process_time()
    index, seconds, mem_before = await ingest_fresh(admin, url, batches, args.chunk,
                                                    bucket_load=bucket_load)
    python_us = (time.process_time() - cpu_before) * 1e6 / workload.blocks
    rate = workload.blocks / seconds
    apply_usec = int((await admin.info("commandstats"))["cmdstat_evalsha"]["usec"])
    mem = int((await admin.info("memory"))["used_memory"]) - mem_before
    entries = sum(sum(w.blocks_by_tier.values()) for w in await index.workers(MODEL))
    distinct = int(await admin.hget(f"kvi:{{m:{_escape(MODEL)}}}:bk", "count") or 0)
    memory = MemoryIndex(IndexConfig())
    await memory.apply(batches)
    keys = [block_keys_for_tokens(tokens, 16, MODEL) for tokens in workload.queries]
    differing = 0
    for query_keys in keys:  # the warm-up pass, checked
        query = ScoreQuery(model=MODEL, block_keys=query_keys)
        got = {(s.worker_id, s.dp_rank, s.matched_blocks)
               for s in (await index.score(query)).scores}
        differing += got != {(s.worker_id, s.dp_rank, s.matched_blocks)
                             for s in (await memory.score(query)).scores}
    del memory
    await admin.config_resetstat()
    lat: list[float] = []
    for _ in range(args.reps):
        for query_keys in keys:
            t0 = time.perf_counter()
            await index.score(ScoreQuery(model=MODEL, block_keys=query_keys))
            lat.append((time.perf_counter() - t0) * 1e6)
    score_us = await score_usec(admin) / max(len(lat), 1)
    await index.close()
    await admin.flushdb()
    await admin.aclose()
    row = ScaleRow(workers, bucket_load, rate, apply_usec / workload.blocks, python_us,
                   mem / max(entries, 1), entries, distinct, statistics.median(lat),
                   pct(lat, 0.99), score_us, differing, len(keys))
    print(f"{workers} ranks, bucket load {bucket_load}: {rate:,.0f} blocks/s "
          f"({row.apply_us_per_block:.2f} us of Redis, {python_us:.2f} us of Python CPU per "
          f"block); "
          f"{row.bytes_per_entry:.1f} bytes per entry; score p50 {row.p50:.0f} us, "
          f"p99 {row.p99:.0f} us ({score_us:.0f} us of Redis); {differing} differ")
    return row


def scale_section(rows: list[ScaleRow], args: argparse.Namespace) -> str:
    lines = "\n".join(
        f"| {r.workers:,} | {r.bucket_load} | {r.entries:,} / {r.distinct:,} | "
        f"{r.bytes_per_entry:.1f} B "
        f"({verdict(r.bytes_per_entry <= 64)}) | {r.ingest_rate:,.0f} "
        f"({verdict(r.ingest_rate >= 400_000)}) | {r.apply_us_per_block:.2f} | "
        f"{r.python_us_per_block:.2f} | "
        f"{r.p50:,.0f} / {r.p99:,.0f} ({verdict(r.p99 <= 1000)}) | {r.score_us:,.0f} | "
        f"{r.differing} of {r.checked} |"
        for r in rows)
    sizes = ", ".join(f"{n:,}" for n in sorted({r.workers for r in rows}))
    return f"""### Fleet scale (issue 18): {sizes} ranks

The same generator at more ranks ({args.blocks:,} blocks stored, {args.queries} queries of
8,192 tokens, {args.reps} timed passes), one ingest round each into an emptied database.
Each size runs at bucket loads {", ".join(str(n) for n in args.scale_loads)} (`--redis-bucket-load`;
0: one presence hash per model). Targets: <= 64 B per entry, >= 400,000 blocks/s, Score
p99 <= 1,000 us. "Redis µs" is
redis-server's own time in the script, or for a Score of a model in one bucket (load 0) in
its MULTI / EXEC (INFO commandstats), "Python µs" the bench process's CPU time in
`RedisIndex.apply` (validation included): the two overlap (calls are pipelined), and on a
loaded machine both move too, if less than wall time. Every answer of a first pass is
compared with the in-memory index fed the same batches.

| ranks | bucket load | entries / distinct blocks | Redis memory per entry \
| ingest, blocks/s | Redis µs per block (apply) | Python µs per block (apply) \
| Score p50 / p99, us | Redis µs per Score | answers differing |
|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
{lines}
"""


QUERY_CPU_CALLS = 3_000
POOL = "shared-fs"


@dataclass
class PoolFigures:
    ingest_rate: float  # worker + pool blocks per second
    pool_blocks: int
    mounting: int
    entries: int
    bytes_per_entry: float
    p50: float
    p99: float
    mismatches: int


async def pool_workload(args: argparse.Namespace, url: str, workload: Workload,
                        plain: list[dict[str, int]]) -> PoolFigures:
    """The same steps, each batch also offloading its blocks into one shared pool, every
    other worker mounting it: ingest, memory per (block, owner) entry (the pool is an
    owner), Score with the mounts; every answer checked against the plain one's
    implication (a mounting worker matches the longest prefix any worker holds)."""
    admin = aioredis.Redis.from_url(url)
    batches = workload.pool_batches(MODEL, POOL)
    index, elapsed, mem_before = await ingest_fresh(admin, url, batches, args.chunk)
    mem_after = int((await admin.info("memory"))["used_memory"])
    listed = await index.workers(MODEL)
    entries = sum(sum(w.blocks_by_tier.values()) for w in listed)
    pool_blocks = sum(w.blocks_by_tier.get("storage", 0) for w in listed
                      if w.kind == KIND_POOL)
    mounts = pool_mounts(args.workers, POOL)
    latencies: list[float] = []
    mismatches = 0
    for rep in range(args.reps + 1):
        for tokens, base in zip(workload.queries, plain, strict=True):
            keys = block_keys_for_tokens(tokens, 16, MODEL)
            t0 = time.perf_counter()
            result = await index.score(ScoreQuery(model=MODEL, block_keys=keys,
                                                  mounts=mounts))
            t1 = time.perf_counter()
            if rep:
                latencies.append((t1 - t0) * 1e6)
            else:
                got = {s.worker_id: s.matched_blocks for s in result.scores}
                want = {k: v for k, v in pool_expected(base, mounts).items() if v}
                mismatches += got != want
    await index.close()
    await admin.flushdb()
    await admin.aclose()
    figures = PoolFigures(
        (workload.blocks + pool_blocks) / elapsed, pool_blocks, len(mounts), entries,
        (mem_after - mem_before) / max(entries, 1), statistics.median(latencies),
        pct(latencies, 0.99), mismatches)
    print(f"pool workload: {figures.ingest_rate:,.0f} blocks/s; pool of {pool_blocks:,} "
          f"blocks; {figures.bytes_per_entry:.1f} bytes per entry; score p50 "
          f"{figures.p50:.0f} us, p99 {figures.p99:.0f} us; mismatches {mismatches}")
    return figures


def pool_section(pool: PoolFigures, args: argparse.Namespace) -> str:
    return f"""Pool workload (shared storage pools): the same steps, each batch also offloading
its blocks into one pool (`{POOL}`, {pool.pool_blocks:,} blocks: every distinct stored
block), {pool.mounting} of {args.workers} workers mounting it; the pool is an owner like a
worker rank ({pool.entries:,} (block, owner, tier) entries). Every answer is checked against
the plain workload's: {pool.mismatches} differ.

| figure | measured | target | |
|---|---:|---:|---|
| ingest, blocks/s (worker + pool blocks, one round) | {pool.ingest_rate:,.0f} | | |
| Redis memory per (block, owner) entry | {pool.bytes_per_entry:.1f} B | <= 100 B \
| {verdict(pool.bytes_per_entry <= 100)} |
| Score p50 / p99 with the mounts (block keys given) | {pool.p50:,.0f} / {pool.p99:,.0f} us \
| | |
| answers differing from the plain answers' implication | {pool.mismatches} | 0 \
| {verdict(pool.mismatches == 0)} |"""


async def query_cpu_per_call(url: str, queries: list[list[int]],
                             pipelined: bool) -> dict[int, tuple[float, float]]:
    """{in flight: (CPU µs per call, calls/s)} of `RedisIndex.score` over the index at
    `url`, with queries pipelined on one connection or sent through redis-py."""
    index = RedisIndex.from_url(url, pipelined_queries=pipelined)
    keys = [block_keys_for_tokens(tokens, 16, MODEL) for tokens in queries]
    out: dict[int, tuple[float, float]] = {}
    for in_flight in (1, 8, 1, 8):  # the first pass of each warms up, the second counts

        async def caller(first: int, step: int) -> None:
            for i in range(first, QUERY_CPU_CALLS, step):
                await index.score(ScoreQuery(model=MODEL, block_keys=keys[i % len(keys)]))

        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(caller(k, in_flight) for k in range(in_flight)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        out[in_flight] = (cpu / QUERY_CPU_CALLS * 1e6, QUERY_CPU_CALLS / wall)
    await index.close()
    return out


def query_cpu_rows(query_cpu: dict[str, dict[int, tuple[float, float]]]) -> str:
    return "\n".join(f"| {name} | {by[1][0]:.0f} | {by[8][0]:.0f} | {by[1][1]:,.0f} "
                     f"| {by[8][1]:,.0f} |" for name, by in query_cpu.items())


def _escape(model: str) -> str:
    from kvcore.bus import escape_token

    return escape_token(model)


async def _redis_version(url: str) -> str:
    client = aioredis.Redis.from_url(url)
    info = await client.info("server")
    await client.aclose()
    return str(info["redis_version"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--ingest-rounds", type=int, default=3, help="median of this many")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--redis-url", default=None,
                        help="an empty Redis database to use (default: a private redis-server)")
    parser.add_argument("--flush", action="store_true",
                        help="let the bench empty a --redis-url database that holds keys")
    parser.add_argument("--no-hybrid", action="store_true",
                        help="leave out the hybrid-model workload")
    parser.add_argument("--scale-workers", type=lambda v: [int(n) for n in v.split(",") if n],
                        default=[1024, 4096],
                        help="rank counts of the fleet-scale rows (comma-separated; '' none)")
    parser.add_argument("--scale-loads", type=lambda v: [int(n) for n in v.split(",") if n],
                        default=[DEFAULT_BUCKET_LOAD, COMPACT_BUCKET_LOAD],
                        help="bucket loads of the fleet-scale rows (--redis-bucket-load)")
    parser.add_argument("--module", action="store_true",
                        help="load the Redis module (native/redis_module/kvi.so) into the "
                             "private redis-server")
    parser.add_argument("--no-write", action="store_true", help="do not update the docs")
    args = parser.parse_args()
    if args.module and args.redis_url:
        parser.error("--module starts the private redis-server: not with --redis-url")
    server = None
    url = args.redis_url
    if url is None:
        modules = (kvi_module(),) if args.module else ()
        server = RedisServer(Path(tempfile.mkdtemp(prefix="bench-redis-")),
                             modules=modules).start()
        url = server.url
    try:
        body = asyncio.run(run(args, url, user_url=server is None))
    except NotEmptyError as exc:
        raise SystemExit(f"bench-redis: {exc}") from None
    finally:
        if server is not None:
            server.stop()
    if args.no_write:
        return
    if args.module:
        body = ("redis-server ran with the Redis module (`--module`, README \"Redis module\"); "
                "the same bench without it is the section above.\n\n" + body)
        write_section("redis-module", "Redis backend with the Redis module",
                      "make bench-redis-module", body)
    else:
        write_section("redis", "Redis backend: ingest, Score, memory", "make bench-redis",
                      body)


if __name__ == "__main__":
    main()
