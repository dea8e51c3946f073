"""Deliveries a partition's durable consumer made that never reach the indexer (the pull
request they answered went through a NATS node that died, or a connection that dropped)
neither wait out JetStream's ack wait (30 s) nor get acknowledged unread by the next
AckAll: the consumer is re-created from the last sequence acknowledged, and the index gets
every batch, in order, within seconds. The lost deliveries are made by a second client
pulling from the same durable consumer and vanishing without an ack."""

from __future__ import annotations

import asyncio
import contextlib

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

pytestmark = pytest.mark.integration

BLOCKS = 8
ACK_WAIT_S = 30.0  # ConsumerSettings.ack_wait_s: what a stranded delivery would wait


async def steal(nats_url: str, partition: int, ready: asyncio.Event) -> list[Msg]:
    """Pull from the partition's durable consumer as a second client, then disconnect
    without acknowledging anything."""
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.jetstream().pull_subscribe(
            partition_filter(partition), durable=consumer_name(partition), stream=STREAM_NAME)
        fetch = asyncio.create_task(sub.fetch(BLOCKS, timeout=3.0))
        await asyncio.sleep(0.1)  # the pull request is waiting at the server
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
