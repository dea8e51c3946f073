"""What dead models cost an idle indexer: CPU and GetStats latency with 2,000 models whose
workers went away, before and after liveness expires them (`make bench-dead-models`).

    python -m bench.dead_models [--models 2000] [--window 10]

A real `kv-indexer serve` (`IndexerService`: Redis index, liveness, metrics, gRPC, idle
consumers) runs in this process on a private redis-server and nats-server. One live model
(4 workers, 4,096 blocks each) is written to the index beside `--models` models with one
worker of 16 blocks each, as an earlier indexer process would have left them; every worker
has a liveness entry. Figures per state: this process's CPU and redis-server's over
`--window` seconds of idling (liveness sweeps every second, metrics every 2 s), GetStats and
ListWorkers latency (30 calls each, one at a time), one `workers()` call.

States: (1) every worker registered; (2) the dead models' workers deleted their liveness
entries and liveness removed them (their models go with them); (3) after a restart with
`--models` models left listed without any rank, as older versions left them (liveness drops
them at its first sweep).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import msgspec
import nats
import redis.asyncio as aioredis

from indexer._proto.kvindex.v1 import indexer_pb2 as pb
from indexer._proto.kvindex.v1 import indexer_pb2_grpc as pb_grpc
from indexer.app import IndexerService
from indexer.config import ServiceConfig
from indexer.embedded import EmbeddedNats
from indexer.index.layouts import model_prefix
from indexer.index.redis import MODELS_KEY, RedisIndex
from kvcore.bus import SCHEMA_VERSION, BlockStored, EventBatch, pack_tokens
from kvcore.runtime import configure_logging
from kvcore.topology import WorkerRecord, ensure_liveness_bucket, liveness_key
from kvsim.report import write_section
from tests.support.servers import RedisServer

LIVE_MODEL = "bench/live"
LIVE_WORKERS = 4
LIVE_BLOCKS = 4_096
DEAD_BLOCKS = 16
BLOCK = 16
TTL_S = 600.0  # the dead models' entries are written once: they must outlive state (1)
GRACE_S = 3.0
CALLS = 30
HEADER = ("| state | models listed | Redis keys | indexer CPU | redis-server CPU "
          "| GetStats p50 / max ms | ListWorkers p50 ms | `workers()` ms |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|")


@dataclass
class State:
    name: str
    models: int
    keys: int
    workers_ms: float
    get_stats_ms: tuple[float, float]  # p50, max
    list_workers_ms: float
    cpu_pct: float
    redis_cpu_pct: float


def store_batch(model: str, worker: str, blocks: int, first_token: int) -> EventBatch:
    tokens = list(range(first_token, first_token + blocks * BLOCK))
    return EventBatch(schema=SCHEMA_VERSION, model=model, worker_id=worker, dp_rank=0,
                      epoch=1, seq=0, ts=time.time(),
                      events=[BlockStored(block_hashes=list(range(1, blocks + 1)),
                                          token_ids=pack_tokens(tokens), block_size=BLOCK)])


def dead_model(i: int) -> str:
    return f"bench/dead-{i}"


async def eventually(check: Callable[[], Awaitable[bool]], what: str,
                     timeout: float = 300.0) -> float:
    """Seconds until the async predicate holds (raises after `timeout`)."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if await check():
            return time.perf_counter() - started
        await asyncio.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


async def redis_cpu_s(admin: aioredis.Redis) -> float:
    info = await admin.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def measure(name: str, svc: IndexerService, admin: aioredis.Redis,
                  window_s: float) -> State:
    assert svc.index is not None
    models = int(await admin.scard(MODELS_KEY))
    keys = int(await admin.dbsize())
    # Idle: only the service's own periodic work runs while this task sleeps.
    redis_before, cpu_before, wall_before = (await redis_cpu_s(admin), time.process_time(),
                                             time.perf_counter())
    await asyncio.sleep(window_s)
    wall = time.perf_counter() - wall_before
    cpu_pct = (time.process_time() - cpu_before) / wall * 100
    redis_pct = (await redis_cpu_s(admin) - redis_before) / wall * 100
    started = time.perf_counter()
    await svc.index.workers()
    workers_ms = (time.perf_counter() - started) * 1e3
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{svc.grpc_port}")
    stub = pb_grpc.KvIndexerStub(channel)
    get_stats: list[float] = []
    list_workers: list[float] = []
    for _ in range(CALLS):
        started = time.perf_counter()
        await stub.GetStats(pb.GetStatsRequest(), timeout=30)
        get_stats.append((time.perf_counter() - started) * 1e3)
        started = time.perf_counter()
        await stub.ListWorkers(pb.ListWorkersRequest(), timeout=30)
        list_workers.append((time.perf_counter() - started) * 1e3)
    await channel.close()
    state = State(name, models, keys, workers_ms,
                  (statistics.median(get_stats), max(get_stats)),
                  statistics.median(list_workers), cpu_pct, redis_pct)
    print(f"{name}: {state}")
    return state


def service(nats_url: str, redis_url: str) -> IndexerService:
    return IndexerService(ServiceConfig(
        nats_url=nats_url, redis_url=redis_url, grpc_listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0", liveness_ttl_s=TTL_S, liveness_grace_s=GRACE_S))


async def started(svc: IndexerService) -> IndexerService:
    await svc.start()

    async def ready() -> bool:  # every partition leased and consuming: steady idling
        return len(svc.consumers()) == svc.config.partitions and not svc.rebuilding

    await eventually(ready, "the consumers")
    return svc


async def run(args: argparse.Namespace, nats_url: str, redis_url: str) -> str:
    admin = aioredis.Redis.from_url(redis_url)
    nc = await nats.connect(nats_url)
    kv = await ensure_liveness_bucket(nc.jetstream(), TTL_S)
    live = [(LIVE_MODEL, f"live-{w}") for w in range(LIVE_WORKERS)]
    dead = [(dead_model(i), f"gone-{i}") for i in range(args.models)]
    async def register(model: str, worker: str) -> None:
        await kv.put(liveness_key(model, worker), msgspec.json.encode(
            WorkerRecord(model=model, worker_id=worker, block_size=BLOCK)))

    async def keep_live_workers_alive() -> None:  # as their publishers do, every TTL / 3
        while True:
            for model, worker in live:
                await register(model, worker)
            await asyncio.sleep(TTL_S / 3)

    for model, worker in dead:
        await register(model, worker)
    keepalive = asyncio.create_task(keep_live_workers_alive())

    svc = await started(service(nats_url, redis_url))
    assert svc.liveness is not None
    watcher = svc.liveness

    async def all_registered() -> bool:
        return all(watcher.is_live(m, w) for m, w in live + dead)

    await eventually(all_registered, "the liveness entries")
    # The index as an earlier process left it (written straight to Redis).
    writer = RedisIndex.from_url(redis_url)
    await writer.apply([store_batch(LIVE_MODEL, w, LIVE_BLOCKS, 1_000_000 * k)
                        for k, (_, w) in enumerate(live)])
    batches = [store_batch(m, w, DEAD_BLOCKS, 10_000 * i) for i, (m, w) in enumerate(dead)]
    for start in range(0, len(batches), 256):
        await writer.apply(batches[start : start + 256])
    await writer.close()

    states = [await measure(f"{args.models:,} models, each with its worker registered", svc,
                            admin, args.window)]

    deleted = time.perf_counter()
    for model, worker in dead:
        await kv.delete(liveness_key(model, worker))

    async def expired() -> bool:
        return int(await admin.scard(MODELS_KEY)) == 1 and watcher.removed == args.models

    await eventually(expired, "the dead models' expiry")
    expiry_s = time.perf_counter() - deleted
    states.append(await measure("after their workers went away and liveness removed them",
                                svc, admin, args.window))
    await svc.close()

    # An older version's leftovers: models listed with their allocation keys, no rank.
    pipe = admin.pipeline(transaction=False)
    for i in range(args.models):
        prefix = model_prefix(dead_model(i))
        pipe.sadd(MODELS_KEY, dead_model(i))
        pipe.set(prefix + "slotver", 2)
        pipe.set(prefix + "nextslot", 1)
        pipe.zadd(prefix + "free", {"0": 0})
        pipe.set(prefix + "block_size", BLOCK)
    await pipe.execute()
    left_models, left_keys = int(await admin.scard(MODELS_KEY)), int(await admin.dbsize())
    restarted = time.perf_counter()
    svc = await started(service(nats_url, redis_url))

    async def dropped() -> bool:
        return int(await admin.scard(MODELS_KEY)) == 1

    await eventually(dropped, "the leftovers' removal")
    drop_s = time.perf_counter() - restarted
    states.append(await measure(f"after a restart over {args.models:,} leftover models",
                                svc, admin, args.window))
    await svc.close()
    keepalive.cancel()
    await nc.close()
    await admin.aclose()
    return report(args, states, expiry_s, drop_s, left_models=left_models, left_keys=left_keys)


def report(args: argparse.Namespace, states: list[State], expiry_s: float, drop_s: float,
           *, left_models: int, left_keys: int) -> str:
    rows = "\n".join(
        f"| {s.name} | {s.models:,} | {s.keys:,} | {s.cpu_pct:.1f}% | {s.redis_cpu_pct:.1f}% "
        f"| {s.get_stats_ms[0]:.1f} / {s.get_stats_ms[1]:.1f} | {s.list_workers_ms:.1f} "
        f"| {s.workers_ms:.1f} |" for s in states)
    return f"""A `kv-indexer serve` process (`IndexerService`: Redis index, liveness sweeping
every second, metrics refreshed every 2 s, gRPC, idle consumers) on a private redis-server
and nats-server. One live model ({LIVE_WORKERS} workers x {LIVE_BLOCKS:,} blocks) beside
{args.models:,} models with one worker of {DEAD_BLOCKS} blocks each. CPU: this process and
redis-server while the service idles for {args.window:g} s; GetStats and ListWorkers: {CALLS}
calls each, one at a time, over loopback; `workers()`: one call.

{HEADER}
{rows}

The dead models' workers deleted their liveness entries; {expiry_s:.1f} s later (grace
{GRACE_S:g} s included) liveness had removed all {args.models:,} and the models with them.
A restart over {left_models:,} listed models ({left_keys:,} keys) left without a rank, as
older versions left them: {drop_s:.1f} s from the start of the service until its first
liveness sweep had dropped them (start-up included). State (3) is a second service started
in the same process after the first one closed.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=2_000, help="dead models")
    parser.add_argument("--window", type=float, default=10.0,
                        help="seconds of idling measured per state")
    args = parser.parse_args()
    configure_logging("json", "warning")
    tmp = Path(tempfile.mkdtemp(prefix="bench-dead-models-"))
    nats_server = EmbeddedNats(tmp / "nats").start()
    redis_server = RedisServer(tmp / "redis").start()
    try:
        body = asyncio.run(run(args, nats_server.url, redis_server.url))
    finally:
        redis_server.stop()
        nats_server.stop()
    write_section("dead-models", "Dead models: idle CPU and GetStats", "make bench-dead-models",
                  body)


if __name__ == "__main__":
    main()
