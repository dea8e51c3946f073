"""Redis ingest cost per block: the two sides of `RedisIndex.apply` (issue 18).

Feeds the bench workload (`bench.workload`, shared prefixes) at N ranks to a fresh
`RedisIndex` on a private redis-server, in calls of `--chunk` batches, and prints per
round: blocks/s, this process's CPU time per block (validation, ledgers, records: the
Python side), redis-server's own time in the scripts per block (INFO commandstats) and
its main thread's CPU per block (parsing included), and Redis memory per (block, rank)
entry (used_memory growth).

For a same-load A/B of two checkouts, run it from each in turn (it imports the
checkout in the current directory), e.g.
    (cd /tmp/base && .venv/bin/python /path/to/bench/redis_ingest.py --workers 1024)
`--cache DIR` keeps the generated batches between runs (pickled, keyed by ranks and
blocks). `--module` starts the redis-server with the Redis module loaded
(native/redis_module/kvi.so, `make redis-module`): apply.lua then writes presence with
KVI.HOLDERS; the A/B is this command with and without it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())  # the checkout the command runs from

import redis.asyncio as aioredis

from bench.workload import make_workload
from indexer.index.redis import RedisIndex
from kvcore.bus import EventBatch
from tests.support.servers import RedisServer, kvi_module

MODEL = "bench/model"


def batches_of(workers: int, blocks: int, cache: Path | None) -> tuple[list[EventBatch], int]:
    """The workload's batches and its block count, from `cache` when it holds them."""
    path = cache / f"ingest-{workers}-{blocks}.pickle" if cache else None
    if path is not None and path.exists():
        batches, n = pickle.loads(path.read_bytes())
        return list(batches), int(n)
    workload = make_workload(workers, blocks, n_queries=1)
    found = (workload.batches(MODEL), workload.blocks)
    if path is not None:
        path.write_bytes(pickle.dumps(found))
    return found


async def redis_cpu(admin: aioredis.Redis) -> float:
    info = await admin.info("cpu")
    return float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])


async def one_round(admin: aioredis.Redis, url: str, batches: list[EventBatch], blocks: int,
                    args: argparse.Namespace) -> str:
    await admin.flushdb()
    await admin.config_resetstat()
    mem_before = int((await admin.info("memory"))["used_memory"])
    index = RedisIndex.from_url(url, bucket_load=args.load)
    gc.collect()
    redis_before = await redis_cpu(admin)
    cpu_before, start = time.process_time(), time.perf_counter()
    for i in range(0, len(batches), args.chunk):
        await index.apply(batches[i : i + args.chunk])
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_before
    redis_main = await redis_cpu(admin) - redis_before
    stats = await admin.info("commandstats")
    script_us = int(stats["cmdstat_evalsha"]["usec"])
    module_us = int(stats.get("cmdstat_kvi.holders", {}).get("usec", 0))
    mem = int((await admin.info("memory"))["used_memory"]) - mem_before
    entries = sum(sum(w.blocks_by_tier.values()) for w in await index.workers(MODEL))
    await index.close()
    module = f", KVI.HOLDERS {module_us / blocks:.2f} us of it" if args.module else ""
    return (f"{args.workers:,} ranks, load {args.load}{' + module' if args.module else ''}: "
            f"{blocks / seconds:,.0f} blocks/s; "
            f"per block: Python CPU {cpu * 1e6 / blocks:.2f} us, Redis script "
            f"{script_us / blocks:.2f} us{module} "
            f"(main thread CPU {redis_main * 1e6 / blocks:.2f} us); "
            f"{mem / max(entries, 1):.1f} B per entry ({entries:,} entries)")


async def run(args: argparse.Namespace) -> None:
    batches, blocks = batches_of(args.workers, args.blocks, args.cache)
    modules = (kvi_module(),) if args.module else ()
    server = RedisServer(Path(tempfile.mkdtemp(prefix="bench-ingest-")), modules=modules).start()
    admin = aioredis.Redis.from_url(server.url)
    try:
        for _ in range(args.rounds):
            print(await one_round(admin, server.url, batches, blocks, args), flush=True)
    finally:
        await admin.aclose()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1024)
    parser.add_argument("--blocks", type=int, default=1_000_000)
    parser.add_argument("--load", type=int, default=0, help="bucket load (0: one hash)")
    parser.add_argument("--chunk", type=int, default=256, help="batches per apply() call")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--module", action="store_true",
                        help="load the Redis module (native/redis_module/kvi.so)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="a directory keeping the generated batches between runs")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
