"""Rebuild time of a ~1M-block Redis index: from snapshot + stream tail, and from a full
stream replay; the snapshot's size.

    python -m bench.rebuild [--blocks 1000000]

The workload's bus batches are published straight into a private JetStream, an indexer
(Redis backend) consumes them and snapshots every partition, a tail of further batches is
published, and the indexer stops. Redis is then emptied and a new indexer rebuilds
(snapshot + tail); then snapshots are deleted, Redis emptied again, and it rebuilds from
the whole stream.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import nats
import redis.asyncio as aioredis

from bench.workload import make_workload
from indexer.app import IndexerService
from indexer.config import ServiceConfig
from indexer.embedded import EmbeddedNats
from kvcore.bus import EventBatch, block_count, encode_batch, msg_id, subject_for
from kvcore.runtime import configure_logging
from kvcore.topology import StreamSettings, ensure_stream
from kvsim.report import verdict, write_section
from tests.support.servers import RedisServer

MODEL = "bench/rebuild"


async def publish(nats_url: str, batches: list[EventBatch]) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    futures = []
    for batch in batches:
        futures.append(await js.publish_async(
            subject_for(batch.model, batch.worker_id), encode_batch(batch),
            headers={"Nats-Msg-Id": msg_id(batch.worker_id, batch.dp_rank, batch.epoch,
                                           batch.seq)}))
        if len(futures) >= 2000:
            await asyncio.gather(*futures)
            futures.clear()
    await asyncio.gather(*futures)
    await nc.close()


async def run_until_caught_up(config: ServiceConfig, blocks: int) -> tuple[IndexerService,
                                                                           float]:
    service = IndexerService(config)
    started = time.perf_counter()
    await service.start()
    while service.rebuilding or service.stats.blocks_seen < blocks:
        await asyncio.sleep(0.02)
    return service, time.perf_counter() - started


async def measure(args: argparse.Namespace, nats_url: str, redis_url: str) -> dict[str, float]:
    workload = make_workload(64, args.blocks, n_queries=1)
    batches = workload.batches(MODEL)
    n_tail = max(1, len(batches) // 20)
    head, tail = batches[:-n_tail], batches[-n_tail:]
    head_blocks = _blocks(head)
    tail_blocks = workload.blocks - head_blocks
    config = ServiceConfig(nats_url=nats_url, redis_url=redis_url, grpc_listen="",
                           metrics_listen="", partitions=args.partitions,
                           snapshot_every_batches=10**9, snapshot_every_s=10**9,
                           stream_max_bytes=8 << 30, liveness_grace_s=10**6)
    nc = await nats.connect(nats_url)
    await ensure_stream(nc.jetstream(), StreamSettings(partitions=args.partitions,
                                                       max_bytes=8 << 30))
    await nc.close()
    t0 = time.perf_counter()
    await publish(nats_url, head)
    print(f"published {len(head):,} batches ({head_blocks:,} blocks) in "
          f"{time.perf_counter() - t0:.1f}s")

    # 1. full replay: an indexer with an empty Redis and no snapshot reads the whole stream
    service, full_s = await run_until_caught_up(config, head_blocks)
    print(f"rebuild from full replay: {full_s:.1f}s")
    # 2. snapshots of every partition (the stream is purged below them)
    snap_bytes = 0
    t0 = time.perf_counter()
    for consumer in service.consumers():
        snap_bytes += await consumer.snapshot()
    snapshot_s = time.perf_counter() - t0
    await service.close()
    print(f"snapshots {snap_bytes / 1e6:.1f} MB in {snapshot_s:.1f}s")
    # 3. a tail after the snapshots; Redis emptied; a new indexer rebuilds
    await publish(nats_url, tail)
    admin = aioredis.Redis.from_url(redis_url)
    await admin.flushall()
    await admin.aclose()
    service, from_snapshot_s = await run_until_caught_up(config, tail_blocks)
    await service.close()
    print(f"rebuild from snapshot + tail: {from_snapshot_s:.1f}s")
    return {"blocks": float(workload.blocks), "head": float(head_blocks),
            "tail": float(tail_blocks), "snapshot_bytes": float(snap_bytes),
            "snapshot_s": snapshot_s, "from_snapshot_s": from_snapshot_s, "full_s": full_s}


def _blocks(batches: list[EventBatch]) -> int:
    return sum(block_count(b) for b in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=4)
    args = parser.parse_args()
    configure_logging("json", "warning")
    tmp = Path(tempfile.mkdtemp(prefix="bench-rebuild-"))
    nats_server = EmbeddedNats(tmp / "nats").start()
    redis_server = RedisServer(tmp / "redis").start()
    try:
        r = asyncio.run(measure(args, nats_server.url, redis_server.url))
    finally:
        nats_server.stop()
        redis_server.stop()
    ok = verdict(r["from_snapshot_s"] <= 10)
    body = f"""Redis backend, {args.partitions} partitions, 64 workers; the index holds
{r['blocks']:,.0f} blocks ({r['head']:,.0f} in the snapshots, {r['tail']:,.0f} in the tail of
about 5% of the batches). Private nats-server and redis-server on the same 2 cores. Times run
from process start until every partition is rebuilt and has applied the whole stream.

| figure | measured | target | |
|---|---:|---:|---|
| rebuild from snapshot + tail | {r['from_snapshot_s']:.1f} s | <= 10 s | {ok} |
| rebuild from a full stream replay ({r['head']:,.0f} blocks) | {r['full_s']:.1f} s | | |
| snapshot size (all partitions) | {r['snapshot_bytes'] / 1e6:.1f} MB | | |
| taking the snapshots | {r['snapshot_s']:.1f} s | | |
"""
    write_section("rebuild", "Recovery: rebuild a 1M-block index", "make bench-rebuild", body)


if __name__ == "__main__":
    main()
