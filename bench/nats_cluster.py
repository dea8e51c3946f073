"""What three JetStream replicas cost, and what losing a node costs (`make bench-nats-cluster`).

Runs the same ingest, end to end, against one nats-server (1 replica) and a 3-node cluster
(`--stream-replicas 3`): library publishers (one per worker) store chains of 50 blocks as
fast as they go, an in-process indexer (in-memory index) applies them; the figure is
blocks/s from the first store until the index holds every batch. Then, on the cluster,
the event stream's leader is SIGKILLed halfway through a second round: the time from the
kill until the index holds every batch published (before and after it), and whether the
index equals the reference model.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import nats

from indexer.app import IndexerService
from indexer.config import ServiceConfig
from indexer.embedded import EmbeddedNats
from kvcore.bus import STREAM_NAME
from kvcore.runtime import configure_logging
from kvcore.topology import StreamSettings
from kvsim.report import write_section
from tests.support.capture import caught_up, mismatches
from tests.support.chain_fleet import ChainFleet
from tests.support.nats_cluster import NatsCluster

MODEL = "bench/nats-cluster"
PARTITIONS = 4
CHAIN = 50


@asynccontextmanager
async def indexer_on(url: str, replicas: int) -> AsyncIterator[IndexerService]:
    service = IndexerService(ServiceConfig(
        nats_url=url, grpc_listen="", metrics_listen="", partitions=PARTITIONS,
        stream_replicas=replicas, liveness_ttl_s=5.0, liveness_grace_s=3600.0))
    await service.start()
    try:
        yield service
    finally:
        await service.close()


async def until_caught_up(service: IndexerService, fleet: ChainFleet,
                          timeout: float = 300.0) -> None:
    assert service.index is not None
    deadline = time.monotonic() + timeout
    while not await caught_up(service.index, fleet.published, fleet.model):
        if time.monotonic() > deadline:
            raise TimeoutError("the index did not catch up")
        await asyncio.sleep(0.02)


async def ingest_rate(url: str, replicas: int, args: argparse.Namespace) -> float:
    """End-to-end blocks/s: first store until the index holds every batch."""
    async with indexer_on(url, replicas) as service:
        fleet = ChainFleet(url, MODEL, workers=args.workers, chain=CHAIN, stream=StreamSettings(
            partitions=PARTITIONS, replicas=replicas, liveness_ttl_s=5.0))
        await fleet.start()
        try:
            started = time.perf_counter()
            fleet.store(range(args.chains))
            await fleet.flush(300)
            await until_caught_up(service, fleet)
            elapsed = time.perf_counter() - started
        finally:
            await fleet.close()
    return args.workers * args.chains * CHAIN / elapsed


async def leader_loss(cluster: NatsCluster, args: argparse.Namespace) -> dict[str, object]:
    """Kill the event stream's leader mid-round; time until the index is whole again."""
    async with indexer_on(cluster.url, 3) as service:
        fleet = ChainFleet(cluster.url, "bench/leader-loss", workers=args.workers, chain=CHAIN,
                           stream=StreamSettings(partitions=PARTITIONS, replicas=3,
                                                 liveness_ttl_s=5.0))
        await fleet.start()
        nc = await nats.connect(cluster.servers)
        try:
            half = args.chains // 2
            fleet.store(range(half))
            await fleet.flush(300)
            await until_caught_up(service, fleet)
            info = await nc.jetstream().stream_info(STREAM_NAME)
            leader = info.cluster.leader if info.cluster else None
            assert leader is not None
            fleet.store(range(half, half + half // 2))
            rebuilds = service.stats.rebuilds
            cluster.kill(int(leader.removeprefix("n")))
            killed = time.perf_counter()
            fleet.store(range(half + half // 2, args.chains))
            await fleet.flush(300)
            flushed = time.perf_counter() - killed
            await until_caught_up(service, fleet)
            whole = time.perf_counter() - killed
            assert service.index is not None
            wrong = await mismatches(service.index, fleet.published, fleet.model)
            info = await nc.jetstream().stream_info(STREAM_NAME)
            new_leader = info.cluster.leader if info.cluster else None
        finally:
            await nc.close()
            await fleet.close()
    return {"leader": leader, "new_leader": new_leader, "flushed_s": flushed,
            "whole_s": whole, "mismatches": wrong,
            "rebuilds": service.stats.rebuilds - rebuilds,
            "resets": service.stats.consumer_resets}


async def run(args: argparse.Namespace, workdir: Path) -> str:
    single = EmbeddedNats(workdir / "single").start()
    try:
        r1 = await ingest_rate(single.url, 1, args)
    finally:
        single.stop()
    print(f"one server, 1 replica: {r1:,.0f} blocks/s")
    cluster = NatsCluster(workdir / "cluster").start()
    try:
        await cluster.wait_ready(3)
        r3 = await ingest_rate(cluster.url, 3, args)
        print(f"3-node cluster, 3 replicas: {r3:,.0f} blocks/s")
        loss = await leader_loss(cluster, args)
    finally:
        cluster.stop()
    print(f"leader loss: {loss}")
    blocks = args.workers * args.chains * CHAIN
    return f"""{args.workers} library publishers (one per worker) store {args.chains} chains of
{CHAIN} blocks each ({blocks:,} blocks, one batch per chain) as fast as they go; one
in-process indexer (in-memory index, {PARTITIONS} partitions) applies them. All servers on
this machine's loopback; the cluster's three nats-servers share its 2 cores with the
publishers and the indexer.

| NATS | stream replicas | end to end, blocks/s |
|---|---:|---:|
| one nats-server | 1 | {r1:,.0f} |
| 3-node cluster | 3 | {r3:,.0f} |

Leader loss (3-node cluster, 3 replicas): the event stream's leader ({loss['leader']}) is
SIGKILLed after the first half of the chains is indexed and a quarter more is in flight;
the last quarter is stored right after the kill. New leader {loss['new_leader']}; every
publisher's batches acknowledged {loss['flushed_s']:.1f} s after the kill, the index
holding every batch {loss['whole_s']:.1f} s after it; (phantom, missing, differing)
blocks against the reference model: {loss['mismatches']}. Most of that time, consumers
whose JetStream requests were waiting on the lost leader sit out the client's 5 s request
timeout and are restarted with backoff (`task_interrupted`); they resume from their
durable positions, which the cluster kept ({loss['rebuilds']} partition rebuilds after the
kill). Deliveries lost with the node (sent through it, never received) made
{loss['resets']} durable consumers be re-created from their last acknowledged sequence
(`partition_consumer_reset`) instead of waiting out the 30 s ack wait.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--chains", type=int, default=200)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    configure_logging("json", "error")
    with tempfile.TemporaryDirectory() as tmp:
        body = asyncio.run(run(args, Path(tmp)))
    if not args.no_write:
        write_section("nats-cluster", "NATS JetStream cluster: three replicas, and a node lost",
                      "make bench-nats-cluster", body)


if __name__ == "__main__":
    main()
