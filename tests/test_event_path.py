"""The event path end to end: KVEventPublisher -> JetStream -> consumer -> index, on the
session's nats-server (JetStream emptied around each test), or on a private one where the
test kills and restarts it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import nats
import pytest

from indexer.app import IndexerService
from indexer.embedded import EmbeddedNats
from indexer.index.protocol import ScoreQuery
from kvcore.bus import (
    SCHEMA_VERSION,
    BlockStored,
    EventBatch,
    encode_batch,
    msg_id,
    pack_tokens,
    subject_for,
)
from kvcore.topology import DEAD_LETTER_STREAM, StreamSettings
from publisher.publisher import KVEventPublisher
from tests.support.event_path import (
    BS,
    MODEL,
    PARTITIONS,
    TOKENS,
    matched,
    publisher,
    service_config,
    store,
)
from tests.support.polling import equals, eventually, is_true

pytestmark = pytest.mark.integration


@pytest.fixture
async def service(nats_url: str) -> AsyncIterator[IndexerService]:
    svc = IndexerService(service_config(nats_url))
    await svc.start()
    yield svc
    await svc.close()


class TestDelivery:
    """Published events reach the index, once each, in order."""

    async def test_store_remove_clear(self, nats_url: str,
                                      service: IndexerService) -> None:
        """Stores, a removal and a clear arrive in order and the index follows them."""
        async with publisher(nats_url) as pub:
            store(pub, 1, 4)
            pub.end_step()
            store(pub, 5, 8)
            await pub.flush()
            await eventually(lambda: equals(matched(service), 8))
            pub.removed([5])
            await pub.flush()
            await eventually(lambda: equals(matched(service), 4))
            pub.cleared()
            await pub.flush()
            await eventually(lambda: equals(matched(service), 0))
        assert service.stats.gaps == 0

    async def test_duplicate_deliveries_are_skipped(self, nats_url: str,
                                                    service: IndexerService) -> None:
        """The same batch stored twice in the stream (dedup bypassed) is applied once."""
        batch = EventBatch(schema=SCHEMA_VERSION, model=MODEL, worker_id="dup", epoch=1, seq=0,
                           events=[BlockStored(block_hashes=[1, 2], token_ids=pack_tokens(
                               TOKENS[: 2 * BS]), block_size=BS)])
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        for attempt in range(2):
            await js.publish(subject_for(MODEL, "dup"), encode_batch(batch),
                             headers={"Nats-Msg-Id": f"{msg_id('dup', 0, 1, 0)}-{attempt}"})
        await nc.close()
        await eventually(lambda: equals(matched(service, "dup"), 2))
        assert service.index is not None
        index = service.index

        async def one_duplicate() -> bool:
            return (await index.stats()).duplicates == 1

        await eventually(one_duplicate)
        assert service.stats.batches_applied == 1


class TestPoison:
    """Undecodable or unknown-schema messages are dead-lettered; the consumer goes on."""

    async def test_poison_goes_to_dead_letter(self, nats_url: str,
                                              service: IndexerService) -> None:
        """Garbage and a schema-99 batch are acked, copied with reasons, counted."""
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        subject = subject_for(MODEL, "p")
        await js.publish(subject, b"\x93\x01\x02", headers={"Nats-Msg-Id": "junk"})
        future = msgspec.msgpack.encode({"schema": 99, "model": MODEL, "worker_id": "p",
                                         "epoch": 1, "seq": 0, "events": "new shape"})
        await js.publish(subject, future, headers={"Nats-Msg-Id": "future"})
        good = EventBatch(schema=SCHEMA_VERSION, model=MODEL, worker_id="p", epoch=1, seq=0,
                          events=[BlockStored(block_hashes=[1], token_ids=pack_tokens(
                              TOKENS[:BS]), block_size=BS)])
        await js.publish(subject, encode_batch(good), headers={"Nats-Msg-Id": "good"})
        await eventually(lambda: equals(matched(service, "p"), 1))
        assert service.stats.dead_letters == {"undecodable": 1, "unsupported_schema": 1}
        info = await js.stream_info(DEAD_LETTER_STREAM)
        assert info.state.messages == 2
        dl = await js.pull_subscribe("kv.deadletter.>", durable="t", stream=DEAD_LETTER_STREAM)
        msgs = await dl.fetch(2, timeout=2)
        assert {m.headers["Kv-Reason"] for m in msgs if m.headers} == {
            "undecodable", "unsupported_schema"}
        await nc.close()


class TestResync:
    """Gaps and unknown parents make the publisher re-send its mirror: the index heals."""

    async def test_gap_triggers_resync(self, nats_url: str,
                                       service: IndexerService) -> None:
        """A lost batch (a removal) is a gap; the resync re-sends the rank without it."""
        from kvcore.bus import BlockRemoved

        async with publisher(nats_url) as pub:
            store(pub, 1, 8)
            await pub.flush()
            await eventually(lambda: equals(matched(service), 8))
            rank = pub.ranks[0]
            rank.mirror.apply([BlockRemoved(block_hashes=[5])])
            rank.seq += 1  # the batch removing block 5 is lost on the way
            pub.removed([8])
            await pub.flush()
            await eventually(lambda: equals(matched(service), 4))  # without resync: 7
            assert service.stats.gaps == 1
            assert rank.resyncs == 1

    async def test_unknown_parent_triggers_resync(self, nats_url: str,
                                                  service: IndexerService) -> None:
        """A child whose parent the index never saw gets the rank re-sent."""
        async with publisher(nats_url) as pub:
            pub.ranks[0].mirror.apply([BlockStored(
                block_hashes=[1, 2], token_ids=pack_tokens(TOKENS[: 2 * BS]), block_size=BS)])
            store(pub, 3, 3)  # parent 2 was never published
            await pub.flush()
            await eventually(lambda: equals(matched(service), 3))
            assert pub.ranks[0].resyncs == 1


class TestLiveness:
    """A worker whose liveness entry goes away loses its blocks after the grace period."""

    async def test_deleted_entry_purges_worker(self, nats_url: str) -> None:
        """A publisher that closes deletes its entry; its blocks go after the grace."""
        svc = IndexerService(service_config(nats_url, liveness_grace_s=0.5))
        await svc.start()
        try:
            async with publisher(nats_url) as pub:
                store(pub, 1, 4)
                await pub.flush()
                await eventually(lambda: equals(matched(svc), 4))
                await eventually(lambda: is_true(svc.liveness is not None
                                               and svc.liveness.is_live(MODEL, "w1")))
            await eventually(lambda: equals(matched(svc), 0), timeout=5)
            assert svc.liveness is not None and svc.liveness.removed == 1
        finally:
            await svc.close()

    async def test_expired_entry_purges_worker(self, nats_url: str) -> None:
        """A publisher that stops refreshing (crashed) expires after the TTL, then goes."""
        svc = IndexerService(service_config(nats_url, liveness_ttl_s=1.0,
                                            liveness_grace_s=0.5))
        await svc.start()
        pub = KVEventPublisher(MODEL, "w1", block_size=BS, nats_url=nats_url,
                               stream=StreamSettings(partitions=PARTITIONS, liveness_ttl_s=1.0))
        try:
            await pub.start()
            store(pub, 1, 4)
            await pub.flush()
            await eventually(lambda: equals(matched(svc), 4))
            await eventually(lambda: is_true(svc.liveness is not None
                                           and svc.liveness.is_live(MODEL, "w1")))
            pub._stop.set()  # the keep-alive loop ends, as if the process died
            await asyncio.sleep(0.8)
            assert await matched(svc) == 4  # still within TTL + grace
            await eventually(lambda: equals(matched(svc), 0), timeout=6)
        finally:
            await svc.close()
            await pub.close()


class TestRestarts:
    """NATS restarts and indexer restarts lose nothing."""

    async def test_nats_restart_mid_stream(self, nats_server: EmbeddedNats) -> None:
        """Events published across a nats-server kill and restart all reach the index."""
        service = IndexerService(service_config(nats_server.url))  # on the private server
        await service.start()
        try:
            async with publisher(nats_server.url) as pub:
                store(pub, 1, 4)
                await pub.flush()
                await eventually(lambda: equals(matched(service), 4))
                nats_server.kill()
                store(pub, 5, 6)
                pub.end_step()
                await asyncio.sleep(0.3)
                nats_server.start()
                store(pub, 7, 8)
                assert await pub.flush(15)
                await eventually(lambda: equals(matched(service), 8), timeout=15)
            assert service.stats.gaps == 0
        finally:
            await service.close()

    async def test_memory_index_rebuilt_from_stream(self, nats_url: str,
                                                    tmp_path: Path) -> None:
        """A restarted in-memory indexer replays the retained stream and has it all again."""
        async with publisher(nats_url) as pub:
            first = IndexerService(service_config(nats_url))
            await first.start()
            store(pub, 1, 6)
            await pub.flush()
            await eventually(lambda: equals(matched(first), 6))
            await first.close()
            second = IndexerService(service_config(nats_url))
            await second.start()
            try:
                await eventually(lambda: equals(matched(second), 6))
            finally:
                await second.close()


class TestMetrics:
    """/metrics exposes the index's and the consumer's counters."""

    async def test_scrape(self, nats_url: str) -> None:
        """After events and a poison message, the counters show both."""
        import urllib.request

        svc = IndexerService(service_config(nats_url, metrics_listen="127.0.0.1:0"))
        await svc.start()
        try:
            async with publisher(nats_url) as pub:
                store(pub, 1, 4)
                await pub.flush()
                await eventually(lambda: equals(matched(svc), 4))
            assert svc.metrics is not None
            await svc.metrics.refresh()
            url = f"http://127.0.0.1:{svc.metrics_port}/metrics"
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url).read().decode())
            assert "kv_indexer_blocks_stored_total 4.0" in body
            assert 'kv_indexer_worker_blocks{dp_rank="0",model="org/model-7b",tier="gpu",' \
                   'worker="w1"} 4.0' in body
            assert "kv_indexer_lag_seconds" in body
            assert "kv_indexer_score_seconds_bucket" not in body  # no Score served yet

            # a Score through the index the service serves (gRPC calls this one)
            await svc._served_index.score(ScoreQuery(model=MODEL, token_ids=TOKENS,
                                                      block_size=BS))
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url).read().decode())
            assert ('kv_indexer_score_seconds_count{backend="MemoryIndex",outcome="ok"} 1.0'
                    in body)
        finally:
            await svc.close()


class TestServiceWiring:
    """gRPC answers reflect the service's rebuild state and worker liveness."""

    async def test_rebuilding_flag_and_gone_workers(self, nats_url: str) -> None:
        """Score says `rebuilding` while a partition rebuilds; a worker whose liveness
        entry was deleted is no longer a candidate, even before its blocks are removed."""
        from indexer.client import AsyncIndexerClient, Query

        svc = IndexerService(service_config(nats_url, grpc_listen="127.0.0.1:0"))
        await svc.start()
        client = AsyncIndexerClient(f"127.0.0.1:{svc.grpc_port}")
        query = Query(model=MODEL, token_ids=TOKENS, block_size=BS)
        try:
            async with publisher(nats_url, "stays") as stays:
                async with publisher(nats_url, "leaves") as leaves:
                    for pub in (stays, leaves):
                        store(pub, 1, 4)
                        await pub.flush()
                    await eventually(lambda: equals(matched(svc, "leaves"), 4))
                    await eventually(lambda: is_true(svc.liveness is not None and
                                                   svc.liveness.is_live(MODEL, "leaves")))
                    await eventually(lambda: is_true(not svc.rebuilding))  # caught up
                    answer = await client.score(query)
                    assert {s.worker_id for s in answer.scores} == {"stays", "leaves"}
                    assert not answer.freshness.rebuilding
                    svc.consumers()[0].rebuilding = True
                    assert (await client.score(query)).freshness.rebuilding
                    svc.consumers()[0].rebuilding = False
                # "leaves" closed: entry deleted; grace (60 s) keeps its blocks in the index
                await eventually(lambda: is_true(svc.liveness is not None and
                                               svc.liveness.is_gone(MODEL, "leaves")))
                assert await matched(svc, "leaves") == 4

                async def only_stays() -> bool:  # after the live-worker cache expires
                    answer = await client.score(query)
                    return {s.worker_id for s in answer.scores} == {"stays"}

                await eventually(only_stays, timeout=5)
                best = await client.find_best_worker(query)
                assert best.worker_id == "stays"
        finally:
            await client.close()
            await svc.close()
