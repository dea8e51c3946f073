"""Deliveries a partition's durable consumer made that never reach the indexer (the pull
request they answered went through a NATS node that died, or a connection that dropped)
neither wait out JetStream's ack wait (30 s) nor get acknowledged unread by the next
AckAll: the consumer is re-created from the last sequence acknowledged, and the index gets
every batch, in order, within seconds. The lost deliveries are made by a second client
pulling from the same durable consumer and vanishing without an ack."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError

from indexer.app import IndexerService
from indexer.ingest.recovery import partition_of
from kvcore.bus import STREAM_NAME
from kvcore.topology import consumer_name, partition_filter
from tests.support.event_path import MODEL, PARTITIONS, matched, publisher, service_config, store
from tests.support.polling import equals, eventually
from tests.support.servers import RedisServer

pytestmark = pytest.mark.integration

BLOCKS = 8
ACK_WAIT_S = 30.0  # ConsumerSettings.ack_wait_s: what a stranded delivery would wait


async def steal(nats_url: str, partition: int, ready: asyncio.Event | None = None) -> list[Msg]:
    """Pull from the partition's durable consumer as a second client, then disconnect
    without acknowledging anything."""
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.jetstream().pull_subscribe(
            partition_filter(partition), durable=consumer_name(partition), stream=STREAM_NAME)
        fetch = asyncio.create_task(sub.fetch(BLOCKS, timeout=3.0))
        await asyncio.sleep(0.1)  # the pull request is waiting at the server
        if ready is not None:
            ready.set()
        with contextlib.suppress(NatsTimeoutError, TimeoutError):
            return await fetch
        return []
    finally:
        await nc.close()


class TestStrandedDeliveries:
    async def test_deliveries_to_a_vanished_client(self, nats_url: str) -> None:
        """Batches 2..8 (one block each) are published while a second client's pull
        request waits beside the indexer's: the ones it takes are never acknowledged. The
        index still gets all eight well inside the ack wait, with no sequence gap (no
        batch acknowledged unread and resynced afterwards)."""
        svc = IndexerService(service_config(nats_url))
        await svc.start()
        try:
            async with publisher(nats_url) as pub:
                store(pub, 1, 1)
                await pub.flush()
                await eventually(lambda: equals(matched(svc), 1))
                ready = asyncio.Event()
                partition = partition_of(MODEL, "w1", PARTITIONS)
                thief = asyncio.create_task(steal(nats_url, partition, ready))
                await ready.wait()
                for block in range(2, BLOCKS + 1):
                    store(pub, block, block)
                    await pub.flush()
                stolen = await thief
                assert stolen, "the second client got no delivery: nothing was stranded"
                loop = asyncio.get_running_loop()
                started = loop.time()
                await eventually(lambda: equals(matched(svc), BLOCKS), timeout=ACK_WAIT_S / 3)
                print(f"\nstranded: {len(stolen)} deliveries taken by a vanished client, "
                      f"index complete {loop.time() - started:.1f} s later, consumer "
                      f"re-created {svc.stats.consumer_resets} time(s)")
                assert svc.stats.gaps == 0
                assert svc.stats.consumer_resets >= 1
        finally:
            await svc.close()

    async def test_deliveries_stranded_while_the_indexer_was_away(self, nats_url: str,
                                                                  tmp_path: Path) -> None:
        """With the Redis index a restarted indexer resumes its durable consumers: the
        batches a vanished client took while it was down (7 of 8, unacknowledged) are
        found awaiting an ack at the start (or, failing that, by the first two idle
        looks), and the consumer is re-created from its ack floor instead of waiting for
        JetStream to send them again."""
        redis_server = RedisServer(tmp_path / "redis").start()
        config = service_config(nats_url, redis_url=redis_server.url)
        try:
            async with publisher(nats_url) as pub:
                first = IndexerService(config)
                await first.start()
                store(pub, 1, 1)
                await pub.flush()
                await eventually(lambda: equals(matched(first), 1))
                await first.close()
                for block in range(2, BLOCKS + 1):
                    store(pub, block, block)
                    await pub.flush()
                stolen = await steal(nats_url, partition_of(MODEL, "w1", PARTITIONS))
                assert len(stolen) == BLOCKS - 1
                second = IndexerService(config)
                await second.start()
                try:
                    loop = asyncio.get_running_loop()
                    started = loop.time()
                    await eventually(lambda: equals(matched(second), BLOCKS),
                                     timeout=ACK_WAIT_S / 3)
                    print(f"\nstranded at start: {len(stolen)} deliveries, index complete "
                          f"{loop.time() - started:.1f} s after the start")
                    assert second.stats.gaps == 0
                    assert second.stats.consumer_resets >= 1
                    assert second.stats.rebuilds == 0  # resumed, not rebuilt
                finally:
                    await second.close()
        finally:
            redis_server.stop()
